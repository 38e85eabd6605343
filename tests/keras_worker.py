"""Worker of tests/test_keras.py: runs gradnorm.keras on the Keras backend named by KERAS_BACKEND (set
before Keras is imported, hence a process per backend) and saves what the test compares.

    KERAS_BACKEND=jax python tests/keras_worker.py OUT.npz [scenario ...]

Scenarios (all by default):

* ``cross``: a Dense + BatchNorm + Dense model from fixed NumPy weights, three steps of ``fit`` on
  three minibatches with SGD + momentum, for the rules sam, gnp, fd_gr, gam, gr, in float64
  (``keras.config.set_floatx``) and float32: the weights (with the BatchNorm statistics) and the
  logged losses; and the same three steps by a hand loop on the backend's gradnorm adapter
  (``gradnorm.tf.step``, ``gradnorm.jax.step``, ``gradnorm.torch.step`` over ``stateless_call``),
  with the momentum update in NumPy and the BatchNorm statistics of the unperturbed pass.
* ``schedule``: sam whose radius a callback changes with ``set_rule_hyperparameters`` before the
  second step (float64), against the hand loop with that schedule; the number of traces of the
  training step before and after the change.
* ``resume``: looksam (stateful) trained 2 steps, saved to a ``.keras`` file, loaded, trained 2 more
  steps, against 4 uninterrupted steps (float64).
* ``dropout``: SAM of radius 1e-7 with dropout: ``same_randomness=True`` against plain Keras ``fit``
  (the same masks: the plain gradient step, to 1e-7) and fresh masks (another trajectory).
* ``features``: metrics, validation, a callback, ``evaluate``/``predict``; ``run_eagerly`` and
  ``jit_compile=True`` (not on torch); the mixin on a subclassed model.
* ``mixed``: a ``mixed_bfloat16`` policy, two steps of sam: the loss and weights stay finite; a
  ``mixed_float16`` policy (compile adds a ``LossScaleOptimizer``) with fd_gr near the float32 run.
* ``docs``: the Python of docs/adapters/keras.md runs on this backend.
* ``errors``: a bad hyperparameter value and an unknown name for set_rule_hyperparameters; on torch
  ``jit_compile=True``.

Every array is saved under ``scenario/...`` keys; strings (error messages) in a JSON beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile

import numpy as np

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
if BACKEND == "jax":
    import jax

    jax.config.update("jax_enable_x64", True)

import keras  # noqa: E402
from keras.src.backend.common import dtypes as _keras_dtypes  # noqa: E402

# Keras 3 computes ops of a float64 model in float32 on the jax and torch backends ("force to be 32-bit
# dtype when encountering 64-bit dtype": its type promotion maps float64 results to float32 there, so a
# Dense layer's matmul on torch and tanh on jax round to float32). The float64 runs lift that, in this
# process only and while they run, so that they check gradnorm's float64 arithmetic, not Keras's
# promotion (GRADNORM_KERAS_FLOAT64=keras keeps Keras's behaviour, for the table in docs/adapters/keras.md).
EXACT_FLOAT64 = os.environ.get("GRADNORM_KERAS_FLOAT64", "exact") == "exact"


@contextlib.contextmanager
def precision(dtype: str):
    """floatx `dtype` while the block runs (float32 after it); float64 computed in float64 (see above)."""
    table = _keras_dtypes.BIT64_TO_BIT32_DTYPE
    before = table["float64"]
    if dtype == "float64" and EXACT_FLOAT64:
        table["float64"] = "float64"
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)  # Keras caches the default policy at the first layer it makes
    try:
        yield
    finally:
        table["float64"] = before
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")

import gradnorm  # noqa: E402
import gradnorm.keras as gk  # noqa: E402

assert keras.backend.backend() == BACKEND

# case: (rule, hyperparameters, with BatchNorm). Exact GR runs without BatchNorm: TensorFlow's
# second derivative through Keras's BatchNormalization is not the exact one (tf.nn.moments stops the
# gradient of the mean inside the variance, which changes no first derivative but the Hessian); "gr_bn"
# shows it (jax and torch agree, tensorflow differs).
CASES = {
    "sam": ("sam", {"rho": 0.05}, True),
    "gnp": ("gnp", {"r": 0.05, "alpha": 0.8}, True),
    "fd_gr": ("fd_gr", {"gamma": 0.1, "eps": 0.01}, True),
    "gam": ("gam", {}, True),
    "gr": ("gr", {"gamma": 0.1}, False),
    "gr_bn": ("gr", {"gamma": 0.1}, True),
}
STEPS, BATCH = 3, 16
rng = np.random.default_rng(0)
X = rng.normal(size=(STEPS * BATCH, 4))
Y = np.eye(3)[rng.integers(0, 3, size=STEPS * BATCH)]
W0 = [rng.normal(size=(4, 5)) * 0.7, rng.normal(size=5) * 0.1, 1.0 + 0.1 * rng.normal(size=5), 0.1 * rng.normal(size=5),
      np.zeros(5), np.ones(5), rng.normal(size=(5, 3)) * 0.7, rng.normal(size=3) * 0.1]
OPT = {"float64": (0.25, 0.5), "float32": (0.05, 0.9)}  # lr and momentum; float64: exact in float32 too

out: dict[str, np.ndarray] = {}
messages: dict[str, str] = {}


def model(dtype: str, dropout: float = 0.0, batchnorm: bool = True) -> keras.Model:
    layers = [keras.Input((4,), dtype=dtype), keras.layers.Dense(5, activation="tanh", dtype=dtype)]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(momentum=0.5, dtype=dtype))
    if dropout:
        layers.append(keras.layers.Dropout(dropout, seed=3, dtype=dtype))
    m = keras.Sequential(layers + [keras.layers.Dense(3, dtype=dtype)])
    m.set_weights([w.astype(dtype) for w in (W0 if batchnorm else W0[:2] + W0[6:])])
    return m


def loss_object() -> keras.losses.Loss:
    return keras.losses.CategoricalCrossentropy(from_logits=True)


def data(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return X.astype(dtype), Y.astype(dtype)


class Losses(keras.callbacks.Callback):
    """The logged loss of every step, and the inner model's weights after the first."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []
        self.first: list[np.ndarray] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.values.append(float(logs["loss"]))
        if batch == 0:
            self.first = self.model.model.get_weights()


