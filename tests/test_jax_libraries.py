"""gradnorm.jax with the parameter trees of the JAX model libraries: an equinox module filtered to its
arrays, a flax nnx ``State``, flax linen parameters (a dict or a ``FrozenDict``) with BatchNorm
statistics through ``has_aux``, and ``gj.transform`` over an equinox module. Every direction is
checked against the NumPy core (``gradnorm.step`` on float64 leaves with gradients and HVPs from
``jax.grad``), which knows nothing of these node types; the result keeps the library's types."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import gradnorm
import gradnorm.jax as gj
from conformance.settings import settings
from tests._jax import full_float32_matmuls, x64  # noqa: F401  (the fixture is autouse)

SETTINGS = settings("jax_libraries")  # the rules that perturb or regularize (conformance/settings.py)
IDS = [r for r, _ in SETTINGS]


def data(n=16, d=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, d))), jnp.asarray(rng.integers(0, classes, size=n))


def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def core_direction(params, loss_fn, rule, hyper):
    """The NumPy core's direction for `loss_fn(params)`, on the float64 leaves of `params` as a plain
    list (the core flattens with optree, which does not know the libraries' node types)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def flat_loss(xs):
        return loss_fn(jax.tree_util.tree_unflatten(treedef, list(xs)))

    value_and_grad = jax.value_and_grad(flat_loss)

    def grad_fn(xs):
        loss, g = value_and_grad([jnp.asarray(x) for x in xs])
        return np.asarray(loss), [np.asarray(a) for a in g]

    def hvp_fn(xs, v):
        out = jax.jvp(jax.grad(flat_loss), ([jnp.asarray(x) for x in xs],), ([jnp.asarray(a) for a in v],))[1]
        return [np.asarray(a) for a in out]

    res = gradnorm.step([np.asarray(x) for x in leaves], grad_fn, rule=rule, hvp_fn=hvp_fn, **hyper)
    return res.grad


def assert_direction(got, params, loss_fn, rule, hyper):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(params)
    want = core_direction(params, loss_fn, rule, hyper)
    scale = max(np.abs(w).max() for w in want)
    for a, w in zip(jax.tree_util.tree_leaves(got), want):
        np.testing.assert_allclose(np.asarray(a), w, rtol=0, atol=1e-11 * scale)


# --------------------------------------------------------------------------------------------
# equinox


eqx = pytest.importorskip("equinox")


def equinox_problem():
    model = eqx.nn.MLP(4, 3, 8, 2, activation=jnp.tanh, key=jax.random.key(0), dtype=jnp.float64)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x, y = data()

    def loss_fn(p, x, y):
        return cross_entropy(jax.vmap(eqx.combine(p, static))(x), y)

    return params, static, loss_fn, x, y


@pytest.mark.parametrize("rule,hyper", SETTINGS, ids=IDS)
def test_an_equinox_module_filtered_to_its_arrays(rule, hyper):
    with x64():
        params, _, loss_fn, x, y = equinox_problem()
        res = jax.jit(lambda p: gj.step(p, loss_fn, x, y, rule=rule, **hyper))(params)
        assert isinstance(res.grad, eqx.nn.MLP)  # a module again, with None where the static parts are
        assert_direction(res.grad, params, lambda p: loss_fn(p, x, y), rule, hyper)
        updated = eqx.apply_updates(params, jax.tree_util.tree_map(lambda d: -0.1 * d, res.grad))
        assert np.isfinite(float(loss_fn(updated, x, y)))


def test_the_core_refuses_a_module_and_names_the_jax_adapter():
    """The core flattens with optree, to which an equinox module is one leaf: a clear error that
    points to gradnorm.jax.step, before the loss runs."""
    with x64():
        params = equinox_problem()[0]
        calls = []
        with pytest.raises(gradnorm.ParamsError, match=r"JAX pytree node.*gradnorm\.jax\.step"):
            gradnorm.step(params, lambda p: calls.append(p), rule="sgd")
    assert not calls


def test_transform_trains_an_equinox_module():
    """The optax route of equinox users: `eqx.filter_value_and_grad`, then `tx.update` with the
    loss of the batch; one step equals the core's SAM direction applied by SGD."""
    with x64():
        params, static, loss_fn, x, y = equinox_problem()
        model = eqx.combine(params, static)
        tx = gj.transform(optax.sgd(0.1), rule="sam", rho=0.05)
        opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

        @eqx.filter_jit
        def train_step(model, opt_state):
            def batch_loss(m):
                return cross_entropy(jax.vmap(m)(x), y)

            loss, grads = eqx.filter_value_and_grad(batch_loss)(model)
            p, s = eqx.partition(model, eqx.is_inexact_array)
            updates, opt_state = tx.update(grads, opt_state, p, value=loss,
                                           loss_fn=lambda q: batch_loss(eqx.combine(q, s)))
            return eqx.apply_updates(model, updates), opt_state

        new_model, _ = train_step(model, opt_state)
        direction = core_direction(params, lambda p: loss_fn(p, x, y), "sam", {"rho": 0.05})
        new_params = eqx.filter(new_model, eqx.is_inexact_array)
        for new, old, d in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(params), direction):
            np.testing.assert_allclose(np.asarray(new), np.asarray(old) - 0.1 * d, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# flax


nnx = pytest.importorskip("flax.nnx")
linen = pytest.importorskip("flax.linen")
flax_core = pytest.importorskip("flax.core")


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs, param_dtype=jnp.float64, dtype=jnp.float64)
        self.out = nnx.Linear(8, 3, rngs=rngs, param_dtype=jnp.float64, dtype=jnp.float64)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


