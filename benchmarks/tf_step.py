"""Benchmark: gradnorm.tf.step under tf.function, per rule, against its floor, and SAM against a
hand-written tf.function SAM step, on a deep narrow MLP (40 layers of width 64, batch 128).

Every training step is one tf.function: the rule's direction (``gradnorm.tf.step``) applied by a Keras
SGD optimizer with momentum. Two floors, both measured in this process, interleaved with the steps:

* floor (DESIGN.md's definition, as benchmarks/torch_step.py): k x (one forward-backward pass, a
  tf.function returning the gradients) + (one optimizer update, a tf.function applying fixed
  gradients), for a rule of k gradient evaluations. Each of those k + 1 calls pays the call overhead of
  a tf.function that captures 82 variables (a fraction of a millisecond), which a one-call step pays
  once, so a step can beat this floor.
* fused floor: one tf.function doing nothing but the k passes (each waiting for the previous one, on
  its own batch so that TensorFlow cannot merge them) and the update. No SAM that writes its
  perturbation into the variables reaches it: the perturbation, its removal and the norm are a few
  hundred small ops on 82 variables (the hand-written SAM pays them too). The hand-written SAM step
perturbs the variables in place (``assign_add``), takes the second gradient and subtracts the
perturbation again, the usual TensorFlow SAM. The floors of ``gr`` count one gradient and one
Hessian-vector product along it (an outer tape over the gradient's tape, ``tape.gradient(grads,
variables, output_gradients=grads)``) instead of one gradient: as a separate tf.function plus the
update call, and fused with the update. Prints a table; no assertion.

    python benchmarks/tf_step.py [--steps 100] [--repeats 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from _rules import RULES as _SHARED
from _timing import timed_interleaved

RULES = [*_SHARED, ("gr", {"gamma": 0.05, "hvp": "forward_over_reverse"})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="intra- and inter-op threads (0: TensorFlow's default)")
    args = parser.parse_args()

    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras
    import optree

    import gradnorm
    import gradnorm.tf as gt

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,))] + [keras.layers.Dense(64, activation="tanh") for _ in range(40)]
                             + [keras.layers.Dense(10)])
    x = tf.random.normal((128, 64))
    y = tf.random.uniform((128,), 0, 10, dtype=tf.int32)
    loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    opt = keras.optimizers.SGD(1e-4, momentum=0.9)
    opt.build(variables)

    def loss_fn():
        return loss_obj(y, model(x, training=True))

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        return tape.gradient(loss, variables)

    fixed = [tf.identity(g) for g in gradient()]

    def _gradient_and_hvp():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as tape:
                loss = loss_fn()
            grads = tape.gradient(loss, variables)
        return grads, outer.gradient(grads, variables, output_gradients=[tf.stop_gradient(g) for g in grads])

    @tf.function
    def gradient_and_hvp():
        return _gradient_and_hvp()[1][0]

    @tf.function
    def floor_hvp():  # gr's fused floor: the gradient, one HVP along it and the update in one tf.function
        grads, hv = _gradient_and_hvp()
        opt.apply_gradients(zip(hv, variables))
        return hv[0][0]

    @tf.function
    def update():
        opt.apply_gradients(zip(fixed, variables))
        return tf.constant(0.0)

    batches = [tf.random.normal((128, 64)) for _ in range(4)]

    def make_floor(k: int):
        """k forward-backward passes and one update in one tf.function, nothing in between: what a step
        costs at least. Each pass takes its own batch (identical passes could be merged by TensorFlow's
        graph optimizer) and waits for the previous one (independent passes would run in parallel,
        which a rule's passes cannot)."""

        @tf.function
        def floor():
            link = tf.constant(0.0)
            for xb in batches[:k]:
                with tf.GradientTape() as tape:
                    loss = loss_obj(y, model(xb + link, training=True))
                grads = tape.gradient(loss, variables)
                link = 0.0 * tf.reduce_sum(grads[0])  # the next pass waits for this one, as in a rule
            opt.apply_gradients(zip(grads, variables))
            return link

        return floor

    def make(rule: str, hyper: dict):
        # the rule state carried from step to step in variables (a periodic rule's counter and buffers)
        rule_obj = gradnorm.rules.get(rule, **{k: v for k, v in hyper.items() if k != "hvp"})
        init = rule_obj.init([tf.convert_to_tensor(v) for v in variables])
        leaves, treedef = optree.tree_flatten(init)
        state_vars = [tf.Variable(x, trainable=False) for x in leaves]

        @tf.function
        def train_step():
            state = optree.tree_unflatten(treedef, [v.read_value() for v in state_vars])
            res = gt.step(variables, loss_fn, rule=rule, state=state, **hyper)
            for v, x in zip(state_vars, optree.tree_leaves(res.state)):
                v.assign(x)
            opt.apply_gradients(zip(res.grad, variables))
            return res.loss

        return train_step

    @tf.function
    def handwritten_sam():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, variables)
        scale = 0.05 / (tf.linalg.global_norm(grads) + 1e-12)
        eps = [g * scale for g in grads]
        for v, e in zip(variables, eps):
            v.assign_add(e)
        with tf.GradientTape() as tape:
            perturbed = loss_fn()
        grads = tape.gradient(perturbed, variables)
        for v, e in zip(variables, eps):
            v.assign_sub(e)
        opt.apply_gradients(zip(grads, variables))
        return loss

    fns = {"gradient": lambda: gradient()[0], "gradient + HVP": gradient_and_hvp, "floor_hvp": floor_hvp,
           "update": update, **{f"floor{k}": make_floor(k) for k in (1, 2, 4)}}
    labels = {}
    for rule, hyper in RULES:
        label = rule + (f" ({hyper['hvp'].replace('_', '-')})" if "hvp" in hyper else "")
        labels[label] = gradnorm.rules.get(rule, **{k: v for k, v in hyper.items() if k != "hvp"})
        fns[label] = make(rule, hyper)
    fns["hand-written SAM"] = handwritten_sam
    # a call on the CPU returns when done; reading its output back is cheap
    t = timed_interleaved(fns, args.steps, args.repeats, finish=lambda out: out.numpy() if hasattr(out, "numpy") else out)
    t_grad, t_update = t["gradient"], t["update"]

    rows = []
    for label, rule in labels.items():
        evals, mean = rule.grad_evals, rule.mean_grad_evals
        cost = f"{evals} grad" + ("s" if evals > 1 else "") + (" + 1 HVP" if rule.needs_hvp else "")
        fused = t[f"floor{evals}"]
        if mean != evals:  # varying cost (a full step every k): the fused floors averaged over a period
            cost = f"{mean:.3g} grads avg"
            weight = (mean - 1) / (evals - 1)  # 1/k: the share of full steps
            fused = weight * fused + (1 - weight) * t["floor1"]
        floor = mean * t_grad + t_update
        if rule.needs_hvp and rule.hvp_evals:  # one gradient and one HVP
            floor, fused = t["gradient + HVP"] + t_update, t["floor_hvp"]
        rows.append((f"gradnorm {label}", cost, t[label], floor, fused))
    rows.append(("hand-written tf.function SAM", "2 grads", t["hand-written SAM"], 2 * t_grad + t_update, t["floor2"]))

    threads = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    print(f"deep narrow MLP 40 x 64, batch 128, CPU, tensorflow {tf.__version__}, keras {keras.__version__}, "
          f"{threads} intra-op threads; median of {args.repeats} interleaved rounds of {args.steps} steps; "
          f"one gradient {t_grad:.3f} ms, one SGD update {t_update:.3f} ms (separate tf.function calls)")
    print("floor: k gradients + 1 update as separate calls (DESIGN.md's definition); fused floor: the same in one "
          "tf.function with nothing in between")
    print(f"| {'step (tf.function)':34s} | {'cost':14s} | {'ms/step':>7s} | {'floor ms':>8s} | {'x floor':>7s} "
          f"| {'fused ms':>8s} | {'x fused':>7s} |")
    print(f"|{'-' * 36}|{'-' * 16}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 9}|")
    for name, cost, ms, floor, fused in rows:
        print(f"| {name:34s} | {cost:14s} | {ms:7.3f} | {floor:8.3f} | {ms / floor:7.3f} | {fused:8.3f} | {ms / fused:7.3f} |")
    print(f"gradnorm sam / hand-written SAM: {t['sam'] / t['hand-written SAM']:.3f}")


if __name__ == "__main__":
    main()
