"""The models, written once against the Array API namespace of their arrays.

``MLP.loss`` and ``DLN.loss`` use only Array API functions of ``xp`` (the namespace of the
inputs: NumPy, PyTorch, JAX through array-api-compat, TensorFlow through gradnorm's shim), so the
same source is differentiated by every backend's autodiff. For the NumPy backend each model also
has a hand-written gradient (backprop) and a hand-written exact Hessian-vector product
(Pearlmutter's R-operator: forward-mode differentiation of the backprop, written out by hand).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._backend import array_namespace

__all__ = ["DLN", "MLP"]


class MLP:
    """A one-hidden-layer perceptron, ``sizes[0] -> sizes[1] (tanh) -> sizes[2]`` (softmax),
    mean cross-entropy against one-hot labels ``y``. Parameters ``{"W1", "b1", "W2", "b2"}``."""

    name = "mlp"

    def __init__(self, sizes: tuple[int, int, int] = (64, 64, 10)):
        self.sizes = sizes

    def init(self, seed: int, dtype: str = "float64") -> dict[str, np.ndarray]:
        """Glorot-style normal weights (std 1/sqrt(fan_in)), zero biases, from ``seed``."""
        rng = np.random.default_rng(seed)
        d_in, d_h, d_out = self.sizes
        return {
            "W1": rng.normal(0.0, 1.0 / math.sqrt(d_in), size=(d_in, d_h)).astype(dtype),
            "b1": np.zeros(d_h, dtype=dtype),
            "W2": rng.normal(0.0, 1.0 / math.sqrt(d_h), size=(d_h, d_out)).astype(dtype),
            "b2": np.zeros(d_out, dtype=dtype),
        }

    # -- the Array API model: what the autodiff backends differentiate ----------------------
    @staticmethod
    def loss(params: dict[str, Any], x: Any, y: Any) -> Any:
        xp = array_namespace(x)
        h = xp.tanh(xp.matmul(x, params["W1"]) + params["b1"])
        z = xp.matmul(h, params["W2"]) + params["b2"]
        z = z - xp.max(z, axis=1, keepdims=True)
        logp = z - xp.log(xp.sum(xp.exp(z), axis=1, keepdims=True))
        return -xp.mean(xp.sum(y * logp, axis=1))

    # -- NumPy: evaluation, hand-written gradient and HVP -----------------------------------
    @staticmethod
    def _forward(params: dict[str, np.ndarray], x: np.ndarray):
        h = np.tanh(x @ params["W1"] + params["b1"])
        z = h @ params["W2"] + params["b2"]
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        return h, e / s, z - np.log(s)

    def logits(self, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        h = np.tanh(x @ params["W1"] + params["b1"])
        return h @ params["W2"] + params["b2"]

    def value(self, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
        _, _, logp = self._forward(params, x)
        return float(-np.sum(y * logp) / x.shape[0])

    def predict(self, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        return self.logits(params, x).argmax(axis=1)

    def numpy_value_and_grad(self, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
        n = x.shape[0]
        h, p, logp = self._forward(params, x)
        value = -np.sum(y * logp) / n
        dz2 = (p - y) / n
        dz1 = (dz2 @ params["W2"].T) * (1.0 - h * h)
        grads = {"W1": x.T @ dz1, "b1": dz1.sum(axis=0), "W2": h.T @ dz2, "b2": dz2.sum(axis=0)}
        return value, grads

    def numpy_hvp(self, params: dict[str, np.ndarray], v: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
        """The exact Hessian applied to ``v``, by the R-operator (``r_*`` is the derivative of
        ``*`` along ``v``)."""
        n = x.shape[0]
        h, p, _ = self._forward(params, x)
        w2 = params["W2"]
        s = 1.0 - h * h  # tanh'
        r_h = s * (x @ v["W1"] + v["b1"])
        r_z2 = r_h @ w2 + h @ v["W2"] + v["b2"]
        r_p = p * (r_z2 - (p * r_z2).sum(axis=1, keepdims=True))  # softmax Jacobian-vector product
        dz2 = (p - y) / n
        r_dz2 = r_p / n
        dh = dz2 @ w2.T
        r_dh = r_dz2 @ w2.T + dz2 @ v["W2"].T
        r_dz1 = r_dh * s - 2.0 * dh * h * r_h  # d(1 - h^2) = -2 h r_h
        return {"W1": x.T @ r_dz1, "b1": r_dz1.sum(axis=0), "W2": r_h.T @ dz2 + h.T @ r_dz2, "b2": r_dz2.sum(axis=0)}


class DLN:
    """The diagonal linear network ``w = u*u - v*v`` with the squared loss
    ``||X w - y||^2 / (2n)``. Parameters ``{"u", "v"}``, initialized at ``u = v = scale``
    (so ``w = 0``)."""

    name = "dln"

    def __init__(self, d: int = 100, scale: float = 0.1):
        self.d = d
        self.scale = scale

    def init(self, seed: int, dtype: str = "float64") -> dict[str, np.ndarray]:
        del seed  # deterministic
        return {"u": np.full(self.d, self.scale, dtype=dtype), "v": np.full(self.d, self.scale, dtype=dtype)}

    @staticmethod
    def loss(params: dict[str, Any], x: Any, y: Any) -> Any:
        xp = array_namespace(x)
        w = params["u"] * params["u"] - params["v"] * params["v"]
        r = xp.matmul(x, w) - y
        return xp.mean(r * r) / 2.0

    @staticmethod
    def weights(params: dict[str, np.ndarray]) -> np.ndarray:
        return params["u"] ** 2 - params["v"] ** 2

    def value(self, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
        r = x @ self.weights(params) - y
        return float(r @ r / (2.0 * x.shape[0]))

    def numpy_value_and_grad(self, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
        n = x.shape[0]
        u, v = params["u"], params["v"]
        r = x @ (u * u - v * v) - y
        q = x.T @ r / n  # dL/dw
        return r @ r / (2.0 * n), {"u": 2.0 * u * q, "v": -2.0 * v * q}

    def numpy_hvp(self, params: dict[str, np.ndarray], t: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
        n = x.shape[0]
        u, v = params["u"], params["v"]
        r = x @ (u * u - v * v) - y
        q = x.T @ r / n
        r_w = 2.0 * u * t["u"] - 2.0 * v * t["v"]
        r_q = x.T @ (x @ r_w) / n
        return {"u": 2.0 * t["u"] * q + 2.0 * u * r_q, "v": -2.0 * t["v"] * q - 2.0 * v * r_q}
