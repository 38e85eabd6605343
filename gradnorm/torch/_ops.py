"""Leaf-list arithmetic on PyTorch's fused multi-tensor kernels (``torch._foreach_*``).

:class:`TorchForeachOps` has the interface of :class:`gradnorm.ArrayOps` and gives the same
results up to rounding (the conformance suite and ``tests/test_torch_ops.py`` run the rules
through it), with one kernel launch per operation for the whole parameter list instead of one
per leaf.

Contract (the same as `ArrayOps`):

* Inputs are never mutated. The in-place kernels (``torch._foreach_*_``) only ever touch lists
  this module has just allocated.
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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import torch

from .._tree import ArrayOps, PerLeaf

__all__ = ["TorchForeachOps"]

Leaves = list[torch.Tensor]
Scalar = Any  # a Python number, a 0-d tensor, or a PerLeaf of those


# --------------------------------------------------------------------------------------
# per-leaf sums, accumulated in a given dtype


def _l1(x: Sequence[torch.Tensor], dtype: torch.dtype) -> Sequence[torch.Tensor]:
    """`[sum(|a|) for a in x]` (the L1 norms; faster than ``_foreach_powsum(x, 1)`` on CPU)."""
    return torch._foreach_norm(x, 1, dtype=dtype)


def _sumsq_fused(x: Sequence[torch.Tensor], dtype: torch.dtype) -> Sequence[torch.Tensor]:
    """`[sum(a^2) for a in x]` without a square root (``_foreach_powsum``, newer PyTorch)."""
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
    factor so, and its values all Python numbers or all tensors so."""
    if isinstance(s, PerLeaf):
        values = s.values
        if any(isinstance(v, torch.Tensor) for v in values):
            values = tuple(_like(torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v, leaf) for v in values)
        return PerLeaf._make(values, _like(s.factor, leaf))
    if not isinstance(s, torch.Tensor):
        return s
    if s.dtype is not leaf.dtype:
        s = s.to(leaf.dtype)
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


def _axpy_inplace(x: Leaves, y: Leaves, s: Scalar) -> Sequence[torch.Tensor]:
    if isinstance(s, PerLeaf):
        torch._foreach_add_(y, _scaled(x, s))
    elif not isinstance(s, torch.Tensor):
        torch._foreach_add_(y, x, alpha=s)
    elif y[0].device.type == "cpu":
        # CPU foreach kernels loop over the tensors anyway: addcmul with the 0-d factor
        # broadcast saves the temporary that mul + add would allocate.
        torch._foreach_addcmul_(y, x, [s] * len(x))
    else:  # two fused kernels (a list of 0-d factors would leave the fused CUDA path)
        torch._foreach_add_(y, torch._foreach_mul(x, s))
    return y


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


def _count_below(x: Leaves, tol: Scalar, dtype: torch.dtype) -> list[torch.Tensor]:
    """Per leaf, the number of entries with `|a| < tol`, as `dtype`.

    sign(|a| - tol) is -1 exactly where |a| < tol (a floating-point difference is zero only
    for equal operands and keeps the sign), 0 for nan (torch.sign(nan) == 0, and nan < tol is
    False), so after clamping at 0 the L1 sum counts the entries below.
    """
    work = torch._foreach_abs(x)
    if isinstance(tol, torch.Tensor):
        torch._foreach_add_(work, tol, alpha=-1)
    else:
        torch._foreach_sub_(work, tol)
    torch._foreach_sign_(work)
    torch._foreach_clamp_max_(work, 0.0)
    return _l1(work, dtype)


def _cast(x: Leaves, dtype: torch.dtype) -> Leaves:
    """Fresh copies of `x` in `dtype` (one fused copy kernel)."""
    out = [torch.empty_like(a, dtype=dtype) for a in x]
    torch._foreach_copy_(out, x)
    return out


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
    """

    def __init__(self) -> None:
        super().__init__(array_api_compat.array_namespace(torch.empty(0)))
        self._ones: dict[torch.device, torch.Tensor] = {}  # the unscale factor 1 of `all_finite`, per device

    # -- plumbing -------------------------------------------------------------------------
    @staticmethod
    def _map(fn: Callable[..., Sequence[torch.Tensor]], lists: tuple[Leaves, ...], scalars: tuple[Scalar, ...] = ()) -> Leaves:
        """`fn(*lists, *scalars)` on each dtype group of `lists[0]`, in the original order."""
        x = lists[0]
        if not x:
            return []
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
        self._map(_axpy_inplace, (x, y), (s,))

    def abs(self, x: Leaves) -> Leaves:
        return self._map(torch._foreach_abs, (x,))

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

        def parts(u: Leaves, v: Leaves, acc: torch.dtype) -> list[torch.Tensor]:
            if u[0].dtype is acc:
                products = torch._foreach_mul(u, v)
            else:  # multiply in the accumulation dtype, as ArrayOps does
                products = _cast(u, acc)
                torch._foreach_mul_(products, _cast(v, acc))
            total = _l1(products, acc)  # sum |p|
            torch._foreach_clamp_min_(products, 0.0)
            positive = _l1(products, acc)  # sum max(p, 0)
            return [2 * torch.stack(positive).sum() - torch.stack(total).sum()]

        partials = self._reduce(parts, (x, y))
        return partials[0] if len(partials) == 1 else torch.stack(partials).sum()

    def _sum_of_squares(self, x: Leaves) -> torch.Tensor:
        partials = self._reduce(_sumsq, (x,))
        return torch.stack(partials).sum()

    def norm(self, x: Leaves) -> Any:
        """Global L2 norm over all leaves."""
        if not x:
            return self._zero()
        return torch.sqrt(self._sum_of_squares(x))

    def weighted_norm(self, w: Leaves, x: Leaves) -> Any:
        """`|| w * x ||` (the product in the leaves' dtype, as `ArrayOps`)."""
        return self.norm(self.mul(w, x))

    def all_finite(self, x: Leaves) -> Any:
        """Whether every entry is finite, in one fused pass per dtype: PyTorch's own inf/nan check
        for gradient lists (the kernel `GradScaler.unscale_` runs), with an unscale factor of
        exactly 1, so each entry is written back unchanged. Lists holding a tensor that requires
        grad, which must not be written, take the per-leaf `ArrayOps` check."""
        if not x:
            return torch.ones((), dtype=torch.bool)
        if any(a.requires_grad for a in x):
            return super().all_finite(x)
        device = x[0].device
        one = self._ones.get(device)
        if one is None:
            one = self._ones[device] = torch.ones((), dtype=torch.float32, device=device)
        found = torch.zeros(1, dtype=torch.float32, device=device)
        groups = _groups(x)
        with torch.no_grad():
            for part in [x] if groups is None else [[x[i] for i in idx] for idx in groups]:
                torch._amp_foreach_non_finite_check_and_unscale_(part, found, one)
        return found.view(()) == 0

    def count_below(self, x: Leaves, tol: float) -> Any:
        """Fraction of all entries with `|x| < tol` (0-d, accumulation dtype)."""
        if not x:
            return self._zero()
        partials = self._reduce(lambda u, acc: _count_below(u, _like(tol, u[0]), acc), (x,))
        total = sum(leaf.numel() for leaf in x)
        return torch.stack(partials).sum() / max(total, 1)
