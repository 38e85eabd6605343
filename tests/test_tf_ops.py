"""gradnorm.tf's array namespace and TFOps: the same numbers as NumPy and as the generic ArrayOps,
dtypes kept, inputs untouched, nothing global changed in TensorFlow; coherent's sparsity
(``fraction_below``) through TFOps equals a NumPy count; scalars too large for a leaf's dtype
saturate, also under tf.function."""

from __future__ import annotations

import numpy as np
import pytest

import gradnorm
from gradnorm import _tree
from gradnorm.rules._coherent import fraction_below

tf = pytest.importorskip("tensorflow")
gt = pytest.importorskip("gradnorm.tf")

xp = gt.namespace


def test_the_core_finds_the_namespace_for_tensors_and_variables():
    assert _tree.namespace_of([tf.constant([1.0]), tf.Variable(2.0)]) is xp
    assert _tree.is_array(tf.constant(1.0)) and _tree.is_array(tf.Variable(1.0))
    assert not _tree.is_array([1.0]) and _tree.is_array(np.ones(2))
    import array_api_compat

    assert _tree.array_namespace(np.ones(2)) is array_api_compat.array_namespace(np.ones(2))


def test_nothing_global_changes_in_tensorflow():
    # NumPy-style promotion is off: a float32 tensor times a float64 tensor is still an error
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError)):
        tf.constant([1.0], tf.float32) * tf.constant([1.0], tf.float64)
    assert not hasattr(tf.constant(1.0), "T")  # enabled numpy behaviour would add ndarray methods


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_namespace_functions_match_numpy(dtype):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)).astype(dtype), rng.normal(size=(3, 4)).astype(dtype)
    v, m = rng.normal(size=4).astype(dtype), rng.normal(size=(4, 2)).astype(dtype)
    ta, tb, tv, tm = (tf.constant(t) for t in (a, b, v, m))
    rtol = 1e-6 if dtype == "float32" else 1e-14
    pairs = [
        (xp.abs(ta), np.abs(a)), (xp.sign(ta), np.sign(a)), (xp.sqrt(xp.abs(ta)), np.sqrt(np.abs(a))),
        (xp.exp(ta), np.exp(a)), (xp.log(xp.abs(ta)), np.log(np.abs(a))), (xp.tanh(ta), np.tanh(a)),
        (xp.logaddexp(ta, tb), np.logaddexp(a, b)), (xp.maximum(ta, 0.5), np.maximum(a, 0.5)),
        (xp.add(2.0, ta), 2.0 + a), (xp.multiply(ta, tb), a * b), (xp.divide(ta, 3.0), a / 3.0),
        (xp.where(ta > 0, ta, 0.0), np.where(a > 0, a, 0.0)), (xp.clip(ta, -0.5, 0.5), np.clip(a, -0.5, 0.5)),
        (xp.sum(ta, axis=1), a.sum(axis=1)), (xp.mean(ta), a.mean()), (xp.max(ta, axis=0, keepdims=True), a.max(0, keepdims=True)),
        (xp.min(ta), a.min()), (xp.prod(ta, axis=0), a.prod(0)), (xp.vecdot(ta, tb), np.sum(a * b, axis=-1)),
        (xp.matmul(ta, tv), a @ v), (xp.matmul(tv, tv), v @ v), (xp.matmul(tv, tm), v @ m), (xp.matmul(ta, tm), a @ m),
        (xp.concat([tv, tv]), np.concatenate([v, v])), (xp.concat([ta, tb], axis=None), np.concatenate([a.ravel(), b.ravel()])),
        (xp.stack([tv, tv], axis=1), np.stack([v, v], 1)), (xp.reshape(ta, (4, 3)), a.reshape(4, 3)),
        (xp.permute_dims(ta, (1, 0)), a.T), (xp.zeros_like(ta), np.zeros_like(a)),
        (xp.full((2,), 3.0, dtype=xp.float64), np.full(2, 3.0)), (xp.astype(ta, xp.float64), a.astype(np.float64)),
    ]
    for got, want in pairs:
        got = got.numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)
    assert xp.sum(ta).dtype == getattr(tf, dtype)
    assert int(xp.count_nonzero(ta > 0)) == int(np.count_nonzero(a > 0))
    assert bool(xp.all(xp.isfinite(ta))) and not bool(xp.any(xp.isnan(ta)))
    assert np.isnan(xp.sign(tf.constant([np.nan])).numpy()[0])  # the standard's sign(nan) is nan


