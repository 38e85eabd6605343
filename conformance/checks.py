"""Comparing a backend's trajectory with the golden reference, and the tolerance policy.

Deviation at step k (see ``conformance/README.md`` for the justification):

* parameters: ``max_i |x_i - r_i| / max(max_i |r_i|, 1)`` over the flat parameter vector;
* loss: ``|L - R| / max(|R|, 1)``.

A run passes when every step's deviation is within the dtype's tolerance:
:data:`TOLERANCE`. A failure names the rule, its hyperparameters, the backend, the scenario,
the dtype, the first diverging step and its largest difference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .problems import PROBLEMS
from .reference import Trajectory
from .scenarios import Scenario

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


@dataclass
class Result:
    backend: str
    scenario: Scenario
    dtype: str
    passed: bool
    max_deviation: float
    tolerance: float
    message: str
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "rule": self.scenario.rule, "scenario": self.scenario.id,
            "dtype": self.dtype, "passed": self.passed, "max_deviation": self.max_deviation,
            "tolerance": self.tolerance, "seconds": self.seconds,
        }


def deviations(run: Trajectory, ref: Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """Per-step relative deviations of the parameters (steps + 1) and of the losses (steps)."""
    if run.params.shape != ref.params.shape or run.losses.shape != ref.losses.shape:
        raise ValueError(
            f"trajectory shapes differ: params {run.params.shape} vs {ref.params.shape}, "
            f"losses {run.losses.shape} vs {ref.losses.shape}"
        )
    scale = np.maximum(np.max(np.abs(ref.params), axis=1), 1.0)
    dp = np.max(np.abs(run.params - ref.params), axis=1) / scale
    dl = np.abs(run.losses - ref.losses) / np.maximum(np.abs(ref.losses), 1.0)
    # NaN anywhere is a divergence, never a pass.
    dp = np.where(np.isfinite(dp), dp, np.inf)
    dl = np.where(np.isfinite(dl), dl, np.inf)
    return dp, dl


def compare(backend: str, scenario: Scenario, dtype: str, run: Trajectory, ref: Trajectory, seconds: float = 0.0) -> Result:
    tol = TOLERANCE[dtype]
    dp, dl = deviations(run, ref)
    worst = float(max(dp.max(), dl.max()))
    bad_p = np.nonzero(dp > tol)[0]
    bad_l = np.nonzero(dl > tol)[0]
    if bad_p.size == 0 and bad_l.size == 0:
        return Result(backend, scenario, dtype, True, worst, tol, "", seconds)
    # parameters[k] is after k steps; loss[k] is reported by step k (at parameters[k]).
    first_p = int(bad_p[0]) if bad_p.size else None
    first_l = int(bad_l[0]) if bad_l.size else None
    if first_l is not None and (first_p is None or first_l <= first_p):
        where = (
            f"step {first_l}: loss {float(run.losses[first_l]):.10g} vs reference {float(ref.losses[first_l]):.10g}, "
            f"relative difference {dl[first_l]:.3e}"
        )
    else:
        k = first_p
        i = int(np.argmax(np.abs(run.params[k] - ref.params[k])))
        where = (
            f"after step {k}: parameter #{i} is {float(run.params[k, i]):.10g} vs reference {float(ref.params[k, i]):.10g}, "
            f"largest relative difference {dp[k]:.3e}"
        )
    message = (
        f"{scenario.describe()}; backend '{backend}', dtype {dtype}: diverges from the reference first at {where} "
        f"(tolerance {tol:.0e}; largest deviation over the run {worst:.3e}). Scenario id: {scenario.id}"
    )
    return Result(backend, scenario, dtype, False, worst, tol, message, seconds)


def check(backend: Any, scenario: Scenario, dtype: str, golden: dict[str, Trajectory]) -> Result:
    """Run ``scenario`` on ``backend`` in ``dtype`` and compare with the golden trajectory."""
    start = time.perf_counter()
    try:
        run = backend.run(scenario, PROBLEMS[scenario.problem], dtype)
    except Exception as err:  # a crash is a failure of this cell, reported like one
        return Result(backend.name, scenario, dtype, False, float("inf"), TOLERANCE[dtype],
                      f"{scenario.describe()}; backend '{backend.name}', dtype {dtype}: raised {type(err).__name__}: {err}",
                      time.perf_counter() - start)
    return compare(backend.name, scenario, dtype, run, golden[scenario.id], time.perf_counter() - start)
