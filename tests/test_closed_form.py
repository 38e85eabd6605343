"""Independent reference tests for every rule (ALGORITHMS.md part A).

Nothing here calls gradnorm to obtain an expected value. Two problems:

* a quadratic L(x) = 0.5 x^T A x - c^T x (A SPD, eigenvalues 1..100) where grad(x) = A x - c and
  H = A, so every rule has a closed form written directly in terms of A (e.g. SAM
  d = g + rho A g/(||g||+eps), any finite-difference GR d = g + gamma A g);
* logistic regression (mean BCE, analytic gradient and HVP) where the expected direction is
  obtained by evaluating our own gradient at the points the math prescribes (tests/_reference.py).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import gradnorm
try:
    from tests._reference import NORM_EPS, U, Logistic, Quadratic, TreeOracle, layouts_for, norm, reference
except ImportError:  # tests/ itself on sys.path (rootdir-less invocation)
    from _reference import NORM_EPS, U, Logistic, Quadratic, TreeOracle, layouts_for, norm, reference

QUAD = Quadratic(dim=5, seed=0)
LOGI = Logistic(n=40, features=3, seed=1)

# --------------------------------------------------------------------------------------------
# Cases: (rule, hyperparameters). Flooding's b is given relative to the loss at x0
# ("b_offset"), so that the loss is above or below b on either problem.
# --------------------------------------------------------------------------------------------

CASES: list[tuple[str, dict]] = [("sgd", {})]
CASES += [("sam", {"rho": rho}) for rho in (0.01, 0.05, 0.5)]
CASES += [("sam", {"rho": 0.5, "adaptive": True, "eta": eta}) for eta in (0.0, 0.01)]
CASES += [("sam", {"rho": 2.0, "adaptive": True, "eta": 0.01})]
CASES += [
    ("gnp", {"r": r, "alpha": alpha, "mix_unit_gradient": mix})
    for r in (0.05, 0.3)
    for alpha in (0.5, 0.8, 1.0, 1.5)
    for mix in (False, True)
]
CASES += [("gr", {"gamma": 0.01}), ("gr", {"gamma": 0.2, "penalty": "squared"})]
CASES += [("gr", {"gamma": 0.05, "penalty": "norm"}), ("gr", {"gamma": 1.0, "penalty": "norm"})]
CASES += [
    ("fd_gr", {"gamma": gamma, "eps": eps, "difference": diff, "normalize": normalize})
    for diff in ("forward", "backward", "central")
    for normalize in (False, True)
    for gamma, eps in ((0.01, 0.01), (0.05, 0.3), (0.02, 2.0))
]
CASES += [
    ("gam", {}),
    ("gam", {"variant": "paper"}),
    ("gam", {"adaptive": True}),
    ("gam", {"adaptive": True, "variant": "paper"}),
    ("gam", {"grad_rho": 0.04, "grad_norm_rho": 0.2, "grad_beta_0": 0.3, "grad_beta_1": 0.5, "grad_gamma": 0.05}),
    ("gam", {"grad_rho": 0.03, "grad_norm_rho": 0.2, "grad_beta_0": 0.1, "grad_beta_1": 0.1, "grad_gamma": 0.05,
             "variant": "paper"}),
    # beta_0 > 1 (a 0-d array: not range-checked): the code variant uses |1 - beta_0|, the paper
    # variant (1 - beta_0) < 0.
    ("gam", {"grad_rho": 0.1, "grad_norm_rho": 0.5, "grad_beta_0": np.asarray(1.5), "grad_beta_1": 0.3, "grad_gamma": 0.5}),
    ("gam", {"grad_rho": 0.1, "grad_norm_rho": 0.5, "grad_beta_0": np.asarray(1.5), "grad_beta_1": 0.3,
             "grad_gamma": 0.5, "variant": "paper", "adaptive": True}),
    ("gam", {"grad_rho": 0.1, "grad_norm_rho": 0.5, "grad_beta_0": 0.9, "grad_beta_1": 1.0, "grad_gamma": 0.5}),
]
CASES += [("flooding", {"b_offset": off}) for off in (-0.5, -1e-3, 1e-3, 0.5)]
CASES += [
    ("coherent", {"lam": lam, "penalty": pen, "threshold": thr})
    for pen in ("l2", "l1")
    for lam in (0.01, 0.3)
    for thr in (-1.0, 1.0)
]
CASES += [("coherent", {"lam": 5.0, "penalty": "l1", "threshold": -0.99, "sparsity_tol": 0.1})]


def _case_id(case: tuple[str, dict]) -> str:
    rule, hyper = case
    return rule + "(" + ",".join(f"{k}={v}" for k, v in hyper.items()) + ")"


def _resolve(problem, x, rule: str, hyper: dict) -> dict:
    hyper = dict(hyper)
    if rule == "flooding":
        hyper["b"] = problem.loss(x) + hyper.pop("b_offset")
    return hyper


# --------------------------------------------------------------------------------------------
# Quadratic closed forms, written with A directly (no gradient evaluated at a perturbed point).
# --------------------------------------------------------------------------------------------


def _off(base, v, r, adaptive=False, eta=0.0, eps=NORM_EPS):
    if adaptive:
        t = np.abs(base) + eta
        return r * t**2 * v / (norm(t * v) + eps)
    return r * v / (norm(v) + eps)


def quad_closed_form(rule: str, h: dict, A: np.ndarray, c: np.ndarray, x: np.ndarray, step: int = 0):
    """Returns (direction, grad_evals, hvp_evals, atol)."""
    g = A @ x - c
    atol = 0.0
    if rule == "sgd":
        return g, 1, 0, atol
    if rule == "sam":
        e = _off(x, g, h["rho"], h.get("adaptive", False), h.get("eta", 0.0))
        return g + A @ e, 2, 0, atol
    if rule == "gnp":
        r, alpha = h["r"], h["alpha"]
        first = g / (norm(g) + NORM_EPS) if h.get("mix_unit_gradient", False) else g
        # grad(x + r ghat) = g + r A g/(||g||+eps)
        return (1 - alpha) * first + alpha * (g + r * A @ g / (norm(g) + NORM_EPS)), 2, 0, atol
    if rule == "gr":
        if h.get("penalty", "squared") == "squared":
            return g + h["gamma"] * A @ g, 1, 1, atol
        return g + h["gamma"] * A @ g / (norm(g) + NORM_EPS), 1, 1, atol
    if rule == "fd_gr":
        # exact on a quadratic for any difference, eps and normalization
        s = h["eps"] / (norm(g) + NORM_EPS) if h.get("normalize", False) else h["eps"]
        denom = 2 * s if h.get("difference", "forward") == "central" else s
        # round-off of the difference quotient: a few ulps of |A||x| + |c| over the step
        big = np.linalg.norm(A, 2) * (norm(x) + s * norm(g)) + norm(c)
        atol = 64 * U * h["gamma"] * big / denom
        evals = 3 if h.get("difference", "forward") == "central" else 2
        return g + h["gamma"] * A @ g, evals, 0, atol
    if rule == "gam":
        rho1, rho2 = h.get("grad_rho", 0.02), h.get("grad_norm_rho", 0.2)
        b0, b1, gam = h.get("grad_beta_0", 0.5), h.get("grad_beta_1", 0.6), h.get("grad_gamma", 0.03)
        ad = h.get("adaptive", False)
        e1 = _off(x, g, rho1, ad)
        g1 = g + A @ e1
        h0 = A @ e1  # g1 - g0, exact for affine gradients
        e2 = _off(x, h0, rho2, ad)
        g2 = g + A @ e2
        e3 = _off(x + e2, g2, rho1, ad)
        g3 = g2 + A @ e3
        hp = b1 * g1 + (1 - b1) * g3
        hm = g + abs(1 - b0) * g2 if h.get("variant", "code") == "code" else b0 * g + (1 - b0) * g2
        cos = float(hm @ hp) / (norm(hp) * norm(hm) + NORM_EPS)
        return hp - gam * (hm - cos * norm(hm) * hp / (norm(hp) + NORM_EPS)), 4, 0, atol
    if rule == "flooding":
        loss = 0.5 * x @ A @ x - c @ x
        return np.sign(loss - h["b"]) * g, 1, 0, atol
    if rule == "coherent":
        rg = x if h.get("penalty", "l2") == "l2" else np.sign(x)
        reg = g + h["lam"] * rg
        cos = float(g @ reg) / (norm(g) * norm(reg) + NORM_EPS)
        gate = float(cos >= h["threshold"] and step >= h.get("delay", 0))
        return g + gate * h["lam"] * rg, 1, 0, atol
    raise AssertionError(rule)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def assert_vec_close(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float = 0.0, what: str = ""):
    err = norm(actual - expected)
    bound = atol + rtol * norm(expected)
    assert err <= bound, f"{what}: ||actual - expected|| = {err:.3e} > {bound:.3e}\nactual   {actual}\nexpected {expected}"


def run_step(problem, layout_name: str, x: np.ndarray, rule: str, hyper: dict, state=None):
    layout = layouts_for(problem.dim)[layout_name]
    oracle = TreeOracle(problem, layout)
    params = layout.unflatten(x)
    before = copy.deepcopy(params)
    res = gradnorm.step(params, oracle.grad_fn, rule=rule, state=state, hvp_fn=oracle.hvp_fn, **hyper)
    # rules never mutate their inputs
    for a, b in zip(layout.leaves(params), layout.leaves(before)):
        assert np.array_equal(a, b)
    for leaf in layout.leaves(res.grad):
        assert isinstance(leaf, np.ndarray)
    d = layout.flatten(res.grad)  # checks structure, shapes and float64
    return res, d, oracle


def check_common_info(res, problem, x, d_expected, rtol, n_grad, n_hvp, oracle):
    info = res.info
    assert info["grad_evals"] == n_grad, info
    assert info["hvp_evals"] == n_hvp, info
    assert isinstance(info["grad_evals"], int) and isinstance(info["hvp_evals"], int)
    # the oracle really was called that often
    assert len(oracle.grad_points) == n_grad
    assert len(oracle.hvp_calls) == n_hvp
    # the first gradient evaluation is at the parameters themselves
    np.testing.assert_array_equal(oracle.grad_points[0], x)
    g = problem.grad(x)
    loss = problem.loss(x)
    for key, want in (("loss", loss), ("grad_norm", norm(g)), ("update_norm", norm(d_expected))):
        got = np.asarray(info[key])
        assert got.shape == (), (key, got.shape)
        np.testing.assert_allclose(float(got), want, rtol=rtol, atol=rtol * 1e-3, err_msg=key)
    np.testing.assert_allclose(float(np.asarray(res.loss)), loss, rtol=rtol, atol=rtol * 1e-3)
    assert bool(np.asarray(info["finite"]))


# --------------------------------------------------------------------------------------------
# 1. Quadratic: closed forms, rtol 1e-12
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["dict", "list", "array"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_quadratic_closed_form(case, layout):
    rule, hyper = case
    x = QUAD.x0
    hyper = _resolve(QUAD, x, rule, hyper)
    d_exp, n_grad, n_hvp, atol = quad_closed_form(rule, hyper, QUAD.A, QUAD.c, x)
    res, d, oracle = run_step(QUAD, layout, x, rule, hyper)
    assert_vec_close(d, d_exp, rtol=1e-12, atol=atol, what=f"{rule} {hyper}")
    check_common_info(res, QUAD, x, d_exp, 1e-12, n_grad, n_hvp, oracle)


@pytest.mark.parametrize("difference", ["forward", "backward", "central"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gamma", [0.01, 0.1])
def test_quadratic_fd_gr_equals_exact_gr(difference, normalize, gamma):
    """On a quadratic every finite-difference GR equals exact GR, d = g + gamma A g, for any eps."""
    x = QUAD.x0
    g = QUAD.A @ x - QUAD.c
    want = g + gamma * QUAD.A @ g
    for eps in (1e-2, 0.1, 1.0, 10.0):
        res, d, _ = run_step(QUAD, "dict", x, "fd_gr", dict(gamma=gamma, eps=eps, difference=difference,
                                                             normalize=normalize))
        s = eps / (norm(g) + NORM_EPS) if normalize else eps
        big = np.linalg.norm(QUAD.A, 2) * (norm(x) + s * norm(g)) + norm(QUAD.c)
        atol = 64 * U * gamma * big / s
        assert_vec_close(d, want, rtol=1e-12, atol=atol, what=f"eps={eps}")
        np.testing.assert_allclose(float(res.info["step_size"]), s, rtol=1e-14)


def test_quadratic_gnp_alpha1_is_sam_closed_form():
    """GNP with alpha = 1 and r = rho has SAM's closed form g + rho A g/(||g||+eps)."""
    x = QUAD.x0
    g = QUAD.A @ x - QUAD.c
    for r in (0.05, 0.5):
        want = g + r * QUAD.A @ g / (norm(g) + NORM_EPS)
        _, d_gnp, _ = run_step(QUAD, "dict", x, "gnp", dict(r=r, alpha=1.0))
        _, d_sam, _ = run_step(QUAD, "dict", x, "sam", dict(rho=r))
        assert_vec_close(d_gnp, want, 1e-12)
        assert_vec_close(d_sam, want, 1e-12)