def test_isdtype():
    assert xp.isdtype(tf.float32, "real floating") and xp.isdtype(tf.bfloat16, "real floating")
    assert not xp.isdtype(tf.int32, "real floating") and xp.isdtype(tf.int32, ("integral", "bool"))
    assert xp.isdtype(tf.float64, tf.float64) and not xp.isdtype(tf.float64, xp.float32)
    with pytest.raises(ValueError, match="`kind`"):
        xp.isdtype(tf.float32, "floating")


def _lists(dtypes, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(3, 2), (4,), ()]
    return [rng.normal(size=s).astype(d) for s, d in zip(shapes, dtypes)]


SCALARS = {
    "python": lambda d: 0.37,
    "tensor32": lambda d: tf.constant(0.37, tf.float32),
    "tensor64": lambda d: tf.constant(0.37, tf.float64),
    "perleaf": lambda d: gradnorm.PerLeaf([0.5, tf.constant(-2.0, tf.float64), 0.0]),
}


@pytest.mark.parametrize("dtypes", [("float32",) * 3, ("float64",) * 3, ("float32", "float64", "float16")])
@pytest.mark.parametrize("scalar", list(SCALARS))
def test_tfops_equals_arrayops(dtypes, scalar):
    """TFOps against the generic ArrayOps on the same namespace (the reference implementation of the
    contract) and against NumPy: same values, dtypes kept, inputs not modified."""
    x_np, y_np = _lists(dtypes, 1), _lists(dtypes, 2)
    x, y = [tf.constant(a) for a in x_np], [tf.constant(a) for a in y_np]
    x_before = [a.numpy().copy() for a in x]
    ops, ref = gt.TFOps(), gradnorm.ArrayOps(xp)
    s = SCALARS[scalar](dtypes)
    wide = dtypes[1] == "float64"  # mixed list: reductions in float64
    for name, args in [("scale", (s, x)), ("axpy", (s, x, y)), ("lincomb", (s, x, 0.5, y)), ("add_scalar", (x, s)),
                       ("add", (x, y)), ("sub", (x, y)), ("mul", (x, y)), ("abs", (x,)), ("sign", (x,))]:
        got, want = getattr(ops, name)(*args), getattr(ref, name)(*args)
        for g, w, leaf in zip(got, want, x):
            assert g.dtype == leaf.dtype, (name, g.dtype, leaf.dtype)
            tol = 1e-3 if leaf.dtype == tf.float16 else 1e-6
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=tol, atol=tol)
    acc = tf.float64 if wide or dtypes[0] == "float64" else tf.float32
    for name, args in [("vdot", (x, y)), ("norm", (x,))]:
        got, want = getattr(ops, name)(*args), getattr(ref, name)(*args)
        assert got.dtype == acc
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    norm_np = np.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in x_np))
    np.testing.assert_allclose(float(ops.norm(x)), norm_np, rtol=1e-5)
    for tol in (0.0, 0.5, tf.constant(0.5, tf.float64), 10.0):
        frac = fraction_below(x, tol, ops)
        assert frac.dtype == acc
        assert float(frac) == pytest.approx(_numpy_fraction_below(x_np, float(tol)), rel=1e-7, abs=0.0)
    assert bool(ops.all_finite(x)) and not bool(ops.all_finite([*x[:2], tf.constant(np.inf, x[2].dtype)]))
    for a, before in zip(x, x_before):
        np.testing.assert_array_equal(a.numpy(), before)


