"""gradnorm for JAX: a pure, jit-able rule step from a loss function, an optax
``GradientTransformationExtraArgs`` around any optax optimizer, and a data-parallel step over a
device mesh with a choice of perturbation policy.

* ``step(params, loss_fn, *args, rule=..., **hyperparameters) -> gradnorm.StepResult``
* ``transform(base, rule=..., **hyperparameters) -> optax.GradientTransformationExtraArgs``
* ``data_parallel_step(params, loss_fn, *args, mesh=..., rule=..., perturbation="local")``

The adapter holds no rule math: gradients come from ``jax.value_and_grad``, Hessian-vector
products from ``jax.jvp`` of ``jax.grad`` (forward-over-reverse), and the rules are the core's.
Importing this module imports jax and optax; ``import gradnorm`` alone does not.
"""

from __future__ import annotations

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
from ._parallel import data_parallel_step
from ._step import step
from ._transform import TransformState, transform

__all__ = ["ClosureError", "PERTURBATIONS", "JaxOps", "JaxOracle", "TransformState", "data_parallel_step", "step", "transform"]
