"""JAX arrays through ``gradnorm.step``, with ``jax.value_and_grad`` and forward-over-reverse
HVPs, and ``optax.sgd`` as the base optimizer; eagerly and under ``jax.jit``."""

from __future__ import annotations

import contextlib
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
        self.description = (
            "jax arrays, gradnorm.step, jax.value_and_grad + jvp-of-grad hvp_fn, optax.sgd, "
            + ("the whole step under jax.jit" if jit else "eager")
        )

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
        import jax
        import jax.numpy as jnp
        import optax

        grad_fn, hvp_fn = self._setup(problem, dtype)
        rule = gradnorm.rules.get(scenario.rule, **scenario.hyperparameters)
        momentum = scenario.momentum if scenario.optimizer == "momentum" else None
        opt = optax.sgd(scenario.lr, momentum=momentum)
        params = optree.tree_map(lambda a: jnp.asarray(a, dtype=dtype), problem.params0())

        def one_step(params, state, opt_state):
            res = gradnorm.step(params, grad_fn, rule=rule, state=state, hvp_fn=hvp_fn)
            updates, opt_state = opt.update(res.grad, opt_state, params)
            return optax.apply_updates(params, updates), res.state, opt_state, res.loss

        step = jax.jit(one_step) if self.jit else one_step
        state, opt_state = rule.init(params), opt.init(params)
        record, losses = [flat([np.asarray(p) for p in optree.tree_leaves(params)])], []
        for _ in range(scenario.steps):
            params, state, opt_state, loss = step(params, state, opt_state)
            record.append(flat([np.asarray(p) for p in optree.tree_leaves(params)]))
            losses.append(float(loss))
        return Trajectory(np.array(record), np.array(losses))

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
