"""gradnorm.jax.transform, the optax GradientTransformationExtraArgs: the directions of the
independent NumPy reference, the optax contract (no recompilation on the second call, unknown
extra arguments ignored and passed on, dtypes preserved, inside chain / inject_hyperparams /
MultiSteps / apply_if_finite), agreement with optax.contrib.sam, clear errors."""

from __future__ import annotations

import contextlib

import dataclasses
import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import optree

import gradnorm
import gradnorm.jax as gj
from conformance.problems import PROBLEMS
from conformance.reference import FlatProblem, reference
from conformance.settings import ids, settings

SETTINGS = settings("jax_transform")  # one or two variants per rule (conformance/settings.py)
IDS = ids(SETTINGS)

from tests._jax import COMPILES, full_float32_matmuls, x64  # noqa: F401  (the fixture is autouse)


def mlp(dtype="float64", data=None):
    problem = PROBLEMS["mlp"]
    data = {k: jnp.asarray(v, dtype=dtype) for k, v in (problem.data if data is None else data).items()}

    def loss_fn(params):
        return problem.loss(jnp, params, data)

    params = optree.tree_map(lambda a: jnp.asarray(a, dtype=dtype), problem.params0())
    return loss_fn, params


def small(dtype="float32"):
    """A least-squares problem with two leaves (a vector and a 0-d bias): cheap to compile,
    for the tests of the optax contract."""
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(8, 3)), dtype)
    y = jnp.asarray(rng.normal(size=8), dtype)

    def loss_fn(p):
        return jnp.mean((X @ p["w"] + p["b"] - y) ** 2)

    return loss_fn, {"w": jnp.asarray([0.5, -1.0, 2.0], dtype), "b": jnp.asarray(0.3, dtype)}


def take(tree, i):
    """Instance ``i`` of a vmapped result."""
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf, dtype=np.float64)) for leaf in jax.tree_util.tree_leaves(tree)])


def numpy_reference(rule, hyper, params, data=None, problem="mlp"):
    """conformance.reference's independent NumPy float64 rule on a conformance problem."""
    problem = PROBLEMS[problem] if data is None else dataclasses.replace(PROBLEMS[problem], data=data)
    return reference(rule, FlatProblem(problem), flat(params), **hyper)


def conformance_loss(name, dtype="float64"):
    """A conformance problem's loss ``loss_fn(params)`` on its data, and its initial parameters."""
    problem = PROBLEMS[name]
    data = {k: jnp.asarray(v, dtype=dtype) for k, v in problem.data.items()}
    params = optree.tree_map(lambda a: jnp.asarray(a, dtype=dtype), problem.params0())
    return (lambda p: problem.loss(jnp, p, data)), params


def train_step(tx, loss_fn, pass_value=True):
    """One jitted update as a user writes it: the gradient at params, then the transform."""

    @jax.jit
    def run(params, state):
        value, grads = jax.value_and_grad(loss_fn)(params)
        extra = {"value": value} if pass_value else {}
        updates, state = tx.update(grads, state, params, loss_fn=loss_fn, **extra)
        return updates, state

    return run


# --------------------------------------------------------------------------------------------
# the reference directions, through optax.sgd(1.0) (updates = -direction exactly)


@functools.cache
def all_rules_one_update():
    """Every setting's update in one jitted program, on the quadratic (cheap to compile)."""
    with x64():
        loss_fn, params = conformance_loss("quadratic")
        txs = [gj.transform(optax.sgd(1.0), rule=r, **h) for r, h in SETTINGS]

        def program(p):
            value, grads = jax.value_and_grad(loss_fn)(p)
            out = [tx.update(grads, tx.init(p), p, value=value, loss_fn=loss_fn) for tx in txs]
            # without value=: the transform computes the loss with loss_fn itself (flooding, which reads it)
            flooding = txs[SETTINGS.index(("flooding", {"b": 5.0}))]
            out.append(flooding.update(grads, flooding.init(p), p, loss_fn=loss_fn))
            return out

        return params, jax.jit(program)(params)


