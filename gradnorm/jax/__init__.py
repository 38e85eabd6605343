"""gradnorm for JAX: a pure, jit-able rule step from a loss function, an optax
``GradientTransformationExtraArgs`` around any optax optimizer, and a data-parallel step over a
device mesh with a choice of perturbation policy.

* ``step(params, loss_fn, *args, rule=..., **hyperparameters) -> gradnorm.StepResult``
* ``transform(base, rule=..., **hyperparameters) -> optax.GradientTransformationExtraArgs``
* ``data_parallel_step(params, loss_fn, *args, mesh=..., rule=..., perturbation="local")``
* ``MultiSteps(transform(...), every_k_schedule=k)``: ``optax.MultiSteps`` that runs the rule on
  the emitting micro-step only (``ChainOrderWarning``: a transform placed where it cannot act)
* ``gradnorm.jax.nnx.Optimizer(model, base, rule=..., **hyperparameters)``: ``flax.nnx.Optimizer``
  whose ``update(model, loss_fn=...)`` takes a loss of the model (imported on first use)
* ``gradnorm.jax.diagnostics``: Hessian eigenvalues, trace, spectral density and flatness measures
  of a loss function (jit-able), and ``diagnostics.monitor(every)``, an optax transformation that
  logs them during training (imported on first use)

The adapter holds no rule math: gradients come from ``jax.value_and_grad``, Hessian-vector
products from ``jax.jvp`` of ``jax.grad`` (forward-over-reverse), and the rules are the core's.
Importing this module imports jax and optax; ``import gradnorm`` alone does not.
"""

from __future__ import annotations

from typing import Any

try:
    import jax as _jax  # noqa: F401
    import optax as _optax  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gradnorm.jax needs JAX and optax: `pip install \"gradnorm[jax]\"` (or install jax for your platform, and optax)."
    ) from err

from .._errors import ClosureError
from .._oracle import PERTURBATIONS
from ._common import JaxOracle
from ._ops import JaxOps
from ._optax import ChainOrderWarning, MultiSteps
from ._parallel import data_parallel_step
from ._step import step
from ._transform import TransformState, transform

__all__ = [
    "PERTURBATIONS",
    "ChainOrderWarning",
    "ClosureError",
    "JaxOps",
    "JaxOracle",
    "MultiSteps",
    "TransformState",
    "data_parallel_step",
    "diagnostics",
    "step",
    "transform",
]


def __getattr__(name: str) -> Any:
    if name in ("diagnostics", "nnx"):  # the flatness diagnostics and the flax nnx optimizer, imported on first use
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
