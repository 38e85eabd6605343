"""``gradnorm.jax.transform``: any gradnorm rule as an optax ``GradientTransformationExtraArgs``
around any optax optimizer."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from .. import rules as _rules
from .._errors import OracleOutputError, describe
from .._oracle import LeafOracle
from ._common import (
    JaxOracle,
    accumulation_dtype,
    axis_mean,
    check_axis_options,
    check_loss_output,
    param_leaves,
    replicate,
    rule_for_leaves,
)
from ._ops import JaxOps
from ._optax import check_position

__all__ = ["TransformState", "transform"]


class TransformState(NamedTuple):
    """State of ``gradnorm.jax.transform``.

    Attributes:
        base: the state of the wrapped optax optimizer.
        rule: the rule's state (``EmptyState()`` for stateless rules).
        info: the rule's ``info`` of the last update as 0-d arrays (before the first update:
            zeros, ``finite=True``): ``loss``, ``grad_norm``, ``update_norm``, ``finite``,
            ``grad_evals``, ``hvp_evals`` (int32) and the rule's own entries. Floating entries are
            float32 (float64 when a parameter is float64), whatever the parameters' dtype, so that
            the state keeps one structure and dtype from step to step (no recompilation).
    """

    base: Any
    rule: Any
    info: dict[str, Any]


class _Unset:
    """Default of the hyperparameter keywords advertised to ``optax.inject_hyperparams``."""

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


def _info_arrays(info: dict[str, Any], acc: Any) -> dict[str, Any]:
    """``info`` as 0-d arrays of fixed dtypes: floating -> ``acc``, bool -> bool, int -> int32."""
    out = {}
    for name, value in info.items():
        if isinstance(value, bool):
            out[name] = jnp.asarray(value)
        elif isinstance(value, int):
            out[name] = jnp.asarray(value, dtype=jnp.int32)
        else:
            value = jnp.asarray(value)
            if jnp.issubdtype(value.dtype, jnp.inexact):
                out[name] = value.astype(acc)
            elif value.dtype == jnp.bool_:
                out[name] = value
            else:
                out[name] = value.astype(jnp.int32)
    return out


class _ZeroOracle(LeafOracle):
    """Answers zeros: traced once by ``jax.eval_shape`` to learn which ``info`` entries a rule reports."""

    has_hvp = True

    def __init__(self, acc: Any):
        super().__init__(JaxOps())
        self._acc = acc

    def _value_and_grad(self, leaves: list[Any]) -> tuple[Any, list[Any]]:
        return jnp.zeros((), self._acc), [jnp.zeros_like(x) for x in leaves]

    def _hvp(self, leaves: list[Any], v: list[Any]) -> list[Any]:
        return [jnp.zeros_like(x) for x in v]


def _initial_info(rule: Any, leaves: list[Any], rule_state: Any) -> dict[str, Any]:
    acc = accumulation_dtype(leaves)

    def run(leaves: list[Any], rule_state: Any) -> dict[str, Any]:
        zeros = [jnp.zeros_like(x) for x in leaves]
        _, _, info = rule.update_leaves(leaves, rule_state, _ZeroOracle(acc), loss=jnp.zeros((), acc), grads=zeros,
                                        ops=JaxOps())
        return _info_arrays(info, acc)

    shapes = jax.eval_shape(run, leaves, rule_state)
    return {k: (jnp.ones if s.dtype == jnp.bool_ else jnp.zeros)(s.shape, s.dtype) for k, s in shapes.items()}


def _placed_like(tree: Any, ref: Any) -> Any:
    """The arrays of ``tree`` (the rule state and ``info``, made eagerly by ``init``) committed to
    devices exactly when the parameter leaf ``ref`` is.

    ``jax.jit`` keys its cache on whether each argument is committed to a device: a state that
    mixes committed arrays (the core creates some rule states with an explicit ``device=``) and
    uncommitted ones (``jnp.zeros``, optax's states) is compiled for once, and again when the
    second call passes the (all committed) outputs of the first. Under a trace nothing is done.
    """
    if isinstance(ref, jax.core.Tracer) or not isinstance(ref, jax.Array):
        return tree
    leaves = jax.tree_util.tree_leaves(tree)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return tree
    if not ref.committed:
        return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)) if getattr(x, "committed", False) else x, tree)
    sharding = ref.sharding
    if len(sharding.device_set) == 1:
        return jax.device_put(tree, next(iter(sharding.device_set)))
    mesh = getattr(sharding, "mesh", None)
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec())) if mesh is not None else tree


def _gradient_leaves(updates: Any, treedef: Any, leaves: list[Any]) -> list[Any]:
    """The leaves of ``updates`` (the gradient at ``params``), checked against the parameters."""
    try:
        grads = treedef.flatten_up_to(updates)
    except (ValueError, TypeError) as err:
        raise OracleOutputError(
            f"`updates` (the gradient at `params`) must have the tree structure of `params`. Expected: {treedef}. "
            f"Received: {jax.tree_util.tree_structure(updates)}."
        ) from err
    for i, (g, p) in enumerate(zip(grads, leaves)):
        if getattr(g, "shape", None) != p.shape or getattr(g, "dtype", None) != p.dtype:
            raise OracleOutputError(
                f"`updates` (the gradient at `params`) must have the shapes and dtypes of `params`: leaf {i} must "
                f"have shape {p.shape} and dtype {p.dtype}. Received: {describe(g)}."
            )
    return [g if isinstance(g, jax.Array) else jnp.asarray(g) for g in grads]


def _check_value(value: Any) -> Any:
    if isinstance(value, float) and not isinstance(value, bool):
        return jnp.asarray(value)
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or tuple(shape) != () or not jnp.issubdtype(dtype, jnp.floating):
        raise OracleOutputError(
            f"`value` (the loss at `params`) must be a scalar (shape ()) floating-point array. Received: {describe(value)}."
        )
    return value


def _hyperparameters(given: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters actually given: drops the advertised defaults, and unpacks the
    ``hyperparameters={...}`` keyword that ``optax.inject_hyperparams`` passes for names outside
    the advertised signature (rules registered after ``gradnorm.jax`` was imported)."""
    out = {k: v for k, v in given.items() if v is not _UNSET}
    nested = out.pop("hyperparameters", None)
    if isinstance(nested, dict):
        out.update({k: v for k, v in nested.items() if v is not _UNSET})
    elif nested is not None:
        out["hyperparameters"] = nested  # not ours: let the rule reject it by name
    return out


def transform(
    base: optax.GradientTransformation,
    rule: Any,
    *,
    has_aux: bool = False,
    axis_name: Any = None,
    perturbation: str = "local",
    **hyperparameters: Any,
) -> optax.GradientTransformationExtraArgs:
    r"""A gradnorm rule in front of any optax optimizer: ``base`` receives the rule's direction
    in place of the gradient.

    ``update(updates, state, params, *, loss_fn=None, value=None, **extra_args)``:

    * ``updates``: the gradient at ``params`` (what ``jax.value_and_grad`` of the batch loss
      gave you); it is the rule's first gradient evaluation, never recomputed. It must be the
      raw gradient: a clip (or any transformation) in front of the transform in ``optax.chain``
      does not reach the rule's own gradients and has no effect on ``sam``; ``ChainOrderWarning``
      says so. Clip the rule's direction instead, in ``base``:
      ``transform(optax.chain(optax.clip_by_global_norm(c), optax.sgd(lr)), rule=...)``. For
      gradient accumulation use ``gradnorm.jax.MultiSteps`` (the rule on the emitting micro-step only).
    * ``params``: required (the rule perturbs them).
    * ``loss_fn``: ``loss_fn(params) -> loss`` (or ``(loss, aux)`` with ``has_aux=True``; the aux
      of those passes is dropped) for the current batch: the rule evaluates its gradient at the
      points it needs (``sam``: one, ``gam``: three; ``gr``: one Hessian-vector product,
      forward-over-reverse). Rules with one evaluation (``sgd``, ``flooding``, ``coherent``,
      zero strengths) need none.
    * ``value``: the loss at ``params`` (optax's name for it). Give it: without it the loss
      is computed once more with ``loss_fn(params)`` (a forward pass), since ``info`` reports
      it and ``flooding`` needs it.
    * unknown keywords are ignored by the rule and passed on to ``base``, with ``loss_fn`` and
      ``value``.

    The cost of an update is the rule's gradient evaluations minus the one you computed, plus
    the base update: for ``sam`` one gradient evaluation.

    Args:
        base: any optax ``GradientTransformation`` (``optax.sgd(0.1, momentum=0.9)``,
            ``optax.adamw(...)``, a chain, an ``inject_hyperparams`` optimizer).
        rule: a rule name (``gradnorm.available_rules()``) or a ``gradnorm.rules.Rule``.
        has_aux: ``loss_fn`` returns ``(loss, aux)``.
        axis_name: inside ``jax.shard_map``/``pmap`` over a data-parallel axis, its name
            (``updates``, ``value`` and ``loss_fn`` are then per device: inside ``shard_map``,
            take the gradient at ``jax.lax.pcast(params, axis_name, to="varying")``, since the
            gradient with respect to replicated parameters is summed over the devices).
        perturbation: with ``axis_name``: ``"local"`` (default): the rule runs on each device's
            gradient and the directions are averaged before ``base`` sees them; ``"global"``:
            ``updates``, ``value`` and every extra gradient are averaged over the axis first.
        **hyperparameters: the rule's (``rho=0.05``, ...). Numbers are static; 0-d arrays are
            dynamic, which is what ``optax.inject_hyperparams(gradnorm.jax.transform)(...)``
            passes (integer hyperparameters such as ``coherent``'s ``delay`` must then be
            listed in ``static_args``).

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with state ``TransformState(base, rule,
        info)``; ``state.info`` holds the rule's ``info`` of the last update (``finite`` is false
        when the loss or the direction has an inf or a NaN; to skip such steps, give
        ``optax.apply_if_finite(base, ...)`` as ``base``: it then checks the rule's direction).

    Example::

        tx = gradnorm.jax.transform(optax.sgd(0.1, momentum=0.9), rule="sam", rho=0.05)
        opt_state = tx.init(params)

        @jax.jit
        def train_step(params, opt_state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params, value=loss,
                                           loss_fn=lambda p: loss_fn(p, x, y))
            return optax.apply_updates(params, updates), opt_state, loss
    """
    hyperparameters = _hyperparameters(hyperparameters)
    rule_obj = _rules.get(rule, **hyperparameters)
    if not (callable(getattr(base, "init", None)) and callable(getattr(base, "update", None))):
        raise TypeError(
            f"`base` of gradnorm.jax.transform must be an optax GradientTransformation (with `init` and `update`), "
            f"for example `optax.sgd(0.1)`. Received: {describe(base)}."
        )
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` of gradnorm.jax.transform must be True or False. Received: {describe(has_aux)}.")
    check_axis_options(axis_name, perturbation, "gradnorm.jax.transform")
    inner = optax.with_extra_args_support(base)
    global_policy = axis_name is not None and perturbation == "global"

    def init_fn(params: Any) -> TransformState:
        leaves, treedef = param_leaves(params)
        rule_here = rule_for_leaves(rule_obj, treedef, len(leaves))
        rule_state = rule_here.init(leaves)
        mine = _placed_like((rule_state, _initial_info(rule_here, leaves, rule_state)), leaves[0])
        return TransformState(inner.init(params), *mine)

    def update_fn(updates: Any, state: TransformState, params: Any = None, *,
                  loss_fn: Callable[[Any], Any] | None = None, value: Any = None, **extra_args: Any):
        if not isinstance(state, TransformState):
            raise TypeError(
                f"`state` of gradnorm.jax.transform's update must be the TransformState from `init` or the previous "
                f"update. Received: {describe(state)}."
            )
        if params is None:
            raise TypeError(
                f"gradnorm.jax.transform (rule '{rule_obj.name}') needs `params` in `update(updates, state, params, "
                f"loss_fn=..., value=...)`: the rule works at the current parameters."
            )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be a callable `loss_fn(params) -> loss`. Received: {describe(loss_fn)}.")
        leaves, treedef = param_leaves(params)
        rule_here = rule_for_leaves(rule_obj, treedef, len(leaves))
        grads = _gradient_leaves(updates, treedef, leaves)
        extra_points = rule_here.grad_evals - 1 + rule_here.hvp_evals
        if extra_points > 0:
            check_position(rule_here.name)  # a clip in front of it in optax.chain, or optax.MultiSteps: warn
        if loss_fn is None and extra_points > 0:
            raise TypeError(
                f"Rule '{rule_here.name}' evaluates the gradient at {extra_points} more point(s) per step: pass "
                f"`loss_fn=lambda p: loss(p, batch)` (the loss on the current batch) to `update`. Received: loss_fn=None."
            )
        passed_on = dict(extra_args)
        if loss_fn is not None:
            passed_on["loss_fn"] = loss_fn
        if value is not None:
            passed_on["value"] = value
            loss = _check_value(value)
        elif loss_fn is not None:
            loss, _ = check_loss_output(loss_fn(params), has_aux)
        else:
            raise TypeError(
                f"gradnorm.jax.transform (rule '{rule_here.name}') needs the loss at `params`: pass `value=loss` to "
                f"`update` (or `loss_fn=`, which then costs one more forward pass). Received neither."
            )
        if global_policy:
            loss, grads = axis_mean((loss, grads), axis_name)
        missing = f"Rule '{rule_here.name}' asked for a gradient at another point: pass `loss_fn=` to `update`."
        fn = None if loss_fn is None else (lambda p, i: loss_fn(p))
        oracle = JaxOracle(fn, treedef, has_aux=has_aux, axis_name=axis_name, reduce=global_policy,
                           missing=missing, first_call=1)
        direction, rule_state, info = rule_here.update_leaves(leaves, state.rule, oracle, loss=loss, grads=grads,
                                                              ops=oracle.ops)
        if axis_name is not None and not global_policy:
            direction, rule_state, info = replicate((direction, rule_state, info), axis_name)
        info = _info_arrays(info, accumulation_dtype(leaves))
        new_updates, base_state = inner.update(treedef.unflatten(direction), state.base, params, **passed_on)
        return new_updates, TransformState(base_state, rule_state, info)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _advertised_signature() -> inspect.Signature:
    """``transform``'s signature with every registered rule's hyperparameter as a keyword
    (default unset), so that ``optax.inject_hyperparams(transform)`` sees ``rho``, ``gamma``, ...
    and can inject them as arrays; ``**hyperparameters`` stays for rules registered later."""
    sig = inspect.signature(transform)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    taken = {p.name for p in params}
    for cls in _rules.REGISTRY.values():
        for h in cls.spec():
            if h.name not in taken:
                taken.add(h.name)
                params.append(inspect.Parameter(h.name, inspect.Parameter.KEYWORD_ONLY, default=_UNSET))
    params.append(inspect.Parameter("hyperparameters", inspect.Parameter.VAR_KEYWORD))
    return sig.replace(parameters=params)


transform.__signature__ = _advertised_signature()  # type: ignore[attr-defined]