@pytest.mark.parametrize("index", range(len(SETTINGS)), ids=IDS)
def test_every_rule_gives_the_reference_direction_and_info(index):
    params, results = all_rules_one_update()
    rule, hyper = SETTINGS[index]
    updates, state = results[index]
    want = numpy_reference(rule, hyper, params, problem="quadratic")
    scale = max(np.abs(want.direction).max(), 1.0)
    np.testing.assert_allclose(-flat(updates), want.direction, rtol=0, atol=1e-10 * scale + want.atol)
    assert isinstance(state, gj.TransformState)
    for name, value in want.info.items():
        np.testing.assert_allclose(float(state.info[name]), value, rtol=1e-10, atol=1e-10, err_msg=name)
    assert int(state.info["grad_evals"]) == want.grad_evals and int(state.info["hvp_evals"]) == want.hvp_evals
    assert bool(state.info["finite"])


def test_without_value_the_loss_comes_from_loss_fn():
    params, results = all_rules_one_update()
    with_value, without = results[SETTINGS.index(("flooding", {"b": 5.0}))], results[-1]
    np.testing.assert_array_equal(flat(with_value[0]), flat(without[0]))
    want = numpy_reference("sgd", {}, params, problem="quadratic").info["loss"]
    np.testing.assert_allclose(float(without[1].info["loss"]), want, rtol=1e-12)


def test_sam_equals_optax_contrib_sam_opaque_mode():
    """Five SGD steps of sam (norm_eps=0: optax's normalize divides by the raw norm) against
    optax.contrib.sam(sgd, chain(normalize, sgd(rho)), opaque_mode=True), float64."""
    lr, rho = 0.3, 0.05
    with x64():
        loss_fn, params = mlp()
        ours = gj.transform(optax.sgd(lr), rule="sam", rho=rho, norm_eps=0.0)
        theirs = optax.contrib.sam(optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
                                   sync_period=2, opaque_mode=True)
        grad = jax.grad(loss_fn)

        def one(carry, _):
            a, sa, b, sb = carry
            ua, sa = ours.update(grad(a), sa, a, loss_fn=loss_fn, value=loss_fn(a))
            ub, sb = theirs.update(grad(b), sb, b, grad_fn=lambda q, i: grad(q))
            return (optax.apply_updates(a, ua), sa, optax.apply_updates(b, ub), sb), None

        steps = jax.jit(lambda p: jax.lax.scan(one, (p, ours.init(p), p, theirs.init(p)), None, length=5)[0])
        a, _, b, _ = steps(params)
        assert np.abs(flat(a) - flat(params)).max() > 1e-3
        np.testing.assert_allclose(flat(a), flat(b), rtol=0, atol=1e-13)


# --------------------------------------------------------------------------------------------
# the optax contract


@pytest.mark.parametrize("committed", [False, True], ids=["uncommitted", "committed"])
@pytest.mark.parametrize("rule,hyper", [("sam", {"rho": 0.05}), ("coherent", {"lam": 0.1, "threshold": 0.0})])
def test_no_recompilation_on_later_calls(rule, hyper, committed):
    """The state from ``init`` has the structure, dtypes and device placement of the state an
    update returns (params placed on a device explicitly, or not), so the second call hits the
    jit cache."""
    loss_fn, params = small()
    base = optax.adam(1e-2)
    if committed:
        params = jax.device_put(params, jax.devices()[0])
        # (optax.adam's own step count is never committed: plain adam recompiles once here)
        base = optax.sgd(1e-2, momentum=0.9)
    tx = gj.transform(base, rule=rule, **hyper)
    step = train_step(tx, loss_fn)
    state = tx.init(params)
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    before = COMPILES[0]
    for _ in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert COMPILES[0] - before <= 1 and step._cache_size() == 1  # (apply_updates compiles once, eagerly)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(tx.init(params))


