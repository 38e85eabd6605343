"""The rules run unchanged on every Array API library (DESIGN.md §3 and §5).

The two problems (a quadratic on two leaves and a logistic regression with a 0-d bias) are
written once against the Array API namespace of their inputs, so the very same ``grad_fn`` and
``hvp_fn`` serve NumPy, array-api-strict, PyTorch and JAX. Their data are rounded through
float32 once, so that float32 and float64 runs solve the same problem and a float32 run can be
compared with the float64 NumPy run directly.

torch, jax and array_api_strict are optional: their tests skip when the library is missing.
JAX float64 runs inside ``jax.enable_x64(True)``, a context manager, so the process-wide
``jax_enable_x64`` flag is never changed for other tests.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import array_api_compat
import numpy as np
import optree
import pytest

import gradnorm
from conformance.settings import settings

# --------------------------------------------------------------------------------------
# problems, written against the Array API


def _round32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(np.float64)


@functools.cache
def problem_data(name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(data, params)`` as float64 NumPy arrays that are exact in float32."""
    rng = np.random.default_rng(20260522 if name == "quadratic" else 7)
    if name == "quadratic":
        m = rng.standard_normal((5, 5))
        a = _round32(m @ m.T / 5 + 0.5 * np.eye(5))
        a = (a + a.T) / 2  # exactly symmetric (and still exact in float32)
        center = _round32(rng.standard_normal(5))
        data = {"A11": a[:3, :3], "A12": a[:3, 3:], "A21": a[3:, :3], "A22": a[3:, 3:]}
        data.update(cw=center[:3], cv=center[3:])
        x = _round32(center + rng.standard_normal(5))
        params = {"w": x[:3], "v": x[3:]}
    else:
        features = _round32(rng.standard_normal((16, 3)))
        labels = rng.choice([-1.0, 1.0], size=16)
        data = {"X": features, "y": labels}
        params = {"w": _round32(0.5 * rng.standard_normal(3)), "c": _round32(np.asarray(0.3))}
    return {k: np.array(v) for k, v in data.items()}, {k: np.array(v) for k, v in params.items()}


def minimizer_params() -> dict[str, np.ndarray]:
    """Parameters where the quadratic's gradient is exactly zero: A @ (x - c) = A @ 0."""
    data, _ = problem_data("quadratic")
    return {"w": data["cw"].copy(), "v": data["cv"].copy()}


def problem_fns(name: str, data: dict[str, Any]) -> tuple[Callable, Callable]:
    """``(grad_fn, hvp_fn)`` over the arrays in ``data`` (any Array API library)."""
    if name == "quadratic":
        a11, a12, a21, a22 = data["A11"], data["A12"], data["A21"], data["A22"]

        def apply(u, v):
            return a11 @ u + a12 @ v, a21 @ u + a22 @ v

        def grad_fn(p):
            xp = array_api_compat.array_namespace(p["w"], p["v"])
            dw, dv = p["w"] - data["cw"], p["v"] - data["cv"]
            gw, gv = apply(dw, dv)
            return 0.5 * (xp.sum(dw * gw) + xp.sum(dv * gv)), {"w": gw, "v": gv}

        def hvp_fn(p, t):
            hw, hv = apply(t["w"], t["v"])
            return {"w": hw, "v": hv}

        return grad_fn, hvp_fn

    features, labels = data["X"], data["y"]
    m = features.shape[0]

    def grad_fn(p):
        xp = array_api_compat.array_namespace(p["w"], p["c"])
        t = -labels * (features @ p["w"] + p["c"])
        loss = xp.mean(xp.logaddexp(xp.zeros_like(t), t))
        s = -labels / (1.0 + xp.exp(-t))  # -y sigmoid(t)
        return loss, {"w": features.T @ s / m, "c": xp.mean(s)}

    def hvp_fn(p, v):
        xp = array_api_compat.array_namespace(p["w"], p["c"])
        prob = 1.0 / (1.0 + xp.exp(-(features @ p["w"] + p["c"])))
        u = prob * (1.0 - prob) * (features @ v["w"] + v["c"])
        return {"w": features.T @ u / m, "c": xp.mean(u)}

    return grad_fn, hvp_fn


# --------------------------------------------------------------------------------------
# rules


