"""gradnorm.jax.diagnostics: the Hessian's top eigenvalues equal the dense eigendecomposition of
jax.hessian, the trace estimates are within their standard error of the exact trace, jitted equals
eager, the lax.scan loops equal the core's unrolled algorithms on the same probes, the NumPy core
with hand-written derivatives gives the same numbers on the same probes, determinism given a key,
the optax monitor (values at the measured steps, trajectory unchanged bit for bit), clear errors.

Float64 checks run inside `jax.enable_x64(True)` contexts (the `f64` fixture); the global flag is
never flipped."""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

from jax.flatten_util import ravel_pytree

import gradnorm
import gradnorm.diagnostics as core
import gradnorm.jax as gj
from conformance.problems import PROBLEMS
from tests._jax import COMPILES, full_float32_matmuls, x64  # noqa: F401  (the fixture is autouse)

gd = gj.diagnostics
MLP = PROBLEMS["mlp"]  # a 4-8-6-3 tanh perceptron, 115 parameters, hand-written NumPy gradient and HVP


@pytest.fixture
def f64():
    with x64():
        yield


def loss_fn(params, X, Y):
    return MLP.loss(jnp, params, {"X": X, "Y": Y})


def problem(dtype=jnp.float64):
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), MLP.params0())
    return params, jnp.asarray(MLP.data["X"], dtype), jnp.asarray(MLP.data["Y"], dtype)


@functools.cache
def exact_hessian():
    """The dense Hessian, column by column from the hand-written NumPy HVP (float64), in the leaf order
    of `ravel_pytree` (dict keys sorted: b before w)."""
    params = MLP.params0()
    flat, unravel = ravel_pytree(params)
    to_np = lambda tree: jax.tree_util.tree_map(np.asarray, tree)
    columns = [ravel_pytree(MLP.hvp(params, to_np(unravel(e)), MLP.data))[0] for e in np.eye(flat.size)]
    H = np.stack([np.asarray(c) for c in columns], axis=1)
    assert np.allclose(H, H.T, atol=1e-12)
    return H


def exact_spectrum():
    return np.linalg.eigvalsh(exact_hessian())  # ascending


class Wrapped:
    """JaxProbes behind another type: the diagnostics then run the core's unrolled loops, on the very
    draws the lax.scan loops make."""

    def __init__(self, key):
        self.inner = gd.JaxProbes(key)

    def rademacher(self, like):
        return self.inner.rademacher(like)

    def normal(self, like):
        return self.inner.normal(like)


# the eager results the exactness tests check and the jit test compares with (computed once)


def _eig(params, X, Y):
    return gd.hessian_eigenvalues(loss_fn, params, X, Y, k=3, iters=60)


def _hutchinson(params, X, Y):
    return gd.hessian_trace(loss_fn, params, X, Y, samples=200, seed=3)


def _hutch_pp(params, X, Y):
    return gd.hessian_trace(loss_fn, params, X, Y, samples=60, method="hutch++", seed=3)


def _density(params, X, Y):  # iters = P: the Ritz values are the whole spectrum
    return gd.spectral_density(loss_fn, params, X, Y, runs=2, iters=115, seed=1)


EAGER = {}


def eager(fn):
    if fn not in EAGER:
        with x64():
            EAGER[fn] = fn(*problem())
    return EAGER[fn]


# ----------------------------------------------------------------------------------------------
# exactness


def test_top_eigenvalues_and_vectors_equal_the_dense_eigendecomposition(f64):
    H, spectrum = exact_hessian(), exact_spectrum()
    res = eager(_eig)
    assert isinstance(res, core.EigenResult) and res.method == "exact" and res.iterations == 60
    np.testing.assert_allclose(np.asarray(res.eigenvalues), spectrum[::-1][:3], rtol=0, atol=1e-8)
    assert bool(jnp.all(res.converged)) and float(jnp.max(res.residuals)) < 1e-8
    for value, vector in zip(np.asarray(res.eigenvalues), res.eigenvectors):
        v = np.asarray(ravel_pytree(vector)[0])
        assert abs(np.linalg.norm(v) - 1) < 1e-10
        np.testing.assert_allclose(H @ v, value * v, atol=1e-7)


@pytest.mark.parametrize("fn", [_hutchinson, _hutch_pp], ids=["hutchinson", "hutch++"])
def test_trace_is_within_four_standard_errors_of_the_exact_trace(f64, fn):
    res = eager(fn)
    exact = float(np.trace(exact_hessian()))
    assert res.matvecs == (200 if fn is _hutchinson else 60) and np.isfinite(float(res.stderr))
    assert abs(float(res.trace) - exact) <= 4 * float(res.stderr), (float(res.trace), exact, float(res.stderr))


