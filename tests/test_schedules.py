"""gradnorm.schedules: the GR warm-up ramps of the official GNP code (float32, step = updates taken so
far), constants and delayed strengths, for int steps and 0-d arrays of every installed library; and
GNP's zero strength (r = 0 or alpha = 0: the plain gradient after one evaluation, in every setting,
also when the strength is a 0-d array that is 0 at run time)."""

from __future__ import annotations

import numpy as np
import pytest

import gradnorm
from gradnorm.schedules import Constant, LinearWarmup, ZeroUntil, constant, gnp_warmup, linear_warmup, zero_until

F32 = np.float32


def hand_ramp32(target: float, w: int, t: int) -> float:
    """The official code's ramp, written out by hand: float32(target) * min(1, float32(t) * float32(1/w)),
    every operation rounded to float32 (XLA turns the division by the constant w into this product)."""
    reciprocal = F32(1.0) / F32(w)
    fraction = F32(t) * reciprocal
    if fraction > F32(1.0):
        fraction = F32(1.0)
    return float(F32(target) * fraction)


WARMUPS = (1, 3, 7, 10, 49, 97, 391, 1000)


@pytest.mark.parametrize("w", WARMUPS)
def test_linear_warmup_is_the_hand_written_float32_ramp(w):
    s = linear_warmup(0.1, w)
    steps = range(0, w + 5) if w < 400 else [*range(0, w + 5, 13), w - 1, w, w + 1]
    for t in steps:
        got = s(t)
        assert isinstance(got, float)
        assert got == hand_ramp32(0.1, w, t), (w, t)
    assert s(0) == 0.0
    assert s(w + 10**6) == float(F32(0.1))  # after the warm-up: float32(target), as in the official code


def test_linear_warmup_float32_is_not_the_correctly_rounded_quotient():
    """The product with the float32 reciprocal (what the official code computes once compiled) differs
    from a correctly rounded t / w at some steps: a test that checks the one against the other can fail."""
    w, t = 7, 3
    correctly_rounded = float(F32(0.1) * (F32(t) / F32(w)))
    assert linear_warmup(0.1, w)(t) == hand_ramp32(0.1, w, t) != correctly_rounded


def test_linear_warmup_float64_and_zero_length():
    s = linear_warmup(0.3, 8, dtype="float64")
    assert [s(t) for t in (0, 2, 4, 8, 9)] == [0.0, 0.3 * (2 / 8), 0.3 * (4 / 8), 0.3, 0.3]
    assert linear_warmup(0.1, 0)(0) == 0.1  # no warm-up: the value itself (the official code's warmup_epochs=0)


def test_zero_until_and_constant():
    s = zero_until(0.1, 3)
    assert [s(t) for t in range(6)] == [0.0, 0.0, 0.0, 0.1, 0.1, 0.1]  # exactly 0.1 after, not float32(0.1)
    assert zero_until(0.1, 0)(0) == 0.1
    assert [constant(0.8)(t) for t in (0, 5, 10**9)] == [0.8, 0.8, 0.8]


def test_gnp_warmup_presets():
    w = 5
    r = gnp_warmup("r", r=0.1, alpha=0.8, warmup_steps=w)
    assert r == {"r": LinearWarmup(0.1, w), "alpha": Constant(0.8)}
    assert [r["r"](t) for t in range(7)] == [hand_ramp32(0.1, w, t) for t in range(7)]
    assert [r["alpha"](t) for t in range(7)] == [0.8] * 7
    lam = gnp_warmup("lambda", r=0.05, alpha=0.8, warmup_steps=w)
    assert [lam["alpha"](t) for t in range(7)] == [hand_ramp32(0.8, w, t) for t in range(7)]
    assert [lam["r"](t) for t in range(7)] == [0.05] * 7
    zero = gnp_warmup("zero", r=0.1, alpha=1.0, warmup_steps=w)
    assert zero == {"r": ZeroUntil(0.1, w), "alpha": Constant(1.0)}
    assert [zero["r"](t) for t in range(7)] == [0.0] * 5 + [0.1, 0.1]


