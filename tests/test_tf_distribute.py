"""tf.distribute.MirroredStrategy over 2 logical CPU devices (in a worker process): with
perturbation="local" every replica applies its own rule step to its half of the batch and the
replicas' directions are averaged; with "global" the rule runs on the whole batch. Both through
gradnorm.tf.step in a custom loop and through Keras fit(); the replicas stay bit-identical; the rule
sees the unscaled loss although TensorFlow divides it by the number of replicas (flooding's level)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradnorm
from conformance.problems import PROBLEMS

pytest.importorskip("tensorflow")

MLP = PROBLEMS["mlp"]
LAYERS = ("hidden1", "hidden2", "out")
X, Y = MLP.data["X"], MLP.data["Y"]
SHARDS = [(X[:16], Y[:16]), (X[16:], Y[16:])]
LR, MOMENTUM, STEPS = 0.25, 0.5, 3  # exact in float32, the dtype Keras keeps them in


def flat(tree):
    return [tree[name][k] for name in LAYERS for k in ("w", "b")]


def as_tree(leaves):
    return {name: {"w": leaves[2 * i], "b": leaves[2 * i + 1]} for i, name in enumerate(LAYERS)}


def grad_fn(x, y):
    def fn(leaves):
        loss, g = MLP.grad(as_tree(leaves), {"X": x, "Y": y})
        return loss, flat(g)

    return fn


def hvp_fn(x, y):
    return lambda leaves, v: flat(MLP.hvp(as_tree(leaves), as_tree(v), {"X": x, "Y": y}))


def _flood_level():
    """Between the two halves' losses at the start, below the whole batch's: local flooding ascends on
    one replica and descends on the other, global flooding descends; a rule that saw the loss divided
    by the number of replicas would ascend everywhere."""
    p = flat(MLP.params0())
    low, high = sorted(float(grad_fn(x, y)(p)[0]) for x, y in SHARDS)
    full = float(grad_fn(X, Y)(p)[0])
    assert low < full < high and full / 2 < low
    return 0.5 * (low + full)


B = _flood_level()
CASES = [
    {"api": "step", "rule": "sam", "hyper": {"rho": 0.1}, "perturbation": "local"},
    {"api": "step", "rule": "sam", "hyper": {"rho": 0.1}, "perturbation": "global"},
    {"api": "step", "rule": "flooding", "hyper": {"b": B}, "perturbation": "local"},
    {"api": "step", "rule": "flooding", "hyper": {"b": B}, "perturbation": "global"},
    {"api": "step", "rule": "gr", "hyper": {"gamma": 0.2}, "perturbation": "global"},
    {"api": "keras", "rule": "sam", "hyper": {"rho": 0.1}, "perturbation": "local"},
    {"api": "keras", "rule": "flooding", "hyper": {"b": B}, "perturbation": "global"},
]
for _case in CASES:
    _case.update(steps=STEPS, lr=LR, momentum=MOMENTUM)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tf_distribute")
    (tmp / "cases.json").write_text(json.dumps(CASES))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(root / "tests" / "tf_distribute_worker.py"), str(tmp / "cases.json"),
                           str(tmp / "out.npz")], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    data = np.load(tmp / "out.npz")
    return [[data[f"{i}/{j}"] for j in range(6)] for i in range(len(CASES))]


def expected(rule, hyper, perturbation, scale=1.0):
    """The NumPy core: the mean of the replicas' own steps ("local") or the step of the whole batch
    ("global"), applied with SGD + momentum. `scale` multiplies the loss the rule sees (a wrong
    treatment of TensorFlow's 1/replicas scaling, for the negative control)."""
    params = flat(MLP.params0())
    momentum = [np.zeros_like(p) for p in params]

    def scaled(fn):
        def scaled_fn(leaves):
            loss, g = fn(leaves)
            return scale * loss, [scale * a for a in g]

        return scaled_fn

    for _ in range(STEPS):
        if perturbation == "global":
            d = gradnorm.step(params, scaled(grad_fn(X, Y)), rule=rule, hvp_fn=hvp_fn(X, Y), **hyper).grad
        else:
            steps = [gradnorm.step(params, scaled(grad_fn(x, y)), rule=rule, hvp_fn=hvp_fn(x, y), **hyper).grad
                     for x, y in SHARDS]
            d = [(a + b) / 2 for a, b in zip(*steps)]
        d = [a / scale for a in d]
        momentum = [MOMENTUM * m - LR * g for m, g in zip(momentum, d)]  # Keras's SGD convention
        params = [p + m for p, m in zip(params, momentum)]
    return params


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c['api']}-{c['rule']}-{c['perturbation']}" for c in CASES])
def test_policy_gives_the_trajectory_it_claims(results, index):
    case = CASES[index]
    got = results[index]
    for w in got:
        assert np.array_equal(w[0], w[1])  # the replicas stay bit-identical
    for w, want in zip(got, expected(case["rule"], case["hyper"], case["perturbation"])):
        np.testing.assert_allclose(w[0], want, rtol=1e-10, atol=1e-12)


def test_the_policies_differ_and_the_loss_scale_matters(results):
    """Negative controls: local and global differ; flooding that compared the loss divided by the
    number of replicas with its level (TensorFlow's convention, not undone) would differ too."""
    local, glob = results[0], results[1]
    assert max(np.abs(a[0] - b[0]).max() for a, b in zip(local, glob)) > 1e-6
    for index in (2, 3):
        case = CASES[index]
        wrong = expected(case["rule"], case["hyper"], case["perturbation"], scale=0.5)
        assert max(np.abs(a[0] - b).max() for a, b in zip(results[index], wrong)) > 1e-6