# every rule and its variants (conformance/settings.py): flooding's levels put the loss above
# (descent) and below (ascent) them, coherent's thresholds keep the gate open, closed, and open it
# on the second step
CASES: list[tuple[str, dict[str, Any]]] = settings("backends")

# at a zero gradient, every setting with a norm that divides
ZERO_GRAD_CASES = CASES + settings("backends_zero_grad")

# one setting per rule, for the slower jit test
JIT_CASES = settings("backends_jit")


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    rule, hyper = case
    return rule + "".join(f"-{k}={v}" for k, v in hyper.items())


def _steps(rule: str) -> int:
    return 2 if rule == "coherent" else 1  # coherent: carry the state into a second step


def run_case(params: Any, grad_fn: Callable, hvp_fn: Callable, rule: str, hyper: dict[str, Any]) -> list[Any]:
    """The StepResults of ``_steps(rule)`` steps at ``params``, the state carried along."""
    results, state = [], None
    for _ in range(_steps(rule)):
        res = gradnorm.step(params, grad_fn, rule=rule, state=state, hvp_fn=hvp_fn, **hyper)
        results.append(res)
        state = res.state
    return results


# --------------------------------------------------------------------------------------
# backends


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, (bool, int, float)):
        return np.asarray(x)
    if array_api_compat.is_torch_array(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class Backend:
    """How to make arrays of one library and check what comes back."""

    def __init__(self, name: str):
        self.name = name
        if name == "numpy":
            self.module = np
        else:
            self.module = pytest.importorskip(name)

    def dtype(self, dtype_name: str) -> Any:
        if self.name == "torch":
            return getattr(self.module, dtype_name)
        if self.name == "jax":
            return getattr(self.module.numpy, dtype_name)
        return getattr(self.module, dtype_name)

    def context(self, dtype_name: str):
        if self.name == "jax" and dtype_name == "float64":
            return self.module.enable_x64(True)  # thread-local, restored on exit
        return contextlib.nullcontext()

    def asarray(self, a: np.ndarray, dtype_name: str) -> Any:
        dtype = self.dtype(dtype_name)
        if self.name == "numpy":
            return np.array(a, dtype=dtype)
        if self.name == "torch":
            return self.module.tensor(np.asarray(a), dtype=dtype)
        if self.name == "jax":
            return self.module.numpy.asarray(a, dtype=dtype)
        return self.module.asarray(np.asarray(a, dtype=np.dtype(dtype_name)), dtype=dtype)

    def tree(self, tree: Any, dtype_name: str) -> Any:
        return optree.tree_map(lambda a: self.asarray(a, dtype_name), tree)

    def is_leaf_type(self, x: Any) -> bool:
        if self.name == "numpy":
            return isinstance(x, (np.ndarray, np.generic))
        if self.name == "torch":
            return isinstance(x, self.module.Tensor)
        if self.name == "jax":
            return isinstance(x, self.module.Array)
        return array_api_compat.is_array_api_strict_namespace(array_api_compat.array_namespace(x))


@functools.cache
def numpy_reference(problem: str, case_index: int) -> list[tuple[Any, dict[str, Any], Any]]:
    """The float64 NumPy run of a case: per step ``(direction, info, state)`` as NumPy."""
    rule, hyper = CASES[case_index]
    data, params = problem_data(problem)
    grad_fn, hvp_fn = problem_fns(problem, data)
    return [_as_numpy(res) for res in run_case(params, grad_fn, hvp_fn, rule, hyper)]


def _as_numpy(res: Any) -> tuple[Any, dict[str, Any], Any]:
    return (
        optree.tree_map(to_numpy, res.grad),
        {k: v if isinstance(v, int) else to_numpy(v) for k, v in res.info.items()},
        optree.tree_map(to_numpy, res.state),
    )


def assert_tree_close(actual: Any, expected: Any, rtol: float, what: str) -> None:
    assert optree.tree_structure(actual) == optree.tree_structure(expected), what
    leaves_a, leaves_e = optree.tree_leaves(actual), optree.tree_leaves(expected)
    scale = max((float(np.max(np.abs(to_numpy(e)))) for e in leaves_e), default=0.0)
    for a, e in zip(leaves_a, leaves_e):
        np.testing.assert_allclose(to_numpy(a), e, rtol=rtol, atol=rtol * scale, err_msg=what)


def assert_state_close(actual: Any, expected: Any, rtol: float, what: str) -> None:
    """Counters exactly; floating leaves (the g_v buffers of a LookSAM-style rule) within `rtol` of the
    largest of their leaves."""
    assert optree.tree_structure(actual) == optree.tree_structure(expected), what
    leaves_a, leaves_e = optree.tree_leaves(actual), optree.tree_leaves(expected)
    floats = [e for e in leaves_e if np.issubdtype(np.asarray(e).dtype, np.floating)]
    scale = max((float(np.max(np.abs(e), initial=0.0)) for e in floats), default=0.0)
    for a, e in zip(leaves_a, leaves_e):
        if np.issubdtype(np.asarray(e).dtype, np.floating):
            np.testing.assert_allclose(to_numpy(a), e, rtol=rtol, atol=rtol * scale, err_msg=f"{what}: state")
        else:
            np.testing.assert_array_equal(to_numpy(a), e, err_msg=f"{what}: state")


def assert_info_close(actual: dict[str, Any], expected: dict[str, Any], rtol: float, what: str) -> None:
    assert set(actual) == set(expected), what
    for key, e in expected.items():
        a = actual[key]
        if isinstance(e, int):  # grad_evals, hvp_evals
            assert a == e, f"{what}: info[{key!r}]"
            continue
        a = to_numpy(a)
        if e.dtype == np.bool_:
            assert a.dtype == np.bool_ and bool(a) == bool(e), f"{what}: info[{key!r}]"
        else:
            atol = rtol * max(1.0, float(np.abs(e)))
            np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=f"{what}: info[{key!r}]")


