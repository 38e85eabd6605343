"""A rule at a zero strength given as a 0-d array: the plain gradient without the extra passes.

A strength given as a Python number is static: a rule checks it when it is built (`is_static_zero`)
and returns the gradient after one evaluation. A 0-d array (a schedule's value, a Keras variable, a
traced value) is known only at run time; `unless_off` then chooses at run time between the plain
gradient and the rule's passes with ``ops.cond`` (``jax.lax.cond`` under ``jax.jit``, ``tf.cond``
under ``tf.function``, a host read of the predicate eagerly), so that a warm-up that switches a rule
off (`gradnorm.schedules.zero_until`) costs one gradient evaluation per step while it is off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._tree import PerLeaf, traced_cond

__all__ = ["dynamic", "all_zero", "any_zero", "unless_off"]


def dynamic(value: Any) -> bool:
    """A 0-d array value, whose zero is known only at run time. A Python number is static; a
    `gradnorm.PerLeaf` is not one value (one leaf at zero strength is not the rule at zero strength)."""
    return not isinstance(value, (float, int, PerLeaf))


def any_zero(xp: Any, values: list[Any]) -> Any:
    """A 0-d boolean array: one of `values` (0-d arrays) is 0."""
    out = None
    for value in values:
        zero = xp.equal(value, 0.0)
        out = zero if out is None else xp.logical_or(out, zero)
    return out


def all_zero(xp: Any, values: list[Any]) -> Any:
    """A 0-d boolean array: every one of `values` (0-d arrays) is 0."""
    out = None
    for value in values:
        zero = xp.equal(value, 0.0)
        out = zero if out is None else xp.logical_and(out, zero)
    return out


def unless_off(
    off: Any,
    grads: list[Any],
    oracle: Any,
    ops: Any,
    penalized: Callable[[list[Any], bool], tuple[list[Any], dict[str, Any]]],
    plain_info: dict[str, Any],
    dtypes: dict[str, Any],
) -> tuple[list[Any], dict[str, Any]]:
    """``(grads, plain_info)`` where the 0-d boolean array `off` is true, else ``penalized(g, donate)``,
    with only the branch taken evaluated, and ``info["grad_evals"]`` what that branch spent.

    `penalized(g, donate)` returns ``(direction, info)`` with the keys of `plain_info`; `g` is the
    gradient list it may donate to the oracle when `donate` is true (eagerly, where the plain branch
    does not run); traced, both branches are traced and it gets a list of its own, donating nothing
    that the plain branch returns. Every `info` entry is cast to ``dtypes[key]`` in both branches
    (``lax.cond`` and ``tf.cond`` need equal types)."""
    xp = ops.xp
    traced = traced_cond(off) is not None
    if traced:  # both branches are traced: the oracle's lazily made values must not be a branch's
        oracle.prepare_traced_branches()
    before = oracle.grad_evals
    ran: list[bool] = []

    def cast(info: dict[str, Any]) -> dict[str, Any]:
        return {k: xp.astype(xp.asarray(v), dtypes[k]) for k, v in info.items()}

    def plain() -> tuple[list[Any], dict[str, Any]]:
        ran.append(False)
        return grads, cast(plain_info)

    def full() -> tuple[list[Any], dict[str, Any]]:
        ran.append(True)
        direction, info = penalized(list(grads) if traced else grads, not traced)
        return direction, cast(info)

    direction, info = ops.cond(off, plain, full, like=grads)
    spent = oracle.grad_evals - before  # the full branch's evaluations (counted where it was traced)
    if ran == [True]:
        spent_now: Any = spent
    elif ran == [False]:
        spent_now = 0
    else:  # both branches traced: what runs depends on the predicate
        spent_now = xp.astype(xp.logical_not(off), xp.int32) * spent
    return direction, {**info, "grad_evals": spent_now}