class Schedule(keras.callbacks.Callback):
    """Sets the rule's hyperparameters before given steps (what a warm-up callback does)."""

    def __init__(self, at: dict[int, dict[str, float]]) -> None:
        super().__init__()
        self.at = at
        self.traces: list[int] = []

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if batch in self.at:
            self.model.set_rule_hyperparameters(**self.at[batch])

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.traces.append(self.model._gradnorm_settings.runtime.traces)


def keras_run(dtype: str, rule: str, hyper: dict, *, callbacks: list | None = None, steps: int = STEPS,
              batchnorm: bool = True) -> keras.Model:
    inner = model(dtype, batchnorm=batchnorm)
    trainer = gk.GradnormModel(inner, rule=rule, **hyper)
    lr, momentum = OPT[dtype]
    trainer.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), loss=loss_object())
    x, y = data(dtype)
    trainer.fit(x[: steps * BATCH], y[: steps * BATCH], batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                callbacks=callbacks or [])
    return trainer


# -- the hand loops: the backend's gradnorm adapter, written as a user would ----------------------
def hand_loop(dtype: str, rule: str, hyper: dict, schedule: dict[int, dict] | None = None,
              batchnorm: bool = True) -> list[np.ndarray]:
    """Three steps with the backend's adapter: the direction of gradnorm.<backend>.step at the current
    weights, momentum SGD in NumPy, BatchNorm statistics from the pass at the unperturbed weights."""
    m = model(dtype, batchnorm=batchnorm)
    lr, momentum = OPT[dtype]
    x_all, y_all = data(dtype)
    lo = loss_object()
    velocity = [np.zeros(tuple(v.shape), dtype) for v in m.trainable_variables]
    for k in range(STEPS):
        hyper_k = {**hyper, **((schedule or {}).get(k, {}))}
        x, y = x_all[k * BATCH:(k + 1) * BATCH], y_all[k * BATCH:(k + 1) * BATCH]
        weights = [np.asarray(keras.ops.convert_to_numpy(v)) for v in m.trainable_variables]
        if BACKEND == "tensorflow":
            import tensorflow as tf

            import gradnorm.tf as gt

            xt, yt = tf.constant(x), tf.constant(y)
            res = gt.step(m.trainable_variables, lambda: lo(yt, m(xt, training=True)), rule=rule,
                          moving_stats=m.non_trainable_weights, **hyper_k)
            direction = [d.numpy() for d in res.grad]
        elif BACKEND == "jax":
            import jax.numpy as jnp

            import gradnorm.jax as gj

            nt = [v.value for v in m.non_trainable_variables]

            def loss_fn(p: list, x: jnp.ndarray, y: jnp.ndarray) -> tuple:
                y_pred, new_nt = m.stateless_call(p, nt, x, training=True)
                return lo(y, y_pred), new_nt

            res = gj.step([jnp.asarray(w) for w in weights], loss_fn, jnp.asarray(x), jnp.asarray(y), rule=rule,
                          has_aux=True, **hyper_k)
            direction = [np.asarray(d) for d in res.grad]
            for v, value in zip(m.non_trainable_variables, res.loss[1]):
                v.assign(value)
        else:
            import torch

            import gradnorm.torch as gtorch

            nt = [v.value.detach().clone() for v in m.non_trainable_variables]
            xt, yt = torch.as_tensor(x), torch.as_tensor(y)

            def loss_fn(p: list, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                y_pred, _ = m.stateless_call(p, nt, x, training=True)
                return lo(y, y_pred)

            res = gtorch.step([torch.as_tensor(w) for w in weights], loss_fn, xt, yt, rule=rule, **hyper_k)
            direction = [d.detach().numpy() for d in res.grad]
            _, new_nt = m.stateless_call([torch.as_tensor(w) for w in weights], nt, xt, training=True)  # the unperturbed pass
            for v, value in zip(m.non_trainable_variables, new_nt):
                v.assign(value.detach())
        for j, (w, d) in enumerate(zip(weights, direction)):
            velocity[j] = momentum * velocity[j] + d
            m.trainable_variables[j].assign((w - lr * velocity[j]).astype(dtype))
    return [np.asarray(w) for w in m.get_weights()]


def put(key: str, arrays: list[np.ndarray]) -> None:
    for i, a in enumerate(arrays):
        out[f"{key}/{i}"] = np.asarray(a)


# -- scenarios ----------------------------------------------------------------------------------
def cross() -> None:
    out["cross/x"] = X
    put("cross/start/bn", W0)
    put("cross/start/plain", W0[:2] + W0[6:])
    for dtype in ("float64", "float32"):
        for case, (rule, hyper, bn) in CASES.items():
            if case == "gr_bn" and dtype == "float32":
                continue  # shown in float64 only
            with precision(dtype):
                cross_case(dtype, case, rule, hyper, bn)


def cross_case(dtype: str, case: str, rule: str, hyper: dict, bn: bool) -> None:
    losses = Losses()
    trainer = keras_run(dtype, rule, hyper, callbacks=[losses], batchnorm=bn)
    put(f"cross/{dtype}/{case}/keras", trainer.model.get_weights())
    out[f"cross/{dtype}/{case}/losses"] = np.asarray(losses.values)
    put(f"cross/{dtype}/{case}/step1", losses.first)
    put(f"cross/{dtype}/{case}/hand", hand_loop(dtype, rule, hyper, batchnorm=bn))
    out[f"cross/{dtype}/{case}/nonfinite"] = np.asarray(float(keras.ops.convert_to_numpy(
        trainer._gradnorm_settings.runtime.nonfinite)))


def schedule() -> None:
    at = {1: {"rho": 0.2}, 2: {"rho": 0.0}}
    cb = Schedule(at)
    with precision("float64"):
        trainer = keras_run("float64", "sam", {"rho": 0.05}, callbacks=[cb])
        put("schedule/keras", trainer.model.get_weights())
        put("schedule/hand", hand_loop("float64", "sam", {"rho": 0.05}, schedule=at))
    out["schedule/traces"] = np.asarray(cb.traces)
    out["schedule/rho"] = np.asarray(trainer.rule.config["rho"])


def resume() -> None:
    with precision("float64"):
        _resume()


def _resume() -> None:
    hyper = {"rho": 0.05, "every": 2, "alpha": 0.7}
    dtype = "float64"
    lr, momentum = OPT[dtype]
    x, y = data(dtype)
    x, y = np.concatenate([x[:32], x[:32]]), np.concatenate([y[:32], y[:32]])  # 4 batches

    def fresh() -> keras.Model:
        t = gk.GradnormModel(model(dtype), rule="looksam", **hyper)
        t.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), loss=loss_object())
        return t

    whole = fresh()
    whole.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    first = fresh()
    first.fit(x[:32], y[:32], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trainer.keras")
        first.save(path)
        loaded = keras.models.load_model(path)
    loaded.fit(x[32:], y[32:], batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    put("resume/whole", whole.model.get_weights())
    put("resume/loaded", loaded.model.get_weights())
    put("resume/state_whole", whole._gradnorm_settings.runtime.state_numpy())
    put("resume/state_loaded", loaded._gradnorm_settings.runtime.state_numpy())
    # a looksam state (a counter and a stored component per variable) that is not the initial one
    out["resume/loaded_is_gradnorm"] = np.asarray(isinstance(loaded, gk.GradnormModel))


def dropout() -> None:
    x, y = data("float32")

    def train(t: keras.Model) -> list[np.ndarray]:
        t.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_object())
        t.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        return (t.model if isinstance(t, gk.GradnormModel) else t).get_weights()

    put("dropout/plain", train(model("float32", dropout=0.5)))
    # a radius of 1e-7: the second pass runs (a radius of 0 skips it) at weights 1e-7 from the first's
    put("dropout/same", train(gk.GradnormModel(model("float32", dropout=0.5), rule="sam", rho=1e-7, same_randomness=True)))
    put("dropout/fresh", train(gk.GradnormModel(model("float32", dropout=0.5), rule="sam", rho=1e-7)))


class Net(gk.GradnormTrainStep, keras.Model):
    """A subclassed model with the mixin: the layers of `model`, built by its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = keras.layers.Dense(5, activation="tanh")
        self.norm = keras.layers.BatchNormalization(momentum=0.5)
        self.out = keras.layers.Dense(3)

    def call(self, x: object, training: bool = False) -> object:
        return self.out(self.norm(self.hidden(x), training=training))


def features() -> None:
    """fit's other parts: metrics, validation, callbacks, evaluate and predict; run_eagerly and
    jit_compile giving the same weights; the mixin on a subclassed model."""
    x, y = data("float32")
    xv, yv = x[:16] + 0.5, y[:16]
    lr, momentum = OPT["float32"]
    modes = {"eager": {"run_eagerly": True}}
    if BACKEND != "torch":
        modes["jit"] = {"jit_compile": True}
    for mode, kwargs in modes.items():
        t = gk.GradnormModel(model("float32"), rule="sam", rho=0.05)
        t.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), loss=loss_object(),
                  metrics=["categorical_accuracy"], **kwargs)
        history = t.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, validation_data=(xv, yv),
                        callbacks=[keras.callbacks.EarlyStopping(patience=2)]).history
        put(f"features/{mode}", t.model.get_weights())
        messages[f"features/{mode}/keys"] = ",".join(sorted(history))
        out[f"features/{mode}/val_loss"] = np.asarray(history["val_loss"][-1])
        out[f"features/{mode}/evaluate"] = np.asarray(t.evaluate(xv, yv, verbose=0)[0])
        out[f"features/{mode}/predict"] = np.asarray(t.predict(xv, verbose=0))
        out[f"features/{mode}/inner_predict"] = np.asarray(t.model.predict(xv, verbose=0))
    with precision("float64"):
        mixin()


def mixin() -> None:
    net = Net()
    net.set_rule("gnp", r=0.05, alpha=0.8)
    xd, yd = data("float64")
    net(xd[:2])
    net.set_weights([w.astype("float64") for w in W0])
    lr, momentum = OPT["float64"]
    net.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum), loss=loss_object())
    net.fit(xd, yd, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    put("features/mixin", net.get_weights())


def mixed() -> None:
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        x, y = data("float32")
        m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
        t = gk.GradnormModel(m, rule="sam", rho=0.05)
        t.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss_object())
        history = t.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0).history
        out["mixed/loss"] = np.asarray(history["loss"])
        put("mixed/weights", m.get_weights())
        out["mixed/compute_bf16"] = np.asarray(keras.backend.standardize_dtype(m(x[:2]).dtype) == "bfloat16")
    finally:
        keras.config.set_dtype_policy("float32")
    # float16 with the LossScaleOptimizer compile adds: fd_gr's finite-difference step is eps * g, so the
    # rule must see the unscaled gradient (else the step is 2**15 times too long); near the float32 run
    runs = {}
    for policy in ("mixed_float16", "float32"):
        keras.config.set_dtype_policy(policy)
        try:
            m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)])
            m.set_weights([w.astype("float32") for w in W0[:2] + W0[6:]])
            t = gk.GradnormModel(m, rule="fd_gr", gamma=0.1, eps=0.05)
            t.compile(optimizer=keras.optimizers.SGD(0.05), loss=loss_object())
            t.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
            runs[policy] = m.get_weights()
            messages[f"mixed/{policy}/optimizer"] = type(t.optimizer).__name__
        finally:
            keras.config.set_dtype_policy("float32")
    put("mixed/float16", runs["mixed_float16"])
    put("mixed/float32", runs["float32"])


def errors() -> None:
    t = gk.GradnormModel(model("float32"), rule="sam", rho=0.05)
    for key, kwargs in (("negative", {"rho": -1.0}), ("unknown", {"radius": 0.1}), ("static", {"norm_eps": 0.1})):
        try:
            t.set_rule_hyperparameters(**kwargs)
        except gradnorm.HyperparameterError as err:
            messages[f"errors/{key}"] = str(err)
    messages["errors/rho_after"] = repr(t.rule.config["rho"])
    if BACKEND == "torch":
        t.compile(optimizer="sgd", loss=loss_object(), jit_compile=True)
        try:
            t.fit(*data("float32"), batch_size=BATCH, epochs=1, verbose=0)
        except ValueError as err:
            messages["errors/jit_compile"] = str(err)


def docs() -> None:
    """The Python of docs/adapters/keras.md, as printed (its KERAS_BACKEND line keeps this process's)."""
    import io
    import re
    from contextlib import redirect_stdout

    page = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "adapters", "keras.md")
    with open(page, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.DOTALL)
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile("\n\n".join(blocks), page, "exec"), {"__name__": "docs_keras"})
    messages["docs/printed"] = printed.getvalue()


def timed(fn):
    def run() -> None:
        import time

        t = time.perf_counter()
        fn()
        out[f"time/{fn.__name__}"] = np.asarray(time.perf_counter() - t)
    return run


SCENARIOS = {"docs": docs, "cross": cross, "schedule": schedule, "resume": resume, "dropout": dropout, "features": features,
             "mixed": mixed, "errors": errors}

if __name__ == "__main__":
    path, names = sys.argv[1], sys.argv[2:] or list(SCENARIOS)
    for name in names:
        timed(SCENARIOS[name])()
    np.savez(path, **out)
    with open(path + ".json", "w") as f:
        json.dump(messages, f)
