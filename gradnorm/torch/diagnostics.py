r"""Flatness diagnostics of a PyTorch model: the Hessian's top eigenvalues, trace and spectral
density, the gradient norm, SAM's sharpness and GAM's first-order flatness, on one batch or
averaged over a DataLoader; and `Monitor`, which logs them during training from any optimizer.

The algorithms are the core's (`gradnorm.diagnostics`: Lanczos with full reorthogonalization,
Hutchinson and Hutch++, stochastic Lanczos quadrature); this module supplies the loss of a
``torch.nn.Module`` and its exact Hessian-vector products::

    import gradnorm.torch.diagnostics as gtd

    res = gtd.hessian_eigenvalues(model, torch.nn.functional.cross_entropy, (x, y), k=3)
    res.eigenvalues                    # tensor([...]) on the parameters' device

How the model is evaluated: every pass calls ``torch.func.functional_call`` with the parameters
replaced by the point being measured (detached tensors, never the live ``nn.Parameter``s), so the
model's weights are never written and nothing has to be restored, even when a pass raises. HVPs
are double backward (``torch.autograd.grad(..., create_graph=True)``, as hessian-eigenthings and
PyHessian compute them), so any model that trains with autograd works (in-place ops, hooks,
modules torch.func cannot transform). ``.grad`` is never touched.

Around every pass the model is put in eval mode (BatchNorm uses its running statistics and does
not update them, dropout is off) and each module's own mode is restored afterwards; the global
random state is saved and restored (a shuffling DataLoader or an eval-time random op leaves no
trace) and seeded identically for every pass, so all passes see the same batches in the same order
and, with ``train_mode=True``, the same dropout masks (the loss is then one fixed function, whose
Hessian is well defined). With ``train_mode=True`` BatchNorm normalizes with batch statistics and
updates copies of its buffers, never the module's.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from .. import _tree
from .._errors import describe
from .._oracle import LeafOracle
from ..diagnostics import (
    QUANTITIES,
    DensityResult,
    Diagnostics,
    EigenResult,
    FlatnessResult,
    NumpyProbes,
    TraceResult,
)
from ..diagnostics._probes import check_seed
from ._closure import check_closure_loss
from ._ops import TorchForeachOps

__all__ = [
    "LOSS_FORMS",
    "QUANTITIES",
    "DensityResult",
    "Diagnostics",
    "EigenResult",
    "FlatnessResult",
    "ModelOracle",
    "Monitor",
    "NumpyProbes",
    "TorchProbes",
    "TraceResult",
    "diagnostics",
    "first_order_flatness",
    "gradient_norm",
    "hessian_eigenvalues",
    "hessian_trace",
    "measure",
    "sam_sharpness",
    "spectral_density",
]

#: How `loss_fn` is called. "criterion": ``loss_fn(model(inputs), targets)`` on batches
#: ``(inputs, targets)`` (PyHessian's ``criterion``). "model": ``loss_fn(model, batch)`` on batches
#: of any form (hessian-eigenthings' ``loss_fn``).
LOSS_FORMS = ("criterion", "model")
PROBES = ("torch", "numpy")


# ------------------------------------------------------------------------------------------
# probes


class TorchProbes:
    """Probe vectors from a ``torch.Generator`` on each leaf's device, seeded with `seed`: on CUDA
    they are drawn on the GPU (no host-to-device copies, nothing read back). The default probes of
    this module.

    The streams of different device types differ (CPU and CUDA generators are different
    algorithms), so a diagnostic on CPU and on CUDA draws different probes; use `NumpyProbes` (the
    core's default, the same numbers on every device and framework) to compare across them.

    Args:
        seed: a non-negative int.
        device: the device to create a generator for now (others are created when first needed).
    """

    def __init__(self, seed: int = 0, device: Any = None):
        self.seed = check_seed(seed)
        self._generators: dict[torch.device, torch.Generator] = {}
        if device is not None:
            self._generator(torch.device(device))

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def rademacher(self, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Entries ±1 with equal probability, in each leaf's dtype and on its device."""
        out = []
        for leaf in like:
            bits = torch.randint(0, 2, tuple(leaf.shape), generator=self._generator(leaf.device), device=leaf.device,
                                 dtype=leaf.dtype)
            out.append(bits.mul_(2).sub_(1))
        return out

    def normal(self, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Standard normal entries, in each leaf's dtype and on its device."""
        return [torch.randn(tuple(leaf.shape), generator=self._generator(leaf.device), device=leaf.device,
                            dtype=leaf.dtype) for leaf in like]


def _probes(probes: Any, seed: int, device: torch.device) -> Any:
    check_seed(seed)
    if probes is None or probes == "torch":
        return TorchProbes(seed, device)
    if isinstance(probes, str):
        if probes == "numpy":
            return NumpyProbes(seed)
        raise ValueError(f"`probes` must be 'torch', 'numpy' or an object with `rademacher` and `normal` methods. "
                         f"Received: {describe(probes)}.")
    if not (callable(getattr(probes, "rademacher", None)) and callable(getattr(probes, "normal", None))):
        raise TypeError(f"`probes` must be 'torch', 'numpy' or an object with `rademacher(like)` and `normal(like)` "
                        f"methods. Received: {describe(probes)}.")
    return probes


# ------------------------------------------------------------------------------------------
# data


def _is_batch_list(data: Any) -> bool:
    """Whether a list is a list of batches (rather than one DataLoader-collated batch [x, y])."""
    return len(data) > 0 and all(isinstance(b, (tuple, list, dict)) for b in data)


def _check_data(data: Any) -> bool:
    """Whether `data` is one batch (True) or a re-iterable source of batches (False)."""
    if isinstance(data, (torch.Tensor, tuple, dict)):
        return True
    if isinstance(data, list):
        if not data:
            raise ValueError("`data` must be a batch or a non-empty iterable of batches. Received: an empty list.")
        return not _is_batch_list(data)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            "`data` must be one batch (a tuple `(inputs, targets)`, or with loss_form='model' whatever `loss_fn` "
            "takes) or an iterable of batches such as a DataLoader (wrap a Dataset in one). "
            f"Received: {describe(data)}."
        )
    if isinstance(data, Iterator):  # (not `iter(data) is data`: iter(DataLoader) draws from the global RNG)
        raise TypeError(
            "`data` must be re-iterable (a DataLoader, a list of batches): every Hessian-vector product is a pass "
            f"over all of it. Received a one-shot iterator {describe(data)}; pass `list(data)` instead."
        )
    return False


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, dict):
        return type(batch)((k, _to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        moved = [_to_device(v, device) for v in batch]
        if hasattr(batch, "_fields"):  # namedtuple
            return type(batch)(*moved)
        return type(batch)(moved)
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _batch_size(batch: Any, criterion: bool) -> int:
    """The weight of a batch in the average over `data`: the length of the first dimension of the
    targets (criterion form) or of the first tensor in the batch; 1 when there is none."""
    pair = criterion and isinstance(batch, (tuple, list)) and len(batch) == 2
    t = _first_tensor(batch[1]) if pair else None
    if t is None:
        t = _first_tensor(batch)
    return int(t.shape[0]) if t is not None else 1


class _Call(torch.nn.Module):
    """``fn(model, batch)`` as a module with `model` registered under "model", so that
    ``functional_call(self, {"model.<name>": tensor}, (batch,))`` runs `fn` with the model's
    parameters replaced, whatever `fn` does with the model."""

    def __init__(self, model: torch.nn.Module, fn: Callable[[torch.nn.Module, Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.__dict__["fn"] = fn  # not a submodule even if it is an nn.Module (a loss module)

    def forward(self, batch: Any) -> torch.Tensor:
        return self.fn(self.model, batch)


def _criterion_call(criterion: Callable[..., torch.Tensor]) -> Callable[[torch.nn.Module, Any], torch.Tensor]:
    def fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                "With loss_form='criterion' every batch must be a pair `(inputs, targets)`, and the loss is "
                f"`loss_fn(model(inputs), targets)`. Received a batch {describe(batch)}. For other batches pass "
                "loss_form='model' and `loss_fn(model, batch) -> loss`."
            )
        inputs, targets = batch
        if isinstance(inputs, dict):
            out = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = model(*inputs)
        else:
            out = model(inputs)
        return criterion(out, targets)

    return fn


# ------------------------------------------------------------------------------------------
# the oracle


def _select(model: Any, params: Any) -> tuple[list[str], list[torch.nn.Parameter]]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module. Received: {describe(model)}.")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    else:
        if isinstance(params, (str, torch.Tensor)) or not isinstance(params, Iterable):
            raise TypeError(f"`params` must be None or an iterable of the model's parameters or of their names. "
                            f"Received: {describe(params)}.")
        by_id = {id(p): (n, p) for n, p in model.named_parameters()}
        by_name = dict(model.named_parameters())
        wanted, seen = [], set()
        for item in params:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"`params`: the model has no parameter named {item!r}.")
                entry = (item, by_name[item])
            elif isinstance(item, torch.Tensor) and id(item) in by_id:
                entry = by_id[id(item)]
            else:
                raise ValueError(
                    f"`params` must hold parameters of `model` (or their names). Received: {describe(item)}."
                )
            if id(entry[1]) not in seen:
                seen.add(id(entry[1]))
                wanted.append(entry)
        chosen = [e for e in named if id(e[1]) in seen]  # in the model's order
        if len(chosen) < len(wanted):
            frozen = [n for n, p in wanted if not p.requires_grad]
            raise ValueError(f"`params`: parameters {frozen} do not require grad.")
    if not chosen:
        raise ValueError("`model` has no parameters that require grad (or `params` selected none).")
    for n, p in chosen:
        if not p.dtype.is_floating_point:
            raise TypeError(f"Parameter {n!r} must have a real floating-point dtype. Received: {describe(p)}.")
    return [n for n, _ in chosen], [p for _, p in chosen]


def _devices(tensors: Sequence[torch.Tensor]) -> list[int]:
    return sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                   for t in tensors if t.device.type == "cuda"})


class ModelOracle(LeafOracle):
    """A `gradnorm.LeafOracle` for the loss of a ``torch.nn.Module`` on one batch or averaged over
    batches: the loss, gradient and exact (double backward) HVP at any list of parameter values,
    by ``torch.func.functional_call``. The diagnostics of this module are built on it; it can be
    given to `gradnorm.diagnostics.Diagnostics` (or to a rule) directly.

    Args:
        model: the module.
        loss_fn: ``loss_fn(outputs, targets)`` or ``loss_fn(model, batch)`` (see `loss_form`).
        data: one batch, or a re-iterable source of batches (DataLoader, list of batches): the loss
            is then the average of the batches' losses weighted by their sizes (the first dimension
            of the targets, or of the first tensor of the batch), i.e. the loss on the whole data
            set when `loss_fn` averages over its batch.
        names: the names (in ``model.named_parameters()``) of the parameters the leaves stand for;
            the model's other parameters are held at their current values.
        loss_form: "criterion" or "model" (`LOSS_FORMS`).
        train_mode: evaluate in training mode (batch statistics, dropout with masks fixed by
            `seed`) instead of eval mode.
        seed: the random seed every pass starts from.
        base: the point most HVPs are taken at (the leaf list itself, compared by identity): on
            one batch, the graph of the gradient there is kept and differentiated again for every
            HVP (one backward of the backward each instead of a forward and two backwards).
        snapshot: copy the values of the other parameters and of the buffers now, so that later
            training does not change the loss this oracle evaluates (default: use the live ones).
    """

    has_hvp = True

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, names: list[str], *,
                 loss_form: str = "criterion", train_mode: bool = False, seed: int = 0,
                 base: list[torch.Tensor] | None = None, snapshot: bool = False):
        super().__init__(TorchForeachOps())
        if not callable(loss_fn):
            raise TypeError(
                "`loss_fn` must be callable: a criterion `loss_fn(outputs, targets) -> loss` (loss_form='criterion') "
                f"or `loss_fn(model, batch) -> loss` (loss_form='model'). Received: {describe(loss_fn)}."
            )
        if not isinstance(loss_form, str) or loss_form not in LOSS_FORMS:
            raise ValueError(f"`loss_form` must be one of {LOSS_FORMS}. Received: {describe(loss_form)}.")
        if not isinstance(train_mode, bool):
            raise TypeError(f"`train_mode` must be True or False. Received: {describe(train_mode)}.")
        self.single = _check_data(data)
        self.data = data
        self.model = model
        self.criterion = loss_form == "criterion"
        self._call = _Call(model, _criterion_call(loss_fn) if self.criterion else loss_fn)
        self.names = [f"model.{n}" for n in names]
        chosen = set(names)
        with torch.no_grad():
            keep = (lambda t: t.detach().clone()) if snapshot else (lambda t: t.detach())
            self._frozen = [(f"model.{n}", keep(p)) for n, p in model.named_parameters() if n not in chosen]
            self._buffers = [(f"model.{n}", keep(b)) for n, b in model.named_buffers()] if snapshot else None
        self.train_mode = train_mode
        self.seed = check_seed(seed)
        self._base = base if base is not None else []
        self._graph: tuple[list[torch.Tensor], list[torch.Tensor], list[Any]] | None = None

    # -- one pass over the data ------------------------------------------------------------
    @contextlib.contextmanager
    def _session(self, leaves: list[torch.Tensor]) -> Any:
        """Eval (or train) mode and a forked, seeded random state for one pass; restores both."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Hessian diagnostics need autograd: call them outside `torch.inference_mode()`.")
        modes = [(m, m.training) for m in self.model.modules()]
        devices = _devices(leaves)
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            self.model.train(self.train_mode)
            try:
                self._seed(devices)
                yield
            finally:
                for m, mode in modes:
                    m.training = mode

    def _seed(self, devices: list[int]) -> None:
        torch.default_generator.manual_seed(self.seed)
        for index in devices:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(self.seed)

    def _batches(self, leaves: list[torch.Tensor]) -> Iterable[tuple[Any, int]]:
        """(batch on the parameters' device, weight) for each batch of the data."""
        device = leaves[0].device
        if self.single:
            yield _to_device(self.data, device), 1
            return
        any_batch = False
        for batch in self.data:
            any_batch = True
            yield _to_device(batch, device), _batch_size(batch, self.criterion)
        if not any_batch:
            raise ValueError("`data` yielded no batches.")

    def _loss(self, batch: Any, ps: list[torch.Tensor]) -> torch.Tensor:
        subs: dict[str, torch.Tensor] = dict(zip(self.names, ps))
        subs.update(self._frozen)
        buffers = self._buffers if self._buffers is not None else self._call.named_buffers()
        if self.train_mode:  # BatchNorm updates these copies, never the module's buffers
            subs.update((name, b.detach().clone()) for name, b in buffers)
        elif self._buffers is not None:
            subs.update(self._buffers)
        loss = torch.func.functional_call(self._call, subs, (batch,))
        return check_closure_loss(loss, "loss_fn")

    def _accumulate(self, leaves: list[torch.Tensor], per_batch: Callable[[Any, list[torch.Tensor]], tuple[Any, list]],
                    ) -> tuple[Any, list[torch.Tensor]]:
        """The weighted average over the batches of `per_batch(batch, ps) -> (loss, tensors)`."""
        total_loss: Any = None
        total: list[torch.Tensor] = []
        count = 0
        with self._session(leaves):
            if self.single:
                (batch, _), = self._batches(leaves)
                return per_batch(batch, [leaf.detach().requires_grad_(True) for leaf in leaves])
            for batch, n in self._batches(leaves):
                loss, parts = per_batch(batch, [leaf.detach().requires_grad_(True) for leaf in leaves])
                if total_loss is None:
                    total_loss, total = loss * n, torch._foreach_mul(parts, float(n))
                else:
                    total_loss = total_loss + loss * n
                    torch._foreach_add_(total, parts, alpha=float(n))
                count += n
        torch._foreach_div_(total, float(count))
        return total_loss / count, total

    # -- LeafOracle -----------------------------------------------------------------------
    def _value_and_grad(self, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        def per_batch(batch: Any, ps: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
            loss = self._loss(batch, ps)
            grads = torch.autograd.grad(loss, ps, allow_unused=True)
            return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(ps, grads)]

        return self._accumulate(leaves, per_batch)

    def _hvp(self, leaves: list[torch.Tensor], v: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.single:
            # one batch: keep the gradient's graph at this point and differentiate it again for
            # every HVP (one backward of the backward each, instead of forward + 2 backwards); the
            # graph is what any HVP holds at its peak anyway
            graph = self._graph
            if graph is None or not _same(graph[0], leaves):
                with self._session(leaves):
                    ps = [leaf.detach().requires_grad_(True) for leaf in leaves]
                    (batch, _), = self._batches(leaves)
                    loss = self._loss(batch, ps)
                    grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
                graph = (list(leaves), ps, list(grads))
                if _same(leaves, self._base):
                    self._graph = graph
            _, ps, grads = graph
            with torch.enable_grad():
                return _second_backward(ps, grads, v, retain=graph is self._graph)

        def per_batch(batch: Any, ps: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
            loss = self._loss(batch, ps)
            grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
            return loss.detach(), _second_backward(ps, list(grads), v, retain=False)

        return self._accumulate(leaves, per_batch)[1]

    def release(self) -> None:
        """Free the graph kept for the HVPs at `base`."""
        self._graph = None


def _same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _second_backward(ps: list[torch.Tensor], grads: list[Any], v: list[torch.Tensor], *, retain: bool) -> list:
    pairs = [(g, u) for g, u in zip(grads, v) if g is not None and g.requires_grad]
    if not pairs:  # the loss is linear in the parameters
        return [torch.zeros_like(p) for p in ps]
    out = torch.autograd.grad([g for g, _ in pairs], ps, grad_outputs=[u for _, u in pairs], retain_graph=retain,
                              allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(ps, out)]


# ------------------------------------------------------------------------------------------
# the public functions

Loss = Callable[..., torch.Tensor]


def diagnostics(model: torch.nn.Module, loss_fn: Loss, data: Any, *, params: Any = None, loss_form: str = "criterion",
                hvp: str = "exact", fd_step: float | None = None, train_mode: bool = False, seed: int = 0,
                probes: Any = "torch", copy: bool = True) -> Diagnostics:
    """A `gradnorm.diagnostics.Diagnostics` of `model`'s loss at its current weights: every
    diagnostic from one object, sharing the gradient (``.eigenvalues(k)``, ``.trace(samples)``,
    ``.density(runs, iters)``, ``.gradient_norm()``, ``.sam_sharpness(rho)``,
    ``.first_order_flatness(rho, steps)``, ``.measure(quantities)``). The functions of this module
    build one and call one method; their other arguments are these.

    Args:
        model: a ``torch.nn.Module``.
        loss_fn: with ``loss_form="criterion"`` (default), a criterion ``loss_fn(outputs, targets)``
            such as ``torch.nn.functional.cross_entropy``: the loss of a batch ``(inputs, targets)``
            is ``loss_fn(model(inputs), targets)`` (``model(*inputs)`` / ``model(**inputs)`` for a
            tuple / dict of inputs). With ``loss_form="model"``, ``loss_fn(model, batch) -> loss``
            for batches of any form (hessian-eigenthings' convention); it may call the model (or its
            submodules) any way it likes: the parameters are substituted for the whole call.
        data: one batch (a tuple ``(inputs, targets)``, or whatever ``loss_fn`` takes), or a
            re-iterable source of batches (a ``DataLoader``, a list of batches): then the loss, its
            gradient and Hessian are the average over all batches weighted by batch size (the
            full-dataset Hessian, when ``loss_fn`` averages over its batch). Batches are moved to
            the parameters' device. Every HVP is a pass over all of ``data``.
        params: the parameters to differentiate with respect to (the model's parameters or their
            names); default all that require grad. The others are held fixed.
        hvp: "exact" (double backward, default) or "fd" (central difference of two gradients, see
            `gradnorm.diagnostics.Curvature`).
        fd_step: the finite-difference step with ``hvp="fd"``.
        train_mode: evaluate with the model in training mode (BatchNorm batch statistics, on
            copies of its buffers; dropout with masks fixed by ``seed`` for every pass). Default
            eval mode. The model's mode is restored either way.
        seed: the seed of the probes and of the random state each pass starts from.
        probes: "torch" (`TorchProbes`, drawn on the parameters' device, default), "numpy"
            (`NumpyProbes`, the same numbers on every device and framework) or a probe object.
        copy: with True (default) the point is a copy of the weights (and of the buffers and any
            parameters not differentiated) taken now, so the object stays valid while training
            goes on; False measures the live weights without a copy (valid until they change; the
            one-shot functions of this module do this). On one batch the object keeps the graph of
            the gradient for its HVPs: ``d.curv.oracle.release()`` frees it.
    """
    names, live = _select(model, params)
    if hvp not in ("auto", "exact", "fd"):
        raise ValueError(f"`hvp` must be one of ('exact', 'fd', 'auto'). Received: {describe(hvp)}.")
    with torch.no_grad():
        leaves = [p.detach().clone() if copy else p.detach() for p in live]
    oracle = ModelOracle(model, loss_fn, data, names, loss_form=loss_form, train_mode=train_mode, seed=seed,
                         base=leaves, snapshot=copy)
    # an OrderedDict keeps the model's parameter order (optree sorts the keys of a plain dict)
    _, treedef = _tree.flatten(OrderedDict((n, leaf) for n, leaf in zip(names, leaves)))
    return Diagnostics(oracle, leaves, treedef, ops=oracle.ops, hvp=hvp, fd_step=fd_step,
                       probes=_probes(probes, seed, leaves[0].device), seed=seed)


def hessian_eigenvalues(model: torch.nn.Module, loss_fn: Loss, data: Any, *, k: int = 1, iters: int | None = None,
                        which: str = "LA", tol: float = 1e-4, **kwargs: Any) -> EigenResult:
    """The `k` extreme eigenvalues of the Hessian of the loss, with eigenvectors, by Lanczos with
    full reorthogonalization (`iters` HVPs, default ``min(P, max(2k + 20, 30))``).

    `which`: "LA" largest algebraic (default; PyHessian's top eigenvalue), "LM" largest magnitude
    (hessian-eigenthings' default), "SA" smallest algebraic. `tol`: a pair is reported converged
    when its Ritz residual is at most ``tol * |eigenvalue|``. `kwargs`: `params`, `loss_form`,
    `hvp`, `fd_step`, `train_mode`, `seed`, `probes`, as for `diagnostics`.

    Returns:
        `EigenResult`: ``eigenvalues`` (1-d tensor), ``eigenvectors`` (k dicts name -> tensor, in
        ``named_parameters`` order), ``residuals``, ``converged``, ``iterations``, ``method``.
    """
    return _one_shot(model, loss_fn, data, kwargs).eigenvalues(k, iters=iters, which=which, tol=tol)


def hessian_trace(model: torch.nn.Module, loss_fn: Loss, data: Any, *, samples: int = 100, method: str = "hutchinson",
                  **kwargs: Any) -> TraceResult:
    """The trace of the Hessian, estimated with a standard error: ``method="hutchinson"``
    (`samples` Rademacher probes, one HVP each) or ``"hutch++"`` (a budget of `samples` HVPs;
    lower variance when a few eigenvalues dominate). `kwargs` as for `diagnostics`.

    Returns:
        `TraceResult`: ``trace``, ``stderr`` (0-d tensors), ``samples``, ``matvecs``, ``method``.
    """
    return _one_shot(model, loss_fn, data, kwargs).trace(samples, method=method)


def spectral_density(model: torch.nn.Module, loss_fn: Loss, data: Any, *, runs: int = 1, iters: int | None = None,
                     **kwargs: Any) -> DensityResult:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature (PyHessian's density
    plot): `runs` Lanczos runs of `iters` steps (default ``min(P, 80)``) from Rademacher starts.
    ``result.density(grid, sigma)`` evaluates it; ``result.nodes`` / ``result.weights`` hold the
    quadrature (NumPy arrays of shape (runs, iters)). `kwargs` as for `diagnostics`."""
    return _one_shot(model, loss_fn, data, kwargs).density(runs, iters)


def gradient_norm(model: torch.nn.Module, loss_fn: Loss, data: Any, **kwargs: Any) -> torch.Tensor:
    """The global L2 norm of the gradient (a 0-d tensor): one gradient pass. `kwargs` as for `diagnostics`."""
    return _one_shot(model, loss_fn, data, kwargs).gradient_norm()


def sam_sharpness(model: torch.nn.Module, loss_fn: Loss, data: Any, *, rho: float = 0.05,
                  **kwargs: Any) -> torch.Tensor:
    """SAM's sharpness ``L(θ + ρ g/‖g‖) − L(θ)`` (a 0-d tensor): two gradient passes. `kwargs` as
    for `diagnostics`."""
    return _one_shot(model, loss_fn, data, kwargs).sam_sharpness(rho)


def first_order_flatness(model: torch.nn.Module, loss_fn: Loss, data: Any, *, rho: float = 0.05, steps: int = 3,
                         **kwargs: Any) -> FlatnessResult:
    """GAM's first-order flatness ``ρ · max_{‖δ‖≤ρ} ‖∇L(θ+δ)‖``, from below, by `steps`
    normalized ascent steps (`steps` HVPs and ``steps + 1`` gradients). `kwargs` as for `diagnostics`.

    Returns:
        `FlatnessResult`: ``flatness``, ``grad_norms``, ``perturbation`` (dict name -> tensor), ``method``.
    """
    return _one_shot(model, loss_fn, data, kwargs).first_order_flatness(rho, steps)


def measure(model: torch.nn.Module, loss_fn: Loss, data: Any, *,
            quantities: Sequence[str] = ("grad_norm", "lambda_max", "trace"), rho: float = 0.05,
            iters: int | None = None, samples: int = 100, flatness_steps: int = 3,
            **kwargs: Any) -> dict[str, torch.Tensor]:
    """Several diagnostics at once (names from `QUANTITIES`: "loss", "grad_norm",
    "sam_sharpness", "lambda_max", "trace", "first_order_flatness"), sharing the gradient.
    Returns a dict of 0-d tensors. `kwargs` as for `diagnostics`."""
    d = _one_shot(model, loss_fn, data, kwargs)
    return d.measure(quantities, rho=rho, iters=iters, samples=samples, flatness_steps=flatness_steps)


_OPTIONS = ("params", "loss_form", "hvp", "fd_step", "train_mode", "seed", "probes")


def _one_shot(model: Any, loss_fn: Any, data: Any, kwargs: dict[str, Any]) -> Diagnostics:
    unknown = sorted(set(kwargs) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"Unknown keyword arguments {unknown}; the options are {list(_OPTIONS)}.")
    return diagnostics(model, loss_fn, data, copy=False, **kwargs)


# ------------------------------------------------------------------------------------------
# logging during training


class Monitor:
    """Diagnostics every `every` optimizer steps, without writing a loop.

    ``monitor.attach(optimizer)`` registers a step post-hook on any ``torch.optim.Optimizer``
    (``gradnorm.torch.Optimizer`` included): after every `every`-th step the monitor measures
    `quantities` at the weights the step produced, appends ``{"step": n, name: float, ...}`` to
    `history` and calls ``log_fn({prefix + name: float, ...})`` (Lightning's ``self.log_dict``,
    ``wandb.log``, ``print``). On the other steps it costs one integer increment. In a custom loop,
    call ``monitor.step()`` after each optimizer step instead, or ``monitor.measure()`` at any time.

    A measurement never changes the training: it evaluates the model with the weights substituted
    (``torch.func.functional_call``), leaves ``.grad``, the optimizer's state, the model's
    buffers and mode, and the global random state as they were, so a run with the monitor gives
    bit-identical weights to one without. It reads its values back to the host (one
    synchronization per measurement, none on other steps).

    Cost per measurement: "loss" and "grad_norm" one gradient pass over `data` (shared),
    "lambda_max" `iters` HVPs, "trace" `samples` HVPs, "sam_sharpness" one more gradient,
    "first_order_flatness" `flatness_steps` HVPs and gradients. On one batch an HVP costs about one
    backward pass more than a gradient (the gradient's graph is kept and differentiated again):
    1.25 training steps on the same batch, measured on a CPU MLP. Lanczos adds vector algebra
    that grows like ``iters**2 * P`` (full reorthogonalization), which dominates for small models on
    CPU: the defaults (loss, grad_norm, lambda_max with 10 steps) cost about 40 training steps of a
    270k-parameter MLP on a batch of 256 (one CPU thread), i.e. 8% of the training at the
    default ``every=500``; for large models on a GPU the HVPs dominate instead. Raise `every`, shrink `data` or `iters`, or drop quantities to make it cheaper.

    Args:
        model, loss_fn, data: as for `hessian_eigenvalues` (`data`: a fixed measurement batch or
            loader, e.g. a held-out batch).
        every: measure after every `every`-th step (a positive int).
        quantities: names from `QUANTITIES`.
        log_fn: called with ``{prefix + name: float}`` after each measurement (optional).
        prefix: prepended to the names given to `log_fn` (e.g. ``"hessian/"``).
        iters: Lanczos steps for "lambda_max", a lower bound of the top eigenvalue that tightens
            with `iters` (on a 270k-parameter MLP, 10 steps came within 0.1-6% of the converged
            value and 20 within 1e-5; use 20 or more where the value matters, e.g. against 2/lr).
        samples: Hutchinson probes for "trace".
        rho, flatness_steps: for "sam_sharpness" and "first_order_flatness".
        params, loss_form, hvp, fd_step, train_mode, seed, probes: as for `hessian_eigenvalues`;
            the same seed at every measurement (common random numbers: the curve over training is
            not jittered by fresh probes).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], data: Any, *, every: int = 500,
                 quantities: Sequence[str] = ("loss", "grad_norm", "lambda_max"),
                 log_fn: Callable[[dict[str, float]], Any] | None = None, prefix: str = "", iters: int = 10,
                 samples: int = 10, rho: float = 0.05, flatness_steps: int = 3, params: Any = None,
                 loss_form: str = "criterion", hvp: str = "exact", fd_step: float | None = None,
                 train_mode: bool = False, seed: int = 0, probes: Any = "torch"):
        from ..diagnostics import check_measure_options, check_quantities
        from ..diagnostics._curvature import check_positive_int

        check_positive_int("every", every)
        check_measure_options("gradnorm.torch.diagnostics.Monitor", hvp=hvp, rho=rho, samples=samples,
                              flatness_steps=flatness_steps, iters=iters)
        quantities = check_quantities(quantities, "gradnorm.torch.diagnostics.Monitor")
        if log_fn is not None and not callable(log_fn):
            raise TypeError(f"`log_fn` must be None or callable: log_fn(dict). Received: {describe(log_fn)}.")
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a str. Received: {describe(prefix)}.")
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.every = every
        self.quantities = tuple(quantities)
        self.log_fn = log_fn
        self.prefix = prefix
        self._measure_kwargs = {"rho": rho, "iters": iters, "samples": samples, "flatness_steps": flatness_steps}
        self._kwargs = {"params": params, "loss_form": loss_form, "hvp": hvp, "fd_step": fd_step,
                        "train_mode": train_mode, "seed": seed, "probes": probes}
        # everything checkable is checked now, not at step `every`
        names, _ = _select(model, params)
        ModelOracle(model, loss_fn, data, names, loss_form=loss_form, train_mode=train_mode, seed=seed)
        _probes(probes, seed, torch.device("cpu"))
        if hvp not in ("auto", "exact", "fd"):
            raise ValueError(f"`hvp` must be one of ('exact', 'fd', 'auto'). Received: {describe(hvp)}.")
        self.history: list[dict[str, float]] = []
        self.steps = 0
        self._handle: Any = None

    def attach(self, optimizer: torch.optim.Optimizer) -> Monitor:
        """Measure after every `every`-th ``optimizer.step()`` (a step post-hook). Returns self."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer. Received: {describe(optimizer)}.")
        if self._handle is not None:
            raise RuntimeError("This Monitor is attached to an optimizer already: call `detach()` first.")
        self._handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())
        return self

    def detach(self) -> None:
        """Remove the hook `attach` registered."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def step(self) -> dict[str, float] | None:
        """Count one training step; measure (and return the values) when it is a multiple of `every`."""
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.measure()

    def measure(self) -> dict[str, float]:
        """Measure now, at the model's current weights; record in `history` and log."""
        d = _one_shot(self.model, self.loss_fn, self.data, self._kwargs)
        values = d.measure(self.quantities, **self._measure_kwargs)
        out = {name: float(value) for name, value in values.items()}
        self.history.append({"step": self.steps, **out})
        if self.log_fn is not None:
            self.log_fn({self.prefix + name: value for name, value in out.items()})
        return out

    def __repr__(self) -> str:
        return f"gradnorm.torch.diagnostics.Monitor(every={self.every}, quantities={self.quantities})"
