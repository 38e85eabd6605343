"""gradnorm.tf.keras: fit() trains with the rule's direction (the trajectory of the NumPy core with
hand-written derivatives), logs the first pass's loss and metrics, validates and calls callbacks as
usual, keeps BatchNorm statistics of the unperturbed pass, works with any optimizer (Adam, loss
scaling), restores the weights when a step fails, reports non-finite steps, and saves."""

from __future__ import annotations

import numpy as np
import pytest

import gradnorm
from conformance.problems import PROBLEMS
from conformance.reference import base_update

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip("gradnorm.tf.keras needs the TensorFlow backend of Keras", allow_module_level=True)
gt = pytest.importorskip("gradnorm.tf")
gt_keras = pytest.importorskip("gradnorm.tf.keras")

MLP = PROBLEMS["mlp"]  # 4-8-6-3 tanh perceptron, softmax cross-entropy, hand-written NumPy derivatives
LAYERS = ("hidden1", "hidden2", "out")
X, Y = MLP.data["X"], MLP.data["Y"]


def flat_params(tree):
    return [tree[name][k] for name in LAYERS for k in ("w", "b")]


def as_tree(flat):
    return {name: {"w": flat[2 * i], "b": flat[2 * i + 1]} for i, name in enumerate(LAYERS)}


def np_grad_fn(flat, x=X, y=Y):
    loss, g = MLP.grad(as_tree(flat), {"X": x, "Y": y})
    return loss, flat_params(g)


def np_hvp_fn(flat, v):
    return flat_params(MLP.hvp(as_tree(flat), as_tree(v), MLP.data))


def np_logits(flat, x):
    h = x
    for i in range(2):
        h = np.tanh(h @ flat[2 * i] + flat[2 * i + 1])
    return h @ flat[4] + flat[5]


def keras_mlp(dtype="float32"):
    model = keras.Sequential([keras.Input((4,), dtype=dtype), keras.layers.Dense(8, activation="tanh", dtype=dtype),
                              keras.layers.Dense(6, activation="tanh", dtype=dtype), keras.layers.Dense(3, dtype=dtype)])
    model.set_weights([p.astype(dtype) for p in flat_params(MLP.params0())])
    return model


def reference(rule, hyper, steps, lr, momentum):
    """The NumPy core's trajectory from the same start: parameters before each step and after the last."""
    params = flat_params(MLP.params0())
    apply = base_update("momentum", lr, momentum)
    rule_obj = gradnorm.rules.get(rule, **hyper)
    shapes = [p.shape for p in params]
    out, state = [params], None
    for _ in range(steps):
        res = gradnorm.step(params, np_grad_fn, rule=rule_obj, state=state, hvp_fn=np_hvp_fn)
        state = res.state
        x = apply(np.concatenate([p.ravel() for p in params]), np.concatenate([d.ravel() for d in res.grad]))
        params, i = [], 0
        for s in shapes:
            n = int(np.prod(s))
            params.append(x[i:i + n].reshape(s))
            i += n
        out.append(params)
    return out


def np_loss(flat, x, y):
    return float(MLP.grad(as_tree(flat), {"X": x, "Y": y})[0])


def assert_weights(model, params, rtol=2e-5):
    for got, want in zip(model.get_weights(), params):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)


def loss_object():
    return keras.losses.CategoricalCrossentropy(from_logits=True)


# ----------------------------------------------------------------------------------------------


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(dict(logs))


def test_fit_follows_the_core_and_logs_the_first_pass():
    """SAM with SGD + momentum (Keras's convention equals the reference's): the weights follow the
    NumPy trajectory; each epoch's logged loss and accuracy are those at the weights before its
    (single) step, val_loss the one after it; callbacks see the logs."""
    rng = np.random.default_rng(5)
    xv = rng.normal(size=(16, 4))
    yv = np.eye(3)[rng.integers(0, 3, size=16)]
    trainer = gt_keras.GradnormModel(keras_mlp(), rule="sam", rho=0.05)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss_object(),
                    metrics=["categorical_accuracy"])
    recorder = Recorder()
    history = trainer.fit(X, Y, batch_size=32, epochs=3, shuffle=False, validation_data=(xv, yv),
                          callbacks=[recorder], verbose=0).history
    traj = reference("sam", {"rho": 0.05}, 3, 0.05, 0.9)
    assert_weights(trainer.model, traj[-1])
    for k in range(3):
        assert history["loss"][k] == pytest.approx(np_loss(traj[k], X, Y), rel=1e-5)
        accuracy = np.mean(np.argmax(np_logits(traj[k], X), 1) == np.argmax(Y, 1))
        assert history["categorical_accuracy"][k] == pytest.approx(accuracy, abs=1e-6)
        assert history["val_loss"][k] == pytest.approx(np_loss(traj[k + 1], xv, yv), rel=1e-5)
        assert history["nonfinite_steps"][k] == 0
    assert len(recorder.batches) == 3 and {"loss", "categorical_accuracy", "nonfinite_steps"} <= set(recorder.batches[0])
    assert trainer.evaluate(xv, yv, verbose=0)[0] == pytest.approx(history["val_loss"][-1], rel=1e-6)


