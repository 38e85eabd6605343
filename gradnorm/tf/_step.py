"""``gradnorm.tf.step``: one rule step on TensorFlow variables, eagerly or inside ``tf.function``."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from .. import rules as _rules
from .._errors import ClosureError, HyperparameterError, describe
from .._live import LiveWeights
from .._live import same_list as _same_list
from .._oracle import HVP_MODES, PERTURBATIONS
from .._step import StepResult
from .._tree import PerLeaf
from ._guard import WeightGuard, as_variable
from ._ops import TFOps

__all__ = ["HVP_MODES", "PERTURBATIONS", "VariableOracle", "step"]

_ZERO = tf.UnconnectedGradients.ZERO




def _dense(g: Any) -> Any:
    """A gradient as a dense tensor (an embedding's ``tf.IndexedSlices`` is scattered)."""
    return tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g


_HALF = (tf.float16, tf.bfloat16)


class _Scaling:
    """How the loss `loss_fn` returns relates to the loss the rule sees.

    ``loss_fn() = loss * extra / replicas``: `replicas` is the 1/N scaling TensorFlow's
    distribution convention applies (Keras losses and ``tf.nn.compute_average_loss`` inside
    ``strategy.run``), `extra` any other factor (a Keras optimizer's loss scale, or the user's
    `loss_scale`). `unscale` maps `loss_fn`'s values to the rule's, `rescale` maps the rule's direction
    back to the scale of `loss_fn`'s gradient (what ``optimizer.apply_gradients`` expects).
    Float16 and bfloat16 values are scaled in float32 (a loss scale such as 65536 is ``inf`` in
    float16) and rounded once.
    """

    def __init__(self, replicas: int = 1, extra: Any = 1.0):
        self.replicas = replicas
        self.extra = extra
        self.trivial = replicas == 1 and isinstance(extra, (int, float)) and extra == 1

    def unscale(self, x: Any) -> Any:
        half = x.dtype in _HALF
        if half:  # a loss scale of 65536 is inf in float16: divide in float32
            dtype, x = x.dtype, tf.cast(x, tf.float32)
        if self.replicas != 1:
            x = x * tf.constant(float(self.replicas), x.dtype)
        if not (isinstance(self.extra, (int, float)) and self.extra == 1):
            x = x / tf.cast(self.extra, x.dtype)
        return tf.cast(x, dtype) if half else x

    def rescale(self, x: Any) -> Any:
        half = x.dtype in _HALF
        if half:
            dtype, x = x.dtype, tf.cast(x, tf.float32)
        if not (isinstance(self.extra, (int, float)) and self.extra == 1):
            x = x * tf.cast(self.extra, x.dtype)
        if self.replicas != 1:
            x = x / tf.constant(float(self.replicas), x.dtype)
        return tf.cast(x, dtype) if half else x


class VariableOracle(LiveWeights):
    """The gradnorm oracle of one step on variables: `loss_fn()` reads the variables, so the loss at a
    point is evaluated by writing the point into them and taping ``loss_fn()``.

    The live-weights state machine (which point the variables hold, the snapshot, the moving
    statistics of the first pass, randomness replay, exact restore) is `gradnorm._live.LiveWeights`;
    this class supplies TensorFlow's hooks:

    * the rule's view of the parameters is the variables' values read before the step
      (``read_value``: a copy that later writes do not change, so the snapshot costs nothing more);
    * a pass is ``tf.GradientTape`` over ``loss_fn()`` (``tf.IndexedSlices`` made dense, a variable
      the loss does not use gets zeros);
    * a point along a direction is formed in the variables with ``assign_add`` (no parameter-sized
      temporary; the same bits as computing it);
    * ``hvp(point, v)``: ``"reverse_over_reverse"`` differentiates the first pass's gradient once
      more along `v` with the tape that recorded it (``tape.gradient(grads, variables,
      output_gradients=v)``; H is symmetric), so exact GR costs one extra backward-of-backward;
      ``"forward_over_reverse"`` runs a new pass under ``tf.autodiff.ForwardAccumulator`` and takes
      the JVP of the gradient.

    Values are unscaled (`_Scaling`) and, with ``reduce`` (a replica context, `perturbation="global"`),
    averaged over the replicas before the rule sees them. The caller restores the variables with
    :meth:`restore` (in a ``finally``); every write waits for the guard's copy (`guard_ops`).
    """

    def __init__(self, variables: list[tf.Variable], loss_fn: Callable[[], Any], point: list[Any], *,
                 has_hvp: bool, hvp_mode: str, scaling: _Scaling, reduce: Any, acc_dtype: Any, ops: TFOps,
                 moving_stats: Sequence[tf.Variable] = (), random_state: Sequence[tf.Variable] = (),
                 guard_ops: list[Any] | None = None):
        super().__init__(point, ops, has_hvp=has_hvp, same_randomness=bool(random_state))
        self.variables = variables
        self.loss_fn = loss_fn
        self.hvp_mode = hvp_mode
        self.scaling = scaling
        self.reduce = reduce
        self.acc_dtype = acc_dtype
        self.moving_stats = list(moving_stats)
        self.random_state = list(random_state)
        self.guard_ops = guard_ops or []  # a perturbation must wait for these (the guard's copy)
        self._recorded: tuple[list[Any], Any, list[Any]] | None = None  # (point, tape, raw grads) for an HVP

    # -- LiveWeights hooks ---------------------------------------------------------------
    def _take_snapshot(self) -> None:
        pass  # the view holds values read before the step: later writes do not change them

    def _writing(self) -> Any:
        """The context of every write that moves the weights: in a graph, the write waits for the
        guard's copy (a ``tf.function`` orders the ops on one variable by program order, but not
        writes to the weights after writes to the guard's variables)."""
        return tf.control_dependencies(self.guard_ops) if self.guard_ops else contextlib.nullcontext()

    def _assign(self, values: list[Any]) -> list[Any]:
        with self._writing():
            return [var.assign(value, read_value=False) for var, value in zip(self.variables, values)]

    def _assign_axpy(self, step: Any, v: list[Any]) -> None:
        with self._writing():
            self.ops.assign_axpy(step, list(v), self.variables)

    def _read_rng(self) -> Any:
        return [r.read_value() for r in self.random_state]

    def _write_rng(self, state: Any) -> None:
        for r, value in zip(self.random_state, state):
            r.assign(value, read_value=False)

    def _read_side_state(self) -> Any:
        return [m.read_value() for m in self.moving_stats] if self.moving_stats else None

    def _write_side_state(self, saved: Any) -> list[Any]:
        return [m.assign(value, read_value=False) for m, value in zip(self.moving_stats, saved)]

    def _evaluate(self, first: bool) -> tuple[Any, list[Any]]:
        if first and self.has_hvp and self.hvp_mode == "reverse_over_reverse":
            # keep the tape that recorded the gradient, to differentiate it once more
            with tf.GradientTape(watch_accessed_variables=False) as outer:
                outer.watch(self.variables)
                loss, grads = self._loss_and_grads()
            self._recorded = (list(self.at or ()), outer, grads)
        else:
            loss, grads = self._loss_and_grads()
        return self._finish(loss, grads)

    # -- evaluation ----------------------------------------------------------------------
    def _loss_and_grads(self) -> tuple[Any, list[Any]]:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self.variables)
            loss = self.loss_fn()
        if not isinstance(loss, (tf.Tensor, tf.Variable)):
            raise ClosureError(f"`loss_fn` must return the loss as a scalar tensor. Received: {describe(loss)}.")
        if loss.shape.rank not in (0, None):
            raise ClosureError(
                f"`loss_fn` must return a scalar loss (shape ()); reduce it first, e.g. with tf.reduce_mean. "
                f"Received: shape {tuple(loss.shape)}."
            )
        if not loss.dtype.is_floating:
            raise ClosureError(f"`loss_fn` must return a real floating-point loss. Received: dtype {loss.dtype.name}.")
        grads = tape.gradient(loss, self.variables, unconnected_gradients=_ZERO)
        return loss, [_dense(g) for g in grads]

    def _finish(self, loss: Any, grads: list[Any]) -> tuple[Any, list[Any]]:
        if not self.scaling.trivial:
            loss, grads = self.scaling.unscale(loss), [self.scaling.unscale(g) for g in grads]
        if loss.dtype != self.acc_dtype:
            loss = tf.cast(loss, self.acc_dtype)
        if self.reduce is not None:
            loss, grads = self.reduce.all_reduce(tf.distribute.ReduceOp.MEAN, (loss, grads))
            grads = list(grads)
        return loss, grads

    def _hvp(self, point: list[Any], v: list[Any]) -> list[Any]:
        point, v = list(point), [tf.cast(a, var.dtype) if a.dtype != var.dtype else a for a, var in zip(v, self.variables)]
        recorded = self._recorded
        if recorded is not None and _same_list(point, recorded[0]) and self.holds(point):
            self._recorded = None  # one HVP per recorded gradient
            _, tape, grads = recorded
            hv = tape.gradient(grads, self.variables, output_gradients=v, unconnected_gradients=_ZERO)
        else:
            self.move_to(point)
            self.begin_pass()
            with tf.autodiff.ForwardAccumulator(self.variables, v) as acc:
                _, grads = self._loss_and_grads()
            hv = acc.jvp(grads, unconnected_gradients=_ZERO)
        hv = [_dense(h) for h in hv]
        if not self.scaling.trivial:
            hv = [self.scaling.unscale(h) for h in hv]
        if self.reduce is not None:
            hv = list(self.reduce.all_reduce(tf.distribute.ReduceOp.MEAN, hv))
        return hv

    def restore(self) -> list[Any]:
        writes = super().restore()
        self._recorded = None
        return writes


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_TINY = float(np.finfo(np.float32).smallest_subnormal)


