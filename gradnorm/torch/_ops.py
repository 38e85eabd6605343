"""Leaf-list arithmetic on PyTorch's fused multi-tensor kernels (``torch._foreach_*``).

:class:`TorchForeachOps` has the interface of :class:`gradnorm.ArrayOps` and gives the same
results up to rounding (the conformance suite and ``tests/test_torch_ops.py`` run the rules
through it), with one kernel launch per operation for the whole parameter list instead of one
per leaf.

Contract (the same as `ArrayOps`):

* Inputs are never mutated. The in-place kernels (``torch._foreach_*_``) only ever touch lists
  this module has just allocated, with two explicit exceptions: ``axpy_`` writes into the list the
  caller names (the optimizer forms a point in its weights), and, with ``in_place=True``, the
  ``*_into`` methods compute their result in the buffers of ``out``, a list the caller gives up.
* Temporaries are bounded: where an in-place kernel needs one (``s * x`` before ``y += ...``
  on CUDA, the products of ``vdot``), it is made for chunks of leaves of at most 1/16 of the
  list's bytes (at least 4 MiB, at least one leaf), not for the whole list.
* Nothing is read back to the host. A scalar that is a 0-d tensor (``rho / (||g|| + eps)``)
  stays a tensor: it goes to the ``Tensor`` overloads of ``_foreach_mul`` / ``_foreach_add``,
  which read it on the device.
* A 0-d tensor scalar is cast to each leaf's dtype before it touches the leaf, so bf16 and
  fp16 lists stay in their dtype. A Python number is passed to the kernels as it is.
* Reductions accumulate in float32 at least, or in float64 if any leaf is float64
  (``_foreach_powsum`` / ``_foreach_norm`` with ``dtype=`` accumulate in the requested dtype
  without copying the leaves).

Lists may mix dtypes: operations are applied per dtype group, so every group takes the fused
CUDA path (a mixed list would otherwise fall back to PyTorch's per-tensor loop) and gets its
scalar cast once. As with `ArrayOps`, the leaves of one call are expected on one device
(a CPU 0-d scalar with CUDA leaves is fine: it is copied over without a synchronization).

DTensor lists (FSDP2 ``fully_shard`` parameters; judged by the first leaf) run the same kernels
on the local shards: elementwise results are DTensors laid out as the first list, reductions are
global (the shards' partials all-reduced over the mesh dimensions the leaves are sharded on) and
plain 0-d tensors, equal on every rank. See the section on DTensor lists below.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import torch

from .._tree import ArrayOps, PerLeaf, _check_out, saturate_number, saturation_bound

__all__ = ["TorchForeachOps"]

_XP = array_api_compat.array_namespace(torch.empty(0))

Leaves = list[torch.Tensor]
Scalar = Any  # a Python number, a 0-d tensor, or a PerLeaf of those


# torch.compile: True while Dynamo traces (a constant in the graph), False when running eagerly.
_compiling: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


# --------------------------------------------------------------------------------------
# per-leaf sums, accumulated in a given dtype


def _l1(x: Sequence[torch.Tensor], dtype: torch.dtype) -> Sequence[torch.Tensor]:
    """`[sum(|a|) for a in x]` (the L1 norms; faster than ``_foreach_powsum(x, 1)`` on CPU)."""
    return torch._foreach_norm(x, 1, dtype=dtype)


def _sumsq_fused(x: Sequence[torch.Tensor], dtype: torch.dtype) -> Sequence[torch.Tensor]:
    """`[sum(a^2) for a in x]` without a square root (``_foreach_powsum``, newer PyTorch)."""
    if _compiling():  # Dynamo cannot trace _foreach_powsum (a graph break at every norm); Inductor fuses this
        return _sumsq_via_norm(x, dtype)
    return torch._foreach_powsum(x, 2, dtype=dtype)


def _sumsq_via_norm(x: Sequence[torch.Tensor], dtype: torch.dtype) -> Sequence[torch.Tensor]:
    """The same as squared L2 norms, for PyTorch without ``_foreach_powsum``."""
    norms = torch._foreach_norm(x, 2, dtype=dtype)
    torch._foreach_mul_(norms, norms)  # fresh 0-d outputs
    return norms


_sumsq: Callable[[Sequence[torch.Tensor], torch.dtype], Sequence[torch.Tensor]] = (
    _sumsq_fused if hasattr(torch, "_foreach_powsum") else _sumsq_via_norm
)


# --------------------------------------------------------------------------------------
# kernels on a list of one dtype; scalars already cast to it


def _like(s: Scalar, leaf: torch.Tensor) -> Scalar:
    """`s` as `ArrayOps._cast` makes it: a Python number as is, a tensor in `leaf`'s dtype
    (and on its device: a CPU scalar is copied over without blocking); a PerLeaf with its
    factor so, and its values all Python numbers or all tensors so.

    As in `ArrayOps`, a scalar saturates at the largest finite value of `leaf`'s dtype where it
    could exceed it (`gradnorm.ArrayOps` explains why: ``rho / (||g|| + eps)`` at a zero gradient
    must not become ``inf`` in float16): a tensor is clamped before a narrowing cast (one fused
    kernel, no host read), a Python number is clipped in Python. Float32 scalars with float32
    leaves and anything with float64 leaves are untouched."""
    if isinstance(s, PerLeaf):
        values = s.values
        if any(isinstance(v, torch.Tensor) for v in values):
            values = tuple(_like(torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v, leaf) for v in values)
        else:
            values = tuple(_like(v, leaf) for v in values)
        return PerLeaf._make(values, _like(s.factor, leaf))
    if not isinstance(s, torch.Tensor):
        return saturate_number(s, saturation_bound(_XP, float, leaf.dtype))
    if s.dtype is not leaf.dtype:
        bound = saturation_bound(_XP, s.dtype, leaf.dtype)
        s = (s.clamp(-bound, bound) if bound is not None else s).to(leaf.dtype)
    if s.device != leaf.device:
        s = s.to(leaf.device, non_blocking=leaf.device.type != "cpu")
    return s


def _scaled(x: Leaves, s: Scalar) -> Sequence[torch.Tensor]:
    """`s * x`, fresh; a PerLeaf is one multiplication by its values and one by its factor."""
    if not isinstance(s, PerLeaf):
        return torch._foreach_mul(x, s)
    out = torch._foreach_mul(x, list(s.values))  # a ScalarList, or 0-d tensors broadcast per leaf
    if not (isinstance(s.factor, (int, float)) and s.factor == 1):
        torch._foreach_mul_(out, s.factor)
    return out


def _add_scalar(x: Leaves, s: Scalar) -> Sequence[torch.Tensor]:
    if not isinstance(s, PerLeaf):
        return torch._foreach_add(x, s)
    values = s.leaf_values()
    if isinstance(values[0], torch.Tensor):
        return [a + v for a, v in zip(x, values)]
    return torch._foreach_add(x, values)


def _axpy(x: Leaves, y: Leaves, s: Scalar) -> Sequence[torch.Tensor]:
    if isinstance(s, (torch.Tensor, PerLeaf)):
        out = _scaled(x, s)
        torch._foreach_add_(out, y)
        return out
    return torch._foreach_add(y, x, alpha=s)


#: A temporary that an in-place kernel cannot avoid (``s * x`` before ``y += ...`` on CUDA) is made
#: for chunks of leaves of at most 1/_TEMP_FRACTION of the list's bytes (or one leaf, or
#: _MIN_CHUNK_BYTES, whichever is larger), not for the whole list: forming a point in the weights
#: must not cost a parameter-sized buffer.
_TEMP_FRACTION = 16
_MIN_CHUNK_BYTES = 4 << 20


def _chunks(x: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """Index ranges `[i, j)` covering `x`, each of at most the temporary budget's bytes (at least one
    leaf each); one range for a small list, and under torch.compile (Inductor plans the memory)."""
    n = len(x)
    if _compiling():
        return [(0, n)]
    sizes = [t.numel() * t.element_size() for t in x]
    total = sum(sizes)
    budget = max(total // _TEMP_FRACTION, _MIN_CHUNK_BYTES)
    if total <= budget:
        return [(0, n)]
    out, start, filled = [], 0, 0
    for i, size in enumerate(sizes):
        if filled and filled + size > budget:
            out.append((start, i))
            start, filled = i, 0
        filled += size
    out.append((start, n))
    return out


def _axpy_inplace(x: Leaves, y: Leaves, s: Scalar) -> Sequence[torch.Tensor]:
    """`y += s * x`, without a temporary the size of the list."""
    if not isinstance(s, (torch.Tensor, PerLeaf)):
        torch._foreach_add_(y, x, alpha=s)
    elif not isinstance(s, PerLeaf) and y[0].device.type == "cpu":
        # CPU foreach kernels loop over the tensors anyway: addcmul with the 0-d factor
        # broadcast saves the temporary that mul + add would allocate.
        torch._foreach_addcmul_(y, x, [s] * len(x))
    else:  # two fused kernels per chunk (a list of 0-d factors would leave the fused CUDA path)
        for i, j in _chunks(x):
            part = s.take(range(i, j)) if isinstance(s, PerLeaf) else s
            torch._foreach_add_(y[i:j], _scaled(x[i:j], part))
    return y


_HALF = (torch.float16, torch.bfloat16)


def _scale_(x: Leaves, s: Scalar) -> Leaves:
    """`x *= s` (`_scaled` in place, with its values)."""
    if x and x[0].dtype in _HALF and x[0].device.type == "cpu":
        # The CPU's in-place foreach kernel multiplies a half-precision list by a number rounded to
        # the list's dtype first (0.37 becomes 0.3691 in bfloat16); Tensor.mul_ rounds the product
        # once, as the out-of-place kernels do. The CPU loops over the tensors anyway.
        values = s.values if isinstance(s, PerLeaf) else (s,) * len(x)
        for a, v in zip(x, values):
            a.mul_(v)
        if isinstance(s, PerLeaf) and not (isinstance(s.factor, (int, float)) and s.factor == 1):
            for a in x:
                a.mul_(s.factor)
        return x
    if not isinstance(s, PerLeaf):
        torch._foreach_mul_(x, s)
        return x
    torch._foreach_mul_(x, list(s.values))
    if not (isinstance(s.factor, (int, float)) and s.factor == 1):
        torch._foreach_mul_(x, s.factor)
    return x


# the kernels of the `*_into` methods: the result in the buffers of the first list (`_x`) or of
# the second (`_y`); each gives the out-of-place kernel's value, bit for bit where noted


def _add_into_x(x: Leaves, y: Leaves) -> Leaves:  # exact (y + x == x + y)
    torch._foreach_add_(x, y)
    return x


def _sub_into_x(x: Leaves, y: Leaves) -> Leaves:  # exact
    torch._foreach_sub_(x, y)
    return x


def _sub_into_y(x: Leaves, y: Leaves) -> Leaves:  # exact: -(y - x) == x - y
    torch._foreach_sub_(y, x)
    torch._foreach_neg_(y)
    return y


def _mul_into_x(x: Leaves, y: Leaves) -> Leaves:  # exact
    torch._foreach_mul_(x, y)
    return x


def _axpy_into_x(x: Leaves, y: Leaves, s: Scalar) -> Leaves:  # exact for a tensor or PerLeaf `s`
    _scale_(x, s)
    torch._foreach_add_(x, y)
    return x


def _axpy_into_y(x: Leaves, y: Leaves, s: Scalar) -> Leaves:  # exact for a number `s`
    return list(_axpy_inplace(x, y, s))


def _lincomb_into_x(x: Leaves, y: Leaves, a: Scalar, b: Scalar) -> Leaves:  # exact for numbers
    _scale_(x, a)
    _axpy_inplace(y, x, b)
    return x


def _lincomb_into_y(x: Leaves, y: Leaves, a: Scalar, b: Scalar) -> Leaves:  # exact for a number `a`, tensor `b`
    _scale_(y, b)
    _axpy_inplace(x, y, a)
    return y


def _add_scalar_(x: Leaves, s: Scalar) -> Leaves:
    if not isinstance(s, PerLeaf):
        torch._foreach_add_(x, s)
        return x
    values = s.leaf_values()
    if isinstance(values[0], torch.Tensor):
        for a, v in zip(x, values):
            a.add_(v)
    else:
        torch._foreach_add_(x, values)
    return x


def _lincomb(x: Leaves, y: Leaves, a: Scalar, b: Scalar) -> Sequence[torch.Tensor]:
    if isinstance(a, PerLeaf) or isinstance(b, PerLeaf):
        out = _scaled(x, a)
        torch._foreach_add_(out, _scaled(y, b))
        return out
    a_tensor, b_tensor = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
    if b_tensor and not a_tensor:  # b * y first, then a number: two kernels instead of three
        out = torch._foreach_mul(y, b)
        torch._foreach_add_(out, x, alpha=a)
        return out
    out = torch._foreach_mul(x, a)
    if b_tensor:
        torch._foreach_add_(out, torch._foreach_mul(y, b))
    else:
        torch._foreach_add_(out, y, alpha=b)
    return out


def _sign(x: Leaves) -> Sequence[torch.Tensor]:
    # torch.sign(nan) is 0, the Array API's sign(nan) is nan: max(sign(x), min(x, -1)) equals
    # sign(x) for every number and is nan for nan (maximum and clamp propagate nan).
    out = torch._foreach_sign(x)
    torch._foreach_maximum_(out, torch._foreach_clamp_max(x, -1.0))
    return out


def _cast(x: Leaves, dtype: torch.dtype) -> Leaves:
    """Fresh copies of `x` in `dtype` (one fused copy kernel)."""
    out = [torch.empty_like(a, dtype=dtype) for a in x]
    torch._foreach_copy_(out, x)
    return out


def _dot_per_leaf(x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> torch.Tensor:
    """`sum_i <x_i, y_i>` by one BLAS dot per leaf in the accumulation dtype (float64 if any leaf is,
    else float32): on the CPU five to seven times faster than the fused `_foreach` form below, and
    accurate where the products cancel (that form takes the difference of two L1 sums, whose
    float32 rounding is relative to sum |x_i y_i|, not to the result)."""
    acc = torch.float64 if any(a.dtype is torch.float64 for a in x) else torch.float32
    parts = [
        torch.dot((a if a.dtype is acc else a.to(acc)).reshape(-1), (b if b.dtype is acc else b.to(acc)).reshape(-1))
        for a, b in zip(x, y)
    ]
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def _groups(x: Sequence[torch.Tensor]) -> list[list[int]] | None:
    """None when every leaf has the dtype of the first (the common case, checked in one pass);
    otherwise the leaf indices of each dtype, in order of first appearance."""
    dtype = x[0].dtype
    for leaf in x:
        if leaf.dtype is not dtype:
            break
    else:
        return None
    groups: dict[torch.dtype, list[int]] = {}
    for i, leaf in enumerate(x):
        groups.setdefault(leaf.dtype, []).append(i)
    return list(groups.values())


# --------------------------------------------------------------------------------------
# DTensor lists (FSDP2 `fully_shard`, tensor parallelism)
#
# Most `_foreach_*` ops have no DTensor sharding strategy (`_foreach_copy_`), and DTensor's
# per-op dispatch is slow. A list whose first leaf is a DTensor is therefore computed on the local
# shards with the same fused kernels: elementwise operations on leaves of one placement are
# elementwise on the shards, and their results are wrapped back as DTensors of the first list's
# placements (a leaf of another list with other placements is redistributed first). Reductions
# sum the shards' partials and all-reduce them over the mesh dimensions the leaves are sharded on
# (not over those they are replicated on), so a norm is the norm of the full parameters on every
# rank. Plain lists never come here: one type check of the first leaf per call.

_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")
_dtensor_type: Any = None


def _is_dtensor(t: Any) -> bool:
    """Whether `t` is a DTensor. No DTensor exists before its module is imported, so this never
    imports it (that takes seconds) and costs one isinstance check once it is loaded."""
    global _dtensor_type
    cls = _dtensor_type
    if cls is None:
        for name in _DTENSOR_MODULES:
            cls = getattr(sys.modules.get(name), "DTensor", None)
            if cls is not None:
                break
        else:
            return False
        _dtensor_type = cls
    return isinstance(t, cls)


def _replicate_partial(t: Any) -> Any:
    """`t` with any Partial placement (pending sums) reduced to Replicate: a shard of a partial
    sum is not the value of anything elementwise."""
    placements = t.placements
    if not any(p.is_partial() for p in placements):
        return t
    try:
        from torch.distributed.tensor import Replicate
    except ImportError:  # pragma: no cover - torch < 2.4
        from torch.distributed._tensor import Replicate

    return t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in placements])


def _local(t: Any) -> torch.Tensor:
    """The local shard of DTensor `t` (the tensor its storage lives in: in-place writes reach `t`)."""
    local = getattr(t, "_local_tensor", None)
    return local if local is not None else t.to_local()


def _local_like(t: Any, ref: Any) -> torch.Tensor:
    """The local shard of `t` laid out as `ref` (a DTensor without Partial placements, or a plain
    tensor): elementwise operations on the two are then elementwise on the shards."""
    if not _is_dtensor(ref):
        if _is_dtensor(t):
            return t.full_tensor()
        return t
    if not _is_dtensor(t):
        raise TypeError(
            "gradnorm cannot combine a plain tensor with a DTensor leaf: the lists of a step must be all "
            f"DTensors where the parameters are (shape {tuple(t.shape)})."
        )
    if t is not ref:
        spec, ref_spec = t._spec, ref._spec
        if spec is not ref_spec and (spec.placements != ref_spec.placements or spec.mesh != ref_spec.mesh):
            t = t.redistribute(ref_spec.mesh, ref_spec.placements)
    return _local(t)


def _local_lists(lists: tuple[Leaves, ...]) -> tuple[list[Leaves], list[Any]]:
    """The local shards of `lists`, laid out as the first list's leaves (returned as the second
    item: the references to wrap results as); a list given twice stays one list (``x is y``)."""
    refs = [_replicate_partial(a) if _is_dtensor(a) else a for a in lists[0]]
    out: list[Leaves] = []
    for k, leaves in enumerate(lists):
        same = next((j for j in range(k) if lists[j] is leaves), None)
        out.append(out[same] if same is not None else [_local_like(t, r) for t, r in zip(leaves, refs)])
    return out, refs


def _wrap(local: torch.Tensor, ref: Any) -> Any:
    """`local` as a DTensor laid out as `ref` (as is where `ref` is a plain tensor)."""
    if not _is_dtensor(ref):
        return local
    if local.dtype is ref.dtype:
        try:
            return type(ref)(local, ref._spec, requires_grad=False)  # the spec is the same: no checks, no autograd
        except (AttributeError, TypeError):  # pragma: no cover - a future DTensor without this constructor
            pass
    return type(ref).from_local(local, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape,
                                stride=ref.stride())


def _local_scalar(s: Scalar) -> Scalar:
    """A scalar that is a DTensor, or a PerLeaf holding some, as plain tensors (their full values)."""
    if isinstance(s, PerLeaf):
        if any(_is_dtensor(v) for v in s.values):
            return PerLeaf._make(tuple(_local_scalar(v) for v in s.values), _local_scalar(s.factor))
        return s if not _is_dtensor(s.factor) else PerLeaf._make(s.values, _local_scalar(s.factor))
    return s.full_tensor() if _is_dtensor(s) else s


def _shard_groups(refs: list[Any]) -> list[tuple[Any, tuple[int, ...], list[int]]]:
    """The leaf indices of `refs` by (mesh, mesh dimensions they are sharded on): a reduction sums
    each group's local partials over those dimensions. Plain tensors have mesh None."""
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(refs):
        if _is_dtensor(r):
            spec = r._spec
            key = (spec.mesh, tuple(d for d, p in enumerate(spec.placements) if p.is_shard()))
        else:
            key = (None, ())
        groups.setdefault(key, []).append(i)
    return [(mesh, dims, idx) for (mesh, dims), idx in groups.items()]


