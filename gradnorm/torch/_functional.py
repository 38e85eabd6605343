"""``gradnorm.torch.step``: a pure, functional rule step on ``torch.func``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import optree
import torch

from .. import rules as _rules
from .._errors import HyperparameterError, describe
from .._oracle import HVP_MODES
from .._step import StepResult
from ._closure import check_closure_loss
from ._ops import TorchForeachOps

__all__ = ["step", "HVP_MODES"]


_jvp_warmed_up = False


def _first_jvp(fn: Callable[[], Any]) -> Any:
    """Run `fn`; on the first forward-mode call, hide the `torch.jit.script` DeprecationWarning
    that PyTorch itself emits while it loads its forward-AD decompositions (nothing a gradnorm
    user can act on)."""
    global _jvp_warmed_up
    if _jvp_warmed_up:
        return fn()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
        out = fn()
    _jvp_warmed_up = True
    return out


class FuncOracle:
    """A gradnorm `Oracle` from ``loss(params) -> scalar tensor`` by ``torch.func``.

    * ``value_and_grad``: ``torch.func.grad_and_value``. The loss must be a real floating-point
      0-d tensor (a `gradnorm.ClosureError` naming ``loss_fn`` otherwise).
    * ``hvp`` (``has_hvp`` only when asked for): ``"forward_over_reverse"`` is
      ``torch.func.jvp(torch.func.grad(loss), (params,), (v,))``; ``"reverse_over_reverse"`` is
      the ``torch.func.vjp`` of the gradient (the Hessian is symmetric). In reverse mode, with
      ``reuse_for_hvp=True``, ``value_and_grad`` computes the gradient inside ``vjp`` and keeps
      the pullback, so an HVP at the same parameters (exact GR: ``H g`` right after ``g``)
      costs one extra backward pass instead of a new forward and two backward passes.

    Nothing is read back to the host; the loss is returned detached.
    """

    def __init__(
        self,
        loss: Callable[[Any], torch.Tensor],
        *,
        has_hvp: bool,
        hvp_mode: str = "reverse_over_reverse",
        reuse_for_hvp: bool = False,
    ):
        def checked(params: Any) -> torch.Tensor:
            # shape and dtype only (no host read): a complex, integer or non-scalar loss fails here
            # with a ClosureError naming `loss_fn`, not deep inside torch.func
            return check_closure_loss(loss(params), "loss_fn")

        self._loss = checked
        self._grad_and_value = torch.func.grad_and_value(checked)
        self.has_hvp = has_hvp
        self._mode = hvp_mode
        self._reuse = has_hvp and reuse_for_hvp and hvp_mode == "reverse_over_reverse"
        self._pullback: tuple[list[torch.Tensor], Callable[[Any], Any]] | None = None

    def value_and_grad(self, params: Any) -> tuple[torch.Tensor, Any]:
        if self._reuse:
            grads, pullback, value = torch.func.vjp(self._grad_and_value, params, has_aux=True)
            self._pullback = (optree.tree_leaves(params), pullback)
        else:
            grads, value = self._grad_and_value(params)
        return value.detach(), grads

    def hvp(self, params: Any, v: Any) -> Any:
        if self._pullback is not None:
            leaves, pullback = self._pullback
            current = optree.tree_leaves(params)
            if len(current) == len(leaves) and all(a is b for a, b in zip(current, leaves)):
                self._pullback = None  # one HVP per gradient: free the graph now
                return pullback(v)[0]
        if self._mode == "forward_over_reverse":
            grad = torch.func.grad(self._loss)
            return _first_jvp(lambda: torch.func.jvp(grad, (params,), (v,))[1])
        _, pullback = torch.func.vjp(torch.func.grad(self._loss), params)
        return pullback(v)[0]


def step(
    params: Any,
    loss_fn: Callable[..., torch.Tensor],
    *args: Any,
    rule: Any,
    state: Any = None,
    hvp: str = "reverse_over_reverse",
    **hyperparameters: Any,
) -> StepResult:
    """One rule step on a pytree of tensors, functionally: nothing is modified in place.

    Gradients come from ``torch.func.grad_and_value`` and, for ``rule="gr"`` only,
    Hessian-vector products from ``torch.func``; the rule's arithmetic runs on fused
    ``torch._foreach_*`` kernels (`TorchForeachOps`). Nothing is read back to the host, so
    the step can run asynchronously on an accelerator.

    Args:
        params: a pytree (dict, list, tuple, nested) of floating-point tensors. For a module:
            ``{k: v.detach() for k, v in model.named_parameters()}``.
        loss_fn: ``loss_fn(params, *args) -> scalar tensor`` on the current minibatch, e.g.
            ``lambda p, x, y: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)``.
            The rule may call it several times per step (at perturbed parameters); each call
            must see the same minibatch.
        *args: passed to ``loss_fn`` after ``params`` at every evaluation.
        rule: a rule name (see ``gradnorm.available_rules()``) or a ``gradnorm.rules.Rule``.
        state: the state of the previous step (``None`` to start).
        hvp: how ``gr`` computes Hessian-vector products: ``"reverse_over_reverse"`` (the
            default: ``vjp`` of ``grad``, a double backward on the graph of the gradient pass,
            which it reuses: H g costs about 1.5 x the matrix products of an fd_gr step) or
            ``"forward_over_reverse"`` (``jvp`` of ``grad``: a new forward-backward pass with
            tangents, 2 x the matrix products of fd_gr; needs forward-mode rules for every
            operation of the model). Measured in ``benchmarks/hvp_routes.py``: reverse over
            reverse 1.1-1.8 x an fd_gr step, forward over reverse 1.2-3.0 x (docs/performance.md).
        **hyperparameters: the rule's hyperparameters (``rho=0.05``, ``gamma=0.1``, ...).

    Returns:
        ``gradnorm.StepResult(grad, loss, state, info)`` as ``gradnorm.step``: ``grad`` (the
        direction, a tree like ``params``) goes to any optimizer in place of the gradient.

    Everything is validated before ``loss_fn`` first runs: the rule and its hyperparameters,
    ``hvp``, ``loss_fn``, ``params`` and ``state``.

    Memory: ``params`` are never written. Each point the rule evaluates at is one new
    parameter-sized tensor (freed after its pass); the gradients are the rule's to donate (SAM
    releases ``g`` once ``params + e`` is formed) and to combine in place, so a step holds at its
    peak what ``gradnorm.torch.Optimizer`` holds, with the point in place of the optimizer's
    snapshot: one parameter-sized buffer beyond the gradient for ``sam``, two for ``gnp`` and
    ``fd_gr``, four for ``gam`` (docs/adapters/torch.md, "Memory").

    Example::

        params = {k: v.detach() for k, v in model.named_parameters()}
        loss_fn = lambda p, x, y: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)
        res = gradnorm.torch.step(params, loss_fn, x, y, rule="sam", rho=0.05)
        for k, p in model.named_parameters():
            p.grad = res.grad[k]
        optimizer.step()
    """
    rule_obj = _rules.get(rule, **hyperparameters)
    if not isinstance(hvp, str) or hvp not in HVP_MODES:
        raise HyperparameterError(
            f"`hvp` of gradnorm.torch.step must be one of {', '.join(repr(m) for m in HVP_MODES)}. "
            f"Received: {describe(hvp)}."
        )
    if not callable(loss_fn):
        raise TypeError(
            f"`loss_fn` must be a callable `loss_fn(params, *args) -> scalar tensor`. Received: {describe(loss_fn)}."
        )
    if state is None:
        state = rule_obj.init(params)  # checks params
    oracle = FuncOracle(
        (lambda p: loss_fn(p, *args)) if args else loss_fn,
        has_hvp=rule_obj.needs_hvp,
        hvp_mode=hvp,
        reuse_for_hvp=rule_obj.hvp_evals > 0,
    )
    # Gradients come from torch.func whatever the grad mode; no_grad keeps the rule's
    # arithmetic out of autograd when `params` require grad (named_parameters() not detached).
    # The gradients torch.func returns are fresh tensors nothing else holds: the rule donates them
    # and computes its combinations in their buffers (in_place), never in `params`.
    with torch.no_grad():
        direction, state, info = rule_obj.update(params, state, oracle, ops=TorchForeachOps(in_place=True), check=False)
    return StepResult(direction, info["loss"], state, info)
