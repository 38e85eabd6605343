"""gradnorm.jax.step: every rule gives the independent NumPy reference direction (eager and under
jit, float64), any JAX pytree works, has_aux returns the model state of the unperturbed pass, PRNG
keys are reused or folded in as asked, hyperparameters given as arrays never recompile, bad input
fails clearly before the loss runs, zero gradients give no NaN, non-finite gradients are reported,
dtypes are preserved, and the local/global policies over a named axis do what they claim."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("optax")

import optree

import gradnorm
import gradnorm.jax as gj
from conformance.problems import PROBLEMS
from conformance.reference import FlatProblem, reference
from conformance.settings import adapter_ids, adapter_settings
from tests._jax import COMPILES, full_float32_matmuls, x64  # noqa: F401  (the fixture is autouse)

SETTINGS = adapter_settings()  # every rule and its variants (conformance/settings.py)
IDS = adapter_ids()

# --------------------------------------------------------------------------------------------
# problems


def mlp(dtype="float64"):
    """The conformance MLP (4-8-6-3 tanh, softmax cross-entropy, a nested dict of 6 leaves) as
    a JAX loss ``loss_fn(params, X, Y)``, its data and its initial parameters."""
    problem = PROBLEMS["mlp"]
    data = {k: jnp.asarray(v, dtype=dtype) for k, v in problem.data.items()}

    def loss_fn(params, X, Y):
        return problem.loss(jnp, params, {"X": X, "Y": Y})

    params = optree.tree_map(lambda a: jnp.asarray(a, dtype=dtype), problem.params0())
    return loss_fn, params, data["X"], data["Y"]


def conformance_problem(name, dtype="float64"):
    """Any conformance problem as ``loss_fn(params, *data)`` (data in sorted key order), its
    initial parameters and its data."""
    problem = PROBLEMS[name]
    keys = sorted(problem.data)

    def loss_fn(params, *data):
        return problem.loss(jnp, params, dict(zip(keys, data)))

    params = optree.tree_map(lambda a: jnp.asarray(a, dtype=dtype), problem.params0())
    return loss_fn, params, tuple(jnp.asarray(problem.data[k], dtype=dtype) for k in keys)


def take(tree, i):
    """Instance ``i`` of a vmapped result."""
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf, dtype=np.float64)) for leaf in jax.tree_util.tree_leaves(tree)])


def numpy_reference(rule, hyper, params, data=None, problem="mlp"):
    """conformance.reference's independent NumPy float64 rule on a conformance problem (the MLP
    by default; optionally on other data)."""
    problem = PROBLEMS[problem] if data is None else dataclasses.replace(PROBLEMS[problem], data=data)
    return reference(rule, FlatProblem(problem), flat(params), **hyper)


def assert_reference(res, rule, hyper, params, rtol=1e-10, problem="mlp"):
    """``res`` (a StepResult) against conformance.reference's independent NumPy float64 rule."""
    want = numpy_reference(rule, hyper, params, problem=problem)
    got = flat(res.grad)
    scale = max(np.abs(want.direction).max(), 1.0)
    np.testing.assert_allclose(got, want.direction, rtol=0, atol=rtol * scale + want.atol)
    for name, value in want.info.items():
        np.testing.assert_allclose(float(res.info[name]), value, rtol=rtol, atol=rtol, err_msg=name)
    assert int(res.info["grad_evals"]) == want.grad_evals
    assert int(res.info["hvp_evals"]) == want.hvp_evals
    assert bool(res.info["finite"])
    np.testing.assert_allclose(float(res.loss), want.info["loss"], rtol=rtol)


# --------------------------------------------------------------------------------------------
# the same steps as the reference


def check_result(res, rule, hyper, params, problem):
    assert isinstance(res, gradnorm.StepResult)
    assert jax.tree_util.tree_structure(res.grad) == jax.tree_util.tree_structure(params)
    assert all(d.dtype == jnp.float64 for d in jax.tree_util.tree_leaves(res.grad))
    assert_reference(res, rule, hyper, params, problem=problem)


# The quadratic (0.5 x'Ax - b'x, condition 100) compiles in a fraction of the MLP's time; the MLP's
# nested tree is covered below and by the conformance suite, which runs every rule on it.
@functools.cache
def all_rules_jitted():
    """Every setting's step in one jitted program (one compilation instead of fifteen)."""
    with x64():
        loss_fn, params, data = conformance_problem("quadratic")
        results = jax.jit(lambda p, data: [gj.step(p, loss_fn, *data, rule=r, **h) for r, h in SETTINGS])(params, data)
        return params, results


