"""Independent numpy reference for the gradnorm rules (tests only).

Everything here is written from the math in ALGORITHMS.md part A, never from the library's
rule code, so the tests that use it are an independent check. Vectors are flat float64 numpy
arrays; :class:`Layout` maps them to and from the parameter trees handed to ``gradnorm.step``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

NORM_EPS = 1e-12
U = float(np.finfo(np.float64).eps)


def norm(v: np.ndarray) -> float:
    return float(np.sqrt(np.sum(v * v)))


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


@dataclasses.dataclass
class Expected:
    direction: np.ndarray
    info: dict[str, float]  # derivable scalar info entries
    grad_evals: int
    hvp_evals: int = 0
    atol: float = 0.0  # extra absolute tolerance for round-off the math amplifies (finite differences)


def _base_info(problem: Any, x: np.ndarray, g: np.ndarray, d: np.ndarray) -> dict[str, float]:
    return {"loss": problem.loss(x), "grad_norm": norm(g), "update_norm": norm(d)}


def _offset(base: np.ndarray, v: np.ndarray, r: float, adaptive: bool, eta: float, eps: float) -> np.ndarray:
    """r v/(||v||+eps), or the ASAM form r T^2 v/(||T v||+eps) with T = |base| + eta."""
    if adaptive:
        t = np.abs(base) + eta
        return r * t * t * v / (norm(t * v) + eps)
    return r * v / (norm(v) + eps)


def ref_sgd(p: Any, x: np.ndarray, *, norm_eps: float = NORM_EPS) -> Expected:
    g = p.grad(x)
    return Expected(g, _base_info(p, x, g, g), 1)


def ref_sam(p: Any, x: np.ndarray, *, rho: float, adaptive: bool = False, eta: float = 0.0,
            norm_eps: float = NORM_EPS) -> Expected:
    g = p.grad(x)
    if rho == 0:
        return Expected(g, _base_info(p, x, g, g), 1)
    xe = x + _offset(x, g, rho, adaptive, eta, norm_eps)
    d = p.grad(xe)
    info = _base_info(p, x, g, d)
    info["perturbed_loss"] = p.loss(xe)
    return Expected(d, info, 2)


def ref_gnp(p: Any, x: np.ndarray, *, r: float, alpha: float, mix_unit_gradient: bool = False,
            norm_eps: float = NORM_EPS) -> Expected:
    g = p.grad(x)
    if r == 0 or alpha == 0:
        return Expected(g, _base_info(p, x, g, g), 1)
    ghat = g / (norm(g) + norm_eps)
    xe = x + r * ghat
    first = ghat if mix_unit_gradient else g
    d = (1.0 - alpha) * first + alpha * p.grad(xe)
    info = _base_info(p, x, g, d)
    info["perturbed_loss"] = p.loss(xe)
    return Expected(d, info, 2)


def ref_gr(p: Any, x: np.ndarray, *, gamma: float, penalty: str = "squared", norm_eps: float = NORM_EPS) -> Expected:
    g = p.grad(x)
    if gamma == 0:
        return Expected(g, _base_info(p, x, g, g), 1)
    hg = p.hvp(x, g)
    if penalty == "squared":
        d = g + gamma * hg
    elif penalty == "norm":
        d = g + gamma * hg / (norm(g) + norm_eps)
    else:
        raise AssertionError(penalty)
    return Expected(d, _base_info(p, x, g, d), 1, 1)


def ref_fd_gr(p: Any, x: np.ndarray, *, gamma: float, eps: float, difference: str = "forward",
              normalize: bool = False, norm_eps: float = NORM_EPS) -> Expected:
    g = p.grad(x)
    if gamma == 0:
        return Expected(g, _base_info(p, x, g, g), 1)
    s = eps / (norm(g) + norm_eps) if normalize else eps
    extra: dict[str, float] = {"step_size": s}
    grads = [g]
    if difference == "forward":
        gp = p.grad(x + s * g)
        grads.append(gp)
        hg = (gp - g) / s
        extra["ascent_loss"] = p.loss(x + s * g)
        evals, denom = 2, s
    elif difference == "backward":
        gm = p.grad(x - s * g)
        grads.append(gm)
        hg = (g - gm) / s
        extra["descent_loss"] = p.loss(x - s * g)
        evals, denom = 2, s
    elif difference == "central":
        gp, gm = p.grad(x + s * g), p.grad(x - s * g)
        grads += [gp, gm]
        hg = (gp - gm) / (2 * s)
        extra["ascent_loss"] = p.loss(x + s * g)
        extra["descent_loss"] = p.loss(x - s * g)
        evals, denom = 3, 2 * s
    else:
        raise AssertionError(difference)
    d = g + gamma * hg
    info = _base_info(p, x, g, d)
    info.update(extra)
    # Round-off of a difference quotient: a few ulps of the gradients (and of the points,
    # times the curvature) divided by the step, times gamma.
    scale = max(norm(v) for v in grads) + norm(x) * max(1.0, norm(hg) / max(norm(g), 1e-300))
    atol = 64 * U * abs(gamma) * scale / denom
    return Expected(d, info, evals, 0, atol)


def ref_gam(p: Any, x: np.ndarray, *, grad_rho: float = 0.02, grad_norm_rho: float = 0.2,
            grad_beta_0: float = 0.5, grad_beta_1: float = 0.6, grad_gamma: float = 0.03,
            adaptive: bool = False, variant: str = "code", norm_eps: float = NORM_EPS) -> Expected:
    g0 = p.grad(x)
    if grad_rho == 0 and grad_norm_rho == 0:
        return Expected(g0, _base_info(p, x, g0, g0), 1)
    x1 = x + _offset(x, g0, grad_rho, adaptive, 0.0, norm_eps)
    g1 = p.grad(x1)
    x2 = x + _offset(x, g1 - g0, grad_norm_rho, adaptive, 0.0, norm_eps)
    g2 = p.grad(x2)
    x3 = x2 + _offset(x2, g2, grad_rho, adaptive, 0.0, norm_eps)
    g3 = p.grad(x3)
    hp = grad_beta_1 * g1 + (1.0 - grad_beta_1) * g3
    if variant == "code":
        hm = g0 + abs(1.0 - grad_beta_0) * g2
    elif variant == "paper":
        hm = grad_beta_0 * g0 + (1.0 - grad_beta_0) * g2
    else:
        raise AssertionError(variant)
    cos = float(hm @ hp) / (norm(hp) * norm(hm) + norm_eps)
    perp = hm - cos * norm(hm) * hp / (norm(hp) + norm_eps)
    d = hp - grad_gamma * perp
    info = _base_info(p, x, g0, d)
    info.update(perturbed_loss=p.loss(x1), norm_ascent_loss=p.loss(x2),
                norm_ascent_perturbed_loss=p.loss(x3), cosine=cos)
    return Expected(d, info, 4)


def ref_flooding(p: Any, x: np.ndarray, *, b: float, norm_eps: float = NORM_EPS) -> Expected:
    g = p.grad(x)
    sgn = float(np.sign(p.loss(x) - b))
    d = sgn * g
    info = _base_info(p, x, g, d)
    info["flood_sign"] = sgn
    return Expected(d, info, 1)


def ref_coherent(p: Any, x: np.ndarray, *, lam: float, threshold: float, penalty: str = "l2", delay: int = 0,
                 sparsity_tol: float = 1e-3, step: int = 0, norm_eps: float = NORM_EPS) -> Expected:
    g = p.grad(x)
    if penalty == "l2":
        rgrad = x.copy()
    elif penalty == "l1":
        rgrad = np.sign(x)
    else:
        raise AssertionError(penalty)
    reg = g + lam * rgrad
    cos = float(g @ reg) / (norm(g) * norm(reg) + norm_eps)
    gate = 1.0 if (cos >= threshold and step >= delay) else 0.0
    d = g + gate * lam * rgrad
    info = _base_info(p, x, g, d)
    info.update(gate=gate, coherence=cos, sparsity=float(np.mean(np.abs(x) < sparsity_tol)))
    return Expected(d, info, 1)


REFERENCES: dict[str, Callable[..., Expected]] = {
    "sgd": ref_sgd,
    "sam": ref_sam,
    "gnp": ref_gnp,
    "gr": ref_gr,
    "fd_gr": ref_fd_gr,
    "gam": ref_gam,
    "flooding": ref_flooding,
    "coherent": ref_coherent,
}


def reference(rule: str, problem: Any, x: np.ndarray, **hyper: Any) -> Expected:
    return REFERENCES[rule](problem, x, **hyper)