def test_inject_hyperparams_schedules_the_radius_without_recompiling():
    loss_fn, params = mlp("float32")
    schedule = optax.linear_schedule(0.0, 0.2, 4)  # rho = 0, 0.05, 0.1, ...
    tx = optax.inject_hyperparams(gj.transform)(optax.sgd(1.0), rule="sam", rho=schedule)
    step = train_step(tx, loss_fn)
    state = tx.init(params)
    assert step._cache_size() == 0
    for k in range(3):
        updates, state = step(params, state)
        want = numpy_reference("sam", {"rho": float(schedule(k))}, params).direction
        np.testing.assert_allclose(-flat(updates), want, rtol=0, atol=2e-6 * np.abs(want).max())
    assert step._cache_size() == 1
    # a numeric hyperparameter set by hand in the state takes effect too
    state.hyperparams["rho"] = jnp.asarray(0.3, jnp.float32)
    tx_fixed = optax.inject_hyperparams(gj.transform)(optax.sgd(1.0), rule="gnp", r=0.05, alpha=0.8)
    fixed_step = train_step(tx_fixed, loss_fn)
    fixed_state = tx_fixed.init(params)
    fixed_state.hyperparams["alpha"] = jnp.asarray(1.0, jnp.float32)  # gnp(alpha=1) is sam(rho=r)
    updates, _ = fixed_step(params, fixed_state)
    want = numpy_reference("sam", {"rho": 0.05}, params).direction
    np.testing.assert_allclose(-flat(updates), want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_inside_optax_chain_with_clipping():
    """chain(transform(identity), clip_by_global_norm, sgd): the chain clips the direction."""
    with x64():
        loss_fn, params = mlp()
        tx = optax.chain(gj.transform(optax.identity(), rule="sam", rho=0.05), optax.clip_by_global_norm(0.1),
                         optax.sgd(0.5))
        updates, _ = train_step(tx, loss_fn)(params, tx.init(params))
        d = numpy_reference("sam", {"rho": 0.05}, params).direction
        want = -0.5 * d * min(1.0, 0.1 / np.linalg.norm(d))
        assert np.linalg.norm(d) > 0.1
        np.testing.assert_allclose(flat(updates), want, rtol=1e-12)


@pytest.mark.parametrize("multi_steps", ["optax", "gradnorm"])
def test_inside_multisteps_the_accumulated_gradient_is_perturbed(multi_steps):
    """MultiSteps(k=2): the first call emits zeros; the second runs the rule on the mean of the
    two micro-batch gradients, with the extra gradient from the loss_fn of that (last) call. The
    same in optax.MultiSteps (which warns: it pays the rule's extra pass at every micro-step) and
    in gradnorm.jax.MultiSteps (which pays it on the emitting micro-step only)."""
    wrapper = optax.MultiSteps if multi_steps == "optax" else gj.MultiSteps
    expect = pytest.warns(gj.ChainOrderWarning, match="MultiSteps") if multi_steps == "optax" else contextlib.nullcontext()
    with x64(), expect:
        data = PROBLEMS["mlp"].data
        halves = [{k: v[:16] for k, v in data.items()}, {k: v[16:] for k, v in data.items()}]
        losses = [mlp(data=h)[0] for h in halves]
        _, params = mlp()
        rho, lr = 0.1, 0.5
        tx = wrapper(gj.transform(optax.sgd(lr), rule="sam", rho=rho), every_k_schedule=2,
                              accumulator_dtype=jnp.float64)  # (MultiSteps accumulates in float32 by default)

        @jax.jit
        def two_calls(p, state):
            out = []
            for loss_fn in losses:
                value, grads = jax.value_and_grad(loss_fn)(p)
                updates, state = tx.update(grads, state, p, value=value, loss_fn=loss_fn)
                out.append(updates)
            return out, state

        (first, second), state = two_calls(params, tx.init(params))
        assert np.abs(flat(first)).max() == 0.0
        problems = [FlatProblem(dataclasses.replace(PROBLEMS["mlp"], data=h)) for h in halves]
        g = (problems[0].grad(flat(params)) + problems[1].grad(flat(params))) / 2
        point = flat(params) + rho * g / (np.linalg.norm(g) + 1e-12)
        want = -lr * problems[1].grad(point)
        np.testing.assert_allclose(flat(second), want, rtol=1e-10, atol=1e-14)
        assert int(state.gradient_step) == 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_dtypes_are_preserved_in_updates_and_state(dtype):
    with x64():
        loss_fn, params = small(dtype)
        tx = gj.transform(optax.sgd(0.1, momentum=0.9), rule="gam")
        state0 = tx.init(params)
        step = train_step(tx, loss_fn)
        updates, state1 = step(params, state0)
        updates, state2 = step(optax.apply_updates(params, updates), state1)
        assert all(u.dtype == jnp.dtype(dtype) for u in jax.tree_util.tree_leaves(updates))
        dtypes = [[a.dtype for a in jax.tree_util.tree_leaves(s)] for s in (state0, state1, state2)]
        assert dtypes[0] == dtypes[1] == dtypes[2]
        assert state2.info["loss"].dtype == (jnp.float64 if dtype == "float64" else jnp.float32)
        assert bool(state2.info["finite"]) and step._cache_size() == 1


def test_unknown_extra_arguments_are_ignored_and_passed_to_the_base():
    seen = {}

    def recording_update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    base = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), recording_update)
    loss_fn, params = small()
    tx = gj.transform(base, rule="sam", rho=0.05)
    plain = gj.transform(optax.sgd(0.1), rule="sgd")  # a base without extra arguments

    @jax.jit
    def program(p):
        value, grads = jax.value_and_grad(loss_fn)(p)
        tx.update(grads, tx.init(p), p, value=value, loss_fn=loss_fn, step_count=3, grad_fn=None)
        return plain.update(grads, plain.init(p), p, value=value, anything="else")[0]

    program(params)
    assert set(seen) == {"value", "loss_fn", "step_count", "grad_fn"} and seen["step_count"] == 3