def test_density_with_p_steps_has_the_whole_spectrum_as_nodes(f64):
    spectrum = exact_spectrum()
    res = eager(_density)
    assert res.nodes.shape == (2, 115) and res.size == 115
    for nodes in np.asarray(res.nodes):  # through the Lanczos breakdowns (restarts) too
        np.testing.assert_allclose(np.sort(nodes), spectrum, atol=1e-8)
    np.testing.assert_allclose(np.asarray(res.weights).sum(axis=1), 1.0, rtol=1e-12)
    grid = np.linspace(spectrum.min() - 1, spectrum.max() + 1, 4001)
    assert np.trapezoid(res.density(grid, 0.05), grid) == pytest.approx(1.0, rel=1e-6)


def test_first_order_measures_equal_their_definitions(f64):
    params, X, Y = problem()
    g = jax.grad(loss_fn)(params, X, Y)
    gnorm = float(jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree_util.tree_leaves(g))))
    assert float(gd.gradient_norm(loss_fn, params, X, Y)) == pytest.approx(gnorm, rel=1e-12)
    rho = 0.05
    moved = jax.tree_util.tree_map(lambda p, d: p + rho / gnorm * d, params, g)
    sharp = float(loss_fn(moved, X, Y) - loss_fn(params, X, Y))
    assert float(gd.sam_sharpness(loss_fn, params, X, Y, rho=rho)) == pytest.approx(sharp, rel=1e-10)
    flat = eager(_flatness)
    norms = np.asarray(flat.grad_norms)
    assert norms[0] == pytest.approx(gnorm, rel=1e-12) and float(flat.flatness) == pytest.approx(rho * norms.max())
    delta = ravel_pytree(flat.perturbation)[0]
    assert float(jnp.linalg.norm(delta)) == pytest.approx(rho, rel=1e-10)


# ----------------------------------------------------------------------------------------------
# jit, the scan loops, the core


def _flatness(params, X, Y):
    return gd.first_order_flatness(loss_fn, params, X, Y, rho=0.05, steps=3)


def test_jit_equals_eager_and_results_are_pytrees(f64):
    fns = (_eig, _hutchinson, _flatness)  # hutch++ and the density run jitted in the next test
    jitted = jax.jit(lambda *a: tuple(fn(*a) for fn in fns))(*problem())
    for fn, got in zip(fns, jitted):
        want = eager(fn)
        assert type(got) is type(want) and jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12, err_msg=fn.__name__)
    assert jitted[0].iterations == 60 and jitted[1].method == "hutchinson" and jitted[2].method == "exact"


def test_scan_loops_equal_the_core_loops_on_the_same_draws(f64):
    """The adapter's lax.scan loops (under jit here) against the core's Python loops (eager, unrolled)
    fed the same JaxProbes draws."""
    params, X, Y = problem()

    def both(probes):
        return (gd.hessian_eigenvalues(loss_fn, params, X, Y, k=2, iters=12, which="LM", probes=probes),
                gd.hessian_trace(loss_fn, params, X, Y, samples=7, method="hutch++", probes=probes),
                gd.spectral_density(loss_fn, params, X, Y, runs=2, iters=6, probes=probes))

    scan = jax.jit(lambda key: both(gd.JaxProbes(key)))(jax.random.key(7))
    unrolled = both(Wrapped(jax.random.key(7)))
    assert scan[1].method == "hutch++" and scan[2].size == 115
    for a, b in zip(jax.tree_util.tree_leaves(scan), jax.tree_util.tree_leaves(unrolled)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)


def test_numpy_core_with_hand_derivatives_gives_the_same_numbers(f64):
    """The NumPy core on the hand-written gradient and HVP, and the JAX adapter, on the same probes:
    the same eigenvalues and the same trace estimate."""
    params, X, Y = problem()
    np_params = MLP.params0()
    ref = core.hessian_eigenvalues(np_params, MLP.grad_fn(), hvp_fn=MLP.hvp_fn(), k=3, iters=40, seed=0)
    got = gd.hessian_eigenvalues(loss_fn, params, X, Y, k=3, iters=40, probes=core.NumpyProbes(0))
    np.testing.assert_allclose(np.asarray(got.eigenvalues), ref.eigenvalues, rtol=0, atol=1e-10)
    np.testing.assert_allclose(ref.eigenvalues, exact_spectrum()[::-1][:3], atol=1e-8)
    ref_tr = core.hessian_trace(np_params, MLP.grad_fn(), hvp_fn=MLP.hvp_fn(), samples=5, seed=4)
    got_tr = gd.hessian_trace(loss_fn, params, X, Y, samples=5, probes="numpy", seed=4)
    np.testing.assert_allclose(np.asarray(got_tr.samples), ref_tr.samples, rtol=1e-11)


