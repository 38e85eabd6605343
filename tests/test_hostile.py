"""Every promise holds under hostile input (issue 12, part 6).

1. A zero gradient never gives NaN, in float16, bfloat16, float32 and float64, for every rule, in
   the core (NumPy, PyTorch tensors), the PyTorch optimizer and functional step, the JAX step, the
   TensorFlow step and Keras ``fit``: a scalar such as ``rho / (||g|| + 1e-12)`` saturates at the
   leaf dtype's largest finite value instead of overflowing to ``inf`` (``inf * 0`` is NaN). A huge
   gradient gives a finite direction or a step reported non-finite, never silent NaN weights.
2. The evaluation points and the direction keep every leaf's dtype, with NumPy 0-d hyperparameters
   (float64) and trees that mix float32 and float64 leaves.
3. ``gradnorm.tf.step`` refuses a loss scale that is not finite, not positive or not a float32.
4. A 0-d hyperparameter array of another array library than the parameters is refused, naming it,
   before anything runs.
5. A ``PerLeaf`` of the wrong length is refused also when its values are all equal.
6. A complex loss is refused by the core and by every adapter.
7. ``coherent`` takes a NumPy integer ``delay``.
8. Bad ``step`` arguments of the PyTorch optimizer, a missing oracle and a non-scalar closure loss
   fail clearly before anything changes.

Each framework is imported inside the tests that need it (``pytest.importorskip``), so the NumPy
cases run wherever gradnorm does.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import gradnorm
from gradnorm import HyperparameterError, OracleOutputError, PerLeaf
from conformance.settings import ids, settings

# --------------------------------------------------------------------------------------------
# settings: every rule and variant, plus every setting that divides by a norm


def _unique(pairs):
    out, seen = [], set()
    for rule, hyper in pairs:
        key = (rule, tuple(sorted(hyper.items())))
        if key not in seen:
            seen.add(key)
            out.append((rule, hyper))
    return out


ALL_SETTINGS = _unique(
    settings("adapter")
    + settings("backends_zero_grad")
    + [
        ("sam", {"rho": 0.05, "adaptive": True}),
        ("gnp", {"r": 0.05, "alpha": 1.0}),
        ("fd_gr", {"gamma": 0.1, "eps": 0.01, "normalize": True}),
        ("fd_gr", {"gamma": 0.1, "eps": 0.01, "difference": "backward", "normalize": True}),
        ("gam", {"adaptive": True}),
    ]
)
ALL_IDS = ids(ALL_SETTINGS)

DTYPES = ["float16", "bfloat16", "float32", "float64"]
NP_DTYPES = ["float16", "float32", "float64"]  # NumPy has no bfloat16 (PyTorch, JAX and TF cover it)

# the point: nonzero weights (ASAM's |theta| + eta is not zero), a 0-d leaf
P0 = {"w": [1.0, -2.0, 0.5], "b": 0.25}


def assert_no_nan_info(info, where):
    """No floating info entry is NaN (an inf step size at a zero gradient would be a finite direction's
    business; a NaN is never acceptable)."""
    for key, value in info.items():
        if isinstance(value, (int, bool)) or value is None:
            continue
        v = np.asarray(_to_numpy(value), dtype=np.float64)
        assert not np.isnan(v).any(), f"{where}: info[{key!r}] is NaN"

def assert_finite_result(res, dtype_of, where):
    """A finite direction in each leaf's dtype, `info["finite"]` true and no NaN in `info`."""
    assert finite_tree(res.grad), f"{where}: {res.grad}"
    assert all(res.grad[k].dtype == dtype_of for k in res.grad), where
    assert bool(res.info["finite"]), where
    assert_no_nan_info(res.info, where)



def _to_numpy(x):
    if hasattr(x, "detach"):  # torch
        return x.detach().double().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # tf
        x = x.numpy()
    x = np.asarray(x)
    return x.astype(np.float64) if x.dtype.kind == "V" or str(x.dtype) == "bfloat16" else x


def finite_tree(tree):
    leaves = tree.values() if isinstance(tree, dict) else tree
    return all(np.isfinite(np.asarray(_to_numpy(v), dtype=np.float64)).all() for v in leaves)


# --------------------------------------------------------------------------------------------
# 1. a zero gradient never gives NaN


def _np_problem(dtype):
    """L = 0.5 ||p - p0||^2 at p = p0: the gradient (p - p0) is zero there and NaN at a NaN point."""
    p0 = {"w": np.asarray(P0["w"], dtype), "b": np.asarray(P0["b"], dtype)}

    def grad_fn(p):
        d = {k: (p[k] - p0[k]).astype(dtype) for k in p}
        return np.asarray(sum(0.5 * float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()), dtype), d

    def hvp_fn(p, v):
        return {k: np.array(x, copy=True) for k, x in v.items()}

    return {k: v.copy() for k, v in p0.items()}, grad_fn, hvp_fn