# --------------------------------------------------------------------------------------------
# 2. Logistic regression: reference evaluates our own analytic gradient, rtol 1e-10
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["dict", "tuple", "array"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_logistic_reference(case, layout):
    rule, hyper = case
    x = LOGI.x0
    hyper = _resolve(LOGI, x, rule, hyper)
    exp = reference(rule, LOGI, x, **hyper)
    res, d, oracle = run_step(LOGI, layout, x, rule, hyper)
    assert_vec_close(d, exp.direction, rtol=1e-10, atol=exp.atol, what=f"{rule} {hyper}")
    check_common_info(res, LOGI, x, exp.direction, 1e-10, exp.grad_evals, exp.hvp_evals, oracle)
    # every derivable rule-specific info entry
    for key, want in exp.info.items():
        assert key in res.info, (key, sorted(res.info))
        got = np.asarray(res.info[key])
        assert got.shape == (), (key, got.shape)
        if key in ("gate", "flood_sign"):
            assert float(got) == want, (key, float(got), want)
        else:
            np.testing.assert_allclose(float(got), want, rtol=1e-10, atol=1e-13, err_msg=key)


def test_logistic_problem_is_self_consistent():
    """Sanity of the reference itself: analytic gradient / HVP vs central finite differences."""
    x, h = LOGI.x0, 1e-6
    rng = np.random.default_rng(3)
    v = rng.standard_normal(LOGI.dim)
    fd_g = np.array([(LOGI.loss(x + h * e) - LOGI.loss(x - h * e)) / (2 * h) for e in np.eye(LOGI.dim)])
    np.testing.assert_allclose(LOGI.grad(x), fd_g, rtol=1e-7, atol=1e-9)
    fd_hv = (LOGI.grad(x + h * v) - LOGI.grad(x - h * v)) / (2 * h)
    np.testing.assert_allclose(LOGI.hvp(x, v), fd_hv, rtol=1e-6, atol=1e-9)
    w = rng.standard_normal(QUAD.dim)
    np.testing.assert_allclose(QUAD.grad(QUAD.x0 + w) - QUAD.grad(QUAD.x0), QUAD.A @ w, rtol=1e-12, atol=1e-12)
    eig = np.linalg.eigvalsh(QUAD.A)
    assert eig.min() > 0.99 and eig.max() < 100.01


# --------------------------------------------------------------------------------------------
# 3. Strength zero and 0-d array hyperparameters
# --------------------------------------------------------------------------------------------

ZERO_CASES = [
    ("sam", {"rho": 0}),
    ("sam", {"rho": 0, "adaptive": True}),
    ("gnp", {"r": 0, "alpha": 0.8}),
    ("gnp", {"r": 0.1, "alpha": 0}),
    ("gr", {"gamma": 0}),
    ("fd_gr", {"gamma": 0, "eps": 0.1}),
    ("fd_gr", {"gamma": 0, "eps": 0.1, "difference": "central"}),
    ("gam", {"grad_rho": 0, "grad_norm_rho": 0}),
    ("coherent", {"lam": 0, "threshold": -1.0}),
]


@pytest.mark.parametrize("case", ZERO_CASES, ids=_case_id)
def test_python_zero_strength_returns_g_after_one_evaluation(case):
    rule, hyper = case
    x = LOGI.x0
    res, d, oracle = run_step(LOGI, "dict", x, rule, hyper)
    np.testing.assert_array_equal(d, LOGI.grad(x))
    assert res.info["grad_evals"] == 1 and len(oracle.grad_points) == 1
    assert res.info["hvp_evals"] == 0 and len(oracle.hvp_calls) == 0


ARRAY_CASES = [
    ("sam", {"rho": 0.05}),
    ("sam", {"rho": 0.5, "adaptive": True, "eta": 0.01}),
    ("gnp", {"r": 0.1, "alpha": 0.8}),
    ("gr", {"gamma": 0.1}),
    ("gr", {"gamma": 0.1, "penalty": "norm"}),
    ("fd_gr", {"gamma": 0.05, "eps": 0.1, "difference": "central"}),
    ("gam", {"grad_rho": 0.04, "grad_norm_rho": 0.3, "grad_beta_0": 0.3, "grad_beta_1": 0.5, "grad_gamma": 0.05}),
    ("flooding", {"b_offset": 0.2}),
    ("coherent", {"lam": 0.1, "threshold": -1.0}),
    ("coherent", {"lam": 0.1, "threshold": 1.0}),
]
_NUMERIC = {"rho", "eta", "r", "alpha", "gamma", "eps", "grad_rho", "grad_norm_rho", "grad_beta_0",
            "grad_beta_1", "grad_gamma", "b", "lam", "threshold"}


@pytest.mark.parametrize("case", ARRAY_CASES, ids=_case_id)
def test_zero_d_array_hyperparameters(case):
    rule, hyper = case
    x = LOGI.x0
    hyper = _resolve(LOGI, x, rule, hyper)
    exp = reference(rule, LOGI, x, **hyper)
    arr_hyper = {k: (np.asarray(v, dtype=np.float64) if k in _NUMERIC else v) for k, v in hyper.items()}
    res, d, _ = run_step(LOGI, "dict", x, rule, arr_hyper)
    assert_vec_close(d, exp.direction, rtol=1e-10, atol=exp.atol)
    assert res.info["grad_evals"] == exp.grad_evals


@pytest.mark.parametrize("rule, hyper, evals", [
    # a 0-d array strength is compared with 0 at run time: one evaluation (issue 17)
    ("sam", {"rho": 0.0}, 1),
    ("sam", {"rho": 0.0, "adaptive": True}, 1),
    ("gnp", {"r": 0.1, "alpha": 0.0}, 1),
    ("gnp", {"r": 0.0, "alpha": 0.8}, 1),
    ("gnp", {"r": 0.0, "alpha": 0.8, "mix_unit_gradient": True}, 1),
    ("gnp", {"r": 0.1, "alpha": 0.0, "mix_unit_gradient": True}, 1),
    ("fd_gr", {"gamma": 0.0, "eps": 0.1}, 1),
    ("fd_gr", {"gamma": 0.0, "eps": 0.1, "difference": "central"}, 1),
    ("gam", {"grad_rho": 0.0, "grad_norm_rho": 0.0}, 1),
    ("gam", {"grad_rho": 0.0, "grad_norm_rho": 0.2}, 4),  # one radius 0: not the identity
])
def test_zero_d_array_zero_takes_arithmetic_path(rule, hyper, evals):
    """A 0-d array strength of 0 is not the static shortcut but still gives g, without the extra
    passes."""
    x = LOGI.x0
    arr = {k: (np.asarray(v) if k in _NUMERIC else v) for k, v in hyper.items()}
    res, d, oracle = run_step(LOGI, "dict", x, rule, arr)
    if evals == 1:
        assert_vec_close(d, LOGI.grad(x), rtol=1e-14)
    else:
        assert_vec_close(d, reference(rule, LOGI, x, **hyper).direction, rtol=1e-10)
    assert res.info["grad_evals"] == evals == len(oracle.grad_points)


# --------------------------------------------------------------------------------------------
# 4. Flooding: sign and loss transforms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset, sign", [(-0.3, 1.0), (0.3, -1.0), (-1e-9, 1.0), (1e-9, -1.0)])
def test_flooding_sign(offset, sign):
    x = LOGI.x0
    b = LOGI.loss(x) + offset
    res, d, _ = run_step(LOGI, "array", x, "flooding", {"b": b})
    np.testing.assert_array_equal(d, sign * LOGI.grad(x))
    assert float(res.info["flood_sign"]) == sign


@pytest.mark.parametrize("b", [0.0, 0.3, 0.7, 5.0, -1.0])
def test_flood_transform_values(b):
    for loss in (0.0, 0.2, 0.69, 3.0):
        got = gradnorm.flood(np.asarray(loss), b)
        assert np.asarray(got).shape == ()
        np.testing.assert_allclose(float(got), abs(loss - b) + b, rtol=1e-15, atol=1e-15)
    losses = LOGI.per_example(LOGI.x0)
    got = gradnorm.iflood(losses, b)
    assert np.asarray(got).shape == ()
    np.testing.assert_allclose(float(got), np.mean(np.abs(losses - b) + b), rtol=1e-14)


def _iflood_b():
    """A flood level strictly between two per-example losses, far from all of them."""
    losses = np.sort(LOGI.per_example(LOGI.x0))
    gaps = np.diff(losses)
    i = int(np.argmax(gaps[5:-5])) + 5
    return 0.5 * (losses[i] + losses[i + 1])


def _iflood_analytic_grad(x, b):
    s = 0.5 * (1.0 + np.tanh(0.5 * (LOGI.X @ x)))
    sign = np.sign(LOGI.per_example(x) - b)
    return LOGI.X.T @ (sign * (s - LOGI.y)) / LOGI.n


def test_iflood_gradient_finite_differences():
    """d/dw iflood(l(w), b) = mean_i sign(l_i - b) grad l_i, checked by central differences."""
    x, b, h = LOGI.x0, _iflood_b(), 1e-6
    signs = np.sign(LOGI.per_example(x) - b)
    assert (signs > 0).any() and (signs < 0).any()  # both regimes present

    def f(w):
        return float(gradnorm.iflood(LOGI.per_example(w), b))

    fd = np.array([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in np.eye(LOGI.dim)])
    want = _iflood_analytic_grad(x, b)
    np.testing.assert_allclose(fd, want, rtol=1e-6, atol=1e-9)
    # and it differs from the batch-level flood gradient
    assert norm(want - np.sign(LOGI.loss(x) - b) * LOGI.grad(x)) > 1e-3


def test_flood_transforms_autodiff_torch():
    torch = pytest.importorskip("torch")
    X = torch.tensor(LOGI.X)
    y = torch.tensor(LOGI.y)
    x0 = LOGI.x0
    for b in (LOGI.loss(x0) - 0.2, LOGI.loss(x0) + 0.2):
        w = torch.tensor(x0, requires_grad=True)
        z = X @ w
        per = torch.nn.functional.softplus(z) - y * z
        gradnorm.flood(per.mean(), b).backward()
        np.testing.assert_allclose(w.grad.numpy(), np.sign(LOGI.loss(x0) - b) * LOGI.grad(x0), rtol=1e-12)
        # matches the flooding rule
        _, d, _ = run_step(LOGI, "array", x0, "flooding", {"b": b})
        np.testing.assert_allclose(w.grad.numpy(), d, rtol=1e-12)
    b = _iflood_b()
    w = torch.tensor(x0, requires_grad=True)
    z = X @ w
    gradnorm.iflood(torch.nn.functional.softplus(z) - y * z, b).backward()
    np.testing.assert_allclose(w.grad.numpy(), _iflood_analytic_grad(x0, b), rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------------------------
# 5. Coherent: threshold around the measured cosine, delay with state, sparsity
# --------------------------------------------------------------------------------------------


def _cosine(problem, x, lam, penalty):
    g = problem.grad(x)
    rg = x if penalty == "l2" else np.sign(x)
    reg = g + lam * rg
    return float(g @ reg) / (norm(g) * norm(reg) + NORM_EPS)


@pytest.mark.parametrize("problem", [QUAD, LOGI], ids=["quad", "logistic"])
@pytest.mark.parametrize("penalty", ["l2", "l1"])
@pytest.mark.parametrize("lam", [0.05, 1.0, 20.0])
@pytest.mark.parametrize("margin, gate", [(-0.01, 1.0), (0.01, 0.0)])
def test_coherent_threshold_around_cosine(problem, penalty, lam, margin, gate):
    x = problem.x0
    cos = _cosine(problem, x, lam, penalty)
    thr = cos + margin
    if not -1.0 <= thr <= 1.0:  # cosine within 0.01 of +-1: halve the distance instead
        thr = 0.5 * (cos + np.sign(margin))
    res, d, _ = run_step(problem, "array", x, "coherent", dict(lam=lam, penalty=penalty, threshold=thr))
    g = problem.grad(x)
    rg = x if penalty == "l2" else np.sign(x)
    assert_vec_close(d, g + gate * lam * rg, rtol=1e-12)
    assert float(res.info["gate"]) == gate
    np.testing.assert_allclose(float(res.info["coherence"]), cos, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("penalty", ["l2", "l1"])
@pytest.mark.parametrize("delay", [0, 1, 3])
def test_coherent_delay_with_state(penalty, delay):
    """gate = 0 for the first `delay` steps, then on (threshold -1 is always coherent)."""
    lam, lr = 0.2, 0.05
    x = LOGI.x0.copy()
    state = None
    for k in range(delay + 3):
        hyper = dict(lam=lam, penalty=penalty, threshold=-1.0, delay=delay)
        res, d, _ = run_step(LOGI, "dict", x, "coherent", hyper, state=state)
        exp = reference("coherent", LOGI, x, step=k, **hyper)
        assert float(res.info["gate"]) == (1.0 if k >= delay else 0.0), k
        assert_vec_close(d, exp.direction, rtol=1e-12)
        step = np.asarray(res.state.step)
        assert step.shape == () and int(step) == k + 1
        state = res.state
        x = x - lr * d


def test_coherent_delay_gate_stays_off_when_incoherent():
    state, x = None, LOGI.x0
    for k in range(4):
        res, d, _ = run_step(LOGI, "dict", x, "coherent", dict(lam=0.2, threshold=1.0, delay=2), state=state)
        assert float(res.info["gate"]) == 0.0
        np.testing.assert_array_equal(d, LOGI.grad(x))
        state = res.state
    assert int(np.asarray(state.step)) == 4


@pytest.mark.parametrize("tol, frac", [(1e-3, 0.4), (1e-6, 0.0), (0.3, None)])
@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_coherent_sparsity(tol, frac, penalty):
    x = QUAD.x0.copy()
    x[1], x[3] = 2e-4, -5e-4
    if frac is None:
        frac = float(np.mean(np.abs(x) < tol))
    res, d, _ = run_step(QUAD, "dict", x, "coherent", dict(lam=0.1, penalty=penalty, threshold=-1.0,
                                                            sparsity_tol=tol))
    np.testing.assert_allclose(float(res.info["sparsity"]), frac, rtol=1e-15)
    d_exp, *_ = quad_closed_form("coherent", dict(lam=0.1, penalty=penalty, threshold=-1.0), QUAD.A, QUAD.c, x)
    assert_vec_close(d, d_exp, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# 6. A short trajectory: several steps of plain GD with each rule agree with the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "flooding"][::3], ids=_case_id)
def test_logistic_trajectory(case):
    rule, hyper = case
    x = LOGI.x0.copy()
    x_ref = LOGI.x0.copy()
    state = None
    for k in range(3):
        res, d, _ = run_step(LOGI, "dict", x, rule, hyper, state=state)
        exp = reference(rule, LOGI, x_ref, **({"step": k} if rule == "coherent" else {}), **hyper)
        assert_vec_close(d, exp.direction, rtol=1e-9, atol=exp.atol)
        state = res.state
        x = x - 0.5 * d
        x_ref = x_ref - 0.5 * exp.direction


# --------------------------------------------------------------------------------------------
# 7. A large norm_eps makes its placement visible: ||v|| + norm_eps, outside the square root
# --------------------------------------------------------------------------------------------

EPS_CASES = [
    ("sam", {"rho": 0.3}),
    ("sam", {"rho": 0.5, "adaptive": True, "eta": 0.01}),
    ("gnp", {"r": 0.3, "alpha": 0.8, "mix_unit_gradient": True}),
    ("gnp", {"r": 0.3, "alpha": 0.5}),
    ("gr", {"gamma": 0.5, "penalty": "norm"}),
    ("fd_gr", {"gamma": 0.1, "eps": 0.2, "normalize": True, "difference": "central"}),
    ("gam", {"grad_rho": 0.1, "grad_norm_rho": 0.3, "grad_gamma": 0.5}),
    ("gam", {"grad_rho": 0.1, "grad_norm_rho": 0.3, "grad_gamma": 0.5, "adaptive": True, "variant": "paper"}),
    ("coherent", {"lam": 0.2, "threshold": -1.0}),
]


@pytest.mark.parametrize("norm_eps", [0.05, 0.5])
@pytest.mark.parametrize("case", EPS_CASES, ids=_case_id)
def test_custom_norm_eps(case, norm_eps):
    rule, hyper = case
    x = LOGI.x0
    assert norm(LOGI.grad(x)) < 10 * norm_eps  # eps is not negligible here
    exp = reference(rule, LOGI, x, norm_eps=norm_eps, **hyper)
    res, d, _ = run_step(LOGI, "dict", x, rule, dict(hyper, norm_eps=norm_eps))
    assert_vec_close(d, exp.direction, rtol=1e-10, atol=exp.atol)
    for key in ("coherence", "cosine", "step_size", "perturbed_loss"):
        if key in exp.info:
            np.testing.assert_allclose(float(res.info[key]), exp.info[key], rtol=1e-10, err_msg=key)


def test_norms_off_skips_the_reductions_the_rule_does_not_need():
    """`update(..., norms=False)`: no `update_norm`; `grad_norm` only where the rule reads it;
    `finite` still sees a non-finite direction whose norm was never taken."""
    import numpy as np

    import gradnorm

    params = {"w": np.array([1.0, -2.0]), "b": np.array([0.5])}

    def grad_fn(p):
        return 0.5 * float(np.sum(p["w"] ** 2) + np.sum(p["b"] ** 2)), {"w": p["w"].copy(), "b": p["b"].copy()}

    oracle = gradnorm.FunctionOracle(grad_fn)
    for name, hyper, has_grad_norm in [("sgd", {}, False), ("sam", {"rho": 0.1}, True), ("flooding", {"b": 0.0}, False),
                                       ("fd_gr", {"gamma": 0.1, "eps": 0.01}, False), ("gnp", {"r": 0.1, "alpha": 0.5}, True)]:
        rule = gradnorm.rules.get(name, **hyper)
        d_on, _, on = rule.update(params, rule.init(params), oracle)
        d_off, _, off = rule.update(params, rule.init(params), oracle, norms=False)
        assert "update_norm" in on and "update_norm" not in off
        assert ("grad_norm" in off) == has_grad_norm == rule.uses_grad_norm
        assert bool(off["finite"]) and bool(on["finite"])
        for k in params:
            np.testing.assert_array_equal(d_on[k], d_off[k])

    def bad_grad_fn(p):
        loss, g = grad_fn(p)
        g["b"][0] = np.inf
        return loss, g

    sgd = gradnorm.rules.get("sgd")
    _, _, info = sgd.update(params, sgd.init(params), gradnorm.FunctionOracle(bad_grad_fn), norms=False)
    assert not bool(info["finite"])


def test_finite_is_elementwise_so_an_overflowing_norm_is_not_a_fault():
    """float32 entries of 1e30 are finite, their squared norm is not: `finite` must stay True
    (the norm itself is reported as it is)."""
    import numpy as np

    import gradnorm

    params = {"w": np.full(4, 1e30, dtype=np.float32)}
    with np.errstate(over="ignore"):  # the norm overflows, which is the point
        res = gradnorm.step(params, lambda p: (np.float32(1.0), {"w": p["w"].copy()}), rule="sgd")
    assert bool(res.info["finite"]) and not np.isfinite(res.info["update_norm"])
    bad = gradnorm.step(params, lambda p: (np.float32(1.0), {"w": np.array([1.0, np.nan, 0, 0], np.float32)}), rule="sgd")
    assert not bool(bad.info["finite"])