@pytest.mark.parametrize("rule,hyper", SETTINGS, ids=IDS)
def test_a_flax_nnx_state(rule, hyper):
    with x64():
        graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))
        x, y = data()

        def loss_fn(s, x, y):
            return cross_entropy(nnx.merge(graphdef, s)(x), y)

        res = jax.jit(lambda s: gj.step(s, loss_fn, x, y, rule=rule, **hyper))(state)
        assert isinstance(res.grad, nnx.State)
        assert_direction(res.grad, state, lambda s: loss_fn(s, x, y), rule, hyper)


class LinenBN(linen.Module):
    @linen.compact
    def __call__(self, x, train):
        h = linen.Dense(8, param_dtype=jnp.float64)(x)
        h = linen.BatchNorm(use_running_average=not train, momentum=0.5, param_dtype=jnp.float64)(h)
        return linen.Dense(3, param_dtype=jnp.float64)(jnp.tanh(h))


@pytest.mark.parametrize("frozen", [False, True], ids=["dict", "FrozenDict"])
@pytest.mark.parametrize("rule,hyper", [SETTINGS[0], SETTINGS[2]], ids=[IDS[0], IDS[2]])
def test_flax_linen_batchnorm_statistics_come_from_the_unperturbed_pass(rule, hyper, frozen):
    """`has_aux` returns the batch statistics of the pass at the given parameters (what
    `model.apply` at those parameters returns), not those of a perturbed pass; the direction is
    the core's for the training-mode loss."""
    with x64():
        model = LinenBN()
        x, y = data()
        variables = model.init(jax.random.key(1), x, train=False)
        params, stats = variables["params"], variables["batch_stats"]
        if frozen:
            params, stats = flax_core.freeze(params), flax_core.freeze(stats)

        def loss_fn(p, stats, x, y):
            logits, updates = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return cross_entropy(logits, y), updates["batch_stats"]

        res = jax.jit(lambda p, s: gj.step(p, loss_fn, s, x, y, rule=rule, has_aux=True, **hyper))(params, stats)
        loss, new_stats = res.loss
        want_loss, want_stats = loss_fn(params, stats, x, y)
        assert float(loss) == pytest.approx(float(want_loss), rel=1e-12)
        for got, want, old in zip(jax.tree_util.tree_leaves(new_stats), jax.tree_util.tree_leaves(want_stats),
                                  jax.tree_util.tree_leaves(stats)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-14)
            assert not np.allclose(np.asarray(got), np.asarray(old))  # the pass did update them
        if frozen:
            assert isinstance(res.grad, flax_core.FrozenDict)
        assert_direction(res.grad, params, lambda p: loss_fn(p, stats, x, y)[0], rule, hyper)
