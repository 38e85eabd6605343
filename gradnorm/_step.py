"""`gradnorm.step`: one rule step from plain functions, in any Array API library."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from . import rules as _rules
from ._oracle import FunctionOracle

__all__ = ["step", "StepResult"]


class StepResult(NamedTuple):
    """The result of one step.

    Attributes:
        grad: the regularized descent direction, a tree like `params`; give it to any
            optimizer in place of the gradient.
        loss: the loss at `params` (a 0-d array).
        state: the rule state; pass it back as `state=` on the next step.
        info: 0-d arrays and ints to log: `loss`, `grad_norm`, `update_norm`,
            `finite`, `grad_evals`, `hvp_evals` and the rule's own entries.
    """

    grad: Any
    loss: Any
    state: Any
    info: dict[str, Any]


def step(
    params: Any,
    grad_fn: Callable[[Any], tuple[Any, Any]],
    *,
    rule: Any,
    state: Any = None,
    hvp_fn: Callable[[Any, Any], Any] | None = None,
    **hyperparameters: Any,
) -> StepResult:
    """One step of a gradient-regularization rule: the direction to descend along.

    Args:
        params: a pytree (dict, list, tuple, nested) of real floating-point arrays of one
            Array API library: NumPy, PyTorch, JAX, CuPy, array-api-strict, ...
        grad_fn: `grad_fn(params) -> (loss, grads)` on the current minibatch; the rule may
            call it at other points (perturbed parameters). `grads` must have the structure,
            shapes and dtypes of `params`.
        rule: a rule name (see `gradnorm.rules.names()`) or a `gradnorm.rules.Rule`.
        state: the state returned by the previous step (`None` to start).
        hvp_fn: `hvp_fn(params, v) -> H v`, needed by `rule="gr"` only.
        **hyperparameters: the rule's hyperparameters (`rho=0.05`, `gamma=0.1`, ...).

    Returns:
        `StepResult` `(grad, loss, state, info)`. Nothing is modified in place.

    Everything is checked before `grad_fn` runs: the rule name and hyperparameters, the
    parameter tree, and that an HVP exists when the rule needs one. `grad_fn`'s answers are
    checked as they come.

    Example::

        res = gradnorm.step(params, grad_fn, rule="sam", rho=0.05)
        params = {k: p - 0.1 * res.grad[k] for k, p in params.items()}
    """
    rule_obj = _rules.get(rule, **hyperparameters)
    oracle = FunctionOracle(grad_fn, hvp_fn)
    if state is None:
        state = rule_obj.init(params)
    direction, state, info = rule_obj.update(params, state, oracle)
    return StepResult(direction, info["loss"], state, info)