@pytest.mark.parametrize("index", range(len(SETTINGS)), ids=IDS)
def test_every_rule_equals_the_numpy_reference_under_jit(index):
    params, results = all_rules_jitted()
    rule, hyper = SETTINGS[index]
    with x64():
        check_result(results[index], rule, hyper, params, "quadratic")


EAGER = (8,)  # eager dispatch is slow; the conformance suite runs every rule eagerly


@pytest.mark.parametrize("rule,hyper", [SETTINGS[i] for i in EAGER], ids=[IDS[i] for i in EAGER])
def test_rules_equal_the_numpy_reference_eagerly(rule, hyper):
    with x64():
        loss_fn, params, data = conformance_problem("quadratic")
        check_result(gj.step(params, loss_fn, *data, rule=rule, **hyper), rule, hyper, params, "quadratic")


def test_stateful_rule_carries_its_state_through_jit():
    hyper = {"lam": 0.3, "threshold": -1.0, "delay": 1}  # the gate opens at the second step
    with x64():
        loss_fn, params, X, Y = mlp()
        step = jax.jit(lambda p, s, x, y: gj.step(p, loss_fn, x, y, rule="coherent", state=s, **hyper))
        state = gradnorm.rules.get("coherent", **hyper).init(params)
        first = step(params, state, X, Y)
        second = step(params, first.state, X, Y)
        assert float(first.info["gate"]) == 0.0 and float(second.info["gate"]) == 1.0
        assert int(second.state.step) == 2
        want = reference("coherent", FlatProblem(PROBLEMS["mlp"]), flat(params), **hyper, step=1)
        np.testing.assert_allclose(flat(second.grad), want.direction, rtol=1e-12, atol=1e-14)