def check_loss_scale(loss_scale: Any) -> Any:
    """`loss_scale` if it is a number that is finite, > 0 and a float32 (neither overflowing to inf nor
    underflowing to 0 when the gradients are divided by it), or a 0-d floating-point tensor; else a
    `HyperparameterError` naming it. A tensor's value is not checked: that would read it back to the
    host, which is impossible inside ``tf.function`` (a zero or non-finite tensor shows as
    ``info["finite"]`` false)."""
    if isinstance(loss_scale, (tf.Tensor, tf.Variable)):
        if loss_scale.shape.rank == 0 and loss_scale.dtype.is_floating:
            return loss_scale
    elif isinstance(loss_scale, numbers.Real) and not isinstance(loss_scale, bool):
        try:
            value = float(loss_scale)
        except OverflowError:  # an int too large for a float
            value = math.inf
        if math.isfinite(value) and _FLOAT32_TINY <= value <= _FLOAT32_MAX:
            return value
    raise HyperparameterError(
        f"`loss_scale` must be None, a finite number > 0 that float32 represents (from {_FLOAT32_TINY:g} to "
        f"{_FLOAT32_MAX:g}), or a 0-d floating-point tensor (whose value is not checked). Received: {describe(loss_scale)}."
    )


def _check_variables(variables: Any, argument: str, *, floating: bool, allow_empty: bool = False) -> list[tf.Variable]:
    if isinstance(variables, (tf.Variable, tf.Tensor)) or not isinstance(variables, (list, tuple)):
        raise TypeError(
            f"`{argument}` must be a list of tf.Variable or keras.Variable (e.g. `model.trainable_variables`). "
            f"Received: {describe(variables)}."
        )
    if not variables and not allow_empty:
        raise TypeError(f"`{argument}` must contain at least one variable. Received an empty list.")
    out = [as_variable(v, argument, i) for i, v in enumerate(variables)]
    if floating:
        for i, v in enumerate(out):
            if not v.dtype.is_floating:
                raise TypeError(
                    f"Every variable in `{argument}` must have a floating-point dtype. Element {i} ({v.name}) has dtype "
                    f"{v.dtype.name}."
                )
    return out


