"""``gradnorm.schedules.RuleSchedulerCallback``: a Keras callback that sets a model's rule
hyperparameters from schedules before every training batch, on any Keras backend.

The class derives from ``keras.callbacks.Callback``, so it is made (and Keras imported) on first use
(`callback_class`): importing gradnorm imports no framework."""

from __future__ import annotations

import functools
from typing import Any

from ._errors import describe
from .schedules import check_schedules

__all__ = ["callback_class"]

_WHERE = "gradnorm.schedules.RuleSchedulerCallback"


@functools.cache
def callback_class() -> type:
    """The class `RuleSchedulerCallback` (Keras imported here)."""
    import keras

    return type("RuleSchedulerCallback", (_RuleSchedulerCallback, keras.callbacks.Callback),
                {"__module__": "gradnorm.schedules", "__doc__": _RuleSchedulerCallback.__doc__})


class _RuleSchedulerCallback:
    r"""Sets the rule hyperparameters of a gradnorm Keras model from schedules, before every batch.

    Args:
        schedules: ``{hyperparameter name: schedule(step) -> float}`` (`gradnorm.schedules`, such as
            ``gradnorm.schedules.gnp_warmup("zero", r=0.1, alpha=1.0, warmup_steps=W)``, or any callable
            of a Python int).
        verbose: 1 prints the values whenever they change.

    The model must have ``set_rule_hyperparameters(**values)`` (`gradnorm.keras.GradnormModel` and
    models with `gradnorm.keras.GradnormTrainStep`, whose float hyperparameters are variables of the
    compiled step: a change costs no retracing). The step is the model's optimizer's ``iterations``
    when training starts (so a resumed model resumes the schedule), plus the batches trained since;
    the ``t``-th update (from 0) runs with ``schedule(t)``, as optax's count and the official GNP
    code's step do. With ``steps_per_execution > 1`` the values change once per execution (Keras
    calls batch callbacks once per execution). ``history`` holds ``(step, {name: value})`` for every
    batch; at the end of an epoch the last values are added to the logs (and so to ``History``).

    For a custom TensorFlow loop, evaluate a schedule on the step inside ``tf.function``
    (``gradnorm.tf.step(..., r=schedule(optimizer.iterations))``: a 0-d tensor, no retracing).
    """

    def __init__(self, schedules: Any, *, verbose: int = 0):
        super().__init__()
        self.schedules = check_schedules(schedules, _WHERE)
        if isinstance(verbose, bool) or verbose not in (0, 1):
            raise ValueError(f"`verbose` of {_WHERE} must be 0 or 1. Received: {describe(verbose)}.")
        self.verbose = verbose
        self.history: list[tuple[int, dict[str, float]]] = []
        self._start = 0
        self._seen = 0
        self._last: dict[str, float] | None = None

    def _setter(self) -> Any:
        setter = getattr(self.model, "set_rule_hyperparameters", None)
        if not callable(setter):
            raise TypeError(
                f"{_WHERE} sets rule hyperparameters through `model.set_rule_hyperparameters(**values)`: train a "
                f"gradnorm.keras.GradnormModel (or a model with gradnorm.keras.GradnormTrainStep). Received a model "
                f"{describe(self.model)} without that method."
            )
        return setter

    def on_train_begin(self, logs: Any = None) -> None:
        self._setter()  # the error before the first batch
        iterations = getattr(getattr(self.model, "optimizer", None), "iterations", None)
        if iterations is not None:
            import keras

            self._start = int(keras.ops.convert_to_numpy(iterations))
        else:
            self._start = 0
        self._seen = 0
        self._last = None

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        step = self._start + self._seen
        values = {}
        for name, schedule in self.schedules.items():
            value = schedule(step)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"The schedule of `{name}` ({schedule!r}) of {_WHERE} must give a number for an int step. "
                    f"Received at step {step}: {describe(value)}."
                )
            values[name] = float(value)
        if values != self._last:
            self._setter()(**values)
            if self.verbose:
                print(f"step {step}: " + ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
            self._last = values
        self.history.append((step, values))

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._seen += 1

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if logs is not None and self._last is not None:
            logs.update(self._last)
