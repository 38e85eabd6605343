"""``gradnorm.jax.data_parallel_step``: the rule step with the batch split over a device mesh
(``jax.shard_map``), with a choice of perturbation policy.

Where the extra gradients of a two-pass rule are taken decides what the rule computes
(USERS.md part C):

* ``"local"`` (default, as in the SAM paper, google-research/sam and the GNP code): every
  device perturbs with the gradient of its own shard, runs the whole rule on it, and the
  directions are averaged: one all-reduce per step (m-sharpness with m = the shard size).
* ``"global"``: every gradient is averaged over the devices before the rule sees it, so the
  step is the single-device rule on the full batch: one all-reduce per gradient evaluation.

Under plain ``jax.jit`` with a batch-sharded input and ``gradnorm.jax.step`` (no
``axis_name``), the loss is the global-batch loss and XLA reduces its gradient across devices:
that is the ``"global"`` policy by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .. import rules as _rules
from .._errors import describe
from .._step import StepResult
from ._common import param_leaves, replicate, rule_for_leaves
from ._step import check_step_options, step

__all__ = ["data_parallel_step"]


def _mesh_axis(mesh: Any, axis_name: Any) -> Any:
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"`mesh` of gradnorm.jax.data_parallel_step must be a jax.sharding.Mesh. Received: {describe(mesh)}.")
    names = tuple(mesh.axis_names)
    if axis_name is None:
        if len(names) != 1:
            raise ValueError(
                f"`axis_name` of gradnorm.jax.data_parallel_step must name the data-parallel axis of a mesh with several "
                f"axes {names}. Received: None."
            )
        return names[0]
    if axis_name not in names:
        raise ValueError(
            f"`axis_name` of gradnorm.jax.data_parallel_step must be one of the mesh's axes {names}. Received: {axis_name!r}."
        )
    return axis_name


def _is_explicit(mesh: Any) -> bool:
    axis_type = getattr(jax.sharding, "AxisType", None)
    types = getattr(mesh, "axis_types", ())
    return axis_type is not None and any(t == axis_type.Explicit for t in types)


def data_parallel_step(
    params: Any,
    loss_fn: Callable[..., Any],
    *args: Any,
    mesh: Any,
    rule: Any,
    state: Any = None,
    axis_name: Any = None,
    perturbation: str = "local",
    has_aux: bool = False,
    key: Any = None,
    same_key: bool = True,
    **hyperparameters: Any,
) -> StepResult:
    """``gradnorm.jax.step`` with every argument in ``args`` split along its first axis over the
    mesh axis ``axis_name`` (``jax.shard_map``); ``params``, ``state`` and ``key`` are replicated.

    Each device evaluates ``loss_fn(params, *shard_args)`` on its shard (the mean over its
    examples); with ``perturbation="local"`` it runs the rule on its own gradient and the
    directions are averaged (``jax.lax.pmean``); with ``"global"`` every gradient is averaged
    first, which equals the single-device rule on the full batch (the shards must be of equal
    size, as ``shard_map`` requires). The result is replicated: ``grad``, ``loss``, ``state``
    and ``info`` are equal on all devices (``info`` averaged, ``finite`` and-ed); with
    ``has_aux`` the aux (model state) is averaged over the devices too (integer leaves: the
    maximum). Jit it yourself; the other arguments are those of ``gradnorm.jax.step``.

    Args:
        mesh: a ``jax.sharding.Mesh``; ``axis_name`` defaults to its only axis.
    """
    rule_obj = _rules.get(rule, **hyperparameters)
    check_step_options(loss_fn, has_aux, same_key, None, perturbation, "gradnorm.jax.data_parallel_step")
    axis = _mesh_axis(mesh, axis_name)
    leaves, treedef = param_leaves(params)
    rule_obj = rule_for_leaves(rule_obj, treedef, len(leaves))
    if state is None:
        state = rule_obj.init(leaves)

    def body(params: Any, state: Any, key: Any, *shards: Any) -> Any:
        res = step(params, loss_fn, *shards, rule=rule_obj, state=state, has_aux=has_aux, key=key, same_key=same_key,
                   axis_name=axis, perturbation=perturbation)
        info = {k: v for k, v in res.info.items() if not isinstance(v, int)}  # static counts are added back below
        loss = res.loss
        if has_aux:
            loss = (loss[0], replicate(loss[1], axis))
        return res.grad, loss, res.state, info

    replicated, split = P(), P(axis)
    if _is_explicit(mesh):
        args = tuple(jax.sharding.reshard(a, NamedSharding(mesh, split)) for a in args)
        params, state, key = jax.sharding.reshard((params, state, key), NamedSharding(mesh, replicated))
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(replicated, replicated, replicated, *([split] * len(args))),
                           out_specs=replicated)
    grad, loss, state, info = mapped(params, state, key, *args)
    # the static counts; a rule whose cost depends on a traced branch (periodic) reported an array, kept
    info = {"grad_evals": rule_obj.grad_evals, "hvp_evals": rule_obj.hvp_evals, **info}
    return StepResult(grad, loss, state, info)
