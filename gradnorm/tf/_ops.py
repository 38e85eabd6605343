"""Leaf-list arithmetic on TensorFlow tensors: :class:`TFOps`.

The same contract as :class:`gradnorm.ArrayOps` (inputs never mutated, nothing read back to the
host, 0-d scalars cast to each leaf's dtype, reductions accumulated in float32 at least or float64
if any leaf is float64), with what TensorFlow wants instead of the generic per-leaf path:

* a 0-d tensor scalar is cast once per dtype, not once per leaf (each cast is an op, and eager
  TensorFlow pays tens of microseconds of dispatch per op);
* the partial sums of a reduction are added by one ``tf.add_n`` instead of a chain of adds, and a
  squared norm takes one kernel per leaf (``tf.nn.l2_loss``, half the sum of squares, doubled once
  at the end) instead of a square and a sum;
* a scalar saturates at the largest finite value of a leaf's dtype, as in `ArrayOps`, and multiplies
  a float16 or bfloat16 leaf with ``tf.math.multiply_no_nan``, which Grappler does not reassociate
  (see `TFOps._times`), so that a zero gradient never gives NaN inside ``tf.function`` either;

Under ``tf.function`` every method only adds ops to the graph; ops whose results nobody uses (an
``info`` entry the caller ignores) are pruned from the function by TensorFlow.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from .._compat import tensorflow as _namespace
from .._tree import ArrayOps, PerLeaf, per_leaf, saturate_number, saturation_bound

__all__ = ["TFOps"]

Leaves = list[Any]

_HALF = (tf.float16, tf.bfloat16)  # the leaf dtypes whose scalar products are `multiply_no_nan` (see `TFOps._times`)


class TFOps(ArrayOps):
    """:class:`gradnorm.ArrayOps` for TensorFlow tensors (``xp`` is `gradnorm.tf`'s namespace).

    Results equal `ArrayOps` on the same namespace up to the summation order of reductions
    (``tf.reduce_sum`` and ``tf.add_n`` instead of a left-to-right sum of ``vecdot`` partials).
    """

    def __init__(self) -> None:
        super().__init__(_namespace)

    # -- scalars -------------------------------------------------------------------------
    @staticmethod
    def _scalars(s: Any, x: Leaves) -> list[Any]:
        """The scalar each leaf of `x` gets from `s`, a tensor cast to each leaf's dtype once per dtype.

        As in `ArrayOps`, a scalar saturates at the largest finite value of the leaf's dtype where it
        could exceed it: a tensor is clipped (``tf.clip_by_value``) before a narrowing cast, a Python
        number in Python, so that ``rho / (||g|| + eps)`` at a zero gradient is not ``inf`` in a
        float16 leaf (``inf * 0`` is NaN). Casts that do not narrow are unchanged."""
        cache: dict[Any, Any] = {}
        out = []
        for c, leaf in zip(per_leaf(s, len(x)), x):
            if isinstance(c, (tf.Tensor, tf.Variable)):
                if c.dtype != leaf.dtype:
                    key = (id(c), leaf.dtype)
                    if key not in cache:
                        bound = saturation_bound(_namespace, c.dtype, leaf.dtype)
                        clipped = tf.clip_by_value(c, -bound, bound) if bound is not None else c
                        cache[key] = tf.cast(clipped, leaf.dtype)
                    c = cache[key]
            elif type(c) is float or type(c) is int:
                c = saturate_number(c, saturation_bound(_namespace, float, leaf.dtype))
            out.append(c)
        return out

    def scalar(self, value: float, like: Leaves) -> Any:
        return tf.constant(value, dtype=self._acc_dtype(like))

    def _acc_dtype(self, leaves: Leaves) -> Any:
        return tf.float64 if any(leaf.dtype == tf.float64 for leaf in leaves) else tf.float32

    # -- elementwise ---------------------------------------------------------------------
    @staticmethod
    def _times(c: Any, a: Any) -> Any:
        """`c * a` for the scalar `c` of leaf `a`. In a float16 or bfloat16 leaf it is
        ``tf.math.multiply_no_nan`` (zero where `a` is zero): Grappler's arithmetic optimizer
        reassociates chains of multiplications inside ``tf.function`` (``c * (t * (t * g))`` becomes
        ``((c * t) * t) * g``), so a scalar saturated at the dtype's largest finite value could still
        overflow to ``inf`` before it meets a zero gradient and give NaN. ``MulNoNan`` is not
        reassociated and costs what a multiplication costs; float32 and float64 leaves multiply as
        before."""
        if a.dtype in _HALF:
            return tf.math.multiply_no_nan(c if isinstance(c, (tf.Tensor, tf.Variable)) else tf.constant(c, a.dtype), a)
        return c * a

    def scale(self, s: Any, x: Leaves) -> Leaves:
        return [self._times(c, a) for c, a in zip(self._scalars(s, x), x)]

    def axpy(self, s: Any, x: Leaves, y: Leaves) -> Leaves:
        """`s * x + y`."""
        return [self._times(c, a) + b for c, a, b in zip(self._scalars(s, x), x, y)]

    def lincomb(self, a: Any, x: Leaves, b: Any, y: Leaves) -> Leaves:
        """`a * x + b * y`."""
        times = self._times
        return [times(c, u) + times(d, v) for c, u, d, v in zip(self._scalars(a, x), x, self._scalars(b, y), y)]

    def add_scalar(self, x: Leaves, s: Any) -> Leaves:
        return [a + c for c, a in zip(self._scalars(s, x), x)]

    def abs(self, x: Leaves) -> Leaves:
        return [tf.abs(a) for a in x]

    def sign(self, x: Leaves) -> Leaves:
        return [tf.sign(a) for a in x]  # tf.sign(nan) is nan, as the standard asks

    # -- reductions ----------------------------------------------------------------------
    def _total(self, parts: list[Any], x: Leaves) -> Any:
        if not parts:
            return tf.zeros((), dtype=self._acc_dtype(x) if x else tf.float32)
        return parts[0] if len(parts) == 1 else tf.add_n(parts)

    def vdot(self, x: Leaves, y: Leaves) -> Any:
        acc = self._acc_dtype(x) if x else tf.float32
        squares, products = [], []
        for a, b in zip(x, y):
            same = b is a
            a = a if a.dtype == acc else tf.cast(a, acc)
            if same:  # one kernel per leaf: l2_loss is sum(a^2) / 2, doubled once for the whole sum (exact)
                squares.append(tf.nn.l2_loss(a))
            else:
                products.append(tf.reduce_sum(a * (b if b.dtype == acc else tf.cast(b, acc))))
        if squares:
            products.append(2.0 * self._total(squares, x))
        return self._total(products, x)

    def norm(self, x: Leaves) -> Any:
        """Global L2 norm over all leaves."""
        return tf.sqrt(self.vdot(x, x))

    def all_finite(self, x: Leaves) -> Any:
        """Whether every entry of every leaf is finite (a 0-d boolean tensor)."""
        if not x:
            return tf.constant(True)
        parts = [tf.reduce_all(tf.math.is_finite(a)) for a in x]
        return parts[0] if len(parts) == 1 else tf.reduce_all(tf.stack(parts))

    # -- control flow ----------------------------------------------------------------------
    def cond(self, pred: Any, true_fn: Any, false_fn: Any, *, like: Any = None) -> Any:
        """``tf.cond`` inside ``tf.function`` (and Keras's compiled train function): both branches
        are traced, one runs, and the function is not retraced when the predicate changes. Eagerly,
        the predicate's value picks the branch on the host. (`like` matters to JAX only.)"""
        if not tf.executing_eagerly():
            return tf.cond(pred, true_fn, false_fn)
        return true_fn() if bool(pred) else false_fn()

    # -- in place, for the oracle --------------------------------------------------------
    def assign_axpy(self, s: Any, v: Leaves, variables: list[Any]) -> None:
        """`variables += s * v` (``assign_add``; the variables hold the base point)."""
        if isinstance(s, (PerLeaf, tf.Tensor, tf.Variable)) or s != 1:
            v = self.scale(s, v)
        for var, d in zip(variables, v):
            var.assign_add(d, read_value=False)