def _all_reduce(value: torch.Tensor, mesh: Any, dims: Sequence[int], op: Any) -> torch.Tensor:
    """`value` reduced with `op` over the mesh dimensions `dims` (one collective each), on its
    device (shards offloaded to the CPU with a CUDA mesh go through the mesh's device)."""
    import torch.distributed as dist

    device = value.device
    if device.type != mesh.device_type:
        value = value.to(mesh.device_type)
    for d in dims:
        dist.all_reduce(value, op=op, group=mesh.get_group(d))
    return value.to(device)


def _writable_locals(dst: Leaves, src: Leaves) -> tuple[Leaves, Leaves]:
    """The local shards of `dst` (writes into them reach `dst`) and of `src` laid out as `dst`."""
    for d in dst:
        if _is_dtensor(d) and any(p.is_partial() for p in d.placements):
            raise TypeError("gradnorm cannot write into a DTensor with a Partial placement.")
    (local_dst, local_src), _ = _local_lists((dst, src))
    return local_dst, local_src


def copy_(dst: Leaves, src: Leaves) -> None:
    """``dst[i].copy_(src[i])`` for every leaf, in one fused kernel (on the local shards for
    DTensors, where ``_foreach_copy_`` has no sharding strategy). Exact, bit for bit."""
    if not dst:
        return
    if _is_dtensor(dst[0]):
        torch._foreach_copy_(*_writable_locals(dst, src))
    else:
        torch._foreach_copy_(dst, src)