def _with_cast_hyperparameters(rule: _rules.Rule, dtype: Any) -> _rules.Rule:
    """The rule with its 0-d tensor hyperparameters cast to `dtype` (the dtype of the norms and the
    loss the rule sees): TensorFlow does not promote float32 and float64 in one operation."""
    changes = {}
    for name, value in rule.config.items():
        if isinstance(value, (tf.Tensor, tf.Variable)) and value.dtype != dtype:
            changes[name] = tf.cast(value, dtype)
        elif isinstance(value, PerLeaf) and any(isinstance(x, (tf.Tensor, tf.Variable)) for x in value.values):
            changes[name] = PerLeaf([tf.cast(x, dtype) if isinstance(x, (tf.Tensor, tf.Variable)) else x
                                     for x in value.leaf_values()])
    return rule.replace(**changes) if changes else rule


def replica_setup(perturbation: str) -> tuple[int, Any]:
    """`(number of replicas, replica context to average over or None)` for a step in the current
    ``tf.distribute`` context."""
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"`perturbation` must be one of {', '.join(repr(p) for p in PERTURBATIONS)}. Received: {describe(perturbation)}.")
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        raise RuntimeError(
            "gradnorm.tf.step runs once per replica: call it inside `strategy.run(...)`, not in the cross-replica "
            "context of a tf.distribute strategy."
        )
    replicas = ctx.num_replicas_in_sync
    return replicas, (ctx if perturbation == "global" and replicas > 1 else None)


