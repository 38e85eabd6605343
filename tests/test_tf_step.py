"""gradnorm.tf.step: the same directions as the NumPy core with hand-written derivatives, eagerly and
under tf.function (traced once per loop); the variables are restored bit for bit, also when a pass
fails; validation before anything runs; loss scaling, moving statistics, random state, HVP modes."""

from __future__ import annotations

import numpy as np
import pytest

import gradnorm
from conformance.problems import PROBLEMS

tf = pytest.importorskip("tensorflow")
gt = pytest.importorskip("gradnorm.tf")

MLP = PROBLEMS["mlp"]  # a 4-8-6-3 tanh perceptron with hand-written NumPy gradient and HVP
LAYERS = ("hidden1", "hidden2", "out")

from conformance.settings import adapter_ids, adapter_settings  # noqa: E402

SETTINGS = adapter_settings()  # every rule and its variants (conformance/settings.py)
IDS = adapter_ids()


# ----------------------------------------------------------------------------------------------
# the problem: the conformance MLP, written with tf ops on variables, a list in the order
# [hidden1.w, hidden1.b, hidden2.w, hidden2.b, out.w, out.b]


def numpy_params(seed=None):
    p = MLP.params0()
    if seed is not None:
        rng = np.random.default_rng(seed)
        p = {k: {n: v + 0.3 * rng.normal(size=v.shape) for n, v in layer.items()} for k, layer in p.items()}
    return [p[name][k] for name in LAYERS for k in ("w", "b")]


def as_tree(flat):
    return {name: {"w": flat[2 * i], "b": flat[2 * i + 1]} for i, name in enumerate(LAYERS)}


def np_grad_fn(flat):
    loss, g = MLP.grad(as_tree(flat), MLP.data)
    return loss, [g[name][k] for name in LAYERS for k in ("w", "b")]


def np_hvp_fn(flat, v):
    h = MLP.hvp(as_tree(flat), as_tree(v), MLP.data)
    return [h[name][k] for name in LAYERS for k in ("w", "b")]


class TFMLP:
    """The same MLP on tf.Variables; `loss()` reads them (the TensorFlow idiom)."""

    def __init__(self, dtype=tf.float64, params=None):
        self.variables = [tf.Variable(p, dtype=dtype) for p in (params if params is not None else numpy_params())]
        self.x = tf.constant(MLP.data["X"], dtype)
        self.y = tf.constant(MLP.data["Y"], dtype)
        self.calls = 0

    def logits(self):
        h = self.x
        v = self.variables
        for i in range(2):
            h = tf.tanh(h @ v[2 * i] + v[2 * i + 1])
        return h @ v[4] + v[5]

    def loss(self):
        self.calls += 1
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(self.y, self.logits()))

    def values(self):
        return [v.numpy() for v in self.variables]


def assert_close_lists(got, want, rtol, atol=0.0):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        g = g.numpy() if hasattr(g, "numpy") else np.asarray(g)
        assert g.shape == np.shape(w)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)


def assert_bitwise(values, reference):
    for a, b in zip(values, reference):
        assert a.tobytes() == np.asarray(b, dtype=a.dtype).tobytes()


# ----------------------------------------------------------------------------------------------
# the same directions as the NumPy core


# Every setting eagerly; under tf.function the ones with different code paths (the conformance
# suite's tf-step-function backend runs every rule under tf.function besides).
TRACED = {"sam-rho=0.5-adaptive=True-eta=0.01", "gr-gamma=0.1", "gam-", "coherent-lam=0.1-threshold=0.0", "flooding-b=0.01"}
CASES = [(r, h, m) for (r, h), i in zip(SETTINGS, IDS) for m in (["eager", "function"] if i in TRACED else ["eager"])]


