"""Benchmark: the jitted gradnorm.jax step per rule against its floor, and SAM through
gradnorm.jax.transform against optax.contrib.sam (opaque mode), on a deep narrow MLP (40 layers
of width 64, tanh, batch 128, softmax cross-entropy; 82 parameter leaves).

Every timed function is one ``jax.jit`` program that does a whole training step (the rule, the
base update ``optax.sgd(lr, momentum=0.9)``, ``optax.apply_updates``) and feeds its outputs back
as the next inputs. The floor of a rule is (gradient evaluations) x (one jitted
``jax.value_and_grad``) + (HVPs) x (one jitted forward-over-reverse HVP) + (one jitted base
update), all measured in this process. Functions are timed interleaved (round-robin over
``--repeats`` rounds of ``--steps`` calls, ``block_until_ready`` at the end of each round) and the
median round is reported, so drift of the machine affects all alike. Prints a table; no assertion.

    python benchmarks/jax_step.py [--steps 50] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import os

from _rules import RULES
from _timing import carried, timed_interleaved

LR, MOMENTUM = 1e-4, 0.9


def make(depth: int = 40, width: int = 64, batch: int = 128, classes: int = 10):
    import jax
    import jax.numpy as jnp

    keys = iter(jax.random.split(jax.random.key(0), 2 * depth + 4))
    params = [{"w": jax.random.normal(next(keys), (width, width)) / jnp.sqrt(width), "b": jnp.zeros(width)}
              for _ in range(depth)]
    params.append({"w": jax.random.normal(next(keys), (width, classes)) / jnp.sqrt(width), "b": jnp.zeros(classes)})
    x = jax.random.normal(next(keys), (batch, width))
    y = jax.random.randint(next(keys), (batch,), 0, classes)

    def loss_fn(p, x, y):
        h = x
        for layer in p[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        logits = h @ p[-1]["w"] + p[-1]["b"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    return params, x, y, loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="1: single-threaded XLA CPU (0: XLA's default)")
    parser.add_argument("--rules", nargs="*", default=[r for r, _ in RULES], help="which rules to time")
    args = parser.parse_args()
    if args.threads == 1:  # must be set before jax starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

    import jax
    import optax

    import gradnorm
    import gradnorm.jax as gj

    params, x, y, loss_fn = make()
    opt = optax.sgd(LR, momentum=MOMENTUM)
    value_and_grad = jax.value_and_grad(loss_fn)

    def floor_program(grads: int, hvps: int):
        """The floor as one jitted program: ``grads`` chained gradient evaluations (each at the
        previous point plus a runtime multiple of the previous gradient, so that XLA can neither
        merge nor hoist them), ``hvps`` forward-over-reverse HVPs along the last gradient, the base
        update with the last result and ``optax.apply_updates``: the work of a rule step without
        the rule's own arithmetic."""

        def program(p, opt_state, scale):
            point, g = p, None
            for _ in range(grads):
                if g is not None:
                    point = jax.tree_util.tree_map(lambda a, b: a + scale * b, point, g)
                g = value_and_grad(point, x, y)[1]
            for _ in range(hvps):
                g = jax.jvp(lambda q: jax.grad(loss_fn)(q, x, y), (p,), (g,))[1]
            updates, opt_state = opt.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, scale

        return jax.jit(program)

    fns = {}
    scale = jax.numpy.asarray(1e-3)
    for rule, hyper in RULES:
        obj = gradnorm.rules.get(rule, **hyper)
        keys = [(obj.grad_evals, obj.hvp_evals)]
        if obj.mean_grad_evals != obj.grad_evals:  # varying cost: its floor lies between these two
            keys.append((1, 0))
        for key in keys:
            if rule in args.rules and f"floor {key}" not in fns:
                fns[f"floor {key}"] = (floor_program(*key), (params, opt.init(params), scale))
    if "sam" in args.rules:
        fns["floor (2, 0)"] = (floor_program(2, 0), (params, opt.init(params), scale))

    rules = {}
    for rule, hyper in RULES:
        if rule not in args.rules:
            continue
        rules[rule] = gradnorm.rules.get(rule, **hyper)

        def train_step(p, opt_state, state, rule_obj=rules[rule]):
            res = gj.step(p, loss_fn, x, y, rule=rule_obj, state=state)
            updates, opt_state = opt.update(res.grad, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, res.state

        fns[rule] = (jax.jit(train_step), (params, opt.init(params), rules[rule].init(params)))

    if "sam" in args.rules:
        tx = gj.transform(opt, rule="sam", rho=0.05)

        @jax.jit
        def transform_step(p, state):
            loss, g = value_and_grad(p, x, y)
            updates, state = tx.update(g, state, p, value=loss, loss_fn=lambda q: loss_fn(q, x, y))
            return optax.apply_updates(p, updates), state

        fns["transform sam"] = (transform_step, (params, tx.init(params)))
        peer = optax.contrib.sam(opt, optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
                                 sync_period=2, opaque_mode=True)

        @jax.jit
        def optax_step(p, state):
            _, g = value_and_grad(p, x, y)
            updates, state = peer.update(g, state, p, grad_fn=lambda q, i: jax.grad(loss_fn)(q, x, y))
            return optax.apply_updates(p, updates), state

        fns["optax sam"] = (optax_step, (params, peer.init(params)))

    t = timed_interleaved({name: carried(call, carry) for name, (call, carry) in fns.items()}, args.steps,
                          args.repeats, warmup=3, finish=jax.block_until_ready)
    rows = []
    for rule, rule_obj in rules.items():
        evals, hvps, mean = rule_obj.grad_evals, rule_obj.hvp_evals, rule_obj.mean_grad_evals
        cost = f"{evals} grad{'s' if evals > 1 else ''}" + (f" + {hvps} HVP" if hvps else "")
        floor = t[f"floor {(evals, hvps)}"]
        if mean != evals:  # varying cost (a full step every k): the floors of its steps, averaged over a period
            cost = f"{mean:.3g} grads avg"
            weight = (mean - 1) / (evals - 1)  # 1/k: the share of full steps
            floor = weight * floor + (1 - weight) * t["floor (1, 0)"]
        rows.append((f"gradnorm.jax.step {rule}", cost, t[rule], floor))
    if "sam" in rules:
        rows.append(("gradnorm.jax.transform sam", "2 grads", t["transform sam"], t["floor (2, 0)"]))
        rows.append(("optax.contrib.sam (opaque mode)", "2 grads", t["optax sam"], t["floor (2, 0)"]))

    print(f"deep narrow MLP 40 x 64, batch 128, jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"XLA threads: {'1' if args.threads == 1 else 'default'}; floor of one gradient + update "
          f"{t['floor (1, 0)'] if 'floor (1, 0)' in t else float('nan'):.3f} ms; median of {args.repeats} rounds "
          f"of {args.steps} steps")
    print(f"| {'step':34s} | {'cost':14s} | {'ms/step':>8s} | {'floor ms':>8s} | {'x floor':>7s} |")
    print(f"|{'-' * 36}|{'-' * 16}|{'-' * 10}|{'-' * 10}|{'-' * 9}|")
    for name, cost, ms, floor in rows:
        print(f"| {name:34s} | {cost:14s} | {ms:8.3f} | {floor:8.3f} | {ms / floor:7.3f} |")
    if "sam" in rules:
        print(f"gradnorm sam (step) / optax.contrib.sam: {t['sam'] / t['optax sam']:.3f}; "
              f"gradnorm sam (transform) / optax.contrib.sam: {t['transform sam'] / t['optax sam']:.3f}")


if __name__ == "__main__":
    main()
