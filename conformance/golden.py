"""Golden reference trajectories: NumPy float64 from :mod:`conformance.reference`, stored in
``conformance/golden/trajectories.npz``.

Regenerate with ``python -m conformance.golden --write``; ``--check`` (and the test
``test_golden_files_are_current``) recomputes every trajectory and compares it with the stored
one, so a change to a problem, a scenario or the reference math cannot go unnoticed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .problems import PROBLEMS
from .reference import Trajectory, reference_trajectory
from .scenarios import SCENARIOS, Scenario

GOLDEN_FILE = Path(__file__).parent / "golden" / "trajectories.npz"
# Recomputing on another machine may differ in the last bits (BLAS summation order), which 20
# steps can amplify a little; anything larger means the reference changed.
CURRENT_RTOL = 1e-11


def compute(scenario: Scenario) -> Trajectory:
    return reference_trajectory(
        PROBLEMS[scenario.problem], scenario.rule, scenario.hyperparameters, scenario.optimizer,
        scenario.lr, scenario.momentum, scenario.steps,
    )


def compute_all() -> dict[str, Trajectory]:
    return {s.id: compute(s) for s in SCENARIOS}


def write(path: Path = GOLDEN_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for sid, traj in compute_all().items():
        arrays[f"{sid}::params"] = traj.params
        arrays[f"{sid}::losses"] = traj.losses
    np.savez_compressed(path, **arrays)


def load(path: Path = GOLDEN_FILE) -> dict[str, Trajectory]:
    if not path.exists():
        raise FileNotFoundError(f"No golden trajectories at {path}: run `python -m conformance.golden --write`.")
    with np.load(path) as data:
        ids = sorted({key.rsplit("::", 1)[0] for key in data.files})
        return {sid: Trajectory(data[f"{sid}::params"], data[f"{sid}::losses"]) for sid in ids}


def stale(path: Path = GOLDEN_FILE) -> list[str]:
    """Scenario ids whose stored trajectory is missing or differs from a fresh computation."""
    stored = load(path)
    problems = []
    for scenario in SCENARIOS:
        fresh = compute(scenario)
        old = stored.get(scenario.id)
        if old is None:
            problems.append(f"{scenario.id}: missing")
            continue
        for what, a, b in (("params", fresh.params, old.params), ("losses", fresh.losses, old.losses)):
            if a.shape != b.shape or not np.allclose(a, b, rtol=CURRENT_RTOL, atol=CURRENT_RTOL):
                problems.append(f"{scenario.id}: {what} differ")
    extra = set(stored) - {s.id for s in SCENARIOS}
    problems += [f"{sid}: stored but no longer a scenario" for sid in sorted(extra)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="recompute and store every trajectory")
    group.add_argument("--check", action="store_true", help="fail if a stored trajectory is stale")
    args = parser.parse_args(argv)
    if args.write:
        write()
        print(f"wrote {len(SCENARIOS)} trajectories to {GOLDEN_FILE}")
        return 0
    problems = stale()
    for p in problems:
        print(p)
    print("golden trajectories are current" if not problems else f"{len(problems)} stale")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
