"""gradnorm.tf.diagnostics: on tf.Variables and a loss closure, the Hessian's top eigenvalues equal the
dense eigendecomposition, the trace estimates are within their standard error of the exact trace, the
NumPy core with hand-written derivatives (and JAX) give the same numbers on the same probes,
tf.function equals eager, the variables are restored bit for bit (also when a pass raises),
determinism given a seed, clear errors; the Keras callback logs into History and batch logs without
changing the training trajectory, with a plain model and with GradnormModel."""

from __future__ import annotations

import functools

import numpy as np
import optree
import pytest

tf = pytest.importorskip("tensorflow")
gt = pytest.importorskip("gradnorm.tf")

import gradnorm
import gradnorm.diagnostics as core
from conformance.problems import PROBLEMS

gd = gt.diagnostics
MLP = PROBLEMS["mlp"]  # a 4-8-6-3 tanh perceptron, 115 parameters, hand-written NumPy gradient and HVP
LAYERS = ("hidden1", "hidden2", "out")
# the variables in optree's (and JAX's) leaf order of the parameter dict, so that NumpyProbes draw the
# same numbers for every backend: hidden1.b, hidden1.w, hidden2.b, hidden2.w, out.b, out.w
NUMPY_LEAVES, TREEDEF = optree.tree_flatten(MLP.params0())


class Model:
    """The MLP on tf.Variables; `loss()` reads them (the TensorFlow idiom)."""

    def __init__(self, dtype=tf.float64, values=None):
        self.variables = [tf.Variable(v, dtype=dtype) for v in (NUMPY_LEAVES if values is None else values)]
        self.x = tf.constant(MLP.data["X"], dtype)
        self.y = tf.constant(MLP.data["Y"], dtype)
        self.calls = 0

    def loss(self):
        self.calls += 1
        h1b, h1w, h2b, h2w, ob, ow = self.variables
        h = tf.tanh(self.x @ h1w + h1b)
        h = tf.tanh(h @ h2w + h2b)
        logits = h @ ow + ob
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(self.y, logits))

    def values(self):
        return [v.numpy() for v in self.variables]


def assert_bitwise(values, variables):
    for a, v in zip(values, variables):
        np.testing.assert_array_equal(a, v.numpy())


@functools.cache
def exact_hessian():
    """The dense Hessian from the hand-written NumPy HVP, columns in the variables' order."""
    sizes = [a.size for a in NUMPY_LEAVES]
    columns = []
    for e in np.eye(sum(sizes)):
        parts = np.split(e, np.cumsum(sizes)[:-1])
        v = optree.tree_unflatten(TREEDEF, [p.reshape(a.shape) for p, a in zip(parts, NUMPY_LEAVES)])
        columns.append(np.concatenate([h.ravel() for h in optree.tree_leaves(MLP.hvp(MLP.params0(), v, MLP.data))]))
    return np.stack(columns, axis=1)


def exact_spectrum():
    return np.linalg.eigvalsh(exact_hessian())  # ascending


# ----------------------------------------------------------------------------------------------
# exactness, restore


def test_top_eigenvalues_equal_the_dense_eigendecomposition_and_variables_are_restored():
    m = Model()
    before = m.values()
    H, spectrum = exact_hessian(), exact_spectrum()
    res = gd.hessian_eigenvalues(m.variables, m.loss, k=3, iters=60)
    assert isinstance(res, core.EigenResult) and res.method == "exact" and res.iterations == 60
    np.testing.assert_allclose(res.eigenvalues.numpy(), spectrum[::-1][:3], rtol=0, atol=1e-8)
    assert bool(tf.reduce_all(res.converged))
    for value, vector in zip(res.eigenvalues.numpy(), res.eigenvectors):
        assert [tuple(t.shape) for t in vector] == [a.shape for a in before]
        v = np.concatenate([t.numpy().ravel() for t in vector])
        np.testing.assert_allclose(H @ v, value * v, atol=1e-7)
    assert_bitwise(before, m.variables)


@pytest.mark.parametrize("method,samples", [("hutchinson", 60), ("hutch++", 45)])
def test_trace_is_within_four_standard_errors_of_the_exact_trace(method, samples):
    m = Model()
    res = gd.hessian_trace(m.variables, m.loss, samples=samples, method=method, seed=3)
    exact = float(np.trace(exact_hessian()))
    assert res.method == method and res.matvecs == samples and np.isfinite(float(res.stderr))
    assert abs(float(res.trace) - exact) <= 4 * float(res.stderr), (float(res.trace), exact, float(res.stderr))


