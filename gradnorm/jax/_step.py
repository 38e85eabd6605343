"""``gradnorm.jax.step``: one rule step from a JAX loss function, pure and jit-able."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from .. import rules as _rules
from .._errors import describe
from .._step import StepResult
from ._common import JaxOracle, check_axis_options, param_leaves, replicate, rule_for_leaves

__all__ = ["loss_caller", "step"]


def loss_caller(loss_fn: Callable[..., Any], args: tuple[Any, ...], key: Any, same_key: bool) -> Callable[[Any, int], Any]:
    """``fn(params, i)`` calling ``loss_fn`` for evaluation ``i`` of a step: ``loss_fn(params, *args)``,
    or with a PRNG key ``loss_fn(params, *args, key=k)``, where ``k`` is ``key`` in every evaluation
    (``same_key=True``) or ``key`` in evaluation 0 and ``jax.random.fold_in(key, i)`` in evaluation ``i``."""
    if key is None:
        return lambda p, i: loss_fn(p, *args)
    if same_key:
        return lambda p, i: loss_fn(p, *args, key=key)
    return lambda p, i: loss_fn(p, *args, key=key if i == 0 else jax.random.fold_in(key, i))


def check_step_options(loss_fn: Any, has_aux: Any, same_key: Any, axis_name: Any, perturbation: Any, where: str) -> None:
    if not callable(loss_fn):
        raise TypeError(
            f"`loss_fn` of {where} must be a callable `loss_fn(params, *args) -> loss` "
            f"(or `(loss, aux)` with `has_aux=True`). Received: {describe(loss_fn)}."
        )
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` of {where} must be True or False. Received: {describe(has_aux)}.")
    if not isinstance(same_key, bool):
        raise TypeError(f"`same_key` of {where} must be True or False. Received: {describe(same_key)}.")
    check_axis_options(axis_name, perturbation, where)


def step(
    params: Any,
    loss_fn: Callable[..., Any],
    *args: Any,
    rule: Any,
    state: Any = None,
    has_aux: bool = False,
    key: Any = None,
    same_key: bool = True,
    axis_name: Any = None,
    perturbation: str = "local",
    **hyperparameters: Any,
) -> StepResult:
    """One step of a gradient-regularization rule on a JAX pytree, functionally.

    Pure and jit-able: gradients are ``jax.value_and_grad`` of ``loss_fn``, Hessian-vector
    products (``rule="gr"`` only) forward-over-reverse, ``jax.jvp(jax.grad(loss), (p,), (v,))``.
    Wrap it in ``jax.jit`` yourself (``functools.partial`` over ``loss_fn`` and the
    hyperparameters); nothing is read back to the host.

    Args:
        params: any JAX pytree (dict, list, flax ``FrozenDict``/``nnx.State``, an equinox module
            filtered to its arrays, a registered dataclass, ...) of real floating-point arrays.
        loss_fn: ``loss_fn(params, *args) -> loss`` (a scalar) on the current minibatch, or
            ``(loss, aux)`` with ``has_aux=True``. The rule calls it at ``params`` and at the
            points it needs (perturbed parameters), always with the same ``args``.
        *args: the minibatch and whatever else ``loss_fn`` takes, passed to every evaluation.
        rule: a rule name (``gradnorm.available_rules()``) or a ``gradnorm.rules.Rule``.
        state: the state of the previous step (``None`` to start).
        has_aux: ``loss_fn`` returns ``(loss, aux)``; the aux returned is the one of the
            evaluation at the unperturbed ``params`` (model state such as BatchNorm statistics:
            the perturbed passes do not touch it, as in the reference JAX code of SAM).
        key: a PRNG key for ``loss_fn`` (dropout); with it ``loss_fn`` is called as
            ``loss_fn(params, *args, key=k)``.
        same_key: with ``key``, give every evaluation of the step the same key (default, as the
            reference JAX code of SAM does: the same dropout masks in every pass); ``False``
            gives evaluation ``i`` (0 at ``params``) ``jax.random.fold_in(key, i)``, except that
            evaluation 0 gets ``key`` itself. (A key passed in ``args`` is reused by every pass.)
        axis_name: inside ``jax.shard_map`` (or ``pmap``, ``vmap``) over a data-parallel axis,
            its name; ``loss_fn`` sees this device's shard of the batch.
        perturbation: with ``axis_name``: ``"local"`` (default, as in the SAM and GNP papers):
            each device runs the rule on its own shard and the directions are averaged;
            ``"global"``: every gradient (and HVP) is averaged over the axis first, so the rule
            sees the gradient of the global batch: the single-device rule on the full batch.
        **hyperparameters: the rule's hyperparameters (``rho=0.05``, ...). Python numbers are
            static (compiled in); 0-d arrays are dynamic (schedules, no recompilation).

    Returns:
        ``gradnorm.StepResult(grad, loss, state, info)`` as ``gradnorm.step``: ``grad`` (the
        direction, a tree like ``params``) goes to any optimizer in place of the gradient;
        with ``has_aux=True`` ``loss`` is the pair ``(loss, aux)``, as ``jax.value_and_grad``
        returns it. ``info``: ``loss``, ``grad_norm``, ``update_norm``, ``finite`` (false if
        the loss or the direction has an inf or a NaN), ``grad_evals``, ``hvp_evals`` and the
        rule's own entries. With ``axis_name`` every ``info`` entry, ``loss`` and ``grad``
        are equal on all devices (averaged; ``finite`` is and-ed); ``aux`` stays per device.

    Everything is validated before ``loss_fn`` first runs.

    Example::

        @jax.jit
        def train_step(params, opt_state, x, y):
            res = gradnorm.jax.step(params, loss_fn, x, y, rule="sam", rho=0.05)
            updates, opt_state = opt.update(res.grad, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, res.loss
    """
    rule_obj = _rules.get(rule, **hyperparameters)
    check_step_options(loss_fn, has_aux, same_key, axis_name, perturbation, "gradnorm.jax.step")
    leaves, treedef = param_leaves(params)
    rule_obj = rule_for_leaves(rule_obj, treedef, len(leaves))
    if state is None:
        state = rule_obj.init(leaves)
    reduce_each = axis_name is not None and perturbation == "global"
    oracle = JaxOracle(loss_caller(loss_fn, args, key, same_key), treedef, has_aux=has_aux,
                       axis_name=axis_name, reduce=reduce_each)
    direction, state, info = rule_obj.update_leaves(leaves, state, oracle, ops=oracle.ops)
    if axis_name is not None and not reduce_each:
        direction, state, info = replicate((direction, state, info), axis_name)
    loss = (info["loss"], oracle.first_aux) if has_aux else info["loss"]
    return StepResult(treedef.unflatten(direction), loss, state, info)
