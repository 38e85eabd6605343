"""What the JAX test modules share: full-precision float32 matmuls, x64 mode, and a counter of
XLA compilations. Import it after `pytest.importorskip("jax")`."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """Full-precision float32 matmuls: on a GPU JAX's default (TF32) misses the float64
    reference by about 1e-4; on a CPU this changes nothing. Autouse in every module that imports it."""
    with jax.default_matmul_precision("highest"):
        yield


def x64():
    return jax.enable_x64(True)


def _compiles() -> list[int]:
    """A counter of XLA backend compilations in this process (a JAX monitoring event)."""
    box = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            box[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    return box


COMPILES = _compiles()