def test_forward_over_reverse_hvp_is_exact_on_a_quadratic():
    """gr = g + gamma A g in closed form on 0.5 x'Ax - b'x (a nested list/tuple/0-d tree)."""
    rng = np.random.default_rng(3)
    m = rng.normal(size=(6, 6))
    a, b = m @ m.T / 6 + np.eye(6), rng.normal(size=6)
    x0 = rng.normal(size=6)
    with x64():
        A, B = jnp.asarray(a), jnp.asarray(b)
        params = [jnp.asarray(x0[:3].reshape(1, 3)), (jnp.asarray(x0[3:5]), jnp.asarray(x0[5]))]

        def loss_fn(p):
            x = jnp.concatenate([p[0].reshape(-1), p[1][0], p[1][1][None]])
            return 0.5 * x @ A @ x - B @ x

        g = a @ x0 - b
        res = jax.jit(lambda p: gj.step(p, loss_fn, rule="gr", gamma=0.3))(params)
        np.testing.assert_allclose(flat(res.grad), g + 0.3 * a @ g, rtol=1e-12)
        sam = gj.step(params, loss_fn, rule="sam", rho=0.2)
        e = 0.2 * g / (np.linalg.norm(g) + 1e-12)
        np.testing.assert_allclose(flat(sam.grad), a @ (x0 + e) - b, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# any JAX pytree


@dataclasses.dataclass
class Dense:
    """A registered dataclass (as flax.struct / equinox modules are): arrays are children, the
    activation's name is static metadata. optree alone does not know this node type."""

    w: object
    b: object
    activation: str = dataclasses.field(default="tanh", metadata={"static": True})


jax.tree_util.register_dataclass(Dense, data_fields=["w", "b"], meta_fields=["activation"])


@jax.tree_util.register_pytree_with_keys_class
class Model:
    """A custom node holding a non-array attribute in its aux data (like an equinox module)."""

    def __init__(self, layers, name="model"):
        self.layers, self.name = layers, name

    def tree_flatten_with_keys(self):
        return [(jax.tree_util.GetAttrKey("layers"), self.layers)], self.name

    @classmethod
    def tree_unflatten(cls, name, children):
        return cls(children[0], name)


def test_registered_pytree_nodes_work_and_give_the_dict_result():
    with x64():
        loss_fn, params, X, Y = mlp()
        layers = ("hidden1", "hidden2", "out")
        model = Model([Dense(params[k]["w"], params[k]["b"]) for k in layers])

        def model_loss(m, x, y):
            return loss_fn({k: {"w": d.w, "b": d.b} for k, d in zip(layers, m.layers)}, x, y)

        settings = [("sam", {"rho": 0.05}), ("gr", {"gamma": 0.1})]
        results = jax.jit(lambda m, x, y: [gj.step(m, model_loss, x, y, rule=r, **h) for r, h in settings])(model, X, Y)
        for (rule, hyper), res in zip(settings, results):
            assert isinstance(res.grad, Model) and isinstance(res.grad.layers[0], Dense)
            assert res.grad.layers[0].activation == "tanh" and res.grad.name == "model"
            as_dict = {k: {"b": d.b, "w": d.w} for k, d in zip(layers, res.grad.layers)}
            want = numpy_reference(rule, hyper, params).direction
            np.testing.assert_allclose(flat(as_dict), want, rtol=0, atol=1e-10 * np.abs(want).max())


def test_per_leaf_hyperparameters_as_a_tree_follow_the_leaves():
    """SAM with rho per leaf: leaf i moves by rho_i g_i / ||g|| (the norm stays global)."""
    with x64():
        loss_fn, params, X, Y = mlp()
        rho = jax.tree_util.tree_map(lambda _: 0.0, params)
        rho["out"]["w"] = 0.2
        flat_list = gradnorm.PerLeaf(jax.tree_util.tree_leaves(rho))  # the same values in leaf order
        res, same = jax.jit(lambda p: [gj.step(p, loss_fn, X, Y, rule="sam", rho=r)
                                       for r in (gradnorm.PerLeaf(rho), flat_list)])(params)
        per_coordinate = np.concatenate([np.full(np.size(p), r) for p, r in zip(jax.tree_util.tree_leaves(params),
                                                                                 jax.tree_util.tree_leaves(rho))])
        want = numpy_reference("sam", {"rho": per_coordinate}, params).direction
        np.testing.assert_allclose(flat(res.grad), want, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(flat(same.grad), flat(res.grad))
        with pytest.raises(gradnorm.HyperparameterError, match="`rho`"):
            gj.step(params, loss_fn, X, Y, rule="sam", rho=gradnorm.PerLeaf({"a": 0.1, "b": 0.2, "c": 0.1, "d": 0.1,
                                                                              "e": 0.1, "f": 0.1}))


def test_numpy_parameters_are_accepted():
    with x64():
        loss_fn, params, data = conformance_problem("quadratic")
        as_numpy = jax.tree_util.tree_map(np.asarray, params)
        res = gj.step(as_numpy, loss_fn, *data, rule="sam", rho=0.05)
        assert all(isinstance(d, jax.Array) for d in jax.tree_util.tree_leaves(res.grad))
        assert_reference(res, "sam", {"rho": 0.05}, params, problem="quadratic")


# --------------------------------------------------------------------------------------------
# model state and randomness


def bn_problem():
    """A batch-normalized layer: the aux output is the updated running mean, which depends on
    the parameters through the batch statistics of the pre-activations."""
    rng = np.random.default_rng(5)
    X, Y = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32), jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    params = {"w1": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "w2": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
    running = jnp.zeros(4, jnp.float32)

    def loss_fn(p, running, x, y):
        h = x @ p["w1"]
        mean, var = jnp.mean(h, axis=0), jnp.var(h, axis=0)
        out = jnp.tanh((h - mean) / jnp.sqrt(var + 1e-5)) @ p["w2"]
        return jnp.mean((out - y) ** 2), 0.9 * running + 0.1 * mean

    return loss_fn, params, running, X, Y


@pytest.mark.parametrize("rule,hyper", [("sam", {"rho": 0.5}), ("gr", {"gamma": 0.1})])
def test_has_aux_returns_the_state_of_the_unperturbed_pass(rule, hyper):
    loss_fn, params, running, X, Y = bn_problem()

    def program(p, r):
        res = gj.step(p, loss_fn, r, X, Y, rule=rule, has_aux=True, **hyper)
        plain = gj.step(p, lambda q, r, x, y: loss_fn(q, r, x, y)[0], r, X, Y, rule=rule, **hyper)
        g = jax.grad(lambda q: loss_fn(q, r, X, Y)[0])(p)
        moved = jax.tree_util.tree_map(lambda q, gi: q + 0.5 * gi, p, g)
        return res, plain, loss_fn(p, r, X, Y), loss_fn(moved, r, X, Y)[1]

    res, plain, (want_loss, want_aux), moved_aux = jax.jit(program)(params, running)
    loss, aux = res.loss
    np.testing.assert_allclose(aux, want_aux, rtol=1e-6)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert np.abs(np.asarray(moved_aux - want_aux)).max() > 1e-3  # a perturbed pass would have given another
    # the direction is the one of the loss alone
    np.testing.assert_allclose(flat(res.grad), flat(plain.grad), rtol=2e-6, atol=1e-7)


def dropout_problem():
    rng = np.random.default_rng(9)
    X, Y = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32), jnp.asarray(rng.normal(size=(16,)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(5, 6)), jnp.float32), "v": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}

    def loss_fn(p, x, y, *, key):
        h = jnp.tanh(x @ p["w"])
        keep = jax.random.bernoulli(key, 0.5, h.shape)
        return jnp.mean((jnp.where(keep, 2.0 * h, 0.0) @ p["v"] - y) ** 2)

    return loss_fn, params, X, Y


