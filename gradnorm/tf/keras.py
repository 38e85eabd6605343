"""Keras ``fit()`` with any gradnorm rule: a ``train_step`` that runs the rule.

A Keras optimizer only ever sees gradients, so a rule that evaluates the loss at perturbed weights
(SAM, GNP, GAM, finite-difference GR) cannot be an optimizer; it replaces ``Model.train_step``
instead (what the tf_keras ``SharpnessAwareMinimization`` model did). Two forms:

* `GradnormModel(model, rule="sam", rho=0.05)` wraps any model (Sequential, functional or
  subclassed); compile and fit the wrapper. The weights are the inner model's.
* `GradnormTrainStep`, a mixin for your own ``keras.Model`` subclass:
  ``class Net(GradnormTrainStep, keras.Model)``, then ``net.set_rule("sam", rho=0.05)``.

Everything else is Keras's: ``compile`` with any optimizer (the rule's direction goes to
``optimizer.apply_gradients`` in place of the gradient, so momentum, Adam, weight decay, clipping,
EMA and schedules behave as usual), losses, metrics, callbacks, validation, ``evaluate`` and
``predict`` (not touched), ``tf.distribute`` strategies. Needs the TensorFlow backend of Keras 3.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import optree
import tensorflow as tf

from .. import rules as _rules
from .._errors import HyperparameterError, describe
from ._guard import WeightGuard, as_variable
from ._step import HVP_MODES, PERTURBATIONS, _Scaling, replica_setup, run_step

__all__ = ["GradnormModel", "GradnormTrainStep"]

_STATE_KEY = "gradnorm_rule_state_"  # prefix of the rule state's entries among a model's own saved variables


def _check_backend() -> None:
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"gradnorm.tf.keras needs the TensorFlow backend of Keras (KERAS_BACKEND=tensorflow). "
            f"Received: {keras.backend.backend()!r}."
        )


class _Settings:
    """The rule and options of a model (plain Python: not tracked, not saved with the weights)."""

    def __init__(self, rule: Any, perturbation: str, same_randomness: bool, hvp: str, hyperparameters: dict[str, Any]):
        self.rule = _rules.get(rule, **hyperparameters)
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"`perturbation` must be one of {', '.join(repr(p) for p in PERTURBATIONS)}. Received: {describe(perturbation)}.")
        if not isinstance(same_randomness, bool):
            raise TypeError(f"`same_randomness` must be True or False. Received: {describe(same_randomness)}.")
        if not isinstance(hvp, str) or hvp not in HVP_MODES:
            raise HyperparameterError(f"`hvp` must be one of {', '.join(repr(m) for m in HVP_MODES)}. Received: {describe(hvp)}.")
        self.perturbation = perturbation
        self.same_randomness = same_randomness
        self.hvp = hvp
        self.runtime: _Runtime | None = None
        self.loaded_state: list[Any] | None = None  # rule state read from a file before the runtime exists


class _Runtime:
    """What a training function needs besides the model: the rule state in variables, a weight
    guard, the count of non-finite steps, and the model's moving statistics and random states."""

    def __init__(self, model: keras.Model, settings: _Settings):
        trainable = [as_variable(v, "trainable_variables", i) for i, v in enumerate(model.trainable_variables)]
        if not trainable:
            raise ValueError("The model has no trainable variables: build it (call it on data) before training with a gradnorm rule.")
        self.trainable = trainable
        self.guard = WeightGuard(trainable)
        self.moving_stats = _moving_stats(model)
        self.random_state = _random_states(model) if settings.same_randomness else []
        # Built in the first trace of the training function (a model that `fit` builds there), the
        # variables are not initialised yet when the rule state is made: it starts from zeros of
        # their shapes then (the built-in rules' states do not depend on the values).
        traced = tf.inside_function()
        with tf.init_scope():
            init = settings.rule.init([tf.zeros(v.shape, v.dtype) if traced else v.read_value() for v in trainable])
            # the state as a pytree: one variable per leaf (a 0-d counter or a parameter-sized buffer)
            leaves, self.state_treedef = optree.tree_flatten(init)
            self.state_vars = [tf.Variable(x, trainable=False, name=f"gradnorm_state_{i}") for i, x in enumerate(leaves)]
            self.nonfinite = tf.Variable(0, dtype=tf.int64, trainable=False, name="gradnorm_nonfinite_steps",
                                         aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        if settings.loaded_state is not None:
            self.load_state(settings.rule, settings.loaded_state)
            settings.loaded_state = None

    def check_state(self, rule: _rules.Rule, values: list[Any]) -> None:
        """A `ValueError` unless saved values fit the rule state."""
        if len(values) != len(self.state_vars) or any(
            tuple(np.shape(x)) != tuple(v.shape) for x, v in zip(values, self.state_vars)
        ):
            raise ValueError(
                f"The saved gradnorm rule state does not fit rule '{rule.name}': it expects leaves of shapes "
                f"{[tuple(v.shape) for v in self.state_vars]}, the file holds {[tuple(np.shape(x)) for x in values]}. "
                f"Load it into a model with the rule it was saved with."
            )

    def load_state(self, rule: _rules.Rule, values: list[Any]) -> None:
        """Set the rule state from saved values, after checking that they fit it."""
        self.check_state(rule, values)
        for v, x in zip(self.state_vars, values):
            v.assign(tf.cast(x, v.dtype), read_value=False)

    def read_state(self) -> Any:
        return optree.tree_unflatten(self.state_treedef, [v.read_value() for v in self.state_vars])

    def write_state(self, state: Any) -> None:
        for v, x in zip(self.state_vars, optree.tree_leaves(state)):
            v.assign(x, read_value=False)


def _check_saved_state(rule: _rules.Rule, variables: list[Any], values: list[Any]) -> None:
    """A `ValueError` unless saved values fit the state `rule` makes for `variables` (its leaves'
    count and shapes), checked before anything is loaded."""
    template = optree.tree_leaves(rule.init([as_variable(v, "trainable_variables", i).read_value()
                                             for i, v in enumerate(variables)]))
    if len(values) != len(template) or any(tuple(np.shape(x)) != tuple(t.shape) for x, t in zip(values, template)):
        raise ValueError(
            f"The file holds a gradnorm rule state of {len(values)} leaves of shapes "
            f"{[tuple(np.shape(x)) for x in values]}; rule '{rule.name}' keeps {len(template)} of shapes "
            f"{[tuple(t.shape) for t in template]}. Load it into a model with the rule it was saved with."
        )


def _moving_stats(model: keras.Model) -> list[tf.Variable]:
    """Floating-point non-trainable weights outside frozen layers (BatchNormalization's moving mean
    and variance): what a training forward pass may update. A frozen layer updates none of its own."""
    layers = model._flatten_layers(include_self=True, recursive=True) if hasattr(model, "_flatten_layers") else [model]
    frozen = {id(w) for layer in layers if not layer.trainable for w in layer.weights}
    out = []
    for i, w in enumerate(model.non_trainable_weights):
        if id(w) not in frozen:
            v = as_variable(w, "non_trainable_weights", i)
            if v.dtype.is_floating:
                out.append(v)
    return out


def _fully_built(model: keras.Model) -> bool:
    layers = model._flatten_layers(include_self=True, recursive=True) if hasattr(model, "_flatten_layers") else [model]
    return all(layer.built for layer in layers) and bool(model.trainable_variables)


def _random_states(model: keras.Model) -> list[tf.Variable]:
    """Integer non-trainable variables that are not weights: Keras ``SeedGenerator`` states."""
    weights = {id(w) for w in model.non_trainable_weights}
    out = []
    for w in model.non_trainable_variables:
        if id(w) in weights:
            continue
        v = as_variable(w, "non_trainable_variables", 0)
        if v.dtype.is_integer:
            out.append(v)
    return out


def _optimizer_scale(optimizer: Any) -> Any:
    """The factor ``optimizer.scale_loss`` multiplies the loss by (1 for a plain optimizer; a
    ``LossScaleOptimizer``'s dynamic scale; ``loss_scale_factor``)."""
    one = tf.constant(1.0, tf.float32)
    scaled = optimizer.scale_loss(one)
    return 1.0 if scaled is one else scaled


class GradnormTrainStep:
    """Mixin that makes ``fit()`` train a ``keras.Model`` with a gradnorm rule.

    ``class Net(GradnormTrainStep, keras.Model): ...`` then ``net.set_rule("sam", rho=0.05)`` before
    ``fit`` (`GradnormModel` does this for a model you already have).

    One training step, with ``L`` the loss ``compile`` defines (``compute_loss``):

    1. the rule evaluates ``L`` and its gradient at the current weights (the pass whose predictions
       update the metrics and whose loss is logged), and at the perturbed weights it asks for, which
       it writes into the model's variables;
    2. the weights are restored exactly (from a copy, bit for bit); BatchNorm moving statistics are
       restored to their values after the first pass, so that they are updated by the pass at the
       unperturbed weights only (as in the JAX reference code of SAM and GNP);
    3. ``optimizer.apply_gradients`` applies the rule's direction in place of the gradient.

    Loss scaling: under ``tf.distribute`` Keras divides the loss by the number of replicas, and a
    ``LossScaleOptimizer`` multiplies it by its dynamic scale; the rule sees the unscaled loss and
    gradients (a flood level compares the true loss), and the direction is scaled back before
    ``apply_gradients``, which undoes both as it does for the plain gradient (a ``LossScaleOptimizer``
    then skips a step whose direction overflowed and lowers its scale, as usual).

    The logs gain ``nonfinite_steps``: how many steps so far had a non-finite loss or direction
    (on any replica). Such a step is applied as Keras applies a non-finite gradient (use a
    ``LossScaleOptimizer`` to skip them, ``TerminateOnNaN`` to stop).

    If a step fails inside the compiled training function (an op raising at the perturbed weights),
    the weights are restored before the exception reaches you (`WeightGuard`).
    """

    _gradnorm_settings: _Settings | None = None

    def set_rule(self, rule: Any = "sam", *, perturbation: str = "local", same_randomness: bool = False,
                 hvp: str = "reverse_over_reverse", **hyperparameters: Any) -> None:
        """Train with `rule` (a name or a ``gradnorm.rules.Rule``) and its hyperparameters.

        Args:
            rule: the rule, e.g. ``"sam"``, ``"gnp"``, ``"fd_gr"``.
            perturbation: under ``tf.distribute``: ``"local"`` (each replica perturbs with the gradient
                of its own minibatch, as in the SAM paper) or ``"global"`` (losses, gradients and HVPs
                are averaged over the replicas first: the rule of the global batch).
            same_randomness: replay the random state of the first pass (Keras ``SeedGenerator``\\ s:
                dropout) in every extra pass. Default False: each pass draws its own masks.
            hvp: Hessian-vector products for ``gr`` (see `gradnorm.tf.step`).
            **hyperparameters: the rule's hyperparameters. Python numbers are constants of the
                compiled step; a ``tf.Variable`` can be changed between steps (by a callback).

        Call ``compile`` again after changing the rule of a model that was trained already.
        """
        _check_backend()
        self._gradnorm_settings = _Settings(rule, perturbation, same_randomness, hvp, hyperparameters)

    @property
    def rule(self) -> _rules.Rule:
        """The gradnorm rule this model trains with."""
        return self._settings().rule

    def _settings(self) -> _Settings:
        settings = self._gradnorm_settings
        if settings is None:
            raise RuntimeError(
                f"{type(self).__name__} trains with a gradnorm rule: call `set_rule(...)` before `fit` "
                f"(or wrap the model: gradnorm.tf.keras.GradnormModel(model, rule=...))."
            )
        return settings

    def _gradnorm_runtime(self, x: Any = None) -> _Runtime:
        settings = self._settings()
        if x is not None and not _fully_built(self):
            # Without a distribution strategy Keras builds the model in the first trace of the
            # training function: call it once, so that its variables exist before the rule's step.
            self(x, training=False)
        runtime = settings.runtime
        trainable = [as_variable(v, "trainable_variables", i) for i, v in enumerate(self.trainable_variables)]
        if runtime is not None and runtime.guard.covers(trainable):
            return runtime
        if runtime is not None and tf.inside_function():
            raise RuntimeError(
                "The model's trainable variables changed since its training function was built: call `compile` again."
            )
        with self.distribute_strategy.scope():
            settings.runtime = _Runtime(self, settings)
        return settings.runtime

    # -- Keras hooks -------------------------------------------------------------------------
    def make_train_function(self, force: bool = False) -> Any:
        if self.train_function is not None and not force:
            return self.train_function
        if _fully_built(self):
            self._gradnorm_runtime()  # variables of the rule state and the guard, created eagerly
        super().make_train_function(force)  # type: ignore[misc]
        compiled = self.train_function
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

    def save_own_variables(self, store: Any) -> None:
        """Keras saving (``save``, ``save_weights``, ``ModelCheckpoint``): the model's own variables
        and, for a rule that keeps one, the rule state (``coherent``'s step count), so that training
        resumed from the file continues the same trajectory."""
        super().save_own_variables(store)  # type: ignore[misc]
        settings = self._gradnorm_settings
        if settings is None:
            return
        if settings.runtime is not None:
            values: list[Any] = [v.numpy() for v in settings.runtime.state_vars]
        elif settings.loaded_state is not None:
            values = settings.loaded_state
        else:
            return  # not trained yet: the state is the rule's initial one
        for i, x in enumerate(values):
            store[f"{_STATE_KEY}{i}"] = x

    def load_own_variables(self, store: Any) -> None:
        """Keras loading: the counterpart of `save_own_variables` (a file without a rule state, such
        as one written before training, leaves the state as it is)."""
        keys = list(store.keys())
        ours = sorted((k for k in keys if str(k).startswith(_STATE_KEY)), key=lambda k: int(str(k)[len(_STATE_KEY):]))
        if not ours:
            super().load_own_variables(store)  # type: ignore[misc]
            return
        # every check before anything is loaded: a refused file leaves the model as it was
        values = [np.asarray(store[k]) for k in ours]
        settings = self._settings()
        if settings.runtime is not None:
            settings.runtime.check_state(settings.rule, values)
        elif self.trainable_variables:  # type: ignore[attr-defined]
            _check_saved_state(settings.rule, self.trainable_variables, values)  # type: ignore[attr-defined]
        super().load_own_variables({k: store[k] for k in keys if k not in ours})  # type: ignore[misc]
        if settings.runtime is not None:
            with self.distribute_strategy.scope():  # type: ignore[attr-defined]
                settings.runtime.load_state(settings.rule, values)
        else:
            settings.loaded_state = values  # set when the training function creates the state

    def train_step(self, data: Any) -> Any:
        settings = self._settings()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        runtime = self._gradnorm_runtime(x)
        first: list[tuple[Any, Any]] = []
        optimizer = self.optimizer
        has_training = getattr(self, "_call_has_training_arg", True)
        compute_loss = getattr(self, "_compute_loss", self.compute_loss)

        def loss_fn() -> Any:
            y_pred = self(x, training=True) if has_training else self(x)
            loss = compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            if not first:
                first.append((y_pred, loss))
            return optimizer.scale_loss(loss)

        replicas, reduce = replica_setup(settings.perturbation)
        res = run_step(runtime.trainable, loss_fn, settings.rule, runtime.read_state(),
                       scaling=_Scaling(replicas, _optimizer_scale(optimizer)), reduce=reduce, hvp=settings.hvp,
                       guard=runtime.guard, moving_stats=runtime.moving_stats, random_state=runtime.random_state)
        runtime.write_state(res.state)
        optimizer.apply_gradients(zip(res.grad, self.trainable_variables))

        y_pred, loss = first[0]
        tracker = getattr(self, "_loss_tracker", None)
        if tracker is not None:  # what Keras's own train_step logs: the loss of the first pass, unscaled
            batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
            tracker.update_state(loss * tf.cast(replicas, loss.dtype), sample_weight=batch)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        bad = tf.cast(tf.logical_not(res.info["finite"]), tf.int64)
        if replicas > 1:
            bad = tf.minimum(tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, bad), 1)
        runtime.nonfinite.assign_add(bad, read_value=False)
        logs = dict(logs)
        logs["nonfinite_steps"] = runtime.nonfinite.read_value()
        return logs


