"""The JAX backend of `gradnorm.keras`: a pure training step on `gradnorm.jax`'s oracle.

Keras's JAX trainer passes the model's state through its training function as arrays
(``trainable``, ``non_trainable``, optimizer and metrics variables). The step here evaluates the loss
at any point with ``compute_loss_and_updates`` (``stateless_call`` plus the compiled loss), lets the
rule run on `gradnorm.jax`'s oracle, and applies the direction with ``optimizer.stateless_apply``.
The rule state, the dynamic hyperparameters and the non-finite count are Keras variables outside
that state; they enter the (jitted) step as arguments and are written back after each step, so a
change of a hyperparameter's value does not retrace.

Non-trainable state: BatchNorm statistics come from the first pass (at the unperturbed weights);
``SeedGenerator`` states (dropout) are replayed from before the first pass in every extra pass with
``same_randomness=True``, or advance from pass to pass otherwise (by what the first pass drew). The HVP of exact GR is taken on the
first pass's loss (its randomness), forward-over-reverse.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import keras
import numpy as np
import optree

from ..jax._common import JaxOracle, param_leaves, rule_for_leaves
from ._common import RuntimeBase, Settings, TrainStepBase, float_dtype, random_state_ids

__all__ = ["GradnormTrainStep"]


class _Oracle(JaxOracle):
    """`gradnorm.jax`'s oracle on ``fn(params, i) -> (scaled loss, aux)``, dividing the loss scale out of
    the answers (the rule sees the true loss and gradients). It keeps the aux of the first pass only
    (``first_aux``: the model's state after it): a rule may trace its other passes inside a
    ``lax.cond`` branch, whose values must not leave it."""

    def __init__(self, fn: Any, treedef: Any, scale: Any):
        super().__init__(fn, treedef, has_aux=True)
        self.scale = scale
        self.in_hvp = False

    def _unscale(self, x: Any) -> Any:
        if self.scale is None:
            return x
        if x.dtype in (jnp.float16, jnp.bfloat16):  # a scale of 2**15 is inf in float16: divide in float32
            return (x.astype(jnp.float32) / self.scale).astype(x.dtype)
        return x / self.scale.astype(x.dtype)

    def _value_and_grad(self, leaves: list[Any]) -> tuple[Any, list[Any]]:
        i, self.calls = self.calls, self.calls + 1
        (_, aux), grads = jax.value_and_grad(self._loss(i), has_aux=True)(self._point(leaves))
        if i == 0:
            self.first_aux = aux
        grads = self._treedef.flatten_up_to(grads)
        return aux[0], [self._unscale(g) for g in grads]  # aux[0]: the unscaled loss of this pass

    def _hvp(self, leaves: list[Any], v: list[Any]) -> list[Any]:
        self.in_hvp = True
        try:
            return [self._unscale(h) for h in super()._hvp(leaves, v)]
        finally:
            self.in_hvp = False


class _Runtime(RuntimeBase):
    """The rule state, the dynamic hyperparameters and the non-finite count, as Keras variables."""

    def __init__(self, model: keras.Model, settings: Settings):
        trainable = list(model.trainable_variables)
        if not trainable:
            raise ValueError("The model has no trainable variables: build it (call it on data) before training with a gradnorm rule.")
        self.n = len(trainable)
        dtype = float_dtype(trainable)
        init = settings.rule.init([jnp.zeros(tuple(v.shape), keras.backend.standardize_dtype(v.dtype)) for v in trainable])
        leaves, self.state_treedef = optree.tree_flatten(init)
        self.state_vars = [keras.Variable(np.asarray(x), dtype=str(x.dtype), trainable=False, autocast=False,
                                          name=f"gradnorm_state_{i}") for i, x in enumerate(leaves)]
        self.hyper = {k: keras.Variable(settings.rule.config[k], dtype=dtype, trainable=False, autocast=False,
                                        name=f"gradnorm_{k}") for k in settings.dynamic}
        self.nonfinite = keras.Variable(0, dtype="int32", trainable=False, autocast=False, name="gradnorm_nonfinite_steps")
        seeds = random_state_ids(model)
        self.seed_index = [j for j, v in enumerate(model.non_trainable_variables) if id(v) in seeds]
        self.trainable_ids = [id(v) for v in trainable]
        self.traces = 0
        if settings.loaded_state is not None:
            self.load_state(settings.rule, settings.loaded_state)
            settings.loaded_state = None


def _loss_scale(optimizer: Any, optimizer_variables: Any) -> Any:
    """The factor ``optimizer.scale_loss`` multiplies the loss by, read in the step's state (None: 1)."""
    one = jnp.asarray(1.0, jnp.float32)
    mapping = list(zip(optimizer.variables, optimizer_variables))
    with keras.StatelessScope(state_mapping=mapping):
        scaled = optimizer.scale_loss(one)
    return None if scaled is one else jnp.asarray(scaled, jnp.float32)


class GradnormTrainStep(TrainStepBase):
    """Mixin that makes ``fit()`` train a ``keras.Model`` with a gradnorm rule (JAX backend).

    One training step, pure and jitted as Keras jits its own (``jit_compile``, default on):

    1. the rule evaluates the loss ``compile`` defines and its gradient at the current weights (the
       pass whose predictions update the metrics and whose loss is logged) and at the points it asks
       for, each by ``compute_loss_and_updates`` with the point as the trainable state;
    2. the model's non-trainable state after the step is the one after the first pass (BatchNorm
       statistics of the unperturbed weights), with the random states advanced as described below;
    3. ``optimizer.stateless_apply`` applies the rule's direction in place of the gradient.

    A ``LossScaleOptimizer`` (or ``loss_scale_factor``) scales the loss as usual; the rule sees the
    unscaled loss and gradients, and the direction is scaled back before the optimizer unscales it.
    """

    _runtime_class = _Runtime

    def make_train_function(self, force: bool = False) -> Any:
        if self.train_function is not None and not force:  # type: ignore[has-type]
            return self.train_function  # type: ignore[has-type]
        from keras.src.distribution import distribution_lib

        if distribution_lib.distribution() is not None:
            raise NotImplementedError(
                "gradnorm.keras on the JAX backend trains on one device: a keras.distribution (DataParallel, "
                "ModelParallel) is not supported. Use gradnorm.jax.step with shard_map for data parallelism."
            )
        runtime = self._gradnorm_runtime()
        step = self._gradnorm_jax_step
        if not self.run_eagerly and self.jit_compile:  # type: ignore[attr-defined]
            step = jax.jit(step, donate_argnums=0)

        def step_function(state: Any, data: Any) -> Any:
            extra = ([v.value for v in runtime.state_vars], {k: v.value for k, v in runtime.hyper.items()},
                     runtime.nonfinite.value)
            logs, state, (leaves, nonfinite) = step(state, extra, data)
            for v, x in zip(runtime.state_vars, leaves):
                v.assign(x)
            runtime.nonfinite.assign(nonfinite)
            return logs, state

        self.train_function = self._make_function(step_function)  # type: ignore[attr-defined]
        return self.train_function

    def _gradnorm_jax_step(self, state: Any, extra: Any, data: Any) -> Any:
        settings = self._settings()
        runtime: _Runtime = settings.runtime
        runtime.traces += 1
        trainable, non_trainable, optimizer_variables, metrics_variables = state
        state_leaves, hyper, nonfinite = extra
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        leaves, treedef = param_leaves(list(trainable), "trainable_variables")
        rule = rule_for_leaves(settings.rule_with(dict(hyper)), treedef, len(leaves))
        rule_state = optree.tree_unflatten(runtime.state_treedef, list(state_leaves))
        optimizer = self.optimizer  # type: ignore[attr-defined]
        scale = _loss_scale(optimizer, optimizer_variables)
        seeds = runtime.seed_index
        before = list(non_trainable)
        oracle: _Oracle

        def seeded(n: Any) -> list[Any]:
            """The non-trainable state before the step with every random state advanced by `n` passes.
            A Keras ``SeedGenerator`` adds a fixed increment per draw, so `n` passes advance it by `n`
            times what the first pass did: pass `i` draws what a chain of passes would, without
            carrying states out of a rule's ``lax.cond`` branch."""
            after = oracle.first_aux[2]
            out = list(before)
            for j in seeds:
                step = after[j] - before[j]
                out[j] = before[j] + jnp.asarray(n).astype(step.dtype) * step
            return out

        def fn(params: Any, i: int) -> Any:
            # evaluation i starts from the step's state; its random states replayed (same_randomness,
            # and the HVP, taken on the first pass's loss) or advanced by i passes (fresh masks)
            fresh = i > 0 and seeds and not settings.same_randomness and not oracle.in_hvp
            return self.compute_loss_and_updates(  # type: ignore[attr-defined]
                list(params), seeded(i) if fresh else before, metrics_variables, x, y, sample_weight,
                training=True, optimizer_variables=optimizer_variables)

        oracle = _Oracle(fn, treedef, scale)
        direction, rule_state, info = rule.update_leaves(leaves, rule_state, oracle, ops=oracle.ops)
        if scale is not None:
            direction = [d * scale.astype(d.dtype) for d in direction]
        trainable, optimizer_variables = optimizer.stateless_apply(optimizer_variables, direction, trainable)
        unscaled_loss, y_pred, non_trainable, metrics_variables = oracle.first_aux
        if seeds and not settings.same_randomness:  # the random states after all the step's passes
            advanced = seeded(info["grad_evals"])
            non_trainable = [advanced[j] if j in seeds else v for j, v in enumerate(non_trainable)]
        logs, metrics_variables = self._update_metrics_variables(  # type: ignore[attr-defined]
            metrics_variables, unscaled_loss, x, y, y_pred, sample_weight)
        nonfinite = nonfinite + jnp.logical_not(info["finite"]).astype(nonfinite.dtype)
        logs = dict(logs)
        logs["nonfinite_steps"] = nonfinite
        new_leaves = [jnp.asarray(a).astype(b.dtype) for a, b in zip(optree.tree_leaves(rule_state), state_leaves)]
        return logs, (trainable, non_trainable, optimizer_variables, metrics_variables), (new_leaves, nonfinite)
