"""Pytrees and the leaf-list arithmetic the rules are written in.

Rules never walk a pytree themselves. `flatten` turns a parameter tree into a list of
leaves once per step, the rule does its math on lists of leaves with an `ArrayOps`
object, and the result is unflattened once. Working on flat lists keeps the per-operation
Python overhead small and is exactly the shape that fused multi-tensor kernels (for example
PyTorch's `torch._foreach_*`) want, so an adapter can swap in a faster `ArrayOps` subclass
without touching any rule. The conformance suite checks that such a swap keeps the trajectory.

Pytrees are handled by [optree](https://github.com/metaopt/optree) (`None` is an empty
node, as in JAX). Arithmetic uses only the Python Array API standard through the namespace
of the leaves (`array_api_compat.array_namespace`), never a framework's own API, and never
mutates an input: every operation returns new arrays (the `*_into` variants may write into a list
the caller gives up, where the backend has mutable arrays: see `ArrayOps`). Which arrays qualify and which namespace
they get is decided in `gradnorm._backend` (re-exported here: `is_array`, `array_namespace`,
`namespace_of`); TensorFlow, which array-api-compat does not cover, gets gradnorm's own small
namespace there (`gradnorm._compat.tensorflow`), without importing the TensorFlow adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import itertools
import math
import numbers
import operator
import sys

import optree

from ._backend import array_namespace, is_array, namespace_of, placement, traced_cond  # re-exported: the core calls _tree.<name>
from ._errors import describe

__all__ = ["ArrayOps", "PerLeaf", "flatten", "unflatten", "tree_structure", "namespace_of", "is_array", "array_namespace"]

Leaves = list[Any]
Scalar = Any  # a Python float or a 0-d array


def flatten(tree: Any) -> tuple[Leaves, Any]:
    """Leaves of `tree` in a fixed order, and its tree structure."""
    leaves, treedef = optree.tree_flatten(tree)
    return leaves, treedef


def unflatten(treedef: Any, leaves: Sequence[Any]) -> Any:
    """The tree of structure `treedef` holding `leaves`."""
    return optree.tree_unflatten(treedef, list(leaves))


def tree_structure(tree: Any) -> Any:
    return optree.tree_structure(tree)


def _is_one(x: Any) -> bool:
    return isinstance(x, numbers.Number) and x == 1


class PerLeaf:
    r"""A scalar with one value per leaf of the parameter tree: a hyperparameter that differs
    between parameters, as a perturbation radius or a regularization strength per PyTorch
    parameter group (`gradnorm.torch.Optimizer` builds one from its groups).

    `PerLeaf(values)` takes a tree of numbers (or 0-d arrays) with the structure of the
    parameters, or a flat sequence in the parameters' leaf order (optree's, as `jax.tree`'s)::

        gradnorm.step(params, grad_fn, rule="sam", rho=gradnorm.PerLeaf({"w": 0.1, "b": 0.0}))

    Arithmetic with an ordinary scalar `s` acts on every leaf's value (`rho / (norm + eps)` is
    leaf i's `rho_i / (norm + eps)`), and `ArrayOps` applies leaf i's value to leaf i. Norms stay
    global over all leaves (as in davda54/sam and pytorch-optimizer, whose groups scale one
    global-norm perturbation). Only hyperparameters a rule declares `leafwise` accept one.

    The value of leaf i is kept as `values[i] * factor`, so that multiplying or dividing by a 0-d
    array (`rho / (||g|| + eps)`) is one operation, not one per leaf.
    """

    __slots__ = ("values", "factor", "treedef")

    def __init__(self, values: Any):
        leaves, treedef = optree.tree_flatten(values)
        if not leaves:
            raise ValueError(f"`values` of PerLeaf must hold at least one value. Received: {describe(values)}.")
        object.__setattr__(self, "values", tuple(leaves))
        object.__setattr__(self, "factor", 1.0)
        object.__setattr__(self, "treedef", treedef)

    @classmethod
    def _make(cls, values: tuple[Any, ...], factor: Any = 1.0) -> PerLeaf:
        """A derived PerLeaf (leaf order already fixed; no tree structure to check)."""
        out = object.__new__(cls)
        object.__setattr__(out, "values", values)
        object.__setattr__(out, "factor", factor)
        object.__setattr__(out, "treedef", None)
        return out

    def matches(self, treedef: Any, n: int) -> bool:
        """Whether the values fit a parameter tree of structure `treedef` with `n` leaves: the same
        structure, or a flat list or tuple of `n` values (or a derived PerLeaf of length `n`)."""
        if len(self.values) != n:
            return False
        if self.treedef is None or self.treedef == treedef:
            return True
        return self.treedef.num_nodes == n + 1 and self.treedef.kind in (optree.PyTreeKind.LIST, optree.PyTreeKind.TUPLE)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("PerLeaf is immutable")

    def __reduce__(self) -> Any:
        # pickle and deepcopy without __setattr__ (immutable)
        return (_restore_per_leaf, (self.values, self.factor, self.treedef))

    def __len__(self) -> int:
        return len(self.values)

    def leaf_values(self) -> list[Any]:
        """The value of every leaf (`values[i] * factor`)."""
        if _is_one(self.factor):
            return list(self.values)
        return [v * self.factor for v in self.values]

    def take(self, index: Sequence[int]) -> PerLeaf:
        """The values of the leaves at `index` (a dtype group of a leaf list)."""
        return PerLeaf._make(tuple(self.values[i] for i in index), self.factor)

    def map_values(self, fn: Any) -> PerLeaf:
        return PerLeaf._make(tuple(fn(v) for v in self.leaf_values()))

    def _combine(self, other: Any, op: Any) -> PerLeaf:
        if isinstance(other, PerLeaf):
            if len(other) != len(self):
                raise ValueError(f"PerLeaf values of different lengths: {len(self)} and {len(other)}.")
            pairs = zip(self.leaf_values(), other.leaf_values())
            return PerLeaf._make(tuple(op(a, b) for a, b in pairs))
        return self.map_values(lambda v: op(v, other))

    def __mul__(self, other: Any) -> PerLeaf:
        if isinstance(other, PerLeaf):
            return self._combine(other, operator.mul)
        return PerLeaf._make(self.values, other if _is_one(self.factor) else self.factor * other)

    def __rmul__(self, other: Any) -> PerLeaf:
        return PerLeaf._make(self.values, other if _is_one(self.factor) else other * self.factor)

    def __truediv__(self, other: Any) -> PerLeaf:
        if isinstance(other, PerLeaf):
            return self._combine(other, operator.truediv)
        return self * (1.0 / other)

    def __rtruediv__(self, other: Any) -> PerLeaf:
        return self.map_values(lambda v: other / v)

    def __add__(self, other: Any) -> PerLeaf:
        return self._combine(other, operator.add)

    def __radd__(self, other: Any) -> PerLeaf:
        return self.map_values(lambda v: other + v)

    def __sub__(self, other: Any) -> PerLeaf:
        return self._combine(other, operator.sub)

    def __rsub__(self, other: Any) -> PerLeaf:
        return self.map_values(lambda v: other - v)

    def __neg__(self) -> PerLeaf:
        return PerLeaf._make(self.values, -self.factor)

    def _key(self) -> Any:
        return (self.values, self.factor)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PerLeaf):
            return NotImplemented
        plain = all(isinstance(v, (int, float)) for v in (*self.values, *other.values, self.factor, other.factor))
        return self is other or (plain and self._key() == other._key())

    def __hash__(self) -> int:
        try:
            return hash(self._key())
        except TypeError:
            return id(self)

    def __repr__(self) -> str:
        if _is_one(self.factor):
            return f"PerLeaf({list(self.values)!r})"
        return f"PerLeaf({list(self.values)!r}, factor={self.factor!r})"


def _restore_per_leaf(values: tuple[Any, ...], factor: Any, treedef: Any) -> PerLeaf:
    out = PerLeaf._make(values, factor)
    object.__setattr__(out, "treedef", treedef)
    return out


def per_leaf(s: Any, n: int) -> Any:
    """An iterable of the scalar each of `n` leaves gets from `s` (a PerLeaf or one scalar)."""
    if isinstance(s, PerLeaf):
        return s.leaf_values()
    return itertools.repeat(s, n)


_UNSET: Any = object()
_BOUNDS: dict[Any, float | None] = {}  # (namespace, scalar dtype or float, leaf dtype) -> saturation bound or None


def finite_max(xp: Any, dtype: Any) -> float:
    """The largest finite value of the floating-point `dtype` (``xp.finfo``; a TensorFlow ``DType``,
    whose namespace has no ``finfo``, knows it itself)."""
    finfo = getattr(xp, "finfo", None)
    return float(finfo(dtype).max) if finfo is not None else float(dtype.max)


def saturation_bound(xp: Any, src: Any, dst: Any) -> float | None:
    """The largest finite value of `dst` if a floating scalar of dtype `src` (``float`` for a Python
    number) can exceed it, else None: where casting a scalar to a leaf's dtype narrows the range.

    `ArrayOps` clips a scalar to ``[-bound, bound]`` before it casts it, so that a scalar too large
    for the leaf dtype saturates at the largest finite value instead of becoming ``inf``
    (``rho / (||g|| + 1e-12)`` at a zero gradient is 5e10, ``inf`` in float16, and ``inf * 0``
    is NaN). Only narrowing casts pay: float64 to float32, float32 to float16 or bfloat16. Cached
    per dtype pair."""
    key = (xp, src, dst)  # the namespace first: dtypes of different libraries are never compared
    try:
        bound = _BOUNDS.get(key, _UNSET)
    except TypeError:  # an unhashable dtype: not cached
        key, bound = None, _UNSET
    if bound is _UNSET:
        bound = None
        try:
            if xp.isdtype(dst, "real floating") and (src is float or xp.isdtype(src, "real floating")):
                top_src = sys.float_info.max if src is float else finite_max(xp, src)
                top_dst = finite_max(xp, dst)
                bound = top_dst if top_src > top_dst else None
        except (TypeError, ValueError, AttributeError):  # not a floating dtype of `xp`: nothing to clip
            bound = None
        if key is not None:
            _BOUNDS[key] = bound
    return bound


def saturate_number(s: Any, bound: float | None) -> Any:
    """The Python number `s` clipped to ``[-bound, bound]`` (NaN is kept)."""
    if bound is not None and abs(s) > bound:
        return math.copysign(bound, s)
    return s


class ArrayOps:
    """Leaf-list arithmetic through one Array API namespace `xp`.

    Scalars may be Python numbers, 0-d arrays, or `PerLeaf` (one of those per leaf; the
    elementwise operations take them, reductions stay global). A 0-d array scalar is cast to each leaf's
    dtype before it multiplies the leaf, so a float32 tree stays float32 even when a norm was
    accumulated in float64, and bf16/fp16 trees stay in their dtype. Reductions (`vdot`,
    `norm`) accumulate in float32 at least (float64 if any leaf is float64), so a half
    precision tree does not overflow its norm.

    A scalar saturates at the leaf dtype's largest finite value: where the cast to the leaf's
    dtype narrows the range (a float32 scalar and a float16 or bfloat16 leaf, a float64 scalar and
    a float32 leaf, a Python number and anything but float64), the scalar is clipped to that
    dtype's finite range first (`saturation_bound`). So a scalar that is finite where it was
    computed never becomes ``inf`` in the leaf's dtype, and ``s * 0`` stays 0: at a zero gradient,
    ``rho / (||g|| + norm_eps)`` is 5e10 in float32 and 65504 in a float16 leaf, not ``inf``
    (whose product with the zero gradient would be NaN). NaN stays NaN. Values inside the range,
    and every cast that does not narrow (float32 scalars with float32 leaves, anything with float64
    leaves), are unchanged bit for bit.

    Memory: every method returns new arrays and never writes into an input. A rule that combines
    parameter-sized lists it owns and reads no more (an oracle's gradients, an earlier result) calls
    the `*_into` variants (`axpy_into(s, x, y, out=y)`), which an adapter's ops with mutable arrays
    and `in_place` computes in the arrays of `out`, without a new parameter-sized buffer; here they
    are the out-of-place operations, so JAX and every other immutable backend keep the pure
    semantics.
    """

    #: Whether the `*_into` methods write their result into the arrays of `out`. Never for
    #: `ArrayOps`: the arrays of an Array API namespace may be immutable (JAX), so its `*_into`
    #: methods return new arrays, as the plain methods do. `TorchForeachOps(in_place=True)` writes.
    in_place: bool = False

    def __init__(self, xp: Any):
        self.xp = xp

    # -- scalars -------------------------------------------------------------------------
    def _cast(self, s: Scalar, leaf: Any) -> Scalar:
        # type(), not isinstance: a NumPy float64 scalar (the result of arithmetic on 0-d NumPy
        # arrays) is a Python float subclass but has a dtype, which NumPy would promote with
        if type(s) is float or type(s) is int:
            return saturate_number(s, saturation_bound(self.xp, float, leaf.dtype))
        dtype = s.dtype
        if dtype == leaf.dtype:
            return s
        bound = saturation_bound(self.xp, dtype, leaf.dtype)
        if bound is not None:
            s = self.xp.clip(s, -bound, bound)
        return self.xp.astype(s, leaf.dtype)

    def acc_dtype(self, leaves: Leaves) -> Any:
        """The accumulation dtype of reductions over `leaves`: float64 if any leaf is, else float32."""
        return self._acc_dtype(leaves)

    def _acc_dtype(self, leaves: Leaves) -> Any:
        xp = self.xp
        if any(leaf.dtype == xp.float64 for leaf in leaves):
            return xp.float64
        return xp.float32

    def _acc(self, leaf: Any, dtype: Any) -> Any:
        return leaf if leaf.dtype == dtype else self.xp.astype(leaf, dtype)

    def scalar(self, value: float, like: Leaves) -> Any:
        """A 0-d array of the accumulation dtype on the device of `like`."""
        xp = self.xp
        # full, not asarray: a Python number copied to a GPU would synchronize with the host
        return xp.full((), value, dtype=self._acc_dtype(like), device=placement(like[0]))

    # -- elementwise ---------------------------------------------------------------------
    def add(self, x: Leaves, y: Leaves) -> Leaves:
        return [a + b for a, b in zip(x, y)]

    def sub(self, x: Leaves, y: Leaves) -> Leaves:
        return [a - b for a, b in zip(x, y)]

    def scale(self, s: Scalar, x: Leaves) -> Leaves:
        return [self._cast(c, a) * a for c, a in zip(per_leaf(s, len(x)), x)]

    def axpy(self, s: Scalar, x: Leaves, y: Leaves) -> Leaves:
        """`s * x + y`."""
        return [self._cast(c, a) * a + b for c, a, b in zip(per_leaf(s, len(x)), x, y)]

    def lincomb(self, a: Scalar, x: Leaves, b: Scalar, y: Leaves) -> Leaves:
        """`a * x + b * y`."""
        n = len(x)
        return [self._cast(c, u) * u + self._cast(d, v) * v for c, u, d, v in zip(per_leaf(a, n), x, per_leaf(b, n), y)]

    def mul(self, x: Leaves, y: Leaves) -> Leaves:
        return [a * b for a, b in zip(x, y)]

    def abs(self, x: Leaves) -> Leaves:
        return [self.xp.abs(a) for a in x]

    def sign(self, x: Leaves) -> Leaves:
        return [self.xp.sign(a) for a in x]

    def add_scalar(self, x: Leaves, s: Scalar) -> Leaves:
        return [a + self._cast(c, a) for c, a in zip(per_leaf(s, len(x)), x)]

    # -- the same results, where an implementation may reuse a buffer the caller gives up ----
    #
    # `op_into(..., out=z)` returns what `op(...)` returns; `out` must be one of the input lists
    # (the very list object), one that the caller owns and reads no more: an oracle's answer or an
    # earlier result of these methods, never the parameters or a caller's gradients. An
    # implementation with `in_place` writes the result into the arrays of `out` and returns a new
    # list holding them (so `result is out` is False, while `result[i] is out[i]`); `ArrayOps`
    # returns new arrays and leaves `out` as it is. Either way the caller treats `out` as consumed.
    # The defaults call the plain methods, so an `ArrayOps` subclass that overrides those (TensorFlow's,
    # JAX's) gets the same results here without writing anything.

    def add_into(self, x: Leaves, y: Leaves, *, out: Leaves) -> Leaves:
        """`x + y`, possibly written into `out` (`x` or `y`)."""
        _check_out(out, x, y)
        return self.add(x, y)

    def sub_into(self, x: Leaves, y: Leaves, *, out: Leaves) -> Leaves:
        """`x - y`, possibly written into `out` (`x` or `y`)."""
        _check_out(out, x, y)
        return self.sub(x, y)

    def mul_into(self, x: Leaves, y: Leaves, *, out: Leaves) -> Leaves:
        """`x * y` elementwise, possibly written into `out` (`x` or `y`)."""
        _check_out(out, x, y)
        return self.mul(x, y)

    def scale_into(self, s: Scalar, x: Leaves, *, out: Leaves) -> Leaves:
        """`s * x`, possibly written into `out` (`x`)."""
        _check_out(out, x)
        return self.scale(s, x)

    def axpy_into(self, s: Scalar, x: Leaves, y: Leaves, *, out: Leaves) -> Leaves:
        """`s * x + y`, possibly written into `out` (`x` or `y`)."""
        _check_out(out, x, y)
        return self.axpy(s, x, y)

    def lincomb_into(self, a: Scalar, x: Leaves, b: Scalar, y: Leaves, *, out: Leaves) -> Leaves:
        """`a * x + b * y`, possibly written into `out` (`x` or `y`)."""
        _check_out(out, x, y)
        return self.lincomb(a, x, b, y)

    def add_scalar_into(self, x: Leaves, s: Scalar, *, out: Leaves) -> Leaves:
        """`x + s`, possibly written into `out` (`x`)."""
        _check_out(out, x)
        return self.add_scalar(x, s)

    # -- reductions (0-d results in the accumulation dtype) -------------------------------
    def vdot(self, x: Leaves, y: Leaves) -> Any:
        xp = self.xp
        acc = self._acc_dtype(x)
        total = None
        for a, b in zip(x, y):
            flat_a = xp.reshape(self._acc(a, acc), (-1,))
            flat_b = flat_a if b is a else xp.reshape(self._acc(b, acc), (-1,))
            part = xp.vecdot(flat_a, flat_b)
            total = part if total is None else total + part
        return total

    def norm(self, x: Leaves) -> Any:
        """Global L2 norm over all leaves."""
        return self.xp.sqrt(self.vdot(x, x))

    # -- control flow ----------------------------------------------------------------------
    def cond(self, pred: Any, true_fn: Any, false_fn: Any, *, like: Any = None) -> Any:
        """``true_fn()`` if the 0-d boolean array `pred` is true, else ``false_fn()``: only the branch
        taken runs, so a rule can skip work (gradient evaluations) on some steps.

        Both functions take no arguments and return pytrees of arrays of the same structure, shapes
        and dtypes (a rule returns the same kind of thing from both). A predicate that has a value
        is read on the host (``bool(pred)``; for a GPU array that is a device-to-host
        synchronization, which a rule avoids by keeping the predicate's inputs, such as a step
        counter, in host memory). A traced predicate (``jax.jit``, ``tf.function``) becomes the
        framework's conditional, ``jax.lax.cond`` or ``tf.cond``, which traces both branches and
        runs one: Python side effects of both happen at trace time (an oracle counts the
        evaluations of both). Adapters may override this with their framework's conditional.

        `like`: arrays the outputs are computed from (the gradient), for frameworks that type arrays
        by how they vary over mapped axes (JAX's ``shard_map``; see `gradnorm._backend.traced_cond`).
        """
        branch = traced_cond(pred, like)
        if branch is not None:
            return branch(true_fn, false_fn)
        return true_fn() if bool(pred) else false_fn()

    def fraction_below(self, x: Leaves, tol: Any) -> Any:
        """The fraction of all entries with ``|x| < tol`` (0-d, in the accumulation dtype); NaN and
        infinities never count. `tol` is a number or a 0-d array; the comparison is in each leaf's
        dtype (a 0-d array is cast to it first), as ``|x| < tol`` would be."""
        xp = self.xp
        count = None
        for a in x:
            t = tol if isinstance(tol, (int, float)) else xp.astype(tol, a.dtype)
            part = xp.count_nonzero(xp.abs(a) < t)
            count = part if count is None else count + part
        if count is None:
            return xp.zeros((), dtype=xp.float32)
        size = sum(math.prod(a.shape) for a in x)
        return xp.astype(count, self.acc_dtype(x)) / max(size, 1)

    def all_finite(self, x: Leaves) -> Any:
        """Whether every entry of every leaf is finite (a 0-d boolean array). Unlike a norm,
        it cannot overflow."""
        xp = self.xp
        out = None
        for a in x:
            part = xp.all(xp.isfinite(a))
            out = part if out is None else xp.logical_and(out, part)
        return out if out is not None else xp.asarray(True)


def _check_out(out: Any, *inputs: Leaves) -> None:
    """A `ValueError` unless `out` is (identically) one of `inputs`: the `*_into` methods of
    `ArrayOps` may only write into a list the result is computed from."""
    if not any(out is x for x in inputs):
        raise ValueError(
            "`out` must be one of the input lists of the operation (the very list object, which the caller "
            f"gives up). Received: {describe(out)}."
        )
