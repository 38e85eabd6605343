"""A small Array API namespace over plain TensorFlow ops: what gradnorm's rules and tree arithmetic use.

array-api-compat does not cover TensorFlow, and ``tf.experimental.numpy`` needs
``experimental_enable_numpy_behavior()``, which changes TensorFlow's promotion and indexing for the
whole process. This module instead maps the Array API functions the rules call (and a few more that
small losses need) onto ``tf.*`` ops, one or two lines each, and changes nothing global.

It is a compatibility shim of the core, like array-api-compat's per-library modules, not part of the
TensorFlow adapter: the rules reach it through ``gradnorm._backend.namespace_of``, which returns it
for TensorFlow tensors and variables. ``gradnorm._backend`` detects TensorFlow through
``sys.modules`` only (as array-api-compat detects its libraries) and imports this module only then,
so importing TensorFlow here loads nothing that was not loaded already, and ``gradnorm.tf`` (the
adapter, which re-exports this module as ``gradnorm.tf.namespace``) is never imported by the core.

It is a subset of the standard, on purpose:

* Binary functions promote a Python scalar to the dtype of the array operand (the standard's
  "weak" scalars); two arrays of different dtypes are an error, as in TensorFlow (no implicit
  promotion between arrays).
* ``matmul`` follows the standard for 1-D operands (``tf.linalg.matmul`` needs rank 2).
* The default dtypes are TensorFlow's: float32 and int32 (``count_nonzero`` returns int64).
* ``device`` arguments are accepted and ignored: TensorFlow places a new tensor by its inputs and
  the enclosing ``tf.device`` scope (inside ``tf.distribute`` replica functions, on the replica's
  device), which is what the rules want.
* Everything is traceable: no function reads a tensor's value, so it works under ``tf.function``.
"""

from __future__ import annotations

import builtins
from typing import Any

import tensorflow as tf

__array_api_version__ = "2023.12"  # the version whose names and signatures this subset follows

# -- data types ------------------------------------------------------------------------------
bool = tf.bool
int8, int16, int32, int64 = tf.int8, tf.int16, tf.int32, tf.int64
uint8, uint16, uint32, uint64 = tf.uint8, tf.uint16, tf.uint32, tf.uint64
float16, bfloat16, float32, float64 = tf.float16, tf.bfloat16, tf.float32, tf.float64
complex64, complex128 = tf.complex64, tf.complex128

_KINDS = {
    "bool": lambda d: d == tf.bool,
    "signed integer": lambda d: d.is_integer and not d.is_unsigned,
    "unsigned integer": lambda d: d.is_integer and d.is_unsigned,
    "integral": lambda d: d.is_integer,
    "real floating": lambda d: d.is_floating,
    "complex floating": lambda d: d.is_complex,
    "numeric": lambda d: d.is_integer or d.is_floating or d.is_complex,
}


def isdtype(dtype: Any, kind: Any) -> builtins.bool:
    """Whether `dtype` is of `kind`: a kind name (``"real floating"``, ...), a dtype, or a tuple of those."""
    dtype = tf.as_dtype(dtype)
    if isinstance(kind, tuple):
        return builtins.any(isdtype(dtype, k) for k in kind)
    if isinstance(kind, str):
        try:
            return builtins.bool(_KINDS[kind](dtype))
        except KeyError:
            raise ValueError(f"`kind` must be one of {sorted(_KINDS)} or a dtype. Received: {kind!r}.") from None
    return dtype == tf.as_dtype(kind)


def _tensor(x: Any, like: Any = None) -> Any:
    """`x` as a tensor; a Python number takes the dtype of `like` (a weak scalar)."""
    if isinstance(x, (tf.Tensor, tf.Variable)):
        return tf.convert_to_tensor(x)
    if like is not None and isinstance(x, (int, float, builtins.bool)):
        return tf.constant(x, dtype=tf.convert_to_tensor(like).dtype)
    return tf.convert_to_tensor(x)


def _pair(x1: Any, x2: Any) -> tuple[Any, Any]:
    if isinstance(x1, (int, float, builtins.bool)) and not isinstance(x2, (int, float, builtins.bool)):
        return _tensor(x1, x2), _tensor(x2)
    return _tensor(x1), _tensor(x2, x1)


def device(x: Any) -> Any:
    """The device string of `x` (empty for a symbolic tensor without placement)."""
    return x.device


# -- creation ------------------------------------------------------------------------------------
def asarray(obj: Any, /, *, dtype: Any = None, device: Any = None, copy: Any = None) -> Any:
    if isinstance(obj, tf.Variable):
        obj = obj.read_value()
    if isinstance(obj, tf.Tensor):
        return obj if dtype is None or obj.dtype == dtype else tf.cast(obj, dtype)
    return tf.constant(obj, dtype=dtype)