@keras.saving.register_keras_serializable(package="gradnorm")
class GradnormModel(GradnormTrainStep, keras.Model):
    """Any Keras model, trained by ``fit()`` with a gradnorm rule.

    ::

        model = keras.Sequential([...])
        trainer = gradnorm.tf.keras.GradnormModel(model, rule="sam", rho=0.05)
        trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                        loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        trainer.fit(x, y, epochs=10, validation_split=0.1, callbacks=[...])
        model.predict(x)   # the trained weights are the inner model's

    Args:
        model: the model to train (built or not); calling the wrapper calls it.
        rule, perturbation, same_randomness, hvp, **hyperparameters: as `GradnormTrainStep.set_rule`.
        name: the wrapper's name.

    Saving: ``save_weights``/``load_weights`` and checkpoints hold the inner model's weights;
    ``save`` stores the inner model and the rule (Python-number hyperparameters), and
    ``keras.models.load_model`` rebuilds the wrapper. The rule's state (``coherent``'s step count)
    is saved with the wrapper's own variables, so that training resumed from a ``.keras`` file (which
    also holds the optimizer state) or from ``save_weights`` continues the same trajectory.
    """

    def __init__(self, model: keras.Model, rule: Any = "sam", *, perturbation: str = "local",
                 same_randomness: bool = False, hvp: str = "reverse_over_reverse", name: str | None = None,
                 **hyperparameters: Any):
        _check_backend()
        if not isinstance(model, keras.layers.Layer):
            raise TypeError(f"`model` must be a keras.Model (or layer). Received: {describe(model)}.")
        settings = _Settings(rule, perturbation, same_randomness, hvp, hyperparameters)  # validate first
        super().__init__(name=name, dtype=getattr(model, "dtype_policy", None))
        self._convert_input_args = False  # the inner model converts its inputs itself (a float64 model keeps float64)
        self.model = model
        self._gradnorm_settings = settings
        if getattr(model, "built", False):
            self.built = True  # no weights of its own: built when the inner model is

    def call(self, inputs: Any, training: Any = None) -> Any:
        return self.model(inputs, training=training)

    def get_config(self) -> dict[str, Any]:
        settings = self._settings()
        # a wrapped rule (gradnorm.rules.Periodic's `inner`) as its nested config {"rule", "hyperparameters"}
        hyper = settings.rule.to_config()["hyperparameters"]

        def plain(v: Any) -> bool:
            if isinstance(v, dict) and set(v) == {"rule", "hyperparameters"}:
                return all(plain(x) for x in v["hyperparameters"].values())
            return isinstance(v, (int, float, str, bool))

        dynamic = [k for k, v in hyper.items() if not plain(v)]
        if dynamic:
            raise ValueError(
                f"GradnormModel.get_config: hyperparameters {dynamic} are tensors, which a config cannot hold; "
                f"save the inner model (`model.model.save(...)`) or the weights instead."
            )
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.model),
            "rule": settings.rule.name,
            "perturbation": settings.perturbation,
            "same_randomness": settings.same_randomness,
            "hvp": settings.hvp,
            "hyperparameters": hyper,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GradnormModel:
        config = dict(config)
        model = keras.saving.deserialize_keras_object(config.pop("model"))
        hyper = config.pop("hyperparameters", {})
        return cls(model, **config, **hyper)
