"""``gradnorm.torch.Optimizer``: any gradnorm rule around any ``torch.optim`` optimizer.

This module is the orchestration of a step; the pieces live beside it: the closure oracle on the
shared live-weights mechanism (`_closure`), GradScaler handling (`_scaler`), parameter-group
routing (`_groups`) and checkpoints (`_checkpoint`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .. import rules as _rules
from .._errors import ClosureError, GradnormError, HyperparameterError, describe
from .._oracle import PERTURBATIONS
from . import _accelerate_guard, _checkpoint
from ._closure import BackwardCounter, ClosureOracle, accepts_create_graph, check_closure_loss
from ._groups import GroupRules, check_base_kwargs, rule_class
from ._ops import TorchForeachOps
from ._scaler import ScalerHook

__all__ = ["Optimizer", "ClosureError"]


class Optimizer(torch.optim.Optimizer):
    r"""A gradnorm rule around a ``torch.optim`` optimizer.

    At every :meth:`step` the rule turns the minibatch gradient into its direction (evaluating
    the closure at perturbed weights where the rule needs to), the weights are put back exactly,
    and the base optimizer applies the direction as if it were the gradient: momentum, Adam,
    weight decay, schedules and gradient clipping hooks work as usual.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer (ignored
            when ``base`` is an optimizer instance, whose groups are used).
        base: a ``torch.optim.Optimizer`` class (built with the remaining keyword arguments) or
            an instance.
        rule: a rule name (``"sam"``, ``"gnp"``, ``"fd_gr"``, ...) or a ``gradnorm.rules.Rule``.
        model: the module being trained, if it has buffers that a forward pass updates
            (BatchNorm running statistics): its buffers are restored after the extra passes, so
            that they are updated by the pass at the unperturbed weights only (as in the
            reference JAX code of SAM and GNP).
        perturbation: with ``model`` a ``DistributedDataParallel`` module: ``"local"`` (default,
            as in the papers: every rank evaluates all passes on its own minibatch under
            ``no_sync()``, forward and backward, and the ranks' directions are averaged once)
            or ``"global"`` (every pass is all-reduced by DDP, so every rank computes the rule on
            the gradient of the whole global batch; the loss is averaged over ranks too, so
            ``flooding`` compares the global loss with its level).
        grad_scaler: a ``torch.amp.GradScaler`` for float16 mixed precision. The closure calls
            ``grad_scaler.scale(loss).backward()`` and returns ``loss``; the optimizer unscales
            every pass's gradient before the rule sees it, skips the step when any pass
            overflowed (the weights stay exactly as they were), and updates the scale with the
            scaler's own growth/backoff policy. Do not call ``scaler.step`` or
            ``scaler.update`` yourself.
        same_randomness: reuse the random state of the first pass in every extra pass, so
            dropout draws the same masks at the perturbed weights (as the JAX reference code does
            by reusing the PRNG key). Default False: each pass draws its own, as PyTorch SAM
            implementations do.
        skip_nonfinite: skip the base update (and keep the weights) when the loss or the
            direction is not finite, as ``GradScaler`` does. Deciding costs one device-to-host
            read per step; set False to never synchronise (non-finite steps are still reported
            in :attr:`last_info`).
        info_norms: report ``grad_norm`` and ``update_norm`` in :attr:`last_info` at every step.
            Off by default: each is one more pass over the parameters that the rule's math does
            not need (``grad_norm`` is reported anyway when the rule computes it, as ``sam`` does),
            and ``finite`` then comes from one fused inf/nan check of the direction.
        **kwargs: the rule's hyperparameters (``rho=0.05``) and the base optimizer's arguments
            (``lr=0.1, momentum=0.9``); a name that is neither is an error.

    The closure follows ``torch.optim.LBFGS``: it zeroes the gradients, computes the loss on the
    current minibatch, calls ``backward`` and returns the loss. ``step(closure)`` calls it at the
    current weights first and returns that loss. For ``rule="gr"`` the closure must accept a
    ``create_graph`` keyword and pass it to ``backward`` (``loss.backward(create_graph=create_graph)``)
    so that the optimizer can differentiate the gradient once more.

    Custom loops may compute the first pass themselves: ``loss.backward(); opt.step(closure,
    loss=loss)`` uses the gradients already in ``.grad`` and calls ``closure`` only for the extra
    evaluations (none for ``sgd``, ``flooding``, ``coherent``, which then need no closure).

    ``state_dict()`` is the base optimizer's state dict plus a ``"gradnorm"`` entry with the rule
    and its state; it never holds copies of weights. ``.grad`` holds the rule's direction after
    a step (PyTorch's optimizers leave ``.grad`` alone; gradnorm writes the direction there for the
    base optimizer).

    Memory: a step holds, beyond what the base optimizer holds, one copy of the weights (kept
    between steps; the exact restore is from it) and the gradients the rule's math needs at once
    (ALGORITHMS.md, section 0): ``sam`` none (the first gradient is released once the perturbed
    point is formed, before the second backward), ``gnp`` and ``fd_gr`` one, ``gam`` three. The
    gradient tensors of every pass, including what the closure's backward leaves in ``.grad``, are
    the optimizer's: it computes the direction in their buffers. Copy them in the closure if you
    keep them.
    """

    def __init__(
        self,
        params: Any,
        base: Any,
        rule: Any = "sam",
        *,
        model: torch.nn.Module | None = None,
        perturbation: str = "local",
        same_randomness: bool = False,
        grad_scaler: Any = None,
        skip_nonfinite: bool = True,
        info_norms: bool = False,
        clip_grad_norm: float | None = None,
        **kwargs: Any,
    ):
        cls = rule_class(rule)
        names = {h.name for h in cls.spec()} if cls is not None else set()
        rule_kwargs = {k: v for k, v in kwargs.items() if k in names}
        base_kwargs = {k: v for k, v in kwargs.items() if k not in names}
        self.rule = _rules.get(rule, **rule_kwargs)
        for name, value in (("skip_nonfinite", skip_nonfinite), ("same_randomness", same_randomness),
                            ("info_norms", info_norms)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False. Received: {describe(value)}.")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be None or a torch.nn.Module. Received: {describe(model)}.")
        if not isinstance(perturbation, str) or perturbation not in PERTURBATIONS:
            raise ValueError(
                f"`perturbation` must be one of {', '.join(repr(p) for p in PERTURBATIONS)}. Received: {describe(perturbation)}."
            )
        if clip_grad_norm is not None and (
            isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
            or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0
        ):
            raise ValueError(f"`clip_grad_norm` must be None or a finite number > 0. Received: {describe(clip_grad_norm)}.")
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.skip_nonfinite = skip_nonfinite
        self.use_grad_scaler(grad_scaler)
        self.info_norms = info_norms
        self.same_randomness = same_randomness
        self.perturbation = perturbation
        self.model = model
        if isinstance(base, torch.optim.Optimizer):
            if base_kwargs:
                raise HyperparameterError(
                    f"Unknown keyword arguments {sorted(base_kwargs)}: `base` is an optimizer instance, so only the "
                    f"hyperparameters of rule '{self.rule.name}' ({', '.join(sorted(names))}) may be given here."
                )
            self.base = base
        elif isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
            check_base_kwargs(base, base_kwargs, self.rule, names)
            self.base = base(params, **base_kwargs)
        else:
            raise TypeError(
                f"`base` must be a torch.optim.Optimizer class (such as torch.optim.SGD) or instance. Received: {describe(base)}."
            )
        self._groups = GroupRules(self.rule, self.base.defaults)
        super().__init__(self.base.param_groups, {**self.base.defaults, **self._groups.group_defaults()})
        # Share the base optimizer's group dicts and state: LR schedulers and anything else that
        # edits `param_groups` act on the optimizer that applies the update.
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        # In place: the rule's combinations are computed in the buffers of the gradients the closure
        # oracle returns (fresh tensors nothing else holds), never in parameters or user tensors.
        self._ops = TorchForeachOps(in_place=True)
        self._scratch: list[torch.Tensor] | None = None
        # the .grad tensors step() left (weak references: the last direction must not outlive the
        # next step's first pass, when .grad is cleared), with their versions
        self._left: list[tuple[Any, int]] | None = None
        self._batches: list[tuple[torch.Tensor, Callable[[], Any], bool]] = []  # register_batch, since the last step
        self._backward_count: BackwardCounter | None = None
        self.last_info: dict[str, Any] = {}
        # The rule state exists from construction (a compiled step finds it; checkpoints hold it).
        params = self._params()
        self.rule_state: Any = self._groups.for_step(self.param_groups, params).init(params)
        # gradients already in .grad now (a model trained before) are not accumulated micro-batches
        self._remember_grads(params)

    def use_grad_scaler(self, grad_scaler: Any) -> None:
        """Own this ``torch.amp.GradScaler`` from now on (None: none), as if given to the constructor:
        for integrations whose trainer made the scaler (`gradnorm.torch.lightning.GradnormMixedPrecision`)."""
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"`grad_scaler` must be None or a torch.amp.GradScaler. Received: {describe(grad_scaler)}.")
        if grad_scaler is not None and not self.skip_nonfinite:
            raise ValueError("`skip_nonfinite` must be True with a `grad_scaler`: an overflow step must not be applied.")
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self._scaler = ScalerHook(self.grad_scaler) if self.grad_scaler is not None else None

    # -- parameter groups -------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (to the base optimizer too: they share `param_groups`). It may carry its
        own values of the rule's per-group hyperparameters; the others must not differ."""
        groups = getattr(self, "_groups", None)
        if groups is not None:
            groups.check_group(param_group)
        super().add_param_group(param_group)

    def set_rule_hyperparameters(self, **values: Any) -> None:
        """Change rule hyperparameters between steps (what `gradnorm.torch.RuleScheduler` calls): a
        per-group one (``rho``, ``r``, ``alpha``, ``gamma``, ``lam``, ...) is written into every
        parameter group, as ``group["r"] = value`` would be; any other (``flooding``'s ``b``) replaces
        the optimizer's value. Validated first; nothing changes on an error."""
        self.rule = self._groups.set_hyperparameters(self.param_groups, values)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    # -- the step ---------------------------------------------------------------------------
    def step(self, closure: Callable[..., Any] | None = None, *, loss: torch.Tensor | None = None) -> Any:  # type: ignore[override]
        """One training step; returns the loss at the current weights (from the closure's first
        call, or ``loss`` when given)."""
        self._check_step_arguments(closure, loss)
        if closure is not None:  # accelerate would drop the closures of its non-sync micro-batches
            _accelerate_guard.refuse_closure_under_accumulation()
        params = self._params()
        if closure is None and loss is None:  # a trainer ran the first pass: .grad and registered batches
            loss, closure = self._registered_first_pass(params)
        elif loss is None:
            self._refuse_foreign_gradients(params)
        rule = self._groups.for_step(self.param_groups, params)
        if self.rule_state is None:
            self.rule_state = rule.init(params)
        ddp = self.perturbation if _is_distributed(self.model) else None
        oracle = ClosureOracle(
            params, closure, self._ops, scratch=lambda: self._snapshot_buffer(params), has_hvp=rule.needs_hvp,
            model=self.model, same_randomness=self.same_randomness, ddp=ddp,
            unscale=self._scaler.unscale if self._scaler is not None else None, first_pass_done=loss is not None,
        )
        grads = None
        if loss is not None:
            loss = oracle.global_loss(loss.detach())
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        try:
            with torch.no_grad():  # the closure's passes enable grad themselves
                # donate_grads: this list is the step's (a rule that donates the first gradient
                # releases it here too, so nothing keeps it alive through the next pass)
                direction, state, info = rule.update_leaves(
                    oracle.view, self.rule_state, oracle, loss=loss, grads=grads, ops=self._ops, norms=self.info_norms,
                    donate_grads=True,
                )
        finally:
            oracle.restore()
        del grads
        if ddp == "local":
            direction = _average_over_ranks(direction)
            info = {**info, "finite": self._ops.all_finite(direction) & torch.isfinite(info["loss"])}
        self.last_info = info
        if self._scaler is not None:
            self._scaler.update(info["finite"])
        # .grad holds the rule's direction, whether the base optimizer applies it or not (the first
        # gradient may be gone: a rule may have donated it, or computed the direction in its buffers)
        for p, d in zip(params, direction):
            p.grad = d
        if self.skip_nonfinite and not bool(info["finite"]):  # keep the weights and the state
            self._remember_grads(params)
            return info["loss"]
        self.rule_state = state
        if self.clip_grad_norm is not None:  # on the rule's direction, what the base optimizer applies
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)
        self.base.step()
        self._remember_grads(params)
        return info["loss"]

    # -- what is in .grad at step entry -----------------------------------------------------
    # Host bookkeeping, kept out of torch.compile: Dynamo traces `Tensor._version` as a graph value
    # and (torch 2.13) then drops the frame's attribute writes to a torch.optim.Optimizer, so a
    # compiled step's second call refused its own gradients as foreign (tests/test_torch_compile.py).
    @torch.compiler.disable
    def _remember_grads(self, params: list[torch.Tensor]) -> None:
        """Note the gradient tensors a step leaves in ``.grad`` (and their in-place versions), to
        tell them at the next step from gradients someone else accumulated there."""
        self._left = [(weakref.ref(p.grad), p.grad._version) if p.grad is not None else (None, 0) for p in params]
        self._forget_batches()

    def _forget_batches(self) -> None:
        self._batches = []  # a new list: a step running the registered closures keeps its own
        if self._backward_count is not None:
            self._backward_count.reset()

    @torch.compiler.disable
    def _refuse_foreign_gradients(self, params: list[torch.Tensor]) -> None:
        """`step(closure)` evaluates the first pass itself. Gradients already in ``.grad`` that this
        optimizer did not leave there (accumulated micro-batches) would be thrown away: refuse."""
        left = self._left
        for i, p in enumerate(params):
            g = p.grad
            if g is None:
                continue
            if left is not None and i < len(left) and left[i][0] is not None and left[i][0]() is g and left[i][1] == g._version:
                continue
            raise GradnormError(
                "The parameters hold gradients that gradnorm.torch.Optimizer did not leave there (accumulated over "
                "micro-batches: Lightning's `accumulate_grad_batches`, accelerate's `gradient_accumulation_steps`, "
                "or a `backward()` before `step(closure)`). step(closure) runs the first pass itself and would throw "
                "them away, and the rule's extra passes need every micro-batch at the perturbed weights. Accumulate "
                "inside the closure instead: `opt.step(gradnorm.torch.accumulating_closure(opt, loss_fn, "
                "micro_batches))` (equal to the rule on the whole batch), or, where a trainer runs the backward "
                "itself, call `opt.register_batch(loss, closure)` after each micro-batch's backward and `opt.step()` "
                "without a closure; or call `opt.zero_grad()` first if these gradients are not wanted. If they are "
                "the first pass of this step, pass its loss: `opt.step(closure, loss=loss)`."
            )

    def register_batch(self, loss: torch.Tensor, closure: Callable[[], Any], *, replays_randomness: bool = False) -> None:
        """For trainers that run forward and backward themselves and then call ``step()`` without a
        closure (the transformers ``Trainer``, Lightning's ``GradScaler`` path, accelerate): call this
        after each (micro-)batch's backward, with the loss it back-propagated and a ``closure()`` that
        repeats that forward and backward (without zeroing the gradients) at whatever weights the
        parameters hold and returns the loss.

        ``step()`` then takes the first pass from ``.grad`` (the sum over the registered micro-batches)
        and evaluates the rule's extra passes by running every registered closure, so the step equals
        the rule on the whole accumulated batch. The registrations are used by one step and then
        dropped. It is an error, raised by ``step()`` before anything changes, when the number of
        backward passes that reached the parameters since the last step differs from the number of
        registered batches (a missing or stale registration).

        With ``same_randomness=True`` the optimizer cannot replay the random state of a first pass it
        did not run: the closure must restore it itself (the state before the micro-batch's forward,
        `gradnorm.torch` integrations do) and say so with ``replays_randomness=True``; otherwise
        ``step()`` refuses.
        """
        if not callable(closure):
            raise ClosureError(f"`closure` of register_batch must be a callable that repeats the batch's forward and backward. Received: {describe(closure)}.")
        check_closure_loss(loss, "loss")
        if self._backward_count is None:
            # counting starts with the first registration: the backward just run is the first one
            self._backward_count = BackwardCounter(self._params(), already=1)
        self._batches.append((loss.detach(), closure, bool(replays_randomness)))

    def _registered_first_pass(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, Callable[[], Any]]:
        """The first pass from ``.grad`` and the registered batches: `(loss, closure)`."""
        batches, counter = self._batches, self._backward_count
        if not batches:
            raise ClosureError(
                "`step()` was called without a closure and no batch was registered. Either pass `closure` (a function "
                "that zeroes the gradients, computes the loss on the current minibatch, calls `loss.backward()` and "
                "returns the loss), or, after each (micro-)batch's backward, call `opt.register_batch(loss, closure)`."
            )
        seen = counter.count if counter is not None else len(batches)
        if seen != len(batches):
            raise ClosureError(
                f"{seen} backward pass(es) reached the parameters since the last step, but {len(batches)} batch(es) were "
                f"registered with `register_batch`: register each (micro-)batch right after its backward, once."
            )
        if all(p.grad is None for p in params):
            raise ClosureError("Batches were registered but the parameters hold no gradients: run the backward first.")
        if self.same_randomness and not all(replays for _, _, replays in batches):
            raise ClosureError(
                "same_randomness=True, but a registered closure does not replay the random state of its micro-batch's "
                "first pass (which ran outside the optimizer): restore it in the closure and register with "
                "`replays_randomness=True`."
            )
        total = batches[0][0]
        for loss, _, _ in batches[1:]:
            total = total + loss
        closures = [c for _, c, _ in batches]

        def closure() -> torch.Tensor:
            self.zero_grad()
            out = None
            with counter.paused() if counter is not None else contextlib.nullcontext():
                for c in closures:
                    value = c()
                    value = value.detach() if isinstance(value, torch.Tensor) else value
                    out = value if out is None else out + value
            return out

        for p in params:  # the accumulated first pass stays where step(loss=...) reads it
            if p.grad is not None:
                p.grad = p.grad.detach()
        return total, closure

    def _check_step_arguments(self, closure: Any, loss: Any) -> None:
        """Errors naming the argument, before anything runs."""
        if closure is not None and not callable(closure):
            raise ClosureError(
                f"`closure` must be None or a callable that computes the loss and its gradients (torch.optim.LBFGS "
                f"convention). Received: {describe(closure)}."
            )
        if loss is not None:
            check_closure_loss(loss, "loss")
            if self.same_randomness:
                raise ClosureError(
                    "same_randomness=True needs the first pass inside step (the random state before it must be "
                    "replayed in the extra passes): call `step(closure)` without `loss=`."
                )
        if self.rule.needs_hvp:
            if loss is not None:
                raise ClosureError(f"Rule '{self.rule.name}' needs the first pass with `create_graph`: call `step(closure)` without `loss`.")
            if closure is None or not accepts_create_graph(closure):
                raise ClosureError(
                    f"Rule '{self.rule.name}' differentiates the gradient: `closure` must accept `create_graph` and pass it "
                    f"to backward, e.g. `def closure(create_graph=False): opt.zero_grad(); loss = loss_fn(); "
                    f"loss.backward(create_graph=create_graph); return loss`. A trainer that runs the backward and calls "
                    f"`step()` itself cannot do this: use rule='fd_gr', the same update by a finite difference. "
                    f"Received: {describe(closure)}."
                )

    def _snapshot_buffer(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The buffer the weights are copied into before a rule first moves them (kept between
        steps, never in the state dict): the one parameter-sized buffer of the floor."""
        buf = self._scratch
        if buf is None or len(buf) != len(params) or any(
            b.shape != p.shape or b.dtype != p.dtype or b.device != p.device for b, p in zip(buf, params)
        ):
            buf = self._scratch = [torch.empty_like(p, requires_grad=False) for p in params]
        return buf

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; it also drops the batches registered with
        `register_batch` (their gradients are gone)."""
        self.base.zero_grad(set_to_none=set_to_none)
        self._forget_batches()
        if not set_to_none:  # zeros this optimizer wrote are not foreign gradients
            self._remember_grads(self._params())

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        out = self.base.state_dict()
        out[_checkpoint.KEY] = _checkpoint.rule_entry(self.rule, self.rule_state)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a checkpoint of this optimizer: everything is validated first (the rule entry
        against this optimizer's rule, the base optimizer's groups by the base optimizer), and
        nothing changes when it fails."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"`state_dict` must be a dict from `Optimizer.state_dict()`. Received: {describe(state_dict)}.")
        if _checkpoint.KEY not in state_dict:
            raise ValueError(
                f"`state_dict` has no '{_checkpoint.KEY}' entry: it was not saved by gradnorm.torch.Optimizer. To load "
                f"the state of a plain torch optimizer into the base optimizer, use `optimizer.base.load_state_dict(...)`."
            )
        base_dict = {k: v for k, v in state_dict.items() if k != _checkpoint.KEY}
        rule_state = _checkpoint.checked_rule_state(state_dict[_checkpoint.KEY], self.rule, self._params())
        self.base.load_state_dict(base_dict)  # checks its groups before it changes anything
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.rule_state = rule_state

    def __repr__(self) -> str:
        return f"gradnorm.torch.Optimizer({self.rule!r}, base={self.base!r})"


def _is_distributed(model: torch.nn.Module | None) -> bool:
    return (
        isinstance(model, torch.nn.parallel.DistributedDataParallel)
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


def _average_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean over ranks, with one all-reduce for the whole list (per dtype)."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    world = torch.distributed.get_world_size()
    out: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        flat = _flatten_dense_tensors([tensors[i] for i in idx])
        torch.distributed.all_reduce(flat)
        flat /= world
        for i, t in zip(idx, _unflatten_dense_tensors(flat, [tensors[i] for i in idx])):
            out[i] = t
    return out  # type: ignore[return-value]
