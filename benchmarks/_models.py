"""The benchmark models, built alike in PyTorch, JAX and TensorFlow so that their tables compare.

* ``mlp``: the deep narrow MLP of ``torch_step.py``, ``jax_step.py`` and ``tf_step.py``: 40 tanh
  layers of width 64 and a linear layer to 10 classes (82 parameter tensors, 0.17 M parameters),
  batch 128 of 64 Gaussian features, softmax cross-entropy.
* ``cnn``: a small VGG-style CNN with BatchNorm: five 3x3 convolutions (no bias) 3-32-64-128-128-256,
  each followed by BatchNorm (batch statistics, training mode) and ReLU, 2x2 max pooling after the
  first, second and fourth, global average pooling and a linear layer to 10 classes (0.54 M
  parameters, 17 tensors), batch 32 of random 32x32x3 images, softmax cross-entropy.
* ``cnn_nobn``: the same CNN without BatchNorm (the convolutions get a bias instead): an ablation
  that shows what BatchNorm's second derivatives cost.

Every builder imports its framework lazily (a benchmark process imports one framework only).
"""

from __future__ import annotations

from typing import Any

MODELS = ("mlp", "cnn", "cnn_nobn")
#: the CNN's convolution widths and where a 2x2 max pooling follows (after convolution i)
CNN_CHANNELS = (3, 32, 64, 128, 128, 256)
CNN_POOL_AFTER = (0, 1, 3)
DESCRIPTION = {
    "mlp": "deep narrow MLP 40 x 64 (tanh), batch 128, 0.17 M parameters in 82 tensors",
    "cnn": "CNN 5 conv 3x3 (32-64-128-128-256) + BatchNorm + ReLU, batch 32 of 32x32x3, 0.54 M parameters",
    "cnn_nobn": "the CNN without BatchNorm (conv + bias + ReLU), batch 32 of 32x32x3, 0.54 M parameters",
}