def dtensor_mesh(params: Sequence[torch.Tensor]) -> Any:
    """The device mesh of the parameters when they are DTensors (judged by the first), else None."""
    return params[0].device_mesh if params and _is_dtensor(params[0]) else None


def mesh_mean(value: torch.Tensor, mesh: Any) -> torch.Tensor:
    """The mean of the 0-d `value` over all ranks of `mesh` (a fresh tensor; the input is untouched)."""
    import torch.distributed as dist

    out = value.detach().clone()
    _all_reduce(out, mesh, range(mesh.ndim), dist.ReduceOp.SUM)
    return out / mesh.size()


class TorchForeachOps(ArrayOps):
    """:class:`gradnorm.ArrayOps` on fused ``torch._foreach_*`` kernels.

    Pass it to a rule as ``rule.update(params, state, oracle, ops=TorchForeachOps())``; the
    PyTorch adapters (``gradnorm.torch.Optimizer``, ``gradnorm.torch.step``) do. `xp` is
    the ``array_api_compat.torch`` namespace, as for `ArrayOps` on torch tensors.

    Differences from `ArrayOps` are rounding only: ``axpy`` with a Python number is one fused
    multiply-add (``_foreach_add(y, x, alpha=s)``), and the reductions sum in another order
    (``vdot`` of two different lists is ``2 sum(max(p, 0)) - sum(|p|)`` over the products
    ``p``, since PyTorch has no fused signed sum; its error bound is of the same order as a
    plain sum's, a few units in the last place of ``sum(|p|)``). ``sign`` returns nan for nan
    as the Array API (and ``array_api_compat.torch.sign``, with a per-leaf boolean-mask write)
    does, although ``torch.sign(nan)`` is 0. Empty lists give empty lists and 0-d float32 zeros.
    Lists of DTensors (FSDP2) are computed on their local shards, with global reductions.

    ``in_place=True`` (the PyTorch adapters' setting, whose oracles return fresh gradient tensors
    that nothing else holds) makes the ``*_into`` methods (`ArrayOps.axpy_into` and the like)
    compute in the buffers of their ``out`` list: a rule's combination of gradients it reads no
    more costs no new parameter-sized buffer. Their values are those of the out-of-place methods,
    bit for bit where the same arithmetic runs in the same order (``add``, ``sub``, ``mul``,
    ``scale``, ``add_scalar``; ``axpy`` into ``x`` with a tensor or `PerLeaf` scalar, into ``y`` with
    a number; ``lincomb`` into ``x`` with numbers; tested in every dtype) and otherwise within one
    rounding (a fused multiply-add where the out-of-place kernel rounds twice, or the reverse). A
    list of DTensors, or one holding a tensor that requires grad or of another dtype than the
    leaves it is combined with, is computed out of place. The default, False, never writes into an
    argument but ``axpy_``'s.
    """

    def __init__(self, *, in_place: bool = False) -> None:
        super().__init__(_XP)
        if not isinstance(in_place, bool):
            raise TypeError(f"`in_place` must be True or False. Received: {in_place!r}.")
        self.in_place = in_place
        self._ones: dict[torch.device, torch.Tensor] = {}  # the unscale factor 1 of `all_finite`, per device

    # -- plumbing -------------------------------------------------------------------------
    @staticmethod
    def _map(fn: Callable[..., Sequence[torch.Tensor]], lists: tuple[Leaves, ...], scalars: tuple[Scalar, ...] = ()) -> Leaves:
        """`fn(*lists, *scalars)` on each dtype group of `lists[0]`, in the original order. DTensor
        lists: on the local shards, the results wrapped as DTensors laid out as `lists[0]`."""
        x = lists[0]
        if not x:
            return []
        if _is_dtensor(x[0]):
            local, refs = _local_lists(lists)
            out = TorchForeachOps._map(fn, tuple(local), tuple(_local_scalar(s) for s in scalars))
            return [_wrap(o, r) for o, r in zip(out, refs)]
        groups = _groups(x)
        if groups is None:
            return list(fn(*lists, *[_like(s, x[0]) for s in scalars]))
        out: list[Any] = [None] * len(x)
        for idx in groups:
            parts = [[leaves[i] for i in idx] for leaves in lists]
            first = parts[0][0]
            group_scalars = [_like(s.take(idx) if isinstance(s, PerLeaf) else s, first) for s in scalars]
            for i, result in zip(idx, fn(*parts, *group_scalars)):
                out[i] = result
        return out

    @staticmethod
    def _reduce(fn: Callable[..., Sequence[torch.Tensor]], lists: tuple[Leaves, ...]) -> list[torch.Tensor]:
        """The 0-d partials `fn(*lists, acc)` returns for each dtype group of `lists[0]`, where
        `acc` is the accumulation dtype of the whole list (float64 if any leaf is float64)."""
        x = lists[0]
        groups = _groups(x)
        if groups is None:
            return list(fn(*lists, torch.float64 if x[0].dtype is torch.float64 else torch.float32))
        acc = torch.float64 if any(x[idx[0]].dtype is torch.float64 for idx in groups) else torch.float32
        partials: list[torch.Tensor] = []
        for idx in groups:
            partials.extend(fn(*[[leaves[i] for i in idx] for leaves in lists], acc))
        return partials

    @staticmethod
    def _over_shards(fn: Callable[..., torch.Tensor], lists: tuple[Leaves, ...], op: str = "sum") -> torch.Tensor:
        """A reduction of DTensor lists: `fn` (a reduction of plain lists to a 0-d tensor, summable
        over shards, or with ``op="max"`` over which the max is taken) on the local shards of each
        group of leaves sharded alike, all-reduced over the mesh dimensions they are sharded on;
        the groups' values combined. The same 0-d plain tensor on every rank."""
        import torch.distributed as dist

        local, refs = _local_lists(lists)
        groups = _shard_groups(refs)
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        total: torch.Tensor | None = None
        for mesh, dims, idx in groups:
            if len(groups) == 1:
                parts = local
            else:
                parts = []
                for k, leaves in enumerate(local):  # keep a list given twice one list (x is y)
                    same = next((j for j in range(k) if local[j] is leaves), None)
                    parts.append(parts[same] if same is not None else [leaves[i] for i in idx])
            value = fn(*parts)
            if dims:
                value = _all_reduce(value.clone(), mesh, dims, reduce_op)
            total = value if total is None else (torch.maximum(total, value) if op == "max" else total + value)
        assert total is not None
        return total

    @staticmethod
    def _zero() -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32)

    # -- elementwise ---------------------------------------------------------------------
    def add(self, x: Leaves, y: Leaves) -> Leaves:
        return self._map(torch._foreach_add, (x, y))

    def sub(self, x: Leaves, y: Leaves) -> Leaves:
        return self._map(torch._foreach_sub, (x, y))

    def scale(self, s: Scalar, x: Leaves) -> Leaves:
        return self._map(_scaled, (x,), (s,))

    def axpy(self, s: Scalar, x: Leaves, y: Leaves) -> Leaves:
        """`s * x + y`."""
        return self._map(_axpy, (x, y), (s,))

    def lincomb(self, a: Scalar, x: Leaves, b: Scalar, y: Leaves) -> Leaves:
        """`a * x + b * y`."""
        return self._map(_lincomb, (x, y), (a, b))

    def mul(self, x: Leaves, y: Leaves) -> Leaves:
        return self._map(torch._foreach_mul, (x, y))

    def axpy_(self, s: Scalar, x: Leaves, y: Leaves) -> None:
        """`y += s * x` in place: the one mutating method, for buffers the caller owns (the
        optimizer forms an evaluation point in its weights this way, without a temporary)."""
        if y and _is_dtensor(y[0]):  # on y's own shards, x laid out as y
            local_y, local_x = _writable_locals(y, x)
            self._map(_axpy_inplace, (local_x, local_y), (_local_scalar(s),))
            return
        self._map(_axpy_inplace, (x, y), (s,))

    def abs(self, x: Leaves) -> Leaves:
        return self._map(torch._foreach_abs, (x,))

    # -- results in a buffer the caller gives up (`ArrayOps.*_into`) -------------------------
    def _writes(self, out: Leaves, *others: Leaves) -> bool:
        """Whether to compute in the tensors of `out`: `in_place`, and they are plain tensors that
        need no grad, with the dtypes of the leaves they are combined with (no promotion). DTensor
        lists (FSDP2) take the out-of-place path."""
        if not self.in_place or not out or _is_dtensor(out[0]):
            return False
        for t in out:
            if t.requires_grad:
                return False
        for other in others:
            if other is not out and any(a.dtype is not b.dtype for a, b in zip(out, other)):
                return False
        return True

    def add_into(self, x: Leaves, y: Leaves, *, out: Leaves) -> Leaves:
        _check_out(out, x, y)
        if not self._writes(out, x, y):
            return self.add(x, y)
        return self._map(_add_into_x, (x, y) if out is x else (y, x))

    def sub_into(self, x: Leaves, y: Leaves, *, out: Leaves) -> Leaves:
        _check_out(out, x, y)
        if not self._writes(out, x, y):
            return self.sub(x, y)
        return self._map(_sub_into_x if out is x else _sub_into_y, (x, y))

    def mul_into(self, x: Leaves, y: Leaves, *, out: Leaves) -> Leaves:
        _check_out(out, x, y)
        if not self._writes(out, x, y):
            return self.mul(x, y)
        return self._map(_mul_into_x, (x, y) if out is x else (y, x))

    def scale_into(self, s: Scalar, x: Leaves, *, out: Leaves) -> Leaves:
        _check_out(out, x)
        if not self._writes(out):
            return self.scale(s, x)
        return self._map(_scale_, (x,), (s,))

    def axpy_into(self, s: Scalar, x: Leaves, y: Leaves, *, out: Leaves) -> Leaves:
        _check_out(out, x, y)
        if not self._writes(out, x, y):
            return self.axpy(s, x, y)
        return self._map(_axpy_into_x if out is x else _axpy_into_y, (x, y), (s,))

    def lincomb_into(self, a: Scalar, x: Leaves, b: Scalar, y: Leaves, *, out: Leaves) -> Leaves:
        _check_out(out, x, y)
        if not self._writes(out, x, y):
            return self.lincomb(a, x, b, y)
        return self._map(_lincomb_into_x if out is x else _lincomb_into_y, (x, y), (a, b))

    def add_scalar_into(self, x: Leaves, s: Scalar, *, out: Leaves) -> Leaves:
        _check_out(out, x)
        if not self._writes(out):
            return self.add_scalar(x, s)
        return self._map(_add_scalar_, (x,), (s,))

    def sign(self, x: Leaves) -> Leaves:
        return self._map(_sign, (x,))

    def add_scalar(self, x: Leaves, s: Scalar) -> Leaves:
        return self._map(_add_scalar, (x,), (s,))

    # -- reductions (0-d results in the accumulation dtype) -------------------------------
    def vdot(self, x: Leaves, y: Leaves) -> Any:
        if not x:
            return self._zero()
        if x is y:
            return self._sum_of_squares(x)
        if _is_dtensor(x[0]):
            return self._over_shards(self.vdot, (x, y))
        if x[0].device.type == "cpu" and not _compiling():
            return _dot_per_leaf(x, y)

        def parts(u: Leaves, v: Leaves, acc: torch.dtype) -> list[torch.Tensor]:
            total: list[torch.Tensor] = []
            positive: list[torch.Tensor] = []
            for i, j in _chunks(u):  # the products are a temporary: chunks of leaves bound it
                if u[0].dtype is acc:
                    products = torch._foreach_mul(u[i:j], v[i:j])
                else:  # multiply in the accumulation dtype, as ArrayOps does
                    products = _cast(u[i:j], acc)
                    torch._foreach_mul_(products, _cast(v[i:j], acc))
                total.extend(_l1(products, acc))  # sum |p|
                torch._foreach_clamp_min_(products, 0.0)
                positive.extend(_l1(products, acc))  # sum max(p, 0)
                del products
            return [2 * torch.stack(positive).sum() - torch.stack(total).sum()]

        partials = self._reduce(parts, (x, y))
        return partials[0] if len(partials) == 1 else torch.stack(partials).sum()

    def _sum_of_squares(self, x: Leaves) -> torch.Tensor:
        if _is_dtensor(x[0]):
            return self._over_shards(self._sum_of_squares, (x,))
        partials = self._reduce(_sumsq, (x,))
        return torch.stack(partials).sum()

    def norm(self, x: Leaves) -> Any:
        """Global L2 norm over all leaves."""
        if not x:
            return self._zero()
        return torch.sqrt(self._sum_of_squares(x))

    def fraction_below(self, x: Leaves, tol: Any) -> Any:
        """`ArrayOps.fraction_below` with few dispatches: the leaves of each dtype are concatenated
        (in chunks of the temporary budget) and counted in one pass, instead of three small
        operations per leaf (on a CPU, 0.28 against 0.64 ms for 82 leaves of 4096 entries)."""
        if not x or _is_dtensor(x[0]) or _compiling():
            return super().fraction_below(x, tol)
        with torch.no_grad():  # a count: nothing to differentiate (parameters require grad)
            return self._fraction_below(x, tol)

    def _fraction_below(self, x: Leaves, tol: Any) -> torch.Tensor:
        groups = _groups(x) or [list(range(len(x)))]
        count: torch.Tensor | None = None
        for idx in groups:
            leaves = [x[i] for i in idx]
            t = tol if isinstance(tol, (int, float)) else tol.to(leaves[0].dtype)
            for i, j in _chunks(leaves):
                if j - i > 1:  # a new buffer: its absolute values in place
                    magnitude = torch.cat([a.reshape(-1) for a in leaves[i:j]]).abs_()
                else:
                    magnitude = leaves[i].abs()
                part = torch.count_nonzero(magnitude < t)
                count = part if count is None else count + part
        size = sum(a.numel() for a in x)
        return count.to(self.acc_dtype(x)) / max(size, 1)

    def all_finite(self, x: Leaves) -> Any:
        """Whether every entry is finite, in one fused pass per dtype: PyTorch's own inf/nan check
        for gradient lists (the kernel `GradScaler.unscale_` runs), with an unscale factor of
        exactly 1, so each entry is written back unchanged. Lists holding a tensor that requires
        grad, which must not be written, take the per-leaf `ArrayOps` check."""
        if not x:
            return torch.ones((), dtype=torch.bool)
        if _is_dtensor(x[0]):  # non-finite anywhere, on any rank's shard: False on every rank
            check = super().all_finite if any(a.requires_grad for a in x) else self.all_finite
            return self._over_shards(lambda part: (~check(part)).to(torch.float32), (x,), "max") == 0
        if any(a.requires_grad for a in x):
            return super().all_finite(x)
        device = x[0].device
        one = self._ones.get(device) if not _compiling() else None  # traced: a constant, no guard on the cache
        if one is None:
            one = torch.ones((), dtype=torch.float32, device=device)
            if not _compiling():
                self._ones[device] = one
        found = torch.zeros(1, dtype=torch.float32, device=device)
        groups = _groups(x)
        with torch.no_grad():
            for part in [x] if groups is None else [[x[i] for i in idx] for idx in groups]:
                torch._amp_foreach_non_finite_check_and_unscale_(part, found, one)
        return found.view(()) == 0