@pytest.mark.parametrize("rule,hyper,mode", CASES, ids=[f"{r}-{'-'.join(f'{k}={v}' for k, v in h.items())}-{m}" for r, h, m in CASES])
def test_step_equals_the_numpy_core(rule, hyper, mode):
    model = TFMLP(tf.float64, numpy_params(seed=1))
    before = model.values()
    want = gradnorm.step(numpy_params(seed=1), np_grad_fn, rule=rule, hvp_fn=np_hvp_fn, **hyper)

    def run():
        return gt.step(model.variables, model.loss, rule=rule, **hyper)

    res = run() if mode == "eager" else tf.function(run)()
    assert_close_lists(res.grad, want.grad, rtol=1e-11, atol=1e-14)
    assert float(res.loss) == pytest.approx(float(want.loss), rel=1e-13)
    for key in ("grad_norm", "update_norm"):
        assert float(res.info[key]) == pytest.approx(float(want.info[key]), rel=1e-11)
    assert res.info["grad_evals"] == want.info["grad_evals"] and res.info["hvp_evals"] == want.info["hvp_evals"]
    assert bool(res.info["finite"])
    assert_bitwise(model.values(), before)  # the variables hold their values again, bit for bit
    assert type(res.state) is type(want.state)


@pytest.mark.parametrize("rule,hyper,mode", [("sam", {"rho": 0.05}, "function"), ("gr", {"gamma": 0.1}, "eager"),
                                             ("gam", {}, "eager")])
def test_float32(rule, hyper, mode):
    model = TFMLP(tf.float32)
    want = gradnorm.step(numpy_params(), np_grad_fn, rule=rule, hvp_fn=np_hvp_fn, **hyper)
    def run():
        return gt.step(model.variables, model.loss, rule=rule, **hyper)

    res = run() if mode == "eager" else tf.function(run)()
    assert all(g.dtype == tf.float32 for g in res.grad)
    assert res.loss.dtype == tf.float32
    assert_close_lists(res.grad, want.grad, rtol=2e-5, atol=2e-6)


def test_hvp_modes_give_the_exact_hvp():
    model = TFMLP(tf.float64)
    want = gradnorm.step(numpy_params(), np_grad_fn, rule="gr", hvp_fn=np_hvp_fn, gamma=0.2)
    for hvp, mode in [("reverse_over_reverse", "function"), ("forward_over_reverse", "function"),
                      ("forward_over_reverse", "eager")]:  # reverse-over-reverse eagerly: test_step_equals_the_numpy_core
        def run(hvp=hvp):
            return gt.step(model.variables, model.loss, rule="gr", gamma=0.2, hvp=hvp).grad

        assert_close_lists(run() if mode == "eager" else tf.function(run)(), want.grad, rtol=1e-11, atol=1e-14)
    model.calls = 0
    gt.step(model.variables, model.loss, rule="gr", gamma=0.2)  # reverse-over-reverse reuses the first pass
    assert model.calls == 1
    gt.step(model.variables, model.loss, rule="gr", gamma=0.2, hvp="forward_over_reverse")
    assert model.calls == 3


# ----------------------------------------------------------------------------------------------
# tf.function: traced once, hyperparameters static or dynamic


def test_a_training_loop_is_traced_once_and_follows_the_core():
    model = TFMLP(tf.float64)
    rho = tf.Variable(0.05, dtype=tf.float64)  # a schedule: changed between steps without retracing
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(32, 4)) for _ in range(4)]

    @tf.function
    def train_step(x):
        model.x = x
        res = gt.step(model.variables, model.loss, rule="sam", rho=rho)
        for v, d in zip(model.variables, res.grad):
            v.assign_sub(0.3 * d)
        return res.loss

    params = numpy_params()
    for k, x in enumerate(batches):
        rho.assign(0.05 * (k + 1))
        data = {**MLP.data, "X": x}
        want = gradnorm.step(params, lambda p, data=data: _grad_on(p, data), rule="sam", rho=0.05 * (k + 1))
        loss = train_step(tf.constant(x))
        assert float(loss) == pytest.approx(float(want.loss), rel=1e-12)
        params = [p - 0.3 * d for p, d in zip(params, want.grad)]
        assert_close_lists(model.variables, params, rtol=1e-11, atol=1e-14)
    assert train_step.experimental_get_tracing_count() == 1


def _grad_on(flat, data):
    loss, g = MLP.grad(as_tree(flat), data)
    return loss, [g[name][k] for name in LAYERS for k in ("w", "b")]


def test_python_number_hyperparameters_are_constants_of_the_trace():
    model = TFMLP(tf.float64)
    step = tf.function(lambda rho: gt.step(model.variables, model.loss, rule="sam", rho=rho).grad)
    a, b = step(0.05), step(0.5)  # a new Python value retraces (documented): a different constant
    assert step.experimental_get_tracing_count() == 2
    want = gradnorm.step(numpy_params(), np_grad_fn, rule="sam", rho=0.5)
    assert_close_lists(b, want.grad, rtol=1e-11, atol=1e-14)
    assert not np.allclose(a[0].numpy(), b[0].numpy())