def manual_sam(loss_fn, params, rho, key0, key1, X, Y):
    g = jax.grad(lambda p: loss_fn(p, X, Y, key=key0))(params)
    norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree_util.tree_leaves(g)))
    point = jax.tree_util.tree_map(lambda p, gi: p + rho * gi / (norm + 1e-12), params, g)
    return jax.grad(lambda p: loss_fn(p, X, Y, key=key1))(point)


def test_prng_key_is_reused_in_every_pass_or_folded_in():
    loss_fn, params, X, Y = dropout_problem()
    key = jax.random.key(0)


    def program(p, k):
        return (gj.step(p, loss_fn, X, Y, rule="sam", rho=0.1, key=k),
                gj.step(p, loss_fn, X, Y, rule="sam", rho=0.1, key=k, same_key=False),
                manual_sam(loss_fn, p, 0.1, k, k, X, Y), manual_sam(loss_fn, p, 0.1, k, jax.random.fold_in(k, 1), X, Y))

    same, fresh, reused, folded = jax.jit(program)(params, key)
    np.testing.assert_allclose(flat(same.grad), flat(reused), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flat(fresh.grad), flat(folded), rtol=1e-5, atol=1e-6)
    assert np.abs(flat(same.grad) - flat(fresh.grad)).max() > 1e-3  # the masks differ
    # the first pass is the same under both settings
    np.testing.assert_array_equal(same.info["loss"], fresh.info["loss"])


# --------------------------------------------------------------------------------------------
# no recompilation, dynamic hyperparameters


