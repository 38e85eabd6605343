"""What ``gradnorm.jax.step`` and ``gradnorm.jax.transform`` share: parameter leaves by
``jax.tree_util``, the JAX gradient oracle, the checks of the user's loss, and the reductions
across a named device axis.

The core (``Rule.update``) flattens trees with optree, which does not know JAX's registered
node types (flax ``FrozenDict`` and ``nnx.State``, equinox modules, ``register_dataclass``
classes). The adapter therefore flattens with ``jax.tree_util`` itself and hands the core a
flat list of leaves; the oracle unflattens every evaluation point back into the user's tree
before calling the loss. Everything here runs at trace time under ``jax.jit``: the checks
read only shapes and dtypes, never values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optree

from .._errors import ClosureError, HyperparameterError, ParamsError, describe
from .._oracle import PERTURBATIONS, LeafOracle
from .._tree import PerLeaf
from ._ops import JaxOps

__all__ = [
    "PERTURBATIONS",
    "JaxOracle",
    "accumulation_dtype",
    "axis_mean",
    "check_axis_options",
    "check_loss_output",
    "param_leaves",
    "per_device",
    "replicate",
    "rule_for_leaves",
]



def _path(path: Any) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def param_leaves(params: Any, argument: str = "params") -> tuple[list[Any], Any]:
    """The leaves of ``params`` (by ``jax.tree_util``, so any registered JAX pytree works) as JAX
    arrays, and the tree structure. Every leaf must be a real floating-point array (JAX or NumPy);
    a ``ParamsError`` names the first leaf that is not."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not with_path:
        raise ParamsError(f"`{argument}` must contain at least one array. Received: {describe(params)}.")
    leaves = []
    for path, leaf in with_path:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            raise ParamsError(
                f"Every leaf of `{argument}` must be a real floating-point array (jax.Array or NumPy). "
                f"Received at {_path(path)}: {describe(leaf)}."
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ParamsError(
                f"Every leaf of `{argument}` must have a real floating-point dtype. "
                f"Received at {_path(path)}: {describe(leaf)}."
            )
        leaves.append(leaf if isinstance(leaf, jax.Array) else jnp.asarray(leaf))
    return leaves, treedef


def accumulation_dtype(leaves: list[Any]) -> Any:
    """float64 if a leaf is float64, else float32: the dtype the core's reductions use, and the
    dtype of the floating-point ``info`` entries the transform keeps in its state."""
    return jnp.result_type(jnp.float32, *(leaf.dtype for leaf in leaves))


def _per_leaf_in_order(name: str, value: PerLeaf, treedef: Any, n: int) -> PerLeaf:
    """A ``PerLeaf`` given as a tree shaped like the parameters, as a flat list in JAX's leaf order."""
    if value.treedef is None or len(value) != n:
        return value  # derived, or of the wrong length: the core reports it
    kind = value.treedef.kind
    if value.treedef.num_nodes == n + 1 and kind in (optree.PyTreeKind.LIST, optree.PyTreeKind.TUPLE):
        return value  # already a flat sequence in leaf order
    tree = optree.tree_unflatten(value.treedef, list(value.leaf_values()))
    try:
        ordered = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise HyperparameterError(
            f"`{name}` is a PerLeaf whose tree does not have the structure of `params` ({treedef}). "
            f"Give one value per leaf, as a tree shaped like `params` or as a flat list in the order of "
            f"`jax.tree_util.tree_leaves(params)`. Received: {value!r}."
        ) from err
    return PerLeaf(list(ordered))


def rule_for_leaves(rule: Any, treedef: Any, n: int) -> Any:
    """``rule`` with every tree-shaped ``PerLeaf`` hyperparameter put in the leaf order of ``treedef``
    (the core sees the parameters as a flat list of leaves)."""
    changes = {k: _per_leaf_in_order(k, v, treedef, n) for k, v in rule.config.items() if isinstance(v, PerLeaf)}
    changes = {k: v for k, v in changes.items() if v is not rule.config[k]}
    return rule.replace(**changes) if changes else rule


def check_loss_output(out: Any, has_aux: bool, source: str = "`loss_fn`") -> tuple[Any, Any]:
    """``(loss, aux)`` from what the loss function returned; a clear error if it is not a scalar
    floating-point loss (or a ``(loss, aux)`` pair with ``has_aux=True``). Static checks only."""
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ClosureError(
                f"{source} must return a pair `(loss, aux)` when `has_aux=True`. Received: {describe(out)}."
            )
        loss, aux = out
    else:
        if isinstance(out, (tuple, list)):
            raise ClosureError(
                f"{source} must return a scalar loss. Received: a {type(out).__name__} of length {len(out)}; "
                f"if it returns `(loss, aux)` (model state such as BatchNorm statistics), pass `has_aux=True`."
            )
        loss, aux = out, None
    shape = getattr(loss, "shape", None)
    dtype = getattr(loss, "dtype", None)
    if isinstance(loss, float) and not isinstance(loss, bool):
        return jnp.asarray(loss), aux
    if shape is None or dtype is None or tuple(shape) != () or not jnp.issubdtype(dtype, jnp.floating):
        raise ClosureError(
            f"{source} must return a scalar (shape ()) floating-point loss. Received: {describe(loss)}."
        )
    return loss, aux


def check_axis_options(axis_name: Any, perturbation: Any, where: str) -> None:
    if not isinstance(perturbation, str) or perturbation not in PERTURBATIONS:
        raise ValueError(
            f"`perturbation` of {where} must be one of {', '.join(repr(p) for p in PERTURBATIONS)}. "
            f"Received: {describe(perturbation)}."
        )
    if axis_name is not None and not isinstance(axis_name, (str, tuple)):
        raise TypeError(
            f"`axis_name` of {where} must be None or the name of a mapped axis (a string, or a tuple of names) "
            f"of `jax.shard_map`, `jax.pmap` or `jax.vmap`. Received: {describe(axis_name)}."
        )


def axis_mean(tree: Any, axis_name: Any) -> Any:
    """The mean of every leaf over the devices (or vmapped instances) of ``axis_name``."""
    return jax.lax.pmean(tree, axis_name)


def _is_varying(x: Any, axes: tuple[Any, ...]) -> bool:
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None) or getattr(aval, "manual_axis_type", None) or getattr(aval, "vma", None)
    varying = getattr(mat, "varying", mat)
    return varying is not None and all(a in varying for a in axes)