def test_rule_state_threads_through_a_tf_function():
    model = TFMLP(tf.float64)
    hyper = {"lam": 0.3, "threshold": -1.0, "delay": 2}
    step = tf.function(lambda state: gt.step(model.variables, model.loss, rule="coherent", state=state, **hyper))
    state = gradnorm.rules.get("coherent", **hyper).init([v.read_value() for v in model.variables])
    np_state = None
    for _ in range(4):
        res = step(state)
        want = gradnorm.step(numpy_params(), np_grad_fn, rule="coherent", state=np_state, **hyper)
        state, np_state = res.state, want.state
        assert float(res.info["gate"]) == float(want.info["gate"])
        assert_close_lists(res.grad, want.grad, rtol=1e-12, atol=1e-15)
    assert int(state.step) == 4 and step.experimental_get_tracing_count() == 1


def test_tensor_hyperparameters_of_another_dtype_are_cast():
    model = TFMLP(tf.float64)
    res = gt.step(model.variables, model.loss, rule="gnp", r=tf.Variable(0.05, dtype=tf.float32), alpha=tf.constant(0.8))
    want = gradnorm.step(numpy_params(), np_grad_fn, rule="gnp", r=np.float64(np.float32(0.05)), alpha=np.float64(np.float32(0.8)))
    assert_close_lists(res.grad, want.grad, rtol=1e-11, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# faults


@pytest.mark.parametrize("rule,hyper,fail_at", [("sam", {"rho": 0.3}, 2), ("gam", {}, 3), ("gr", {"gamma": 0.1}, 99)])
def test_variables_are_restored_bit_for_bit_when_a_pass_raises(rule, hyper, fail_at):
    params = numpy_params(seed=2)
    params[1][0] = -0.0  # a signed zero, and values for which (x + e) - e != x: a subtraction would not restore them
    model = TFMLP(tf.float64, params)
    before = model.values()
    calls = []

    def loss():
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError(f"boom in pass {fail_at}")
        return model.loss()

    if fail_at == 99:  # gr: the Hessian-vector product fails
        def failing_hvp(*args, **kwargs):
            raise RuntimeError("boom in the HVP")

        orig = gt._step.VariableOracle.hvp
        gt._step.VariableOracle.hvp = failing_hvp
        try:
            with pytest.raises(RuntimeError, match="boom"):
                gt.step(model.variables, model.loss, rule=rule, **hyper)
        finally:
            gt._step.VariableOracle.hvp = orig
    else:
        with pytest.raises(RuntimeError, match="boom"):
            gt.step(model.variables, loss, rule=rule, **hyper)
        assert len(calls) == fail_at
    assert_bitwise(model.values(), before)


def test_an_exception_while_tracing_changes_nothing():
    model = TFMLP(tf.float64)
    before = model.values()
    calls = []

    def loss():
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("a Python error in the perturbed pass, while tracing")
        return model.loss()

    fn = tf.function(lambda: gt.step(model.variables, loss, rule="sam", rho=0.5).grad)
    with pytest.raises(ValueError, match="while tracing"):
        fn()
    assert_bitwise(model.values(), before)  # nothing ran: the trace failed before any op executed
    res = tf.function(lambda: gt.step(model.variables, model.loss, rule="sam", rho=0.5).grad)()  # and a new one works
    assert_close_lists(res, gradnorm.step(numpy_params(), np_grad_fn, rule="sam", rho=0.5).grad, rtol=1e-11, atol=1e-14)


def test_a_failure_at_run_time_inside_tf_function_is_recovered_by_the_guard():
    """An op that fails at the perturbed weights aborts the function after the perturbation and before
    the restore; the guard's copy puts the weights back."""
    model = TFMLP(tf.float64)
    before = model.values()
    limit = float(np.abs(before[4]).max()) + 0.01  # holds at the weights, not at the perturbed point

    def loss():
        check = tf.debugging.assert_less(tf.reduce_max(tf.abs(model.variables[4])), tf.constant(limit, tf.float64))
        with tf.control_dependencies([check]):
            return model.loss()

    guard = gt.WeightGuard(model.variables)
    fn = tf.function(lambda: gt.step(model.variables, loss, rule="sam", rho=1.0, guard=guard).grad)
    with pytest.raises(tf.errors.InvalidArgumentError):
        fn()
    moved = any(not np.array_equal(a, b) for a, b in zip(model.values(), before))
    assert moved  # the function was aborted between perturbation and restore
    assert guard.restore() is True
    assert_bitwise(model.values(), before)
    assert guard.restore() is False  # nothing left to restore
    ok = tf.function(lambda: gt.step(model.variables, model.loss, rule="sam", rho=1.0, guard=guard).grad)
    ok()
    assert guard.restore() is False  # a successful step lowers the flag
    assert_bitwise(model.values(), before)


def test_nonfinite_values_are_reported():
    model = TFMLP(tf.float64)
    # finite at the weights; the ascent step crosses the edge of -sqrt(limit - w): NaN at the perturbed point
    limit = float(model.values()[4].max()) + 1e-3

    def loss():
        return model.loss() - tf.reduce_sum(tf.sqrt(limit - model.variables[4]))

    res = gt.step(model.variables, loss, rule="sam", rho=1.0)
    assert np.isfinite(float(res.loss)) and not bool(res.info["finite"])
    res = tf.function(lambda: gt.step(model.variables, lambda: model.loss() * np.inf, rule="sgd"))()
    assert not bool(res.info["finite"])
    assert bool(gt.step(model.variables, model.loss, rule="sam", rho=1.0).info["finite"])


@pytest.mark.parametrize("rule,hyper", [("sam", {"rho": 0.1}), ("sam", {"rho": 0.1, "adaptive": True}),
                                        ("gnp", {"r": 0.1, "alpha": 0.5, "mix_unit_gradient": True}),
                                        ("gr", {"gamma": 0.1, "penalty": "norm"}),
                                        ("fd_gr", {"gamma": 0.1, "eps": 0.1, "normalize": True}), ("gam", {})])
def test_a_zero_gradient_gives_zeros_not_nan(rule, hyper):
    w = tf.Variable([1.0, -2.0], dtype=tf.float64)
    unused = tf.Variable([[3.0]], dtype=tf.float64)  # not read by the loss: its gradient is zero, not None
    res = gt.step([w, unused], lambda: tf.reduce_sum(w * 0.0), rule=rule, **hyper)
    for d in res.grad:
        np.testing.assert_array_equal(d.numpy(), 0.0)
    assert bool(res.info["finite"])


# ----------------------------------------------------------------------------------------------
# loss scaling, moving statistics, random state, Keras variables, sparse gradients


def test_loss_scale_is_removed_for_the_rule_and_put_back_in_grad():
    model = TFMLP(tf.float64)
    want = gradnorm.step(numpy_params(), np_grad_fn, rule="fd_gr", gamma=0.1, eps=0.05)
    for scale in (8.0, tf.constant(8.0, tf.float32)):
        res = gt.step(model.variables, lambda: 8.0 * model.loss(), rule="fd_gr", gamma=0.1, eps=0.05, loss_scale=scale)
        assert float(res.loss) == pytest.approx(float(want.loss), rel=1e-14)  # the rule saw the true loss
        assert_close_lists(res.grad, [8.0 * d for d in want.grad], rtol=1e-11, atol=1e-14)
    # without telling the step, the finite difference would use a step 8 times too large
    wrong = gt.step(model.variables, lambda: 8.0 * model.loss(), rule="fd_gr", gamma=0.1, eps=0.05)
    assert not np.allclose(wrong.grad[4].numpy(), 8.0 * want.grad[4], rtol=1e-6)
    # flooding compares the unscaled loss with its level
    level = float(want.loss) * 2  # above the true loss, below 8 times it
    flood = gt.step(model.variables, lambda: 8.0 * model.loss(), rule="flooding", b=level, loss_scale=8.0)
    assert float(flood.info["flood_sign"]) == -1.0


def _bn_model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(6), keras.layers.BatchNormalization(momentum=0.5),
                             keras.layers.Dropout(0.5), keras.layers.Dense(3)])


