"""NumPy through ``gradnorm.step``, with the problems' hand-written gradients and HVPs."""

from __future__ import annotations

from typing import Any

import numpy as np
import optree

import gradnorm

from ..problems import Problem
from ..reference import Trajectory
from ..scenarios import Scenario
from . import Backend, flat


def _cast(tree: Any, dtype: str) -> Any:
    return optree.tree_map(lambda a: np.asarray(a, dtype=dtype), tree)


class NumpyCore(Backend):
    name = "numpy"
    description = "NumPy arrays, gradnorm.step, analytic grad_fn/hvp_fn, NumPy SGD/momentum"
    requires = ("numpy",)

    def _fns(self, problem: Problem, dtype: str):
        data = {k: np.asarray(v, dtype=dtype) for k, v in problem.data.items()}
        return problem.grad_fn(data), problem.hvp_fn(data)

    def run(self, scenario: Scenario, problem: Problem, dtype: str) -> Trajectory:
        grad_fn, hvp_fn = self._fns(problem, dtype)
        rule = gradnorm.rules.get(scenario.rule, **scenario.hyperparameters)
        params = _cast(problem.params0(), dtype)
        state, buf = None, None
        record, losses = [flat(optree.tree_leaves(params))], []
        for _ in range(scenario.steps):
            res = gradnorm.step(params, grad_fn, rule=rule, state=state, hvp_fn=hvp_fn)
            state = res.state
            if scenario.optimizer == "momentum":
                buf = res.grad if buf is None else optree.tree_map(lambda b, d: scenario.momentum * b + d, buf, res.grad)
                update = buf
            else:
                update = res.grad
            params = optree.tree_map(lambda p, u: p - scenario.lr * u, params, update)
            record.append(flat(optree.tree_leaves(params)))
            losses.append(float(res.loss))
        return Trajectory(np.array(record), np.array(losses))

    def direction(self, problem, rule, hyper, dtype, params=None):
        grad_fn, hvp_fn = self._fns(problem, dtype)
        params = _cast(problem.params0() if params is None else params, dtype)
        res = gradnorm.step(params, grad_fn, rule=rule, hvp_fn=hvp_fn, **hyper)
        return flat(optree.tree_leaves(res.grad))


BACKENDS = [NumpyCore()]