@pytest.mark.parametrize("rule,hyper,mode,dtype", [
    ("gr", {"gamma": 0.1}, "graph", "float64"),                                 # HVPs in a Keras step; float64 kept
    ("coherent", {"lam": 0.3, "threshold": 0.3, "delay": 2}, "xla", "float32"),  # rule state between steps; XLA
    ("gam", {"adaptive": True, "variant": "paper"}, "eager", "float32"),         # four passes, run_eagerly
])
def test_fit_follows_the_core(rule, hyper, mode, dtype):
    # float64: a learning rate and a momentum exact in float32 (Keras keeps them in its floatx), the loss
    # in float64 and a dataset (Keras converts NumPy float arrays to floatx)
    lr, momentum = (0.25, 0.5) if dtype == "float64" else (0.05, 0.9)
    trainer = gt_keras.GradnormModel(keras_mlp(dtype), rule=rule, **hyper)
    trainer.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), run_eagerly=mode == "eager",
                    jit_compile=mode == "xla", loss=keras.losses.CategoricalCrossentropy(from_logits=True, dtype=dtype))
    trainer.fit(tf.data.Dataset.from_tensor_slices((X.astype(dtype), Y.astype(dtype))).batch(32), epochs=4, shuffle=False,
                verbose=0)
    traj = reference(rule, hyper, 4, lr, momentum)
    assert_weights(trainer.model, traj[-1], rtol=1e-12 if dtype == "float64" else 2e-5)
    # the trajectory is not the plain gradient's (the rule did something)
    plain = reference("sgd", {}, 4, lr, momentum)[-1]
    assert max(np.abs(a - b).max() for a, b in zip(trainer.model.get_weights(), plain)) > 1e-4


def test_batchnorm_statistics_come_from_the_unperturbed_pass():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), keras.layers.BatchNormalization(momentum=0.5),
                              keras.layers.Dense(3)])
    w, b = (v.numpy() for v in model.layers[0].trainable_variables)
    bn = model.layers[1]
    mean0, var0 = bn.moving_mean.numpy(), bn.moving_variance.numpy()
    trainer = gt_keras.GradnormModel(model, rule="sam", rho=0.5)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_object())
    trainer.fit(X.astype(np.float32), Y, batch_size=32, epochs=1, verbose=0)
    h = X.astype(np.float32) @ w + b  # the BatchNorm input at the unperturbed weights
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.5 * mean0 + 0.5 * h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.5 * var0 + 0.5 * h.var(0), rtol=1e-5, atol=1e-6)


def test_same_randomness_replays_the_dropout_masks():
    """With a radius of 1e-8 SAM's perturbed point is the weights to 1e-8 (a radius of 0 would skip the
    second pass): replaying the first pass's dropout masks makes each step the plain gradient step, as
    Keras's own fit takes it (the random state also advances as in plain Keras); fresh masks give
    another trajectory."""
    def dropout_mlp():
        keras.utils.set_random_seed(7)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="tanh"),
                                  keras.layers.Dropout(0.5), keras.layers.Dense(3)])
        return model

    def train(model):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_object(), run_eagerly=True)
        model.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        return model.get_weights() if not isinstance(model, gt_keras.GradnormModel) else model.model.get_weights()

    plain = train(dropout_mlp())
    tiny = tf.constant(1e-8)
    same = train(gt_keras.GradnormModel(dropout_mlp(), rule="sam", rho=tiny, same_randomness=True))
    fresh = train(gt_keras.GradnormModel(dropout_mlp(), rule="sam", rho=tiny))
    for a, b in zip(same, plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(fresh, plain)) > 1e-4


