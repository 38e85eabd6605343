"""The PyTorch adapter: ``gradnorm.torch.Optimizer`` around ``torch.optim.SGD`` with an
LBFGS-style closure, and the functional ``gradnorm.torch.step`` on ``torch.func``."""

from __future__ import annotations

from typing import Any

import numpy as np
import optree

import gradnorm

from ..problems import Problem
from ..reference import Trajectory
from ..scenarios import Scenario
from . import Backend, flat
from .torch_core import sgd_trajectory


def _data_and_params(problem: Problem, dtype: str, params: Any = None):
    import array_api_compat
    import torch

    tdtype = getattr(torch, dtype)
    data = {k: torch.as_tensor(v, dtype=tdtype) for k, v in problem.data.items()}
    xp = array_api_compat.array_namespace(next(iter(data.values())))
    tree = optree.tree_map(lambda a: torch.as_tensor(np.array(a), dtype=tdtype), problem.params0() if params is None else params)
    return data, xp, tree


class TorchOptimizerBackend(Backend):
    name = "torch-optimizer"
    description = "gradnorm.torch.Optimizer(torch.optim.SGD) with a closure that calls backward"
    requires = ("torch",)

    def _build(self, problem: Problem, dtype: str, rule: str, hyper: dict, lr: float, momentum: float, params: Any = None):
        import torch

        import gradnorm.torch as gt

        data, xp, tree = _data_and_params(problem, dtype, params)
        leaves, treedef = optree.tree_flatten(tree)
        leaves = [leaf.requires_grad_(True) for leaf in leaves]
        opt = gt.Optimizer(leaves, torch.optim.SGD, rule=rule, lr=lr, momentum=momentum, **hyper)

        def closure(create_graph: bool = False):
            opt.zero_grad()
            loss = problem.loss(xp, optree.tree_unflatten(treedef, leaves), data)
            loss.backward(create_graph=create_graph)
            return loss

        return opt, closure, leaves

    def run(self, scenario: Scenario, problem: Problem, dtype: str) -> Trajectory:
        momentum = scenario.momentum if scenario.optimizer == "momentum" else 0.0
        opt, closure, leaves = self._build(problem, dtype, scenario.rule, scenario.hyperparameters, scenario.lr, momentum)
        record, losses = [flat([p.detach().numpy() for p in leaves])], []
        for _ in range(scenario.steps):
            losses.append(float(opt.step(closure)))
            record.append(flat([p.detach().numpy() for p in leaves]))
        return Trajectory(np.array(record), np.array(losses))

    def direction(self, problem, rule, hyper, dtype, params=None):
        opt, closure, leaves = self._build(problem, dtype, rule, hyper, 0.0, 0.0, params)
        opt.step(closure)
        return flat([p.grad.detach().numpy() for p in leaves])  # the direction the base optimizer applied


class TorchFunctionalBackend(Backend):
    name = "torch-functional"
    description = "gradnorm.torch.step (torch.func gradients, forward-over-reverse HVPs), torch.optim.SGD"
    requires = ("torch",)

    def _fns(self, problem: Problem, dtype: str, params: Any = None):
        data, xp, tree = _data_and_params(problem, dtype, params)

        def loss_fn(p):
            return problem.loss(xp, p, data)

        return loss_fn, tree

    def run(self, scenario: Scenario, problem: Problem, dtype: str) -> Trajectory:
        import gradnorm.torch as gt

        loss_fn, tree = self._fns(problem, dtype)
        rule = gradnorm.rules.get(scenario.rule, **scenario.hyperparameters)
        return sgd_trajectory(tree, scenario, lambda params, state: gt.step(params, loss_fn, rule=rule, state=state))

    def direction(self, problem, rule, hyper, dtype, params=None):
        import gradnorm.torch as gt

        loss_fn, tree = self._fns(problem, dtype, params)
        res = gt.step(tree, loss_fn, rule=rule, **hyper)
        return flat([d.numpy() for d in optree.tree_leaves(res.grad)])


BACKENDS = [TorchOptimizerBackend(), TorchFunctionalBackend()]