def test_first_order_measures_and_density_restore_the_variables():
    m = Model()
    before = m.values()
    with tf.GradientTape() as tape:
        loss = m.loss()
    g = tape.gradient(loss, m.variables)
    gnorm = float(tf.sqrt(tf.add_n([tf.reduce_sum(x * x) for x in g])))
    assert float(gd.gradient_norm(m.variables, m.loss)) == pytest.approx(gnorm, rel=1e-12)
    moved = Model(values=[a + 0.05 / gnorm * x.numpy() for a, x in zip(before, g)])
    sharp = float(moved.loss() - loss)
    assert float(gd.sam_sharpness(m.variables, m.loss, rho=0.05)) == pytest.approx(sharp, rel=1e-9)
    assert_bitwise(before, m.variables)
    flat = gd.first_order_flatness(m.variables, m.loss, rho=0.05, steps=3)
    assert float(flat.grad_norms[0]) == pytest.approx(gnorm, rel=1e-12)
    assert float(flat.flatness) == pytest.approx(0.05 * float(tf.reduce_max(flat.grad_norms)))
    assert_bitwise(before, m.variables)
    density = gd.spectral_density(m.variables, m.loss, runs=2, iters=25, seed=1)
    assert isinstance(density.nodes, np.ndarray) and density.nodes.shape == (2, 25)
    np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, rtol=1e-12)
    assert density.nodes.max() == pytest.approx(exact_spectrum().max(), abs=1e-8)
    assert_bitwise(before, m.variables)


def test_variables_are_restored_when_a_pass_raises():
    m = Model()
    before = m.values()

    def failing():
        if m.calls >= 3:  # a pass at a perturbed point (first_order_flatness moves the weights)
            raise FloatingPointError("boom")
        return m.loss()

    with pytest.raises(FloatingPointError, match="boom"):
        gd.first_order_flatness(m.variables, failing, steps=3)
    assert_bitwise(before, m.variables)


# ----------------------------------------------------------------------------------------------
# other backends, tf.function, determinism


def test_numpy_core_and_jax_give_the_same_numbers_on_the_same_probes():
    m = Model()
    ref = core.hessian_eigenvalues(MLP.params0(), MLP.grad_fn(), hvp_fn=MLP.hvp_fn(), k=3, iters=40, seed=0)
    got = gd.hessian_eigenvalues(m.variables, m.loss, k=3, iters=40, probes=core.NumpyProbes(0))
    np.testing.assert_allclose(got.eigenvalues.numpy(), ref.eigenvalues, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got.eigenvalues.numpy(), exact_spectrum()[::-1][:3], rtol=0, atol=1e-8)
    ref_tr = core.hessian_trace(MLP.params0(), MLP.grad_fn(), hvp_fn=MLP.hvp_fn(), samples=8, seed=4)
    got_tr = gd.hessian_trace(m.variables, m.loss, samples=8, probes="numpy", seed=4)
    np.testing.assert_allclose(got_tr.samples.numpy(), ref_tr.samples, rtol=1e-11)

    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    import gradnorm.jax.diagnostics as jd

    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(jnp.asarray, MLP.params0())
        data = {k: jnp.asarray(v) for k, v in MLP.data.items()}
        top = jd.hessian_eigenvalues(lambda p: MLP.loss(jnp, p, data), params, k=3, iters=40)  # JaxProbes
        np.testing.assert_allclose(np.asarray(top.eigenvalues), got.eigenvalues.numpy(), rtol=0, atol=1e-8)


def test_tf_function_equals_eager_and_restores_the_variables():
    m = Model()
    before = m.values()
    kwargs = dict(quantities=gd.QUANTITIES, iters=12, samples=5, flatness_steps=2, seed=7)
    eager = gd.measure(m.variables, m.loss, **kwargs)

    graph = tf.function(lambda: gd.measure(m.variables, m.loss, **kwargs))
    values = graph()
    assert_bitwise(before, m.variables)
    for name in gd.QUANTITIES:
        assert float(values[name]) == pytest.approx(float(eager[name]), rel=1e-10), name
    values = graph()  # the compiled graph again: the same probes (the seed), the same values
    assert float(values["trace"]) == pytest.approx(float(eager["trace"]), rel=1e-10)
    with pytest.raises(RuntimeError, match="eagerly only"):
        tf.function(lambda: gd.spectral_density(m.variables, m.loss).nodes)()
    assert_bitwise(before, m.variables)


def test_deterministic_given_a_seed_float32_and_finite_differences():
    m = Model()
    a = gd.hessian_trace(m.variables, m.loss, samples=5, seed=11).samples.numpy()
    b = gd.hessian_trace(m.variables, m.loss, samples=5, seed=11).samples.numpy()
    c = gd.hessian_trace(m.variables, m.loss, samples=5, seed=12).samples.numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    top = exact_spectrum()[-1]
    fd = gd.hessian_eigenvalues(m.variables, m.loss, iters=30, hvp="fd")
    assert fd.method == "fd" and float(fd.eigenvalues[0]) == pytest.approx(top, rel=1e-7)
    m32 = Model(tf.float32)
    res = gd.hessian_eigenvalues(m32.variables, m32.loss, iters=30)
    assert res.eigenvalues.dtype == tf.float32 and res.eigenvectors[0][0].dtype == tf.float32
    assert float(res.eigenvalues[0]) == pytest.approx(top, rel=1e-4)


