"""gradnorm for PyTorch: a ``torch.optim``-style optimizer, a functional step on ``torch.func``,
and fused multi-tensor (``torch._foreach_*``) tree arithmetic; ``gradnorm.torch.diagnostics``: Hessian
eigenvalues, trace, spectral density and flatness measures of a model and a loss, and a ``Monitor``
that logs them during training (imported on first use).

Importing this module imports torch; ``import gradnorm`` alone does not.
"""

from __future__ import annotations

from typing import Any

try:
    import torch as _torch  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gradnorm.torch needs PyTorch: `pip install \"gradnorm[torch]\"` (or install torch for your platform)."
    ) from err

from .._errors import ClosureError
from .._oracle import HVP_MODES, PERTURBATIONS
from ._accumulate import accumulating_closure
from ._closure import ClosureOracle
from ._functional import step
from ._ops import TorchForeachOps
from ._optimizer import Optimizer
from ._passes import current_pass, is_extra_pass
from ._schedule import RuleScheduler

__all__ = [
    "ClosureError",
    "ClosureOracle",
    "HVP_MODES",
    "Optimizer",
    "PERTURBATIONS",
    "RuleScheduler",
    "TorchForeachOps",
    "accumulating_closure",
    "current_pass",
    "diagnostics",
    "is_extra_pass",
    "step",
]


def __getattr__(name: str) -> Any:
    if name == "diagnostics":  # the flatness diagnostics, imported on first use
        import importlib

        return importlib.import_module(f"{__name__}.diagnostics")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
