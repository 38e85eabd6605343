r"""Schedules of rule strengths: a value per training step, for any framework.

A schedule is a callable ``schedule(step) -> value``, ``step`` the number of updates taken before
this one (0 at the first update, like optax's ``count`` and a PyTorch LR scheduler's epoch
counter). It answers

* a Python ``int`` with a Python ``float`` (what a PyTorch parameter group or a Keras variable
  takes), and
* a 0-d integer array (a JAX tracer inside ``jax.jit``, ``optax.inject_hyperparams``' count, a
  TensorFlow tensor or variable inside ``tf.function``, a PyTorch tensor) with a 0-d floating
  array of the same library, computed with that library's operations, so that it can be traced
  and compiled once.

The schedules here are small immutable objects (comparable, with a ``to_config()`` of plain data
and a readable ``repr``); any callable of the same signature works wherever one is accepted.
Each adapter applies them in its own idiom:

* PyTorch: ``gradnorm.torch.RuleScheduler(optimizer, schedules)``, stepped like an LR scheduler;
* JAX/optax: ``optax.inject_hyperparams(gradnorm.jax.transform)(base, rule=..., r=schedule)``,
  or ``gradnorm.jax.step(..., r=schedule(count))`` with a step counter;
* TensorFlow/Keras: ``gradnorm.tf.schedules.RuleScheduler`` (a Keras callback), or
  ``gradnorm.tf.step(..., r=schedule(optimizer.iterations))`` inside ``tf.function``.

A strength that is 0 at a step costs what the plain gradient costs there: a Python float 0 (PyTorch
groups, Keras values) takes the rule's static shortcut, and a 0-d array 0 (JAX, ``tf.function``)
makes ``sam``, ``gnp``, ``fd_gr``, ``gam``, ``periodic`` and ``looksam`` skip their extra passes at
run time (``ops.cond``; ``info["grad_evals"]`` reports what ran).

The GR warm-up of Zhao, Zhang and Hu (ICML 2024, "When Will Gradient Regularization Be
Harmful?"; code zhaoyang-0204/gnp, ``gr_warmup_strategy``) is `gnp_warmup`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import array_namespace, is_array
from ._errors import HyperparameterError, describe

__all__ = [
    "GNP_WARMUP_STRATEGIES",
    "Constant",
    "LinearWarmup",
    "Schedule",
    "ZeroUntil",
    "constant",
    "gnp_warmup",
    "linear_warmup",
    "zero_until",
]

GNP_WARMUP_STRATEGIES = ("r", "lambda", "zero")
_DTYPES = ("float32", "float64")


def _number(where: str, name: str, value: Any, *, lo: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) or (
        lo is not None and float(value) < lo
    ):
        expectation = "a finite number" + (f" >= {lo:g}" if lo is not None else "")
        raise HyperparameterError(f"`{name}` of {where} must be {expectation}. Received: {describe(value)}.")
    return float(value)


def _steps(where: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise HyperparameterError(f"`{name}` of {where} must be an integer >= 0. Received: {describe(value)}.")
    return int(value)


def _check_step(schedule: Schedule, step: Any) -> Any:
    """`step` as a Python int, or the 0-d integer array it is; errors name the schedule."""
    if isinstance(step, numbers.Integral) and not isinstance(step, bool):
        if step < 0:
            raise ValueError(f"`step` of {schedule!r} must be >= 0 (the updates taken so far). Received: {step}.")
        return int(step)
    if is_array(step) and tuple(getattr(step, "shape", (1,))) == ():
        xp = array_namespace(step)
        if xp.isdtype(step.dtype, "integral"):
            return step
    raise TypeError(
        f"`step` of {schedule!r} must be an integer >= 0 or a 0-d integer array (the updates taken so far). "
        f"Received: {describe(step)}."
    )


def _default_float(xp: Any) -> Any:
    """The library's default floating dtype (float64 for NumPy and JAX with x64, float32 for JAX
    without, PyTorch's default dtype, float32 for TensorFlow)."""
    return xp.asarray(0.0).dtype


def _float_array(xp: Any, step: Any, dtype: Any) -> Any:
    """``step`` converted to `dtype` (the conversion rounds beyond 2**24 steps in float32, as the
    official code's does)."""
    return xp.astype(step, dtype)


