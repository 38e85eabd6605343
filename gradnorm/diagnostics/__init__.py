r"""Flatness diagnostics: the Hessian's top eigenvalues, its trace and spectral density, the gradient
norm, SAM's sharpness and GAM's first-order flatness, on any Array API library.

Written once over the gradient oracle, like the rules: you supply `grad_fn(params) -> (loss,
grads)` and, for exact curvature, `hvp_fn(params, v) -> H v`; without `hvp_fn` every Hessian-vector
product is a central finite difference of `grad_fn` (see `Curvature` for its accuracy). The
framework adapters supply both from their autodiff: `gradnorm.torch.diagnostics`,
`gradnorm.jax.diagnostics`, `gradnorm.tf.diagnostics`.

=====================================  =============================================================
`hessian_eigenvalues`                  k extreme eigenpairs by Lanczos with full reorthogonalization
`hessian_trace`                        Hutchinson (Rademacher probes) or Hutch++, with a standard error
`spectral_density`                     stochastic Lanczos quadrature (PyHessian's density plot)
`gradient_norm`                        $\lVert\nabla L(\theta)\rVert$
`sam_sharpness`                        $L(\theta + \rho g/\lVert g\rVert) - L(\theta)$
`first_order_flatness`                 GAM's $\rho\max_{\lVert\delta\rVert\le\rho}\lVert\nabla L(\theta+\delta)\rVert$
`measure`                              several of them at once, sharing the gradient at $\theta$
=====================================  =============================================================

Why Lanczos rather than power iteration (PyHessian's method): for the top eigenvalue both spend one
HVP per step, but Lanczos extracts the best approximation from the whole Krylov space instead of
the last vector, so it converges in far fewer steps (error decaying like the Chebyshev polynomial
of the gap rather than $(\lambda_2/\lambda_1)^t$), gives k eigenpairs from one run without
deflation, and reports a residual for each without extra HVPs. Full reorthogonalization keeps it
stable in floating point at the price of `iters` parameter-sized vectors of memory.

Everything is deterministic given `seed`: the start vector and the probes come from
`NumpyProbes(seed)` (the same numbers on every backend) unless `probes=` supplies another source.
The iterations read nothing back to the host; the small tridiagonal eigenproblem at the end runs in
the parameters' library when it has `linalg.eigh` (else in NumPy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .. import _tree
from .._errors import describe
from .._oracle import FunctionOracle, LeafOracle, TreeOracle
from ._curvature import (
    HVP_METHODS,
    Curvature,
    EigenResult,
    LanczosRun,
    TraceResult,
    check_positive_int,
    hutch_plus_plus,
    hutchinson,
    lanczos,
    slq,
    top_eigenpairs,
)
from ._flatness import FlatnessResult, first_order_flatness_leaves, sam_sharpness_leaves
from ._probes import NumpyProbes, Probes, check_seed

__all__ = [
    "QUANTITIES",
    "Curvature",
    "DensityResult",
    "Diagnostics",
    "EigenResult",
    "FlatnessResult",
    "LanczosRun",
    "NumpyProbes",
    "Probes",
    "TraceResult",
    "first_order_flatness",
    "gradient_norm",
    "hessian_eigenvalues",
    "hessian_trace",
    "measure",
    "sam_sharpness",
    "spectral_density",
]

#: What `measure` can compute, in the order it computes them.
QUANTITIES = ("loss", "grad_norm", "sam_sharpness", "lambda_max", "trace", "first_order_flatness")
TRACE_METHODS = ("hutchinson", "hutch++")
WHICH = ("LA", "LM", "SA")


class DensityResult(NamedTuple):
    r"""The Hessian's spectral density by stochastic Lanczos quadrature.

    Attributes:
        nodes: NumPy array (runs, iters): the Ritz values of each run.
        weights: NumPy array (runs, iters): their Gauss quadrature weights (each row sums to 1).
        size: the number of parameters $P$.
    """

    nodes: Any
    weights: Any
    size: int

    def density(self, grid: Any, sigma: float) -> Any:
        r"""The density on `grid`, each node broadened by a Gaussian of width `sigma`:
        $\phi(t) = \frac1{R}\sum_r\sum_j \tau_{rj}\,\mathcal N(t;\theta_{rj},\sigma^2)$ (integrates to 1)."""
        import numpy as np

        t = np.asarray(grid, dtype=np.float64)[..., None, None]
        kernel = np.exp(-0.5 * ((t - self.nodes) / sigma) ** 2) / (sigma * math.sqrt(2.0 * math.pi))
        return (kernel * self.weights).sum(axis=(-1, -2)) / self.nodes.shape[0]

    @property
    def trace(self) -> float:
        r"""The SLQ trace estimate $P \cdot \frac1R\sum_r\sum_j \tau_{rj}\theta_{rj}$."""
        return float(self.size * (self.nodes * self.weights).sum(axis=1).mean())


class Diagnostics:
    """All diagnostics at one point, over one oracle: what the public functions and the framework
    adapters share.

    Args:
        oracle: a `gradnorm.LeafOracle` for the loss (an adapter's, or a `TreeOracle`).
        leaves: the point, a list of leaves.
        treedef: the parameters' tree structure (results come back as trees).
        ops: leaf arithmetic (default: `ArrayOps` of the leaves).
        hvp: "auto" (exact when the oracle has it), "exact" or "fd".
        fd_step: the finite-difference step of the HVP (see `Curvature`).
        probes: the random source (default `NumpyProbes(seed)`).
        seed: the seed of the default probes.
    """

    def __init__(self, oracle: LeafOracle, leaves: list[Any], treedef: Any, *, ops: Any = None, hvp: str = "auto",
                 fd_step: float | None = None, probes: Probes | None = None, seed: int = 0):
        ops = ops if ops is not None else _tree.ArrayOps(_tree.namespace_of(leaves))
        self.curv = Curvature(oracle, leaves, ops=ops, hvp=hvp, fd_step=fd_step)
        self.treedef = treedef
        self.probes = probes if probes is not None else NumpyProbes(check_seed(seed))
        self._first: tuple[Any, Any] | None = None

    @property
    def size(self) -> int:
        return self.curv.size

    def _unflatten(self, leaves: list[Any]) -> Any:
        return _tree.unflatten(self.treedef, leaves)

    def loss_and_grad(self) -> tuple[Any, list[Any]]:
        """The loss and gradient at the point (computed once, then reused)."""
        if self._first is None:
            self._first = self.curv.oracle.value_and_grad(self.curv.leaves)
        return self._first

    def gradient_norm(self) -> Any:
        return self.curv.ops.norm(self.loss_and_grad()[1])

    def sam_sharpness(self, rho: float = 0.05) -> Any:
        _check_rho(rho)
        loss, grads = self.loss_and_grad()
        return sam_sharpness_leaves(self.curv, rho, loss, grads)

    def eigenvalues(self, k: int = 1, *, iters: int | None = None, which: str = "LA", tol: float = 1e-4) -> EigenResult:
        check_positive_int("k", k)
        if k > self.size:
            raise ValueError(f"`k` must be at most the number of parameters ({self.size}). Received: {k}.")
        if which not in WHICH:
            raise ValueError(f"`which` must be one of {WHICH}. Received: {describe(which)}.")
        if iters is None:
            iters = min(self.size, max(2 * k + 20, 30))
        check_positive_int("iters", iters, k)
        if iters > self.size:
            raise ValueError(f"`iters` must be at most the number of parameters ({self.size}). Received: {iters}.")
        run = lanczos(self.curv, self.probes.normal(self.curv.leaves), iters, self.probes)
        values, vectors, residuals, converged = top_eigenpairs(self.curv, run, k, which, tol)
        return EigenResult(values, [self._unflatten(v) for v in vectors], residuals, converged, iters,
                           self.curv.method)

    def trace(self, samples: int = 100, *, method: str = "hutchinson") -> TraceResult:
        if method not in TRACE_METHODS:
            raise ValueError(f"`method` must be one of {TRACE_METHODS}. Received: {describe(method)}.")
        if method == "hutch++":
            check_positive_int("samples", samples, 3)
            return hutch_plus_plus(self.curv, samples, self.probes)
        check_positive_int("samples", samples)
        return hutchinson(self.curv, samples, self.probes)

    def density(self, runs: int = 1, iters: int | None = None) -> DensityResult:
        check_positive_int("runs", runs)
        iters = min(self.size, 80) if iters is None else iters
        check_positive_int("iters", iters)
        if iters > self.size:
            raise ValueError(f"`iters` must be at most the number of parameters ({self.size}). Received: {iters}.")
        nodes, weights = slq(self.curv, runs, iters, self.probes)
        return DensityResult(nodes, weights, self.size)

    def first_order_flatness(self, rho: float = 0.05, steps: int = 3) -> FlatnessResult:
        _check_rho(rho)
        check_positive_int("steps", steps)
        value, norms, delta = first_order_flatness_leaves(self.curv, rho, steps)
        return FlatnessResult(value, norms, self._unflatten(delta), self.curv.method)

    def measure(self, quantities: Sequence[str] = ("grad_norm", "lambda_max", "trace"), *, rho: float = 0.05,
                iters: int | None = None, samples: int = 100, flatness_steps: int = 3) -> dict[str, Any]:
        """Several measures at once, as 0-d arrays keyed by name (see `QUANTITIES`)."""
        unknown = [q for q in quantities if q not in QUANTITIES]
        if isinstance(quantities, str) or unknown:
            raise ValueError(f"`quantities` must be a sequence of names from {QUANTITIES}. Received: "
                             f"{describe(quantities)}.")
        out: dict[str, Any] = {}
        for name in QUANTITIES:
            if name not in quantities:
                continue
            if name == "loss":
                out[name] = self.loss_and_grad()[0]
            elif name == "grad_norm":
                out[name] = self.gradient_norm()
            elif name == "sam_sharpness":
                out[name] = self.sam_sharpness(rho)
            elif name == "lambda_max":
                out[name] = self.eigenvalues(1, iters=iters).eigenvalues[0]
            elif name == "trace":
                out[name] = self.trace(samples).trace
            else:
                out[name] = self.first_order_flatness(rho, flatness_steps).flatness
        return out


def check_quantities(quantities: Any, where: str) -> tuple[str, ...]:
    """A training-time monitor's `quantities`: a non-empty sequence of names from `QUANTITIES`,
    returned in the order `measure` computes them."""
    if isinstance(quantities, str) or not isinstance(quantities, Sequence) or not quantities or any(
        q not in QUANTITIES for q in quantities
    ):
        raise ValueError(f"`quantities` of {where} must be a non-empty sequence of names from {QUANTITIES}. "
                         f"Received: {describe(quantities)}.")
    return tuple(q for q in QUANTITIES if q in quantities)


def check_measure_options(where: str, *, hvp: Any, rho: Any, samples: Any, flatness_steps: Any,
                          iters: Any = None) -> None:
    """The options every training-time monitor (torch `Monitor`, the optax `monitor`, the Keras
    callback) takes for `measure`, checked once before training starts."""
    if hvp not in HVP_METHODS:
        raise ValueError(f"`hvp` of {where} must be one of {HVP_METHODS}. Received: {describe(hvp)}.")
    _check_rho(rho)
    check_positive_int("samples", samples)
    check_positive_int("flatness_steps", flatness_steps)
    if iters is not None:
        check_positive_int("iters", iters)


def _check_rho(rho: Any) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"`rho` must be a positive finite number. Received: {describe(rho)}.")


def _diagnostics(params: Any, grad_fn: Callable, hvp_fn: Callable | None, *, hvp: str = "auto",
                 fd_step: float | None = None, seed: int = 0, probes: Probes | None = None) -> Diagnostics:
    from ..rules._base import check_params

    if not callable(grad_fn):
        raise TypeError(f"`grad_fn` must be callable: grad_fn(params) -> (loss, grads). Received: {describe(grad_fn)}.")
    if hvp_fn is not None and not callable(hvp_fn):
        raise TypeError(f"`hvp_fn` must be callable: hvp_fn(params, v) -> H v. Received: {describe(hvp_fn)}.")
    if hvp not in HVP_METHODS:
        raise ValueError(f"`hvp` must be one of {HVP_METHODS}. Received: {describe(hvp)}.")
    leaves, treedef = _tree.flatten(params)
    xp = check_params(leaves)
    ops = _tree.ArrayOps(xp)
    oracle = TreeOracle(FunctionOracle(grad_fn, hvp_fn), treedef, leaves, xp, ops=ops)
    return Diagnostics(oracle, leaves, treedef, ops=ops, hvp=hvp, fd_step=fd_step, probes=probes, seed=seed)


def hessian_eigenvalues(params: Any, grad_fn: Callable, *, hvp_fn: Callable | None = None, k: int = 1,
                        iters: int | None = None, which: str = "LA", tol: float = 1e-4, seed: int = 0,
                        hvp: str = "auto", fd_step: float | None = None, probes: Probes | None = None) -> EigenResult:
    """The k largest eigenvalues of the Hessian of the loss at `params`, with eigenvectors.

    Lanczos with full reorthogonalization from a random normal start (`seed`), `iters` HVPs
    (default `min(P, max(2k + 20, 30))`). `which`: "LA" largest algebraic (the default: the top
    eigenvalue, as PyHessian reports it), "LM" largest magnitude (hessian-eigenthings' default),
    "SA" smallest algebraic. A pair counts as converged when its Ritz residual is at most
    `tol * |eigenvalue|`; the eigenvalue's own error is then about residual² / gap.

    Returns:
        `EigenResult(eigenvalues, eigenvectors, residuals, converged, iterations, method)`.
    """
    d = _diagnostics(params, grad_fn, hvp_fn, hvp=hvp, fd_step=fd_step, seed=seed, probes=probes)
    return d.eigenvalues(k, iters=iters, which=which, tol=tol)


def hessian_trace(params: Any, grad_fn: Callable, *, hvp_fn: Callable | None = None, samples: int = 100,
                  method: str = "hutchinson", seed: int = 0, hvp: str = "auto", fd_step: float | None = None,
                  probes: Probes | None = None) -> TraceResult:
    """A stochastic estimate of the Hessian trace with its standard error.

    `method="hutchinson"`: `samples` Rademacher probes, one HVP each. `method="hutch++"`: a
    budget of `samples` HVPs split in thirds (sketch, exact part, residual probes); lower
    variance when a few eigenvalues dominate.

    Returns:
        `TraceResult(trace, stderr, samples, matvecs, method)`.
    """
    d = _diagnostics(params, grad_fn, hvp_fn, hvp=hvp, fd_step=fd_step, seed=seed, probes=probes)
    return d.trace(samples, method=method)


def spectral_density(params: Any, grad_fn: Callable, *, hvp_fn: Callable | None = None, runs: int = 1,
                     iters: int | None = None, seed: int = 0, hvp: str = "auto", fd_step: float | None = None,
                     probes: Probes | None = None) -> DensityResult:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature: `runs` Lanczos runs of
    `iters` steps (default `min(P, 80)`) from Rademacher starts. Evaluate it with
    `result.density(grid, sigma)`."""
    d = _diagnostics(params, grad_fn, hvp_fn, hvp=hvp, fd_step=fd_step, seed=seed, probes=probes)
    return d.density(runs, iters)


def gradient_norm(params: Any, grad_fn: Callable) -> Any:
    """The global L2 norm of the gradient at `params` (a 0-d array): one gradient evaluation."""
    return _diagnostics(params, grad_fn, None).gradient_norm()


def sam_sharpness(params: Any, grad_fn: Callable, *, rho: float = 0.05) -> Any:
    """SAM's sharpness `L(θ + ρ g/‖g‖) − L(θ)` at `params` (a 0-d array): two gradient evaluations."""
    return _diagnostics(params, grad_fn, None).sam_sharpness(rho)


def first_order_flatness(params: Any, grad_fn: Callable, *, hvp_fn: Callable | None = None, rho: float = 0.05,
                         steps: int = 3, hvp: str = "auto", fd_step: float | None = None) -> FlatnessResult:
    """GAM's first-order flatness `ρ · max_{‖δ‖≤ρ} ‖∇L(θ+δ)‖`, from below, by `steps` normalized
    ascent steps on the gradient norm (see `FlatnessResult`); `steps` HVPs and `steps + 1` gradients."""
    d = _diagnostics(params, grad_fn, hvp_fn, hvp=hvp, fd_step=fd_step)
    return d.first_order_flatness(rho, steps)


def measure(params: Any, grad_fn: Callable, *, hvp_fn: Callable | None = None,
            quantities: Sequence[str] = ("grad_norm", "lambda_max", "trace"), rho: float = 0.05,
            iters: int | None = None, samples: int = 100, flatness_steps: int = 3, seed: int = 0,
            hvp: str = "auto", fd_step: float | None = None) -> dict[str, Any]:
    """Several diagnostics at once (names from `QUANTITIES`), sharing the gradient at `params`.
    Returns a dict of 0-d arrays."""
    d = _diagnostics(params, grad_fn, hvp_fn, hvp=hvp, fd_step=fd_step, seed=seed)
    return d.measure(quantities, rho=rho, iters=iters, samples=samples, flatness_steps=flatness_steps)