def test_moving_stats_come_from_the_first_pass_only():
    model = _bn_model()
    x = tf.constant(MLP.data["X"], tf.float32)
    stats = list(model.non_trainable_weights)
    w0 = [v.numpy() for v in model.trainable_variables]
    init = [s.numpy() for s in stats]
    # what one training pass at the unperturbed weights does to the statistics (NumPy, by hand)
    h = MLP.data["X"].astype(np.float32) @ w0[0] + w0[1]
    want_mean = 0.5 * init[0] + 0.5 * h.mean(axis=0)
    want_var = 0.5 * init[1] + 0.5 * h.var(axis=0)

    def loss():
        return tf.reduce_mean(tf.square(model(x, training=True)))

    res = gt.step(model.trainable_variables, loss, rule="sam", rho=0.5, moving_stats=stats)
    assert res.info["grad_evals"] == 2
    np.testing.assert_allclose(stats[0].numpy(), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats[1].numpy(), want_var, rtol=1e-5, atol=1e-6)
    # without moving_stats the perturbed pass updates them a second time
    for s, v in zip(stats, init):
        s.assign(v)
    gt.step(model.trainable_variables, loss, rule="sam", rho=0.5)
    assert not np.allclose(stats[0].numpy(), want_mean, rtol=1e-5, atol=1e-6)


