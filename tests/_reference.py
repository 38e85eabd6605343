"""Independent numpy reference for the gradnorm rules (tests only).

Everything here is written from the math in ALGORITHMS.md part A, never from the library's
rule code, so the tests that use it are an independent check. Vectors are flat float64 numpy
arrays; :class:`Layout` maps them to and from the parameter trees handed to ``gradnorm.step``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from conformance.reference import NORM_EPS, U, norm  # noqa: F401


# --------------------------------------------------------------------------------------------
# Parameter trees
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a flat vector is split into a tree: ``kind`` in {"dict", "list", "tuple", "array"}."""

    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.shapes)

    def unflatten(self, v: np.ndarray) -> Any:
        v = np.asarray(v, dtype=np.float64)
        assert v.shape == (self.size,)
        if self.kind == "array":
            return v.copy()
        leaves, i = [], 0
        for _, shape in self.shapes:
            n = int(np.prod(shape))
            leaves.append(v[i : i + n].reshape(shape).copy())
            i += n
        if self.kind == "dict":
            return {k: leaf for (k, _), leaf in zip(self.shapes, leaves)}
        if self.kind == "list":
            return leaves
        if self.kind == "tuple":
            return tuple(leaves)
        raise AssertionError(self.kind)

    def leaves(self, tree: Any) -> list[np.ndarray]:
        if self.kind == "array":
            return [tree]
        if self.kind == "dict":
            assert isinstance(tree, dict) and set(tree) == {k for k, _ in self.shapes}, tree
            return [tree[k] for k, _ in self.shapes]
        assert isinstance(tree, (list, tuple)) and len(tree) == len(self.shapes), tree
        return list(tree)

    def flatten(self, tree: Any, *, check: bool = True) -> np.ndarray:
        leaves = self.leaves(tree)
        out = []
        for leaf, (_, shape) in zip(leaves, self.shapes if self.kind != "array" else (("", (self.size,)),)):
            a = np.asarray(leaf)
            if check:
                assert a.shape == tuple(shape), (a.shape, shape)
                assert a.dtype == np.float64, a.dtype
            out.append(a.reshape(-1))
        return np.concatenate(out).astype(np.float64)


def layouts_for(size: int) -> dict[str, Layout]:
    if size == 5:
        return {
            "dict": Layout("dict", (("w", (2, 2)), ("b", (1,)))),
            "list": Layout("list", (("0", (3,)), ("1", (1, 2)))),
            "array": Layout("array", (("", (5,)),)),
        }
    if size == 4:
        return {
            "dict": Layout("dict", (("w", (3,)), ("b", (1,)))),
            "tuple": Layout("tuple", (("0", (1, 3)), ("1", (1,)))),
            "array": Layout("array", (("", (4,)),)),
        }
    raise AssertionError(size)


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


class Quadratic:
    """L(x) = 0.5 x^T A x - c^T x with A symmetric positive definite (eigenvalues 1..100)."""

    def __init__(self, dim: int = 5, seed: int = 0, cond: float = 100.0):
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        eig = np.logspace(0.0, np.log10(cond), dim)
        a = (q * eig) @ q.T
        self.A = 0.5 * (a + a.T)
        self.c = rng.standard_normal(dim)
        self.x0 = rng.standard_normal(dim)
        self.dim = dim

    def loss(self, x: np.ndarray) -> float:
        return float(0.5 * x @ self.A @ x - self.c @ x)

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self.A @ x - self.c

    def hvp(self, x: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.A @ v


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


class Logistic:
    """Mean binary cross-entropy of a logistic model on fixed data; x = (weights[3], bias)."""

    def __init__(self, n: int = 40, features: int = 3, seed: int = 1):
        rng = np.random.default_rng(seed)
        feats = rng.standard_normal((n, features))
        self.X = np.concatenate([feats, np.ones((n, 1))], axis=1)
        w_true = rng.standard_normal(features + 1)
        p = _sigmoid(self.X @ w_true)
        self.y = (rng.random(n) < p).astype(np.float64)
        self.x0 = 0.5 * rng.standard_normal(features + 1)
        self.n = n
        self.dim = features + 1

    def per_example(self, x: np.ndarray) -> np.ndarray:
        z = self.X @ x
        return np.logaddexp(0.0, z) - self.y * z

    def loss(self, x: np.ndarray) -> float:
        return float(np.mean(self.per_example(x)))

    def grad(self, x: np.ndarray) -> np.ndarray:
        s = _sigmoid(self.X @ x)
        return self.X.T @ (s - self.y) / self.n

    def hvp(self, x: np.ndarray, v: np.ndarray) -> np.ndarray:
        s = _sigmoid(self.X @ x)
        return self.X.T @ (s * (1.0 - s) * (self.X @ v)) / self.n


class TreeOracle:
    """grad_fn / hvp_fn for gradnorm.step on a tree layout; records every evaluation point."""

    def __init__(self, problem: Any, layout: Layout):
        self.problem = problem
        self.layout = layout
        self.grad_points: list[np.ndarray] = []
        self.hvp_calls: list[tuple[np.ndarray, np.ndarray]] = []

    def grad_fn(self, params: Any) -> tuple[np.ndarray, Any]:
        x = self.layout.flatten(params)
        self.grad_points.append(x)
        return np.asarray(self.problem.loss(x), dtype=np.float64), self.layout.unflatten(self.problem.grad(x))

    def hvp_fn(self, params: Any, v: Any) -> Any:
        x = self.layout.flatten(params)
        vv = self.layout.flatten(v)
        self.hvp_calls.append((x, vv))
        return self.layout.unflatten(self.problem.hvp(x, vv))


# --------------------------------------------------------------------------------------------
# Reference rules (generic: they evaluate the problem's gradient where the math says)
# --------------------------------------------------------------------------------------------


from conformance.reference import (  # noqa: E402,F401  (the rule math lives with the conformance suite)
    REFERENCES,
    Expected,
    ref_coherent,
    ref_fd_gr,
    ref_flooding,
    ref_gam,
    ref_gnp,
    ref_gr,
    ref_sam,
    ref_sgd,
    reference,
)
