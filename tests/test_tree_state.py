"""A rule state that is a tree with parameter-sized arrays (tests._test_rules.WithBuffer) works in
every adapter: torch `state_dict` round trips (leaf by leaf, validated, moved to the device), the JAX
step and optax transform, TensorFlow's step and Keras saving; and a bad torch checkpoint changes
nothing and names the offending key."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import gradnorm
from tests._test_rules import WithBuffer

X = np.random.default_rng(0).normal(size=(16, 3))
Y = np.random.default_rng(1).normal(size=16)
W0, B0 = np.array([0.3, -0.2, 0.5]), np.array([0.1])
BETA, LR, STEPS = 0.5, 0.1, 4


def reference(steps):
    """NumPy: d_t = g_t + beta d_{t-1}, w -= lr d_t."""
    w, b = W0.copy(), B0.copy()
    prev = [np.zeros(3), np.zeros(1)]
    for _ in range(steps):
        r = X @ w + b[0] - Y
        g = [X.T @ r / len(Y), np.array([r.mean()])]
        d = [gi + BETA * pi for gi, pi in zip(g, prev)]
        w, b, prev = w - LR * d[0], b - LR * d[1], d
    return w, b


def test_core_step_with_a_tree_state():
    params = {"w": W0.copy(), "b": B0.copy()}

    def grad_fn(p):
        r = X @ p["w"] + p["b"][0] - Y
        return 0.5 * np.mean(r**2), {"w": X.T @ r / len(Y), "b": np.array([r.mean()])}

    state = None
    for _ in range(STEPS):
        res = gradnorm.step(params, grad_fn, rule=WithBuffer(beta=BETA), state=state)
        params, state = {k: params[k] - LR * res.grad[k] for k in params}, res.state
    assert int(state.count) == STEPS
    for got, want in zip((params["w"], params["b"]), reference(STEPS)):
        np.testing.assert_allclose(got, want, rtol=1e-13)


# -- PyTorch ------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def torch_trainer(momentum=0.9):
    import gradnorm.torch as gt

    w = torch.nn.Parameter(torch.tensor(W0))
    b = torch.nn.Parameter(torch.tensor(B0))
    opt = gt.Optimizer([w, b], torch.optim.SGD, rule=WithBuffer(beta=BETA), lr=LR, momentum=momentum)
    x, y = torch.tensor(X), torch.tensor(Y)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((x @ w + b - y) ** 2).mean()
        loss.backward()
        return loss

    return (w, b), opt, closure


def test_torch_trajectory_with_a_tree_state():
    (w, b), opt, closure = torch_trainer(momentum=0.0)
    for _ in range(STEPS):
        opt.step(closure)
    for got, want in zip((w, b), reference(STEPS)):
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-13)


def test_torch_state_dict_round_trip_continues_bit_identically():
    (w, b), straight, closure = torch_trainer()
    for _ in range(2):
        straight.step(closure)
    saved = copy.deepcopy(straight.state_dict())
    weights = [w.detach().clone(), b.detach().clone()]
    assert [tuple(t.shape) for t in saved["gradnorm"]["state"]] == [(), (3,), (1,)]
    for _ in range(2):
        straight.step(closure)
    (w2, b2), resumed, closure2 = torch_trainer()
    with torch.no_grad():
        w2.copy_(weights[0])
        b2.copy_(weights[1])
    resumed.load_state_dict(saved)
    for _ in range(2):
        resumed.step(closure2)
    assert torch.equal(w2, w) and torch.equal(b2, b)


def corrupt_cases(saved):
    """(description, mutated state dict, expected message part)."""
    def edit(fn):
        d = copy.deepcopy(saved)
        fn(d)
        return d

    return [
        ("other rule", edit(lambda d: d["gradnorm"].__setitem__("rule", "sam")), r"\['rule'\]"),
        ("missing entry", edit(lambda d: d.pop("gradnorm")), "no 'gradnorm' entry"),
        ("missing key", edit(lambda d: d["gradnorm"].pop("state")), "Missing: \\['state'\\]"),
        ("extra key", edit(lambda d: d["gradnorm"].__setitem__("extra", 1)), "Unexpected: \\['extra'\\]"),
        ("too few leaves", edit(lambda d: d["gradnorm"]["state"].pop()), r"\['state'\]"),
        ("wrong shape", edit(lambda d: d["gradnorm"]["state"].__setitem__(1, torch.zeros(4, dtype=torch.float64))),
         r"\['state'\]\[1\]"),
        ("wrong dtype", edit(lambda d: d["gradnorm"]["state"].__setitem__(1, torch.zeros(3))), r"\['state'\]\[1\]"),
        ("not a tensor", edit(lambda d: d["gradnorm"]["state"].__setitem__(0, 3)), r"\['state'\]\[0\]"),
        ("not a dict", [saved], "`state_dict` must be a dict"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_torch_bad_checkpoint_changes_nothing(case):
    (w, b), opt, closure = torch_trainer()
    opt.step(closure)
    saved = copy.deepcopy(opt.state_dict())
    opt.step(closure)
    before = copy.deepcopy(opt.state_dict())
    name, bad, message = corrupt_cases(saved)[case]
    with pytest.raises((ValueError, TypeError), match=message):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["gradnorm"]["rule"] == before["gradnorm"]["rule"]
    for x, y in zip(after["gradnorm"]["state"], before["gradnorm"]["state"]):
        assert torch.equal(x, y), name
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key]["momentum_buffer"], value["momentum_buffer"]), name


# -- JAX ----------------------------------------------------------------------------------------
def test_jax_step_and_transform_with_a_tree_state():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    gj = pytest.importorskip("gradnorm.jax")
    from tests._jax import x64

    with x64():
        jnp = jax.numpy
        x, y = jnp.asarray(X), jnp.asarray(Y)

        def loss_fn(p):
            return 0.5 * jnp.mean((x @ p["w"] + p["b"][0] - y) ** 2)

        params = {"w": jnp.asarray(W0), "b": jnp.asarray(B0)}
        step = jax.jit(lambda p, s: gj.step(p, loss_fn, rule=WithBuffer(beta=BETA), state=s))
        state = None
        p = params
        for _ in range(STEPS):
            res = step(p, state) if state is not None else gj.step(p, loss_fn, rule=WithBuffer(beta=BETA))
            p, state = jax.tree.map(lambda a, d: a - LR * d, p, res.grad), res.state
        np.testing.assert_allclose(p["w"], reference(STEPS)[0], rtol=1e-12)

        tx = gj.transform(optax.sgd(LR), rule=WithBuffer(beta=BETA))
        opt_state = tx.init(params)
        assert [leaf.shape for leaf in jax.tree.leaves(opt_state.rule)] == [(), (1,), (3,)]

        @jax.jit
        def train(p, s):
            value, grads = jax.value_and_grad(loss_fn)(p)
            updates, s = tx.update(grads, s, p, value=value, loss_fn=loss_fn)
            return optax.apply_updates(p, updates), s

        p = params
        for i in range(STEPS):
            if i == 2:  # a save/load round trip of the whole optimizer state through NumPy
                opt_state = jax.tree.map(jnp.asarray, jax.tree.map(np.asarray, opt_state))
            p, opt_state = train(p, opt_state)
        np.testing.assert_allclose(p["w"], reference(STEPS)[0], rtol=1e-12)


# -- TensorFlow / Keras -------------------------------------------------------------------------
def test_tf_step_and_keras_saving_with_a_tree_state(tmp_path):
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    gt = pytest.importorskip("gradnorm.tf")
    gk = pytest.importorskip("gradnorm.tf.keras")

    w, b = tf.Variable(W0), tf.Variable(B0)
    x, y = tf.constant(X), tf.constant(Y)
    state = None
    for _ in range(STEPS):
        res = gt.step([w, b], lambda: 0.5 * tf.reduce_mean((tf.linalg.matvec(x, w) + b - y) ** 2),
                      rule=WithBuffer(beta=BETA), state=state)
        w.assign_sub(LR * res.grad[0])
        b.assign_sub(LR * res.grad[1])
        state = res.state
    np.testing.assert_allclose(w.numpy(), reference(STEPS)[0], rtol=1e-12)

    def trainer():
        inner = keras.Sequential([keras.Input((3,), dtype="float64"), keras.layers.Dense(1, dtype="float64")])
        inner.set_weights([W0.reshape(3, 1), B0])
        model = gk.GradnormModel(inner, rule=WithBuffer(beta=BETA))
        model.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
        return model

    data = (X, Y.reshape(-1, 1))
    straight = trainer()
    straight.fit(*data, batch_size=16, epochs=STEPS, shuffle=False, verbose=0)
    first = trainer()
    first.fit(*data, batch_size=16, epochs=2, shuffle=False, verbose=0)
    path = str(tmp_path / "buffer.weights.h5")
    first.save_weights(path)
    resumed = trainer()
    resumed.load_weights(path)
    resumed.fit(*data, batch_size=16, epochs=STEPS - 2, shuffle=False, verbose=0)
    for got, want in zip(resumed.model.get_weights(), straight.model.get_weights()):
        np.testing.assert_array_equal(got, want)
    leaves = [v.numpy() for v in resumed._gradnorm_settings.runtime.state_vars]
    assert [np.shape(v) for v in leaves] == [(), (3, 1), (1,)]