@pytest.mark.parametrize("rule,hyper", ALL_SETTINGS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", NP_DTYPES)
def test_zero_gradient_core_numpy(dtype, rule, hyper):
    dt = np.dtype(dtype)
    params, grad_fn, hvp_fn = _np_problem(dt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an overflow in NumPy is a warning: fail on it
        res = gradnorm.step(params, grad_fn, rule=rule, hvp_fn=hvp_fn, **hyper)
    assert_finite_result(res, dt, f"{rule} {hyper} {dtype}")


def _torch_dtype(torch, name):
    return getattr(torch, name)


def _torch_quadratic(torch, dtype):
    p0 = {"w": torch.tensor(P0["w"], dtype=dtype), "b": torch.tensor(P0["b"], dtype=dtype)}

    def loss(p):
        return sum(0.5 * ((p[k] - p0[k]) ** 2).sum() for k in p)

    return p0, loss


@pytest.mark.parametrize("rule,hyper", ALL_SETTINGS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradient_core_torch_tensors(dtype, rule, hyper):
    torch = pytest.importorskip("torch")
    dt = _torch_dtype(torch, dtype)
    p0, loss = _torch_quadratic(torch, dt)

    def grad_fn(p):
        with torch.enable_grad():
            q = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            value = loss(q)
            grads = torch.autograd.grad(value, list(q.values()))
        return value.detach(), dict(zip(q, grads))

    res = gradnorm.step({k: v.clone() for k, v in p0.items()}, grad_fn, rule=rule,
                        hvp_fn=lambda p, v: {k: x.clone() for k, x in v.items()}, **hyper)
    assert_finite_result(res, dt, f"{rule} {hyper} {dtype}")


@pytest.mark.parametrize("rule,hyper", ALL_SETTINGS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradient_torch_functional_step(dtype, rule, hyper):
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gtorch

    dt = _torch_dtype(torch, dtype)
    p0, loss = _torch_quadratic(torch, dt)
    res = gtorch.step({k: v.clone() for k, v in p0.items()}, loss, rule=rule, **hyper)
    assert_finite_result(res, dt, f"{rule} {hyper} {dtype}")


def _torch_closure_problem(torch, dt, scale=None):
    """Parameters at p0 (or p0 + a gradient of `scale`), and an LBFGS-style closure of the quadratic."""
    p0 = [torch.tensor(P0["w"], dtype=dt), torch.tensor(P0["b"], dtype=dt)]
    shift = [torch.zeros_like(t) for t in p0] if scale is None else [torch.full_like(t, scale) for t in p0]
    params = [torch.nn.Parameter((t + s).clone()) for t, s in zip(p0, shift)]
    holder = {}

    def closure(create_graph=False):
        holder["opt"].zero_grad()
        value = sum(0.5 * ((p - t) ** 2).sum() for p, t in zip(params, p0))
        value.backward(create_graph=create_graph)
        return value

    return params, closure, holder


@pytest.mark.parametrize("rule,hyper", ALL_SETTINGS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradient_torch_optimizer(dtype, rule, hyper):
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gtorch

    dt = _torch_dtype(torch, dtype)
    params, closure, holder = _torch_closure_problem(torch, dt)
    before = [p.detach().clone() for p in params]
    opt = holder["opt"] = gtorch.Optimizer(params, torch.optim.SGD, rule=rule, lr=0.1, info_norms=True, **hyper)
    opt.step(closure)
    assert bool(opt.last_info["finite"]), f"{rule} {hyper} {dtype}: {opt.last_info}"
    assert_no_nan_info(opt.last_info, f"{rule} {hyper} {dtype}")
    for p, b in zip(params, before):
        assert p.dtype == dt and torch.isfinite(p).all()
        if rule != "coherent":  # coherent's regularizer moves the weights; every other direction is 0 here
            assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("rule,hyper", ALL_SETTINGS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradient_jax_step(dtype, rule, hyper):
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    import gradnorm.jax as gj

    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        p0 = {"w": jnp.asarray(P0["w"], dt), "b": jnp.asarray(P0["b"], dt)}

        def loss_fn(p):
            return sum(0.5 * jnp.sum((p[k] - p0[k]) ** 2) for k in p)

        for fn in (gj.step, jax.jit(lambda p: gj.step(p, loss_fn, rule=rule, **hyper))):
            res = fn(p0, loss_fn, rule=rule, **hyper) if fn is gj.step else fn(p0)
            assert_finite_result(res, dt, f"{rule} {hyper} {dtype}")


@pytest.mark.parametrize("rule,hyper", ALL_SETTINGS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradient_tf_step(dtype, rule, hyper):
    tf = pytest.importorskip("tensorflow")
    gt = pytest.importorskip("gradnorm.tf")

    dt = getattr(tf, dtype)
    p0 = [tf.constant(P0["w"], dt), tf.constant(P0["b"], dt)]
    variables = [tf.Variable(t) for t in p0]

    def loss_fn():
        return tf.add_n([0.5 * tf.reduce_sum(tf.square(v - t)) for v, t in zip(variables, p0)])

    for fn in (lambda: gt.step(variables, loss_fn, rule=rule, **hyper),
               tf.function(lambda: gt.step(variables, loss_fn, rule=rule, **hyper))):
        res = fn()
        assert finite_tree(res.grad), f"{rule} {hyper} {dtype}: {res.grad}"
        assert all(g.dtype == dt for g in res.grad)
        assert bool(res.info["finite"])
        assert_no_nan_info(res.info, f"{rule} {hyper} {dtype}")
        for v, t in zip(variables, p0):
            np.testing.assert_array_equal(_to_numpy(v), _to_numpy(t))  # restored


KERAS_SETTINGS = [("sam", {"rho": 0.05}), ("sam", {"rho": 0.5, "adaptive": True}),
                  ("gnp", {"r": 0.05, "alpha": 0.5, "mix_unit_gradient": True}),
                  ("fd_gr", {"gamma": 0.1, "eps": 0.01, "normalize": True}), ("gam", {})]


@pytest.mark.parametrize("rule,hyper", KERAS_SETTINGS, ids=ids(KERAS_SETTINGS))
def test_zero_gradient_keras_fit_float16_keeps_finite_weights(rule, hyper):
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("gradnorm.tf.keras needs the TensorFlow backend of Keras")
    from gradnorm.tf.keras import GradnormModel

    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, dtype="float16"),
                              keras.layers.Dense(1, dtype="float16")])
    model = GradnormModel(inner, rule=rule, **hyper)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = np.zeros((8, 3), np.float16)  # zero data: every gradient is zero (zero biases, zero targets)
    y = np.zeros((8, 1), np.float16)
    before = [w.copy() for w in inner.get_weights()]
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    after = inner.get_weights()
    for w, b in zip(after, before):
        assert w.dtype == np.float16 and np.isfinite(w).all(), f"{rule}: non-finite weights after fit"
        np.testing.assert_array_equal(w, b)  # a zero direction leaves them as they were


# -- a huge gradient: a finite direction, or a step reported non-finite (never silent NaN weights)

HUGE = {"float16": 6e4, "bfloat16": 1e30, "float32": 1e30, "float64": 1e300}


def assert_finite_or_reported(direction, info, where):
    """The promise: `info["finite"]` is true only for a finite direction (and loss), so a NaN is never
    silent; where it is false, the caller (the PyTorch optimizer) skips the step."""
    if bool(info["finite"]):
        assert finite_tree(direction), f"{where}: info['finite'] is true for a non-finite direction"


@pytest.mark.parametrize("rule,hyper", ALL_SETTINGS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", NP_DTYPES)
def test_huge_gradient_core_numpy(dtype, rule, hyper):
    """L = G sum(p): the gradient is G everywhere (6e4 in float16, 1e30 in float32: its squared norm
    overflows float32)."""
    dt = np.dtype(dtype)
    big = HUGE[dtype]
    params = {"w": np.full(3, 1e-3, dt), "b": np.asarray(1e-3, dt)}

    def grad_fn(p):
        return np.asarray(big * sum(float(np.sum(v)) for v in p.values()), dt), {k: np.full_like(v, big) for k, v in p.items()}

    with np.errstate(all="ignore"):
        res = gradnorm.step(params, grad_fn, rule=rule, hvp_fn=lambda p, v: {k: np.zeros_like(x) for k, x in v.items()}, **hyper)
    assert_finite_or_reported(res.grad, res.info, f"{rule} {hyper} {dtype}")


@pytest.mark.parametrize("rule,hyper", ALL_SETTINGS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_gradient_torch_optimizer_never_writes_nan_weights(dtype, rule, hyper):
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gtorch

    dt = _torch_dtype(torch, dtype)
    big = HUGE[dtype]
    params = [torch.nn.Parameter(torch.full((3,), 1e-3, dtype=dt)), torch.nn.Parameter(torch.tensor(1e-3, dtype=dt))]
    holder = {}

    def closure(create_graph=False):
        holder["opt"].zero_grad()
        value = sum((big * p + 0.5 * p * p).sum() for p in params)  # curvature: `gr`'s gradient has a graph
        value.backward(create_graph=create_graph)
        return value

    opt = holder["opt"] = gtorch.Optimizer(params, torch.optim.SGD, rule=rule, lr=1e-9, info_norms=True, **hyper)
    before = [p.detach().clone() for p in params]
    opt.step(closure)
    where = f"{rule} {hyper} {dtype}"
    for p, b in zip(params, before):
        assert torch.isfinite(p).all(), f"{where}: non-finite weights"
        if not bool(opt.last_info["finite"]):
            assert torch.equal(p.detach(), b), f"{where}: a non-finite step was applied"


@pytest.mark.parametrize("rule,hyper", ALL_SETTINGS, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_gradient_adapters(dtype, rule, hyper):
    """The same promise through the functional steps of PyTorch, JAX and TensorFlow (those installed)."""
    big = HUGE[dtype]
    where = f"{rule} {hyper} {dtype}"
    ran = 0
    try:
        import torch

        import gradnorm.torch as gtorch
    except ImportError:
        torch = None
    if torch is not None:
        dt = _torch_dtype(torch, dtype)
        res = gtorch.step({"w": torch.full((3,), 1e-3, dtype=dt), "b": torch.tensor(1e-3, dtype=dt)},
                          lambda p: sum((big * v).sum() for v in p.values()), rule=rule, **hyper)
        assert_finite_or_reported(res.grad, res.info, "torch " + where)
        ran += 1
    try:
        import jax
        import jax.numpy as jnp

        import gradnorm.jax as gj
    except ImportError:
        jax = None
    if jax is not None:
        with jax.enable_x64(dtype == "float64"):
            dt = jnp.dtype(dtype)
            res = gj.step({"w": jnp.full((3,), 1e-3, dt), "b": jnp.asarray(1e-3, dt)},
                          lambda p: sum(jnp.sum(big * v) for v in p.values()), rule=rule, **hyper)
            assert_finite_or_reported(res.grad, res.info, "jax " + where)
        ran += 1
    try:
        import tensorflow as tf

        import gradnorm.tf as gt
    except ImportError:
        tf = None
    if tf is not None:
        dt = getattr(tf, dtype)
        variables = [tf.Variable(tf.fill([3], tf.constant(1e-3, dt))), tf.Variable(tf.constant(1e-3, dt))]
        res = gt.step(variables, lambda: tf.add_n([tf.reduce_sum(tf.constant(big, dt) * v) for v in variables]),
                      rule=rule, **hyper)
        assert_finite_or_reported(res.grad, res.info, "tf " + where)
        ran += 1
    if not ran:
        pytest.skip("no framework installed")


# --------------------------------------------------------------------------------------------
# 2. evaluation points and the direction keep every leaf's dtype


def _library(name):
    """`(xp, make(value, dtype_name), context)` for an array library (skipped if not installed)."""
    import contextlib

    if name == "numpy":
        return np, lambda v, d: np.asarray(v, dtype=d), contextlib.nullcontext()
    if name == "array_api_strict":
        xs = pytest.importorskip("array_api_strict")
        return xs, lambda v, d: xs.asarray(v, dtype=getattr(xs, d)), contextlib.nullcontext()
    if name in ("torch", "torch-step"):
        torch = pytest.importorskip("torch")
        import array_api_compat

        return array_api_compat.array_namespace(torch.empty(0)), lambda v, d: torch.tensor(v, dtype=getattr(torch, d)), contextlib.nullcontext()
    if name in ("jax", "jax-step"):
        jax = pytest.importorskip("jax")
        jnp = pytest.importorskip("jax.numpy")
        return jnp, lambda v, d: jnp.asarray(v, dtype=d), jax.enable_x64(True)
    raise AssertionError(name)


DTYPE_CASES = {
    # leaf dtypes, and whether the float hyperparameters are float64 0-d arrays of the library
    "float32-tree-float64-hyper": (("float32", "float32"), True),
    "mixed-tree": (("float32", "float64"), False),
    "mixed-tree-float64-hyper": (("float32", "float64"), True),
    "mixed-tree-other-order": (("float64", "float32"), False),
}


@pytest.mark.parametrize("rule,hyper", settings("adapter"), ids=ids(settings("adapter")))
@pytest.mark.parametrize("case", list(DTYPE_CASES))
@pytest.mark.parametrize("library", ["numpy", "array_api_strict", "torch", "jax", "torch-step", "jax-step"])
def test_points_and_direction_keep_each_leaf_dtype(library, case, rule, hyper):
    xp, make, context = _library(library)
    (dw, db), array_hyper = DTYPE_CASES[case]
    with context:
        params = {"w": make([1.0, -2.0, 0.5], dw), "b": make(0.25, db)}
        want = {k: v.dtype for k, v in params.items()}
        if array_hyper:
            hyper = {k: (make(v, "float64") if isinstance(v, float) else v) for k, v in hyper.items()}
        seen = []

        def record(p):
            seen.append({k: p[k].dtype for k in p})

        if library == "torch-step":
            import gradnorm.torch as gtorch

            def loss_fn(p):
                record(p)
                return sum((v * v).sum().to(p["w"].dtype) for v in p.values())

            res = gtorch.step(params, loss_fn, rule=rule, **hyper)
        elif library == "jax-step":
            import gradnorm.jax as gj

            def loss_fn(p):
                record(p)
                return sum(xp.sum(v * v).astype(p["w"].dtype) for v in p.values())

            res = gj.step(params, loss_fn, rule=rule, **hyper)
        else:
            def grad_fn(p):
                record(p)
                return xp.sum(p["w"] * p["w"]), {k: p[k] * 2.0 for k in p}

            res = gradnorm.step(params, grad_fn, rule=rule, hvp_fn=lambda p, v: {k: v[k] * 2.0 for k in v}, **hyper)
        assert seen, "the loss was never evaluated"
        for i, point in enumerate(seen):
            assert point == want, f"evaluation {i} at dtypes {point}, the parameters have {want}"
        assert {k: v.dtype for k, v in res.grad.items()} == want


# --------------------------------------------------------------------------------------------
# 3. gradnorm.tf.step refuses a loss scale that is not a finite positive float32


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 0.0, -1.0, 1e39, 1e-50, 10**400, True, "2",
                                 np.float64(np.inf), np.float64(1e39), [2.0]],
                         ids=lambda v: repr(v)[:20])
def test_tf_loss_scale_must_be_finite_positive_float32(bad):
    tf = pytest.importorskip("tensorflow")
    gt = pytest.importorskip("gradnorm.tf")

    v = tf.Variable([1.0, -2.0])
    calls = []

    def loss_fn():
        calls.append(1)
        return tf.reduce_sum(v * v)

    with pytest.raises(HyperparameterError, match="`loss_scale`"):
        gt.step([v], loss_fn, rule="sam", rho=0.1, loss_scale=bad)
    assert not calls  # refused before anything ran
    np.testing.assert_array_equal(v.numpy(), [1.0, -2.0])


def test_tf_loss_scale_accepted_values_and_float16_variables():
    tf = pytest.importorskip("tensorflow")
    gt = pytest.importorskip("gradnorm.tf")

    v = tf.Variable([1.0, -2.0])
    for good in (3e38, 1e-44):  # the extremes float32 represents are accepted
        gt.step([v], lambda: tf.reduce_sum(v * v), rule="sgd", loss_scale=good)
    for good in (8, 8.0, np.float32(8.0), tf.constant(8.0), tf.Variable(8.0, dtype=tf.float64)):
        res = gt.step([v], lambda: 8.0 * tf.reduce_sum(v * v), rule="sgd", loss_scale=good)
        assert float(res.loss) == 5.0 and bool(res.info["finite"])
    # float16 variables with a loss scale of 65536 (beyond float16's range; a LossScaleOptimizer
    # reaches it): the rule sees the unscaled gradient, the direction comes back scaled
    w = tf.Variable(tf.constant([1e-3, -2e-3], tf.float16))
    scale = 65536.0
    res = gt.step([w], lambda: scale * 0.5 * tf.reduce_sum(tf.square(tf.cast(w, tf.float32))), rule="sgd", loss_scale=scale)
    np.testing.assert_allclose(float(res.info["grad_norm"]), math.hypot(1e-3, 2e-3), rtol=2e-3)
    np.testing.assert_allclose(res.grad[0].numpy().astype(np.float64), scale * w.numpy().astype(np.float64), rtol=2e-3)


# --------------------------------------------------------------------------------------------
# 4. a 0-d hyperparameter array of another library than the parameters


def _params_of(library):
    if library == "numpy":
        return {"w": np.asarray([1.0, -2.0], np.float32), "b": np.asarray(0.5, np.float32)}
    if library == "torch":
        torch = pytest.importorskip("torch")
        return {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor(0.5)}
    if library == "jax":
        jnp = pytest.importorskip("jax.numpy")
        return {"w": jnp.asarray([1.0, -2.0]), "b": jnp.asarray(0.5)}
    if library == "tf":
        tf = pytest.importorskip("tensorflow")
        return {"w": tf.constant([1.0, -2.0]), "b": tf.constant(0.5)}
    raise AssertionError(library)


def _scalar_of(library, value=0.05):
    if library == "numpy":
        return np.asarray(value, np.float32)  # a 0-d array (arithmetic would give a NumPy scalar, a number)
    return _params_of(library)["b"] * 0 + value  # a float32 0-d array of `library`


def never_called(*args):  # pragma: no cover - the point is that it never runs
    raise AssertionError("grad_fn must not be called when the input is invalid")


FOREIGN = [("numpy", "torch"), ("numpy", "jax"), ("numpy", "tf"), ("torch", "numpy"), ("torch", "jax"),
           ("torch", "tf"), ("jax", "torch"), ("jax", "tf"), ("tf", "numpy"), ("tf", "torch")]


@pytest.mark.parametrize("params_lib,hyper_lib", FOREIGN, ids=[f"params-{p}-hyper-{h}" for p, h in FOREIGN])
@pytest.mark.parametrize("rule,name", [("sam", "rho"), ("flooding", "b"), ("coherent", "lam"), ("gam", "grad_beta_0")])
def test_hyperparameter_array_of_another_library_is_refused(params_lib, hyper_lib, rule, name):
    params = _params_of(params_lib)
    hyper = {**settings_valid(rule), name: _scalar_of(hyper_lib)}
    with pytest.raises(HyperparameterError, match=rf"`{name}` of rule '{rule}' is an array of .*`params` are arrays of"):
        gradnorm.step(params, never_called, rule=rule, **hyper)
    # inside a PerLeaf too (sam's rho is leafwise)
    if rule == "sam":
        with pytest.raises(HyperparameterError, match="`rho` of rule 'sam' is an array of"):
            gradnorm.step(params, never_called, rule="sam", rho=PerLeaf([_scalar_of(hyper_lib), 0.1]))


def settings_valid(rule):
    from conformance.settings import valid_settings

    return valid_settings()[rule]


def test_numpy_hyperparameter_arrays_are_accepted_with_jax_params():
    jnp = pytest.importorskip("jax.numpy")
    params = _params_of("jax")
    res = gradnorm.step(params, lambda p: (jnp.sum(p["w"] ** 2), {k: 2 * v for k, v in p.items()}),
                        rule="sam", rho=np.asarray(0.05))
    want = gradnorm.step(params, lambda p: (jnp.sum(p["w"] ** 2), {k: 2 * v for k, v in p.items()}), rule="sam", rho=0.05)
    for k in params:
        np.testing.assert_allclose(np.asarray(res.grad[k]), np.asarray(want.grad[k]), rtol=1e-6)


def test_hyperparameter_arrays_are_checked_once_per_namespace(monkeypatch):
    calls = []
    original = gradnorm.rules.Rule._check_array_hyperparameters
    monkeypatch.setattr(gradnorm.rules.Rule, "_check_array_hyperparameters",
                        lambda self, xp: (calls.append(xp), original(self, xp))[1])
    rule = gradnorm.rules.SAM(rho=np.asarray(0.05))
    params = _params_of("numpy")
    for _ in range(3):
        rule.update(params, rule.init(params), gradnorm.FunctionOracle(lambda p: (np.sum(p["w"] ** 2), {k: 2 * v for k, v in p.items()})))
    assert len(calls) == 1
    gradnorm.rules.SAM(rho=0.05).update(params, gradnorm.rules.EmptyState(),
                                         gradnorm.FunctionOracle(lambda p: (np.sum(p["w"] ** 2), {k: 2 * v for k, v in p.items()})))
    assert len(calls) == 1  # a rule without array hyperparameters checks nothing


def test_foreign_hyperparameter_arrays_in_the_adapters():
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gtorch

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = gtorch.Optimizer([w], torch.optim.SGD, rule="sam", rho=np.asarray(0.05), lr=0.1)
    with pytest.raises(HyperparameterError, match="`rho` of rule 'sam' is an array of NumPy, but `params` are arrays of PyTorch"):
        opt.step(never_called)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))
    with pytest.raises(HyperparameterError, match="`rho`"):
        gtorch.step({"w": torch.tensor([1.0])}, never_called, rule="sam", rho=np.asarray(0.05))
    try:
        import jax.numpy as jnp

        import gradnorm.jax as gj
    except ImportError:
        jnp = None
    if jnp is not None:
        with pytest.raises(HyperparameterError, match="`rho` of rule 'sam' is an array of PyTorch, but `params` are arrays of JAX"):
            gj.step({"w": jnp.asarray([1.0])}, never_called, rule="sam", rho=torch.tensor(0.05))
    try:
        import tensorflow as tf

        import gradnorm.tf as gt
    except ImportError:
        tf = None
    if tf is not None:
        v = tf.Variable([1.0, -2.0])
        with pytest.raises(HyperparameterError, match="`rho` of rule 'sam' is an array of PyTorch, but `params` are arrays of TensorFlow"):
            gt.step([v], never_called, rule="sam", rho=torch.tensor(0.05))
        np.testing.assert_array_equal(v.numpy(), [1.0, -2.0])


# --------------------------------------------------------------------------------------------
# 5. a PerLeaf of the wrong length is refused also when its values are equal


def _quadratic_np(p):
    return np.asarray(sum(0.5 * float(np.sum(v * v)) for v in p.values())), {k: np.array(v, copy=True) for k, v in p.items()}


def test_equal_per_leaf_values_of_the_wrong_length_are_refused():
    params = {"w": np.asarray([1.0, -2.0, 0.5]), "b": np.asarray(0.25)}
    for value in (PerLeaf([0.1] * 5), PerLeaf([0.1]), PerLeaf({"w": 0.1, "x": 0.1}), PerLeaf({"w": 0.1, "b": 0.1, "c": 0.1})):
        with pytest.raises(HyperparameterError, match=r"`rho` of rule 'sam' is a PerLeaf with \d values.*`params` has 2 leaves"):
            gradnorm.step(params, never_called, rule="sam", rho=value)
        rule = gradnorm.rules.get("sam", rho=value)
        assert rule.rho == 0.1  # still the scalar path
        for derived in (rule.replace(adaptive=True), gradnorm.rules.get(rule, eta=0.01)):  # replace keeps the length
            with pytest.raises(HyperparameterError, match="`rho` of rule 'sam' is a PerLeaf"):
                gradnorm.step(params, never_called, rule=derived)
    # a leaf-list update (what the adapters call) checks the length too
    rule = gradnorm.rules.get("gnp", r=PerLeaf([0.1] * 3), alpha=0.5)
    with pytest.raises(HyperparameterError, match="`r` of rule 'gnp' is a PerLeaf with 3 values"):
        rule.update_leaves(list(params.values()), rule.init(params), gradnorm.TreeOracle(
            gradnorm.FunctionOracle(never_called), gradnorm._tree.tree_structure(params), list(params.values()), np))


def test_rules_keeping_a_per_leaf_or_array_checks_survive_copy_and_pickle():
    import copy
    import pickle

    params = {"w": np.asarray([1.0, -2.0, 0.5]), "b": np.asarray(0.25)}
    rule = gradnorm.rules.get("sam", rho=PerLeaf({"w": 0.1, "x": 0.1}))
    for clone in (copy.deepcopy(rule), pickle.loads(pickle.dumps(rule))):
        assert clone == rule and clone.rho == 0.1
        with pytest.raises(HyperparameterError, match="`rho` of rule 'sam' is a PerLeaf"):
            gradnorm.step(params, never_called, rule=clone)
    arrays = gradnorm.rules.get("sam", rho=np.asarray(0.05))
    gradnorm.step(params, _quadratic_np, rule=arrays)  # checked once for NumPy
    for clone in (copy.deepcopy(arrays), pickle.loads(pickle.dumps(arrays))):
        assert float(clone.rho) == 0.05
        gradnorm.step(params, _quadratic_np, rule=clone)
    per_leaf = PerLeaf([0.1, 0.2])
    assert pickle.loads(pickle.dumps(per_leaf)) == per_leaf == copy.deepcopy(per_leaf)


def test_equal_per_leaf_values_of_the_right_length_are_the_scalar_rule_bit_for_bit():
    params = {"w": np.asarray([1.0, -2.0, 0.5], np.float32), "b": np.asarray(0.25, np.float32)}
    for rule, scalar, per_leaf in [("sam", {"rho": 0.05}, {"rho": PerLeaf([0.05, 0.05])}),
                                   ("sam", {"rho": 0.05}, {"rho": PerLeaf({"w": 0.05, "b": 0.05})}),
                                   ("gnp", {"r": 0.1, "alpha": 0.8}, {"r": PerLeaf([0.1, 0.1]), "alpha": 0.8})]:
        a = gradnorm.step(params, _quadratic_np, rule=rule, **scalar).grad
        b = gradnorm.step(params, _quadratic_np, rule=rule, **per_leaf).grad
        for k in params:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])


def test_equal_per_leaf_values_of_the_wrong_length_in_the_adapters():
    try:
        import jax.numpy as jnp

        import gradnorm.jax as gj
    except ImportError:
        jnp = None
    if jnp is not None:
        with pytest.raises(HyperparameterError, match="`rho` of rule 'sam' is a PerLeaf with 3 values"):
            gj.step({"w": jnp.ones(2), "b": jnp.ones(())}, never_called, rule="sam", rho=PerLeaf([0.1] * 3))
    try:
        import torch

        import gradnorm.torch as gtorch
    except ImportError:
        torch = None
    if torch is not None:
        with pytest.raises(HyperparameterError, match="`rho` of rule 'sam' is a PerLeaf with 3 values"):
            gtorch.step({"w": torch.ones(2), "b": torch.ones(())}, never_called, rule="sam", rho=PerLeaf([0.1] * 3))
        w = torch.nn.Parameter(torch.ones(2))
        with pytest.raises(HyperparameterError, match="`rho` of gradnorm.torch.Optimizer must be one value"):
            gtorch.Optimizer([w], torch.optim.SGD, rule="sam", rho=PerLeaf([0.1] * 3), lr=0.1)
    try:
        import tensorflow as tf

        import gradnorm.tf as gt
    except ImportError:
        tf = None
    if tf is not None:
        with pytest.raises(HyperparameterError, match="`rho` of rule 'sam' is a PerLeaf with 3 values"):
            gt.step([tf.Variable([1.0, 2.0])], never_called, rule="sam", rho=PerLeaf([0.1] * 3))


# --------------------------------------------------------------------------------------------
# 6. a complex loss is refused everywhere


@pytest.mark.parametrize("loss", [np.asarray(1.0 + 0j), np.complex128(1.0), np.complex64(1.0), 1.0 + 0j],
                         ids=["array", "complex128", "complex64", "python"])
def test_complex_loss_core(loss):
    params = {"w": np.asarray([1.0, -2.0])}
    with pytest.raises(OracleOutputError, match=r"loss returned by `grad_fn` must .*real"):
        gradnorm.step(params, lambda p: (loss, {"w": 2 * p["w"]}), rule="sam", rho=0.1)
    rule = gradnorm.rules.SGD()
    with pytest.raises(OracleOutputError, match=r"loss returned by `loss` must .*real"):
        rule.update(params, rule.init(params), gradnorm.FunctionOracle(never_called), loss=loss, grads={"w": 2 * params["w"]})


def test_complex_loss_torch():
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gtorch

    with pytest.raises(gradnorm.ClosureError, match="`loss_fn` must return a real floating-point loss"):
        gtorch.step({"w": torch.tensor([1.0, -2.0])}, lambda p: (p["w"] ** 2).sum().to(torch.complex64), rule="sam", rho=0.1)
    with pytest.raises(gradnorm.ClosureError, match="`loss_fn` must return a real floating-point loss"):
        gtorch.step({"w": torch.tensor([1.0, -2.0])}, lambda p: (p["w"] ** 2).sum().to(torch.int64), rule="sgd")
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = gtorch.Optimizer([w], torch.optim.SGD, rule="sam", rho=0.1, lr=0.1)

    def closure():
        opt.zero_grad()
        value = (w ** 2).sum()
        value.backward()
        return value.to(torch.complex64)

    with pytest.raises(gradnorm.ClosureError, match="`closure` must return a real floating-point loss"):
        opt.step(closure)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))
    with pytest.raises(gradnorm.ClosureError, match="`loss` must be a real floating-point loss"):
        opt.step(closure, loss=torch.tensor(1.0 + 0j))
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))