def test_any_optimizer_sgd_rule_equals_plain_keras_with_adam():
    plain = keras_mlp()
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss_object(), run_eagerly=True)
    plain.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    trainer = gt_keras.GradnormModel(keras_mlp(), rule="sgd")
    trainer.compile(optimizer=keras.optimizers.Adam(0.01), loss=loss_object(), run_eagerly=True)
    trainer.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(trainer.model.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_loss_scale_optimizer_scale_is_removed_for_the_rule():
    """fd_gr's finite-difference step is eps * g: the rule must see the unscaled gradient, or the
    step would be 2**15 times too large. A LossScaleOptimizer then gives the plain SGD trajectory."""
    hyper = {"gamma": 0.1, "eps": 0.05}
    runs = []
    for opt in (keras.optimizers.SGD(0.05), keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05))):
        trainer = gt_keras.GradnormModel(keras_mlp(), rule="fd_gr", **hyper)
        trainer.compile(optimizer=opt, loss=loss_object(), run_eagerly=True)
        trainer.fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        runs.append(trainer.model.get_weights())
    traj = reference("fd_gr", hyper, 2, 0.05, 0.0)
    for weights in runs:
        for got, want in zip(weights, traj[-1]):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


class Barrier(keras.layers.Layer):
    """Dense, plus a term that fails at perturbed weights: an assertion (raising at run time) or a
    square root that becomes NaN, once the kernel's largest entry passes `limit`."""

    def __init__(self, limit, mode, **kwargs):
        super().__init__(**kwargs)
        self.limit, self.mode = limit, mode
        self.dense = keras.layers.Dense(3)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x):
        top = tf.reduce_max(self.dense.kernel)
        if self.mode == "assert":
            with tf.control_dependencies([tf.debugging.assert_less(top, self.limit)]):
                return tf.identity(self.dense(x))
        return self.dense(x) - tf.sqrt(self.limit - top)


def barrier_model(mode):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), Barrier(0.0, mode)])
    top = float(model.layers[0].dense.kernel.numpy().max())
    model.layers[0].limit = top + 1e-3  # holds at the weights; the ascent step of rho=1 crosses it
    return model


@pytest.mark.parametrize("eager", [False, True])
def test_weights_are_restored_when_a_step_fails(eager):
    model = barrier_model("assert")
    before = [w.copy() for w in model.get_weights()]
    trainer = gt_keras.GradnormModel(model, rule="sam", rho=1.0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_object(), run_eagerly=eager)
    with pytest.raises(tf.errors.InvalidArgumentError):
        trainer.fit(X.astype(np.float32), Y, batch_size=32, epochs=1, verbose=0)
    for got, want in zip(model.get_weights(), before):
        assert got.tobytes() == want.tobytes()


def test_nonfinite_steps_are_reported():
    trainer = gt_keras.GradnormModel(barrier_model("nan"), rule="sam", rho=1.0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_object())
    history = trainer.fit(X.astype(np.float32), Y, batch_size=32, epochs=1, verbose=0).history
    # the loss at the weights is finite, the direction (the gradient at the perturbed point) is not
    assert np.isfinite(history["loss"][0]) and history["nonfinite_steps"] == [1]
    history = trainer.fit(X.astype(np.float32), Y, batch_size=32, epochs=1, verbose=0).history
    assert history["nonfinite_steps"] == [2]  # counted over the model's training, as Keras applied it


class Net(gt_keras.GradnormTrainStep, keras.Model):
    def __init__(self):
        super().__init__()
        self.body = keras_mlp()

    def call(self, x, training=False):
        return self.body(x, training=training)


def test_the_mixin_trains_a_subclassed_model():
    net = Net()
    net.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss_object(), run_eagerly=True)
    with pytest.raises(RuntimeError, match="set_rule"):
        net.fit(X, Y, batch_size=32, epochs=1, verbose=0)
    net = Net()
    net.set_rule("gnp", r=0.05, alpha=0.8)
    assert net.rule == gradnorm.rules.GNP(r=0.05, alpha=0.8)
    net.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss_object(), run_eagerly=True)
    net.fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert_weights(net.body, reference("gnp", {"r": 0.05, "alpha": 0.8}, 2, 0.05, 0.9)[-1])