def run_step(variables: list[tf.Variable], loss_fn: Callable[[], Any], rule: _rules.Rule, state: Any, *,
             scaling: _Scaling, reduce: Any, hvp: str, guard: WeightGuard | None,
             moving_stats: Sequence[tf.Variable] = (), random_state: Sequence[tf.Variable] = ()) -> StepResult:
    """The step on validated arguments (shared by `step` and the Keras models)."""
    guard_ops = guard.save() if guard is not None else []
    point = [v.read_value() for v in variables]
    acc = tf.float64 if any(v.dtype == tf.float64 for v in variables) else tf.float32
    rule = _with_cast_hyperparameters(rule, acc)
    ops = TFOps()
    if state is None:
        state = rule.init(point)
    oracle = VariableOracle(variables, loss_fn, point, has_hvp=rule.needs_hvp, hvp_mode=hvp, scaling=scaling,
                            reduce=reduce, acc_dtype=acc, ops=ops, moving_stats=moving_stats,
                            random_state=random_state, guard_ops=guard_ops)
    try:
        direction, state, info = rule.update_leaves(oracle.view, state, oracle, ops=ops)
    finally:
        writes = oracle.restore()
        if guard is not None:
            guard.release(writes)
    if not scaling.trivial:
        direction = [scaling.rescale(d) for d in direction]
    return StepResult(direction, info["loss"], state, info)


