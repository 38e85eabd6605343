"""gradnorm.jax on two (host) devices: with ``perturbation="local"`` each device runs the rule on
its shard and the directions are averaged; with ``"global"`` the step is the single-device rule on
the full batch; plain ``jax.jit`` with a batch-sharded input is global by construction. The runs
happen in a subprocess (tests/jax_multidevice_worker.py), because the device count must be set
before JAX starts; the expected trajectories come from the NumPy reference of the conformance
suite, computed here."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

from conformance.problems import PROBLEMS
from conformance.reference import FlatProblem, reference

WORKER = Path(__file__).parent / "jax_multidevice_worker.py"
STEPS, LR, MOMENTUM = 3, 0.3, 0.9
MLP = PROBLEMS["mlp"]
SHARDS = [FlatProblem(dataclasses.replace(MLP, data={k: v[i * 16:(i + 1) * 16] for k, v in MLP.data.items()}))
          for i in range(2)]
FULL = FlatProblem(MLP)
# a flood level between the two shards' losses at the start (their signs differ), away from the
# full-batch loss (their mean), so that rounding cannot flip the global sign
FLOOD = 0.25 * SHARDS[0].loss(FULL.x0) + 0.75 * SHARDS[1].loss(FULL.x0)
HYPER = {"sam": {"rho": 0.1}, "gr": {"gamma": 0.1}, "flooding": {"b": FLOOD}}
TOL = 2e-5  # float32 runs against the float64 reference, relative to the parameter scale


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("jax2") / "runs.npz"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    env.pop("JAX_ENABLE_X64", None)
    done = subprocess.run([sys.executable, str(WORKER), str(out), repr(FLOOD)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, f"worker failed:\n{done.stdout}\n{done.stderr}"
    with np.load(out) as data:
        return dict(data)


def expected(rule, policy):
    """The reference trajectory: NumPy float64 rule (per shard then averaged, or on the full
    batch) and SGD with momentum 0.9 in the PyTorch/optax convention."""
    x, buf, out = FULL.x0.copy(), None, []
    for _ in range(STEPS):
        if policy == "global":
            d = reference(rule, FULL, x, **HYPER[rule]).direction
        else:
            d = np.mean([reference(rule, shard, x, **HYPER[rule]).direction for shard in SHARDS], axis=0)
        buf = d if buf is None else MOMENTUM * buf + d
        x = x - LR * buf
        out.append(x.copy())
    return np.array(out)


def assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL * max(np.abs(want).max(), 1.0))


@pytest.mark.parametrize("policy", ["local", "global"])
@pytest.mark.parametrize("rule", ["sam", "gr", "flooding"])
def test_data_parallel_policies_give_the_trajectory_they_claim(runs, rule, policy):
    assert_close(runs[f"{rule}-{policy}"], expected(rule, policy))
    assert int(runs[f"{rule}-{policy}-devices"]) == 2  # the result is replicated on both devices


@pytest.mark.parametrize("rule", ["sam", "gr", "flooding"])
def test_the_two_policies_differ(runs, rule):
    assert np.abs(expected(rule, "local") - expected(rule, "global")).max() > 100 * TOL
    assert np.abs(runs[f"{rule}-local"] - runs[f"{rule}-global"]).max() > 100 * TOL


def test_a_mesh_with_explicit_axes_works_too(runs):
    assert_close(runs["sam-local-explicit"], expected("sam", "local"))


def test_has_aux_is_averaged_over_the_devices(runs):
    np.testing.assert_allclose(runs["aux-mean"], MLP.data["X"].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runs["aux-loss"], FULL.loss(FULL.x0), rtol=1e-5)


def test_plain_jit_with_a_sharded_batch_is_global(runs):
    want = reference("sam", FULL, FULL.x0, rho=0.1).direction
    assert_close(runs["jit-sharded"], want)


@pytest.mark.parametrize("policy", ["local", "global"])
def test_transform_inside_shard_map(runs, policy):
    if policy == "global":
        want = reference("sam", FULL, FULL.x0, rho=0.1).direction
    else:
        want = np.mean([reference("sam", shard, FULL.x0, rho=0.1).direction for shard in SHARDS], axis=0)
    assert_close(-runs[f"transform-{policy}"], want)


@pytest.mark.parametrize("mode", ["eager", "jit"])
@pytest.mark.parametrize("rule", ["looksam", "coherent"])
def test_stateful_rules_carry_their_state_over_the_mesh(runs, rule, mode):
    """A stateful rule's state from `rule.init(params)` (uncommitted arrays, as the parameters) is
    carried through data_parallel_step eagerly and jitted; with the global policy its directions
    equal the single-device rule on the full batch, step after step (looksam: a full step, then a
    step that reuses the stored component)."""
    got, want = runs[f"stateful-{rule}-{mode}-dp"], runs[f"stateful-{rule}-{mode}-single"]
    assert got.shape == want.shape == (STEPS, FULL.x0.size)
    assert_close(got, want)
