"""The timing loop every framework's benchmark uses, defined once so that their tables compare."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def timed_interleaved(fns: dict[str, Callable[[], Any]], steps: int, repeats: int, *, warmup: int = 5,
                      finish: Callable[[Any], Any] = lambda out: None) -> dict[str, float]:
    """Median over ``repeats`` rounds of the mean time per call (ms) of every function. Each round
    times every function once, round-robin, so that drift of the machine affects all alike.
    ``finish(last_output)`` runs before the clock starts and before it stops: it waits for
    asynchronous work (a GPU stream, JAX's dispatch) so that a round times finished steps."""
    out: Any = None
    for fn in fns.values():
        for _ in range(warmup):  # compile, trace and warm the caches
            out = fn()
        finish(out)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            finish(out)
            start = time.perf_counter()
            for _ in range(steps):
                out = fn()
            finish(out)
            samples[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def carried(call: Callable[..., tuple], carry: tuple) -> Callable[[], tuple]:
    """A zero-argument step that feeds its outputs back as its next inputs: ``carry = call(*carry)``
    (a jitted JAX training step over parameters and optimizer state)."""
    box = [carry]

    def step() -> tuple:
        box[0] = call(*box[0])
        return box[0]

    return step
