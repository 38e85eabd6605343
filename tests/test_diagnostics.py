"""gradnorm.diagnostics (the backend-neutral core) against closed forms and dense linear algebra.

References, each derived independently of the code under test:
* quadratics L = ½ xᵀAx − bᵀx with a spectrum chosen by hand (A = Q diag(λ) Qᵀ, Q random
  orthogonal): eigenvalues, trace, SAM sharpness ρ‖g‖ + ½ρ² ĝᵀAĝ and GAM's first-order flatness
  (the maximum of ‖g + Aδ‖ over the ball, solved by its secular equation);
* logistic regression, whose Hessian Xᵀ diag(σ(1−σ)) X / n is written out densely and handed to
  `numpy.linalg.eigh` (a non-quadratic loss: the finite-difference HVP has a real error there);
* the same computation on NumPy, PyTorch, JAX and array-api-strict arrays with the same seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradnorm
from gradnorm import diagnostics as D

P = 40


def _split(x):
    return {"w": x[:30].reshape(5, 6), "b": x[30:]}


def _join(p):
    return np.concatenate([np.reshape(p["w"], (-1,)), p["b"]])


def _quadratic(spectrum, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(P, P)))
    a = (q * np.asarray(spectrum, dtype=float)) @ q.T
    b = rng.normal(size=P)
    calls = {"grad": 0, "hvp": 0}

    def grad_fn(p):
        calls["grad"] += 1
        x = _join(p)
        return 0.5 * x @ a @ x - b @ x, _split(a @ x - b)

    def hvp_fn(p, v):
        calls["hvp"] += 1
        return _split(a @ _join(v))

    params = _split(rng.normal(size=P))
    return params, grad_fn, hvp_fn, a, b, calls


SPECTRUM = np.concatenate([np.linspace(-3.0, 8.0, P - 3), [12.0, 20.0, 30.0]])


@pytest.mark.parametrize("hvp", ["exact", "fd"])
def test_top_eigenvalues_of_a_quadratic(hvp):
    params, grad_fn, hvp_fn, a, _, calls = _quadratic(SPECTRUM)
    res = D.hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn if hvp == "exact" else None, k=3)
    np.testing.assert_allclose(res.eigenvalues, [30.0, 20.0, 12.0], rtol=1e-9 if hvp == "exact" else 1e-7)
    assert res.method == hvp and res.iterations == 30 and bool(np.all(res.converged))
    # eigenvectors: unit, and A y = λ y
    for value, vec in zip(res.eigenvalues, res.eigenvectors):
        y = _join(vec)
        assert abs(np.linalg.norm(y) - 1.0) < 1e-10
        assert np.linalg.norm(a @ y - value * y) < 1e-6
    # cost: one HVP per Lanczos step (exact), two gradients per step (fd)
    if hvp == "exact":
        assert calls == {"grad": 0, "hvp": 30}
    else:
        assert calls == {"grad": 60, "hvp": 0}


def test_which_selects_magnitude_and_smallest():
    spectrum = np.concatenate([np.linspace(-1.0, 1.0, P - 2), [-50.0, 10.0]])
    params, grad_fn, hvp_fn, *_ = _quadratic(spectrum)
    la = D.hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn, k=1, iters=P)
    lm = D.hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn, k=1, iters=P, which="LM")
    sa = D.hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn, k=2, iters=P, which="SA")
    np.testing.assert_allclose(la.eigenvalues, [10.0], rtol=1e-10)
    np.testing.assert_allclose(lm.eigenvalues, [-50.0], rtol=1e-10)
    np.testing.assert_allclose(sa.eigenvalues, [-50.0, -1.0], rtol=1e-10)


def test_invariant_subspace_restarts_instead_of_inventing_eigenvalues():
    # two distinct eigenvalues: the Krylov space of any start vector has dimension 2, so plain
    # Lanczos breaks down at step 3; the restart keeps finding true eigenvalues
    spectrum = np.r_[np.full(P - 5, 1.0), np.full(5, 4.0)]
    params, grad_fn, hvp_fn, *_ = _quadratic(spectrum)
    res = D.hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn, k=6, iters=12)
    np.testing.assert_allclose(res.eigenvalues, [4.0] * 5 + [1.0], rtol=1e-10)
    assert bool(np.all(np.isfinite(res.residuals)))


def test_residual_flags_unconverged_pairs():
    # many close eigenvalues and few steps: the 3rd pair has not converged, and says so
    spectrum = np.linspace(0.0, 1.0, P)
    params, grad_fn, hvp_fn, a, *_ = _quadratic(spectrum)
    res = D.hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn, k=3, iters=6, tol=1e-8)
    assert not bool(np.all(res.converged))
    for value, vec, r in zip(res.eigenvalues, res.eigenvectors, res.residuals):
        y = _join(vec)
        np.testing.assert_allclose(np.linalg.norm(a @ y - value * y), r, rtol=1e-6, atol=1e-12)


def _logistic(seed=0, n=200, d=P):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.where(rng.random(n) < 0.5, -1.0, 1.0)

    def parts(w):
        m = y * (x @ w)
        s = 1.0 / (1.0 + np.exp(-m))  # sigma(m)
        return m, s

    def grad_fn(p):
        w = _join(p)
        m, s = parts(w)
        loss = np.mean(np.logaddexp(0.0, -m))
        return loss, _split(-(x.T @ (y * (1.0 - s))) / n)

    def hessian(p):
        _, s = parts(_join(p))
        return (x.T * (s * (1.0 - s))) @ x / n

    def hvp_fn(p, v):
        return _split(hessian(p) @ _join(v))

    return _split(0.5 * rng.normal(size=d)), grad_fn, hvp_fn, hessian


@pytest.mark.parametrize("hvp", ["exact", "fd"])
def test_logistic_regression_against_eigh(hvp):
    params, grad_fn, hvp_fn, hessian = _logistic()
    truth = np.linalg.eigvalsh(hessian(params))[::-1]
    res = D.hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn if hvp == "exact" else None, k=3, iters=P)
    # the finite difference of a non-quadratic loss has a truncation error (h = 6e-6: ~1e-10)
    np.testing.assert_allclose(res.eigenvalues, truth[:3], rtol=1e-10 if hvp == "exact" else 1e-7)
    trace = D.hessian_trace(params, grad_fn, hvp_fn=hvp_fn if hvp == "exact" else None, samples=200, seed=3)
    assert abs(float(trace.trace) - truth.sum()) < 4 * float(trace.stderr)
    assert 0 < float(trace.stderr) < 0.2 * truth.sum()


def test_hutchinson_is_exact_on_a_diagonal_hessian():
    # Rademacher probes: zᵀ D z = tr D for every z, so the estimate is exact with zero spread
    spectrum = np.linspace(0.5, 3.0, P)

    def grad_fn(p):
        x = _join(p)
        return 0.5 * np.sum(spectrum * x * x), _split(spectrum * x)

    params = _split(np.ones(P))
    res = D.hessian_trace(params, grad_fn, hvp_fn=lambda p, v: _split(spectrum * _join(v)), samples=5)
    assert res.method == "hutchinson" and res.matvecs == 5
    np.testing.assert_allclose(res.trace, spectrum.sum(), rtol=1e-13)
    assert float(res.stderr) < 1e-12
    assert res.samples.shape == (5,)


def test_hutch_plus_plus_is_exact_on_low_rank_and_beats_hutchinson_on_a_dominated_spectrum():
    low_rank = np.r_[np.zeros(P - 4), [1.0, 3.0, 10.0, 40.0]]
    params, grad_fn, hvp_fn, *_ = _quadratic(low_rank)
    res = D.hessian_trace(params, grad_fn, hvp_fn=hvp_fn, samples=15, method="hutch++")
    np.testing.assert_allclose(res.trace, low_rank.sum(), rtol=1e-10)
    assert res.matvecs == 15 and res.method == "hutch++"

    dominated = np.r_[np.linspace(0.0, 0.1, P - 3), [20.0, 30.0, 50.0]]
    params, grad_fn, hvp_fn, *_ = _quadratic(dominated)
    errors = {"hutchinson": [], "hutch++": []}
    for seed in range(20):
        for method in errors:
            est = D.hessian_trace(params, grad_fn, hvp_fn=hvp_fn, samples=12, method=method, seed=seed)
            errors[method].append(abs(float(est.trace) - dominated.sum()))
    assert np.mean(errors["hutch++"]) < 0.2 * np.mean(errors["hutchinson"])


def test_spectral_density_quadrature():
    spectrum = np.r_[np.linspace(0.0, 1.0, P - 2), [5.0, 9.0]]
    params, grad_fn, hvp_fn, *_ = _quadratic(spectrum)
    res = D.spectral_density(params, grad_fn, hvp_fn=hvp_fn, runs=4, iters=P, seed=1)
    assert res.nodes.shape == res.weights.shape == (4, P)
    np.testing.assert_allclose(res.weights.sum(axis=1), 1.0, rtol=1e-12)
    # a full Lanczos run reproduces the spectrum exactly: every node is an eigenvalue
    assert np.max(np.min(np.abs(res.nodes[:, :, None] - spectrum), axis=-1)) < 1e-8
    grid = np.linspace(-2.0, 11.0, 4001)
    density = res.density(grid, sigma=0.05)
    assert abs(np.trapezoid(density, grid) - 1.0) < 1e-3
    # the SLQ trace is P vᵀHv averaged over Rademacher runs: unbiased, so near the true trace
    assert abs(res.trace - spectrum.sum()) < 0.3 * spectrum.sum()


def test_gradient_norm_and_sam_sharpness_closed_form():
    params, grad_fn, _hvp_fn, a, b, _calls = _quadratic(SPECTRUM)
    x = _join(params)
    g = a @ x - b
    np.testing.assert_allclose(D.gradient_norm(params, grad_fn), np.linalg.norm(g), rtol=1e-14)
    rho = 0.1
    u = g / np.linalg.norm(g)
    expected = rho * np.linalg.norm(g) + 0.5 * rho**2 * u @ a @ u
    np.testing.assert_allclose(D.sam_sharpness(params, grad_fn, rho=rho), expected, rtol=1e-10)


def _ball_maximum(a, g, rho):
    """max ‖g + Aδ‖ over ‖δ‖ ≤ ρ by the secular equation: δ(μ) = (μ − A²)⁻¹ A g with μ > λmax(A²)
    and ‖δ(μ)‖ = ρ (the maximum of a convex quadratic over a ball lies on the sphere)."""
    lam, q = np.linalg.eigh(a)
    c = q.T @ g

    def delta(mu):
        return lam * c / (mu - lam**2)

    lo = np.max(lam**2) * (1 + 1e-15) + 1e-300
    hi = lo + 1.0
    while np.linalg.norm(delta(hi)) > rho:
        hi = lo + 2 * (hi - lo)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.linalg.norm(delta(mid)) > rho else (lo, mid)
    return np.linalg.norm(c + lam * delta(hi))


@pytest.mark.parametrize("hvp", ["exact", "fd"])
def test_first_order_flatness_against_the_secular_equation(hvp):
    params, grad_fn, hvp_fn, a, b, _ = _quadratic(SPECTRUM)
    g = a @ _join(params) - b
    rho = 0.2
    truth = rho * _ball_maximum(a, g, rho)
    res = D.first_order_flatness(params, grad_fn, hvp_fn=hvp_fn if hvp == "exact" else None, rho=rho, steps=5)
    norms = np.asarray(res.grad_norms)
    assert norms.shape == (6,) and abs(norms[0] - np.linalg.norm(g)) < 1e-10
    assert np.all(np.diff(norms) >= -1e-9)  # monotone on a quadratic
    assert float(res.flatness) <= truth * (1 + 1e-12)
    assert float(res.flatness) > truth * (1 - 1e-6)
    assert abs(np.linalg.norm(_join(res.perturbation)) - rho) < 1e-10


def test_measure_shares_the_first_gradient():
    params, grad_fn, hvp_fn, _a, _b, calls = _quadratic(SPECTRUM)
    out = D.measure(params, grad_fn, hvp_fn=hvp_fn, quantities=("loss", "grad_norm", "sam_sharpness", "lambda_max"))
    assert set(out) == {"loss", "grad_norm", "sam_sharpness", "lambda_max"}
    assert calls["grad"] == 2  # θ once (shared) and θ + ρĝ
    np.testing.assert_allclose(out["lambda_max"], 30.0, rtol=1e-9)


def test_deterministic_given_a_seed():
    params, grad_fn, hvp_fn, *_ = _quadratic(SPECTRUM)
    one = D.hessian_trace(params, grad_fn, hvp_fn=hvp_fn, samples=10, seed=7)
    two = D.hessian_trace(params, grad_fn, hvp_fn=hvp_fn, samples=10, seed=7)
    other = D.hessian_trace(params, grad_fn, hvp_fn=hvp_fn, samples=10, seed=8)
    np.testing.assert_array_equal(one.samples, two.samples)
    assert not np.array_equal(one.samples, other.samples)


def _as(backend, array):
    if backend == "numpy":
        return np.asarray(array)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        return torch.asarray(array, dtype=torch.float64)
    if backend == "jax":
        jnp = pytest.importorskip("jax.numpy")
        return jnp.asarray(array)
    strict = pytest.importorskip("array_api_strict")
    return strict.asarray(array, dtype=strict.float64)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax", "array_api_strict"])
def test_same_results_on_every_array_library(backend):
    if backend == "jax":
        jax = pytest.importorskip("jax")
        context = jax.enable_x64(True)
    else:
        import contextlib

        context = contextlib.nullcontext()
    a = np.diag(np.linspace(-1.0, 5.0, 12)) + 0.1
    with context:
        from gradnorm._tree import namespace_of

        mat = _as(backend, a)
        b = _as(backend, np.arange(12.0) / 12)
        params = {"x": _as(backend, np.linspace(0.2, 1.0, 12))}
        xp = namespace_of([mat])

        def grad_fn(p):
            x = p["x"]
            ax = xp.matmul(mat, x)
            return 0.5 * xp.vecdot(x, ax) - xp.vecdot(b, x), {"x": ax - b}

        def hvp_fn(p, v):
            return {"x": xp.matmul(mat, v["x"])}

        eig = D.hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn, k=2, iters=12)
        tr = D.hessian_trace(params, grad_fn, hvp_fn=hvp_fn, samples=6, seed=4)
        flat = D.first_order_flatness(params, grad_fn, hvp_fn=hvp_fn, rho=0.1)
        got = [float(eig.eigenvalues[0]), float(eig.eigenvalues[1]), float(tr.trace), float(flat.flatness)]
    # the same probes (NumpyProbes(seed)) on every library: the same numbers, to rounding
    ref_eig = np.linalg.eigvalsh(a)[::-1][:2]
    np.testing.assert_allclose(got[:2], ref_eig, rtol=1e-10)
    rng_result = D.hessian_trace({"x": np.linspace(0.2, 1.0, 12)}, lambda p: (0.0, {"x": a @ p["x"]}),
                                 hvp_fn=lambda p, v: {"x": a @ v["x"]}, samples=6, seed=4)
    np.testing.assert_allclose(got[2], float(rng_result.trace), rtol=1e-12)
    assert type(eig.eigenvalues).__module__.split(".")[0] in {"numpy", "torch", "jax", "jaxlib", "array_api_strict"}


def test_float32_parameters_stay_float32():
    params, grad_fn, _hvp_fn, *_ = _quadratic(SPECTRUM)
    p32 = {k: v.astype(np.float32) for k, v in params.items()}

    def grad32(p):
        loss, g = grad_fn({k: v.astype(np.float64) for k, v in p.items()})
        return np.float32(loss), {k: v.astype(np.float32) for k, v in g.items()}

    res = D.hessian_eigenvalues(p32, grad32, k=1)
    assert res.eigenvalues.dtype == np.float32
    assert res.eigenvectors[0]["w"].dtype == np.float32
    np.testing.assert_allclose(res.eigenvalues, [30.0], rtol=1e-3)  # fd in float32: h = 5e-3


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p, f, h: D.hessian_eigenvalues(p, f, hvp_fn=h, k=0), "`k` must be an int >= 1"),
        (lambda p, f, h: D.hessian_eigenvalues(p, f, hvp_fn=h, k=P + 1), "`k` must be at most the number"),
        (lambda p, f, h: D.hessian_eigenvalues(p, f, hvp_fn=h, k=3, iters=2), "`iters` must be an int >= 3"),
        (lambda p, f, h: D.hessian_eigenvalues(p, f, hvp_fn=h, which="BE"), "`which` must be one of"),
        (lambda p, f, h: D.hessian_eigenvalues(p, f, hvp_fn=h, seed=-1), "`seed` must be a non-negative int"),
        (lambda p, f, h: D.hessian_eigenvalues(p, f, hvp="exact"), "needs an exact Hessian-vector product"),
        (lambda p, f, h: D.hessian_eigenvalues(p, f, hvp="sometimes"), "`hvp` must be one of"),
        (lambda p, f, h: D.hessian_eigenvalues(p, f, fd_step=0.0), "`fd_step` must be a positive"),
        (lambda p, f, h: D.hessian_trace(p, f, hvp_fn=h, method="exact"), "`method` must be one of"),
        (lambda p, f, h: D.hessian_trace(p, f, hvp_fn=h, samples=2, method="hutch++"), "`samples` must be an int >= 3"),
        (lambda p, f, h: D.sam_sharpness(p, f, rho=-1.0), "`rho` must be a positive"),
        (lambda p, f, h: D.first_order_flatness(p, f, hvp_fn=h, steps=0), "`steps` must be an int >= 1"),
        (lambda p, f, h: D.measure(p, f, quantities=("lambda_max", "sharpness")), "`quantities` must be a sequence"),
        (lambda p, f, h: D.measure(p, f, quantities="trace"), "`quantities` must be a sequence"),
        (lambda p, f, h: D.hessian_trace(p, "loss"), "`grad_fn` must be callable"),
        (lambda p, f, h: D.hessian_trace(p, f, hvp_fn=3), "`hvp_fn` must be callable"),
    ],
)
def test_bad_arguments_name_the_argument(call, match):
    params, grad_fn, hvp_fn, *_ = _quadratic(SPECTRUM)
    with pytest.raises((ValueError, TypeError), match=match):
        call(params, grad_fn, hvp_fn)


def test_bad_params_and_bad_answers():
    with pytest.raises(gradnorm.ParamsError):
        D.gradient_norm({"w": [1.0, 2.0]}, lambda p: (0.0, p))
    params, grad_fn, _hvp_fn, *_ = _quadratic(SPECTRUM)
    with pytest.raises(gradnorm.OracleOutputError, match="grad_fn"):
        D.gradient_norm(params, lambda p: (0.0, {"w": p["w"]}))
    with pytest.raises(gradnorm.OracleOutputError, match="hvp_fn"):
        D.hessian_eigenvalues(params, grad_fn, hvp_fn=lambda p, v: {"w": v["w"][:1], "b": v["b"]})


def test_eigenvector_error_bound_is_honest_in_float64():
    # the eigenvalue error is bounded by residual² / gap (Kato-Temple); check on a hard case
    spectrum = np.r_[np.linspace(0.0, 9.0, P - 1), [10.0]]
    params, grad_fn, hvp_fn, *_ = _quadratic(spectrum)
    res = D.hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn, k=1, iters=10, tol=1e-12)
    err = abs(float(res.eigenvalues[0]) - 10.0)
    bound = float(res.residuals[0]) ** 2 / (10.0 - 9.0 - float(res.residuals[0]))
    assert err <= bound * (1 + 1e-6) + 1e-13
    assert math.isfinite(err)
