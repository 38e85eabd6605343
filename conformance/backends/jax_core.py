"""JAX arrays through ``gradnorm.step``, with ``jax.value_and_grad`` and forward-over-reverse
HVPs, and ``optax.sgd`` as the base optimizer; eagerly and under ``jax.jit``."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import numpy as np
import optree

import gradnorm

from ..problems import Problem
from ..reference import Trajectory
from ..scenarios import Scenario
from . import Backend, flat


def _x64(dtype: str):
    import jax

    if dtype == "float64":
        return jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()
    return contextlib.nullcontext()


class JaxCore(Backend):
    requires = ("jax", "optax")

    def __init__(self, jit: bool):
        self.jit = jit
        self.name = "jax-core-jit" if jit else "jax-core-eager"
        # Eager JAX compiles every op once per shape and dtype, which makes it the slowest
        # backend; float64 is covered under jit, eager runs float32.
        self.dtypes = ("float64", "float32") if jit else ("float32",)
        self.description = (
            "jax arrays, gradnorm.step, jax.value_and_grad + jvp-of-grad hvp_fn, optax.sgd, "
            + ("the whole step under jax.jit" if jit else "eager")
        )

    def covers(self, scenario: Scenario) -> bool:
        # Eager dispatch costs ~0.1 ms per op; the eager backend runs every problem and rule
        # setting with plain SGD (the momentum variants differ only in the optax update).
        return self.jit or scenario.optimizer == "sgd"

    def _setup(self, problem: Problem, dtype: str):
        import jax
        import jax.numpy as jnp

        data = {k: jnp.asarray(v, dtype=dtype) for k, v in problem.data.items()}

        def loss(params: Any) -> Any:
            return problem.loss(jnp, params, data)

        grad_fn = jax.value_and_grad(loss)

        def hvp_fn(params: Any, v: Any) -> Any:
            return jax.jvp(jax.grad(loss), (params,), (v,))[1]

        return grad_fn, hvp_fn

    def run(self, scenario: Scenario, problem: Problem, dtype: str) -> Trajectory:
        with _x64(dtype):
            return self._run(scenario, problem, dtype)

    def _run(self, scenario: Scenario, problem: Problem, dtype: str) -> Trajectory:
        import jax.numpy as jnp
        import optax

        direction = self._direction_fn(scenario.problem, scenario.rule, scenario.hyper, dtype)
        rule = gradnorm.rules.get(scenario.rule, **scenario.hyperparameters)
        update = self._update_fn(scenario.optimizer, scenario.lr, scenario.momentum, dtype)
        params = optree.tree_map(lambda a: jnp.asarray(a, dtype=dtype), problem.params0())
        momentum = scenario.momentum if scenario.optimizer == "momentum" else None
        state, opt_state = rule.init(params), optax.sgd(scenario.lr, momentum=momentum).init(params)
        record, losses = [flat([np.asarray(p) for p in optree.tree_leaves(params)])], []
        for _ in range(scenario.steps):
            grad, state, loss = direction(params, state)
            params, opt_state = update(params, grad, opt_state)
            record.append(flat([np.asarray(p) for p in optree.tree_leaves(params)]))
            losses.append(float(loss))
        return Trajectory(np.array(record), np.array(losses))

    # The rule step and the optimizer update are jitted separately and cached, so scenarios
    # that differ only in the base optimizer share one compilation of the rule.
    @functools.lru_cache(maxsize=None)
    def _direction_fn(self, problem_name: str, rule_name: str, hyper: tuple, dtype: str):
        import jax

        from ..problems import PROBLEMS

        grad_fn, hvp_fn = self._setup(PROBLEMS[problem_name], dtype)
        rule = gradnorm.rules.get(rule_name, **dict(hyper))

        def direction(params, state):
            res = gradnorm.step(params, grad_fn, rule=rule, state=state, hvp_fn=hvp_fn)
            return res.grad, res.state, res.loss

        return jax.jit(direction) if self.jit else direction

    @functools.lru_cache(maxsize=None)
    def _update_fn(self, optimizer: str, lr: float, momentum: float, dtype: str):
        import jax
        import optax

        opt = optax.sgd(lr, momentum=momentum if optimizer == "momentum" else None)

        def update(params, grad, opt_state):
            updates, opt_state = opt.update(grad, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return jax.jit(update) if self.jit else update

    def direction(self, problem, rule, hyper, dtype, params=None):
        import jax
        import jax.numpy as jnp

        with _x64(dtype):
            grad_fn, hvp_fn = self._setup(problem, dtype)
            params = optree.tree_map(lambda a: jnp.asarray(a, dtype=dtype), problem.params0() if params is None else params)

            def direction(params):
                return gradnorm.step(params, grad_fn, rule=rule, hvp_fn=hvp_fn, **hyper).grad

            out = (jax.jit(direction) if self.jit else direction)(params)
            return flat([np.asarray(d) for d in optree.tree_leaves(out)])


BACKENDS = [JaxCore(jit=True), JaxCore(jit=False)]
