"""Property tests of the identities that tie the rules together (ALGORITHMS.md part A, DESIGN.md §5).

Every test draws random problems with hypothesis: SPD quadratics ``L = x.A x / 2 - b.x`` and
logistic regressions (weights and a bias), of dimension 1 to 6, with the parameters laid out as
a single array, a dict, a list, a nested tree or a tree holding a 0-d leaf. The loss of each
problem is rescaled so that the gradient at the starting point has a drawn norm in [1, 10]
(a rescaled problem is still a random problem of its kind); this keeps the ``norm_eps`` terms,
which are O(norm_eps / ||g||) by design, below the tolerances used here.

NumPy float64 only; the same identities on other array libraries are in ``test_backends.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import gradnorm
from conformance.settings import zero_settings

SETTINGS = settings(max_examples=40, deadline=None)


# --------------------------------------------------------------------------------------
# problems


def _expit(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))  # no overflow for any t


# How a flat parameter vector of length n is laid out as a tree (k = split point, 1 <= k < n).
_LAYOUTS: dict[str, tuple[Callable[[np.ndarray, int], Any], Callable[[Any, int], np.ndarray]]] = {
    "array": (lambda v, k: v.copy(), lambda t, k: np.asarray(t, dtype=np.float64)),
    "dict": (
        lambda v, k: {"w": v[:k].copy(), "b": v[k:].copy()},
        lambda t, k: np.concatenate([np.ravel(t["w"]), np.ravel(t["b"])]),
    ),
    "list": (
        lambda v, k: [v[:k].copy(), v[k:].copy()],
        lambda t, k: np.concatenate([np.ravel(t[0]), np.ravel(t[1])]),
    ),
    "nested": (
        lambda v, k: {"layer": (v[:k].reshape(k, 1).copy(),), "bias": [v[k:].copy()]},
        lambda t, k: np.concatenate([np.ravel(t["layer"][0]), np.ravel(t["bias"][0])]),
    ),
    "scalar_leaf": (  # a 0-d leaf first
        lambda v, k: (np.array(v[0]), v[1:].copy()),
        lambda t, k: np.concatenate([np.reshape(t[0], (1,)), np.ravel(t[1])]),
    ),
}


@dataclass(frozen=True)
class Problem:
    """A smooth loss on R^n with analytic gradient and Hessian-vector product, seen as a tree."""

    kind: str
    value_grad: Callable[[np.ndarray], tuple[float, np.ndarray]]
    hvp: Callable[[np.ndarray, np.ndarray], np.ndarray]
    hessian: Callable[[np.ndarray], np.ndarray]
    x0: np.ndarray
    layout: str
    split: int

    def tree(self, vec: np.ndarray) -> Any:
        return _LAYOUTS[self.layout][0](np.asarray(vec, dtype=np.float64), self.split)

    def vec(self, tree: Any) -> np.ndarray:
        return _LAYOUTS[self.layout][1](tree, self.split)

    @property
    def params(self) -> Any:
        return self.tree(self.x0)

    def grad_fn(self, params: Any) -> tuple[Any, Any]:
        loss, g = self.value_grad(self.vec(params))
        return np.asarray(loss), self.tree(g)

    def hvp_fn(self, params: Any, v: Any) -> Any:
        return self.tree(self.hvp(self.vec(params), self.vec(v)))

    def grad_at(self, vec: np.ndarray) -> np.ndarray:
        return self.value_grad(vec)[1]

    def loss_at(self, vec: np.ndarray) -> float:
        return float(self.value_grad(vec)[0])


def _quadratic(rng: np.random.Generator, n: int):
    m = rng.standard_normal((n, n))
    a = m @ m.T / n + 0.5 * np.eye(n)  # SPD, smallest eigenvalue >= 0.5
    b = rng.standard_normal(n)
    x0 = rng.standard_normal(n)

    def value_grad(x):
        ax = a @ x
        return 0.5 * x @ ax - b @ x, ax - b

    return value_grad, (lambda x, v: a @ v), (lambda x: a), x0


def _logistic(rng: np.random.Generator, n: int):
    d, m = n - 1, 12  # n - 1 weights and a bias (n = 1: bias only)
    features = rng.standard_normal((m, d))
    labels = rng.choice([-1.0, 1.0], size=m)
    x0 = 0.5 * rng.standard_normal(n)
    design = np.concatenate([features, np.ones((m, 1))], axis=1)

    def value_grad(x):
        z = design @ x
        t = -labels * z
        loss = np.mean(np.logaddexp(0.0, t))
        s = -labels * _expit(t)
        return loss, design.T @ s / m

    def hessian(x):
        p = _expit(design @ x)
        return design.T @ ((p * (1.0 - p))[:, None] * design) / m

    return value_grad, (lambda x, v: hessian(x) @ v), hessian, x0


@st.composite
def problems(draw, kinds=("quadratic", "logistic"), x0: Callable[[np.random.Generator, int], np.ndarray] | None = None):
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, 6))
    layout = draw(st.sampled_from(sorted(_LAYOUTS))) if n > 1 else "array"
    split = draw(st.integers(1, n - 1)) if n > 1 else 1
    target_norm = draw(st.floats(1.0, 10.0))
    rng = np.random.default_rng(seed)
    value_grad, hvp, hessian, start = (_quadratic if kind == "quadratic" else _logistic)(rng, n)
    if x0 is not None:
        start = x0(rng, n)
    raw_norm = float(np.linalg.norm(value_grad(start)[1]))
    assume(raw_norm > 1e-6)
    c = target_norm / raw_norm  # rescale the loss: ||grad L(x0)|| = target_norm

    def scaled_value_grad(x):
        loss, g = value_grad(x)
        return c * loss, c * g

    return Problem(
        kind=kind,
        value_grad=scaled_value_grad,
        hvp=lambda x, v: c * hvp(x, v),
        hessian=lambda x: c * hessian(x),
        x0=start,
        layout=layout,
        split=split,
    )


def run(problem: Problem, rule: str, params: Any = None, **hyper) -> gradnorm.StepResult:
    params = problem.params if params is None else params
    return gradnorm.step(params, problem.grad_fn, rule=rule, hvp_fn=problem.hvp_fn, **hyper)


# --------------------------------------------------------------------------------------
# every rule is sgd at zero strength

positive = st.floats(1e-3, 2.0)
unit = st.floats(0.0, 1.0)


def zero_strength_configs(zero: st.SearchStrategy) -> dict[str, st.SearchStrategy]:
    """For each rule (and each of its modes), hyperparameters whose strength is drawn from
    ``zero``; the other hyperparameters are random."""
    configs = {
        "sam": st.fixed_dictionaries({"rho": zero, "adaptive": st.booleans(), "eta": unit}),
        # with or without the official code's unit-gradient mix: r = 0 or alpha = 0 is g (issue 17)
        "gnp(alpha=0)": st.fixed_dictionaries({"r": positive, "alpha": zero, "mix_unit_gradient": st.booleans()}),
        "gnp(r=0)": st.fixed_dictionaries(
            {"r": zero, "alpha": st.floats(1e-3, 2.0), "mix_unit_gradient": st.booleans()}
        ),
        "coherent": st.fixed_dictionaries(
            {
                "lam": zero,
                "penalty": st.sampled_from(["l2", "l1"]),
                "threshold": st.floats(-1.0, 1.0),
                "delay": st.integers(0, 3),
            }
        ),
    }
    configs["looksam"] = st.fixed_dictionaries(
        {
            "rho": zero,
            "every": st.integers(1, 5),
            "alpha": unit,
            "decomposition": st.sampled_from(["global", "per_tensor"]),
            "adaptive": st.booleans(),
            "eta": unit,
        }
    )
    configs["periodic"] = st.fixed_dictionaries(  # a wrapped rule at zero strength
        {"inner": st.builds(lambda rho: gradnorm.rules.SAM(rho=rho), zero), "every": st.integers(1, 5),
         "reuse": st.booleans()}
    )
    for penalty in ("squared", "norm"):
        configs[f"gr({penalty})"] = st.fixed_dictionaries({"gamma": zero, "penalty": st.just(penalty)})
    for difference in ("forward", "backward", "central"):
        configs[f"fd_gr({difference})"] = st.fixed_dictionaries(
            {"gamma": zero, "eps": positive, "difference": st.just(difference), "normalize": st.booleans()}
        )
    for variant in ("code", "paper"):
        configs[f"gam({variant})"] = st.fixed_dictionaries(
            {
                "grad_rho": zero,
                "grad_norm_rho": zero,
                "grad_beta_0": unit,
                "grad_beta_1": unit,
                # the arithmetic path departs from g by O(grad_gamma * norm_eps / ||g||^2)
                "grad_gamma": st.floats(0.0, 0.1),
                "adaptive": st.booleans(),
                "variant": st.just(variant),
            }
        )
    return configs


STATIC_ZERO = st.sampled_from([0, 0.0, -0.0])  # the Python number 0
ARRAY_ZERO = st.builds(lambda: np.asarray(0.0))  # a 0-d array: compared with 0 at run time
STATIC_CONFIGS = zero_strength_configs(STATIC_ZERO)
ARRAY_CONFIGS = zero_strength_configs(ARRAY_ZERO)


def _rule_name(case: str) -> str:
    return case.split("(")[0]


def test_zero_strength_configs_cover_every_rule_with_a_strength():
    """Every rule whose zero-strength setting in conformance/settings.py sets a strength to zero
    has hypothesis configs here (sgd has no strength; flooding's is a level, checked below)."""
    with_strength = {
        rule for rule, hyper in zero_settings()
        if any(isinstance(v, float) and v == 0.0 for v in hyper.values())
    }
    assert with_strength <= {_rule_name(case) for case in STATIC_CONFIGS}
    assert with_strength <= {_rule_name(case) for case in ARRAY_CONFIGS}


@pytest.mark.parametrize("case", sorted(STATIC_CONFIGS))
@SETTINGS
@given(problem=problems(), data=st.data())
def test_zero_strength_python_number_is_sgd_exactly(case, problem, data):
    hyper = data.draw(STATIC_CONFIGS[case], label="hyperparameters")
    expected = run(problem, "sgd")
    res = run(problem, _rule_name(case), **hyper)
    assert np.array_equal(problem.vec(res.grad), problem.vec(expected.grad))
    assert np.array_equal(res.loss, expected.loss)
    # the static shortcut: one gradient evaluation, no HVP
    assert res.info["grad_evals"] == 1
    assert res.info["hvp_evals"] == 0
    assert bool(res.info["finite"])


@pytest.mark.parametrize("case", sorted(ARRAY_CONFIGS))
@SETTINGS
@given(problem=problems(), data=st.data())
def test_zero_strength_array_is_sgd(case, problem, data):
    hyper = data.draw(ARRAY_CONFIGS[case], label="hyperparameters")
    rule = _rule_name(case)
    expected = problem.vec(run(problem, "sgd").grad)
    res = run(problem, rule, **hyper)
    np.testing.assert_allclose(problem.vec(res.grad), expected, rtol=1e-12, atol=0.0)
    if rule in ("sam", "gnp", "fd_gr", "gam", "looksam", "periodic"):
        # these compare a 0-d array strength with 0 at run time and skip their extra passes (a
        # "zero until step w" schedule costs one evaluation per step, issue 17); each declares its most
        assert np.array_equal(problem.vec(res.grad), expected)
        assert res.info["grad_evals"] == 1
        assert gradnorm.rules.get(rule, **hyper).grad_evals > 1
        return
    # a 0-d array is not static: the rule took its arithmetic path (its full cost)
    assert res.info["grad_evals"] == gradnorm.rules.get(rule, **hyper).grad_evals
    if rule == "gr":
        assert res.info["hvp_evals"] == 1


# --------------------------------------------------------------------------------------
# gnp(alpha=1) is sam(rho=r)


@SETTINGS
@given(problem=problems(), r=positive, mix=st.booleans(), norm_eps=st.sampled_from([1e-12, 0.0, 1e-3]))
def test_gnp_alpha_one_is_sam_exactly(problem, r, mix, norm_eps):
    sam = run(problem, "sam", rho=r, norm_eps=norm_eps)
    gnp = run(problem, "gnp", r=r, alpha=1.0, mix_unit_gradient=mix, norm_eps=norm_eps)
    assert np.array_equal(problem.vec(gnp.grad), problem.vec(sam.grad))
    assert np.array_equal(gnp.info["perturbed_loss"], sam.info["perturbed_loss"])
    # the same identity on the arithmetic path: (1 - 1) g + 1 g' = g'
    arith = run(problem, "gnp", r=r, alpha=np.asarray(1.0), norm_eps=norm_eps)
    np.testing.assert_allclose(problem.vec(arith.grad), problem.vec(sam.grad), rtol=1e-12, atol=0.0)


# --------------------------------------------------------------------------------------
# fd_gr is exact on a quadratic


@SETTINGS
@given(problem=problems(kinds=("quadratic",)), gamma=st.floats(1e-3, 2.0), eps=st.floats(1e-2, 1.0))
def test_fd_gr_all_differences_equal_gr_on_a_quadratic(problem, gamma, eps):
    exact = problem.vec(run(problem, "gr", gamma=gamma, penalty="squared").grad)
    # the same thing written out: g + gamma A g
    g = problem.grad_at(problem.x0)
    np.testing.assert_allclose(exact, g + gamma * problem.hessian(problem.x0) @ g, rtol=1e-12, atol=1e-12)
    atol = 1e-9 * np.max(np.abs(exact))
    for difference in ("forward", "backward", "central"):
        for normalize in (False, True):
            res = run(problem, "fd_gr", gamma=gamma, eps=eps, difference=difference, normalize=normalize)
            np.testing.assert_allclose(
                problem.vec(res.grad), exact, rtol=1e-9, atol=atol, err_msg=f"{difference=} {normalize=}"
            )


@SETTINGS
@given(problem=problems(), eps=st.floats(1e-3, 1.0))
def test_fd_gr_forward_with_gamma_eps_is_unnormalized_sam(problem, eps):
    res = run(problem, "fd_gr", gamma=eps, eps=eps, difference="forward", normalize=False)
    g = problem.grad_at(problem.x0)
    expected = problem.grad_at(problem.x0 + eps * g)  # grad L(x + eps g)
    # d = g + (g+ - g) rounds at the scale of |g| and |g+|
    atol = 1e-12 * (np.max(np.abs(g)) + np.max(np.abs(expected)))
    np.testing.assert_allclose(problem.vec(res.grad), expected, rtol=1e-10, atol=atol)


# --------------------------------------------------------------------------------------
# flooding


@SETTINGS
@given(problem=problems(), gap=st.floats(1e-6, 10.0), above=st.booleans())
def test_flooding_is_sgd_above_the_level_and_ascent_below(problem, gap, above):
    loss = problem.loss_at(problem.x0)
    g = problem.vec(run(problem, "sgd").grad)
    margin = gap * (1.0 + abs(loss))  # keeps L - b away from 0 after rounding
    b = loss - margin if above else loss + margin
    res = run(problem, "flooding", b=b)
    if above:
        assert np.array_equal(problem.vec(res.grad), g)
        assert float(res.info["flood_sign"]) == 1.0
    else:
        assert np.array_equal(problem.vec(res.grad), -g)
        assert float(res.info["flood_sign"]) == -1.0
    assert res.info["grad_evals"] == 1


@SETTINGS
@given(problem=problems())
def test_flooding_at_the_level_is_zero(problem):
    # d = sign(L - b) g with sign(0) = 0
    loss = run(problem, "sgd").loss
    res = run(problem, "flooding", b=float(loss))
    assert np.array_equal(problem.vec(res.grad), np.zeros_like(problem.x0))


@SETTINGS
@given(problem=problems(kinds=("quadratic",)), eta=st.floats(1e-3, 0.5), where=st.floats(0.05, 0.95))
def test_flooding_ascent_descent_pair_is_an_fd_gr_penalty_step(problem, eta, where):
    """ALGORITHMS.md §2: full-batch GD with learning rate eta on |L - b| + b.

    From x0 with L(x0) < b the first step ascends, x1 = x0 + eta g0. If L(x1) > b the second
    descends, x2 = x1 - eta grad L(x1). On the quadratic grad L(x) = A x - b_lin, so
    grad L(x1) = g0 + eta A g0 and x2 - x0 = eta g0 - eta (g0 + eta A g0) = -eta^2 A g0: the loss
    term cancels and what is left is eta times the penalty part, d - g = gamma A g, of one
    fd_gr step with gamma = eps = eta (exact on a quadratic).
    """
    x0 = problem.x0
    g0 = problem.grad_at(x0)
    loss0 = problem.loss_at(x0)
    loss1 = problem.loss_at(x0 + eta * g0)  # = loss0 + eta |g0|^2 + eta^2 g0.A g0 / 2 > loss0
    assume(loss1 - loss0 > 1e-9 * (1.0 + abs(loss0)))
    level = loss0 + where * (loss1 - loss0)
    assume(loss0 < level < loss1)

    x = problem.params
    first = gradnorm.step(x, problem.grad_fn, rule="flooding", b=level)
    assert float(first.info["flood_sign"]) == -1.0  # below the level: ascent
    x = problem.tree(problem.vec(x) - eta * problem.vec(first.grad))
    second = gradnorm.step(x, problem.grad_fn, rule="flooding", b=level)
    assert float(second.info["flood_sign"]) == 1.0  # above the level: descent
    x2 = problem.vec(x) - eta * problem.vec(second.grad)
    displacement = x2 - x0

    expected = -(eta**2) * problem.hessian(x0) @ g0
    scale = np.max(np.abs(x0)) + eta * np.max(np.abs(g0))  # rounding of x0 + eta g0 - ...
    np.testing.assert_allclose(displacement, expected, rtol=1e-9, atol=1e-12 * scale)

    fd = run(problem, "fd_gr", gamma=eta, eps=eta, difference="forward")
    penalty_step = problem.vec(fd.grad) - g0  # gamma * (H g estimate)
    np.testing.assert_allclose(displacement, -eta * penalty_step, rtol=1e-8, atol=1e-12 * scale)


# --------------------------------------------------------------------------------------
# ASAM with T = 1 is SAM


def _unit_magnitudes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], size=n)


@SETTINGS
@given(problem=problems(x0=_unit_magnitudes), rho=positive, eta_kind=st.sampled_from(["static", "array"]))
def test_adaptive_sam_with_unit_weights_is_sam(problem, rho, eta_kind):
    assert np.array_equal(np.abs(problem.x0), np.ones_like(problem.x0))
    eta = 0.0 if eta_kind == "static" else np.asarray(0.0)
    plain = run(problem, "sam", rho=rho)
    adaptive = run(problem, "sam", rho=rho, adaptive=True, eta=eta)
    # T = |x| = 1: multiplying by 1.0 is exact, so both take the same ascent point
    assert np.array_equal(problem.vec(adaptive.grad), problem.vec(plain.grad))
    assert np.array_equal(adaptive.info["perturbed_loss"], plain.info["perturbed_loss"])
