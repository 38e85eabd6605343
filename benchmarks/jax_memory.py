"""Benchmark: extra memory of one jitted gradnorm.jax step over plain SGD-momentum, in units of P (the
parameters' bytes), from XLA's compiled memory analysis, on a wide MLP (default 8 layers of
1024 x 1024 float32, batch 4).

Each program is one whole training step (the rule, ``optax.sgd(lr, momentum=0.9)``,
``optax.apply_updates``), jitted with the parameters and optimizer state donated, lowered and
compiled for the CPU; ``compiled.memory_analysis()`` reports the temporary buffers XLA allocates
besides the arguments and outputs. The extra of a rule is its temporaries minus plain SGD's, over P
(the rule's own state, e.g. GAM has none between steps, is an argument and not counted). The
minimum is what the math needs (ALGORITHMS.md §0): SAM 1, GNP 2, F-GR 2, GAM 4 (a gradient the
rule holds while it computes another; XLA may fuse some away). The peer is a hand-written jitted SAM
(the perturbed point formed from the first gradient). Prints a table; no assertion.

    python benchmarks/jax_memory.py [--width 1024] [--depth 8]
"""

from __future__ import annotations

import argparse

MINIMUM = {"sgd": 0, "sam": 1, "gnp": 2, "fd_gr": 2, "gam": 4, "gr": 2, "flooding": 0, "coherent": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="sam,gnp,fd_gr,gam,gr")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import optax
    from _rules import RULES

    import gradnorm.jax as gj

    keys = iter(jax.random.split(jax.random.key(0), args.depth + 2))
    params = [{"w": jax.random.normal(next(keys), (args.width, args.width)) / args.width**0.5,
               "b": jnp.zeros(args.width)} for _ in range(args.depth)]
    x = jax.random.normal(next(keys), (args.batch, args.width))
    y = jax.random.normal(next(keys), (args.batch, args.width))
    nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(params))

    def loss_fn(p, x, y):
        h = x
        for layer in p:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return jnp.mean((h - y) ** 2)

    opt = optax.sgd(1e-4, momentum=0.9)
    opt_state = opt.init(params)
    hyper = dict(RULES)

    def temporaries(rule: str) -> float:
        if rule == "sgd":
            def train_step(p, s, state):
                g = jax.grad(loss_fn)(p, x, y)
                updates, s = opt.update(g, s, p)
                return optax.apply_updates(p, updates), s, state

            state = None
        else:
            def train_step(p, s, state):
                res = gj.step(p, loss_fn, x, y, rule=rule, state=state, **hyper.get(rule, {}))
                updates, s = opt.update(res.grad, s, p)
                return optax.apply_updates(p, updates), s, res.state

            state = gj.step(params, loss_fn, x, y, rule=rule, **hyper.get(rule, {})).state
        compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, state).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def handwritten_sam(p, s, state):
        g = jax.grad(loss_fn)(p, x, y)
        scale = 0.05 / (optax.global_norm(g) + 1e-12)
        g_s = jax.grad(loss_fn)(jax.tree.map(lambda w, d: w + scale * d, p, g), x, y)
        updates, s = opt.update(g_s, s, p)
        return optax.apply_updates(p, updates), s, state

    def peer_temporaries() -> int:
        compiled = jax.jit(handwritten_sam, donate_argnums=(0, 1)).lower(params, opt_state, None).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    base = temporaries("sgd")
    print(f"extra temporaries of the jitted step over SGD-momentum, units of P "
          f"({args.depth} x {args.width}^2 float32, batch {args.batch}; XLA memory analysis, CPU, jax {jax.__version__})")
    print(f"| {'step':<20} | {'extra':>6} | {'minimum':>7} |")
    print(f"|{'-' * 22}|{'-' * 8}|{'-' * 9}|")
    for rule in args.rules.split(","):
        extra = (temporaries(rule) - base) / nbytes
        print(f"| {'gradnorm ' + rule:<20} | {extra:>6.2f} | {MINIMUM.get(rule, ''):>7} |")
    print(f"| {'hand-written SAM':<20} | {(peer_temporaries() - base) / nbytes:>6.2f} | {MINIMUM['sam']:>7} |")

if __name__ == "__main__":
    main()
