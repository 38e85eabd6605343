"""Benchmark: extra peak memory of a gradnorm.tf.step training step over plain SGD-momentum, in units
of P (the parameters' bytes), from TensorFlow's allocator statistics, on a wide MLP (default 8 layers
of 1024 x 1024 float32, batch 4).

Every training step is one tf.function: the rule's direction (``gradnorm.tf.step``) applied by a Keras
SGD optimizer with momentum; the baseline is the same tf.function with one ``GradientTape`` gradient;
the peer is the usual hand-written TensorFlow SAM (``assign_add`` of the perturbation, second
gradient, ``assign_sub``). Each is traced and run once (the optimizer's slots exist then), the
allocator's peak is reset (``tf.config.experimental.reset_memory_stats``), three steps run, and the
peak above the memory in use before them is read (``get_memory_info``). The extra of a step is
that peak minus the baseline's, over P. The minimum is what the math needs (ALGORITHMS.md §0):
SAM 1 (the perturbation, or the saved weights), GNP 2, F-GR 2, GAM 4. Prints a table; no assertion.

    python benchmarks/tf_memory.py [--rules sam,gnp,fd_gr,gam,gr] [--width 1024] [--depth 8]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MINIMUM = {"sgd": 0, "sam": 1, "gnp": 2, "fd_gr": 2, "gam": 4, "gr": 2, "flooding": 0, "coherent": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="sam,gnp,fd_gr,gam,gr")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    import keras
    import tensorflow as tf
    from _rules import RULES

    import gradnorm.tf as gt

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((args.width,))]
                             + [keras.layers.Dense(args.width, activation="tanh") for _ in range(args.depth)])
    x = tf.random.normal((args.batch, args.width))
    y = tf.random.normal((args.batch, args.width))
    variables = model.trainable_variables
    nbytes = sum(v.numpy().nbytes for v in variables)
    hyper = dict(RULES)

    def loss_fn():
        return tf.reduce_mean((model(x, training=True) - y) ** 2)

    def make(rule: str):
        opt = keras.optimizers.SGD(1e-4, momentum=0.9)
        opt.build(variables)
        if rule == "sgd":
            @tf.function
            def train_step():
                with tf.GradientTape() as tape:
                    loss = loss_fn()
                opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
                return loss
        elif rule == "hand-written SAM":
            @tf.function
            def train_step():
                with tf.GradientTape() as tape:
                    loss = loss_fn()
                grads = tape.gradient(loss, variables)
                scale = 0.05 / (tf.linalg.global_norm(grads) + 1e-12)
                eps = [g * scale for g in grads]
                del grads
                for v, e in zip(variables, eps):
                    v.assign_add(e)
                with tf.GradientTape() as tape:
                    perturbed = loss_fn()
                grads = tape.gradient(perturbed, variables)
                for v, e in zip(variables, eps):
                    v.assign_sub(e)
                opt.apply_gradients(zip(grads, variables))
                return loss
        else:
            @tf.function
            def train_step():
                res = gt.step(variables, loss_fn, rule=rule, **hyper.get(rule, {}))
                opt.apply_gradients(zip(res.grad, variables))
                return res.loss
        return train_step

    def peak(rule: str) -> float:
        step = make(rule)
        step()  # traced; the optimizer's momentum exists from here on
        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        for _ in range(3):
            step()
        return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before

    base = peak("sgd")
    print(f"extra peak memory of a tf.function step over SGD-momentum, units of P ({args.depth} x {args.width}^2 "
          f"float32, batch {args.batch}; TensorFlow allocator statistics, CPU, tensorflow {tf.__version__})")
    print(f"| {'step':<20} | {'extra':>6} | {'minimum':>7} |")
    print(f"|{'-' * 22}|{'-' * 8}|{'-' * 9}|")
    for rule in args.rules.split(",") + ["hand-written SAM"]:
        extra = (peak(rule) - base) / nbytes
        minimum = MINIMUM.get(rule, MINIMUM["sam"])
        name = rule if rule == "hand-written SAM" else f"gradnorm {rule}"
        print(f"| {name:<20} | {extra:>6.2f} | {minimum:>7} |")


if __name__ == "__main__":
    main()