def test_random_state_replays_the_first_pass_masks():
    x = tf.constant(MLP.data["X"], tf.float32)
    # a radius so small that the perturbed point is the weights themselves (to float32 rounding; biases
    # that are 0 move by 1e-30), so the two passes differ by their dropout masks only. (A zero radius,
    # even as a tensor, skips the second pass.)
    tiny = tf.constant(1e-30)

    def loss_of(model):
        return lambda: tf.reduce_mean(tf.square(model(x, training=True)))

    reference = _bn_model()  # the same weights and seed state: its first-pass gradient
    with tf.GradientTape() as tape:
        value = loss_of(reference)()
    first = tape.gradient(value, reference.trainable_variables)

    model = _bn_model()
    seeds = [v for v in model.non_trainable_variables if "int" in str(v.dtype)]
    assert seeds  # the Dropout layer's SeedGenerator state
    same = gt.step(model.trainable_variables, loss_of(model), rule="sam", rho=tiny, random_state=seeds)
    assert_close_lists(same.grad, [g.numpy() for g in first], rtol=1e-6, atol=1e-7)

    model = _bn_model()
    fresh = gt.step(model.trainable_variables, loss_of(model), rule="sam", rho=tiny)  # new masks in pass 2
    assert not np.allclose(fresh.grad[0].numpy(), first[0].numpy(), rtol=1e-3)