def test_complex_loss_jax():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    import gradnorm.jax as gj

    params = {"w": jnp.asarray([1.0, -2.0])}
    for loss_fn in (lambda p: jnp.sum(p["w"] ** 2).astype(jnp.complex64), lambda p: 1.0 + 0j):
        with pytest.raises(gradnorm.ClosureError, match="`loss_fn` must return a scalar .*floating-point loss"):
            gj.step(params, loss_fn, rule="sam", rho=0.1)
    tx = gj.transform(optax.sgd(0.1), rule="sam", rho=0.1)
    state = tx.init(params)
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    with pytest.raises(gradnorm.ClosureError, match="`loss_fn` must return a scalar .*floating-point loss"):
        tx.update(grads, state, params, loss_fn=lambda p: jnp.sum(p["w"] ** 2).astype(jnp.complex64))


def test_complex_loss_tf():
    tf = pytest.importorskip("tensorflow")
    gt = pytest.importorskip("gradnorm.tf")

    v = tf.Variable([1.0, -2.0])
    for fn in (lambda: tf.cast(tf.reduce_sum(v * v), tf.complex64), tf.function(lambda: tf.cast(tf.reduce_sum(v * v), tf.complex64))):
        with pytest.raises(gradnorm.ClosureError, match="`loss_fn` must return a real floating-point loss"):
            gt.step([v], fn, rule="sam", rho=0.1)
        np.testing.assert_array_equal(v.numpy(), [1.0, -2.0])