def _numpy_fraction_below(leaves, tol):
    """The fraction of entries with |x| < tol, counted in NumPy float64 with `tol` rounded to each leaf's
    dtype first (TensorFlow compares in the leaf's dtype)."""
    count = sum(int(np.count_nonzero(np.abs(a.astype(np.float64)) < float(np.asarray(tol, a.dtype)))) for a in leaves)
    return count / sum(a.size for a in leaves)


def test_fraction_below_at_the_threshold_matches_numpy():
    """|x| == tol is not below; the next number down is; nan and inf never are."""
    ops = gt.TFOps()
    tol = 1e-3
    for dtype in (np.float64, np.float32, np.float16):
        t = np.asarray(tol, dtype)
        below = np.nextafter(t, dtype(0))
        leaf = np.asarray([t, -t, below, -below, np.nan, np.inf, -np.inf, 0.0], dtype)
        for leaves in ([leaf], [leaf, np.asarray(1e-5, dtype)]):
            want = _numpy_fraction_below(leaves, tol)
            assert want == (3 + len(leaves) - 1) / sum(a.size for a in leaves)
            for tolerance in (tol, tf.constant(tol, tf.float64)):
                got = fraction_below([tf.constant(a) for a in leaves], tolerance, ops)
                assert float(got) == pytest.approx(want, rel=1e-7, abs=0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_tfops_scalars_saturate_at_the_leaf_dtype_range(dtype):
    """`rho / (||g|| + 1e-12)` at a zero gradient (5e10 in float32) times a zero leaf is 0, never NaN,
    eagerly and inside tf.function, where Grappler reassociates products of scalars."""
    ops = gt.TFOps()
    dt = getattr(tf, dtype)
    zeros = [tf.zeros([3], dt), tf.zeros([], dt)]
    t = [tf.constant([2.0, -2.0, 4.0], dt), tf.constant(3.0, dt)]

    def run(norm):
        s = 0.05 / (norm + 1e-12)
        u = ops.mul(t, ops.mul(t, zeros))  # ASAM's T * T * g: a product chain Grappler reorders
        return ops.scale(s, u), ops.axpy(s, u, t), ops.lincomb(s, u, 1.0, t), ops.scale(1e300, zeros)

    for fn in (run, tf.function(run)):
        for out in fn(tf.constant(0.0)):
            for o in out:
                assert o.dtype == dt and not np.isnan(o.numpy().astype(np.float64)).any()
    v = [tf.Variable(a) for a in t]
    tf.function(lambda s: ops.assign_axpy(s, zeros, v))(tf.constant(5e10))
    for var, a in zip(v, t):
        np.testing.assert_array_equal(var.numpy(), a.numpy())


def test_tfops_under_tf_function_and_in_place_axpy():
    ops = gt.TFOps()
    v = [tf.Variable([1.0, 2.0]), tf.Variable(3.0)]
    d = [tf.constant([0.5, -1.0]), tf.constant(2.0)]

    @tf.function
    def f(s):
        ops.assign_axpy(s, d, v)
        return ops.norm(d), fraction_below(d, 1.0, ops)

    norm, frac = f(tf.constant(2.0))
    np.testing.assert_allclose(v[0].numpy(), [2.0, 0.0])
    assert float(v[1].numpy()) == 7.0 and float(norm) == pytest.approx(np.sqrt(5.25)) and float(frac) == pytest.approx(1 / 3)
    empty = ops.norm([])
    assert float(empty) == 0.0 and bool(ops.all_finite([]))


def test_flooding_loss_transforms_take_tensorflow_tensors():
    import numpy as np

    import gradnorm

    losses = np.array([0.3, 0.9, 0.45])
    assert float(gradnorm.flood(tf.constant(0.3, tf.float64), 0.5)) == float(gradnorm.flood(np.float64(0.3), 0.5))
    np.testing.assert_allclose(float(gradnorm.iflood(tf.constant(losses), 0.5)), float(gradnorm.iflood(losses, 0.5)), rtol=1e-15)
