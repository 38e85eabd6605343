"""gradnorm: gradient regularization and sharpness-aware training rules for any framework.

Every rule (`sgd`, `sam`, `gnp`, `gr`, `fd_gr`, `gam`, `flooding`, `coherent`)
is a pure update over parameter pytrees written against the Python Array API::

    import gradnorm
    res = gradnorm.step(params, grad_fn, rule="fd_gr", gamma=0.1, eps=0.01)

and measures flatness the same way (`gradnorm.diagnostics`: the Hessian's top eigenvalues and trace,
SAM's sharpness, GAM's first-order flatness)::

    gradnorm.diagnostics.hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn, k=3).eigenvalues

Importing gradnorm imports no deep-learning framework; the framework adapters
(`gradnorm.torch`, `gradnorm.jax`, `gradnorm.tf`) import theirs when they are used.
"""

from __future__ import annotations

from . import diagnostics, rules, schedules
from ._errors import (
    ClosureError,
    GradnormError,
    HyperparameterError,
    MissingHVPError,
    OracleOutputError,
    ParamsError,
    UnknownRuleError,
)
from ._oracle import HVP_MODES, PERTURBATIONS, FunctionOracle, LeafOracle, Oracle, TreeOracle
from ._step import StepResult, step
from ._tree import ArrayOps, PerLeaf
from .rules import Rule, flood, iflood

__version__ = "0.1.0"

__all__ = [
    "HVP_MODES",
    "PERTURBATIONS",
    "ArrayOps",
    "ClosureError",
    "FunctionOracle",
    "GradnormError",
    "HyperparameterError",
    "LeafOracle",
    "MissingHVPError",
    "Oracle",
    "OracleOutputError",
    "ParamsError",
    "PerLeaf",
    "Rule",
    "StepResult",
    "TreeOracle",
    "UnknownRuleError",
    "__version__",
    "available_rules",
    "diagnostics",
    "flood",
    "iflood",
    "rules",
    "schedules",
    "step",
]


def available_rules() -> list[str]:
    """Names accepted by `rule=`."""
    return rules.names()
