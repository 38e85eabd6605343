"""Which arrays gradnorm works with, and the Array API namespace they compute in.

This is the one place where the core recognises an array library. An array is one of an Array
API library that array-api-compat covers (NumPy, PyTorch, JAX, CuPy, Dask, array-api-strict, ...;
its namespace is ``array_api_compat.array_namespace``), or a TensorFlow tensor or variable, whose
namespace is gradnorm's own shim `gradnorm._compat.tensorflow` (array-api-compat does not cover
TensorFlow).

Detection never imports a framework. Like array-api-compat, it looks a library up in
``sys.modules``: an object can only be a TensorFlow tensor if TensorFlow is already imported, and
only then is the shim (which imports TensorFlow) loaded. The core never imports an adapter
(``gradnorm.torch``, ``gradnorm.jax``, ``gradnorm.tf``); ``tests/test_imports.py`` checks both.

`gradnorm._tree` re-exports `is_array`, `array_namespace` and `namespace_of` under the same names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sys

import array_api_compat

from ._errors import ParamsError, describe

__all__ = ["is_array", "array_namespace", "namespace_of", "traced_cond"]


def _own_namespace(x: Any) -> Any:
    """gradnorm's own namespace for the arrays array-api-compat does not cover, else None.

    That is TensorFlow (`tf.Tensor`, `tf.Variable`), whose namespace `gradnorm._compat.tensorflow`
    maps the Array API onto plain `tf.*` ops. Like array-api-compat, this looks at `sys.modules`
    only: nothing is imported unless TensorFlow already is (then `x` may be one of its tensors).
    """
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(x, (getattr(tf, "Tensor", ()), getattr(tf, "Variable", ()))):
        return None
    from ._compat import tensorflow

    return tensorflow


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


def placement(leaf: Any) -> Any:
    """Where an array made for `leaf`'s state (a step counter, a 0-d scalar) should live: the
    device (or sharding) of `leaf`, except for a JAX array that is not committed to a device,
    for which it is None. An explicit device would commit the new array to that one device, and a
    state committed to device 0 cannot meet parameters that jit places on a mesh
    (`gradnorm.jax.data_parallel_step`); left uncommitted, it follows the parameters."""
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and not leaf.committed:
        return None
    return array_api_compat.device(leaf)


def traced_cond(pred: Any, like: Any = None) -> Any:
    """The framework's own conditional for a predicate that has no value yet, else None.

    A JAX tracer (under ``jax.jit``, ``jax.eval_shape``, ...) gets ``jax.lax.cond``; a TensorFlow
    tensor while TensorFlow is not executing eagerly (inside ``tf.function`` or a Keras train
    function) gets ``tf.cond``. Both trace the two branches and run one. Anything else (a NumPy,
    PyTorch, CuPy or eager JAX/TensorFlow array) has a value that can be read on the host: None.
    As everywhere in this module, nothing is imported: a tracer can only exist if its framework is
    imported already. Returns a function ``(true_fn, false_fn) -> outputs``.

    `like`: arrays (a list or tree) the branches' outputs are computed from, such as the gradient.
    Inside ``jax.shard_map`` JAX types an array by the mapped axes it varies over, and the branches of
    ``lax.cond`` must agree: every output of both branches is made to vary over the axes any array
    of `like` varies over (``jax.lax.pcast(..., to="varying")``, a cast without communication), so
    that a branch returning an input unchanged (a state buffer) matches one that computes it from
    `like` (this device's gradient).
    """
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(pred, jax.core.Tracer):
        axes = _varying_axes(jax, like) if like is not None else ()
        if not axes:
            return lambda true_fn, false_fn: jax.lax.cond(pred, true_fn, false_fn)
        return lambda true_fn, false_fn: jax.lax.cond(pred, _varying(jax, true_fn, axes), _varying(jax, false_fn, axes))
    tf = sys.modules.get("tensorflow")
    if (tf is not None and isinstance(pred, (getattr(tf, "Tensor", ()), getattr(tf, "Variable", ())))
            and not tf.executing_eagerly()):
        return lambda true_fn, false_fn: tf.cond(pred, true_fn, false_fn)
    return None


def _axes_of(jax: Any, x: Any) -> frozenset:
    """The mapped axes (``jax.shard_map``) a JAX value varies over; empty outside shard_map."""
    try:
        aval = jax.typeof(x)
    except (TypeError, AttributeError):
        return frozenset()
    mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None) or getattr(aval, "vma", None)
    varying = getattr(mat, "varying", mat)
    return frozenset(varying) if varying else frozenset()


def _varying_axes(jax: Any, like: Any) -> tuple[Any, ...]:
    axes: set = set()
    for leaf in jax.tree_util.tree_leaves(like):
        axes |= _axes_of(jax, leaf)
    return tuple(sorted(axes, key=str))


def _varying(jax: Any, fn: Any, axes: tuple[Any, ...]) -> Any:
    """`fn` whose array outputs vary over at least `axes`."""
    pcast = getattr(jax.lax, "pcast", None)

    def run() -> Any:
        def one(x: Any) -> Any:
            missing = tuple(a for a in axes if a not in _axes_of(jax, x))
            return pcast(x, missing, to="varying") if missing and pcast is not None else x

        return jax.tree_util.tree_map(one, fn())

    return run


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