def test_keras_variables_and_sparse_embedding_gradients():
    import keras

    keras.utils.set_random_seed(1)
    emb = keras.layers.Embedding(10, 3)
    dense = keras.layers.Dense(2)
    ids = tf.constant([[1, 4, 4], [7, 1, 0]])
    out = dense(tf.reduce_mean(emb(ids), axis=1))
    del out
    variables = emb.trainable_variables + dense.trainable_variables  # keras.Variable objects

    def loss():
        return tf.reduce_mean(tf.square(dense(tf.reduce_mean(emb(ids), axis=1)) - 1.0))

    res = gt.step(variables, loss, rule="sam", rho=0.1)
    assert [tuple(d.shape) for d in res.grad] == [tuple(v.shape) for v in variables]
    # the core on plain tensors, with the gradient of a functional copy of the same model
    table0, kernel0, bias0 = (v.numpy().astype(np.float64) for v in variables)

    def grad_fn(p):
        t, k, b = (tf.constant(a) for a in p)
        with tf.GradientTape() as tape:
            tape.watch([t, k, b])
            value = tf.reduce_mean(tf.square(tf.reduce_mean(tf.gather(t, ids), axis=1) @ k + b - 1.0))
        return value.numpy(), [tf.convert_to_tensor(g).numpy() for g in tape.gradient(value, [t, k, b])]

    want = gradnorm.step([table0, kernel0, bias0], grad_fn, rule="sam", rho=0.1)
    assert_close_lists(res.grad, want.grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# validation before anything runs


def test_bad_arguments_are_refused_before_the_loss_runs():
    model = TFMLP(tf.float64)
    calls = []

    def loss():
        calls.append(1)
        return model.loss()

    v = model.variables
    cases = [
        ({"variables": v[0], "loss_fn": loss, "rule": "sam", "rho": 0.1}, TypeError, "`variables` must be a list"),
        ({"variables": [], "loss_fn": loss, "rule": "sam", "rho": 0.1}, TypeError, "at least one variable"),
        ({"variables": [tf.constant(1.0)], "loss_fn": loss, "rule": "sam", "rho": 0.1}, TypeError, "Element 0"),
        ({"variables": [tf.Variable(1)], "loss_fn": loss, "rule": "sam", "rho": 0.1}, TypeError, "floating-point"),
        ({"variables": v, "loss_fn": 3, "rule": "sam", "rho": 0.1}, TypeError, "`loss_fn` must be a callable"),
        ({"variables": v, "loss_fn": loss, "rule": "sharp"}, gradnorm.UnknownRuleError, "'sam'"),
        ({"variables": v, "loss_fn": loss, "rule": "sam"}, gradnorm.HyperparameterError, "needs `rho`"),
        ({"variables": v, "loss_fn": loss, "rule": "sam", "rho": -1.0}, gradnorm.HyperparameterError, "`rho`"),
        ({"variables": v, "loss_fn": loss, "rule": "gr", "gamma": 0.1, "hvp": "exact"}, gradnorm.HyperparameterError, "`hvp`"),
        ({"variables": v, "loss_fn": loss, "rule": "sam", "rho": 0.1, "perturbation": "all"}, ValueError, "`perturbation`"),
        ({"variables": v, "loss_fn": loss, "rule": "sam", "rho": 0.1, "loss_scale": 0.0}, gradnorm.HyperparameterError, "`loss_scale`"),
        ({"variables": v, "loss_fn": loss, "rule": "sam", "rho": 0.1, "state": (1,)}, TypeError, "`state`"),
        ({"variables": v, "loss_fn": loss, "rule": "sam", "rho": 0.1, "guard": gt.WeightGuard(v[:2])}, TypeError, "`guard`"),
        ({"variables": v, "loss_fn": loss, "rule": "sam", "rho": 0.1, "moving_stats": [3]}, TypeError, "`moving_stats`"),
    ]
    for kwargs, err, text in cases:
        with pytest.raises(err, match=text):
            gt.step(**kwargs)
    assert not calls


def test_a_bad_loss_is_named():
    model = TFMLP(tf.float64)
    before = model.values()
    with pytest.raises(gradnorm.OracleOutputError, match="scalar loss"):
        gt.step(model.variables, lambda: model.logits(), rule="sam", rho=0.1)
    with pytest.raises(gradnorm.OracleOutputError, match="scalar tensor"):
        gt.step(model.variables, lambda: 1.0, rule="sam", rho=0.1)
    assert_bitwise(model.values(), before)


def test_replica_step_outside_strategy_run_is_refused():
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with strategy.scope():
        w = tf.Variable([1.0, 2.0])
        with pytest.raises(RuntimeError, match="strategy.run"):
            gt.step([w], lambda: tf.reduce_sum(w * w), rule="sam", rho=0.1)
    res = strategy.run(lambda: gt.step([w], lambda: tf.reduce_sum(w * w), rule="sam", rho=0.1).grad)
    want = gradnorm.step([np.array([1.0, 2.0])], lambda p: (np.sum(p[0] ** 2), [2 * p[0]]), rule="sam", rho=0.1)
    assert_close_lists(res, want.grad, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# the core with TensorFlow tensors (gradnorm's own namespace, found through sys.modules)


def test_the_core_step_takes_tensorflow_tensors():
    p = [tf.constant([1.0, -2.0], tf.float64), tf.constant(0.5, tf.float64)]

    def grad_fn(q):
        return 0.5 * (tf.reduce_sum(q[0] ** 2) + q[1] ** 2), [q[0], q[1]]

    res = gradnorm.step(p, grad_fn, rule="sam", rho=tf.Variable(0.1, dtype=tf.float64))
    want = gradnorm.step([np.array([1.0, -2.0]), np.asarray(0.5)], lambda q: (0.0, list(q)), rule="sam", rho=0.1)
    assert_close_lists(res.grad, want.grad, rtol=1e-15)
    with pytest.raises(gradnorm.ParamsError, match="one array library"):
        gradnorm.step([tf.constant([1.0]), np.array([1.0])], grad_fn, rule="sgd")
    with pytest.raises(gradnorm.OracleOutputError, match="shapes"):
        gradnorm.step(p, lambda q: (tf.constant(1.0, tf.float64), [q[0][:1], q[1]]), rule="sgd")
