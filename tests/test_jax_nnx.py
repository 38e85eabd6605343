"""gradnorm.jax.nnx.Optimizer: a flax nnx model with BatchNorm and Dropout trained under nnx.jit,
against direct functional loops on the split model (gradnorm.jax.step in float32; SAM written out
with jax.grad in float64), against plain nnx.Optimizer (rule "sgd"), and its errors."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
nnx = pytest.importorskip("flax.nnx")

import gradnorm
import gradnorm.jax as gj
from tests._jax import full_float32_matmuls, x64  # noqa: F401  (the fixture is autouse)

STEPS = 3
LR, MOMENTUM = 0.2, 0.9


class Net(nnx.Module):
    def __init__(self, dtype, seed=0):
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        self.hidden = nnx.Linear(4, 8, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs, param_dtype=dtype, dtype=dtype)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs, param_dtype=dtype, dtype=dtype)

    def __call__(self, x):
        return self.out(self.drop(jnp.tanh(self.bn(self.hidden(x)))))


def batches(dtype, n=STEPS):
    rng = np.random.default_rng(0)
    return [(jnp.asarray(rng.normal(size=(16, 4)), dtype), jnp.asarray(rng.integers(0, 3, size=16)))
            for _ in range(n)]


def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def leaves(tree):
    return [np.asarray(a, dtype=np.float64) for a in jax.tree_util.tree_leaves(tree)]


def model_state(model):
    """Parameters, BatchNorm statistics and RNG counts of a model, as float64 NumPy leaves."""
    pure = nnx.as_pure
    return {"params": leaves(pure(nnx.state(model, nnx.Param))),
            "stats": leaves(pure(nnx.state(model, nnx.BatchStat))),
            "counts": leaves(pure(nnx.state(model, nnx.RngCount)))}


def functional_state(graphdef, params, rest):
    return model_state(nnx.merge(graphdef, params, rest, copy=True))


def assert_close(got, want, atol):
    for key in want:
        assert len(got[key]) == len(want[key]) > 0, key
        for a, b in zip(got[key], want[key]):
            np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=key)


def train_with_optimizer(dtype, rule, hyper, data, **options):
    """STEPS steps of gradnorm.jax.nnx.Optimizer under nnx.jit: losses, infos, final state."""
    model = Net(dtype)
    opt = gj.nnx.Optimizer(model, optax.sgd(LR, momentum=MOMENTUM), rule=rule, **options, **hyper)

    @nnx.jit
    def train_step(model, opt, x, y):
        loss = opt.update(model, loss_fn=lambda m: cross_entropy(m(x), y))
        return loss, opt.info

    out = [train_step(model, opt, x, y) for x, y in data]
    return [float(loss) for loss, _ in out], [info for _, info in out], model_state(model), opt


def split(dtype):
    graphdef, params, rest = nnx.split(Net(dtype), nnx.Param, ...)
    return graphdef, nnx.as_pure(params), nnx.as_pure(rest)


def pass_at(graphdef, params, rest, x, y):
    """The training-mode loss of the model holding `params` and `rest`, and its variables after the pass."""
    model = nnx.merge(graphdef, params, rest, copy=True)
    loss = cross_entropy(model(x), y)
    return loss, nnx.as_pure(nnx.split(model, nnx.Param, ...)[2])


# --------------------------------------------------------------------------------------------
# against direct functional loops


def test_batchnorm_and_dropout_model_matches_a_functional_gradnorm_step_loop():
    """float32, gam (three extra passes): the optimizer's trajectory (parameters, BatchNorm
    statistics, RNG counts, losses and info) equals a loop over the split model with
    gradnorm.jax.step(has_aux=True), whose every pass sees the variables as they were before the
    step (same dropout masks) and whose aux (the variables after the unperturbed pass) becomes the
    next step's."""
    rule, hyper = "gam", {}
    data = batches(jnp.float32)
    losses, infos, final, _ = train_with_optimizer(jnp.float32, rule, hyper, data)

    graphdef, params, rest = split(jnp.float32)
    base = optax.sgd(LR, momentum=MOMENTUM)

    @jax.jit
    def step(params, rest, opt_state, x, y):
        res = gj.step(params, lambda p, r: pass_at(graphdef, p, r, x, y), rest, rule=rule, has_aux=True, **hyper)
        loss, rest = res.loss
        updates, opt_state = base.update(res.grad, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss, res.info

    opt_state = base.init(params)
    for t, (x, y) in enumerate(data):
        params, rest, opt_state, loss, info = step(params, rest, opt_state, x, y)
        assert losses[t] == pytest.approx(float(loss), rel=1e-6, abs=1e-6)
        for name in ("loss", "grad_norm", "update_norm", "grad_evals", "perturbed_loss"):
            if name in info:
                assert isinstance(infos[t][name], jax.Array)
                np.testing.assert_allclose(np.asarray(infos[t][name]), np.asarray(info[name]), rtol=1e-6, atol=1e-6,
                                           err_msg=name)
    want = functional_state(graphdef, params, rest)
    assert_close(final, want, atol=1e-6)
    assert np.abs(np.concatenate([a.ravel() for a in final["params"]])
                  - np.concatenate([a.ravel() for a in model_state(Net(jnp.float32))["params"]])).max() > 1e-2


def sam_by_hand(graphdef, params, rest, x, y, rho, same_key):
    """SAM written out: g at params (variables `rest`), then the gradient at params + rho g/(|g| + 1e-12),
    with the variables of before the step (same_key) or of after the first pass."""
    (loss, after), g = jax.value_and_grad(lambda p: pass_at(graphdef, p, rest, x, y), has_aux=True)(params)
    norm = jnp.sqrt(sum(jnp.sum(a ** 2) for a in jax.tree_util.tree_leaves(g)))
    point = jax.tree_util.tree_map(lambda p, a: p + rho * a / (norm + 1e-12), params, g)
    direction = jax.grad(lambda p: pass_at(graphdef, p, rest if same_key else after, x, y)[0])(point)
    return loss, after, direction


# (nnx BatchNorm keeps float32 statistics, which the float64 pass writes)
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")
@pytest.mark.parametrize("same_key", [True, False])
def test_float64_sam_equals_sam_written_out(same_key):
    """SAM on the BatchNorm + Dropout model, float64, to 1e-12: the extra pass sees the variables
    of before the step (same_key=True: the same dropout mask) or of after the first pass (False).
    With same_key=False also the route `update(model, grads, loss_fn=..., value=...)` with the
    gradient of your own nnx pass, whose extra passes see the variables that pass left."""
    with x64():
        data = batches(jnp.float64)
        losses, _, final, _ = train_with_optimizer(jnp.float64, "sam", {"rho": 0.1}, data, same_key=same_key)
        if not same_key:
            model = Net(jnp.float64)
            opt = gj.nnx.Optimizer(model, optax.sgd(LR, momentum=MOMENTUM), rule="sam", rho=0.1)

            @nnx.jit
            def own_pass_step(model, opt, x, y):
                def loss_fn(m):
                    return cross_entropy(m(x), y)

                loss, grads = nnx.value_and_grad(loss_fn)(model)
                return opt.update(model, grads, loss_fn=loss_fn, value=loss)

            given = [float(own_pass_step(model, opt, x, y)) for x, y in data]
            np.testing.assert_allclose(given, losses, rtol=1e-12)
            assert_close(model_state(model), final, atol=1e-12)
        graphdef, params, rest = split(jnp.float64)
        base = optax.sgd(LR, momentum=MOMENTUM)

        @jax.jit
        def step(params, rest, opt_state, x, y):
            loss, rest, direction = sam_by_hand(graphdef, params, rest, x, y, 0.1, same_key)
            updates, opt_state = base.update(direction, opt_state, params)
            return optax.apply_updates(params, updates), rest, opt_state, loss

        opt_state = base.init(params)
        for t, (x, y) in enumerate(data):
            params, rest, opt_state, loss = step(params, rest, opt_state, x, y)
            assert losses[t] == pytest.approx(float(loss), rel=1e-12)
        assert_close(final, functional_state(graphdef, params, rest), atol=1e-12)


def test_rule_sgd_trains_exactly_as_plain_nnx_optimizer():
    """The rule "sgd" adds nothing: parameters, BatchNorm statistics and RNG streams after three
    steps equal those of nnx.Optimizer with nnx.value_and_grad, the plain nnx training step."""
    data = batches(jnp.float32)
    losses, _, final, opt = train_with_optimizer(jnp.float32, "sgd", {}, data)
    model = Net(jnp.float32)
    plain = nnx.Optimizer(model, optax.sgd(LR, momentum=MOMENTUM), wrt=nnx.Param)

    @nnx.jit
    def plain_step(model, plain, x, y):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
        plain.update(model, grads)
        return loss

    want_losses = [float(plain_step(model, plain, x, y)) for x, y in data]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
    assert_close(final, model_state(model), atol=1e-6)
    assert int(opt.step[...]) == STEPS


def test_has_aux_returns_the_aux_of_the_unperturbed_pass():
    """With has_aux=True `update` returns (loss, aux) of the pass at the current parameters: the
    logits of a fresh copy of the model (same weights, same dropout stream) on the batch."""
    x, y = batches(jnp.float32, 1)[0]
    want_logits = Net(jnp.float32)(x)  # a model of its own: the first training-mode pass
    model = Net(jnp.float32)
    opt = gj.nnx.Optimizer(model, optax.sgd(LR), rule="sam", rho=0.1, has_aux=True)

    def loss_fn(m):
        logits = m(x)
        return cross_entropy(logits, y), logits

    loss, logits = nnx.jit(lambda m, o: o.update(m, loss_fn=loss_fn))(model, opt)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=0, atol=1e-6)
    assert float(loss) == pytest.approx(float(cross_entropy(want_logits, y)), rel=1e-6)
    info = opt.info
    assert all(isinstance(v, jax.Array) and v.shape == () for v in info.values())
    np.testing.assert_allclose(np.asarray(info["loss"]), float(loss), rtol=1e-6)
    assert info["grad_evals"].dtype == jnp.int32 and int(info["grad_evals"]) == 2 and bool(info["finite"])
    assert float(info["perturbed_loss"]) > float(loss)  # SAM's ascent step raises the loss


