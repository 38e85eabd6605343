"""The TensorFlow backend of `gradnorm.keras`: ``train_step`` on `gradnorm.tf` (its live-weights
step on variables, inside the training ``tf.function``, under ``tf.distribute``, with XLA)."""

from __future__ import annotations

from typing import Any

import keras
import optree
import tensorflow as tf

from .. import rules as _rules
from ..tf._guard import WeightGuard, as_variable
from ..tf._step import _Scaling, replica_setup, run_step
from ._common import RuntimeBase, Settings, TrainStepBase, float_dtype, fully_built, moving_stat_ids, random_state_ids

__all__ = ["GradnormTrainStep"]


class _Runtime(RuntimeBase):
    """What a training function needs besides the model: the rule state and the dynamic
    hyperparameters in variables, a weight guard, the count of non-finite steps, and the model's
    moving statistics and random states."""

    def __init__(self, model: keras.Model, settings: Settings):
        trainable = [as_variable(v, "trainable_variables", i) for i, v in enumerate(model.trainable_variables)]
        if not trainable:
            raise ValueError("The model has no trainable variables: build it (call it on data) before training with a gradnorm rule.")
        self.trainable = trainable
        self.guard = WeightGuard(trainable)
        stats, seeds = moving_stat_ids(model), random_state_ids(model)
        self.moving_stats = [as_variable(w, "non_trainable_weights", i) for i, w in enumerate(model.non_trainable_weights)
                             if id(w) in stats]
        self.random_state = ([as_variable(w, "non_trainable_variables", i) for i, w in enumerate(model.non_trainable_variables)
                              if id(w) in seeds] if settings.same_randomness else [])
        # Built in the first trace of the training function (a model that `fit` builds there), the
        # variables are not initialised yet when the rule state is made: it starts from zeros of
        # their shapes then (the built-in rules' states do not depend on the values).
        traced = tf.inside_function()
        dtype = float_dtype(trainable)
        with tf.init_scope():
            init = settings.rule.init([tf.zeros(v.shape, v.dtype) if traced else v.read_value() for v in trainable])
            # the state as a pytree: one variable per leaf (a 0-d counter or a parameter-sized buffer)
            leaves, self.state_treedef = optree.tree_flatten(init)
            self.state_vars = [tf.Variable(x, trainable=False, name=f"gradnorm_state_{i}") for i, x in enumerate(leaves)]
            self.hyper = {k: tf.Variable(settings.rule.config[k], dtype=dtype, trainable=False, name=f"gradnorm_{k}")
                          for k in settings.dynamic}
            self.nonfinite = tf.Variable(0, dtype=tf.int64, trainable=False, name="gradnorm_nonfinite_steps",
                                         aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.traces = 0  # how many times the step was traced (a test that a hyperparameter change does not retrace)
        if settings.loaded_state is not None:
            self.load_state(settings.rule, settings.loaded_state)
            settings.loaded_state = None

    def _assign_one(self, var: Any, value: Any) -> None:
        var.assign(tf.cast(value, var.dtype), read_value=False)

    def set_hyperparameter(self, name: str, value: float) -> None:
        self.hyper[name].assign(value, read_value=False)

    def read_state(self) -> Any:
        return optree.tree_unflatten(self.state_treedef, [v.read_value() for v in self.state_vars])

    def write_state(self, state: Any) -> None:
        for v, x in zip(self.state_vars, optree.tree_leaves(state)):
            v.assign(x, read_value=False)


def _optimizer_scale(optimizer: Any) -> Any:
    """The factor ``optimizer.scale_loss`` multiplies the loss by (1 for a plain optimizer; a
    ``LossScaleOptimizer``'s dynamic scale; ``loss_scale_factor``)."""
    one = tf.constant(1.0, tf.float32)
    scaled = optimizer.scale_loss(one)
    return 1.0 if scaled is one else scaled


class GradnormTrainStep(TrainStepBase):
    """Mixin that makes ``fit()`` train a ``keras.Model`` with a gradnorm rule (TensorFlow backend).

    One training step, with ``L`` the loss ``compile`` defines (``compute_loss``), by `gradnorm.tf`:

    1. the rule evaluates ``L`` and its gradient at the current weights (the pass whose predictions
       update the metrics and whose loss is logged), and at the perturbed weights it asks for, which
       it writes into the model's variables;
    2. the weights are restored exactly (from a copy, bit for bit); BatchNorm moving statistics are
       restored to their values after the first pass, so that they are updated by the pass at the
       unperturbed weights only (as in the JAX reference code of SAM and GNP);
    3. ``optimizer.apply_gradients`` applies the rule's direction in place of the gradient.

    Loss scaling: under ``tf.distribute`` Keras divides the loss by the number of replicas, and a
    ``LossScaleOptimizer`` multiplies it by its dynamic scale; the rule sees the unscaled loss and
    gradients, and the direction is scaled back before ``apply_gradients``.

    If a step fails inside the compiled training function (an op raising at the perturbed weights),
    the weights are restored before the exception reaches you (`gradnorm.tf.WeightGuard`).
    """

    def _gradnorm_runtime(self, x: Any = None) -> _Runtime:
        settings = self._settings()
        if x is not None and not fully_built(self):
            # Without a distribution strategy Keras builds the model in the first trace of the
            # training function: call it once, so that its variables exist before the rule's step.
            self(x, training=False)  # type: ignore[operator]
        runtime = settings.runtime
        trainable = [as_variable(v, "trainable_variables", i) for i, v in enumerate(self.trainable_variables)]  # type: ignore[attr-defined]
        if runtime is not None and runtime.guard.covers(trainable):
            return runtime
        if runtime is not None and tf.inside_function():
            raise RuntimeError(
                "The model's trainable variables changed since its training function was built: call `compile` again."
            )
        with self.distribute_strategy.scope():  # type: ignore[attr-defined]
            settings.runtime = _Runtime(self, settings)  # type: ignore[arg-type]
        return settings.runtime

    # -- Keras hooks -------------------------------------------------------------------------
    def make_train_function(self, force: bool = False) -> Any:
        if self.train_function is not None and not force:  # type: ignore[attr-defined]
            return self.train_function  # type: ignore[attr-defined]
        if fully_built(self):
            self._gradnorm_runtime()  # variables of the rule state and the guard, created eagerly
        super().make_train_function(force)  # type: ignore[misc]
        compiled = self.train_function  # type: ignore[attr-defined]
        model = self

        def train_function(iterator: Any) -> Any:
            try:
                return compiled(iterator)
            except BaseException:
                runtime = model._settings().runtime
                if runtime is not None:
                    with model.distribute_strategy.scope():
                        runtime.guard.restore()
                raise

        self.train_function = train_function
        return train_function

    def load_own_variables(self, store: Any) -> None:
        with self.distribute_strategy.scope():  # type: ignore[attr-defined]
            super().load_own_variables(store)

    def train_step(self, data: Any) -> Any:
        settings = self._settings()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        runtime = self._gradnorm_runtime(x)
        runtime.traces += 1
        first: list[tuple[Any, Any]] = []
        optimizer = self.optimizer  # type: ignore[attr-defined]
        has_training = getattr(self, "_call_has_training_arg", True)
        compute_loss = getattr(self, "_compute_loss", self.compute_loss)  # type: ignore[attr-defined]

        def loss_fn() -> Any:
            y_pred = self(x, training=True) if has_training else self(x)  # type: ignore[operator]
            loss = compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            if not first:
                first.append((y_pred, loss))
            return optimizer.scale_loss(loss)

        rule: _rules.Rule = settings.rule_with({k: v.read_value() for k, v in runtime.hyper.items()})
        replicas, reduce = replica_setup(settings.perturbation)
        res = run_step(runtime.trainable, loss_fn, rule, runtime.read_state(),
                       scaling=_Scaling(replicas, _optimizer_scale(optimizer)), reduce=reduce, hvp=settings.hvp,
                       guard=runtime.guard, moving_stats=runtime.moving_stats, random_state=runtime.random_state)
        runtime.write_state(res.state)
        optimizer.apply_gradients(zip(res.grad, self.trainable_variables))  # type: ignore[attr-defined]

        y_pred, loss = first[0]
        tracker = getattr(self, "_loss_tracker", None)
        if tracker is not None:  # what Keras's own train_step logs: the loss of the first pass, unscaled
            batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
            tracker.update_state(loss * tf.cast(replicas, loss.dtype), sample_weight=batch)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)  # type: ignore[attr-defined]
        bad = tf.cast(tf.logical_not(res.info["finite"]), tf.int64)
        if replicas > 1:
            bad = tf.minimum(tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, bad), 1)
        runtime.nonfinite.assign_add(bad, read_value=False)
        logs = dict(logs)
        logs["nonfinite_steps"] = runtime.nonfinite.read_value()
        return logs
