"""The Hessian as an operator over leaf lists, and the Krylov and stochastic algorithms on it.

Written once against the Array API (through `gradnorm.ArrayOps`) over a `gradnorm.LeafOracle`, as
the rules are: the same code measures a NumPy, PyTorch, JAX or TensorFlow model. The iterations
keep every scalar (Lanczos coefficients, Rayleigh quotients) as a 0-d array of the parameters'
library and branch on none of them, so nothing is read back to the host until the end, and a JAX
caller can jit the whole computation.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import array_api_compat

from .._errors import MissingHVPError, describe
from .._oracle import LeafOracle
from .._tree import ArrayOps

__all__ = ["Curvature", "LanczosRun", "hutch_plus_plus", "hutchinson", "lanczos", "slq", "top_eigenpairs"]

HVP_METHODS = ("auto", "exact", "fd")


def _eps(xp: Any, dtype: Any) -> float:
    return 2.220446049250313e-16 if dtype == xp.float64 else 1.1920929e-07


class Curvature:
    r"""The Hessian of the loss at `leaves`, applied to vectors (lists of leaves like `leaves`).

    With an exact HVP (`oracle.has_hvp`), `matvec` asks the oracle. Without one (or with
    `hvp="fd"`) it uses the central difference of the gradient along the unit vector
    $u = v/\lVert v\rVert$:

    $$Hv \approx \lVert v\rVert\,\frac{\nabla L(\theta + h u) - \nabla L(\theta - h u)}{2h},$$

    two gradient evaluations, with error $\tfrac{h^2}{6}\lVert v\rVert\,\nabla^3 L[u,u,\cdot]$
    (truncation) plus about $\epsilon_\text{mach}\lVert\nabla L\rVert\lVert v\rVert / h$
    (rounding); the default $h = \epsilon_\text{mach}^{1/3}$ (6e-6 in float64, 5e-3 in float32)
    balances the two, giving about 1e-10 relative accuracy in float64 and 1e-4 in float32 on
    smooth losses. It is exact on quadratics up to rounding.

    Args:
        oracle: a `gradnorm.LeafOracle` for the loss.
        leaves: the point (a list of leaves).
        ops: leaf arithmetic (`ArrayOps` of the leaves' namespace by default).
        hvp: "auto" (exact when the oracle has an HVP, else finite differences), "exact" or "fd".
        fd_step: the finite-difference step $h$ (default: $\epsilon_\text{mach}^{1/3}$ of the
            accumulation dtype).
    """

    def __init__(self, oracle: LeafOracle, leaves: list[Any], *, ops: ArrayOps, hvp: str = "auto",
                 fd_step: float | None = None):
        if hvp not in HVP_METHODS:
            raise ValueError(f"`hvp` must be one of {HVP_METHODS}. Received: {describe(hvp)}.")
        if hvp == "exact" and not oracle.has_hvp:
            raise MissingHVPError(
                "`hvp='exact'` needs an exact Hessian-vector product: pass `hvp_fn` (or use hvp='fd' for a "
                "central finite difference of the gradient)."
            )
        if fd_step is not None and not (isinstance(fd_step, (int, float)) and not isinstance(fd_step, bool)
                                        and math.isfinite(fd_step) and fd_step > 0):
            raise ValueError(f"`fd_step` must be a positive finite number. Received: {describe(fd_step)}.")
        self.oracle = oracle
        self.leaves = leaves
        self.ops = ops
        self.xp = ops.xp
        self.exact = oracle.has_hvp and hvp != "fd"
        self.dtype = ops.acc_dtype(leaves)
        self.fd_step = fd_step if fd_step is not None else _eps(self.xp, self.dtype) ** (1.0 / 3.0)
        self.size = sum(math.prod(tuple(leaf.shape)) for leaf in leaves)

    @property
    def method(self) -> str:
        return "exact" if self.exact else "fd"

    def matvec(self, v: list[Any], at: list[Any] | None = None) -> list[Any]:
        """$H(\\theta) v$ at `at` (default: the point `leaves`)."""
        point = self.leaves if at is None else at
        if self.exact:
            return self.oracle.hvp(point, v)
        ops, h = self.ops, self.fd_step
        norm = ops.norm(v)
        # a zero v gives a zero difference (and step 0 instead of h/0)
        step = h / self.xp.maximum(norm, self.tiny())
        _, g_plus = self.oracle.value_and_grad_along(point, step, v)
        _, g_minus = self.oracle.value_and_grad_along(point, -step, v)
        return ops.scale(norm / (2.0 * h), ops.sub(g_plus, g_minus))

    def tiny(self) -> Any:
        return self.xp.asarray(1e-300 if self.dtype == self.xp.float64 else 1e-30, dtype=self.dtype)


# ------------------------------------------------------------------------------------------
# small dense algebra (the k x k tridiagonal): in the parameters' library when it has the linalg
# extension (NumPy, PyTorch, JAX, CuPy, array-api-strict), else in NumPy after the iterations


def _has_dense(xp: Any) -> bool:
    return all(hasattr(xp, name) for name in ("eye", "stack", "argsort", "take")) and hasattr(
        getattr(xp, "linalg", None), "eigh"
    )


def _stack(xp: Any, values: list[Any]) -> Any:
    return xp.stack(values) if values else None


def _tridiagonal_eigh(xp: Any, alphas: list[Any], betas: list[Any]) -> tuple[Any, Any, Any]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix with diagonal
    `alphas` and off-diagonal `betas` (len m - 1). Returns `(values, vectors, dense_xp)`."""
    m = len(alphas)
    if _has_dense(xp):
        dxp = xp
        a = xp.stack(alphas)
        device = array_api_compat.device(a)
        t = a[:, None] * xp.eye(m, dtype=a.dtype, device=device)
        if m > 1:
            b = xp.concat([xp.stack(betas), xp.zeros((1,), dtype=a.dtype, device=device)])
            upper = b[:, None] * xp.eye(m, k=1, dtype=a.dtype, device=device)
            t = t + upper + xp.matrix_transpose(upper)
    else:
        import numpy as dxp

        a = dxp.asarray([float(x) for x in alphas])
        t = dxp.diag(a)
        if m > 1:
            b = dxp.asarray([float(x) for x in betas])
            t = t + dxp.diag(b, 1) + dxp.diag(b, -1)
    values, vectors = dxp.linalg.eigh(t)
    return values, vectors, dxp


# ------------------------------------------------------------------------------------------
# Lanczos


class LanczosRun(NamedTuple):
    """One Lanczos run: the tridiagonal coefficients and the orthonormal basis."""

    alphas: list[Any]  # m 0-d arrays: the diagonal
    betas: list[Any]  # m 0-d arrays: betas[j] couples q_j and q_{j+1}; betas[-1] is the residual norm
    basis: list[list[Any]]  # m vectors (lists of leaves)


def _orthogonalize(ops: ArrayOps, w: list[Any], basis: list[list[Any]], passes: int = 2) -> list[Any]:
    """Remove from `w` its components along the orthonormal `basis`: modified Gram-Schmidt (each
    coefficient taken against the partly orthogonalized `w`), twice by default ('twice is enough':
    Giraud, Langou, Rozloznik 2005)."""
    for _ in range(passes):
        for q in basis:
            w = ops.axpy(-ops.vdot(q, w), q, w)
    return w


def _normalize_or_zero(curv: Curvature, w: list[Any], threshold: Any) -> tuple[list[Any], Any]:
    """`w / ||w||` and `||w||`, or a zero vector where `||w|| <= threshold`, without a branch."""
    xp, ops = curv.xp, curv.ops
    norm = ops.norm(w)
    keep = norm > threshold
    factor = xp.where(keep, 1.0 / xp.maximum(norm, curv.tiny()), xp.zeros_like(norm))
    return ops.scale(factor, w), norm


def lanczos(curv: Curvature, start: list[Any], iters: int, probes: Any) -> LanczosRun:
    r"""`iters` steps of the symmetric Lanczos process from `start`, with full reorthogonalization.

    Each step costs one HVP. Every new vector is orthogonalized against the whole basis (twice),
    so the Ritz values do not duplicate ("ghost" eigenvalues of plain Lanczos in floating point)
    and the basis stays orthonormal to rounding; memory is `iters` parameter-sized vectors.

    If the Krylov space is exhausted (an invariant subspace: $\beta_j \approx 0$, for example a
    Hessian with fewer distinct eigenvalues than `iters`), the process continues from a fresh
    random vector orthogonal to the basis and records $\beta_j = 0$, so the tridiagonal matrix is
    block diagonal and every Ritz value is still an eigenvalue estimate. The switch is made with
    `where`, not a host-side branch.
    """
    xp, ops = curv.xp, curv.ops
    eps = _eps(xp, curv.dtype)
    q, _ = _normalize_or_zero(curv, start, curv.tiny())
    basis: list[list[Any]] = [q]
    alphas: list[Any] = []
    betas: list[Any] = []
    scale = xp.zeros((), dtype=curv.dtype)
    for j in range(iters):
        w = curv.matvec(q)
        alpha = ops.vdot(q, w)
        w = _orthogonalize(ops, w, basis)
        scale = xp.maximum(scale, xp.abs(alpha))
        alphas.append(alpha)
        threshold = math.sqrt(eps) * scale
        q_next, beta = _normalize_or_zero(curv, w, threshold)
        if j == iters - 1:
            betas.append(beta)  # the residual norm, for the Ritz residuals
            break
        broke = beta <= threshold
        # the restart vector, used only after a breakdown: one Gram-Schmidt pass suffices for a
        # random vector (the next step reorthogonalizes twice anyway), halving its cost
        fresh, _ = _normalize_or_zero(curv, _orthogonalize(ops, probes.normal(curv.leaves), basis, 1), curv.tiny())
        q = [xp.where(broke, f, n) for f, n in zip(fresh, q_next)]
        beta = xp.where(broke, xp.zeros_like(beta), beta)
        scale = xp.maximum(scale, beta)
        betas.append(beta)
        basis.append(q)
    return LanczosRun(alphas, betas, basis)


class EigenResult(NamedTuple):
    r"""The k extreme eigenpairs of the Hessian.

    Attributes:
        eigenvalues: 1-d array of length k, in the order asked for (`which="LA"`: descending).
        eigenvectors: k unit vectors, each a tree like the parameters.
        residuals: 1-d array: the Ritz residual norms $\lVert H y_i - \theta_i y_i\rVert$
            ($= |\beta_m s_{m,i}|$, without further HVPs).
        converged: 1-d boolean array: `residuals <= tol * max(|eigenvalues|, tiny)`.
        iterations: the Lanczos steps taken (HVPs spent).
        method: "exact" or "fd", how the HVPs were computed.
    """

    eigenvalues: Any
    eigenvectors: list[Any]
    residuals: Any
    converged: Any
    iterations: int
    method: str


def top_eigenpairs(curv: Curvature, run: LanczosRun, k: int, which: str, tol: float) -> tuple[Any, list, Any, Any]:
    """The k Ritz pairs of a Lanczos run selected by `which` ("LA": largest algebraic, "LM":
    largest magnitude, "SA": smallest algebraic). Returns (values, vectors as leaf lists,
    residuals, converged), in the namespace of the parameters."""
    xp, ops = curv.xp, curv.ops
    values, vectors, dxp = _tridiagonal_eigh(xp, run.alphas, run.betas[:-1])
    key = {"LA": values, "SA": -values, "LM": dxp.abs(values)}[which]
    order = dxp.argsort(key, descending=True, stable=True) if dxp is xp else dxp.argsort(-key, kind="stable")
    order = order[:k]
    if dxp is xp:
        chosen, s = xp.take(values, order), xp.take(vectors, order, axis=1)
    else:  # back from NumPy to the parameters' library
        chosen = xp.asarray(values[order], dtype=curv.dtype)
        s = xp.asarray(vectors[:, order], dtype=curv.dtype)
    m = len(run.basis)
    ritz = []
    for i in range(k):
        y = ops.scale(s[0, i], run.basis[0])
        for j in range(1, m):
            y = ops.axpy(s[j, i], run.basis[j], y)
        ritz.append(y)
    residuals = xp.abs(run.betas[-1] * s[m - 1, :])
    converged = residuals <= tol * xp.maximum(xp.abs(chosen), curv.tiny())
    return chosen, ritz, residuals, converged


# ------------------------------------------------------------------------------------------
# trace


class TraceResult(NamedTuple):
    r"""A stochastic estimate of the Hessian trace.

    Attributes:
        trace: the estimate (0-d array).
        stderr: its standard error: the sample standard deviation of the per-probe terms over
            the square root of their number (NaN with fewer than two stochastic terms).
        samples: 1-d array of the per-probe terms $z_i^\top H z_i$ (Hutch++: of the residual part).
        matvecs: HVPs spent.
        method: "hutchinson" or "hutch++".
    """

    trace: Any
    stderr: Any
    samples: Any
    matvecs: int
    method: str


def _mean_and_stderr(xp: Any, terms: list[Any]) -> tuple[Any, Any]:
    n = len(terms)
    mean = sum(terms[1:], terms[0]) / n
    if n < 2:
        return mean, xp.asarray(float("nan"), dtype=mean.dtype)
    var = sum(((t - mean) ** 2 for t in terms[1:]), (terms[0] - mean) ** 2) / (n - 1)
    return mean, xp.sqrt(var / n)


def hutchinson(curv: Curvature, samples: int, probes: Any) -> TraceResult:
    r"""Hutchinson's estimator $\operatorname{tr} H \approx \frac1m\sum_i z_i^\top H z_i$ with
    Rademacher $z_i$ (Hutchinson 1989; the variance-minimizing choice among i.i.d. probes, as in
    PyHessian). Unbiased; the standard error comes from the spread of the terms."""
    terms = []
    for _ in range(samples):
        z = probes.rademacher(curv.leaves)
        terms.append(curv.ops.vdot(z, curv.matvec(z)))
    mean, stderr = _mean_and_stderr(curv.xp, terms)
    return TraceResult(mean, stderr, curv.xp.stack(terms), samples, "hutchinson")


def hutch_plus_plus(curv: Curvature, matvecs: int, probes: Any) -> TraceResult:
    r"""Hutch++ (Meyer, Musco, Musco, Woodruff, SOSA 2021, arXiv:2010.09649): a third of the
    budget sketches the top of the spectrum, $Q = \operatorname{orth}(HS)$, whose trace
    $\operatorname{tr}(Q^\top H Q)$ is taken exactly (another third), and Hutchinson with the rest
    estimates the trace of the deflated remainder $(I - QQ^\top) H (I - QQ^\top)$. Needs
    $O(1/\varepsilon)$ HVPs for relative accuracy $\varepsilon$ on PSD Hessians against
    Hutchinson's $O(1/\varepsilon^2)$; it helps when a few eigenvalues dominate the trace."""
    ops, xp = curv.ops, curv.xp
    n_sketch = matvecs // 3
    n_probe = matvecs - 2 * n_sketch
    basis: list[list[Any]] = []
    sketches = [curv.matvec(probes.rademacher(curv.leaves)) for _ in range(n_sketch)]
    for w in sketches:
        reference = ops.norm(w)
        q, _ = _normalize_or_zero(curv, _orthogonalize(ops, w, basis), math.sqrt(_eps(xp, curv.dtype)) * reference)
        basis.append(q)
    exact_part = xp.zeros((), dtype=curv.dtype)
    for q in basis:
        exact_part = exact_part + ops.vdot(q, curv.matvec(q))
    terms = []
    for _ in range(n_probe):
        g = _orthogonalize(ops, probes.rademacher(curv.leaves), basis)
        terms.append(ops.vdot(g, curv.matvec(g)))
    mean, stderr = _mean_and_stderr(xp, terms)
    return TraceResult(exact_part + mean, stderr, xp.stack(terms), matvecs, "hutch++")


# ------------------------------------------------------------------------------------------
# spectral density


def slq(curv: Curvature, runs: int, iters: int, probes: Any) -> tuple[Any, Any]:
    r"""Stochastic Lanczos quadrature (Golub & Meurant; Ghorbani, Krishnan, Xiao, ICML 2019,
    arXiv:1901.10159; PyHessian's density): for each of `runs` Rademacher starts $v$ (normalized),
    `iters` Lanczos steps give the Gauss quadrature of the spectral measure seen from $v$:
    nodes $\theta_j$ (the Ritz values) and weights $\tau_j = s_{1j}^2$. Returns `(nodes, weights)`,
    arrays of shape (runs, iters) in NumPy."""
    import numpy as np

    nodes, weights = [], []
    for _ in range(runs):
        run = lanczos(curv, probes.rademacher(curv.leaves), iters, probes)
        values, vectors, _ = _tridiagonal_eigh(curv.xp, run.alphas, run.betas[:-1])
        nodes.append(np.asarray(_to_numpy(values), dtype=np.float64))
        weights.append(np.asarray(_to_numpy(vectors), dtype=np.float64)[0, :] ** 2)
    return np.stack(nodes), np.stack(weights)


def _to_numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        return x.numpy()
    return np.asarray(x)


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {describe(value)}.")
    return value
