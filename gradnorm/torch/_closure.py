"""The oracle of one `gradnorm.torch.Optimizer` step: the user's closure evaluated in the live weights.

The framework-neutral part (which point the weights hold, the snapshot taken before the first
write, BatchNorm statistics from the first pass, randomness replay, exact restore) is
`gradnorm._live.LiveWeights`; this module supplies PyTorch's hooks: in-place copies and axpy on the
parameters, the closure pass (``create_graph`` for exact GR, ``no_sync`` under DDP, GradScaler
unscaling), module buffers and the CPU/CUDA generators.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .._errors import ClosureError, describe
from .._live import LiveWeights, same_list
from . import _ops
from ._passes import running_pass

__all__ = ["BackwardCounter", "ClosureOracle", "accepts_create_graph", "check_closure_loss", "rng_state", "set_rng_state"]


def accepts_create_graph(closure: Callable[..., Any]) -> bool:
    """Whether `closure` can be called as ``closure(create_graph=True)``."""
    try:
        params = inspect.signature(closure).parameters
    except (TypeError, ValueError):  # builtins, C callables
        return False
    return "create_graph" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_closure_loss(loss: Any, argument: str = "closure") -> torch.Tensor:
    """The loss a closure returned (or the `loss` argument itself, with ``argument="loss"``), if it
    is a real floating 0-d tensor; else a `ClosureError` naming `argument`."""
    must = "must be" if argument == "loss" else "must return"
    if not isinstance(loss, torch.Tensor):
        raise ClosureError(f"`{argument}` {must} the loss as a tensor. Received: {describe(loss)}.")
    if loss.dim() != 0:
        raise ClosureError(
            f"`{argument}` {must} a scalar loss (shape ()); reduce it first, e.g. with `.mean()`. "
            f"Received: {describe(loss)}."
        )
    if not loss.dtype.is_floating_point:  # complex and integer dtypes are not
        raise ClosureError(f"`{argument}` {must} a real floating-point loss. Received: {describe(loss)}.")
    return loss


class BackwardCounter:
    """Counts the backward passes that reach any of `params` (one per backward, however many
    parameters it touches), except while `paused`. `already`: passes to count as run already."""

    def __init__(self, params: list[torch.Tensor], already: int = 0):
        self.count = already
        self._paused = False
        self._handle = torch.autograd.graph.register_multi_grad_hook(params, self._seen, mode="any")

    def _seen(self, grad: Any) -> None:
        if not self._paused:
            self.count += 1

    def reset(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def paused(self) -> Any:
        self._paused = True
        try:
            yield
        finally:
            self._paused = False


def rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class ClosureOracle(LiveWeights):
    """Evaluates the user's closure at any point by writing the point into the parameters.

    Args:
        params: the live parameters (the weights the closure reads).
        closure: the LBFGS-style closure, or None (then only a first pass given by the caller works).
        ops: the optimizer's `TorchForeachOps` (its in-place ``axpy_`` forms points in the weights).

    Memory: the gradients a pass returns are the ``.grad`` tensors the closure's backward made,
    detached from the parameters (``.grad`` is None between passes) and referenced by nothing else,
    so the rule owns them: what it donates is released before the next pass (the pass's backward
    then allocates in memory just freed), and the optimizer's ``TorchForeachOps(in_place=True)``
    computes the rule's combinations in their buffers. Besides them a step holds the snapshot (the
    optimizer's buffer, kept between steps) and nothing parameter-sized.
        scratch: a function returning a list of tensors like `params` to hold the snapshot (the
            optimizer keeps one buffer between steps).
        has_hvp: the rule differentiates the gradient (the first pass keeps its graph).
        model: the module whose buffers a pass updates (restored to their values after the first pass).
        same_randomness: replay the CPU/CUDA random state of the first pass in every extra pass.
        ddp: None, ``"local"`` (passes under ``model.no_sync()``) or ``"global"`` (the loss averaged
            over ranks; DDP averages the gradients). Without DDP, parameters that are DTensors
            (FSDP2 ``fully_shard``) make every pass global: the loss is averaged over their mesh,
            as FSDP2 averages the gradients.
        unscale: maps a pass's gradients to the rule's scale (GradScaler), or None.
        first_pass_done: the caller supplies the loss and gradients at the current weights.
    """

    def __init__(self, params: list[torch.Tensor], closure: Callable[..., Any] | None, ops: Any, *,
                 scratch: Callable[[], list[torch.Tensor]], has_hvp: bool = False,
                 model: torch.nn.Module | None = None, same_randomness: bool = False, ddp: str | None = None,
                 unscale: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
                 first_pass_done: bool = False):
        super().__init__(list(params), ops, has_hvp=has_hvp, same_randomness=same_randomness,
                         first_pass_done=first_pass_done)
        self.params = params
        self.closure = closure
        self.model = model
        self.ddp = ddp
        self.unscale = unscale
        self._scratch = scratch
        # FSDP2 / DTensor parameters: every pass's gradient is the mean over the mesh (FSDP2's
        # reduce-scatter), so the loss is averaged over it too (flooding and the finite check see
        # the global loss, and every rank takes the same decisions).
        self._loss_mesh = _ops.dtensor_mesh(params) if ddp is None else None
        # The first pass's gradients, with their graph (exact GR only). The oracle keeps no other
        # reference to the gradients it returns: they are the rule's, which may donate them
        # (released before the next pass) or compute in their buffers (`TorchForeachOps.*_into`).
        self._graph: list[torch.Tensor] | None = None

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """A first-pass loss the caller computed (``step(closure, loss=...)``), as the rule must see
        it: averaged over the mesh of DTensor parameters (FSDP2), as the passes' losses are."""
        return _ops.mesh_mean(loss, self._loss_mesh) if self._loss_mesh is not None else loss

    # -- LiveWeights hooks -------------------------------------------------------------------
    def _take_snapshot(self) -> None:
        copy = self._scratch()
        with torch.no_grad():
            _ops.copy_(copy, self.params)
        self.view[:] = copy  # the rule's list now reads the copy; the live tensors are about to move

    def _assign(self, values: list[torch.Tensor]) -> None:
        if not same_list(values, self.params):
            with torch.no_grad():
                _ops.copy_(self.params, values)

    def _assign_axpy(self, step: Any, v: list[torch.Tensor]) -> None:
        with torch.no_grad():
            self.ops.axpy_(step, v, self.params)

    def _read_rng(self) -> Any:
        return rng_state()

    def _write_rng(self, state: Any) -> None:
        set_rng_state(state)

    def _read_side_state(self) -> Any:
        if self.model is None:
            return None
        return [(b, b.detach().clone()) for b in self.model.buffers()]

    def _write_side_state(self, saved: Any) -> list[Any]:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        return []

    def _evaluate(self, first: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.closure is None:
            raise ClosureError(
                "This rule evaluates the loss at perturbed weights: pass `closure` to `step` (a function that "
                "zeroes the gradients, computes the loss on the current minibatch, calls `loss.backward()` and "
                "returns the loss)."
            )
        create_graph = first and self.has_hvp
        for p in self.params:
            p.grad = None
        with torch.enable_grad(), warnings.catch_warnings() if create_graph else contextlib.nullcontext():
            if create_graph:
                # backward(create_graph=True) warns about a parameter <-> .grad reference cycle;
                # the gradients are detached from the parameters right below, which breaks it.
                warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            sync = self.model.no_sync() if self.ddp == "local" else contextlib.nullcontext()
            with sync, running_pass(self.passes - 1):  # forward and backward inside no_sync: DDP decides in forward
                loss = self.closure(create_graph=True) if create_graph else self.closure()
        loss = check_closure_loss(loss)
        if self.ddp == "global":
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss = loss / torch.distributed.get_world_size()
        elif self._loss_mesh is not None:
            loss = _ops.mesh_mean(loss, self._loss_mesh)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        if self.unscale is not None:
            with torch.enable_grad() if create_graph else contextlib.nullcontext():  # keep the graph for H v
                grads = self.unscale(grads, in_place=not create_graph)
        if create_graph:
            self._graph = grads
            grads = [g.detach() for g in grads]
        return loss.detach(), grads

    def _hvp(self, point: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._graph is None or not same_list(point, self.view) or not self.holds(point):
            raise ClosureError("gradnorm.torch.Optimizer computes Hessian-vector products at the current weights only.")
        grads, self._graph = self._graph, None  # one HVP per recorded gradient: free the graph after it
        with_graph = [(i, g) for i, g in enumerate(grads) if g.requires_grad]
        if not with_graph:
            # backward(create_graph=True) gives gradients that depend on the weights; none does, so the
            # closure did not pass `create_graph` on (a trainer's closure that takes **kwargs and ignores
            # them, as Lightning's does): an HVP of 0 would silently make `gr` plain SGD.
            raise ClosureError(
                "The closure's gradients carry no graph: it accepted `create_graph=True` but did not pass it to "
                "`backward` (Lightning's training closure, for one, ignores it), so the Hessian-vector product of "
                "rule 'gr' cannot be taken. Pass it on (`loss.backward(create_graph=create_graph)`), or use "
                "rule='fd_gr', the same update by a finite difference of gradients."
            )
        idx, gs = zip(*with_graph)
        hv = torch.autograd.grad(gs, self.params, grad_outputs=[v[i] for i in idx], allow_unused=True)
        return [h if h is not None else torch.zeros_like(p) for h, p in zip(hv, self.params)]