def test_apply_if_finite_around_the_base_skips_non_finite_directions():
    def loss_fn(p, scale):
        return jnp.sum(scale * p["w"] ** 2)

    params = {"w": jnp.asarray([1.0, 2.0])}
    tx = gj.transform(optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), max_consecutive_errors=3), rule="sam", rho=0.1)

    @jax.jit
    def step(p, state, scale):
        value, grads = jax.value_and_grad(loss_fn)(p, scale)
        return tx.update(grads, state, p, value=value, loss_fn=lambda q: loss_fn(q, scale))

    state = tx.init(params)
    updates, state = step(params, state, jnp.float32(np.inf))
    assert not bool(state.info["finite"])
    assert np.abs(flat(updates)).max() == 0.0 and int(state.base.total_notfinite) == 1
    updates, state = step(params, state, jnp.float32(1.0))
    assert bool(state.info["finite"]) and np.all(np.isfinite(flat(updates))) and np.abs(flat(updates)).max() > 0


def test_has_aux_loss_fn_drops_the_aux_of_the_extra_passes():
    loss_fn, params = mlp("float32")
    tx = gj.transform(optax.sgd(1.0), rule="sam", rho=0.05, has_aux=True)
    updates, state = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
                                                    loss_fn=lambda q: (loss_fn(q), {"state": q["out"]["b"]})))(
        params, tx.init(params))
    want = numpy_reference("sam", {"rho": 0.05}, params)
    np.testing.assert_allclose(-flat(updates), want.direction, rtol=0, atol=2e-6 * np.abs(want.direction).max())
    np.testing.assert_allclose(float(state.info["loss"]), want.info["loss"], rtol=1e-6)  # from loss_fn (no value=)


