"""The backends: who differentiates the Array API model.

Each backend converts NumPy arrays to its own and back, and turns a model's Array API ``loss``
into ``value_and_grad(params, x, y) -> (loss, grads)`` and ``hvp(params, v, x, y) -> H v``:

* ``numpy``: the model's hand-written gradient and R-operator HVP (no autodiff);
* ``torch``: ``torch.autograd.grad``, and double backprop (``create_graph=True``) for the HVP
  (2-5 times faster than ``torch.func`` on this small model);
* ``jax``: ``jax.value_and_grad`` and forward-over-reverse ``jax.jvp``, both ``jax.jit``-ed (and the
  training step that calls them is jitted as a whole, see `gradnorm.reproduce._train`);
* ``tf``: ``tf.GradientTape`` (reverse-over-reverse for the HVP), in ``tf.function``.

A framework is imported only when its backend is created.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "Backend", "available", "get_backend"]

BACKENDS = ("numpy", "torch", "jax", "tf")
_MODULE = {"numpy": "numpy", "torch": "torch", "jax": "jax", "tf": "tensorflow"}


def available(name: str) -> bool:
    """Whether the framework of backend ``name`` can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(_MODULE[name]) is not None


class Backend:
    name = "numpy"

    def asarray(self, a: np.ndarray) -> Any:
        return a

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def tree(self, d: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: self.asarray(v) for k, v in d.items()}

    def tree_numpy(self, d: dict[str, Any]) -> dict[str, np.ndarray]:
        return {k: self.to_numpy(v) for k, v in d.items()}

    def sync(self, tree: Any) -> None:
        """Wait until ``tree`` is computed (asynchronous frameworks), for timing."""

    def compile(self, fn: Callable) -> Callable:
        """``fn`` compiled where the framework compiles (JAX: ``jax.jit``), else ``fn``."""
        return fn

    def oracles(self, model: Any) -> tuple[Callable, Callable]:
        """``(value_and_grad(params, x, y), hvp(params, v, x, y))`` for ``model`` (made once per
        model class and size, so that compiled functions are reused)."""
        cache = self.__dict__.setdefault("_oracle_cache", {})
        key = (type(model).__name__, getattr(model, "sizes", None))
        if key not in cache:
            cache[key] = self._oracles(model)
        return cache[key]

    def _oracles(self, model: Any) -> tuple[Callable, Callable]:
        return model.numpy_value_and_grad, model.numpy_hvp

    @property
    def version(self) -> str:
        return f"NumPy {np.__version__}"


class TorchBackend(Backend):
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch
        torch.set_num_threads(1)

    def asarray(self, a: np.ndarray) -> Any:
        return self.torch.from_numpy(np.array(a, copy=True))

    def to_numpy(self, a: Any) -> np.ndarray:
        return a.detach().cpu().numpy()

    def _oracles(self, model: Any) -> tuple[Callable, Callable]:
        torch = self.torch
        loss = model.loss

        def leaves(params):
            return {k: p.detach().requires_grad_(True) for k, p in params.items()}

        def value_and_grad(params, x, y):
            q = leaves(params)
            value = loss(q, x, y)
            grads = torch.autograd.grad(value, list(q.values()))
            return value.detach(), dict(zip(q, grads))

        def hvp(params, v, x, y):  # double backprop: differentiate <grad L, v> once more
            q = leaves(params)
            grads = torch.autograd.grad(loss(q, x, y), list(q.values()), create_graph=True)
            gv = sum((g * v[k]).sum() for g, k in zip(grads, q))
            return dict(zip(q, torch.autograd.grad(gv, list(q.values()))))

        return value_and_grad, hvp

    @property
    def version(self) -> str:
        return f"PyTorch {self.torch.__version__}"


class JaxBackend(Backend):
    name = "jax"

    def __init__(self, *, x64: bool = False) -> None:
        import jax

        if x64:
            jax.config.update("jax_enable_x64", True)
        self.jax = jax

    def asarray(self, a: np.ndarray) -> Any:
        import jax.numpy as jnp

        out = jnp.asarray(a)
        if out.dtype != a.dtype:
            raise RuntimeError(
                f"JAX turned {a.dtype} into {out.dtype}: enable float64 (jax.enable_x64) for --dtype float64"
            )
        return out

    def sync(self, tree: Any) -> None:
        self.jax.block_until_ready(tree)

    def compile(self, fn: Callable) -> Callable:
        return self.jax.jit(fn)

    def _oracles(self, model: Any) -> tuple[Callable, Callable]:
        jax = self.jax
        loss = model.loss
        value_and_grad = jax.jit(jax.value_and_grad(loss))
        g = jax.grad(loss)
        hvp = jax.jit(lambda p, v, x, y: jax.jvp(lambda q: g(q, x, y), (p,), (v,))[1])
        return value_and_grad, hvp

    @property
    def version(self) -> str:
        return f"JAX {self.jax.__version__}"


class TFBackend(Backend):
    name = "tf"

    def __init__(self) -> None:
        import os

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # quiet, and the same op order as elsewhere
        import tensorflow as tf

        self.tf = tf
        try:  # only possible before TensorFlow's runtime starts
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:
            pass

    def asarray(self, a: np.ndarray) -> Any:
        return self.tf.constant(a)

    def to_numpy(self, a: Any) -> np.ndarray:
        return a.numpy()

    def compile(self, fn: Callable) -> Callable:
        return self.tf.function(fn)

    def _oracles(self, model: Any) -> tuple[Callable, Callable]:
        tf = self.tf
        loss = model.loss

        @tf.function
        def value_and_grad(params, x, y):
            with tf.GradientTape() as tape:
                tape.watch(params)
                value = loss(params, x, y)
            return value, tape.gradient(value, params)

        @tf.function
        def hvp(params, v, x, y):
            with tf.GradientTape() as outer:
                outer.watch(params)
                with tf.GradientTape() as inner:
                    inner.watch(params)
                    value = loss(params, x, y)
                grads = inner.gradient(value, params)
                gv = tf.add_n([tf.reduce_sum(grads[k] * v[k]) for k in grads])
            return outer.gradient(gv, params)

        return value_and_grad, hvp

    @property
    def version(self) -> str:
        return f"TensorFlow {self.tf.__version__}"


def get_backend(name: str, *, jax_x64: bool = False) -> Backend:
    """The backend ``name`` (one of `BACKENDS`); imports its framework. ``jax_x64`` turns on
    JAX's float64 for the whole process (the CLI does; tests use ``jax.enable_x64`` instead)."""
    if name == "numpy":
        return Backend()
    if name == "torch":
        return TorchBackend()
    if name == "jax":
        return JaxBackend(x64=jax_x64)
    if name == "tf":
        return TFBackend()
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; received {name!r}")
