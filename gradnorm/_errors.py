"""Exceptions raised by gradnorm.

Every error names the argument, what was expected and what was received, in the form
`` `name` must be <expectation>. Received: <value> ``. Each exception also derives from
the built-in type a user would catch for that kind of mistake (`ValueError`/`TypeError`).
"""

from __future__ import annotations

__all__ = [
    "GradnormError",
    "UnknownRuleError",
    "HyperparameterError",
    "MissingHVPError",
    "OracleOutputError",
    "ParamsError",
    "ClosureError",
]


class GradnormError(Exception):
    """Base class of every error gradnorm raises on purpose."""


class UnknownRuleError(GradnormError, ValueError):
    """A rule name that is not in the registry."""


class HyperparameterError(GradnormError, ValueError):
    """A hyperparameter that is missing, unknown, of the wrong type or out of range."""


class MissingHVPError(GradnormError, ValueError):
    """A rule needs Hessian-vector products and the oracle cannot compute them."""


class OracleOutputError(GradnormError, ValueError):
    """`grad_fn` / `hvp_fn` returned something of the wrong structure, shape or dtype."""


class ClosureError(OracleOutputError, TypeError):
    """An adapter's loss function or closure is missing, cannot be called as the rule needs
    (a first pass with `create_graph`, say), or returned something that is not a real scalar loss.
    The same class in every adapter (`gradnorm.torch`, `gradnorm.jax`, `gradnorm.tf`)."""


class ParamsError(GradnormError, TypeError):
    """`params` is not a pytree of real floating-point arrays of one array library."""


def describe(value: object) -> str:
    """A short, safe description of a received value for an error message."""
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None:
        return f"{type(value).__module__}.{type(value).__qualname__} of shape {tuple(shape)} and dtype {dtype}"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (type {type(value).__name__})"