def test_array_hyperparameters_are_dynamic_and_never_recompile():
    loss_fn, params, X, Y = mlp("float32")
    step = jax.jit(lambda p, rho: gj.step(p, loss_fn, X, Y, rule="sam", rho=rho))
    rhos = [jnp.asarray(r, jnp.float32) for r in (0.05, 0.1, 0.2)]
    first = step(params, rhos[0])
    before = COMPILES[0]
    later = [step(params, r) for r in rhos[1:]]
    assert COMPILES[0] == before and step._cache_size() == 1
    for rho, res in zip((0.05, 0.1, 0.2), [first, *later]):
        want = numpy_reference("sam", {"rho": rho}, params).direction
        np.testing.assert_allclose(flat(res.grad), want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert gradnorm.rules.get("sam", rho=jnp.asarray(0.05)).grad_evals == 2


# --------------------------------------------------------------------------------------------
# errors and faults


def test_bad_arguments_raise_clear_errors_before_loss_fn_runs():
    loss_fn, params, X, Y = mlp("float32")
    calls = []

    def counted(p, x, y):
        calls.append(1)
        return loss_fn(p, x, y)

    with pytest.raises(gradnorm.UnknownRuleError, match="Did you mean 'sam'"):
        gj.step(params, counted, X, Y, rule="sma", rho=0.05)
    with pytest.raises(gradnorm.HyperparameterError, match="`rho` of rule 'sam'.*Received: -0.1"):
        gj.step(params, counted, X, Y, rule="sam", rho=-0.1)
    with pytest.raises(gradnorm.HyperparameterError, match="`rho`"):
        gj.step(params, counted, X, Y, rule="sam")
    with pytest.raises(TypeError, match="`loss_fn` of gradnorm.jax.step must be a callable"):
        gj.step(params, "loss", X, Y, rule="sam", rho=0.05)
    with pytest.raises(ValueError, match="`perturbation` .* 'local', 'global'. Received: 'sync'"):
        gj.step(params, counted, X, Y, rule="sam", rho=0.05, perturbation="sync")
    with pytest.raises(TypeError, match="`has_aux`"):
        gj.step(params, counted, X, Y, rule="sam", rho=0.05, has_aux="yes")
    with pytest.raises(gradnorm.ParamsError, match=r"\['out'\]\['b'\].*int32"):
        gj.step({**params, "out": {**params["out"], "b": jnp.zeros(3, jnp.int32)}}, counted, X, Y, rule="sgd")
    with pytest.raises(gradnorm.ParamsError, match="at least one array"):
        gj.step({}, counted, X, Y, rule="sgd")
    with pytest.raises(gradnorm.ParamsError, match="real floating-point array"):
        gj.step({"w": [1.0, 2.0]}, counted, X, Y, rule="sgd")
    with pytest.raises(TypeError, match="`state` of rule 'coherent' must be a CoherentState"):
        gj.step(params, counted, X, Y, rule="coherent", lam=0.1, threshold=0.0, state=(1,))
    assert not calls


def test_bad_loss_outputs_are_named():
    loss_fn, params, X, Y = mlp("float32")
    with pytest.raises(gradnorm.OracleOutputError, match="scalar .*shape \\(\\).*shape \\(32,\\)"):
        gj.step(params, lambda p, x, y: jnp.sum((x @ p["hidden1"]["w"]) ** 2, axis=1), X, Y, rule="sgd")
    with pytest.raises(gradnorm.OracleOutputError, match="pass `has_aux=True`"):
        gj.step(params, lambda p, x, y: (loss_fn(p, x, y), {"n": 1}), X, Y, rule="sam", rho=0.05)
    with pytest.raises(gradnorm.OracleOutputError, match="pair `\\(loss, aux\\)`"):
        gj.step(params, loss_fn, X, Y, rule="sam", rho=0.05, has_aux=True)
    with pytest.raises(gradnorm.OracleOutputError, match="floating-point loss"):
        jax.jit(lambda p: gj.step(p, lambda q: jnp.sum(q["out"]["b"] > 0), rule="sgd"))(params)


ZERO_TARGET = {"a": np.asarray([1.0, -2.0, 0.5], np.float32), "b": np.asarray(0.25, np.float32)}


@functools.cache
def at_the_minimum():
    def loss_fn(p):
        return 0.5 * sum(jnp.sum((p[k] - ZERO_TARGET[k]) ** 2) for k in p)

    return jax.jit(lambda p: [gj.step(p, loss_fn, rule=r, **h) for r, h in SETTINGS])(ZERO_TARGET)


@pytest.mark.parametrize("index", range(len(SETTINGS)), ids=IDS)
def test_zero_gradient_gives_no_nan(index):
    """At the minimum of a quadratic every rule returns the zero direction (coherent: its
    regularization term alone), without NaN."""
    rule, hyper = SETTINGS[index]
    res, target = at_the_minimum()[index], ZERO_TARGET
    d = flat(res.grad)
    assert np.all(np.isfinite(d)), d
    if rule == "coherent":  # g = 0: coherence 0, above the threshold; d = lam * grad R
        lam, reg = hyper["lam"], flat(target) if hyper.get("penalty", "l2") == "l2" else np.sign(flat(target))
        np.testing.assert_allclose(d, lam * reg * float(res.info["gate"]), rtol=1e-6)
    else:
        assert np.abs(d).max() == 0.0, d
    assert bool(res.info["finite"]) and all(np.isfinite(float(v)) for v in res.info.values())


@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("rule,hyper", [("sam", {"rho": 0.05}), ("gam", {})])
def test_non_finite_gradients_are_reported_in_info(rule, hyper, bad):
    def loss_fn(p, scale):
        return jnp.sum(scale * p["w"] ** 2)

    params = {"w": jnp.asarray([1.0, 2.0])}
    step = jax.jit(lambda p, s: gj.step(p, loss_fn, s, rule=rule, **hyper))
    assert bool(step(params, np.float32(1.0)).info["finite"])
    assert not bool(step(params, np.float32(bad)).info["finite"])


# --------------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])  # float32: every other test
def test_directions_keep_the_parameter_dtype(dtype):
    with x64():
        loss_fn, params, data = conformance_problem("logistic", dtype)
        settings = [("gam", {}), ("gr", {"gamma": 0.1})]
        results = jax.jit(lambda p: [gj.step(p, loss_fn, *data, rule=r, **h) for r, h in settings])(params)
        for (rule, hyper), res in zip(settings, results):
            assert all(d.dtype == jnp.dtype(dtype) for d in jax.tree_util.tree_leaves(res.grad)), rule
            assert res.info["grad_norm"].dtype == (jnp.float64 if dtype == "float64" else jnp.float32)
            assert bool(res.info["finite"])
            want = numpy_reference(rule, hyper, params, problem="logistic").direction
            if dtype == "bfloat16":  # close to the float64 reference at bf16 resolution
                assert np.abs(flat(res.grad) - want).max() <= 0.05 * np.abs(want).max(), rule
            else:
                np.testing.assert_allclose(flat(res.grad), want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# a named axis: the perturbation policies (vmap stands in for devices here; the real two-device
# runs with shard_map and jit shardings are in test_jax_multidevice.py)


@pytest.mark.parametrize("rule,hyper", [("sam", {"rho": 0.1}), ("flooding", {})])
def test_local_and_global_policies_over_a_named_axis(rule, hyper):
    with x64():
        loss_fn, params, (X, y) = conformance_problem("logistic")
        data = PROBLEMS["logistic"].data
        shard_data = [{k: v[i * 24:(i + 1) * 24] for k, v in data.items()} for i in range(2)]
        if rule == "flooding":  # a level between the two shards' losses: their signs differ
            losses = [numpy_reference("sgd", {}, params, d, "logistic").info["loss"] for d in shard_data]
            hyper = {"b": 0.25 * losses[0] + 0.75 * losses[1]}
        per_shard = [numpy_reference(rule, hyper, params, d, "logistic") for d in shard_data]
        full = numpy_reference(rule, hyper, params, problem="logistic")
        shards = (X.reshape(2, 24, 5), y.reshape(2, 24))

        def both(p, x, y):
            return [gj.step(p, loss_fn, x, y, rule=rule, axis_name="d", perturbation=policy, **hyper)
                    for policy in ("local", "global")]

        local, glob = jax.jit(jax.vmap(both, in_axes=(None, 0, 0), axis_name="d"))(params, *shards)
        mean = (per_shard[0].direction + per_shard[1].direction) / 2
        for i in range(2):  # every instance ends with the same, averaged values
            np.testing.assert_allclose(flat(take(local.grad, i)), mean, rtol=0, atol=1e-12)
            np.testing.assert_allclose(flat(take(glob.grad, i)), full.direction, rtol=0, atol=1e-12)
        np.testing.assert_allclose(local.loss, full.info["loss"], rtol=1e-12)
        np.testing.assert_allclose(glob.info["grad_norm"], full.info["grad_norm"], rtol=1e-12)
        assert np.abs(mean - full.direction).max() > 1e-4  # the two policies differ here


def test_jax_ops_fraction_below_matches_a_numpy_count():
    """JaxOps counts |x| < tol over concatenated chunks (several when the leaves exceed the chunk
    budget): the same as NumPy per leaf, in the leaves' dtype, with |x| == tol, NaN and inf not
    below; mixed dtypes take the per-leaf path."""
    from gradnorm.jax._ops import _MIN_CHUNK, JaxOps

    ops = JaxOps()
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        t = jnp.asarray(1e-3, dtype)
        below = jnp.nextafter(t, jnp.zeros_like(t))
        special = jnp.stack([t, -t, below, -below, jnp.nan, jnp.inf, -jnp.inf, 0.0]).astype(dtype)
        many = [jnp.asarray(rng.normal(scale=2e-3, size=(_MIN_CHUNK // 3,)), dtype) for _ in range(7)]
        for leaves in ([special], [special, *many]):
            want = sum(int(np.count_nonzero(np.abs(np.asarray(a, np.float64)) < float(t))) for a in leaves)
            want /= sum(a.size for a in leaves)
            for tol in (1e-3, jnp.asarray(1e-3)):
                got = ops.fraction_below(leaves, tol)
                assert got.dtype == jnp.float32 and float(got) == pytest.approx(want, rel=1e-6, abs=0.0)
    mixed = [jnp.asarray([0.0, 1.0], jnp.float32), jnp.asarray([0.5, 0.0, 2.0], jnp.bfloat16)]
    assert float(ops.fraction_below(mixed, 0.75)) == pytest.approx(3 / 5)