def test_bad_input_raises_clear_errors():
    model = Net(jnp.float32)
    x, y = batches(jnp.float32, 1)[0]
    opt = gj.nnx.Optimizer(model, optax.sgd(0.1), rule="sam", rho=0.05)
    with pytest.raises(TypeError, match="takes the loss as a keyword: `update\\(model, loss_fn=...\\)`"):
        opt.update(model, lambda m: cross_entropy(m(x), y))
    with pytest.raises(TypeError, match="`loss_fn` of gradnorm.jax.nnx.Optimizer.update must be a callable.*: None"):
        opt.update(model)
    with pytest.raises(TypeError, match="`model` of gradnorm.jax.nnx.Optimizer.update must be the nnx.Module"):
        opt.update(nnx.state(model), loss_fn=lambda m: cross_entropy(m(x), y))
    with pytest.raises(gradnorm.ClosureError, match="pass `has_aux=True`"):
        opt.update(model, loss_fn=lambda m: (cross_entropy(m(x), y), 0.0))
    with pytest.raises(TypeError, match="`model` of gradnorm.jax.nnx.Optimizer must be a flax nnx.Module"):
        gj.nnx.Optimizer({"w": jnp.ones(3)}, optax.sgd(0.1), rule="sam")
    with pytest.raises(TypeError, match="`same_key` .* True or False. Received: 1"):
        gj.nnx.Optimizer(model, optax.sgd(0.1), rule="sam", same_key=1)
    with pytest.raises(gradnorm.UnknownRuleError):
        gj.nnx.Optimizer(model, optax.sgd(0.1), rule="sma")
    assert int(opt.step[...]) == 0  # nothing was updated
