"""``gradnorm.torch.step``: a pure, functional rule step on ``torch.func``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import rules as _rules
from .._errors import describe
from .._step import StepResult
from ._ops import TorchForeachOps

__all__ = ["step"]

HVP_MODES = ("forward_over_reverse", "reverse_over_reverse")


class _FuncOracle:
    def __init__(self, loss: Callable[[Any], torch.Tensor], needs_hvp: bool, hvp_mode: str):
        self._grad_and_value = torch.func.grad_and_value(loss)
        self._grad = torch.func.grad(loss)
        self.has_hvp = needs_hvp
        self._mode = hvp_mode

    def value_and_grad(self, params: Any) -> tuple[torch.Tensor, Any]:
        grads, value = self._grad_and_value(params)
        return value.detach(), grads

    def hvp(self, params: Any, v: Any) -> Any:
        if self._mode == "forward_over_reverse":
            return torch.func.jvp(self._grad, (params,), (v,))[1]
        _, vjp_fn = torch.func.vjp(self._grad, params)
        return vjp_fn(v)[0]  # the Hessian is symmetric: v^T H = (H v)^T


def step(
    params: Any,
    loss_fn: Callable[..., torch.Tensor],
    *args: Any,
    rule: Any,
    state: Any = None,
    hvp: str = "forward_over_reverse",
    **hyperparameters: Any,
) -> StepResult:
    """One rule step on a pytree of tensors, functionally (nothing is modified).

    Args:
        params: a pytree of tensors (for a module: ``{k: v.detach() for k, v in
            model.named_parameters()}``).
        loss_fn: ``loss_fn(params, *args) -> scalar tensor`` on the current minibatch, for
            example ``lambda p, x, y: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)``.
        *args: passed to ``loss_fn`` at every evaluation (the same minibatch for every pass).
        rule: a rule name or a ``gradnorm.rules.Rule``.
        state: the previous step's state (``None`` to start).
        hvp: how ``gr`` gets Hessian-vector products: ``"forward_over_reverse"`` (``jvp`` of
            ``grad``) or ``"reverse_over_reverse"`` (``vjp`` of ``grad``). Measure both on your
            model: on CPU the reverse-over-reverse product is often faster.
        **hyperparameters: the rule's hyperparameters.

    Returns:
        ``gradnorm.StepResult(grad, loss, state, info)``, as ``gradnorm.step``.
    """
    rule_obj = _rules.get(rule, **hyperparameters)
    if hvp not in HVP_MODES:
        raise ValueError(f"`hvp` must be one of {', '.join(repr(m) for m in HVP_MODES)}. Received: {describe(hvp)}.")
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be a callable `loss_fn(params, *args) -> loss`. Received: {describe(loss_fn)}.")
    if state is None:
        state = rule_obj.init(params)
    oracle = _FuncOracle(lambda p: loss_fn(p, *args), rule_obj.needs_hvp, hvp)
    direction, state, info = rule_obj.update(params, state, oracle, ops=TorchForeachOps())
    return StepResult(direction, info["loss"], state, info)
