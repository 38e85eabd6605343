"""``WeightGuard``: a copy of the weights in variables, to put them back after a step that failed
inside a ``tf.function``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from .._errors import describe

__all__ = ["WeightGuard", "as_variable"]


def as_variable(v: Any, argument: str, index: int) -> tf.Variable:
    """The ``tf.Variable`` behind `v`: `v` itself, or the one a ``keras.Variable`` wraps (``.value``
    with the TensorFlow backend)."""
    if isinstance(v, tf.Variable):
        return v
    if not isinstance(v, tf.Tensor):
        inner = getattr(v, "value", None)
        if isinstance(inner, tf.Variable):
            return inner
    raise TypeError(
        f"`{argument}` must be a list of tf.Variable or keras.Variable (e.g. `model.trainable_variables`). "
        f"Element {index} is {describe(v)}."
    )


class WeightGuard:
    """Keeps the weights recoverable when a step fails inside a ``tf.function``.

    Eagerly, `gradnorm.tf.step` restores the weights itself when any pass raises (``try/finally``).
    Inside a ``tf.function`` that is not possible: an op that fails at run time (a
    ``tf.debugging.check_numerics`` at the perturbed weights, an out-of-range label) aborts the whole
    function, after the weights were moved to a perturbed point and before the ops that restore them.
    Give the step a guard and it first copies the weights into the guard's variables and raises the
    guard's flag, and lowers the flag only after the weights are back; after a failed call,
    ``guard.restore()`` (eagerly, outside the function) copies them back if the flag is up::

        guard = gradnorm.tf.WeightGuard(model.trainable_variables)   # eagerly, once

        @tf.function
        def train_step(x, y):
            res = gradnorm.tf.step(model.trainable_variables, lambda: loss_fn(model(x), y),
                                   rule="sam", rho=0.05, guard=guard)
            opt.apply_gradients(zip(res.grad, model.trainable_variables))

        try:
            train_step(x, y)
        except tf.errors.OpError:
            guard.restore()   # bit for bit the weights before the step
            raise

    The copy costs one read and one write of the weights per step. `gradnorm.tf.keras` models use a
    guard of their own and restore automatically. Create it where the weights were created (under the
    same ``tf.distribute`` strategy scope): each replica then keeps its own copy.
    """

    def __init__(self, variables: Sequence[Any]):
        if isinstance(variables, (tf.Variable, tf.Tensor)) or not isinstance(variables, (list, tuple)) or not variables:
            raise TypeError(
                "`variables` of WeightGuard must be a non-empty list of tf.Variable or keras.Variable. "
                f"Received: {describe(variables)}."
            )
        self.variables = [as_variable(v, "variables", i) for i, v in enumerate(variables)]
        with tf.init_scope():
            self.copies = [
                tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name="gradnorm_guard_copy")
                for v in self.variables
            ]
            self.flag = tf.Variable(0, dtype=tf.int32, trainable=False, name="gradnorm_guard_flag")

    def covers(self, variables: Sequence[tf.Variable]) -> bool:
        return len(variables) == len(self.variables) and all(a is b for a, b in zip(variables, self.variables))

    def save(self) -> list[Any]:
        """Copy the weights and raise the flag; returns the ops later writes must follow."""
        writes = [c.assign(v.read_value(), read_value=False) for c, v in zip(self.copies, self.variables)]
        with tf.control_dependencies([w for w in writes if w is not None]):
            raised = self.flag.assign(1, read_value=False)
        return [raised] if raised is not None else []

    def release(self, after: list[Any]) -> None:
        """Lower the flag once the ops in `after` (the writes that restore the weights) have run."""
        with tf.control_dependencies([a for a in after if a is not None]):
            self.flag.assign(0, read_value=False)

    def restore(self) -> bool:
        """Eagerly: if a step was interrupted (the flag is up), copy the saved weights back and lower
        the flag. Returns whether it restored anything."""
        if not tf.executing_eagerly():
            raise RuntimeError("WeightGuard.restore() runs eagerly, after the failed tf.function call returned.")
        if int(self.flag.numpy()) == 0:
            return False
        for v, c in zip(self.variables, self.copies):
            v.assign(c)
        self.flag.assign(0)
        return True