def zeros(shape: Any, *, dtype: Any = None, device: Any = None) -> Any:
    return tf.zeros(shape, dtype=dtype or tf.float32)


def ones(shape: Any, *, dtype: Any = None, device: Any = None) -> Any:
    return tf.ones(shape, dtype=dtype or tf.float32)


def full(shape: Any, fill_value: Any, *, dtype: Any = None, device: Any = None) -> Any:
    if dtype is None:
        dtype = tf.bool if isinstance(fill_value, builtins.bool) else tf.int32 if isinstance(fill_value, int) else tf.float32
    return tf.fill(shape, tf.constant(fill_value, dtype=dtype))


def zeros_like(x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
    return tf.zeros_like(x, dtype=dtype)


def ones_like(x: Any, /, *, dtype: Any = None, device: Any = None) -> Any:
    return tf.ones_like(x, dtype=dtype)


def full_like(x: Any, /, fill_value: Any, *, dtype: Any = None, device: Any = None) -> Any:
    x = _tensor(x)
    return tf.fill(tf.shape(x), tf.constant(fill_value, dtype=dtype or x.dtype))


def astype(x: Any, dtype: Any, /, *, copy: builtins.bool = True, device: Any = None) -> Any:
    x = _tensor(x)
    return x if x.dtype == dtype and not copy else tf.cast(x, dtype)


# -- elementwise ---------------------------------------------------------------------------------
def abs(x: Any, /) -> Any:
    return tf.abs(x)


def sign(x: Any, /) -> Any:
    """-1, 0 or 1 (nan for nan, as the standard asks; ``tf.sign`` already does)."""
    return tf.sign(x)


def negative(x: Any, /) -> Any:
    return tf.negative(x)


def sqrt(x: Any, /) -> Any:
    return tf.sqrt(x)


def square(x: Any, /) -> Any:
    return tf.square(x)


def exp(x: Any, /) -> Any:
    return tf.exp(x)


def expm1(x: Any, /) -> Any:
    return tf.math.expm1(x)


def log(x: Any, /) -> Any:
    return tf.math.log(x)


def log1p(x: Any, /) -> Any:
    return tf.math.log1p(x)


def tanh(x: Any, /) -> Any:
    return tf.tanh(x)


def logaddexp(x1: Any, x2: Any, /) -> Any:
    """log(exp(x1) + exp(x2)), without overflow: max + log1p(exp(-|x1 - x2|))."""
    x1, x2 = _pair(x1, x2)
    return tf.maximum(x1, x2) + tf.math.log1p(tf.exp(-tf.abs(x1 - x2)))


def add(x1: Any, x2: Any, /) -> Any:
    return tf.add(*_pair(x1, x2))


def subtract(x1: Any, x2: Any, /) -> Any:
    return tf.subtract(*_pair(x1, x2))


def multiply(x1: Any, x2: Any, /) -> Any:
    return tf.multiply(*_pair(x1, x2))


def divide(x1: Any, x2: Any, /) -> Any:
    return tf.divide(*_pair(x1, x2))


def pow(x1: Any, x2: Any, /) -> Any:
    return tf.pow(*_pair(x1, x2))


def maximum(x1: Any, x2: Any, /) -> Any:
    return tf.maximum(*_pair(x1, x2))


def minimum(x1: Any, x2: Any, /) -> Any:
    return tf.minimum(*_pair(x1, x2))


def clip(x: Any, /, min: Any = None, max: Any = None) -> Any:
    x = _tensor(x)
    if min is not None:
        x = tf.maximum(x, _tensor(min, x))
    if max is not None:
        x = tf.minimum(x, _tensor(max, x))
    return x


def equal(x1: Any, x2: Any, /) -> Any:
    return tf.equal(*_pair(x1, x2))


def not_equal(x1: Any, x2: Any, /) -> Any:
    return tf.not_equal(*_pair(x1, x2))


def less(x1: Any, x2: Any, /) -> Any:
    return tf.less(*_pair(x1, x2))


def less_equal(x1: Any, x2: Any, /) -> Any:
    return tf.less_equal(*_pair(x1, x2))


def greater(x1: Any, x2: Any, /) -> Any:
    return tf.greater(*_pair(x1, x2))


def greater_equal(x1: Any, x2: Any, /) -> Any:
    return tf.greater_equal(*_pair(x1, x2))


def isfinite(x: Any, /) -> Any:
    return tf.math.is_finite(x)


def isnan(x: Any, /) -> Any:
    return tf.math.is_nan(x)


def isinf(x: Any, /) -> Any:
    return tf.math.is_inf(x)


def logical_and(x1: Any, x2: Any, /) -> Any:
    return tf.logical_and(x1, x2)


def logical_or(x1: Any, x2: Any, /) -> Any:
    return tf.logical_or(x1, x2)


def logical_not(x: Any, /) -> Any:
    return tf.logical_not(x)


def where(condition: Any, x1: Any, x2: Any, /) -> Any:
    x1, x2 = _pair(x1, x2)
    return tf.where(condition, x1, x2)


# -- reductions ----------------------------------------------------------------------------------
def sum(x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: builtins.bool = False) -> Any:
    x = _tensor(x)
    return tf.reduce_sum(x if dtype is None else tf.cast(x, dtype), axis=axis, keepdims=keepdims)


def prod(x: Any, /, *, axis: Any = None, dtype: Any = None, keepdims: builtins.bool = False) -> Any:
    x = _tensor(x)
    return tf.reduce_prod(x if dtype is None else tf.cast(x, dtype), axis=axis, keepdims=keepdims)


def mean(x: Any, /, *, axis: Any = None, keepdims: builtins.bool = False) -> Any:
    return tf.reduce_mean(x, axis=axis, keepdims=keepdims)


def max(x: Any, /, *, axis: Any = None, keepdims: builtins.bool = False) -> Any:
    return tf.reduce_max(x, axis=axis, keepdims=keepdims)


def min(x: Any, /, *, axis: Any = None, keepdims: builtins.bool = False) -> Any:
    return tf.reduce_min(x, axis=axis, keepdims=keepdims)


def all(x: Any, /, *, axis: Any = None, keepdims: builtins.bool = False) -> Any:
    return tf.reduce_all(tf.cast(x, tf.bool), axis=axis, keepdims=keepdims)


def any(x: Any, /, *, axis: Any = None, keepdims: builtins.bool = False) -> Any:
    return tf.reduce_any(tf.cast(x, tf.bool), axis=axis, keepdims=keepdims)


def count_nonzero(x: Any, /, *, axis: Any = None, keepdims: builtins.bool = False) -> Any:
    """The number of non-zero entries, as int64 (the default integer dtype)."""
    return tf.math.count_nonzero(x, axis=axis, keepdims=keepdims, dtype=tf.int64)


def vecdot(x1: Any, x2: Any, /, *, axis: int = -1) -> Any:
    """Sum over `axis` of the product (real inputs: no conjugation needed)."""
    x1, x2 = _pair(x1, x2)
    return tf.reduce_sum(x1 * x2, axis=axis)


def matmul(x1: Any, x2: Any, /) -> Any:
    """The standard's matmul: a 1-D operand is a row (left) or a column (right) vector that is
    removed from the result again (``tf.linalg.matmul`` itself needs rank 2)."""
    x1, x2 = _pair(x1, x2)
    if x1.shape.rank == 1 and x2.shape.rank == 1:
        return tf.tensordot(x1, x2, 1)
    if x2.shape.rank == 1:
        return tf.linalg.matvec(x1, x2)
    if x1.shape.rank == 1:
        return tf.linalg.matvec(x2, x1, transpose_a=True)
    return tf.linalg.matmul(x1, x2)


def tensordot(x1: Any, x2: Any, /, *, axes: Any = 2) -> Any:
    return tf.tensordot(*_pair(x1, x2), axes)


# -- shapes --------------------------------------------------------------------------------------
def reshape(x: Any, /, shape: Any, *, copy: Any = None) -> Any:
    return tf.reshape(x, shape)


def concat(arrays: Any, /, *, axis: int | None = 0) -> Any:
    if axis is None:
        return tf.concat([tf.reshape(a, (-1,)) for a in arrays], 0)
    return tf.concat(list(arrays), axis)


def stack(arrays: Any, /, *, axis: int = 0) -> Any:
    return tf.stack(list(arrays), axis)


def expand_dims(x: Any, /, *, axis: int = 0) -> Any:
    return tf.expand_dims(x, axis)


def squeeze(x: Any, /, axis: Any) -> Any:
    return tf.squeeze(x, axis)


def broadcast_to(x: Any, /, shape: Any) -> Any:
    return tf.broadcast_to(x, shape)


def permute_dims(x: Any, /, axes: Any) -> Any:
    return tf.transpose(x, axes)


def matrix_transpose(x: Any, /) -> Any:
    return tf.linalg.matrix_transpose(x)