@pytest.mark.parametrize("call, argument, expectation, received", [
    (lambda: gnp_warmup("linear", r=0.1, alpha=0.8, warmup_steps=3), "strategy", "one of 'r', 'lambda', 'zero'", "'linear'"),
    (lambda: gnp_warmup("r", r=-0.1, alpha=0.8, warmup_steps=3), "r", "a finite number >= 0", "-0.1"),
    (lambda: gnp_warmup("r", r=0.1, alpha=0.8, warmup_steps=2.5), "warmup_steps", "an integer >= 0", "2.5"),
    (lambda: linear_warmup(float("nan"), 3), "target", "a finite number", "nan"),
    (lambda: linear_warmup(0.1, 3, dtype="float16"), "dtype", "one of 'float32', 'float64'", "'float16'"),
    (lambda: zero_until(0.1, -1), "steps", "an integer >= 0", "-1"),
    (lambda: constant("0.1"), "value", "a finite number", "'0.1'"),
])
def test_bad_arguments_name_argument_expectation_and_value(call, argument, expectation, received):
    with pytest.raises(gradnorm.HyperparameterError) as err:
        call()
    text = str(err.value)
    assert f"`{argument}`" in text and expectation in text and received in text


@pytest.mark.parametrize("step, kind", [(-1, ValueError), (1.0, TypeError), (True, TypeError),
                                        (np.zeros(2, np.int32), TypeError), (np.asarray(1.5), TypeError)])
def test_bad_steps(step, kind):
    with pytest.raises(kind, match="`step` of LinearWarmup"):
        linear_warmup(0.1, 3)(step)


def test_to_config_is_plain_data():
    assert linear_warmup(0.1, 7).to_config() == {"schedule": "LinearWarmup", "target": 0.1, "warmup_steps": 7,
                                                 "dtype": "float32"}
    assert zero_until(0.1, 3).to_config() == {"schedule": "ZeroUntil", "value": 0.1, "steps": 3}


# --------------------------------------------------------------------------------------------
# array steps: the same float32 values from every library's operations (traced too)


SCHEDULES = [linear_warmup(0.1, 7), linear_warmup(0.8, 49), zero_until(0.1, 4), constant(0.8),
             linear_warmup(0.1, 7, dtype="float64")]


@pytest.mark.parametrize("s", SCHEDULES, ids=repr)
def test_numpy_array_steps(s):
    """NumPy's default float is float64: constants exact; the float32 ramp's values are float32 numbers."""
    for t in range(0, 60, 3):
        got = s(np.asarray(t, dtype=np.int32))
        assert got.shape == ()
        assert float(got) == s(t)


@pytest.mark.parametrize("s", SCHEDULES, ids=repr)
def test_torch_tensor_steps(s):
    torch = pytest.importorskip("torch")
    for t in range(0, 60, 3):
        got = s(torch.tensor(t))
        assert isinstance(got, torch.Tensor) and got.shape == ()
        want = s(t) if (isinstance(s, LinearWarmup) and s.dtype == "float64") else float(F32(s(t)))
        assert got.item() == want


