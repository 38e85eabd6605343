"""gradnorm for TensorFlow: a rule step for custom loops (eager or ``tf.function``), Keras
``fit()`` integration (`gradnorm.tf.keras`), and flatness diagnostics of variables and a loss
closure with a Keras callback that logs them (`gradnorm.tf.diagnostics`).

Importing this module imports TensorFlow; ``import gradnorm`` alone does not. Keras is loaded only
when `gradnorm.tf.keras` is first used. Nothing here changes TensorFlow's global behaviour.
"""

from __future__ import annotations

from typing import Any

try:
    import tensorflow as _tf  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gradnorm.tf needs TensorFlow: `pip install \"gradnorm[tf]\"` (or install tensorflow for your platform)."
    ) from err

from .._compat import tensorflow as namespace  # the core's TensorFlow Array API namespace
from .._errors import ClosureError
from .._oracle import HVP_MODES, PERTURBATIONS
from ._guard import WeightGuard
from ._ops import TFOps
from ._step import VariableOracle, step

__all__ = [
    "HVP_MODES",
    "PERTURBATIONS",
    "ClosureError",
    "TFOps",
    "VariableOracle",
    "WeightGuard",
    "diagnostics",
    "keras",
    "namespace",
    "step",
]


def __getattr__(name: str) -> Any:
    if name in ("keras", "diagnostics"):  # Keras integration and the diagnostics, imported on first use
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