def test_deterministic_given_a_key_and_the_key_is_an_input_of_the_program(f64):
    params, X, Y = problem()
    a = gd.hessian_trace(loss_fn, params, X, Y, samples=6, seed=11)  # seed=11: the key jax.random.key(11)
    traced = jax.jit(functools.partial(gd.hessian_trace, loss_fn, samples=6))
    first = traced(params, X, Y, key=jax.random.key(11))
    before = COMPILES[0]
    second = traced(params, X, Y, key=jax.random.key(12))
    assert COMPILES[0] == before, "a new key must not recompile: the probes are drawn by the program"
    np.testing.assert_allclose(np.asarray(first.samples), np.asarray(a.samples), rtol=1e-12)
    assert not np.allclose(np.asarray(second.samples), np.asarray(a.samples))


def test_float32_pytrees_has_aux_and_finite_differences(f64):
    params, X, Y = problem()
    top = exact_spectrum()[-1]

    def with_aux(p, X, Y):
        return loss_fn(p, X, Y), {"note": jnp.ones(2)}

    fd = gd.hessian_eigenvalues(with_aux, params, X, Y, iters=30, has_aux=True, hvp="fd")
    assert fd.method == "fd" and float(fd.eigenvalues[0]) == pytest.approx(top, rel=1e-7)
    p32, X32, Y32 = problem(jnp.float32)  # float32 parameters: vectors and reductions in float32
    res32 = gd.hessian_eigenvalues(loss_fn, p32, X32, Y32, iters=30)
    assert res32.eigenvalues.dtype == jnp.float32
    assert jax.tree_util.tree_leaves(res32.eigenvectors)[0].dtype == jnp.float32
    assert float(res32.eigenvalues[0]) == pytest.approx(top, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# the optax monitor


def _train(tx, params, X, Y, steps):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params, X, Y)
        updates, state = tx.update(grads, state, params, value=loss, loss_fn=lambda p: loss_fn(p, X, Y))
        return optax.apply_updates(params, updates), state

    seen, states = [params], []
    for _ in range(steps):
        params, state = step(params, state)
        seen.append(params)
        states.append(state)
    return seen, states


