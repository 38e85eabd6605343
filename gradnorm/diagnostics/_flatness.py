r"""First-order flatness measures: the gradient norm, SAM's sharpness and GAM's first-order flatness."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._curvature import Curvature

__all__ = ["FlatnessResult", "first_order_flatness_leaves", "sam_sharpness_leaves"]


def sam_sharpness_leaves(curv: Curvature, rho: float, loss: Any = None, grads: Any = None) -> Any:
    r"""$L(\theta + \rho\, g/\lVert g\rVert) - L(\theta)$ (Foret et al. 2021, eq. 1 with SAM's
    first-order maximizer). Two gradient evaluations (one if `loss`, `grads` are given)."""
    xp, ops = curv.xp, curv.ops
    if grads is None:
        loss, grads = curv.oracle.value_and_grad(curv.leaves)
    norm = ops.norm(grads)
    perturbed, _ = curv.oracle.value_and_grad_along(curv.leaves, rho / xp.maximum(norm, curv.tiny()), grads)
    return perturbed - loss


class FlatnessResult(NamedTuple):
    r"""GAM's first-order flatness $R^{(1)}_\rho(\theta) = \rho \max_{\lVert\delta\rVert \le \rho}
    \lVert\nabla L(\theta + \delta)\rVert$ (Zhang et al., CVPR 2023, eq. 4), estimated from below.

    Attributes:
        flatness: $\rho$ times the largest gradient norm seen on the ascent path (0-d array); a
            lower bound of $R^{(1)}_\rho$ that increases with `steps`.
        grad_norms: 1-d array: $\lVert\nabla L(\theta+\delta_t)\rVert$ for $t = 0..$`steps`
            ($\delta_0 = 0$, so the first entry is the plain gradient norm).
        perturbation: the maximizing $\delta$ found, a tree like the parameters.
        method: "exact" or "fd": how the HVPs were computed.
    """

    flatness: Any
    grad_norms: Any
    perturbation: Any
    method: str


def first_order_flatness_leaves(curv: Curvature, rho: float, steps: int) -> tuple[Any, Any, list[Any]]:
    r"""Normalized ascent on $\lVert\nabla L(\theta+\delta)\rVert$ over the ball $\lVert\delta\rVert\le\rho$.

    From $\delta_0 = 0$, each step moves to the boundary point along the ascent direction of the
    gradient norm, $\nabla_\delta \lVert\nabla L(\theta+\delta)\rVert = H(\theta+\delta)\,
    \nabla L(\theta+\delta)/\lVert\nabla L(\theta+\delta)\rVert$:

    $$\delta_{t+1} = \rho\, \frac{H(\theta+\delta_t)\, g_t}{\lVert H(\theta+\delta_t)\, g_t\rVert}.$$

    The first step is GAM's own approximation of the maximizer. It is the Frank-Wolfe step with
    full step size on the ball, so on a quadratic loss (where $\lVert g + A\delta\rVert^2$ is convex)
    the objective never decreases: each step's gradient norm is at least the previous one.
    Cost: `steps` HVPs and `steps + 1` gradients. Returns `(flatness, grad_norms, delta)`.
    """
    xp, ops, oracle = curv.xp, curv.ops, curv.oracle
    _, g = oracle.value_and_grad(curv.leaves)
    norms = [ops.norm(g)]
    best_norm, best_delta = norms[0], ops.scale(0.0, g)
    delta = None
    for _ in range(steps):
        point = curv.leaves if delta is None else ops.add(curv.leaves, delta)
        u = curv.matvec(g, at=point)
        delta = ops.scale(rho / xp.maximum(ops.norm(u), curv.tiny()), u)
        _, g = oracle.value_and_grad_along(curv.leaves, 1.0, delta)
        norm = ops.norm(g)
        norms.append(norm)
        better = norm > best_norm
        best_delta = [xp.where(better, d, b) for d, b in zip(delta, best_delta)]
        best_norm = xp.maximum(best_norm, norm)
    return rho * best_norm, xp.stack(norms), best_delta
