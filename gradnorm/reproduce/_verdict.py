"""Verdicts: from per-seed outcomes to "reproduced", "not reproduced" or "inconclusive".

Pure functions on plain Python values (no NumPy), unit-tested on synthetic inputs in
``tests/test_reproduce.py``.

A *statement* is one checkable sentence of a claim ("sam (rho 0.05) ends with a lower lambda_max
than sgd"). Each seed gives it an *outcome*: ``True`` (it holds in that seed), ``False`` (it does
not), or ``None`` / NaN (undefined: a run diverged, a quantity is not finite). The verdict over
N seeds:

* **reproduced (n/N seeds)** when it holds in at least ``ceil(2N/3)`` of the N seeds (3 of 3 or
  2 of 3; 1 of 1 in a one-seed quick run). A clear majority, not unanimity: the effects are
  small and a single seed may flip, which is why every verdict prints n/N;
* **not reproduced (0/N seeds)** when it holds in no seed and at least half of the seeds gave a
  defined outcome (so that "never held" is evidence, not missing data);
* **inconclusive (n/N seeds)** otherwise: a minority of seeds (1 of 3), or too many undefined
  outcomes.

Failed runs count in N but never as holding, so a rule that diverges cannot be "reproduced" on
the strength of the seeds that survived.

Comparisons are strict: a tie (equal values, or within the relative tolerance ``rel_tol``) does
*not* hold; a NaN on either side gives ``None``.

A claim with several statements gets a *claim verdict*: "reproduced" when every statement is
reproduced; "partly reproduced" when some are and some are not; when none is reproduced, "not
reproduced" if at least one statement is not reproduced, else "inconclusive" (also when there are
no statements).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "INCONCLUSIVE",
    "MIN_DEFINED_FRACTION",
    "NOT_REPRODUCED",
    "PARTLY",
    "REPRODUCED",
    "REPRODUCED_FRACTION",
    "ClaimVerdict",
    "Verdict",
    "all_of",
    "combine",
    "greater",
    "increasing",
    "less",
    "outcome",
    "verdict",
    "within",
]

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
PARTLY = "partly reproduced"

#: a statement is reproduced when it holds in at least this fraction of the seeds (rounded up)
REPRODUCED_FRACTION = 2.0 / 3.0
#: "not reproduced" needs a defined outcome in at least this fraction of the seeds (rounded up)
MIN_DEFINED_FRACTION = 0.5


def _undefined(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def outcome(x: Any) -> bool | None:
    """Normalize one seed's outcome: ``True``/``False``, or ``None`` for None/NaN."""
    if _undefined(x):
        return None
    return bool(x)


@dataclass(frozen=True)
class Verdict:
    """The verdict of one statement over N seeds."""

    status: str
    held: int
    defined: int
    total: int

    @property
    def failed(self) -> int:
        return self.total - self.defined

    def __str__(self) -> str:
        text = f"{self.status} ({self.held}/{self.total} seed{'s' if self.total != 1 else ''})"
        if self.failed:
            text += f", {self.failed} undefined"
        return text


def verdict(outcomes: Iterable[Any]) -> Verdict:
    """The verdict of a statement from its per-seed outcomes (see the module docstring)."""
    values = [outcome(o) for o in outcomes]
    total = len(values)
    defined = sum(v is not None for v in values)
    held = sum(v is True for v in values)
    if total == 0:
        return Verdict(INCONCLUSIVE, 0, 0, 0)
    if held >= math.ceil(REPRODUCED_FRACTION * total - 1e-9):
        status = REPRODUCED
    elif held == 0 and defined >= math.ceil(MIN_DEFINED_FRACTION * total - 1e-9) and defined > 0:
        status = NOT_REPRODUCED
    else:
        status = INCONCLUSIVE
    return Verdict(status, held, defined, total)


def _finite(*xs: Any) -> bool:
    return all(x is not None and isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


def less(a: Any, b: Any, rel_tol: float = 0.0) -> bool | None:
    """``a < b`` strictly, by more than ``rel_tol * |b|``; ``None`` if either is not finite."""
    if not _finite(a, b):
        return None
    return a < b - rel_tol * abs(b)


def greater(a: Any, b: Any, rel_tol: float = 0.0) -> bool | None:
    """``a > b`` strictly, by more than ``rel_tol * |b|``; ``None`` if either is not finite."""
    if not _finite(a, b):
        return None
    return a > b + rel_tol * abs(b)


def increasing(values: Sequence[Any], rel_tol: float = 0.0) -> bool | None:
    """``values[0] < values[1] < ...`` strictly; ``None`` if any is not finite."""
    pairs = [less(a, b, rel_tol) for a, b in itertools.pairwise(values)]
    if any(p is None for p in pairs):
        return None
    return all(pairs)


def within(a: Any, b: Any, rel_tol: float) -> bool | None:
    """``|a - b| <= rel_tol * |b|``; ``None`` if either is not finite."""
    if not _finite(a, b):
        return None
    return abs(a - b) <= rel_tol * abs(b)


def all_of(outcomes: Iterable[Any]) -> bool | None:
    """The conjunction of outcomes: ``False`` if any is False, else ``None`` if any is
    undefined, else ``True``."""
    values = [outcome(o) for o in outcomes]
    if any(v is False for v in values):
        return False
    if any(v is None for v in values):
        return None
    return True


@dataclass(frozen=True)
class ClaimVerdict:
    """The verdict of a whole claim, from the verdicts of its statements."""

    status: str
    parts: tuple[tuple[str, Verdict], ...]

    def __str__(self) -> str:
        if not self.parts:
            return INCONCLUSIVE + " (nothing was checked)"
        if len(self.parts) == 1:
            return str(self.parts[0][1])
        counts = {s: sum(v.status == s for _, v in self.parts) for s in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)}
        detail = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        return f"{self.status} ({len(self.parts)} statements: {detail})"


def combine(parts: Sequence[tuple[str, Verdict]]) -> ClaimVerdict:
    """A claim's verdict from ``(statement, Verdict)`` pairs (see the module docstring)."""
    statuses = {v.status for _, v in parts}
    if statuses == {REPRODUCED}:
        status = REPRODUCED
    elif REPRODUCED in statuses:
        status = PARTLY
    elif NOT_REPRODUCED in statuses:
        status = NOT_REPRODUCED
    else:
        status = INCONCLUSIVE
    return ClaimVerdict(status, tuple(parts))