def test_monitor_measures_every_n_steps_and_leaves_the_trajectory_unchanged(f64):
    params, X, Y = problem()
    quantities = ("loss", "grad_norm", "sam_sharpness", "lambda_max")
    options = dict(iters=20)
    mon = gd.monitor(3, quantities, seed=2, **options)
    with_monitor = gj.transform(optax.chain(mon, optax.sgd(0.1, momentum=0.9)), rule="sam", rho=0.05)
    plain = gj.transform(optax.sgd(0.1, momentum=0.9), rule="sam", rho=0.05)
    seen, states = _train(with_monitor, params, X, Y, 4)
    seen_plain, _ = _train(plain, params, X, Y, 4)
    for a, b in zip(seen, seen_plain):  # bit for bit
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    initial = gd.monitor_state(with_monitor.init(params))
    assert int(initial.measured_at) == -1 and all(np.isnan(float(v)) for v in initial.diagnostics.values())
    for i, state in enumerate(states):  # the update of step i (params seen[i]) measures when i % 3 == 0
        ms = gd.monitor_state(state)
        assert int(ms.count) == i + 1 and int(ms.measured_at) == 3 * (i // 3) and set(ms.diagnostics) == set(quantities)
    for at, state in [(0, states[2]), (3, states[3])]:  # the values kept are those at `params` of that update
        ms = gd.monitor_state(state)
        want = gd.measure(loss_fn, seen[at], X, Y, quantities=quantities, seed=2, **options)
        for name in quantities:
            assert float(ms.diagnostics[name]) == pytest.approx(float(want[name]), rel=1e-9, abs=1e-12), (at, name)
    assert optax.tree_utils.tree_get(states[-1], "diagnostics") is not None


def test_monitor_in_a_plain_optax_chain():
    """float32, outside any gradnorm rule: the first entry of an optax chain, reading `loss_fn`."""
    params, X, Y = problem(jnp.float32)
    tx = optax.chain(gd.monitor(2, ("grad_norm",)), optax.adam(1e-2))
    seen, states = _train(tx, params, X, Y, 3)
    ms = gd.monitor_state(states[-1])
    assert int(ms.measured_at) == 2 and ms.diagnostics["grad_norm"].dtype == jnp.float32
    want = optax.tree.norm(jax.grad(loss_fn)(seen[2], X, Y))
    assert float(ms.diagnostics["grad_norm"]) == pytest.approx(float(want), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# errors


def test_clear_errors(f64):
    params, X, Y = problem()
    with pytest.raises(ValueError, match="`k` must be at most the number of parameters"):
        gd.hessian_eigenvalues(loss_fn, params, X, Y, k=116)
    with pytest.raises(ValueError, match="`k` must be an int >= 1"):
        gd.hessian_eigenvalues(loss_fn, params, X, Y, k=0)
    with pytest.raises(ValueError, match="`which` must be one of"):
        gd.hessian_eigenvalues(loss_fn, params, X, Y, which="largest")
    with pytest.raises(ValueError, match="`iters` must be an int >= 3"):
        gd.hessian_eigenvalues(loss_fn, params, X, Y, k=3, iters=2)
    with pytest.raises(ValueError, match="`method` must be one of"):
        gd.hessian_trace(loss_fn, params, X, Y, method="exact")
    with pytest.raises(ValueError, match="`samples` must be an int >= 3"):
        gd.hessian_trace(loss_fn, params, X, Y, samples=2, method="hutch++")
    with pytest.raises(ValueError, match="`quantities` must be a sequence of names"):
        gd.measure(loss_fn, params, X, Y, quantities=("lambda_min",))
    with pytest.raises(ValueError, match="`rho` must be a positive finite number"):
        gd.sam_sharpness(loss_fn, params, X, Y, rho=-1.0)
    with pytest.raises(ValueError, match="`hvp` of gradnorm.jax.diagnostics.hessian_trace must be one of"):
        gd.hessian_trace(loss_fn, params, X, Y, hvp="analytic")
    with pytest.raises(TypeError, match="pass at most one of `key` and `seed`"):
        gd.hessian_trace(loss_fn, params, X, Y, key=jax.random.key(0), seed=1)
    with pytest.raises(TypeError, match="`key` and `seed` are for the default probes"):
        gd.hessian_trace(loss_fn, params, X, Y, seed=1, probes=core.NumpyProbes(1))
    with pytest.raises(TypeError, match="with probes='numpy' pass `seed`"):
        gd.hessian_trace(loss_fn, params, X, Y, key=jax.random.key(0), probes="numpy")
    with pytest.raises(ValueError, match="`probes` of .* must be 'jax', 'numpy' or an object"):
        gd.hessian_trace(loss_fn, params, X, Y, probes="torch")
    with pytest.raises(TypeError, match="`key` must be a PRNG key"):
        gd.hessian_trace(loss_fn, params, X, Y, key="0")
    with pytest.raises(TypeError, match="`seed` must be a non-negative int"):
        gd.hessian_trace(loss_fn, params, X, Y, seed=-1)
    with pytest.raises(TypeError, match="`probes` of .* must be 'jax', 'numpy' or an object with `rademacher"):
        gd.hessian_trace(loss_fn, params, X, Y, probes=object())
    with pytest.raises(TypeError, match="`loss_fn` of .* must be a callable"):
        gd.gradient_norm(None, params, X, Y)
    with pytest.raises(gradnorm.ClosureError, match="must return a scalar"):
        gd.gradient_norm(lambda p, X, Y: jnp.ones(3), params, X, Y)
    with pytest.raises(gradnorm.ClosureError, match="pass `has_aux=True`"):
        gd.gradient_norm(lambda p, X, Y: (loss_fn(p, X, Y), 1), params, X, Y)
    with pytest.raises(gradnorm.ParamsError):
        gd.gradient_norm(loss_fn, {"w": jnp.arange(3)}, X, Y)
    traced_k = jax.jit(lambda params, k: gd.hessian_eigenvalues(loss_fn, params, X, Y, k=k).eigenvalues)
    with pytest.raises(TypeError, match="`k` must be a Python int, static under jax.jit"):
        traced_k(params, 2)


def test_monitor_errors(f64):
    params, X, Y = problem()
    with pytest.raises(ValueError, match="`every` must be an int >= 1"):
        gd.monitor(0)
    with pytest.raises(ValueError, match="`quantities` of gradnorm.jax.diagnostics.monitor"):
        gd.monitor(5, "lambda_max")
    with pytest.raises(TypeError, match="pass at most one of `key` and `seed`"):
        gd.monitor(5, key=jax.random.key(0), seed=1)
    tx = gd.monitor(5)
    state = tx.init(params)
    with pytest.raises(TypeError, match="needs `loss_fn=lambda p: loss"):
        tx.update(params, state, params)
    with pytest.raises(TypeError, match="needs `params`"):
        tx.update(params, state, loss_fn=lambda p: loss_fn(p, X, Y))
    with pytest.raises(TypeError, match="must be the MonitorState"):
        tx.update(params, (), params, loss_fn=lambda p: loss_fn(p, X, Y))
    with pytest.raises(ValueError, match="exactly one gradnorm.jax.diagnostics.monitor state"):
        gd.monitor_state(optax.sgd(0.1).init(params))