@tf.autograph.experimental.do_not_convert
def step(
    variables: Sequence[Any],
    loss_fn: Callable[[], Any],
    *,
    rule: Any,
    state: Any = None,
    perturbation: str = "local",
    loss_scale: Any = None,
    hvp: str = "reverse_over_reverse",
    moving_stats: Sequence[Any] = (),
    random_state: Sequence[Any] = (),
    guard: WeightGuard | None = None,
    **hyperparameters: Any,
) -> StepResult:
    r"""One rule step on TensorFlow variables: the direction to hand to ``optimizer.apply_gradients``.

    The TensorFlow idiom: `loss_fn()` takes no arguments and reads the variables (a Keras model's
    weights, ``tf.Variable``\ s). The rule evaluates it at the current values, and at the perturbed
    points it asks for by writing them into the variables (``assign``/``assign_add``); afterwards
    the variables hold their original values again, bit for bit (also when a pass raises, eagerly:
    ``try``/``finally``; for failures inside ``tf.function`` see `WeightGuard`). Gradients come
    from ``tf.GradientTape``; Hessian-vector products (``rule="gr"`` only) from the tape that
    recorded the gradient (`hvp`).

    Works eagerly and inside ``tf.function``. Under ``tf.function`` the rule's Python code runs once,
    while tracing, as plain Python (AutoGraph does not convert gradnorm's code or `loss_fn`, as Keras 3
    does not convert its layers; write data-dependent control flow in `loss_fn` with ``tf.cond`` or
    ``tf.where``): hyperparameters given as Python numbers are constants of the trace (changing one
    retraces; a zero strength takes the exact one-pass shortcut), 0-d tensors and ``tf.Variable``\ s
    are read at run time (schedules without retracing). Nothing here makes the function retrace from
    step to step.

    Args:
        variables: the trainable variables, a list of ``tf.Variable`` or ``keras.Variable``
            (``model.trainable_variables``), of floating-point dtypes.
        loss_fn: ``loss_fn() -> scalar tensor`` on the current minibatch, e.g.
            ``lambda: loss_object(y, model(x, training=True))``. Called once per gradient evaluation;
            every call must see the same minibatch.
        rule: a rule name (see ``gradnorm.available_rules()``) or a ``gradnorm.rules.Rule``.
        state: the state of the previous step (``None`` to start; only ``coherent`` keeps one).
        perturbation: inside ``tf.distribute`` (``strategy.run``) with more than one replica:
            ``"local"`` (default, as in the SAM and GNP papers) lets every replica compute the rule on
            its own minibatch; ``"global"`` averages the loss, every gradient and every
            Hessian-vector product over the replicas before the rule sees them, so every replica
            computes the rule of the global batch (two all-reduces per extra pass). Ignored with
            one replica.
        loss_scale: what `loss_fn`'s value is multiplied by relative to the loss the rule should
            see (a number or a 0-d tensor). Default: ``1 / num_replicas_in_sync`` inside
            ``strategy.run``, TensorFlow's convention (Keras losses and
            ``tf.nn.compute_average_loss`` scale so; the replicas' gradients then *sum* to the
            global gradient), else 1. Give it for other scalings, e.g. a fixed float16 loss scale.
            The rule sees ``loss_fn() / loss_scale`` and its gradients (so a flood level or a
            perturbation radius means the same as without distribution); the returned ``grad`` is
            scaled back (``grad * loss_scale``), in the scale of ``tape.gradient(loss_fn(), ...)``,
            so ``optimizer.apply_gradients`` treats it as it would the plain gradient. A number must
            be finite, > 0 and representable in float32 (an `HyperparameterError` otherwise); a 0-d
            tensor's value cannot be checked without reading it back to the host (impossible inside
            ``tf.function``), so a zero or non-finite tensor is not refused: it shows as
            ``info["finite"]`` false.
        hvp: for ``gr``: ``"reverse_over_reverse"`` (default: the first pass is recorded by an outer
            tape and its gradient differentiated along g, one extra backward-of-backward; measured
            faster on CPU than the alternative, see the benchmark) or ``"forward_over_reverse"``
            (a new pass under ``tf.autodiff.ForwardAccumulator``).
        moving_stats: variables a forward pass updates whose value must come from the pass at the
            unperturbed weights only (BatchNorm's moving mean and variance, e.g.
            ``model.non_trainable_weights``): put back to their values after the first pass once the
            extra passes are done.
        random_state: variables holding random-generator state (Keras ``SeedGenerator`` states,
            ``tf.random.Generator.state``): reset before every extra pass to their values before the
            first, so that dropout draws the same masks at the perturbed points (as the JAX reference
            code of SAM, which reuses its PRNG key). Default: fresh randomness in every pass.
        guard: a `WeightGuard` of `variables`, for recovery from failures inside ``tf.function``.
        **hyperparameters: the rule's hyperparameters (``rho=0.05``, ``gamma=0.1``, ...).

    Returns:
        ``gradnorm.StepResult(grad, loss, state, info)`` like ``gradnorm.step``: ``grad`` a list of
        tensors matching `variables`, ready for ``optimizer.apply_gradients(zip(res.grad,
        variables))``; ``loss`` the loss at the current weights (unscaled, see `loss_scale`;
        averaged over replicas with ``perturbation="global"``); ``info`` with ``finite`` (loss and
        direction finite: non-finite gradients are reported, not hidden), ``grad_norm``,
        ``update_norm``, the evaluation counts and the rule's own entries.

    Everything is validated before `loss_fn` first runs (the rule and its hyperparameters, the
    variables, the options); a zero gradient gives a zero perturbation, never NaN.

    Example::

        @tf.function
        def train_step(x, y):
            res = gradnorm.tf.step(model.trainable_variables,
                                   lambda: loss_object(y, model(x, training=True)), rule="sam", rho=0.05)
            optimizer.apply_gradients(zip(res.grad, model.trainable_variables))
            return res.loss
    """
    rule_obj = _rules.get(rule, **hyperparameters)
    tvars = _check_variables(variables, "variables", floating=True)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be a callable `loss_fn() -> scalar tensor` that reads the variables. Received: {describe(loss_fn)}.")
    if not isinstance(hvp, str) or hvp not in HVP_MODES:
        raise HyperparameterError(
            f"`hvp` of gradnorm.tf.step must be one of {', '.join(repr(m) for m in HVP_MODES)}. Received: {describe(hvp)}."
        )
    stats = _check_variables(moving_stats, "moving_stats", floating=False, allow_empty=True)
    randomness = _check_variables(random_state, "random_state", floating=False, allow_empty=True)
    if guard is not None and not (isinstance(guard, WeightGuard) and guard.covers(tvars)):
        raise TypeError(
            f"`guard` must be None or a gradnorm.tf.WeightGuard made from the same `variables`. Received: {describe(guard)}."
        )
    replicas, reduce = replica_setup(perturbation)
    scaling = _Scaling(replicas) if loss_scale is None else _Scaling(1, check_loss_scale(loss_scale))
    if state is not None and not isinstance(state, rule_obj.state_type):
        raise TypeError(
            f"`state` of rule '{rule_obj.name}' must be a {rule_obj.state_type.__name__} (from the previous step's "
            f"result; pass `state=None` to start). Received: {describe(state)}."
        )
    return run_step(tvars, loss_fn, rule_obj, state, scaling=scaling, reduce=reduce, hvp=hvp, guard=guard,
                    moving_stats=stats, random_state=randomness)
