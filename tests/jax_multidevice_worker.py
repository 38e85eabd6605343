"""Worker of tests/test_jax_multidevice.py: runs gradnorm.jax on 2 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``, set before jax starts) and writes what
it computed to an ``.npz`` file; the test compares it with the NumPy reference.

Usage: ``python jax_multidevice_worker.py OUT.npz FLOOD_LEVEL``

Written (float32, the conformance MLP with its 32 examples split 16 + 16 over the devices):

* ``{rule}-{policy}``: the flat parameters after each of 3 steps of
  ``data_parallel_step(..., perturbation=policy)`` + ``optax.sgd(0.3, momentum=0.9)``, for rules
  ``sam`` (rho 0.1), ``gr`` (gamma 0.1, an HVP) and ``flooding`` (``b`` = ``FLOOD_LEVEL``),
  all in one jitted program; ``{rule}-{policy}-devices``: how many devices hold the result;
  ``sam-local-explicit``: that run on a mesh of ``jax.make_mesh`` (explicit axes).
* ``jit-sharded``: one ``gradnorm.jax.step`` (sam) under plain ``jax.jit`` with the batch sharded
  over the devices (``NamedSharding``): the global policy by construction.
* ``aux-loss``, ``aux-mean``: ``data_parallel_step(..., has_aux=True)`` (local sam) with the
  per-shard mean of the inputs as aux: averaged over the devices.
* ``transform-{policy}``: the updates of ``gradnorm.jax.transform(optax.sgd(1.0), rule="sam",
  axis_name=..., perturbation=policy)`` inside ``jax.shard_map``, with each device's own
  gradient passed as ``updates``.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import gradnorm
import gradnorm.jax as gj
from conformance.problems import PROBLEMS

STEPS, LR, MOMENTUM = 3, 0.3, 0.9
STATEFUL = [("looksam", {"rho": 0.1, "every": 2}), ("coherent", {"lam": 0.05, "threshold": 0.0})]


def problem():
    mlp = PROBLEMS["mlp"]
    X, Y = (jnp.asarray(mlp.data[k], jnp.float32) for k in ("X", "Y"))

    def loss_fn(params, x, y):
        return mlp.loss(jnp, params, {"X": x, "Y": y})

    params = optree.tree_map(lambda a: jnp.asarray(a, jnp.float32), mlp.params0())
    return loss_fn, params, X, Y


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf, dtype=np.float64)) for leaf in jax.tree_util.tree_leaves(tree)])


def trajectories(mesh, settings):
    """The flat parameters after each step of every ``(rule, hyper, policy)`` in ``settings``,
    all in one jitted program (a ``lax.scan`` over the steps each), and the number of devices
    holding the results."""
    loss_fn, params, X, Y = problem()
    opt = optax.sgd(LR, momentum=MOMENTUM)

    def run(p0, x, y, rule, hyper, policy):
        def body(carry, _):
            p, opt_state = carry
            res = gj.data_parallel_step(p, loss_fn, x, y, mesh=mesh, rule=rule, perturbation=policy, **hyper)
            updates, opt_state = opt.update(res.grad, opt_state, p)
            p = optax.apply_updates(p, updates)
            return (p, opt_state), p

        return jax.lax.scan(body, (p0, opt.init(p0)), None, length=STEPS)[1]

    program = jax.jit(lambda p, x, y: [run(p, x, y, *setting) for setting in settings])
    results = program(params, X, Y)
    devices = len(jax.tree_util.tree_leaves(results[0])[0].sharding.device_set)
    stacked = [np.concatenate([np.asarray(leaf, np.float64).reshape(STEPS, -1) for leaf in jax.tree_util.tree_leaves(r)],
                              axis=1) for r in results]
    return stacked, devices


def main(path: str, flood_level: float) -> None:
    assert jax.device_count() == 2, jax.devices()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    explicit = jax.make_mesh((2,), ("batch",))
    out = {}
    settings = [(rule, hyper, policy) for rule, hyper in [("sam", {"rho": 0.1}), ("gr", {"gamma": 0.1}),
                                                          ("flooding", {"b": flood_level})]
                for policy in ("local", "global")]
    runs, devices = trajectories(mesh, settings)
    for (rule, _, policy), run in zip(settings, runs):
        out[f"{rule}-{policy}"], out[f"{rule}-{policy}-devices"] = run, devices
    out["sam-local-explicit"] = trajectories(explicit, [("sam", {"rho": 0.1}, "local")])[0][0]

    loss_fn, params, X, Y = problem()

    def with_aux(p, x, y):  # the aux: a per-shard statistic, as BatchNorm's batch mean
        return loss_fn(p, x, y), {"mean": jnp.mean(x, axis=0)}

    res = jax.jit(lambda p, x, y: gj.data_parallel_step(p, with_aux, x, y, mesh=mesh, rule="sam", rho=0.1,
                                                        has_aux=True))(params, X, Y)
    out["aux-loss"], out["aux-mean"] = np.asarray(res.loss[0]), np.asarray(res.loss[1]["mean"])

    sharded = NamedSharding(mesh, P("batch"))
    x, y = jax.device_put(X, sharded), jax.device_put(Y, sharded)
    res = jax.jit(lambda p, x, y: gj.step(p, loss_fn, x, y, rule="sam", rho=0.1))(params, x, y)
    out["jit-sharded"] = flat(res.grad)

    for policy in ("local", "global"):
        tx = gj.transform(optax.sgd(1.0), rule="sam", rho=0.1, axis_name="batch", perturbation=policy)

        def per_device(p, x, y, tx=tx):
            # this device's own gradient: differentiate at parameters typed as varying over the axis
            local = jax.lax.pcast(p, "batch", to="varying")
            value, grads = jax.value_and_grad(loss_fn)(local, x, y)
            updates, _ = tx.update(grads, tx.init(p), p, value=value, loss_fn=lambda q: loss_fn(q, x, y))
            return updates

        mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=P())
        out[f"transform-{policy}"] = flat(jax.jit(mapped)(params, X, Y))
    # stateful rules, their state made by `rule.init` outside jit and carried from step to step,
    # eagerly and jitted: a state committed to one device cannot meet the mesh (it used to be)
    for rule, hyper in STATEFUL:
        rule_obj = gradnorm.rules.get(rule, **hyper)
        for mode in ("eager", "jit"):
            def dp(p, s, x, y, rule_obj=rule_obj):
                return gj.data_parallel_step(p, loss_fn, x, y, mesh=mesh, rule=rule_obj, state=s, perturbation="global")

            def single(p, s, x, y, rule_obj=rule_obj):
                return gj.step(p, loss_fn, x, y, rule=rule_obj, state=s)

            for name, fn in (("dp", dp), ("single", single)):
                fn = jax.jit(fn) if mode == "jit" else fn
                p, s, directions = params, rule_obj.init(params), []
                for _ in range(STEPS):
                    res = fn(p, s, X, Y)
                    directions.append(flat(res.grad))
                    p, s = optree.tree_map(lambda a, d: a - LR * d, p, res.grad), res.state
                out[f"stateful-{rule}-{mode}-{name}"] = np.array(directions)
    np.savez(path, **out)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
