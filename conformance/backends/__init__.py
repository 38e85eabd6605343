"""Backend plug-ins of the conformance suite.

A backend says how to build a problem's loss in its own arrays and runs every step through its
own public gradnorm API (for the core: ``gradnorm.step`` with a ``grad_fn`` made by the
framework's autodiff; for an adapter: the adapter's optimizer or step). It never goes through a
NumPy bridge inside a step; only the recorded trajectory is copied to NumPy float64 for the
comparison.

To add a backend, subclass :class:`Backend`, implement :meth:`Backend.run` and
:meth:`Backend.direction`, and add an instance to :data:`BACKENDS` (or call :func:`register`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from ..problems import Problem
from ..reference import Trajectory
from ..scenarios import Scenario

__all__ = ["Backend", "BACKENDS", "register", "available_backends", "get_backend"]


class Backend:
    """One way of running gradnorm: a framework plus the gradnorm API it is driven through."""

    name: str = ""
    description: str = ""
    dtypes: tuple[str, ...] = ("float64", "float32")
    requires: tuple[str, ...] = ()  # importable modules this backend needs

    def unavailable_reason(self) -> str | None:
        """``None`` if the backend can run here, else why not."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"not installed: {', '.join(missing)}" if missing else None

    def covers(self, scenario: Scenario) -> bool:
        """Whether this backend runs ``scenario`` (all by default)."""
        return True

    def run(self, scenario: Scenario, problem: Problem, dtype: str) -> Trajectory:
        """Run ``scenario`` from ``problem.params0()`` in ``dtype``; record the flat parameters
        before every step and after the last, and the loss each step reports."""
        raise NotImplementedError

    def direction(self, problem: Problem, rule: str, hyper: dict[str, Any], dtype: str,
                  params: Any = None) -> np.ndarray:
        """The flat direction of one step of ``rule`` at ``params`` (default ``problem.params0()``)."""
        raise NotImplementedError


def flat(leaves: list[Any]) -> np.ndarray:
    """Leaves (already NumPy) to one flat float64 vector, in optree's leaf order."""
    return np.concatenate([np.reshape(np.asarray(leaf, dtype=np.float64), (-1,)) for leaf in leaves])


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


def available_backends(names: list[str] | None = None) -> list[Backend]:
    chosen = [get_backend(n) for n in names] if names is not None else list(BACKENDS.values())
    return [b for b in chosen if b.unavailable_reason() is None]


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"`backend` must be one of {sorted(BACKENDS)}. Received: {name!r}.") from None


_BUILTIN = ("numpy_core", "torch_core", "torch_adapter", "jax_core", "jax_adapter", "tf_adapter")


def _register_builtin() -> None:
    """Register the backends of every module in `_BUILTIN`. The modules import their framework only
    inside their methods, so all of them import without it (a backend whose framework is missing is
    reported by `Backend.unavailable_reason`); a module that fails to import raises."""
    import importlib

    for name in _BUILTIN:
        for backend in importlib.import_module(f"{__name__}.{name}").BACKENDS:
            register(backend)


_register_builtin()