class LazyNet(gt_keras.GradnormTrainStep, keras.Model):
    """Its layers are built by the first call, inside the first trace of the training function."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.out(self.hidden(x))


def test_a_model_built_inside_the_training_function():
    net = LazyNet()
    net.set_rule("coherent", lam=0.1, threshold=-1.0, delay=1)
    net.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_object())
    assert not net.trainable_variables
    history = net.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0).history
    assert len(net.trainable_variables) == 4 and np.isfinite(history["loss"][0])
    assert int(net._gradnorm_settings.runtime.state_vars[0].numpy()) == 4  # the rule state counted the 4 steps


def test_save_and_load(tmp_path):
    trainer = gt_keras.GradnormModel(keras_mlp(), rule="fd_gr", gamma=0.1, eps=0.05, difference="central")
    trainer.compile(optimizer="sgd", loss=loss_object())
    path = tmp_path / "trainer.keras"
    trainer.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, gt_keras.GradnormModel) and loaded.rule == trainer.rule
    np.testing.assert_allclose(loaded.predict(X, verbose=0), trainer.predict(X, verbose=0), rtol=1e-6)


COHERENT = {"lam": 0.3, "threshold": 0.3, "delay": 2}  # the delay counts steps: the state matters after a reload


def full_batch():
    return tf.data.Dataset.from_tensor_slices((X.astype("float32"), Y.astype("float32"))).batch(32)


def test_a_saved_model_resumes_the_same_trajectory(tmp_path):
    """2 steps, `save` (weights, optimizer momentum, rule state), `load_model`, 2 more steps: the
    NumPy trajectory of 4 uninterrupted steps (a restarted step count would repeat the delay)."""
    trainer = gt_keras.GradnormModel(keras_mlp(), rule="coherent", **COHERENT)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss_object())
    trainer.fit(full_batch(), epochs=2, shuffle=False, verbose=0)
    path = tmp_path / "trainer.keras"
    trainer.save(path)
    loaded = keras.models.load_model(path)
    loaded.fit(full_batch(), epochs=2, shuffle=False, verbose=0)
    assert int(loaded._gradnorm_settings.runtime.state_vars[0].numpy()) == 4
    assert_weights(loaded.model, reference("coherent", COHERENT, 4, 0.05, 0.9)[-1])


def test_weights_files_carry_the_rule_state(tmp_path):
    """`save_weights` of a trained wrapper, `load_weights` into a fresh one (the state waits for its
    training function) and into a trained one (the state is set at once)."""
    trainer = gt_keras.GradnormModel(keras_mlp(), rule="coherent", **COHERENT)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss_object())
    trainer.fit(full_batch(), epochs=2, shuffle=False, verbose=0)
    path = str(tmp_path / "trainer.weights.h5")
    trainer.save_weights(path)
    fresh = gt_keras.GradnormModel(keras_mlp(), rule="coherent", **COHERENT)
    fresh.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss_object())
    fresh.load_weights(path)
    fresh.fit(full_batch(), epochs=2, shuffle=False, verbose=0)
    assert_weights(fresh.model, reference("coherent", COHERENT, 4, 0.05, 0.0)[-1])
    trainer.fit(full_batch(), epochs=1, shuffle=False, verbose=0)
    trainer.load_weights(path)
    assert int(trainer._gradnorm_settings.runtime.state_vars[0].numpy()) == 2


def test_a_rule_state_loads_only_into_its_rule(tmp_path):
    trainer = gt_keras.GradnormModel(keras_mlp(), rule="coherent", **COHERENT)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss_object())
    trainer.fit(full_batch(), epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "trainer.weights.h5")
    trainer.save_weights(path)
    other = gt_keras.GradnormModel(keras_mlp(), rule="sam", rho=0.05)
    with pytest.raises(ValueError, match="rule 'sam' keeps 0"):
        other.load_weights(path)  # (Keras still loads the other layers, as for any layer it refuses)
    assert other._gradnorm_settings.loaded_state is None and other.rule.name == "sam"
    stateless = gt_keras.GradnormModel(keras_mlp(), rule="sam", rho=0.05)  # no state: files as before
    stateless.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss_object())
    stateless.fit(full_batch(), epochs=1, shuffle=False, verbose=0)
    stateless.save_weights(path)
    plain = gt_keras.GradnormModel(keras_mlp(), rule="sam", rho=0.05)
    plain.load_weights(path)
    assert_weights(plain.model, stateless.model.get_weights(), rtol=0)


def test_bad_arguments_are_refused():
    with pytest.raises(gradnorm.HyperparameterError, match="`rho`"):
        gt_keras.GradnormModel(keras_mlp(), rule="sam")
    with pytest.raises(ValueError, match="`perturbation`"):
        gt_keras.GradnormModel(keras_mlp(), rule="sgd", perturbation="both")
    with pytest.raises(TypeError, match="`model`"):
        gt_keras.GradnormModel("mlp", rule="sgd")
