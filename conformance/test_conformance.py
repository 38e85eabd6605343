"""The conformance suite under pytest: every scenario on every installed backend and dtype
against the golden reference, the identities on every backend, and checks of the suite itself
(golden files current, problems' derivatives right, scenarios well posed, failure messages)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conformance import golden as golden_mod
from conformance.backends import BACKENDS
from conformance.checks import TOLERANCE, check, compare
from conformance.identities import IDENTITIES, check_identity
from conformance.problems import PROBLEMS
from conformance.reference import REFERENCES, FlatProblem, Trajectory, base_update
from conformance.scenarios import SCENARIOS


@pytest.fixture(scope="session")
def golden():
    return golden_mod.load()


def _backend(name):
    backend = BACKENDS[name]
    reason = backend.unavailable_reason()
    if reason:
        pytest.skip(f"backend {name}: {reason}")
    return backend


CELLS = [(b, d) for b in BACKENDS for d in BACKENDS[b].dtypes]


RUNS = [(b, d, s) for b, d in CELLS for s in SCENARIOS if BACKENDS[b].covers(s)]


@pytest.mark.parametrize("backend_name,dtype,scenario", RUNS, ids=[f"{b}-{d}-{s.id}" for b, d, s in RUNS])
def test_trajectory(backend_name, dtype, scenario, golden, record_property):
    backend = _backend(backend_name)
    result = check(backend, scenario, dtype, golden)
    record_property("conformance", json.dumps(result.row()))
    assert result.passed, result.message


@pytest.mark.parametrize("identity", IDENTITIES, ids=[i.id for i in IDENTITIES])
@pytest.mark.parametrize("backend_name,dtype", CELLS, ids=[f"{b}-{d}" for b, d in CELLS])
def test_identity(backend_name, dtype, identity, record_property):
    backend = _backend(backend_name)
    ok, dev, message = check_identity(backend, identity, dtype)
    record_property("conformance", json.dumps({
        "backend": backend_name, "dtype": dtype, "rule": "identities", "passed": ok,
        "max_deviation": dev, "tolerance": identity.tolerance(dtype), "scenario": identity.id,
    }))
    assert ok, message


# ------------------------------------------------------------------------------------------
# the suite checks itself


def test_golden_files_are_current():
    assert golden_mod.stale() == []


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_problem_derivatives_match_finite_differences(name):
    import array_api_compat.numpy as xnp

    problem = PROBLEMS[name]
    flat = FlatProblem(problem)
    rng = np.random.default_rng(0)
    x = flat.x0 + 0.1 * rng.normal(size=flat.x0.shape)
    v = rng.normal(size=x.shape)
    h = 1e-6
    # the Array API loss and the hand-written one agree
    assert float(problem.loss(xnp, flat.unflatten(x), problem.data)) == pytest.approx(flat.loss(x), rel=1e-13)
    # gradient: directional derivative by central differences of the loss
    fd = (flat.loss(x + h * v) - flat.loss(x - h * v)) / (2 * h)
    assert flat.grad(x) @ v == pytest.approx(fd, rel=1e-7)
    # HVP: central differences of the gradient
    fd_hv = (flat.grad(x + h * v) - flat.grad(x - h * v)) / (2 * h)
    np.testing.assert_allclose(flat.hvp(x, v), fd_hv, rtol=1e-6, atol=1e-8 * np.abs(fd_hv).max())


def test_scenarios_are_well_posed(golden):
    """Every golden trajectory stays finite and bounded; the flooding and coherent scenarios
    switch sign / gate within the run, never within float32 reach of the switching point."""
    for scenario in SCENARIOS:
        traj = golden[scenario.id]
        assert np.all(np.isfinite(traj.params)) and np.abs(traj.params).max() < 10, scenario.id
    switching = {}
    for scenario in SCENARIOS:
        if scenario.rule not in ("flooding", "coherent"):
            continue
        flat = FlatProblem(PROBLEMS[scenario.problem])
        apply = base_update(scenario.optimizer, scenario.lr, scenario.momentum)
        x, signals, margins = flat.x0.copy(), [], []
        h = scenario.hyperparameters
        for k in range(scenario.steps):
            if scenario.rule == "coherent":
                e = REFERENCES["coherent"](flat, x, **h, step=k)
                signals.append(e.info["gate"])
                margins.append(abs(e.info["coherence"] - h["threshold"]))
            else:
                e = REFERENCES["flooding"](flat, x, **h)
                signals.append(e.info["flood_sign"])
                margins.append(abs(e.info["loss"] - h["b"]) / abs(h["b"]))
            x = apply(x, e.direction)
        assert min(margins) > 1e-4, f"{scenario.id}: the switch is within float32 reach ({min(margins):.1e})"
        switching[scenario.id] = len(set(signals)) > 1
    # every problem has a flooding and a gated coherent scenario that actually switches
    for problem in PROBLEMS:
        for rule in ("flooding", "coherent"):
            assert any(v for k, v in switching.items() if k.startswith(f"{problem}-{rule}")), (problem, rule)


def test_a_wrong_trajectory_fails_with_a_precise_message(golden):
    scenario = next(s for s in SCENARIOS if s.rule == "sam" and s.problem == "mlp")
    ref = golden[scenario.id]
    bad = Trajectory(ref.params.copy(), ref.losses.copy())
    bad.params[7:, 3] += 1e-6  # a tiny divergence from step 7 on
    result = compare("some-backend", scenario, "float64", bad, ref)
    assert not result.passed
    for text in ("rule 'sam'", "rho=0.05", "problem 'mlp'", "backend 'some-backend'", "float64", "after step 7", "parameter #3"):
        assert text in result.message, (text, result.message)
    # the same deviation is inside the float32 tolerance
    assert compare("some-backend", scenario, "float32", bad, ref).passed
    # NaN never passes
    nan = Trajectory(ref.params.copy(), ref.losses.copy())
    nan.losses[4] = np.nan
    assert not compare("x", scenario, "float32", nan, ref).passed


def test_a_wrong_rule_is_caught_by_every_backend(golden, monkeypatch):
    """Negative control through a real backend: perturb the rule's hyperparameter slightly
    and the trajectory check must fail."""
    backend = BACKENDS["numpy"]
    scenario = next(s for s in SCENARIOS if s.rule == "gnp" and s.problem == "logistic")
    import dataclasses

    wrong = dataclasses.replace(scenario, hyper=(("r", 0.05), ("alpha", 0.81)))
    result = compare(backend.name, scenario, "float32", backend.run(wrong, PROBLEMS[scenario.problem], "float32"), golden[scenario.id])
    assert not result.passed and result.max_deviation > TOLERANCE["float32"]