class Schedule:
    """Base class of the schedules here: ``schedule(step) -> value`` (see the module docstring).
    Subclasses implement `_number` (a Python int step) and `_array` (a 0-d integer array step)."""

    def __call__(self, step: Any) -> Any:
        step = _check_step(self, step)
        if isinstance(step, int):
            return self._number(step)
        return self._array(array_namespace(step), step)

    def _number(self, step: int) -> float:
        raise NotImplementedError

    def _array(self, xp: Any, step: Any) -> Any:
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:
        """The schedule as plain data: ``{"schedule": kind, **arguments}``."""
        return {"schedule": type(self).__name__, **{k: getattr(self, k) for k in self.__dataclass_fields__}}  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Constant(Schedule):
    """``value`` at every step (exactly: a Python float for an int step; for an array step, a 0-d
    array of the library's default floating dtype)."""

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _number("gradnorm.schedules.constant", "value", self.value))

    def _number(self, step: int) -> float:
        return self.value

    def _array(self, xp: Any, step: Any) -> Any:
        return _float_array(xp, step, _default_float(xp)) * 0.0 + self.value


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    r"""A linear ramp from 0 to ``target`` over ``warmup_steps`` steps, then ``target``:

    $$ v_t = \mathrm{target} \cdot \min\!\left(1, \frac{t}{w}\right) $$

    with $t$ the updates taken so far (``v_0 = 0``; ``v_t = target`` from $t = w$ on) and
    $w$ = ``warmup_steps``; ``warmup_steps=0`` is ``target`` at every step, exactly.

    ``dtype="float32"`` (default) computes as the official GNP code does. Its ramp
    (``training/utli.py::generate_warmup_fn``) is ``base * jnp.minimum(1, step / (steps_per_epoch *
    warmup_epochs))`` with optax's int32 step count, evaluated in float32 (also under
    ``jax_enable_x64``: an int32 divided by a Python int is float32 in JAX) inside the ``pmap``-ed
    train step, where XLA compiles the division by the constant $w$ into a multiplication by its
    float32 reciprocal. So, with $\mathrm{fl}$ the rounding to float32:

    $$ v_t = \mathrm{fl}\big(\mathrm{fl}(\mathrm{target}) \cdot \min(1,\ \mathrm{fl}(t \cdot \mathrm{fl}(1/w)))\big) $$

    which differs from a correctly rounded $t / w$ by one float32 ulp at some steps; after the
    warm-up ``v_t`` is ``float32(target)``, not ``target`` (and at $t = w$ the product may fall one
    ulp short of 1, as in the official code). ``dtype="float64"`` computes
    ``target * min(1, t / w)`` in double precision. An int step gives the value as a Python float,
    an array step a 0-d array of that dtype.
    """

    target: float
    warmup_steps: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        where = "gradnorm.schedules.linear_warmup"
        object.__setattr__(self, "target", _number(where, "target", self.target))
        object.__setattr__(self, "warmup_steps", _steps(where, "warmup_steps", self.warmup_steps))
        if self.dtype not in _DTYPES:
            raise HyperparameterError(
                f"`dtype` of {where} must be one of {', '.join(map(repr, _DTYPES))}. Received: {describe(self.dtype)}."
            )

    def _number(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.target
        if self.dtype == "float64":
            return self.target * min(1.0, step / self.warmup_steps)
        f32 = np.float32
        fraction = np.minimum(f32(1.0), f32(step) * self._reciprocal32())
        return float(f32(self.target) * fraction)

    def _reciprocal32(self) -> np.float32:
        return np.float32(1.0) / np.float32(self.warmup_steps)

    def _array(self, xp: Any, step: Any) -> Any:
        if self.warmup_steps == 0:
            return Constant(self.target)._array(xp, step)
        t = _float_array(xp, step, xp.float32 if self.dtype == "float32" else xp.float64)
        one = xp.ones_like(t)
        if self.dtype == "float32":  # a multiplication by the float32 reciprocal, as compiled by XLA
            fraction = t * (one * float(self._reciprocal32()))
        else:
            fraction = t / (one * float(self.warmup_steps))
        fraction = xp.where(fraction < one, fraction, one)
        target = one * float(np.float32(self.target)) if self.dtype == "float32" else one * self.target
        return target * fraction


@dataclass(frozen=True)
class ZeroUntil(Schedule):
    """0 for the first ``steps`` steps (``t < steps``), then ``value`` (exactly, as a Python float
    for an int step; an array step gets a 0-d array of the library's default floating dtype).

    With a rule strength this switches the rule off at the start of training: GNP's
    ``"zero"`` warm-up (`gnp_warmup`), or a delayed SAM."""

    value: float
    steps: int

    def __post_init__(self) -> None:
        where = "gradnorm.schedules.zero_until"
        object.__setattr__(self, "value", _number(where, "value", self.value))
        object.__setattr__(self, "steps", _steps(where, "steps", self.steps))

    def _number(self, step: int) -> float:
        return 0.0 if step < self.steps else self.value

    def _array(self, xp: Any, step: Any) -> Any:
        zero = _float_array(xp, step, _default_float(xp)) * 0.0
        return xp.where(step < self.steps, zero, zero + self.value)


def constant(value: float) -> Constant:
    """``value`` at every step."""
    return Constant(value)


def linear_warmup(target: float, warmup_steps: int, *, dtype: str = "float32") -> LinearWarmup:
    """A linear ramp from 0 at step 0 to ``target`` at step ``warmup_steps`` (see `LinearWarmup`)."""
    return LinearWarmup(target, warmup_steps, dtype)


def zero_until(value: float, steps: int) -> ZeroUntil:
    """0 for the first ``steps`` steps, then ``value`` (see `ZeroUntil`)."""
    return ZeroUntil(value, steps)


def gnp_warmup(strategy: str, *, r: float, alpha: float, warmup_steps: int) -> dict[str, Schedule]:
    r"""The GR warm-up of the official GNP code (``gr_warmup_strategy``) as schedules of ``r`` and ``alpha``.

    Returns ``{"r": schedule, "alpha": schedule}`` for rule ``"gnp"``, with $t$ the updates taken so
    far and $w$ = ``warmup_steps`` (the official code shares ``warmup_epochs`` with the learning
    rate's warm-up: $w$ = ``steps_per_epoch * warmup_epochs``):

    * ``"r"``: $r_t = r \min(1, t/w)$ (float32, `LinearWarmup`), $\alpha$ fixed; $\lambda = \alpha r$
      ramps with it.
    * ``"lambda"``: $\alpha_t = \alpha \min(1, t/w)$ (float32), $r$ fixed.
    * ``"zero"``: $r_t = 0$ for $t < w$, then $r$ (`ZeroUntil`), $\alpha$ fixed: the plain gradient,
      one gradient evaluation per step, during the warm-up (the official code runs its plain
      ``train_step`` for the first ``warmup_epochs`` epochs). The ViT CIFAR recipe with GR warm-up
      uses this with $\alpha = 1$, $r = 0.1$.

    The fixed value is a `Constant` (exactly the number given). At $t = 0$ strategies ``"r"`` and
    ``"lambda"`` give a zero strength, for which gradnorm's GNP returns $g$ (see `gradnorm.rules.GNP`
    for the official code's value at that one step with its unit-gradient mix).

    Pass them as the rule's hyperparameters: ``gradnorm.torch.RuleScheduler(opt, schedules)``,
    ``optax.inject_hyperparams(gradnorm.jax.transform)(base, rule="gnp", **schedules)``,
    ``gradnorm.tf.schedules.RuleScheduler(schedules)``.
    """
    where = "gradnorm.schedules.gnp_warmup"
    if not isinstance(strategy, str) or strategy not in GNP_WARMUP_STRATEGIES:
        raise HyperparameterError(
            f"`strategy` of {where} must be one of {', '.join(map(repr, GNP_WARMUP_STRATEGIES))} (the official code's "
            f"gr_warmup_strategy). Received: {describe(strategy)}."
        )
    r = _number(where, "r", r, lo=0.0)
    alpha = _number(where, "alpha", alpha, lo=0.0)
    warmup_steps = _steps(where, "warmup_steps", warmup_steps)
    if strategy == "r":
        return {"r": LinearWarmup(r, warmup_steps), "alpha": Constant(alpha)}
    if strategy == "lambda":
        return {"r": Constant(r), "alpha": LinearWarmup(alpha, warmup_steps)}
    return {"r": ZeroUntil(r, warmup_steps), "alpha": Constant(alpha)}


def check_schedules(schedules: Any, where: str) -> dict[str, Callable[[Any], Any]]:
    """A dict ``{hyperparameter name: schedule}`` (a copy), each schedule callable; errors name `where`."""
    if not isinstance(schedules, Mapping) or not schedules:
        raise TypeError(
            f"`schedules` of {where} must be a non-empty dict {{hyperparameter name: schedule(step) -> value}}, "
            f"for example gradnorm.schedules.gnp_warmup('r', r=0.1, alpha=0.8, warmup_steps=1000). "
            f"Received: {describe(schedules)}."
        )
    for name, schedule in schedules.items():
        if not isinstance(name, str):
            raise TypeError(f"The keys of `schedules` of {where} must be hyperparameter names. Received: {describe(name)}.")
        if not callable(schedule):
            raise TypeError(
                f"`schedules['{name}']` of {where} must be a callable schedule(step) -> value (a "
                f"gradnorm.schedules object or your own function). Received: {describe(schedule)}."
            )
    return dict(schedules)


def __getattr__(name: str) -> Any:
    if name == "RuleSchedulerCallback":  # the Keras callback, imported (with Keras) on first use
        from ._keras_schedule import callback_class

        return callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