# --------------------------------------------------------------------------------------------
# 7. NumPy integers are integers


@pytest.mark.parametrize("delay", [np.int64(3), np.int32(3), np.uint8(3), 3])
def test_coherent_takes_numpy_integer_delay(delay):
    rule = gradnorm.rules.get("coherent", lam=0.1, threshold=-1.0, delay=delay)
    assert rule.delay == 3 and type(rule.delay) is int
    assert rule == gradnorm.rules.get("coherent", lam=0.1, threshold=-1.0, delay=3) and hash(rule) == hash(rule.replace())
    params = {"w": np.asarray([1.0, -2.0, 0.5])}
    state, gates = None, []
    for _ in range(5):
        res = gradnorm.step(params, _quadratic_np, rule=rule, state=state)
        state = res.state
        gates.append(float(res.info["gate"]))
    assert gates == [0.0, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("delay", [True, np.bool_(True), np.float64(3.0), 3.0, np.int64(-1), -1, "3"])
def test_coherent_refuses_non_integer_delay(delay):
    with pytest.raises(HyperparameterError, match=r"`delay` of rule 'coherent' must be an integer >= 0"):
        gradnorm.rules.get("coherent", lam=0.1, threshold=0.0, delay=delay)


# --------------------------------------------------------------------------------------------
# 8. bad step arguments, a missing oracle, a non-scalar closure loss


def test_torch_optimizer_step_arguments_fail_before_anything_runs():
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gtorch

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = gtorch.Optimizer([w], torch.optim.SGD, rule="sam", rho=0.1, lr=0.1)
    with pytest.raises(gradnorm.ClosureError, match="`closure` must be None or a callable"):
        opt.step(5)
    with pytest.raises(gradnorm.ClosureError, match="`loss` must be the loss as a tensor"):
        opt.step(loss=1.0)
    with pytest.raises(gradnorm.ClosureError, match="`loss` must be a scalar loss"):
        opt.step(loss=torch.ones(2))
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0])) and w.grad is None

    def closure():
        opt.zero_grad()
        value = w ** 2  # not reduced
        value.sum().backward()
        return value

    with pytest.raises(gradnorm.ClosureError, match="`closure` must return a scalar loss"):
        opt.step(closure)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))


def test_update_without_an_oracle_names_it():
    params = {"w": np.asarray([1.0, -2.0])}
    rule = gradnorm.rules.SAM(rho=0.1)
    with pytest.raises(TypeError, match="`oracle`"):
        rule.update(params, rule.init(params), None)
    with pytest.raises(TypeError, match="`oracle`"):
        rule.update_leaves(list(params.values()), rule.init(params), None)
