"""Leaf-list arithmetic on PyTorch's fused multi-tensor kernels (``torch._foreach_*``).

:class:`TorchForeachOps` has the interface of :class:`gradnorm.ArrayOps` and gives the same
results up to rounding (the conformance suite runs the rules through it), with one kernel
launch per operation for the whole parameter list instead of one per leaf. It never mutates an
input (in-place ``_foreach_*_`` kernels only touch freshly allocated outputs) and never reads a
tensor back to the host: a scalar that is a 0-d tensor stays on the device.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import torch

from .._tree import ArrayOps

__all__ = ["TorchForeachOps"]

Leaves = list[torch.Tensor]


class TorchForeachOps(ArrayOps):
    """:class:`gradnorm.ArrayOps` on ``torch._foreach_*`` kernels."""

    def __init__(self) -> None:
        super().__init__(array_api_compat.array_namespace(torch.empty(0)))

    # A 0-d tensor scalar is cast to each leaf's dtype; leaves of one dtype share one cast.
    def _scalars(self, s: Any, x: Leaves) -> Any:
        if isinstance(s, (int, float)):
            return s
        if all(leaf.dtype == s.dtype for leaf in x):
            return s
        cache: dict[torch.dtype, torch.Tensor] = {}
        return [cache.setdefault(leaf.dtype, s.to(leaf.dtype)) for leaf in x]

    def _mul_scalar(self, s: Any, x: Leaves) -> Leaves:
        return list(torch._foreach_mul(x, self._scalars(s, x)))  # a scalar, or one 0-d tensor per leaf

    def add(self, x: Leaves, y: Leaves) -> Leaves:
        return list(torch._foreach_add(x, y))

    def sub(self, x: Leaves, y: Leaves) -> Leaves:
        return list(torch._foreach_sub(x, y))

    def scale(self, s: Any, x: Leaves) -> Leaves:
        return self._mul_scalar(s, x)

    def axpy(self, s: Any, x: Leaves, y: Leaves) -> Leaves:
        if isinstance(s, (int, float)):
            return list(torch._foreach_add(y, x, alpha=s))
        out = self._mul_scalar(s, x)
        torch._foreach_add_(out, y)
        return list(out)

    def lincomb(self, a: Any, x: Leaves, b: Any, y: Leaves) -> Leaves:
        out = self._mul_scalar(a, x)
        if isinstance(b, (int, float)):
            torch._foreach_add_(out, y, alpha=b)
        else:
            torch._foreach_add_(out, self._mul_scalar(b, y))
        return list(out)

    def mul(self, x: Leaves, y: Leaves) -> Leaves:
        return list(torch._foreach_mul(x, y))

    def abs(self, x: Leaves) -> Leaves:
        return list(torch._foreach_abs(x))

    def sign(self, x: Leaves) -> Leaves:
        return list(torch._foreach_sign(x))

    def add_scalar(self, x: Leaves, s: Any) -> Leaves:
        s = self._scalars(s, x)
        if isinstance(s, (int, float)):
            return list(torch._foreach_add(x, s))
        if not isinstance(s, list):
            s = [s] * len(x)
        return [leaf + t for leaf, t in zip(x, s)]

    def vdot(self, x: Leaves, y: Leaves) -> Any:
        acc = self._acc_dtype(x)
        if x is y:
            norms = torch._foreach_norm([self._acc(a, acc) for a in x])
            return torch.stack(norms).square().sum()
        products = torch._foreach_mul([self._acc(a, acc) for a in x], [self._acc(b, acc) for b in y])
        return torch.stack([p.sum() for p in products]).sum()

    def norm(self, x: Leaves) -> Any:
        acc = self._acc_dtype(x)
        norms = torch._foreach_norm([self._acc(a, acc) for a in x])
        return torch.linalg.vector_norm(torch.stack(norms))
