"""``gradnorm reproduce``: the papers' claims, run on data that needs no download.

Run it as ``gradnorm reproduce`` (the console script), ``python -m gradnorm reproduce`` or
``bash scripts/demo.sh``; ``--help`` lists the options. It trains, prints a table and a verdict per
claim, and writes ``results/reproduce.md`` with PNG plots.

The claims (``gradnorm.reproduce._claims``): 1 flatter minima at equal training loss; 2 robustness
to label noise; 3 GNP's α; 4 flooding performs finite-difference GR; 5 GR's implicit bias on a
diagonal linear network; 6 cost per step. Every verdict is computed from the runs
(``gradnorm.reproduce._verdict`` documents the thresholds).

Importing this package imports nothing heavy: NumPy, scikit-learn, matplotlib and rich are imported
when it runs, and a framework only when its backend is chosen.
"""

from __future__ import annotations

from typing import Any

__all__ = ["main"]


def main(argv: Any = None) -> int:
    """Run ``gradnorm reproduce`` with the command-line arguments ``argv`` (after ``reproduce``)."""
    from .cli import reproduce

    return reproduce(argv)