def test_jax_traced_steps_match_the_official_expression_under_jit():
    """Bit for bit against the official code's expression, ``base * jnp.minimum(1, step / w)`` with an int32
    step, compiled by XLA (float32, also with x64 enabled), for every step of several warm-ups."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    for w in WARMUPS:
        official = jax.jit(jax.vmap(lambda step, w=w: 0.1 * jnp.minimum(1, step / w)))
        ours = jax.jit(jax.vmap(linear_warmup(0.1, w)))
        steps = jnp.arange(0, w + 5, dtype=jnp.int32)
        want, got = np.asarray(official(steps)), np.asarray(ours(steps))
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got, np.array([hand_ramp32(0.1, w, t) for t in range(w + 5)], np.float32))


def test_jax_traced_zero_until_and_constant():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    steps = jnp.arange(8, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(zero_until(0.1, 3)))(steps)),
                                  np.array([0, 0, 0] + [0.1] * 5, dtype=np.asarray(jnp.asarray(0.0)).dtype))
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(constant(0.8)))(steps)),
                                  np.full(8, 0.8, dtype=np.asarray(jnp.asarray(0.0)).dtype))


def test_tensorflow_steps_in_and_out_of_tf_function():
    tf = pytest.importorskip("tensorflow")
    s = linear_warmup(0.1, 7)
    traced = tf.function(s)
    step = tf.Variable(0, dtype=tf.int64)
    for t in range(10):
        step.assign(t)
        assert float(traced(step).numpy()) == hand_ramp32(0.1, 7, t)
        assert float(s(tf.constant(t)).numpy()) == hand_ramp32(0.1, 7, t)
    assert traced.experimental_get_tracing_count() == 1
    z = tf.function(zero_until(0.1, 3))
    assert [float(z(tf.constant(t)).numpy()) for t in range(5)] == [0, 0, 0, float(F32(0.1)), float(F32(0.1))]


# --------------------------------------------------------------------------------------------
# GNP at zero strength: g after one evaluation, in every setting (issue 17, item 2)


A = np.diag([1.0, 2.0, 3.0])
X0 = np.array([1.0, -1.0, 0.5])


def quad(x):
    return 0.5 * x @ A @ x, A @ x


@pytest.mark.parametrize("mix", [False, True])
@pytest.mark.parametrize("norm_eps", [1e-12, 0.0])
@pytest.mark.parametrize("r, alpha", [(0.0, 0.8), (0.1, 0.0), (0.0, 0.0), ("array0", 0.8), (0.1, "array0"),
                                      ("array0", "array0.8")])
def test_gnp_zero_strength_is_the_gradient_after_one_evaluation(mix, norm_eps, r, alpha):
    value = {"array0": np.asarray(0.0), "array0.8": np.asarray(0.8)}
    r, alpha = value.get(r, r), value.get(alpha, alpha)
    calls = []

    def grad_fn(x):
        calls.append(x.copy())
        return quad(x)

    res = gradnorm.step(X0, grad_fn, rule="gnp", r=r, alpha=alpha, mix_unit_gradient=mix, norm_eps=norm_eps)
    np.testing.assert_array_equal(res.grad, A @ X0)
    assert res.info["grad_evals"] == 1 and len(calls) == 1


def test_gnp_r_zero_with_unit_mix_was_not_the_gradient():
    """Before issue 17, r = 0 with mix_unit_gradient gave (1 - alpha) g/||g|| + alpha g; that is far from g
    here, so the test above fails on the old behaviour."""
    g = A @ X0
    old = 0.2 * g / np.linalg.norm(g) + 0.8 * g
    assert np.linalg.norm(old - g) > 0.3
    res = gradnorm.step(X0, quad, rule="gnp", r=0.0, alpha=0.8, mix_unit_gradient=True)
    assert not np.allclose(res.grad, old)


@pytest.mark.parametrize("mix", [False, True])
def test_gnp_nonzero_array_strength_is_the_formula(mix):
    """A 0-d array strength that is not 0 takes the second pass: the closed form on a quadratic,
    d = (1 - alpha) first + alpha (g + r A g / ||g||) with first = g or g/||g||."""
    g = A @ X0
    n = np.linalg.norm(g) + 1e-12
    first = g / n if mix else g
    want = 0.2 * first + 0.8 * (g + 0.1 * A @ g / n)
    res = gradnorm.step(X0, quad, rule="gnp", r=np.asarray(0.1), alpha=np.asarray(0.8), mix_unit_gradient=mix)
    np.testing.assert_allclose(res.grad, want, rtol=1e-14)
    assert res.info["grad_evals"] == 2


def test_gnp_zero_strength_trajectory_with_unit_mix_is_sgd():
    """20 steps of gnp(r=0, mix_unit_gradient=True) with SGD are plain SGD, bit for bit (the official
    code's fallback); the old mix drifted away from it."""
    x_gnp, x_sgd, x_old = X0.copy(), X0.copy(), X0.copy()
    for _ in range(20):
        x_gnp = x_gnp - 0.1 * gradnorm.step(x_gnp, quad, rule="gnp", r=0.0, alpha=0.8, mix_unit_gradient=True).grad
        x_sgd = x_sgd - 0.1 * quad(x_sgd)[1]
        g = quad(x_old)[1]
        x_old = x_old - 0.1 * (0.2 * g / np.linalg.norm(g) + 0.8 * g)
    np.testing.assert_array_equal(x_gnp, x_sgd)
    assert np.linalg.norm(x_old - x_sgd) > 1e-2
