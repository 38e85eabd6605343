"""The TensorFlow adapter: ``gradnorm.tf.step`` on ``tf.Variable``\\ s with a loss that reads them,
under ``tf.function`` and eagerly; the direction is applied with TensorFlow arithmetic in the
reference's SGD / momentum convention (PyTorch's).

Why not ``keras.optimizers.SGD``: its momentum ``m = momentum * m - lr * d``, ``x += m`` is the same
method (``m = -lr * buf``), but Keras rounds a number learning rate and the momentum to float32 (its
floatx) even for float64 weights, which moves a float64 trajectory by about 1e-9 relative, above the
float64 tolerance. ``tests/test_tf_keras.py`` checks Keras training against the reference in float32.

The problems multiply data matrices by parameter vectors (``data["A"] @ x``); TensorFlow's ``@``
needs rank 2 on both sides, so the 2-D data arrays are wrapped to send ``@`` through the namespace's
``matmul`` (`_Matrix`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import optree

import gradnorm

from ..problems import Problem
from ..reference import Trajectory
from ..scenarios import Scenario
from . import Backend, flat


class _Matrix:
    """A 2-D data array of a problem. The problems multiply their data matrices by parameter vectors
    (``data["A"] @ x``), which the Array API's ``matmul`` allows and TensorFlow's ``@`` does not
    (``tf.linalg.matmul`` needs rank 2 on both sides); ``@`` goes through the namespace's ``matmul``."""

    def __init__(self, tensor: Any, xp: Any):
        self.tensor, self.xp = tensor, xp

    def __matmul__(self, other: Any) -> Any:
        return self.xp.matmul(self.tensor, other)

    def __tf_tensor__(self, dtype: Any = None, name: Any = None) -> Any:
        import tensorflow as tf

        return tf.convert_to_tensor(self.tensor, dtype=dtype, name=name)


class _Setup:
    """Variables, loss and rule step of one (problem, rule, hyperparameters, dtype), built once and
    reused by every run of it: the ``tf.function`` is traced once."""

    def __init__(self, problem: Problem, rule: str, hyper: tuple, dtype: str, function: bool):
        import tensorflow as tf

        import gradnorm.tf as gt

        xp = gt.namespace
        tdtype = getattr(tf, dtype)
        data = {k: tf.constant(v, dtype=tdtype) for k, v in problem.data.items()}
        data = {k: _Matrix(v, xp) if v.shape.rank == 2 and k in ("A", "X") else v for k, v in data.items()}
        leaves, self.treedef = optree.tree_flatten(problem.params0())
        self.variables = [tf.Variable(np.asarray(leaf), dtype=tdtype) for leaf in leaves]
        tree = optree.tree_unflatten(self.treedef, self.variables)
        self.dtype = tdtype
        rule_obj = gradnorm.rules.get(rule, **dict(hyper))

        def loss_fn() -> Any:
            return problem.loss(xp, tree, data)

        def direction(state: Any) -> Any:
            res = gt.step(self.variables, loss_fn, rule=rule_obj, state=state)
            return res.grad, res.state, res.loss

        self.direction = tf.function(direction) if function else direction
        self.rule = rule_obj

    def update(self, grad: list[Any], buffers: list[Any] | None, lr: float, momentum: float | None) -> list[Any] | None:
        """The base optimizer in the reference's convention (PyTorch's): ``buf = d`` on the first step,
        then ``buf = momentum * buf + d``; ``x -= lr * buf`` (``x -= lr * d`` without momentum)."""
        if momentum is not None:
            buffers = list(grad) if buffers is None else [momentum * b + d for b, d in zip(buffers, grad)]
            grad = buffers
        for v, d in zip(self.variables, grad):
            v.assign_sub(lr * d)
        return buffers

    def reset(self, params: Any = None) -> None:
        leaves = optree.tree_leaves(params) if params is not None else None
        for i, v in enumerate(self.variables):
            if leaves is not None:
                v.assign(np.asarray(leaves[i], dtype=v.dtype.as_numpy_dtype))

    def values(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.variables]


class TFStepBackend(Backend):
    requires = ("tensorflow",)

    def __init__(self, function: bool):
        self.function = function
        self.name = "tf-step-function" if function else "tf-step-eager"
        # Eager TensorFlow is the slowest way to run: float64 is covered under tf.function.
        self.dtypes = ("float64", "float32") if function else ("float32",)
        self.description = (
            "gradnorm.tf.step on tf.Variables (GradientTape gradients, reverse-over-reverse HVPs), SGD in TF arithmetic, "
            + ("the step under tf.function, traced once per rule setting" if function else "eager")
        )

    def covers(self, scenario: Scenario) -> bool:
        # Eager TensorFlow dispatches every op separately (tens of microseconds each), and the step's
        # code is the same eagerly and traced: the eager backend runs every rule setting on the
        # largest problem (the MLP, six leaves in a nested dict) with plain SGD; the tf.function
        # backend runs every scenario, and tests/test_tf_step.py checks every rule eagerly as well.
        return self.function or (scenario.optimizer == "sgd" and scenario.problem == "mlp")

    @functools.cache  # noqa: B019 - one cache per backend object, kept for the process
    def _setup(self, problem_name: str, rule: str, hyper: tuple, dtype: str) -> _Setup:
        from ..problems import PROBLEMS

        return _Setup(PROBLEMS[problem_name], rule, hyper, dtype, self.function)

    def run(self, scenario: Scenario, problem: Problem, dtype: str) -> Trajectory:
        setup = self._setup(problem.name, scenario.rule, scenario.hyper, dtype)
        setup.reset(problem.params0())
        momentum = scenario.momentum if scenario.optimizer == "momentum" else None
        state = setup.rule.init(setup.variables)
        buffers = None
        record, losses = [flat(setup.values())], []
        for _ in range(scenario.steps):
            grad, state, loss = setup.direction(state)
            buffers = setup.update(grad, buffers, scenario.lr, momentum)
            record.append(flat(setup.values()))
            losses.append(float(loss))
        return Trajectory(np.array(record), np.array(losses))

    def direction(self, problem, rule, hyper, dtype, params=None):
        setup = self._setup(problem.name, rule, tuple(hyper.items()), dtype)
        setup.reset(problem.params0() if params is None else params)
        grad, _, _ = setup.direction(setup.rule.init(setup.variables))
        return flat([g.numpy() for g in grad])


BACKENDS = [TFStepBackend(function=True), TFStepBackend(function=False)]
