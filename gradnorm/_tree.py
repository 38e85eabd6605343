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
mutates an input: every operation returns new arrays. TensorFlow, which array-api-compat does not
cover, gets gradnorm's own small namespace (`gradnorm.tf._namespace`, see `array_namespace`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import itertools
import numbers
import operator
import sys

import array_api_compat
import optree

from ._errors import ParamsError, describe

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


def _own_namespace(x: Any) -> Any:
    """gradnorm's own namespace for the arrays array-api-compat does not cover, else None.

    That is TensorFlow (`tf.Tensor`, `tf.Variable`), whose namespace `gradnorm.tf._namespace`
    maps the Array API onto plain `tf.*` ops. Like array-api-compat, this looks at `sys.modules`
    only: nothing is imported unless TensorFlow already is (then `x` may be one of its tensors).
    """
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(x, (getattr(tf, "Tensor", ()), getattr(tf, "Variable", ()))):
        return None
    from .tf import _namespace

    return _namespace


def is_array(x: Any) -> bool:
    """Whether `x` is an array gradnorm works with: an Array API object or a TensorFlow tensor."""
    return array_api_compat.is_array_api_obj(x) or _own_namespace(x) is not None


def array_namespace(*xs: Any) -> Any:
    """`array_api_compat.array_namespace`, extended to TensorFlow tensors and variables (all of
    `xs` must then be TensorFlow's; a `TypeError` otherwise)."""
    own = _own_namespace(xs[0]) if xs else None
    if own is None:
        return array_api_compat.array_namespace(*xs)
    if any(_own_namespace(x) is not own for x in xs[1:]):
        kinds = sorted({f"{type(x).__module__}.{type(x).__qualname__}" for x in xs})
        raise TypeError(f"Multiple namespaces for array types: {kinds}")
    return own


def namespace_of(leaves: Sequence[Any], *, argument: str = "params") -> Any:
    """The Array API namespace shared by `leaves`, or a `ParamsError` naming `argument`."""
    if not leaves:
        raise ParamsError(f"`{argument}` must contain at least one array. Received an empty tree.")
    kinds = {type(leaf) for leaf in leaves}
    if len(kinds) == 1 and array_api_compat.is_array_api_obj(leaves[0]):
        return array_api_compat.array_namespace(leaves[0])  # the common case, checked once
    for leaf in leaves:
        if not is_array(leaf):
            raise ParamsError(
                f"Every leaf of `{argument}` must be an array of an Array API library "
                f"(NumPy, PyTorch, JAX, CuPy, array-api-strict, ...). Received a leaf {describe(leaf)}."
                + _jax_node_hint(leaf)
            )
    try:
        return array_namespace(*leaves)
    except TypeError as err:
        kinds = sorted({f"{type(leaf).__module__}.{type(leaf).__qualname__}" for leaf in leaves})
        raise ParamsError(
            f"All leaves of `{argument}` must come from one array library. Received leaves of types {kinds}."
        ) from err


def _jax_node_hint(leaf: Any) -> str:
    """A hint for a JAX pytree node that optree does not know (an equinox module, a flax
    ``FrozenDict`` or nnx ``State``, a registered dataclass)."""
    jax = sys.modules.get("jax")
    if jax is None or array_api_compat.is_array_api_obj(leaf):
        return ""
    try:
        children = jax.tree_util.tree_leaves(leaf)
    except Exception:  # pragma: no cover - any failure just means no hint
        return ""
    if len(children) == 1 and children[0] is leaf:
        return ""  # a leaf to JAX too
    return (" It is a JAX pytree node, which gradnorm's core does not flatten: use gradnorm.jax.step "
            "(it flattens with jax.tree_util), or pass jax.tree_util.tree_leaves(params).")


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


def per_leaf(s: Any, n: int) -> Any:
    """An iterable of the scalar each of `n` leaves gets from `s` (a PerLeaf or one scalar)."""
    if isinstance(s, PerLeaf):
        return s.leaf_values()
    return itertools.repeat(s, n)


class ArrayOps:
    """Leaf-list arithmetic through one Array API namespace `xp`.

    Scalars may be Python numbers, 0-d arrays, or `PerLeaf` (one of those per leaf; the
    elementwise operations take them, reductions stay global). A 0-d array scalar is cast to each leaf's
    dtype before it multiplies the leaf, so a float32 tree stays float32 even when a norm was
    accumulated in float64, and bf16/fp16 trees stay in their dtype. Reductions (`vdot`,
    `norm`) accumulate in float32 at least (float64 if any leaf is float64), so a half
    precision tree does not overflow its norm.
    """

    def __init__(self, xp: Any):
        self.xp = xp

    # -- scalars -------------------------------------------------------------------------
    def _cast(self, s: Scalar, leaf: Any) -> Scalar:
        if isinstance(s, (int, float)):
            return s
        if s.dtype == leaf.dtype:
            return s
        return self.xp.astype(s, leaf.dtype)

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
        return xp.full((), value, dtype=self._acc_dtype(like), device=array_api_compat.device(like[0]))

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

    def weighted_norm(self, w: Leaves, x: Leaves) -> Any:
        """`|| w * x ||` without keeping `w * x`."""
        return self.norm(self.mul(w, x))

    def count_below(self, x: Leaves, tol: float) -> Any:
        """Fraction of all entries with `|x| < tol` (0-d, accumulation dtype)."""
        xp = self.xp
        below = None
        total = 0
        for a in x:
            part = xp.count_nonzero(xp.abs(a) < tol)
            below = part if below is None else below + part
            total += array_api_compat.size(a) or 0
        return xp.astype(below, self._acc_dtype(x)) / max(total, 1)

    def all_finite(self, x: Leaves) -> Any:
        """Whether every entry of every leaf is finite (a 0-d boolean array). Unlike a norm,
        it cannot overflow."""
        xp = self.xp
        out = None
        for a in x:
            part = xp.all(xp.isfinite(a))
            out = part if out is None else xp.logical_and(out, part)
        return out if out is not None else xp.asarray(True)

    def isfinite(self, s: Any) -> Any:
        return self.xp.isfinite(s)

    def where(self, cond: Any, s: Any, t: Any) -> Any:
        """Scalar select on 0-d arrays, traceable (no Python branch on data)."""
        return self.xp.where(cond, s, t)
