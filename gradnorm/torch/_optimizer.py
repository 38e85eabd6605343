"""``gradnorm.torch.Optimizer``: any gradnorm rule around any ``torch.optim`` optimizer."""

from __future__ import annotations

import contextlib
import inspect
import operator
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import rules as _rules
from .._errors import GradnormError, HyperparameterError, describe
from .._tree import PerLeaf
from ._ops import TorchForeachOps

__all__ = ["Optimizer", "ClosureError"]


class ClosureError(GradnormError, TypeError):
    """``step`` was called without a usable closure."""


def _accepts_create_graph(closure: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(closure).parameters
    except (TypeError, ValueError):  # builtins, C callables
        return False
    return "create_graph" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class _ClosureOracle:
    """The gradnorm oracle of one optimizer step: evaluates the user's closure at any point by
    writing the point into the parameters (the weights are restored by the optimizer)."""

    def __init__(self, params: list[torch.Tensor], closure: Callable[..., Any] | None, needs_hvp: bool,
                 model: torch.nn.Module | None = None, same_randomness: bool = False, ddp: str | None = None,
                 grad_scaler: Any = None, backup: list[torch.Tensor] | None = None, ops: Any = None):
        self.ddp = ddp  # None, "local" or "global"
        self.backup = backup  # an exact copy of the weights, which the rule sees as `params`
        self.ops = ops
        self.at: list[torch.Tensor] | None = backup  # a list whose values the weights hold now
        self.grad_scaler = grad_scaler
        self.params = params
        self.closure = closure
        self.has_hvp = needs_hvp
        self.model = model
        self.same_randomness = same_randomness
        self.rng_before_first: Any = None
        self.buffers_after_first: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.moved = False  # whether the weights left their values (then they must be restored)
        self._graph: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # (point, grads with graph)

    def _run(self, create_graph: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.closure is None:
            raise ClosureError(
                "This rule evaluates the loss at perturbed weights: pass `closure` to `step` (a function that "
                "zeroes the gradients, computes the loss on the current minibatch, calls `loss.backward()` and "
                "returns the loss)."
            )
        for p in self.params:
            p.grad = None
        with torch.enable_grad(), warnings.catch_warnings() if create_graph else contextlib.nullcontext():
            if create_graph:
                # backward(create_graph=True) warns about a parameter <-> .grad reference cycle;
                # the gradients are detached from the parameters right below, which breaks it.
                warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            sync = self.model.no_sync() if self.ddp == "local" else contextlib.nullcontext()
            with sync:  # forward and backward both inside no_sync: DDP decides in forward
                loss = self.closure(create_graph=True) if create_graph else self.closure()
        if not isinstance(loss, torch.Tensor):
            raise ClosureError(f"`closure` must return the loss as a tensor. Received: {describe(loss)}.")
        if self.ddp == "global":
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss = loss / torch.distributed.get_world_size()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        if self.grad_scaler is not None and self.grad_scaler._scale is not None:
            # as GradScaler.unscale_: multiply by the float32 reciprocal of the scale, on device
            inv_scale = self.grad_scaler._scale.double().reciprocal().float()
            grads = list(torch._foreach_mul(grads, inv_scale))
        return loss.detach(), grads

    def _holds(self, point: list[torch.Tensor]) -> bool:
        """Whether the weights hold the values of `point` now (they are `point`, or were last
        set from it)."""
        return _same_list(point, self.params) or (self.at is not None and _same_list(point, self.at))

    def _move_to(self, point: list[torch.Tensor]) -> None:
        if not self._holds(point):
            with torch.no_grad():
                torch._foreach_copy_(self.params, point)
            self.moved = True
            self.at = point

    def first(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Loss and gradient at the current weights (kept with their graph for ``gr``)."""
        if self.same_randomness:
            self.rng_before_first = _rng_state()
        if not self.has_hvp:
            return self._run()
        loss, grads = self._run(create_graph=True)
        detached = [g.detach() for g in grads]
        self._graph = (detached, grads)
        return loss, detached

    def value_and_grad(self, point: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._move_to(point)
        return self._extra_pass()

    def value_and_grad_along(self, base: list[torch.Tensor], step: Any, v: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """At `base + step * v`, formed in the weights in place (no parameter-sized temporary)."""
        self._move_to(base)
        self.moved = True  # before writing: a failure half way must still restore
        self.at = None
        with torch.no_grad():
            self.ops.axpy_(step, v, self.params)
        return self._extra_pass()

    def _extra_pass(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.model is not None and self.buffers_after_first is None:
            # the state after the pass at the unperturbed weights, to be put back after the step
            self.buffers_after_first = [(b, b.detach().clone()) for b in self.model.buffers()]
        if self.rng_before_first is not None:
            _set_rng_state(self.rng_before_first)
        return self._run()

    def restore_buffers(self) -> None:
        if self.buffers_after_first:
            with torch.no_grad():
                for buffer, saved in self.buffers_after_first:
                    buffer.copy_(saved)

    def hvp(self, point: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._graph is None or any(a is not b for a, b in zip(point, self.params)):
            raise ClosureError("gradnorm.torch.Optimizer computes Hessian-vector products at the current weights only.")
        _, grads = self._graph
        with_graph = [(i, g) for i, g in enumerate(grads) if g.requires_grad]
        out = [torch.zeros_like(p) for p in self.params]
        if with_graph:
            idx, gs = zip(*with_graph)
            hv = torch.autograd.grad(gs, self.params, grad_outputs=[v[i] for i in idx], allow_unused=True)
            out = [h if h is not None else torch.zeros_like(p) for h, p in zip(hv, self.params)]
        self._graph = None
        return out


def _same_list(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


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
        **kwargs: Any,
    ):
        rule_cls = _rule_class(rule)
        names = {h.name for h in rule_cls.spec()} if rule_cls is not None else set()
        rule_kwargs = {k: v for k, v in kwargs.items() if k in names}
        base_kwargs = {k: v for k, v in kwargs.items() if k not in names}
        self.rule = _rules.get(rule, **rule_kwargs)
        for name, value in (("skip_nonfinite", skip_nonfinite), ("same_randomness", same_randomness),
                            ("info_norms", info_norms)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False. Received: {describe(value)}.")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be None or a torch.nn.Module. Received: {describe(model)}.")
        if perturbation not in ("local", "global"):
            raise ValueError(f"`perturbation` must be 'local' or 'global'. Received: {describe(perturbation)}.")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"`grad_scaler` must be None or a torch.amp.GradScaler. Received: {describe(grad_scaler)}.")
        if grad_scaler is not None and not skip_nonfinite:
            raise ValueError("`skip_nonfinite` must be True with a `grad_scaler`: an overflow step must not be applied.")
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.skip_nonfinite = skip_nonfinite
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
            _check_base_kwargs(base, base_kwargs, self.rule, names)
            self.base = base(params, **base_kwargs)
        else:
            raise TypeError(
                f"`base` must be a torch.optim.Optimizer class (such as torch.optim.SGD) or instance. Received: {describe(base)}."
            )
        spec = type(self.rule).spec()
        # A name the base optimizer uses too (GNP's `alpha` and RMSprop's) belongs to the base in
        # the groups; the rule's value is then the one given here, for every group.
        self._leafwise = tuple(h.name for h in spec if h.leafwise and h.name not in self.base.defaults)
        self._checks = {h.name: h.check for h in spec if h.name not in self.base.defaults}
        for name, value in self.rule.config.items():
            if isinstance(value, PerLeaf):
                raise HyperparameterError(
                    f"`{name}` of gradnorm.torch.Optimizer must be one value; give per-parameter values through "
                    f"parameter groups (`{{'params': ..., '{name}': ...}}`). Received: {value!r}."
                )
        self._group_rule: tuple[Any, _rules.Rule] | None = None
        # Every group carries the rule's per-group hyperparameters, as it carries `lr`.
        defaults = {**self.base.defaults, **{name: self.rule.config[name] for name in self._leafwise}}
        super().__init__(self.base.param_groups, defaults)
        # Share the base optimizer's group dicts and state: LR schedulers and anything else that
        # edits `param_groups` act on the optimizer that applies the update.
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.rule_state: Any = None
        self._rule_for_step(self._params())  # validates the groups' values now
        self.last_info: dict[str, Any] = {}
        self._ops = TorchForeachOps()

    # -- parameter groups -------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (to the base optimizer too: they share `param_groups`). It may carry its
        own values of the rule's per-group hyperparameters; the others must not differ."""
        for name in param_group:
            if name in self._checks and name not in self._leafwise and not _same(param_group[name], self.rule.config[name]):
                raise HyperparameterError(
                    f"`{name}` of rule '{self.rule.name}' cannot differ between parameter groups: a group has "
                    f"{param_group[name]!r}, the optimizer {self.rule.config[name]!r}. Per-group values are accepted for: "
                    f"{', '.join(self._leafwise) or 'none of its hyperparameters'}."
                )
        super().add_param_group(param_group)

    def _rule_for_step(self, params: list[torch.Tensor]) -> _rules.Rule:
        """The rule with the groups' current per-group values (a scheduler may have changed them):
        one value where all groups agree, else a `PerLeaf` over `params`. Cached while unchanged."""
        if not self._leafwise:
            return self.rule
        key = [(len(params),)] + [tuple(group[n] for n in self._leafwise) for group in self.param_groups]
        cached = self._group_rule
        if cached is not None and len(cached[0]) == len(key) and all(
            all(_same(a, b) for a, b in zip(old, new)) for old, new in zip(cached[0], key)
        ):
            return cached[1]
        changes: dict[str, Any] = {}
        for name in self._leafwise:
            per_group = []
            for i, group in enumerate(self.param_groups):
                try:
                    value = self._checks[name](self.rule.name, name, group[name])
                except HyperparameterError as err:
                    raise HyperparameterError(f"In param_groups[{i}]: {err}") from None
                per_group.append((value, sum(1 for p in group["params"] if p.requires_grad)))
            if all(_same(v, per_group[0][0]) for v, _ in per_group):
                changes[name] = per_group[0][0]
            else:
                changes[name] = PerLeaf([v for v, count in per_group for _ in range(count)])
        rule = self.rule.replace(**changes)
        self._group_rule = (key, rule)
        return rule

    # -- the step ---------------------------------------------------------------------------
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def step(self, closure: Callable[..., Any] | None = None, *, loss: torch.Tensor | None = None) -> Any:  # type: ignore[override]
        """One training step; returns the loss at the current weights (from the closure's first
        call, or ``loss`` when given)."""
        params = self._params()
        if self.rule.needs_hvp:
            if loss is not None:
                raise ClosureError(f"Rule '{self.rule.name}' needs the first pass with `create_graph`: call `step(closure)` without `loss`.")
            if closure is None or not _accepts_create_graph(closure):
                raise ClosureError(
                    f"Rule '{self.rule.name}' differentiates the gradient: `closure` must accept `create_graph` and pass it "
                    f"to backward, e.g. `def closure(create_graph=False): opt.zero_grad(); loss = loss_fn(); "
                    f"loss.backward(create_graph=create_graph); return loss`. Received: {describe(closure)}."
                )
        elif closure is None and loss is None:
            raise ClosureError(
                "`step` needs `closure` (it computes the loss and gradients itself, as torch.optim.LBFGS does), or "
                "`loss=` with the gradients already in `.grad`."
            )
        rule = self._rule_for_step(params)
        if self.rule_state is None:
            self.rule_state = rule.init(params)
        ddp = self.perturbation if _is_distributed(self.model) else None
        # Rules evaluate the closure at points computed from the weights, and the oracle writes
        # those points into the live parameters: the rule must see a snapshot, which is also the
        # exact copy the weights are restored from (the one parameter-sized buffer of the floor).
        backup = self._snapshot(params) if rule.grad_evals > 1 else None
        point = backup if backup is not None else params
        oracle = _ClosureOracle(params, closure, rule.needs_hvp, self.model, self.same_randomness, ddp,
                                self.grad_scaler, backup, self._ops)
        try:
            if loss is None:
                first_loss, grads = oracle.first()
            else:
                first_loss = loss.detach()
                grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
            with torch.no_grad():  # the closure's passes enable grad themselves
                direction, state, info = rule.update(
                    point, self.rule_state, oracle, loss=first_loss, grads=grads, ops=self._ops, check=False,
                    norms=self.info_norms,
                )
        finally:
            if oracle.moved:
                with torch.no_grad():
                    torch._foreach_copy_(params, backup)
            oracle.restore_buffers()
        if ddp == "local":
            direction = _average_over_ranks(direction)
            info = {**info, "finite": self._ops.all_finite(direction) & torch.isfinite(first_loss)}
        self.last_info = info
        if self.grad_scaler is not None:
            scaler = self.grad_scaler
            found_inf = (~info["finite"]).to(torch.float32)
            torch._amp_update_scale_(
                scaler._scale, scaler._growth_tracker, found_inf,
                scaler._growth_factor, scaler._backoff_factor, scaler._growth_interval,
            )
        if self.skip_nonfinite and not bool(info["finite"]):
            for p, g in zip(params, grads):
                p.grad = g
            return first_loss
        self.rule_state = state
        for p, d in zip(params, direction):
            p.grad = d
        self.base.step()
        return first_loss

    def _snapshot(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """A copy of the weights in a buffer kept between steps (never in the state dict)."""
        buf = getattr(self, "_scratch", None)
        if buf is None or len(buf) != len(params) or any(
            b.shape != p.shape or b.dtype != p.dtype or b.device != p.device for b, p in zip(buf, params)
        ):
            buf = [torch.empty_like(p) for p in params]
            self._scratch = buf
        with torch.no_grad():
            torch._foreach_copy_(buf, params)
        return buf

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        out = self.base.state_dict()
        rule_state = None if self.rule_state is None else {k: v for k, v in self.rule_state._asdict().items()}
        out["gradnorm"] = {"rule": self.rule.name, "hyperparameters": _plain(self.rule.config), "state": rule_state}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        extra = state_dict.pop("gradnorm", None)
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        if extra is None:
            return
        if extra.get("rule") != self.rule.name:
            raise ValueError(
                f"`state_dict` was saved with rule '{extra.get('rule')}'; this optimizer runs rule '{self.rule.name}'."
            )
        saved = extra.get("state")
        if saved is None:
            self.rule_state = None
        else:
            device = self._params()[0].device
            self.rule_state = self.rule.state_type(
                **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
            )

    def __repr__(self) -> str:
        return f"gradnorm.torch.Optimizer({self.rule!r}, base={self.base!r})"


def _same(a: Any, b: Any) -> bool:
    """Equal hyperparameter values, without reading a tensor (identity for tensors)."""
    return a is b or (isinstance(a, (int, float, str, bool)) and isinstance(b, (int, float, str, bool)) and a == b)


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


def _rule_class(rule: Any) -> type[_rules.Rule] | None:
    if isinstance(rule, _rules.Rule):
        return None
    if isinstance(rule, type) and issubclass(rule, _rules.Rule):
        return rule
    if isinstance(rule, str) and rule in _rules.REGISTRY:
        return _rules.REGISTRY[rule]
    _rules.get(rule)  # raises the unknown-rule error with suggestions
    return None  # pragma: no cover


def _check_base_kwargs(base: type, kwargs: dict[str, Any], rule: _rules.Rule, names: set[str]) -> None:
    try:
        params = inspect.signature(base.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        accepted = sorted(k for k in params if k not in ("self", "params"))
        raise HyperparameterError(
            f"Unknown keyword arguments {unknown}: they are neither hyperparameters of rule '{rule.name}' "
            f"({', '.join(sorted(names))}) nor arguments of {base.__module__}.{base.__qualname__} ({', '.join(accepted)})."
        )


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in config.items()}
