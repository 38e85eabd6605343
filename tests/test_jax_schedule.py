"""GR warm-up in JAX: `gradnorm.schedules` through ``optax.inject_hyperparams(gradnorm.jax.transform)`` and
through ``gradnorm.jax.step`` with a step counter, in one compiled step (no retracing). The strength at
every step is the hand-written float32 ramp, the trajectory a NumPy loop with the analytic gradient, and
the "zero" strategy evaluates the loss once per step at run time while it is off (counted by a host
callback, which the branch not taken by ``lax.cond`` never calls)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import gradnorm.jax as gj  # noqa: E402
from gradnorm.schedules import gnp_warmup  # noqa: E402
from tests._jax import full_float32_matmuls, x64  # noqa: E402, F401  (the fixture is autouse)
from tests._warmup import ALPHA, LR, STEPS, W0, WARM, XS, YS, R, expected_values, numpy_trajectory  # noqa: E402


def counted_loss(box):
    x, y = jnp.asarray(XS), jnp.asarray(YS)

    def loss(w):
        jax.debug.callback(lambda: box.append(1))  # runs when this evaluation runs, not when it is traced
        return 0.5 * jnp.mean((x @ w - y) ** 2)

    return loss


@pytest.mark.parametrize("strategy", ["r", "lambda", "zero"])
def test_inject_hyperparams_warmup(strategy):
    with x64():
        calls, traces = [], []
        loss = counted_loss(calls)
        tx = optax.inject_hyperparams(gj.transform)(
            optax.sgd(LR), rule="gnp", mix_unit_gradient=True, norm_eps=0.0,
            **gnp_warmup(strategy, r=R, alpha=ALPHA, warmup_steps=WARM),
        )

        @jax.jit
        def train_step(w, state):
            traces.append(1)
            value, grads = jax.value_and_grad(loss)(w)
            updates, state = tx.update(grads, state, w, value=value, loss_fn=loss)
            return optax.apply_updates(w, updates), state

        w, state = jnp.asarray(W0), tx.init(jnp.asarray(W0))
        seen_r, seen_a, evals, reported, traj = [], [], [], [], []
        for _ in range(STEPS):
            calls.clear()
            w, state = train_step(w, state)
            jax.effects_barrier()
            evals.append(len(calls))
            seen_r.append(float(state.hyperparams["r"]))  # the value this update used
            seen_a.append(float(state.hyperparams["alpha"]))
            reported.append(int(state.inner_state.info["grad_evals"]))
            traj.append(np.asarray(w))
        assert len(traces) == 1  # one trace for the whole warm-up: the strengths are arrays of the state
        rs, alphas = expected_values(strategy)
        assert seen_r == rs and seen_a == alphas
        want_evals = [1 if (r == 0 or a == 0) else 2 for r, a in zip(rs, alphas)]
        assert evals == reported == want_evals
        if strategy == "zero":
            assert evals == [1] * WARM + [2] * (STEPS - WARM)
        assert state.hyperparams["alpha"].dtype == (np.float32 if strategy == "lambda" else np.float64)
        want = numpy_trajectory(rs, alphas, alpha_float32=strategy == "lambda")
        np.testing.assert_allclose(np.array(traj), want, rtol=1e-12, atol=0)


def test_step_with_a_counter_warmup():
    """gradnorm.jax.step with the schedules evaluated on a step counter inside the jitted step."""
    with x64():
        calls, traces = [], []
        loss = counted_loss(calls)
        schedules = gnp_warmup("zero", r=R, alpha=ALPHA, warmup_steps=WARM)

        @jax.jit
        def train_step(w, count):
            traces.append(1)
            res = gj.step(w, loss, rule="gnp", mix_unit_gradient=True, norm_eps=0.0,
                          **{k: s(count) for k, s in schedules.items()})
            return w - LR * res.grad, count + 1, res.info["grad_evals"]

        w, count = jnp.asarray(W0), jnp.asarray(0, jnp.int32)
        evals, reported, traj = [], [], []
        for _ in range(STEPS):
            calls.clear()
            w, count, spent = train_step(w, count)
            jax.effects_barrier()
            evals.append(len(calls))
            reported.append(int(spent))
            traj.append(np.asarray(w))
        assert len(traces) == 1
        rs, alphas = expected_values("zero")
        assert evals == reported == [1] * WARM + [2] * (STEPS - WARM)
        np.testing.assert_allclose(np.array(traj), numpy_trajectory(rs, alphas), rtol=1e-12, atol=0)
