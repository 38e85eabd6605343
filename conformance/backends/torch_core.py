"""PyTorch tensors through ``gradnorm.step``, with torch.autograd gradients and
double-backward HVPs, and ``torch.optim.SGD`` as the base optimizer."""

from __future__ import annotations

from typing import Any

import numpy as np
import optree

import gradnorm

from ..problems import Problem
from ..reference import Trajectory
from ..scenarios import Scenario
from . import Backend, flat


def sgd_trajectory(params: Any, scenario: Scenario, step: Any) -> Trajectory:
    """Run ``step(params, state) -> StepResult`` for ``scenario.steps`` steps, applying each
    direction with ``torch.optim.SGD`` (momentum as the scenario says), and record it."""
    import torch

    leaves, treedef = optree.tree_flatten(params)
    momentum = scenario.momentum if scenario.optimizer == "momentum" else 0.0
    opt = torch.optim.SGD(leaves, lr=scenario.lr, momentum=momentum)
    state = None
    record, losses = [flat([p.detach().numpy() for p in leaves])], []
    for _ in range(scenario.steps):
        res = step(optree.tree_unflatten(treedef, leaves), state)
        state = res.state
        for p, d in zip(leaves, optree.tree_leaves(res.grad)):
            p.grad = d
        opt.step()
        record.append(flat([p.detach().numpy() for p in leaves]))
        losses.append(float(res.loss))
    return Trajectory(np.array(record), np.array(losses))


class TorchCore(Backend):
    name = "torch-core"
    description = "torch tensors, gradnorm.step, autograd grad_fn + double-backward hvp_fn, torch.optim.SGD"
    requires = ("torch",)

    def _setup(self, problem: Problem, dtype: str):
        import array_api_compat
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        tdtype = getattr(torch, dtype)
        data = {k: torch.as_tensor(v, dtype=tdtype) for k, v in problem.data.items()}
        xp = array_api_compat.array_namespace(data["X" if "X" in data else "A"])

        def attach(params: Any) -> tuple[Any, list[Any]]:
            leaves, treedef = optree.tree_flatten(params)
            leaves = [leaf.detach().requires_grad_(True) for leaf in leaves]
            return optree.tree_unflatten(treedef, leaves), leaves

        def grad_fn(params: Any) -> tuple[Any, Any]:
            with torch.enable_grad():
                tree, leaves = attach(params)
                loss = problem.loss(xp, tree, data)
                grads = torch.autograd.grad(loss, leaves)
            return loss.detach(), optree.tree_unflatten(optree.tree_structure(params), list(grads))

        def hvp_fn(params: Any, v: Any) -> Any:
            with torch.enable_grad():
                tree, leaves = attach(params)
                loss = problem.loss(xp, tree, data)
                grads = torch.autograd.grad(loss, leaves, create_graph=True)
                hv = torch.autograd.grad(grads, leaves, grad_outputs=optree.tree_leaves(v))
            return optree.tree_unflatten(optree.tree_structure(params), list(hv))

        params = optree.tree_map(lambda a: torch.as_tensor(np.array(a), dtype=tdtype), problem.params0())
        return grad_fn, hvp_fn, params

    def run(self, scenario: Scenario, problem: Problem, dtype: str) -> Trajectory:

        grad_fn, hvp_fn, params = self._setup(problem, dtype)
        rule = gradnorm.rules.get(scenario.rule, **scenario.hyperparameters)
        return sgd_trajectory(params, scenario, lambda tree, state: gradnorm.step(tree, grad_fn, rule=rule, state=state, hvp_fn=hvp_fn))

    def direction(self, problem, rule, hyper, dtype, params=None):
        import torch

        grad_fn, hvp_fn, params0 = self._setup(problem, dtype)
        if params is not None:
            params = optree.tree_map(lambda a: torch.as_tensor(np.array(a), dtype=getattr(torch, dtype)), params)
        res = gradnorm.step(params0 if params is None else params, grad_fn, rule=rule, hvp_fn=hvp_fn, **hyper)
        return flat([d.numpy() for d in optree.tree_leaves(res.grad)])


BACKENDS = [TorchCore()]