def per_device(tree: Any, axis_name: Any) -> Any:
    """``tree`` typed as varying over ``axis_name``, so that a gradient taken with respect to it
    is this device's own.

    Inside ``jax.shard_map`` (with its default ``check_vma=True``) the gradient with respect to
    a replicated (invariant) input is summed over the devices by construction; the rules need
    each device's gradient of its own loss first, so the evaluation point is cast to varying
    (``jax.lax.pcast(..., to="varying")``) before differentiating. Under ``vmap``/``pmap``, or
    ``shard_map`` with ``check_vma=False``, gradients are per instance already and nothing changes.
    """
    axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    pcast = getattr(jax.lax, "pcast", None)

    def one(x: Any) -> Any:
        if pcast is None or _is_varying(x, axes):
            return x
        try:
            return pcast(x, axis_name, to="varying")
        except (ValueError, AssertionError):  # not a shard_map axis (vmap, pmap): values are per instance already
            return x

    return jax.tree_util.tree_map(one, tree)


def replicate(tree: Any, axis_name: Any) -> Any:
    """Every leaf made equal across ``axis_name``: floating leaves are averaged, booleans are
    and-ed (``finite`` is true only if it is on every device), integers take the maximum
    (counters, equal on every device anyway). Python numbers are left as they are."""

    def one(x: Any) -> Any:
        if not isinstance(x, jax.Array) and not hasattr(x, "aval"):
            return x
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jax.lax.pmean(x, axis_name)
        if x.dtype == jnp.bool_:
            return jax.lax.pmin(x.astype(jnp.int32), axis_name) > 0
        return jax.lax.pmax(x, axis_name)

    return jax.tree_util.tree_map(one, tree)


class JaxOracle(LeafOracle):
    """A gradnorm `LeafOracle` by JAX autodiff, on the flat leaf lists the core works with.

    * ``value_and_grad(leaves)``: ``jax.value_and_grad`` of the loss at the tree of structure
      ``treedef`` holding ``leaves``.
    * ``hvp(leaves, v)``: forward-over-reverse, ``jax.jvp(jax.grad(loss), (p,), (v,))[1]``.

    ``fn(params_tree, i)`` evaluates the loss of the ``i``-th evaluation of the step (0 is the one
    at the unperturbed parameters); it returns the loss, or ``(loss, aux)`` with ``has_aux``.
    ``first_aux`` keeps the aux of evaluation 0. With ``axis_name`` (a data-parallel axis) the
    answers are this device's own (see ``per_device``); with ``reduce=True`` as well they are
    averaged over that axis (the "global" perturbation policy: the rule sees the gradient of the
    global batch). Without ``fn`` the oracle answers nothing and raises ``missing`` instead.
    """

    has_hvp = True

    def __init__(self, fn: Callable[[Any, int], Any] | None, treedef: Any, *, has_aux: bool = False,
                 axis_name: Any = None, reduce: bool = False, missing: str = "", first_call: int = 0):
        super().__init__(JaxOps())
        self._fn = fn
        self._treedef = treedef
        self._has_aux = has_aux
        self._axis = axis_name
        self._reduce = reduce and axis_name is not None
        self._missing = missing
        self.calls = first_call
        self.first_aux: Any = None

    def _loss(self, i: int) -> Callable[[Any], tuple[Any, Any]]:
        fn, has_aux = self._fn, self._has_aux

        def loss(p: Any) -> tuple[Any, Any]:
            return check_loss_output(fn(p, i), has_aux)

        return loss

    def _require(self) -> None:
        if self._fn is None:
            raise TypeError(self._missing)

    def _value_and_grad(self, leaves: list[Any]) -> tuple[Any, list[Any]]:
        self._require()
        i, self.calls = self.calls, self.calls + 1
        (loss, aux), grads = jax.value_and_grad(self._loss(i), has_aux=True)(self._point(leaves))
        if i == 0:
            self.first_aux = aux
        grads = self._treedef.flatten_up_to(grads)
        if self._reduce:
            loss, grads = axis_mean((loss, grads), self._axis)
        return loss, grads

    def _point(self, leaves: list[Any]) -> Any:
        point = self._treedef.unflatten(leaves)
        return per_device(point, self._axis) if self._axis is not None else point

    def _hvp(self, leaves: list[Any], v: list[Any]) -> list[Any]:
        self._require()
        i, self.calls = self.calls, self.calls + 1
        loss = self._loss(i)

        def grad(p: Any) -> Any:
            return jax.grad(lambda q: loss(q)[0])(p)

        treedef = self._treedef
        tangent = treedef.unflatten(v)
        if self._axis is not None:
            tangent = per_device(tangent, self._axis)
        out = treedef.flatten_up_to(jax.jvp(grad, (self._point(leaves),), (tangent,))[1])
        return axis_mean(out, self._axis) if self._reduce else out
