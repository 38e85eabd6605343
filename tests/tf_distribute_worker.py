"""Worker of tests/test_tf_distribute.py: gradnorm under tf.distribute.MirroredStrategy over 2 logical
CPU devices (which must be configured before TensorFlow initialises its devices, hence a process of its
own). Runs every case of a JSON list and writes the final weights of every replica to an .npz file.

    PYTHONPATH=. python tests/tf_distribute_worker.py CASES_JSON OUT_NPZ

A case: {"api": "step" | "keras", "rule": ..., "hyper": {...}, "perturbation": "local" | "global",
"steps": n, "lr": ..., "momentum": ...}. The model is the conformance MLP (4-8-6-3, tanh, softmax
cross-entropy) in float64; replica r trains on the r-th half of the batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import gradnorm.tf as gt
from conformance.problems import PROBLEMS

MLP = PROBLEMS["mlp"]
LAYERS = ("hidden1", "hidden2", "out")


def make_model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,), dtype="float64"), keras.layers.Dense(8, activation="tanh", dtype="float64"),
                              keras.layers.Dense(6, activation="tanh", dtype="float64"),
                              keras.layers.Dense(3, dtype="float64")])
    p = MLP.params0()
    model.set_weights([p[name][k] for name in LAYERS for k in ("w", "b")])
    return model


def replica_weights(strategy: tf.distribute.Strategy, model: keras.Model) -> list[np.ndarray]:
    """Every replica's copy of every weight, stacked: shape (replicas, *weight shape)."""
    return [np.stack([t.numpy() for t in strategy.experimental_local_results(v.value)]) for v in model.trainable_variables]


def run_step_api(strategy: tf.distribute.Strategy, case: dict) -> list[np.ndarray]:
    x, y = MLP.data["X"], MLP.data["Y"]
    shards = [(x[:16], y[:16]), (x[16:], y[16:])]
    with strategy.scope():
        model = make_model()
        opt = keras.optimizers.SGD(case["lr"], momentum=case["momentum"])
        opt.build(model.trainable_variables)  # its variables, before the tf.function (as Keras's fit does)
    loss_obj = keras.losses.CategoricalCrossentropy(from_logits=True, dtype="float64")  # scales by 1/replicas in strategy.run

    def shard(i: int) -> tf.distribute.DistributedValues:
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(shards[ctx.replica_id_in_sync_group][i]))

    xs, ys = shard(0), shard(1)

    @tf.function
    def train_step(xb, yb):
        def replica_fn(xr, yr):
            res = gt.step(model.trainable_variables, lambda: loss_obj(yr, model(xr, training=True)),
                          rule=case["rule"], perturbation=case["perturbation"], **case["hyper"])
            opt.apply_gradients(zip(res.grad, model.trainable_variables))
            return res.loss

        return strategy.run(replica_fn, args=(xb, yb))

    for _ in range(case["steps"]):
        train_step(xs, ys)
    assert train_step.experimental_get_tracing_count() == 1
    return replica_weights(strategy, model)


def run_keras_api(strategy: tf.distribute.Strategy, case: dict) -> list[np.ndarray]:
    with strategy.scope():
        trainer = gt.keras.GradnormModel(make_model(), rule=case["rule"], perturbation=case["perturbation"], **case["hyper"])
        trainer.compile(optimizer=keras.optimizers.SGD(case["lr"], momentum=case["momentum"]),
                        loss=keras.losses.CategoricalCrossentropy(from_logits=True, dtype="float64"))
    # a dataset keeps float64 (Keras converts NumPy float arrays to its floatx, float32)
    data = tf.data.Dataset.from_tensor_slices((MLP.data["X"], MLP.data["Y"])).batch(32)
    trainer.fit(data, epochs=case["steps"], verbose=0)
    return replica_weights(strategy, trainer.model)


def main(cases_json: str, out: str) -> None:
    # two logical CPU devices: configured before TensorFlow initialises its devices (the first op)
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    results = {}
    for i, case in enumerate(json.loads(Path(cases_json).read_text())):
        weights = (run_step_api if case["api"] == "step" else run_keras_api)(strategy, case)
        for j, w in enumerate(weights):
            results[f"{i}/{j}"] = w
    np.savez(out, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
