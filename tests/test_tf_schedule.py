"""GR warm-up in TensorFlow and Keras: `gradnorm.schedules` evaluated on a step counter inside a
``tf.function`` around `gradnorm.tf.step` (one trace), and `gradnorm.schedules.RuleSchedulerCallback`
driving `gradnorm.keras.GradnormModel` in ``fit()``. The strength at every step is the hand-written
float32 ramp, the trajectory a NumPy loop with the analytic gradient, and the "zero" strategy runs
the loss once per step while it is off (counted by a variable that only the passes that run
increment: ``tf.cond`` does not run the branch not taken)."""

from __future__ import annotations

import numpy as np
import pytest

import gradnorm
from gradnorm.schedules import gnp_warmup
from tests._warmup import ALPHA, F32, LR, STEPS, W0, WARM, XS, YS, R, expected_values, numpy_trajectory

tf = pytest.importorskip("tensorflow")
gtf = pytest.importorskip("gradnorm.tf")

@pytest.mark.parametrize("strategy", ["r", "lambda", "zero"])
def test_tf_function_custom_loop_warmup(strategy):
    w = tf.Variable(W0, dtype=tf.float64)
    x, y = tf.constant(XS), tf.constant(YS)
    passes = tf.Variable(0, dtype=tf.int64)
    count = tf.Variable(0, dtype=tf.int64)
    schedules = gnp_warmup(strategy, r=R, alpha=ALPHA, warmup_steps=WARM)

    def loss_fn():
        passes.assign_add(1)
        return 0.5 * tf.reduce_mean((tf.linalg.matvec(x, w) - y) ** 2)

    @tf.function
    def train_step():
        values = {k: s(count) for k, s in schedules.items()}  # 0-d float tensors of this step
        res = gtf.step([w], loss_fn, rule="gnp", mix_unit_gradient=True, norm_eps=0.0, **values)
        w.assign_sub(LR * res.grad[0])
        count.assign_add(1)
        return values["r"], values["alpha"], res.info["grad_evals"]

    seen_r, seen_a, evals, reported, traj = [], [], [], [], []
    for _ in range(STEPS):
        passes.assign(0)
        r, a, spent = train_step()
        seen_r.append(float(r.numpy()))
        seen_a.append(float(a.numpy()))
        evals.append(int(passes.numpy()))
        reported.append(int(spent.numpy()))
        traj.append(w.numpy().copy())
    assert train_step.experimental_get_tracing_count() == 1
    rs, alphas = expected_values(strategy)
    # float32 tensors: the ramp exactly; the constants (0.1, 0.8) as float32 numbers
    assert seen_r == [float(F32(v)) for v in rs] and seen_a == [float(F32(v)) for v in alphas]
    want_evals = [1 if (r == 0 or a == 0) else 2 for r, a in zip(rs, alphas)]
    assert evals == reported == want_evals
    if strategy == "zero":
        assert evals == [1] * WARM + [2] * (STEPS - WARM)
    # the constant schedules are float32 tensors here (TensorFlow's default float): the reference uses
    # the values the step received
    np.testing.assert_allclose(np.array(traj), numpy_trajectory(seen_r, seen_a), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# Keras fit() with the callback


keras = pytest.importorskip("keras")
gk = pytest.importorskip("gradnorm.keras")

_PASSES = tf.Variable(0, dtype=tf.int64)  # not a layer's weight: nothing saves or restores it


def _counting_model():
    class Count(keras.layers.Layer):
        def call(self, inputs):
            _PASSES.assign_add(1)
            return inputs

    inner = keras.Sequential([
        keras.Input((3,), dtype="float64"),
        Count(dtype="float64"),
        keras.layers.Dense(1, use_bias=False, dtype="float64", kernel_initializer=keras.initializers.Constant(W0[:, None])),
    ])
    return inner


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the pass counter is a TensorFlow variable")
@pytest.mark.parametrize("strategy", ["r", "lambda", "zero"])
def test_keras_callback_warmup(strategy):
    if not hasattr(gk.GradnormModel, "set_rule_hyperparameters"):
        pytest.skip("gradnorm.keras.GradnormModel has no set_rule_hyperparameters, which the callback drives")
    class Half(keras.losses.Loss):  # float64 (a function as loss would be computed in floatx, float32)
        def call(self, y_true, y_pred):
            return 0.5 * keras.ops.square(y_pred - y_true)

    model = gk.GradnormModel(_counting_model(), "gnp", r=R, alpha=ALPHA, mix_unit_gradient=True, norm_eps=0.0)
    model.compile(optimizer=keras.optimizers.SGD(LR), loss=Half(dtype="float64"))
    callback = gradnorm.schedules.RuleSchedulerCallback(gnp_warmup(strategy, r=R, alpha=ALPHA, warmup_steps=WARM))

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.passes, self.weights = [], []

        def on_train_batch_begin(self, batch, logs=None):
            _PASSES.assign(0)

        def on_train_batch_end(self, batch, logs=None):
            self.passes.append(int(_PASSES.numpy()))
            self.weights.append(keras.ops.convert_to_numpy(model.trainable_weights[0]).ravel())

    record = Record()
    data = tf.data.Dataset.from_tensors((XS, YS[:, None]))  # float64 (NumPy arrays would be cast to floatx)
    model.fit(data, epochs=STEPS, shuffle=False, verbose=0, callbacks=[callback, record])
    rs, alphas = expected_values(strategy)
    assert [step for step, _ in callback.history] == list(range(STEPS))
    assert [v["r"] for _, v in callback.history] == rs
    assert [v["alpha"] for _, v in callback.history] == alphas
    want_evals = [1 if (r == 0 or a == 0) else 2 for r, a in zip(rs, alphas)]
    assert record.passes == want_evals
    if strategy == "zero":
        assert record.passes == [1] * WARM + [2] * (STEPS - WARM)
    # a Keras optimizer holds its learning rate in a float32 variable: float32(0.1)
    want = numpy_trajectory(rs, alphas, [float(F32(LR))] * len(rs))
    np.testing.assert_allclose(np.array(record.weights), want, rtol=1e-12, atol=0)


def test_keras_callback_refuses_a_model_without_set_rule_hyperparameters():
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    plain.compile(optimizer="sgd", loss="mse")
    callback = gradnorm.schedules.RuleSchedulerCallback({"r": gradnorm.schedules.linear_warmup(0.1, 3)})
    with pytest.raises(TypeError, match="set_rule_hyperparameters.*gradnorm.keras.GradnormModel"):
        plain.fit(XS.astype("float32"), YS[:, None].astype("float32"), epochs=1, verbose=0, callbacks=[callback])


def test_keras_callback_bad_arguments():
    with pytest.raises(TypeError, match="`schedules` of gradnorm.schedules.RuleSchedulerCallback must be a non-empty dict"):
        gradnorm.schedules.RuleSchedulerCallback([0.1])
    with pytest.raises(ValueError, match="`verbose`.*must be 0 or 1. Received: 2"):
        gradnorm.schedules.RuleSchedulerCallback({"r": gradnorm.schedules.constant(0.1)}, verbose=2)


def test_the_callback_is_gradnorm_keras_rule_scheduler():
    import gradnorm.keras

    assert gradnorm.keras.RuleScheduler is gradnorm.schedules.RuleSchedulerCallback
    assert issubclass(gradnorm.keras.RuleScheduler, keras.callbacks.Callback)