def test_clear_errors():
    m = Model()
    with pytest.raises(TypeError, match="`variables` must be a list of tf.Variable"):
        gd.gradient_norm(m.variables[0], m.loss)
    with pytest.raises(TypeError, match="`loss_fn` of .* must be a callable"):
        gd.gradient_norm(m.variables, None)
    with pytest.raises(gradnorm.ClosureError, match="scalar loss"):
        gd.gradient_norm(m.variables, lambda: tf.ones(3, tf.float64) * m.loss())
    with pytest.raises(ValueError, match="`k` must be at most the number of parameters"):
        gd.hessian_eigenvalues(m.variables, m.loss, k=116)
    with pytest.raises(ValueError, match="`which` must be one of"):
        gd.hessian_eigenvalues(m.variables, m.loss, which="BE")
    with pytest.raises(ValueError, match="`method` must be one of"):
        gd.hessian_trace(m.variables, m.loss, method="exact")
    with pytest.raises(ValueError, match="`hvp` of gradnorm.tf.diagnostics.measure must be one of"):
        gd.measure(m.variables, m.loss, hvp="reverse_over_reverse")
    with pytest.raises(ValueError, match="`quantities` must be a sequence of names"):
        gd.measure(m.variables, m.loss, quantities="trace")
    with pytest.raises(TypeError, match="`seed` must be a non-negative int"):
        gd.hessian_trace(m.variables, m.loss, seed=-2)
    with pytest.raises(TypeError, match="`probes` of .* must be 'tf', 'numpy' or an object with `rademacher"):
        gd.hessian_trace(m.variables, m.loss, probes=object())
    with pytest.raises(ValueError, match="`probes` of .* must be 'tf', 'numpy' or an object"):
        gd.hessian_trace(m.variables, m.loss, probes="jax")
    assert_bitwise(Model().values(), m.variables)


# ----------------------------------------------------------------------------------------------
# the Keras callback


keras = pytest.importorskip("keras")


class Recorder(keras.callbacks.Callback):
    """What the callbacks after DiagnosticsCallback see in the batch logs."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(dict(logs or {}))


def _fit(wrap, callbacks, epochs=2):
    import gradnorm.tf.keras as gk

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dropout(0.3),
                              keras.layers.Dense(3)])
    trainer = gk.GradnormModel(model, rule="sam", rho=0.05) if wrap else model
    trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                    loss=keras.losses.CategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    keras.utils.set_random_seed(2)
    X, Y = MLP.data["X"].astype("float32"), MLP.data["Y"].astype("float32")
    history = trainer.fit(X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return trainer, model, history


@pytest.mark.parametrize("wrap", [False, True], ids=["keras_model", "GradnormModel"])
def test_callback_logs_without_changing_the_trajectory(wrap):
    X, Y = MLP.data["X"][:16].astype("float32"), MLP.data["Y"][:16].astype("float32")
    cb = gd.DiagnosticsCallback((X, Y), every=3, quantities=("loss", "grad_norm", "lambda_max"), iters=10)
    recorder = Recorder()
    trainer, model, history = _fit(wrap, [cb, recorder])
    _, plain_model, plain_history = _fit(wrap, [])
    for a, b in zip(model.weights, plain_model.weights):  # the same trajectory, bit for bit
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert history.history["loss"] == plain_history.history["loss"]
    names = ["diag_loss", "diag_grad_norm", "diag_lambda_max"]
    for name in names:
        assert len(history.history[name]) == 2  # one value per epoch, in History
    # 4 batches per epoch, 8 in all: measured after batches 3 and 6, seen by the callbacks after it
    measured = [i + 1 for i, logs in enumerate(recorder.batches) if "diag_lambda_max" in logs]
    assert measured == [3, 6]
    assert [r["batch"] for r in cb.records] == [3, None, 6, None] and [r["epoch"] for r in cb.records] == [0, 0, 1, 1]
    # the last value is the diagnostic of the final weights, with the compiled loss in inference mode
    x, y = tf.constant(X), tf.constant(Y)
    want = gd.measure(trainer.trainable_variables,
                      lambda: trainer.compute_loss(x=x, y=y, y_pred=trainer(x, training=False), training=False),
                      quantities=("loss", "grad_norm", "lambda_max"), iters=10)
    for name in ("loss", "grad_norm", "lambda_max"):
        assert history.history["diag_" + name][-1] == pytest.approx(float(want[name]), rel=1e-5)


def test_callback_errors():
    data = (MLP.data["X"], MLP.data["Y"])
    with pytest.raises(TypeError, match="`data` of gradnorm.tf.diagnostics.DiagnosticsCallback must be a tuple"):
        gd.DiagnosticsCallback(MLP.data["X"])
    with pytest.raises(ValueError, match="`every` must be an int >= 1"):
        gd.DiagnosticsCallback(data, every=0)
    with pytest.raises(ValueError, match="would never measure"):
        gd.DiagnosticsCallback(data, at_epoch_end=False)
    with pytest.raises(ValueError, match="`quantities` of gradnorm.tf.diagnostics.DiagnosticsCallback"):
        gd.DiagnosticsCallback(data, quantities=("sharpness",))
    with pytest.raises(RuntimeError, match="needs a model"):
        gd.DiagnosticsCallback(data).measure()
