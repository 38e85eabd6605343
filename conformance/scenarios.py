"""The conformance scenarios, declared once for every backend.

A scenario is a problem, a rule with hyperparameters, a base optimizer (plain SGD or SGD with
heavy-ball momentum 0.9, PyTorch's convention) with its learning rate, and a number of steps.
Every backend runs every scenario in each dtype it supports (float64 and float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .problems import PROBLEMS
from .settings import conformance_settings, format_value

__all__ = ["Scenario", "SCENARIOS", "RULE_SETTINGS", "scenario_by_id"]

STEPS = 20
MOMENTUM = 0.9


@dataclass(frozen=True)
class Scenario:
    problem: str
    rule: str
    hyper: tuple[tuple[str, Any], ...]
    optimizer: str  # "sgd" or "momentum"
    lr: float
    steps: int = STEPS
    momentum: float = MOMENTUM

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return dict(self.hyper)

    @property
    def id(self) -> str:
        hyper = ",".join(f"{k}={format_value(v)}" for k, v in self.hyper)
        return f"{self.problem}-{self.rule}[{hyper}]-{self.optimizer}"

    def describe(self) -> str:
        hyper = ", ".join(f"{k}={format_value(v) if not isinstance(v, str) else repr(v)}" for k, v in self.hyper) or "no hyperparameters"
        base = f"SGD lr={self.lr}" + (f" momentum={self.momentum}" if self.optimizer == "momentum" else "")
        return f"rule '{self.rule}' ({hyper}) on problem '{self.problem}' with {base}, {self.steps} steps"


_LR = {  # (sgd, momentum)
    "quadratic": (0.002, 0.001),
    "logistic": (0.5, 0.1),
    "mlp": (0.3, 0.05),
}


def RULE_SETTINGS(problem: str) -> list[tuple[str, tuple[tuple[str, Any], ...]]]:
    """The rule settings every problem is run with: every registered rule's ``conformance``
    entry in conformance/settings.py (per problem, the flood level b sits inside the range the
    loss crosses within 20 steps, so the flooding scenarios take both descent and ascent steps;
    the coherent thresholds are set so that the gate opens and closes within the run)."""
    return [(rule, tuple(hyper.items())) for rule, hyper in conformance_settings(problem)]


def _all() -> list[Scenario]:
    out = []
    for problem in PROBLEMS:
        lr_sgd, lr_momentum = _LR[problem]
        for rule, hyper in RULE_SETTINGS(problem):
            out.append(Scenario(problem, rule, hyper, "sgd", lr_sgd))
            out.append(Scenario(problem, rule, hyper, "momentum", lr_momentum))
    return out


SCENARIOS: list[Scenario] = _all()


def scenario_by_id(scenario_id: str) -> Scenario:
    for s in SCENARIOS:
        if s.id == scenario_id:
            return s
    raise ValueError(f"`scenario_id` must name a scenario (see conformance.scenarios.SCENARIOS). Received: {scenario_id!r}.")