# -- PyTorch -----------------------------------------------------------------------------------
def torch_model(name: str, device: str = "cpu") -> tuple[Any, Any, Any]:
    """``(model, x, y)``: a ``torch.nn.Module`` in training mode and one minibatch."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":
        layers: list[Any] = []
        for _ in range(40):
            layers += [nn.Linear(64, 64), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(64, 10))
        x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    elif name in ("cnn", "cnn_nobn"):
        bn = name == "cnn"
        layers = []
        for i, (cin, cout) in enumerate(zip(CNN_CHANNELS, CNN_CHANNELS[1:])):
            layers.append(nn.Conv2d(cin, cout, 3, padding=1, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU())
            if i in CNN_POOL_AFTER:
                layers.append(nn.MaxPool2d(2))
        model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CNN_CHANNELS[-1], 10))
        x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    else:
        raise ValueError(name)
    return model.to(device).train(), x.to(device), y.to(device)


def torch_functional_loss(model: Any) -> Any:
    """``loss_fn(params, x, y)`` for ``gradnorm.torch.step``, through ``torch.func.functional_call``.
    A module's buffers (BatchNorm's running statistics) are passed as fresh copies at every call:
    ``torch.func`` refuses to let a transformed function mutate a tensor it captured."""
    import torch

    buffers = dict(model.named_buffers())

    def loss_fn(params: Any, x: Any, y: Any) -> Any:
        state = (params, {k: b.clone() for k, b in buffers.items()}) if buffers else params
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, state, (x,)), y)

    return loss_fn


# -- JAX ---------------------------------------------------------------------------------------
def jax_model(name: str) -> tuple[Any, Any, Any, Any]:
    """``(params, x, y, loss_fn)`` with ``loss_fn(params, x, y) -> scalar`` (BatchNorm with batch
    statistics; running statistics are not kept, as the step tables do not need them)."""
    import jax
    import jax.numpy as jnp

    def cross_entropy(logits: Any, y: Any) -> Any:
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    keys = iter(jax.random.split(jax.random.key(0), 100))
    if name == "mlp":
        params = [{"w": jax.random.normal(next(keys), (64, 64)) / 8.0, "b": jnp.zeros(64)} for _ in range(40)]
        params.append({"w": jax.random.normal(next(keys), (64, 10)) / 8.0, "b": jnp.zeros(10)})
        x = jax.random.normal(next(keys), (128, 64))
        y = jax.random.randint(next(keys), (128,), 0, 10)

        def loss_fn(p: Any, x: Any, y: Any) -> Any:
            h = x
            for layer in p[:-1]:
                h = jnp.tanh(h @ layer["w"] + layer["b"])
            return cross_entropy(h @ p[-1]["w"] + p[-1]["b"], y)

        return params, x, y, loss_fn
    if name not in ("cnn", "cnn_nobn"):
        raise ValueError(name)
    bn = name == "cnn"
    convs = []
    for cin, cout in zip(CNN_CHANNELS, CNN_CHANNELS[1:]):
        fan_in = 9 * cin
        conv = {"w": jax.random.normal(next(keys), (3, 3, cin, cout)) * jnp.sqrt(2.0 / fan_in), "bias": jnp.zeros(cout)}
        if bn:
            conv["scale"] = jnp.ones(cout)
        convs.append(conv)
    params = {"convs": convs, "fc": {"w": jax.random.normal(next(keys), (CNN_CHANNELS[-1], 10)) / 16.0,
                                     "b": jnp.zeros(10)}}
    x = jax.random.normal(next(keys), (32, 32, 32, 3))  # NHWC, XLA's CPU layout
    y = jax.random.randint(next(keys), (32,), 0, 10)

    def loss_fn(p: Any, x: Any, y: Any) -> Any:
        h = x
        for i, c in enumerate(p["convs"]):
            h = jax.lax.conv_general_dilated(h, c["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            if bn:
                mean = jnp.mean(h, axis=(0, 1, 2))
                var = jnp.mean(jnp.square(h - mean), axis=(0, 1, 2))
                h = (h - mean) * jax.lax.rsqrt(var + 1e-5) * c["scale"]
            h = h + c["bias"]
            h = jax.nn.relu(h)
            if i in CNN_POOL_AFTER:
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = jnp.mean(h, axis=(1, 2))
        return cross_entropy(h @ p["fc"]["w"] + p["fc"]["b"], y)

    return params, x, y, loss_fn


# -- TensorFlow --------------------------------------------------------------------------------
def tf_model(name: str) -> tuple[Any, Any, Any, Any]:
    """``(model, x, y, loss_fn)``: a built Keras model, one minibatch and ``loss_fn() -> scalar``
    reading the model's variables (``training=True``: BatchNorm uses batch statistics)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    if name == "mlp":
        model = keras.Sequential([keras.Input((64,))] + [keras.layers.Dense(64, activation="tanh") for _ in range(40)]
                                 + [keras.layers.Dense(10)])
        x = tf.random.normal((128, 64))
        y = tf.random.uniform((128,), 0, 10, dtype=tf.int32)
    elif name in ("cnn", "cnn_nobn"):
        bn = name == "cnn"
        layers: list[Any] = [keras.Input((32, 32, 3))]
        for i, cout in enumerate(CNN_CHANNELS[1:]):
            layers.append(keras.layers.Conv2D(cout, 3, padding="same", use_bias=not bn))
            if bn:
                layers.append(keras.layers.BatchNormalization(epsilon=1e-5))
            layers.append(keras.layers.ReLU())
            if i in CNN_POOL_AFTER:
                layers.append(keras.layers.MaxPooling2D(2))
        layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
        model = keras.Sequential(layers)
        x = tf.random.normal((32, 32, 32, 3))
        y = tf.random.uniform((32,), 0, 10, dtype=tf.int32)
    else:
        raise ValueError(name)
    loss_obj = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss_fn() -> Any:
        return loss_obj(y, model(x, training=True))

    return model, x, y, loss_fn