def test_local_and_global_policies_over_a_named_axis():
    with x64():
        _, params = mlp()
        X, Y = (jnp.asarray(PROBLEMS["mlp"].data[k]) for k in ("X", "Y"))
        shards = (X.reshape(2, 16, 4), Y.reshape(2, 16, 3))
        txs = [gj.transform(optax.sgd(1.0), rule="sam", rho=0.1, axis_name="d", perturbation=p) for p in ("local", "global")]

        def per_device(p, x, y):
            def shard_loss(q):
                return PROBLEMS["mlp"].loss(jnp, q, {"X": x, "Y": y})

            value, grads = jax.value_and_grad(shard_loss)(p)
            return [tx.update(grads, tx.init(p), p, value=value, loss_fn=shard_loss) for tx in txs]

        (local, _), (glob, gstate) = jax.jit(jax.vmap(per_device, in_axes=(None, 0, 0), axis_name="d"))(params, *shards)
        data = PROBLEMS["mlp"].data
        per_shard = [numpy_reference("sam", {"rho": 0.1}, params, {k: v[i * 16:(i + 1) * 16] for k, v in data.items()})
                     for i in range(2)]
        full = numpy_reference("sam", {"rho": 0.1}, params)
        for i in range(2):
            np.testing.assert_allclose(-flat(take(local, i)),
                                       (per_shard[0].direction + per_shard[1].direction) / 2, rtol=0, atol=1e-12)
            np.testing.assert_allclose(-flat(take(glob, i)), full.direction, rtol=0, atol=1e-12)
        np.testing.assert_allclose(gstate.info["loss"], full.info["loss"], rtol=1e-12)


# --------------------------------------------------------------------------------------------
# errors


def test_bad_input_raises_clear_errors():
    loss_fn, params = small()
    value, grads = jax.value_and_grad(loss_fn)(params)
    tx = gj.transform(optax.sgd(0.1), rule="sam", rho=0.05)
    state = tx.init(params)
    with pytest.raises(gradnorm.UnknownRuleError, match="Did you mean 'gam'"):
        gj.transform(optax.sgd(0.1), rule="gma")
    with pytest.raises(gradnorm.HyperparameterError, match="`rho` of rule 'sam'"):
        gj.transform(optax.sgd(0.1), rule="sam", rho=-1.0)
    with pytest.raises(TypeError, match="`base` of gradnorm.jax.transform must be an optax GradientTransformation"):
        gj.transform(optax.sgd, rule="sam", rho=0.05)
    with pytest.raises(ValueError, match="`perturbation`"):
        gj.transform(optax.sgd(0.1), rule="sam", rho=0.05, perturbation="all")
    with pytest.raises(TypeError, match="2 more point|1 more point.*pass `loss_fn="):
        tx.update(grads, state, params, value=value)
    with pytest.raises(TypeError, match="needs `params`"):
        tx.update(grads, state, loss_fn=loss_fn, value=value)
    with pytest.raises(TypeError, match="needs the loss at `params`: pass `value=loss`"):
        gj.transform(optax.sgd(0.1), rule="sgd").update(grads, state, params)
    with pytest.raises(TypeError, match="`loss_fn` must be a callable"):
        tx.update(grads, state, params, value=value, loss_fn=1.0)
    with pytest.raises(TypeError, match="`state` of gradnorm.jax.transform's update must be the TransformState"):
        tx.update(grads, optax.sgd(0.1).init(params), params, value=value, loss_fn=loss_fn)
    with pytest.raises(gradnorm.OracleOutputError, match="`updates` .* tree structure of `params`"):
        tx.update({"w": grads["w"]}, state, params, value=value, loss_fn=loss_fn)
    bf16 = jax.tree_util.tree_map(lambda g: g.astype(jnp.bfloat16), grads)
    with pytest.raises(gradnorm.OracleOutputError, match="dtype float32. Received: .*bfloat16"):
        tx.update(bf16, state, params, value=value, loss_fn=loss_fn)
    with pytest.raises(gradnorm.OracleOutputError, match="`value` .* scalar"):
        tx.update(grads, state, params, value=jnp.ones(3), loss_fn=loss_fn)
    with pytest.raises(gradnorm.OracleOutputError, match="pass `has_aux=True`"):
        jax.jit(lambda s: tx.update(grads, s, params, value=value, loss_fn=lambda p: (loss_fn(p), 0.0)))(state)