TOLERANCE = {"float64": 1e-12, "float32": 1e-5}


# --------------------------------------------------------------------------------------
# every backend, every rule: the NumPy float64 result, in the input's type and dtype


# (backend, dtype, problem); NumPy float64 is the reference. JAX float32 runs the logistic
# problem only: eager JAX compiles every new (op, shape, dtype) once, the quadratic in float32
# would add seconds and no new code path (float32 JAX is also checked by the jit tests).
MATCH_COMBOS = [
    (b, d, p)
    for b in ("numpy", "array_api_strict", "torch", "jax")
    for d in ("float64", "float32")
    for p in ("quadratic", "logistic")
    if (b, d) != ("numpy", "float64") and (b, d, p) != ("jax", "float32", "quadratic")
]


@pytest.mark.parametrize("case_index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize(("backend_name", "dtype_name", "problem"), MATCH_COMBOS)
def test_matches_numpy(backend_name, dtype_name, problem, case_index):
    backend = Backend(backend_name)
    rule, hyper = CASES[case_index]
    expected = numpy_reference(problem, case_index)
    rtol = TOLERANCE[dtype_name]
    with backend.context(dtype_name):
        data, params = problem_data(problem)
        data, params = backend.tree(data, dtype_name), backend.tree(params, dtype_name)
        before = optree.tree_map(lambda a: to_numpy(a).copy(), params)
        grad_fn, hvp_fn = problem_fns(problem, data)
        results = run_case(params, grad_fn, hvp_fn, rule, hyper)
        dtype = backend.dtype(dtype_name)
        for i, (res, (direction, info, state)) in enumerate(zip(results, expected)):
            what = f"{backend_name} {dtype_name} {problem} {_case_id(CASES[case_index])} step {i}"
            for leaf in optree.tree_leaves(res.grad):
                assert backend.is_leaf_type(leaf), f"{what}: a leaf of type {type(leaf)}"
                assert leaf.dtype == dtype, f"{what}: a leaf of dtype {leaf.dtype}"
            assert_tree_close(res.grad, direction, rtol, what)
            assert_info_close(res.info, info, rtol, what)
            assert bool(to_numpy(res.info["finite"]))
            assert_state_close(res.state, state, rtol, what)
        # nothing was modified in place
        for a, b in zip(optree.tree_leaves(params), optree.tree_leaves(before)):
            assert np.array_equal(to_numpy(a), b), f"{backend_name}: params changed"


# --------------------------------------------------------------------------------------
# NumPy read-only arrays: no rule writes into params or into what grad_fn / hvp_fn return


def _read_only(tree: Any) -> Any:
    def freeze(a):
        a = np.array(a)  # a fresh array (np.float64 scalars become 0-d arrays)
        a.flags.writeable = False
        return a

    return optree.tree_map(freeze, tree)


@pytest.mark.parametrize("case_index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("problem", ["quadratic", "logistic"])
def test_numpy_read_only_inputs(problem, case_index):
    rule, hyper = CASES[case_index]
    data, params = problem_data(problem)
    grad_fn, hvp_fn = problem_fns(problem, _read_only(data))
    params = _read_only(params)
    before = optree.tree_map(np.copy, params)

    def frozen_grad_fn(p):
        loss, grads = grad_fn(p)
        return loss, _read_only(grads)

    def frozen_hvp_fn(p, v):
        return _read_only(hvp_fn(p, v))

    results = run_case(params, frozen_grad_fn, frozen_hvp_fn, rule, hyper)
    for a, b in zip(optree.tree_leaves(params), optree.tree_leaves(before)):
        assert not a.flags.writeable
        assert np.array_equal(a, b)
    for res, (direction, _, _) in zip(results, numpy_reference(problem, case_index)):
        assert_tree_close(res.grad, direction, 1e-15, "read-only")


# --------------------------------------------------------------------------------------
# a zero gradient never gives NaN


@pytest.mark.parametrize("case_index", range(len(ZERO_GRAD_CASES)), ids=[_case_id(c) for c in ZERO_GRAD_CASES])
@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
@pytest.mark.parametrize("backend_name", ["numpy", "array_api_strict", "torch", "jax"])
def test_zero_gradient_gives_finite_directions(backend_name, dtype_name, case_index):
    backend = Backend(backend_name)
    rule, hyper = ZERO_GRAD_CASES[case_index]
    with backend.context(dtype_name):
        data, _ = problem_data("quadratic")
        data, params = backend.tree(data, dtype_name), backend.tree(minimizer_params(), dtype_name)
        grad_fn, hvp_fn = problem_fns("quadratic", data)
        _, g0 = grad_fn(params)
        assert all(not np.any(to_numpy(leaf)) for leaf in optree.tree_leaves(g0)), "the gradient must be exactly 0"
        for res in run_case(params, grad_fn, hvp_fn, rule, hyper):
            leaves = [to_numpy(leaf) for leaf in optree.tree_leaves(res.grad)]
            assert all(np.all(np.isfinite(leaf)) for leaf in leaves), f"non-finite direction: {leaves}"
            assert bool(to_numpy(res.info["finite"]))
            for key, value in res.info.items():
                if not isinstance(value, int):
                    assert np.all(np.isfinite(to_numpy(value))), f"info[{key!r}] = {value}"
            if rule != "coherent":
                # every perturbation point is the minimizer itself: the direction is 0
                assert all(not np.any(leaf) for leaf in leaves), f"{leaves}"


# --------------------------------------------------------------------------------------
# dtype preservation in NumPy float32


@pytest.mark.parametrize("case_index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
@pytest.mark.parametrize("problem", ["quadratic", "logistic"])
def test_numpy_float32_stays_float32(problem, case_index):
    rule, hyper = CASES[case_index]
    data, params = problem_data(problem)
    as32 = functools.partial(optree.tree_map, lambda a: np.asarray(a, dtype=np.float32))
    grad_fn, hvp_fn = problem_fns(problem, as32(data))
    for res in run_case(as32(params), grad_fn, hvp_fn, rule, hyper):
        for leaf in optree.tree_leaves(res.grad):
            assert leaf.dtype == np.float32
        assert res.info["finite"].dtype == np.bool_ and bool(res.info["finite"])


# --------------------------------------------------------------------------------------
# under jax.jit


def _jit_step(jax, rule: str, hyper: dict[str, Any], grad_fn: Callable, hvp_fn: Callable, traces: list) -> Callable:
    @jax.jit
    def jitted(params, state):
        traces.append(None)  # runs only while tracing
        res = gradnorm.step(params, grad_fn, rule=rule, state=state, hvp_fn=hvp_fn, **hyper)
        info = {k: v for k, v in res.info.items() if isinstance(v, jax.Array)}
        return res.grad, res.loss, res.state, info

    return jitted


@pytest.mark.parametrize("case", JIT_CASES, ids=[_case_id(c) for c in JIT_CASES])
def test_jax_jit_matches_eager_and_does_not_retrace(case):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rule, hyper = case
    data, params = problem_data("logistic")
    backend = Backend("jax")
    # grad_fn and hvp_fn in jax.numpy (the namespace of the arrays), closing over the data
    grad_fn, hvp_fn = problem_fns("logistic", backend.tree(data, "float32"))
    traces: list = []
    jitted = _jit_step(jax, rule, hyper, grad_fn, hvp_fn, traces)

    params = backend.tree(params, "float32")
    state = gradnorm.rules.get(rule, **hyper).init(params)
    eager_state = state
    for call in range(2):
        direction, loss, state, info = jitted(params, state)
        eager = gradnorm.step(params, grad_fn, rule=rule, state=eager_state, hvp_fn=hvp_fn, **hyper)
        eager_state = eager.state
        what = f"jit {_case_id(case)} call {call}"
        for leaf in optree.tree_leaves(direction):
            assert isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32, what
        assert_tree_close(direction, optree.tree_map(to_numpy, eager.grad), 1e-5, what)
        np.testing.assert_allclose(to_numpy(loss), to_numpy(eager.loss), rtol=1e-6, err_msg=what)
        assert_state_close(state, optree.tree_map(to_numpy, eager.state), 1e-5, what)
        # the evaluations spent: a Python int eagerly, a traced count where a branch decides them (periodic)
        counts = ("grad_evals", "hvp_evals")
        for key in counts:
            if key in info:
                assert int(info[key]) == eager.info[key], f"{what}: info[{key!r}]"
        assert {k for k in info if k not in counts} == {
            k for k, v in eager.info.items() if isinstance(v, jax.Array) and k not in counts}, what
        for key, value in info.items():
            if key in counts:
                continue
            expected = to_numpy(eager.info[key])
            if expected.dtype == np.bool_:
                assert bool(to_numpy(value)) == bool(expected), f"{what}: info[{key!r}]"
            else:
                np.testing.assert_allclose(to_numpy(value), expected, rtol=1e-5, atol=1e-6, err_msg=f"{what}: {key}")
        # new parameters of the same shapes and dtypes: no retrace (made in NumPy, so that
        # the eager run reuses the kernels JAX compiled for the first call)
        params = backend.tree({k: to_numpy(v) - 0.1 * to_numpy(direction[k]) for k, v in params.items()}, "float32")
    assert len(traces) == 1, f"traced {len(traces)} times"


@pytest.mark.parametrize("case_index", [2, 6, 9], ids=[_case_id(CASES[i]) for i in (2, 6, 9)])
def test_jax_jit_with_autodiff_oracle_matches_numpy(case_index):
    """The usual JAX setup: grad_fn = jax.value_and_grad(loss), hvp_fn by forward-over-reverse."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rule, hyper = CASES[case_index]
    data, params = problem_data("logistic")
    features, labels = jnp.asarray(data["X"], dtype=jnp.float32), jnp.asarray(data["y"], dtype=jnp.float32)

    def loss_fn(p):
        return jnp.mean(jnp.logaddexp(0.0, -labels * (features @ p["w"] + p["c"])))

    def hvp_fn(p, v):
        return jax.jvp(jax.grad(loss_fn), (p,), (v,))[1]

    traces: list = []
    jitted = _jit_step(jax, rule, hyper, jax.value_and_grad(loss_fn), hvp_fn, traces)
    params = Backend("jax").tree(params, "float32")
    direction, loss, _, info = jitted(params, gradnorm.rules.get(rule, **hyper).init(params))
    expected_direction, expected_info, _ = numpy_reference("logistic", case_index)[0]
    assert_tree_close(direction, expected_direction, 1e-5, _case_id(CASES[case_index]))
    np.testing.assert_allclose(to_numpy(loss), expected_info["loss"], rtol=1e-6)
    jitted(optree.tree_map(lambda a: a + 0.01, params), gradnorm.rules.get(rule, **hyper).init(params))
    assert len(traces) == 1
