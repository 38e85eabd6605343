"""The conformance problems: data, initial parameters, the loss in Array API ops, and its
analytic gradient and Hessian-vector product in NumPy float64.

Each problem is defined once. ``loss(xp, params, data)`` is written with Array API operations
only, so a backend can evaluate it with its own arrays and differentiate it with its own
autodiff. ``grad`` and ``hvp`` are hand-written (backprop and Pearlmutter's R-operator for the
MLP) for NumPy, and are the independent source of the reference trajectories; the tests check
them against finite differences.

Problems:

* ``quadratic``: :math:`L = \\tfrac12 x^\\top A x - b^\\top x` with :math:`A` symmetric positive
  definite and condition number 100; the parameters are two leaves ``{"a": (4,), "b": (2,)}``.
* ``logistic``: mean binary cross-entropy of a linear model on fixed Gaussian data; leaves
  ``{"w": (5,), "b": ()}`` (a 0-d leaf on purpose).
* ``mlp``: a 4-8-6-3 perceptron with tanh activations and mean softmax cross-entropy; the
  parameters are a nested dict with leaves of several shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Problem", "PROBLEMS", "get_problem"]

Params = dict[str, Any]


@dataclass(frozen=True)
class Problem:
    """One optimization problem, defined independently of any framework."""

    name: str
    description: str
    params0: Callable[[], Params]  # float64 NumPy initial parameters
    data: dict[str, np.ndarray] = field(repr=False)  # float64 NumPy data
    loss: Callable[[Any, Params, dict[str, Any]], Any] = field(repr=False)  # Array API loss
    grad: Callable[[Params, dict[str, np.ndarray]], tuple[Any, Params]] = field(repr=False)
    hvp: Callable[[Params, Params, dict[str, np.ndarray]], Params] = field(repr=False)
    lr: float = 0.1  # a learning rate at which every scenario stays stable for 20+ steps

    def grad_fn(self, data: dict[str, np.ndarray] | None = None) -> Callable[[Params], tuple[Any, Params]]:
        data = self.data if data is None else data
        return lambda params: self.grad(params, data)

    def hvp_fn(self, data: dict[str, np.ndarray] | None = None) -> Callable[[Params, Params], Params]:
        data = self.data if data is None else data
        return lambda params, v: self.hvp(params, v, data)


# ------------------------------------------------------------------------------------------
# quadratic


def _quadratic_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    eigenvalues = np.geomspace(1.0, 100.0, 6)
    A = (q * eigenvalues) @ q.T
    A = 0.5 * (A + A.T)
    return {"A": A, "b": rng.normal(size=6)}


def _qx(xp: Any, params: Params) -> Any:
    return xp.concat([params["a"], params["b"]])


def _quadratic_loss(xp: Any, params: Params, data: dict[str, Any]) -> Any:
    x = _qx(xp, params)
    return 0.5 * xp.vecdot(x, data["A"] @ x) - xp.vecdot(data["b"], x)


def _split_q(v: np.ndarray) -> Params:
    return {"a": v[:4], "b": v[4:]}


def _quadratic_grad(params: Params, data: dict[str, np.ndarray]) -> tuple[Any, Params]:
    x = np.concatenate([params["a"], params["b"]])
    Ax = data["A"].astype(x.dtype) @ x
    loss = 0.5 * x @ Ax - data["b"].astype(x.dtype) @ x
    return np.asarray(loss), _split_q(Ax - data["b"].astype(x.dtype))


def _quadratic_hvp(params: Params, v: Params, data: dict[str, np.ndarray]) -> Params:
    u = np.concatenate([v["a"], v["b"]])
    return _split_q(data["A"].astype(u.dtype) @ u)


QUADRATIC = Problem(
    name="quadratic",
    description="0.5 x'Ax - b'x, A SPD with eigenvalues 1..100 (condition 100), leaves (4,) and (2,)",
    params0=lambda: {"a": np.array([1.0, -0.5, 0.25, 0.8]), "b": np.array([-1.2, 0.6])},
    data=_quadratic_data(),
    loss=_quadratic_loss,
    grad=_quadratic_grad,
    hvp=_quadratic_hvp,
    lr=0.004,
)

# ------------------------------------------------------------------------------------------
# logistic regression


def _logistic_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5678)
    X = rng.normal(size=(48, 5))
    w_true = rng.normal(size=5)
    y = (rng.uniform(size=48) < 1.0 / (1.0 + np.exp(-(X @ w_true + 0.3)))).astype(np.float64)
    return {"X": X, "y": y}


def _logistic_loss(xp: Any, params: Params, data: dict[str, Any]) -> Any:
    z = data["X"] @ params["w"] + params["b"]
    return xp.mean(xp.logaddexp(xp.zeros_like(z), z) - data["y"] * z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _logistic_grad(params: Params, data: dict[str, np.ndarray]) -> tuple[Any, Params]:
    X, y = data["X"].astype(params["w"].dtype), data["y"].astype(params["w"].dtype)
    z = X @ params["w"] + params["b"]
    loss = np.mean(np.logaddexp(0.0, z) - y * z)
    r = (_sigmoid(z) - y) / len(y)
    return np.asarray(loss, dtype=z.dtype), {"w": X.T @ r, "b": np.asarray(np.sum(r), dtype=z.dtype)}


def _logistic_hvp(params: Params, v: Params, data: dict[str, np.ndarray]) -> Params:
    X = data["X"].astype(params["w"].dtype)
    z = X @ params["w"] + params["b"]
    s = _sigmoid(z)
    u = s * (1.0 - s) * (X @ v["w"] + v["b"]) / len(z)
    return {"w": X.T @ u, "b": np.asarray(np.sum(u), dtype=z.dtype)}


LOGISTIC = Problem(
    name="logistic",
    description="logistic regression, 48 samples x 5 features + bias (a 0-d leaf), mean BCE",
    params0=lambda: {"w": np.array([0.5, -0.3, 0.2, 0.1, -0.4]), "b": np.asarray(0.1)},
    data=_logistic_data(),
    loss=_logistic_loss,
    grad=_logistic_grad,
    hvp=_logistic_hvp,
    lr=0.5,
)

# ------------------------------------------------------------------------------------------
# MLP 4-8-6-3, tanh, softmax cross-entropy

_SIZES = (4, 8, 6, 3)
_LAYERS = ("hidden1", "hidden2", "out")


def _mlp_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(91011)
    X = rng.normal(size=(32, _SIZES[0]))
    labels = rng.integers(0, _SIZES[-1], size=32)
    return {"X": X, "Y": np.eye(_SIZES[-1])[labels]}


def _mlp_params0() -> Params:
    rng = np.random.default_rng(1213)
    params = {}
    for name, fan_in, fan_out in zip(_LAYERS, _SIZES[:-1], _SIZES[1:]):
        params[name] = {"w": rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in), "b": 0.1 * rng.normal(size=fan_out)}
    return params


def _mlp_loss(xp: Any, params: Params, data: dict[str, Any]) -> Any:
    h = data["X"]
    for name in _LAYERS[:-1]:
        h = xp.tanh(h @ params[name]["w"] + params[name]["b"])
    logits = h @ params["out"]["w"] + params["out"]["b"]
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    log_probs = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
    return -xp.mean(xp.sum(data["Y"] * log_probs, axis=1))


def _mlp_forward(params: Params, X: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    zs = [X]
    for name in _LAYERS[:-1]:
        zs.append(np.tanh(zs[-1] @ params[name]["w"] + params[name]["b"]))
    logits = zs[-1] @ params["out"]["w"] + params["out"]["b"]
    return zs, logits


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _mlp_grad(params: Params, data: dict[str, np.ndarray]) -> tuple[Any, Params]:
    dtype = params["out"]["w"].dtype
    X, Y = data["X"].astype(dtype), data["Y"].astype(dtype)
    n = X.shape[0]
    zs, logits = _mlp_forward(params, X)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -np.mean(np.sum(Y * log_probs, axis=1))
    delta = (np.exp(log_probs) - Y) / n  # d loss / d logits
    grads: Params = {}
    for i in range(len(_LAYERS) - 1, -1, -1):
        name = _LAYERS[i]
        grads[name] = {"w": zs[i].T @ delta, "b": delta.sum(axis=0)}
        if i > 0:
            delta = (delta @ params[name]["w"].T) * (1.0 - zs[i] ** 2)
    return np.asarray(loss, dtype=dtype), {name: grads[name] for name in _LAYERS}


def _mlp_hvp(params: Params, v: Params, data: dict[str, np.ndarray]) -> Params:
    """Pearlmutter's R-operator: forward R-pass, then the backward pass differentiated along v."""
    dtype = params["out"]["w"].dtype
    X, Y = data["X"].astype(dtype), data["Y"].astype(dtype)
    n = X.shape[0]
    # forward and R-forward
    zs, rzs = [X], [np.zeros_like(X)]
    for name in _LAYERS[:-1]:
        a = zs[-1] @ params[name]["w"] + params[name]["b"]
        ra = rzs[-1] @ params[name]["w"] + zs[-1] @ v[name]["w"] + v[name]["b"]
        z = np.tanh(a)
        zs.append(z)
        rzs.append((1.0 - z**2) * ra)
    logits = zs[-1] @ params["out"]["w"] + params["out"]["b"]
    rlogits = rzs[-1] @ params["out"]["w"] + zs[-1] @ v["out"]["w"] + v["out"]["b"]
    p = _softmax(logits)
    rp = p * (rlogits - np.sum(p * rlogits, axis=1, keepdims=True))
    # backward and R-backward
    delta, rdelta = (p - Y) / n, rp / n
    out: Params = {}
    for i in range(len(_LAYERS) - 1, -1, -1):
        name = _LAYERS[i]
        out[name] = {"w": rzs[i].T @ delta + zs[i].T @ rdelta, "b": rdelta.sum(axis=0)}
        if i > 0:
            w, rw = params[name]["w"], v[name]["w"]
            back, rback = delta @ w.T, rdelta @ w.T + delta @ rw.T
            z, rz = zs[i], rzs[i]
            delta, rdelta = back * (1.0 - z**2), rback * (1.0 - z**2) - back * 2.0 * z * rz
    return {name: out[name] for name in _LAYERS}


MLP = Problem(
    name="mlp",
    description="MLP 4-8-6-3, tanh, mean softmax cross-entropy, 32 samples; nested dict of 6 leaves",
    params0=_mlp_params0,
    data=_mlp_data(),
    loss=_mlp_loss,
    grad=_mlp_grad,
    hvp=_mlp_hvp,
    lr=0.3,
)

PROBLEMS: dict[str, Problem] = {p.name: p for p in (QUADRATIC, LOGISTIC, MLP)}


def get_problem(name: str) -> Problem:
    try:
        return PROBLEMS[name]
    except KeyError:
        raise ValueError(f"`problem` must be one of {sorted(PROBLEMS)}. Received: {name!r}.") from None
