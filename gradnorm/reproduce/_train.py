"""The training loop, the same code for every backend and every rule.

At every step ``gradnorm.step(params, grad_fn, rule=..., hvp_fn=...)`` turns the minibatch
gradient into the rule's direction and a plain SGD update ``p - lr * d`` (written with the arrays'
own operators, so it runs on any backend) applies it. The JAX backend compiles that step with
``jax.jit`` (once per rule, learning rate and batch shape); the others run it as is."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import gradnorm

__all__ = ["Run", "sgd_update", "step_function", "train"]


@dataclass
class Run:
    """One (configuration, seed) training run."""

    label: str
    rule: str
    hyper: dict[str, Any]
    seed: int
    params: dict[str, np.ndarray] | None = None  # final parameters (NumPy)
    steps: int = 0
    epochs: int = 0
    diverged: bool = False
    reached_target: bool = False
    final_loss: float = float("nan")  # full training loss at the end (when a target is used)
    step_times: list[float] = field(default_factory=list)  # seconds per step: gradnorm.step + update
    grad_evals: int = 0  # per step, from info
    hvp_evals: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)  # per epoch, from the callback
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ms_per_step(self) -> float:
        return float(np.median(self.step_times) * 1e3) if self.step_times else float("nan")


def sgd_update(params: dict[str, Any], direction: dict[str, Any], lr: float) -> dict[str, Any]:
    """``p - lr * d`` leaf by leaf: the base optimizer, on any backend."""
    return {k: p - lr * direction[k] for k, p in params.items()}


def step_function(backend: Any, model: Any, rule: Any, lr: float) -> Callable:
    """``step(params, x, y, state) -> (params, loss, state, info)``: one ``gradnorm.step`` of
    ``rule`` on the minibatch ``(x, y)`` and the SGD update, compiled by the backend where it
    compiles (``jax.jit``; the others run it as is). Cached on the backend per (model, rule, lr), so
    a compiled step is reused across seeds."""
    cache = backend.__dict__.setdefault("_steps", {})
    key = (type(model).__name__, getattr(model, "sizes", None), rule.name,
           tuple(sorted((k, repr(v)) for k, v in rule.config.items())), lr)
    if key not in cache:
        value_and_grad, hvp = backend.oracles(model)

        def step(params, x, y, state):
            res = gradnorm.step(params, lambda p: value_and_grad(p, x, y), rule=rule, state=state,
                                hvp_fn=lambda p, v: hvp(p, v, x, y))
            return sgd_update(params, res.grad, lr), res.loss, res.state, res.info

        cache[key] = backend.compile(step)
    return cache[key]


def train(
    backend: Any,
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    params0: dict[str, np.ndarray],
    *,
    label: str,
    rule: str,
    hyper: dict[str, Any],
    seed: int,
    lr: float,
    batch_size: int,
    max_epochs: int,
    order_seed: int,
    stop_loss: float | None = None,
    check_every: int = 8,
    epoch_callback: Callable[[int, dict[str, np.ndarray]], dict[str, float]] | None = None,
    advance: Callable[[float], None] | None = None,
    max_steps: int | None = None,
) -> Run:
    """Minibatch SGD (``batch_size``, ``lr``) on ``(x, y)`` with the direction of ``rule``.

    The minibatch order comes from ``order_seed`` (the same for every rule with the same seed).
    With ``stop_loss`` the run stops as soon as the full training loss, checked every
    ``check_every`` steps, is at most ``stop_loss`` (or after ``max_epochs``). ``epoch_callback(
    epoch, params)`` returns metrics to append to ``run.history`` after every epoch.
    ``advance(fraction_of_an_epoch)`` reports progress. A run whose loss is not finite stops and
    is marked ``diverged``.
    """
    rule_obj = gradnorm.rules.get(rule, **hyper)
    step = step_function(backend, model, rule_obj, lr)
    params = backend.tree(params0)
    order = np.random.default_rng(order_seed)
    run = Run(label, rule, dict(hyper), seed)
    n = len(x)
    perf = time.perf_counter
    state = None
    done = False

    def full_loss(p: dict[str, Any]) -> float:
        return model.value(backend.tree_numpy(p), x, y)

    for epoch in range(max_epochs):
        perm = order.permutation(n)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = backend.asarray(x[idx]), backend.asarray(y[idx])
            t0 = perf()
            params, loss, state, info = step(params, xb, yb, state)
            backend.sync(params)
            run.step_times.append(perf() - t0)
            run.steps += 1
            if run.steps == 1:
                run.grad_evals, run.hvp_evals = int(info["grad_evals"]), int(info["hvp_evals"])
            if stop_loss is not None and run.steps % check_every == 0:
                value = full_loss(params)
                run.final_loss = value
                if not math.isfinite(value):
                    run.diverged = done = True
                elif value <= stop_loss:
                    run.reached_target = done = True
            elif not math.isfinite(float(loss)):
                run.diverged = done = True
            if done or (max_steps is not None and run.steps >= max_steps):
                done = True
                break
        run.epochs = epoch + 1
        if advance is not None:
            advance(1.0)
        if epoch_callback is not None and not run.diverged:
            for key, value in epoch_callback(epoch + 1, backend.tree_numpy(params)).items():
                run.history.setdefault(key, []).append(value)
        if done:
            break
    run.params = backend.tree_numpy(params)
    if stop_loss is not None and not run.diverged:
        run.final_loss = model.value(run.params, x, y)
        run.diverged = not math.isfinite(run.final_loss)
    return run
