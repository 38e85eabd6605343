"""gradnorm.jax with optax's combinators: the order of ``optax.chain`` and gradient accumulation.

* ``check_position(rule_name)``: called by ``gradnorm.jax.transform`` at trace time. A rule
  with extra gradient evaluations must receive **the raw gradient** of the batch loss as
  ``updates``: it combines that gradient with gradients it evaluates itself through ``loss_fn``,
  which never pass through the transformations in front of it. In
  ``optax.chain(optax.clip_by_global_norm(c), transform(...))`` the clip therefore changes only
  the first of SAM's two gradients, which SAM normalizes away: the clip has no effect (GNP and
  finite-difference GR mix a clipped and an unclipped gradient: a wrong direction). This
  function finds such a transformation in an enclosing ``optax.chain``/``optax.named_chain``
  (by the caller frames, at trace time only) and warns with ``ChainOrderWarning``; it also
  warns when the transform runs inside ``optax.MultiSteps``, which calls it at every
  micro-step (see ``MultiSteps``).
* ``MultiSteps``: ``optax.MultiSteps`` (same arguments, state and ``has_updated``) whose inner
  optimizer runs under ``jax.lax.cond`` on the emitting micro-step only, so a rule's extra
  gradient evaluations are paid once per accumulation cycle instead of at every micro-step.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["ChainOrderWarning", "MultiSteps", "check_position"]


class ChainOrderWarning(UserWarning):
    """A gradnorm transform receives a gradient that an earlier optax transformation changed
    (clipped, scaled, decayed), or runs inside ``optax.MultiSteps`` (which pays its extra
    gradient evaluations at every micro-step). Make it an error with
    ``warnings.simplefilter("error", gradnorm.jax.ChainOrderWarning)``."""


_CHAIN_CODE = optax.chain(optax.identity()).update.__code__
_NAMED_CHAIN_CODE = optax.named_chain(("a", optax.identity())).update.__code__
_IDENTITY_CODE = optax.identity().update.__code__
_MAX_FRAMES = 12  # optax's combinators nest a few frames deep; jax's own frames end the search


def _unwrapped(update: Any) -> Any:
    """The update of the transformation that ``optax.with_extra_args_support`` wrapped (optax.chain
    wraps every member that takes no extra arguments, ``clip_by_global_norm`` among them)."""
    if getattr(update, "__qualname__", "").startswith("with_extra_args_support."):
        for cell in getattr(update, "__closure__", None) or ():
            inner = getattr(cell.cell_contents, "update", None)
            if callable(inner):
                return inner
    return update


def _name(update: Any) -> str:
    """``clip_by_global_norm`` for ``clip_by_global_norm.<locals>.update_fn``."""
    update = _unwrapped(update)
    qualname = getattr(update, "__qualname__", None) or type(update).__name__
    return qualname.split(".<locals>")[0]


def _harmless(update: Any) -> bool:
    """Transformations that pass the gradient on unchanged: ``optax.identity`` and gradnorm's
    own monitors (``gradnorm.jax.diagnostics.monitor``)."""
    update = _unwrapped(update)
    code = getattr(update, "__code__", None)
    return code is _IDENTITY_CODE or getattr(update, "__module__", "").startswith("gradnorm.jax.diagnostics")


def _earlier_in_chain(frame: Any) -> list[str] | None:
    """The names of the members that ran before the current one, if ``frame`` is the update of
    an ``optax.chain``/``optax.named_chain``; ``None`` otherwise."""
    local = frame.f_locals
    if frame.f_code is _CHAIN_CODE and "update_fns" in local and "fn" in local:
        fns = list(local["update_fns"])
        index = next((i for i, f in enumerate(fns) if f is local["fn"]), 0)
        return [_name(f) for f in fns[:index] if not _harmless(f)]
    if frame.f_code is _NAMED_CHAIN_CODE and "transforms" in local and "name" in local:
        names = [n for n, _ in local["transforms"]]
        index = names.index(local["name"]) if local["name"] in names else 0
        return [f"{n!r} ({_name(t.update)})" for n, t in local["transforms"][:index] if not _harmless(t.update)]
    return None


def check_position(rule_name: str) -> None:
    """Warn (``ChainOrderWarning``) when the calling transform receives a gradient changed by an
    earlier member of an enclosing ``optax.chain``, or runs inside ``optax.MultiSteps``.

    Reads the caller frames (trace time only: nothing of this runs in the compiled program) up to
    the first frame outside optax and gradnorm."""
    frame = sys._getframe(2)  # the caller of gradnorm.jax.transform's update
    for _ in range(_MAX_FRAMES):
        if frame is None:
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(("optax", "gradnorm")):
            return
        earlier = _earlier_in_chain(frame)
        if earlier:
            warnings.warn(
                f"gradnorm.jax.transform (rule '{rule_name}') receives `updates` changed by {', '.join(earlier)}, "
                "which comes before it in optax.chain. The rule's own extra gradient evaluations (through `loss_fn`) "
                "do not pass through it, so it does not act on the rule's direction (a clip before 'sam' has no "
                "effect at all). Put it after the rule: `gradnorm.jax.transform(optax.chain(<it>, base), rule=...)` "
                "or `optax.chain(gradnorm.jax.transform(optax.identity(), rule=...), <it>, base)`.",
                ChainOrderWarning, stacklevel=3)
            return
        owner = frame.f_locals.get("self")
        if isinstance(owner, optax.MultiSteps):
            if not isinstance(owner, MultiSteps):
                warnings.warn(
                    f"gradnorm.jax.transform (rule '{rule_name}') inside optax.MultiSteps runs its extra gradient "
                    "evaluations at every micro-step, and MultiSteps discards all but the last. Use "
                    "gradnorm.jax.MultiSteps (the same arguments and state), which runs the rule on the emitting "
                    "micro-step only.", ChainOrderWarning, stacklevel=3)
            return
        frame = frame.f_back


class MultiSteps(optax.MultiSteps):
    """``optax.MultiSteps`` whose inner optimizer runs on the emitting micro-step only.

    The same constructor, state (``optax.MultiStepsState``), ``has_updated`` and results as
    ``optax.MultiSteps``: gradients are accumulated (averaged) over ``every_k_schedule``
    micro-steps, the inner optimizer receives the accumulated gradient at the last one, and every
    other micro-step returns zero updates. ``optax.MultiSteps`` evaluates the inner update at
    every micro-step and keeps it only at the last; here it runs under ``jax.lax.cond``, so with
    ``gradnorm.jax.transform`` inside, a rule's extra gradient evaluations (``sam``: one) are paid
    once per cycle instead of once per micro-step.

    What a rule computes inside: the rule's first gradient is the accumulated gradient (the
    perturbation direction of ``sam`` comes from the whole accumulated batch); its extra gradient
    evaluations call the ``loss_fn`` passed with the emitting (last) micro-step. Pass the loss of
    the last micro-batch (the extra gradients then see that micro-batch only), or a ``loss_fn``
    over the whole accumulated batch (the step is then the rule on the full batch). ``value``
    (and ``info["loss"]``) is the loss given with the last micro-step.

    Example::

        tx = gradnorm.jax.MultiSteps(gradnorm.jax.transform(optax.sgd(0.1), rule="sam", rho=0.05),
                                     every_k_schedule=4)
    """

    def update(self, updates: Any, state: optax.MultiStepsState, params: Any = None,
               **extra_args: Any) -> tuple[Any, optax.MultiStepsState]:
        k_steps = self._every_k_schedule(state.gradient_step)
        should_skip, skip_state = self._should_skip_update_fn(updates, state.gradient_step, params)
        if (should_skip.dtype, should_skip.shape) != (jnp.bool_, ()):
            raise ValueError(
                "`should_skip_update_fn` of gradnorm.jax.MultiSteps must return a boolean scalar array. "
                f"Received: dtype {should_skip.dtype} and shape {should_skip.shape}."
            )
        inner = self._opt
        static = {k: v for k, v in extra_args.items() if not isinstance(v, jax.Array)}
        dynamic = {k: v for k, v in extra_args.items() if isinstance(v, jax.Array)}

        def zero_updates(grads: Any, inner_state: Any, params: Any) -> Any:
            shapes, _ = jax.eval_shape(lambda g, s, p, d: inner.update(g, s, p, **static, **d),
                                       grads, inner_state, params, dynamic)
            return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def emit_step(grads: Any, inner_state: Any, params: Any) -> tuple[Any, Any]:
            new_updates, new_state = inner.update(grads, inner_state, params, **extra_args)
            new_state = jax.tree_util.tree_map(lambda new, old: jnp.astype(new, old.dtype), new_state, inner_state)
            return new_updates, new_state

        def hold_step(grads: Any, inner_state: Any, params: Any) -> tuple[Any, Any]:
            return zero_updates(grads, inner_state, params), inner_state

        def accumulate(updates: Any, state: optax.MultiStepsState, params: Any) -> tuple[Any, optax.MultiStepsState]:
            acc = jax.tree_util.tree_map(lambda g, a: self._acc_update(g, a, n_acc=state.mini_step),
                                         updates, state.acc_grads)
            emit = state.mini_step == (k_steps - 1)
            grads = optax.tree.cast_like(acc, updates)
            new_updates, inner_state = jax.lax.cond(emit, emit_step, hold_step, grads, state.inner_opt_state, params)
            new_state = optax.MultiStepsState(
                mini_step=optax.safe_increment(state.mini_step) % k_steps,
                gradient_step=jnp.where(emit, optax.safe_increment(state.gradient_step), state.gradient_step),
                inner_opt_state=inner_state,
                acc_grads=jax.tree_util.tree_map(
                    lambda a: jnp.astype(jnp.where(emit, jnp.zeros_like(a), a), self._accumulator_dtype), acc),
                skip_state=skip_state,
            )
            return new_updates, new_state

        def skip(updates: Any, state: optax.MultiStepsState, params: Any) -> tuple[Any, optax.MultiStepsState]:
            grads = optax.tree.cast_like(state.acc_grads, updates)
            return zero_updates(grads, state.inner_opt_state, params), state._replace(skip_state=skip_state)

        return jax.lax.cond(should_skip, skip, accumulate, updates, state, params)
