"""Independent NumPy float64 reference of every rule, and of whole training trajectories.

Everything here is written from the math in ALGORITHMS.md part A, never from gradnorm's rule
code, so what it produces is an independent check of gradnorm on every backend. Vectors are flat
float64 arrays; a *problem* is anything with ``loss(x)``, ``grad(x)`` and ``hvp(x, v)`` on flat
vectors (:class:`FlatProblem` adapts a :class:`conformance.problems.Problem`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

NORM_EPS = 1e-12
U = float(np.finfo(np.float64).eps)


def norm(v: np.ndarray) -> float:
    return float(np.sqrt(np.sum(v * v)))


def _zero(value: Any) -> bool:
    """A strength of 0: a number, or a vector of per-coordinate values (per-leaf hyperparameters
    expanded to the flat parameter vector) that are all 0."""
    return bool(np.all(np.asarray(value) == 0))


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
    if _zero(rho):
        return Expected(g, _base_info(p, x, g, g), 1)
    xe = x + _offset(x, g, rho, adaptive, eta, norm_eps)
    d = p.grad(xe)
    info = _base_info(p, x, g, d)
    info["perturbed_loss"] = p.loss(xe)
    return Expected(d, info, 2)


def ref_gnp(p: Any, x: np.ndarray, *, r: float, alpha: float, mix_unit_gradient: bool = False,
            norm_eps: float = NORM_EPS) -> Expected:
    g = p.grad(x)
    if _zero(r) or _zero(alpha):
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
    if _zero(gamma):
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
    if _zero(gamma):
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
    if _zero(grad_rho) and _zero(grad_norm_rho):
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


def _rule_data(rule: Any) -> tuple[str, dict[str, Any]]:
    """The name and hyperparameters of a wrapped rule given as a rule object or its config (plain data:
    the reference never runs gradnorm's math)."""
    config = rule.to_config() if hasattr(rule, "to_config") else rule
    return config["rule"], dict(config["hyperparameters"])


def _leaf_slices(p: Any, n: int) -> list[slice]:
    """The coordinates of each parameter leaf in the flat vector (one slice if `p` has no leaves)."""
    sizes = getattr(p, "sizes", None) or [n]
    bounds = np.cumsum([0, *sizes])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def ref_periodic(p: Any, x: np.ndarray, *, inner: Any, every: int, reuse: bool = False, alpha: Any = 0.7,
                 decomposition: str = "global", norm_eps: float = NORM_EPS, step: int = 0,
                 memory: dict[str, Any] | None = None) -> Expected:
    """A multi-pass rule every `every` steps (t = step, from 0: t % every == 0 is a full step), the plain
    gradient between; with `reuse` (LookSAM), g + alpha ||g|| / (||g_v|| + eps) g_v between, where the
    last full step stored g_v = d - <g, d> / (||g||^2 + eps^2) g, d its direction (the part of d orthogonal
    to g). Globally or, with decomposition="per_tensor", leaf by leaf (p.sizes), where a leaf of one
    element has no orthogonal part (g_v = 0 there, and nothing is added). A wrapped rule at zero
    strength (one evaluation) makes every step the plain gradient. `memory`: a dict kept from step to
    step (g_v)."""
    g = p.grad(x)
    name, hyper = _rule_data(inner)
    full = step % every == 0
    if full:
        d_inner = REFERENCES[name](p, x, **hyper)
        if d_inner.grad_evals == 1:  # zero strength
            d, evals = g, 1
        else:
            d, evals = d_inner.direction, d_inner.grad_evals
            if reuse and memory is not None:
                parts = [slice(None)] if decomposition == "global" else _leaf_slices(p, x.size)
                gv = d.copy()
                for sl in parts:
                    if decomposition != "global" and sl.stop - sl.start == 1:
                        gv[sl] = 0.0
                    else:
                        gv[sl] = d[sl] - (float(g[sl] @ d[sl]) / (float(g[sl] @ g[sl]) + norm_eps**2)) * g[sl]
                memory["gv"] = gv
    else:
        evals = 1
        gv = None if memory is None else memory.get("gv")
        if not reuse or gv is None:
            d = g
        else:
            parts = [slice(None)] if decomposition == "global" else _leaf_slices(p, x.size)
            a = np.broadcast_to(np.asarray(alpha, dtype=np.float64), x.shape)
            d = g.copy()
            for sl in parts:
                if decomposition == "global" or sl.stop - sl.start > 1:
                    d[sl] = g[sl] + a[sl] * (norm(g[sl]) / (norm(gv[sl]) + norm_eps)) * gv[sl]
    info = _base_info(p, x, g, d)
    info["full_step"] = float(full)
    return Expected(d, info, evals)


def ref_looksam(p: Any, x: np.ndarray, *, rho: Any, every: int, alpha: Any = 0.7, decomposition: str = "global",
                adaptive: bool = False, eta: Any = 0.0, norm_eps: float = NORM_EPS, step: int = 0,
                memory: dict[str, Any] | None = None) -> Expected:
    """LookSAM: `ref_periodic` around SAM(rho, adaptive, eta) with reuse."""
    sam = {"rule": "sam", "hyperparameters": {"rho": rho, "adaptive": adaptive, "eta": eta, "norm_eps": norm_eps}}
    return ref_periodic(p, x, inner=sam, every=every, reuse=True, alpha=alpha, decomposition=decomposition,
                        norm_eps=norm_eps, step=step, memory=memory)


#: rules whose reference takes `step` (the step count from 0) and, for those in `CARRIES_MEMORY`,
#: `memory` (a dict kept from step to step)
STEPPED = ("coherent", "periodic", "looksam")
CARRIES_MEMORY = ("periodic", "looksam")

REFERENCES: dict[str, Callable[..., Expected]] = {
    "sgd": ref_sgd,
    "sam": ref_sam,
    "gnp": ref_gnp,
    "gr": ref_gr,
    "fd_gr": ref_fd_gr,
    "gam": ref_gam,
    "flooding": ref_flooding,
    "coherent": ref_coherent,
    "periodic": ref_periodic,
    "looksam": ref_looksam,
}


def reference(rule: str, problem: Any, x: np.ndarray, **hyper: Any) -> Expected:
    return REFERENCES[rule](problem, x, **hyper)


# --------------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------------


class FlatProblem:
    """A :class:`conformance.problems.Problem` seen on flat float64 vectors.

    Leaves are ordered as optree flattens the parameter tree (sorted dict keys), which is the
    order every backend's trajectory is recorded in.
    """

    def __init__(self, problem: Any):
        import optree

        self.problem = problem
        leaves, self.treedef = optree.tree_flatten(problem.params0())
        self.shapes = [np.shape(leaf) for leaf in leaves]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.x0 = self.flatten(problem.params0())

    def flatten(self, tree: Any) -> np.ndarray:
        import optree

        return np.concatenate([np.reshape(np.asarray(leaf, dtype=np.float64), (-1,)) for leaf in optree.tree_leaves(tree)])

    def unflatten(self, x: np.ndarray) -> Any:
        import optree

        leaves, i = [], 0
        for shape, size in zip(self.shapes, self.sizes):
            leaves.append(np.reshape(x[i : i + size], shape).copy())
            i += size
        return optree.tree_unflatten(self.treedef, leaves)

    def loss(self, x: np.ndarray) -> float:
        return float(self.problem.grad(self.unflatten(x), self.problem.data)[0])

    def grad(self, x: np.ndarray) -> np.ndarray:
        return self.flatten(self.problem.grad(self.unflatten(x), self.problem.data)[1])

    def hvp(self, x: np.ndarray, v: np.ndarray) -> np.ndarray:
        return self.flatten(self.problem.hvp(self.unflatten(x), self.unflatten(v), self.problem.data))


@dataclasses.dataclass
class Trajectory:
    """``params[k]`` is the flat parameter vector before step k (``steps + 1`` rows);
    ``losses[k]`` the loss at ``params[k]`` as reported by step k (``steps`` entries)."""

    params: np.ndarray
    losses: np.ndarray


def base_update(optimizer: str, lr: float, momentum: float):
    """The base optimizers of the scenarios, in PyTorch's convention:
    ``buf = momentum * buf + d`` (``buf = d`` on the first step), ``x = x - lr * buf``."""
    buf: list[np.ndarray | None] = [None]

    def apply(x: np.ndarray, d: np.ndarray) -> np.ndarray:
        if optimizer == "sgd":
            return x - lr * d
        buf[0] = d.copy() if buf[0] is None else momentum * buf[0] + d
        return x - lr * buf[0]

    if optimizer not in ("sgd", "momentum"):
        raise ValueError(f"`optimizer` must be 'sgd' or 'momentum'. Received: {optimizer!r}.")
    return apply


def reference_trajectory(problem: Any, rule: str, hyper: dict[str, Any], optimizer: str, lr: float,
                         momentum: float, steps: int) -> Trajectory:
    """The float64 trajectory of ``rule`` on ``problem``, from the reference math alone."""
    flat = FlatProblem(problem)
    apply = base_update(optimizer, lr, momentum)
    x = flat.x0.copy()
    params, losses = [x.copy()], []
    memory: dict[str, Any] = {}
    for k in range(steps):
        extra: dict[str, Any] = {"step": k} if rule in STEPPED else {}
        if rule in CARRIES_MEMORY:
            extra["memory"] = memory
        expected = REFERENCES[rule](flat, x, **hyper, **extra)
        losses.append(expected.info["loss"])
        x = apply(x, expected.direction)
        params.append(x.copy())
    return Trajectory(np.array(params), np.array(losses))
