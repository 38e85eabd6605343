"""gradnorm.jax.transform with optax's combinators: the order of a clip in optax.chain (the
ChainOrderWarning, and the orders that clip the rule's direction), and gradient accumulation
(gradnorm.jax.MultiSteps runs the rule on the emitting micro-step only: counted evaluations, the
same results as optax.MultiSteps, the closed form of SAM on the accumulated gradient)."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import optree

import gradnorm.jax as gj
from conformance.problems import PROBLEMS
from conformance.reference import FlatProblem, reference
from tests._jax import full_float32_matmuls, x64  # noqa: F401  (the fixture is autouse)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf, dtype=np.float64)) for leaf in jax.tree_util.tree_leaves(tree)])


def mlp(data=None):
    """The conformance MLP in float64 (call inside x64()): loss_fn(params) on `data`, params."""
    problem = PROBLEMS["mlp"]
    data = {k: jnp.asarray(v) for k, v in (problem.data if data is None else data).items()}
    params = optree.tree_map(jnp.asarray, problem.params0())
    return (lambda p: problem.loss(jnp, p, data)), params


def numpy_problem(data=None):
    problem = PROBLEMS["mlp"] if data is None else dataclasses.replace(PROBLEMS["mlp"], data=data)
    return FlatProblem(problem)


def one_update(tx, loss_fn, params):
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, _ = jax.jit(lambda p, s: tx.update(grads, s, p, value=value, loss_fn=loss_fn))(params, tx.init(params))
    return flat(updates)


def trace_update(tx, loss_fn, params):
    """Trace one update without compiling it (the warning is given at trace time)."""
    def update(p, s):
        value, grads = jax.value_and_grad(loss_fn)(p)
        return tx.update(grads, s, p, value=value, loss_fn=loss_fn)

    jax.eval_shape(update, params, tx.init(params))


@contextlib.contextmanager
def no_chain_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", gj.ChainOrderWarning)
        yield


# --------------------------------------------------------------------------------------------
# a clip in front of the rule


def test_a_clip_in_front_of_sam_has_no_effect_and_warns():
    """optax.chain(clip_by_global_norm(c), transform(sgd, sam)): the clip scales the gradient SAM
    normalizes away, and the perturbed gradient never passes through it: the update is the
    unclipped SAM step (the NumPy reference). The transform says so, naming the clip."""
    c = 0.1
    with x64():
        loss_fn, params = mlp()
        want = numpy_reference_direction("sam", {"rho": 0.05}, params)
        assert np.linalg.norm(want) > 5 * c
        tx = optax.chain(optax.clip_by_global_norm(c), gj.transform(optax.sgd(1.0), rule="sam", rho=0.05))
        with pytest.warns(gj.ChainOrderWarning, match=r"changed by clip_by_global_norm.*no effect at all"):
            got = one_update(tx, loss_fn, params)
        np.testing.assert_allclose(-got, want, rtol=0, atol=1e-12)


def numpy_reference_direction(rule, hyper, params, data=None):
    return reference(rule, numpy_problem(data), flat(params), **hyper).direction


@pytest.mark.parametrize("order", ["clip in base", "clip after the rule"])
def test_the_orders_that_clip_the_rule_direction(order):
    """transform(chain(clip, sgd)) and chain(transform(identity), clip, sgd) clip the rule's
    direction (closed form: d min(1, c/|d|)) and do not warn."""
    c, lr = 0.1, 0.5
    with x64():
        loss_fn, params = mlp()
        rule = ("gnp", {"r": 0.05, "alpha": 0.8})
        if order == "clip in base":
            tx = gj.transform(optax.chain(optax.clip_by_global_norm(c), optax.sgd(lr)), rule=rule[0], **rule[1])
        else:
            tx = optax.chain(gj.transform(optax.identity(), rule=rule[0], **rule[1]), optax.clip_by_global_norm(c),
                             optax.sgd(lr))
        with no_chain_warning():
            got = one_update(tx, loss_fn, params)
        d = numpy_reference_direction(*rule, params)
        assert np.linalg.norm(d) > c
        want = -lr * d * min(1.0, c / np.linalg.norm(d))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


def test_the_warning_finds_the_transform_in_nested_named_and_injected_chains():
    loss_fn, params = mlp()
    clip = optax.clip_by_global_norm(1.0)
    cases = {
        "named_chain": (optax.named_chain(("clip", clip), ("sam", gj.transform(optax.sgd(0.1), rule="sam", rho=0.05))),
                        r"'clip' \(clip_by_global_norm\)"),
        "nested": (optax.chain(optax.add_decayed_weights(1e-4),
                               optax.chain(gj.transform(optax.sgd(0.1), rule="fd_gr", gamma=0.1, eps=0.01),
                                           optax.identity())),
                   "add_decayed_weights"),
        "inject_hyperparams": (optax.chain(clip, optax.inject_hyperparams(gj.transform)(optax.sgd(0.1), rule="sam",
                                                                                         rho=0.05)),
                               "clip_by_global_norm"),
    }
    for tx, match in cases.values():
        with pytest.warns(gj.ChainOrderWarning, match=match):
            trace_update(tx, loss_fn, params)
    # no warning: harmless transformations in front, a rule with no extra gradient, the transform first
    quiet = [optax.chain(optax.identity(), gj.transform(optax.sgd(0.1), rule="sam", rho=0.05)),
             optax.chain(clip, gj.transform(optax.sgd(0.1), rule="flooding", b=0.1)),
             optax.chain(gj.transform(optax.sgd(0.1), rule="sam", rho=0.05), clip)]
    with no_chain_warning():
        for tx in quiet:
            trace_update(tx, loss_fn, params)


# --------------------------------------------------------------------------------------------
# gradient accumulation


def counted_micro_steps(tx, k, cycles):
    """`cycles` accumulation cycles of `k` jitted micro-steps; the extra loss evaluations are
    counted by a host callback inside `loss_fn` (it runs only where the program evaluates it)."""
    calls = [0]
    X = jnp.asarray(np.random.default_rng(0).normal(size=(k, 8, 3)), jnp.float32)

    def loss(p, x, counted):
        if counted:
            jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1))
        return jnp.mean((jnp.tanh(x @ p["w"]) - 0.5) ** 2)

    @jax.jit
    def micro(p, s, x):
        value, grads = jax.value_and_grad(loss)(p, x, False)
        updates, s = tx.update(grads, s, p, value=value, loss_fn=lambda q: loss(q, x, True))
        return optax.apply_updates(p, updates), s

    params = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)), jnp.float32)}
    state = tx.init(params)
    for _ in range(cycles):
        for i in range(k):
            params, state = micro(params, state, X[i])
    jax.block_until_ready(params)
    return calls[0], params, state, micro


def test_multisteps_pays_the_extra_pass_on_emitting_steps_only():
    """k=3, two cycles: optax.MultiSteps evaluates SAM's perturbed gradient at all 6 micro-steps
    (and warns); gradnorm.jax.MultiSteps at the 2 emitting ones, with the same parameters and
    state, and one compilation."""
    k, cycles = 3, 2
    with pytest.warns(gj.ChainOrderWarning, match="gradnorm.jax.MultiSteps"):
        theirs = counted_micro_steps(optax.MultiSteps(gj.transform(optax.sgd(0.5), rule="sam", rho=0.1), k), k, cycles)
    with no_chain_warning():
        ours = counted_micro_steps(gj.MultiSteps(gj.transform(optax.sgd(0.5), rule="sam", rho=0.1), k), k, cycles)
    assert theirs[0] == k * cycles and ours[0] == cycles
    np.testing.assert_allclose(flat(ours[1]), flat(theirs[1]), rtol=1e-6, atol=1e-7)
    assert np.abs(flat(ours[1]) - flat(counted_micro_steps(optax.sgd(0.0), k, 1)[1])).max() > 1e-3  # it moved
    assert jax.tree_util.tree_structure(ours[2]) == jax.tree_util.tree_structure(theirs[2])
    assert isinstance(ours[2], optax.MultiStepsState) and int(ours[2].gradient_step) == cycles
    assert ours[3]._cache_size() == 1


def test_multisteps_sam_on_the_accumulated_gradient_closed_form():
    """k=2 over two halves of the batch (float64): the rule runs once, on the mean gradient; its
    perturbed gradient comes from the loss_fn given with the emitting micro-step: the last half
    (SAM's perturbation from the full batch, its gradient on the last half), or the loss of the
    whole batch (exactly SAM on the full batch)."""
    rho, lr = 0.1, 0.5
    data = PROBLEMS["mlp"].data
    halves = [{k: v[:16] for k, v in data.items()}, {k: v[16:] for k, v in data.items()}]
    with x64():
        losses = [mlp(h)[0] for h in halves]
        full_loss, params = mlp()
        tx = gj.MultiSteps(gj.transform(optax.sgd(lr), rule="sam", rho=rho), every_k_schedule=2,
                           accumulator_dtype=jnp.float64)

        @jax.jit
        def two_micro_steps(p):
            out, states = [], [tx.init(p), tx.init(p)]
            for i, loss_fn in enumerate(losses):
                value, grads = jax.value_and_grad(loss_fn)(p)
                # at the emitting step: the loss of the whole batch, or of the last half
                for j, emitting_loss in enumerate([full_loss, loss_fn]):
                    updates, states[j] = tx.update(grads, states[j], p, value=value,
                                                   loss_fn=emitting_loss if i == 1 else loss_fn)
                    out.append(updates)
            return out, states[0]

        (first, _, second, last_half), state = two_micro_steps(params)

    assert np.abs(flat(first)).max() == 0.0 and bool(tx.has_updated(state))
    np.testing.assert_allclose(-flat(second) / lr, numpy_reference_direction("sam", {"rho": rho}, params),
                               rtol=1e-10, atol=1e-14)
    problems = [numpy_problem(h) for h in halves]
    g = (problems[0].grad(flat(params)) + problems[1].grad(flat(params))) / 2
    want = -lr * problems[1].grad(flat(params) + rho * g / (np.linalg.norm(g) + 1e-12))
    np.testing.assert_allclose(flat(last_half), want, rtol=1e-10, atol=1e-14)


def test_multisteps_is_a_drop_in_for_optax_multisteps():
    """A plain optimizer (adam), a schedule of k and a skipped non-finite micro-step: the same
    updates and states as optax.MultiSteps, micro-step by micro-step."""
    rng = np.random.default_rng(2)
    grads = [{"w": jnp.asarray(rng.normal(size=4), jnp.float32)} for _ in range(7)]
    grads[3] = {"w": grads[3]["w"].at[0].set(jnp.inf)}
    params = {"w": jnp.zeros(4, jnp.float32)}
    options = {"every_k_schedule": lambda step: jnp.where(step < 1, 2, 3),
               "should_skip_update_fn": optax.skip_not_finite}
    txs = [optax.MultiSteps(optax.adam(0.1), **options), gj.MultiSteps(optax.adam(0.1), **options)]
    states = [tx.init(params) for tx in txs]
    steps = [jax.jit(tx.update) for tx in txs]
    emitted, skipped = 0, []
    for g in grads:
        out = [step(g, s, params) for step, s in zip(steps, states)]
        states = [s for _, s in out]
        np.testing.assert_allclose(flat(out[1][0]), flat(out[0][0]), rtol=1e-6, atol=1e-9)  # (XLA fuses the
        for a, b in zip(jax.tree_util.tree_leaves(states[1]), jax.tree_util.tree_leaves(states[0])):  # cond apart)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9)
        emitted += int(np.abs(flat(out[1][0])).max() > 0)
        skipped.append(bool(states[1].skip_state["should_skip"]))
    assert emitted == 2 and int(states[1].gradient_step) == 2 and skipped == [False] * 3 + [True] + [False] * 3


def test_multisteps_rejects_a_non_boolean_skip_function():
    tx = gj.MultiSteps(optax.sgd(0.1), 2, should_skip_update_fn=lambda *a: (jnp.asarray(1.0), ()))
    params = {"w": jnp.zeros(2)}
    with pytest.raises(ValueError, match="`should_skip_update_fn` of gradnorm.jax.MultiSteps must return a boolean"):
        tx.update(params, tx.init(params), params)
