"""Keras 3 ``fit()`` with any gradnorm rule, on the TensorFlow, JAX and PyTorch backends.

A Keras optimizer only ever sees gradients, so a rule that evaluates the loss at perturbed weights
(SAM, GNP, GAM, finite-difference GR) cannot be an optimizer; it replaces ``Model.train_step``
instead. Two forms:

* `GradnormModel(model, rule="sam", rho=0.05)` wraps any model (Sequential, functional or
  subclassed); compile and fit the wrapper. The weights are the inner model's.
* `GradnormTrainStep`, a mixin for your own ``keras.Model`` subclass:
  ``class Net(GradnormTrainStep, keras.Model)``, then ``net.set_rule("sam", rho=0.05)``.

The backend is Keras's (``keras.backend.backend()``, from ``KERAS_BACKEND`` before Keras is
imported); each builds its step on that backend's gradnorm adapter and holds no rule math:

* **tensorflow**: `gradnorm.tf`'s step on the model's variables, inside the training
  ``tf.function`` (XLA with ``jit_compile=True``, ``tf.distribute`` strategies);
* **jax**: a pure step on `gradnorm.jax`'s oracle over ``compute_loss_and_updates``
  (``stateless_call``) and ``optimizer.stateless_apply``, under ``jax.jit``;
* **torch**: `gradnorm.torch`'s live-weights oracle (the closure of `gradnorm.torch.Optimizer`)
  on the model's parameters, eagerly.

Everything else is Keras's: any optimizer (the rule's direction goes to the optimizer in place of
the gradient), losses, metrics, callbacks, validation, ``evaluate``/``predict``, saving.
"""

from __future__ import annotations

import keras as _keras

from ._common import BACKENDS, TrainStepBase
from ._model import make_model_class

__all__ = ["BACKENDS", "GradnormModel", "GradnormTrainStep", "RuleScheduler"]

_backend = _keras.backend.backend()
if _backend == "tensorflow":
    from ._tensorflow import GradnormTrainStep
elif _backend == "jax":
    from ._jax import GradnormTrainStep  # type: ignore[assignment]
elif _backend == "torch":
    from ._torch import GradnormTrainStep  # type: ignore[assignment]
else:  # set_rule and GradnormModel raise a clear error naming the backend
    GradnormTrainStep = TrainStepBase  # type: ignore[assignment, misc]

GradnormTrainStep.__module__ = "gradnorm.keras"
GradnormModel = make_model_class(GradnormTrainStep)

# The warm-up callback of gradnorm.schedules (a Keras callback over `set_rule_hyperparameters`),
# under the name the torch adapter's scheduler has.
from .._keras_schedule import callback_class as _callback_class

RuleScheduler = _callback_class()
