"""The contract every registered rule keeps on every installed backend (in the spirit of optax's
``contrib/_common_test.py``, across frameworks), through public APIs only.

Backends: the core ``gradnorm.step`` on NumPy, array-api-strict and torch tensors (hand-written
gradients and Hessian-vector products), ``gradnorm.torch.Optimizer``, ``gradnorm.torch.step``,
``gradnorm.jax.step``, ``gradnorm.jax.transform``, ``gradnorm.tf.step`` and
``gradnorm.tf.keras.GradnormModel``; a backend whose framework is not installed is skipped.

The problem: least squares on two leaves, ``{"w": (3,), "b": ()}`` (Keras: a ``Dense(1)``),
``L = mean((X w + b - y)^2) / 2``, with data exact in every float dtype. Properties:

* ``test_contract`` (every rule x every ``adapter`` setting of conformance/settings.py x every
  backend; float32; three steps on changing minibatches): inputs are not mutated (the functional
  steps' params, data and hyperparameters; the optimizers' weights are put back exactly, seen with
  a learning rate of 0); ``info["grad_evals"]`` equals ``rule.grad_evals`` and the number of times the
  gradient / loss function actually ran (counted in Python: per step eagerly, at trace time under
  ``jax.jit`` / ``tf.function`` / Keras's compiled train function, where the later steps must not
  run it again: no retrace). A rule of varying cost (``periodic``, ``looksam``: ``mean_grad_evals``
  below ``grad_evals``) reports at each step what it spent, the same on every backend as on the
  NumPy core, at most ``rule.grad_evals``; eagerly that many calls ran, and a trace (both branches)
  runs ``rule.grad_evals``; the direction keeps the parameters' dtype; the rule state survives each
  adapter's save/load round trip (``state_dict``/``load_state_dict`` into a fresh optimizer, the optax
  state through NumPy, ``model.save``/``keras.models.load_model``, the functional steps' ``state``
  through NumPy) and the run continues bit for bit.
* ``test_zero_strength_is_sgd`` (every ``zero`` setting x backend): the direction (Keras: the
  weights after a step) equals ``sgd``'s bit for bit, after one gradient evaluation.
* ``test_dtypes`` (every rule's default setting x backend x float16, bfloat16, float32, float64, a
  float32/float64 tree, float32 leaves with 0-d array hyperparameters of the same library, in its
  default dtype): every direction leaf has its parameter's dtype.
* ``test_zero_gradient_is_finite`` (every ``adapter`` setting x backend x dtype): where the
  gradient is exactly zero the direction is finite and ``info["finite"]`` is true.

To stay fast (every XLA compilation, TensorFlow trace and Keras fit costs a fraction of a second):
Keras runs each rule's default setting (and first zero-strength setting) only, the same
``gradnorm.tf`` step that ``tf_step`` checks in every setting; JAX runs the contract under
``jax.jit`` for each rule's default setting and its other settings eagerly; the dtype cells run
eagerly. A dtype the library lacks (NumPy: bfloat16; array-api-strict: float16, bfloat16) and a
float32/float64 tree on TensorFlow (which does not mix them in one operation) are not cells.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from typing import Any

import numpy as np
import pytest

import gradnorm
from conformance.settings import adapter_settings, default_settings, setting_id, zero_settings

FLOATS = ("float16", "bfloat16", "float32", "float64")
N = 6  # examples per minibatch
W0 = np.array([0.5, -1.0, 0.25])
B0 = 0.75
LR = 0.1
MOMENTUM = 0.9
SEEDS = (1, 2, 3)  # three steps on changing minibatches
SPLIT = 2  # save and load after this many steps


def batch(seed: Any) -> tuple[np.ndarray, np.ndarray]:
    """A minibatch ``(X, y)`` in float64, exact in float16 and bfloat16 (multiples of 1/8 up to 1).
    ``"zero"``: X = 0 and y = b, where the residual, hence the gradient, is exactly zero."""
    if seed == "zero":
        return np.zeros((N, 3)), np.full(N, B0)
    rng = np.random.default_rng(seed)
    return rng.integers(-8, 9, (N, 3)) / 8.0, rng.integers(-8, 9, N) / 8.0


def leaf_dtypes(variant: str) -> dict[str, str]:
    if variant == "mixed":
        return {"w": "float32", "b": "float64"}
    if variant == "hyper0d":
        return {"w": "float32", "b": "float32"}
    return {"w": variant, "b": variant}


def array_hyper(rule: str, hyper: dict[str, Any], scalar) -> dict[str, Any]:
    """``hyper`` with its float values, and the rule's strengths and radii left at their defaults
    (the per-leaf hyperparameters), as 0-d arrays made by ``scalar`` (the library's default dtype)."""
    cls = gradnorm.rules.REGISTRY[rule]
    out = dict(hyper)
    for h in cls.hyperparameters:
        value = hyper.get(h.name, None if h.required else h.default)
        if isinstance(value, float) and (h.name in hyper or h.leafwise):
            out[h.name] = scalar(value)
    return out


@dataclasses.dataclass
class Record:
    """What one step did, as seen through the backend's public API."""

    params: dict[str, np.ndarray]  # after the step (the optimizers) or before it (functional)
    direction: dict[str, np.ndarray] | None  # None where not observable (Keras)
    direction_dtypes: dict[str, str] | None
    grad_evals: int | None  # info["grad_evals"], None where not observable (Keras)
    hvp_evals: int | None
    calls: int  # gradient / loss function calls during the step
    hvp_calls: int | None  # hvp_fn calls (hand-written backends)
    finite: bool | None
    unchanged: bool = True  # inputs not mutated


class Counter:
    def __init__(self):
        self.calls = 0
        self.hvp_calls = 0

    def reset(self):
        self.calls = self.hvp_calls = 0


def same_bits(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ----------------------------------------------------------------------------------------------
# backends


class Backend:
    name = ""
    dtypes: tuple[str, ...] = FLOATS  # the float dtypes the library has
    mixed = True  # float32 and float64 leaves in one tree
    hvp_passes = 0  # loss_fn calls an HVP makes besides the gradient evaluations
    compiled = False  # the contract cell runs under jax.jit / tf.function / Keras's train function

    def setup(self) -> None:
        pass

    def scalar(self, value: float) -> Any:
        raise NotImplementedError

    def run(self, rule: str, hyper: dict[str, Any], *, variant: str = "float32", seeds=SEEDS,
            split: int | None = None, lr: float = LR, compiled: bool = False, cache: dict | None = None
            ) -> list[Record]:
        raise NotImplementedError


class Functional(Backend):
    """A pure step: ``(params, state, data) -> StepResult``; the test applies ``p - lr d`` itself."""

    counts_hvp = False  # the test supplies hvp_fn (and counts its calls)

    def lib_params(self, dtypes: dict[str, str]) -> dict[str, Any]:
        raise NotImplementedError

    def lib_data(self, seed: Any, dtypes: dict[str, str]) -> tuple[Any, Any]:
        raise NotImplementedError

    def make_step(self, rule, hyper, counter: Counter, compiled: bool):
        raise NotImplementedError

    def init_state(self, rule, hyper, params):
        return gradnorm.rules.get(rule, **hyper).init(params)

    def to_np(self, x: Any) -> np.ndarray:
        raise NotImplementedError

    def dtype_name(self, x: Any) -> str:
        raise NotImplementedError

    def update(self, params, direction, lr):
        return {k: params[k] - lr * direction[k] for k in params}

    def roundtrip(self, state):
        """The state through the host, leaf by leaf (a tree: counters, parameter-sized buffers, a wrapped
        rule's state): NumPy arrays, and back to the library."""
        import optree

        return optree.tree_map(lambda x: self.from_np(np.asarray(self.to_np(x)), x), state)

    def from_np(self, a: np.ndarray, like: Any) -> Any:
        raise NotImplementedError

    def snapshot(self, tree) -> list[np.ndarray]:
        return [np.array(self.to_np(x), copy=True) for x in _leaves(tree)]

    def run(self, rule, hyper, *, variant="float32", seeds=SEEDS, split=None, lr=LR, compiled=False, cache=None):
        dtypes = leaf_dtypes(variant)
        if variant == "hyper0d":
            hyper = array_hyper(rule, hyper, self.scalar)
        cache = {} if cache is None else cache
        if "fn" not in cache:
            cache["counter"] = Counter()
            cache["fn"] = self.make_step(rule, hyper, cache["counter"], compiled)
        fn, counter = cache["fn"], cache["counter"]
        params = self.lib_params(dtypes)
        state = self.init_state(rule, hyper, params)
        out = []
        for k, seed in enumerate(seeds):
            if split is not None and k == split:
                state = self.roundtrip(state)
            data = self.lib_data(seed, dtypes)
            before = self.snapshot((params, data, hyper))
            counter.reset()
            res = fn(params, state, data)
            unchanged = all(same_bits(a, b) for a, b in zip(before, self.snapshot((params, data, hyper))))
            out.append(Record(
                params={k_: self.to_np(v) for k_, v in params.items()},
                direction={k_: self.to_np(v) for k_, v in res.grad.items()},
                direction_dtypes={k_: self.dtype_name(v) for k_, v in res.grad.items()},
                grad_evals=int(res.info["grad_evals"]), hvp_evals=int(res.info["hvp_evals"]),
                calls=counter.calls, hvp_calls=counter.hvp_calls if self.counts_hvp else None,
                finite=bool(res.info["finite"]), unchanged=unchanged,
            ))
            params, state = self.update(params, res.grad, lr), res.state
        return out


def _leaves(tree) -> list[Any]:
    import optree

    return [x for x in optree.tree_leaves(tree, none_is_leaf=False)
            if not isinstance(x, (bool, int, float, str, gradnorm.rules.Rule))]  # a wrapped rule is immutable


# -- the core on Array API libraries, hand-written derivatives ---------------------------------


class Core(Functional):
    """``gradnorm.step`` with hand-written ``grad_fn`` and ``hvp_fn`` in the library's namespace."""

    counts_hvp = True
    module = ""

    def setup(self):
        self.xp_module = pytest.importorskip(self.module)

    def xp(self, x):
        import array_api_compat

        return array_api_compat.array_namespace(x)

    def make_step(self, rule, hyper, counter, compiled):
        def step(params, state, data):
            X, y = data

            def grad_fn(p):
                counter.calls += 1
                return ls_value_and_grad(self.xp(p["w"]), p, X, y)

            def hvp_fn(p, v):
                counter.hvp_calls += 1
                return ls_hvp(self.xp(p["w"]), p, v, X)

            return gradnorm.step(params, grad_fn, rule=rule, state=state, hvp_fn=hvp_fn, **hyper)

        return step


def _wide(xp, p):
    return xp.result_type(p["w"].dtype, p["b"].dtype)


def ls_value_and_grad(xp, p, X, y):
    wide = _wide(xp, p)
    w, b = xp.astype(p["w"], wide), xp.astype(p["b"], wide)
    X, y = xp.astype(X, wide), xp.astype(y, wide)
    r = xp.matmul(X, w) + b - y
    gw = xp.matmul(xp.matrix_transpose(X), r) / N
    return 0.5 * xp.mean(r * r), {"w": xp.astype(gw, p["w"].dtype), "b": xp.astype(xp.mean(r), p["b"].dtype)}


def ls_hvp(xp, p, v, X):
    wide = _wide(xp, p)
    X = xp.astype(X, wide)
    jv = xp.matmul(X, xp.astype(v["w"], wide)) + xp.astype(v["b"], wide)
    hw = xp.matmul(xp.matrix_transpose(X), jv) / N
    return {"w": xp.astype(hw, p["w"].dtype), "b": xp.astype(xp.mean(jv), p["b"].dtype)}


class NumpyCore(Core):
    name = "numpy"
    module = "numpy"
    dtypes = ("float16", "float32", "float64")

    def scalar(self, value):
        return np.asarray(value)

    def lib_params(self, dtypes):
        return {"w": W0.astype(dtypes["w"]), "b": np.asarray(B0, dtype=dtypes["b"])}

    def lib_data(self, seed, dtypes):
        return batch(seed)

    def to_np(self, x):
        return np.asarray(x)

    def from_np(self, a, like):
        return a

    def dtype_name(self, x):
        return np.asarray(x).dtype.name


class StrictCore(Core):
    name = "array_api_strict"
    module = "array_api_strict"
    dtypes = ("float32", "float64")

    def scalar(self, value):
        return self.xp_module.asarray(value)

    def lib_params(self, dtypes):
        xp = self.xp_module
        return {"w": xp.asarray(W0, dtype=getattr(xp, dtypes["w"])), "b": xp.asarray(B0, dtype=getattr(xp, dtypes["b"]))}

    def lib_data(self, seed, dtypes):
        X, y = batch(seed)
        return self.xp_module.asarray(X), self.xp_module.asarray(y)

    def to_np(self, x):
        return np.asarray(x)

    def from_np(self, a, like):
        return self.xp_module.asarray(a, dtype=like.dtype)

    def dtype_name(self, x):
        return str(x.dtype).rsplit(".", 1)[-1]  # "array_api_strict.float32"


class TorchMixin:
    def scalar(self, value):
        return self.torch.tensor(value)

    def lib_params(self, dtypes):
        t = self.torch
        return {"w": t.tensor(W0, dtype=getattr(t, dtypes["w"])), "b": t.tensor(B0, dtype=getattr(t, dtypes["b"]))}

    def lib_data(self, seed, dtypes):
        X, y = batch(seed)
        return self.torch.tensor(X), self.torch.tensor(y)

    def to_np(self, x):
        x = x.detach()
        return (x.float() if x.dtype == self.torch.bfloat16 else x).numpy()

    def from_np(self, a, like):
        return self.torch.tensor(a).to(like.dtype)

    def dtype_name(self, x):
        return str(x.dtype).removeprefix("torch.")


class TorchCore(TorchMixin, Core):
    name = "torch_core"
    module = "torch"

    def setup(self):
        super().setup()
        self.torch = self.xp_module


# -- the adapters ------------------------------------------------------------------------------


def torch_loss(torch, p, X, y):
    wide = torch.promote_types(p["w"].dtype, p["b"].dtype)
    r = X.to(wide) @ p["w"].to(wide) + p["b"].to(wide) - y.to(wide)
    return 0.5 * torch.mean(r * r)


class TorchFunctional(TorchMixin, Functional):
    name = "torch_functional"
    hvp_passes = 0  # the default hvp="reverse_over_reverse": a vjp of the gradient pass, no new pass

    def setup(self):
        self.torch = pytest.importorskip("torch")
        self.gt = pytest.importorskip("gradnorm.torch")

    def make_step(self, rule, hyper, counter, compiled):
        torch = self.torch

        def loss_fn(p, X, y):
            counter.calls += 1
            return torch_loss(torch, p, X, y)

        def step(params, state, data):
            return self.gt.step(params, loss_fn, *data, rule=rule, state=state, **hyper)

        return step


class TorchOptimizer(TorchMixin, Backend):
    name = "torch_optimizer"

    def setup(self):
        self.torch = pytest.importorskip("torch")
        self.gt = pytest.importorskip("gradnorm.torch")

    def make(self, rule, hyper, dtypes, lr, values=None):
        t = self.torch
        values = values if values is not None else self.lib_params(dtypes)
        params = {k: t.nn.Parameter(v.detach().clone()) for k, v in values.items()}
        opt = self.gt.Optimizer(list(params.values()), t.optim.SGD, rule=rule, lr=lr, momentum=MOMENTUM, **hyper)
        return params, opt

    def run(self, rule, hyper, *, variant="float32", seeds=SEEDS, split=None, lr=LR, compiled=False, cache=None):
        t = self.torch
        dtypes = leaf_dtypes(variant)
        if variant == "hyper0d":
            hyper = array_hyper(rule, hyper, self.scalar)
        counter = Counter()
        params, opt = self.make(rule, hyper, dtypes, lr)
        out = []
        for k, seed in enumerate(seeds):
            if split is not None and k == split:  # a checkpoint, loaded into a fresh model and optimizer
                saved = copy.deepcopy(opt.state_dict())
                params, opt = self.make(rule, hyper, dtypes, lr, values={k_: v.detach() for k_, v in params.items()})
                opt.load_state_dict(saved)
            X, y = self.lib_data(seed, dtypes)
            data_before = [X.clone(), y.clone()]

            def closure(create_graph=False, opt=opt, params=params, X=X, y=y):
                counter.calls += 1
                opt.zero_grad()
                loss = torch_loss(t, params, X, y)
                loss.backward(create_graph=create_graph)
                return loss

            counter.reset()
            opt.step(closure)
            info = opt.last_info
            out.append(Record(
                params={k_: self.to_np(v) for k_, v in params.items()},
                direction={k_: self.to_np(v.grad) for k_, v in params.items()},
                direction_dtypes={k_: self.dtype_name(v.grad) for k_, v in params.items()},
                grad_evals=int(info["grad_evals"]), hvp_evals=int(info["hvp_evals"]), calls=counter.calls,
                hvp_calls=None, finite=bool(info["finite"]),
                unchanged=t.equal(X, data_before[0]) and t.equal(y, data_before[1]),
            ))
        return out


class JaxMixin:
    def setup(self):
        self.jax = pytest.importorskip("jax")
        self.jnp = pytest.importorskip("jax.numpy")
        pytest.importorskip("optax")
        self.gj = pytest.importorskip("gradnorm.jax")

    def scalar(self, value):
        return self.jnp.asarray(value)

    def lib_params(self, dtypes):
        jnp = self.jnp
        return {"w": jnp.asarray(W0, dtype=dtypes["w"]), "b": jnp.asarray(B0, dtype=dtypes["b"])}

    def lib_data(self, seed, dtypes):
        X, y = batch(seed)
        wide = "float64" if "float64" in dtypes.values() else "float32"
        return self.jnp.asarray(X, dtype=wide), self.jnp.asarray(y, dtype=wide)

    def to_np(self, x):
        a = np.asarray(x)
        return a.astype(np.float32) if a.dtype.name == "bfloat16" else a

    def from_np(self, a, like):
        return self.jnp.asarray(a, dtype=like.dtype)

    def dtype_name(self, x):
        return np.dtype(x.dtype).name

    def loss(self, p, X, y):
        jnp = self.jnp
        wide = jnp.promote_types(p["w"].dtype, p["b"].dtype)
        r = X.astype(wide) @ p["w"].astype(wide) + p["b"].astype(wide) - y.astype(wide)
        return 0.5 * jnp.mean(r * r)

    def x64(self, variant):
        import contextlib

        if variant in ("float64", "mixed"):
            return self.jax.enable_x64(True)
        return contextlib.nullcontext()


class JaxStep(JaxMixin, Functional):
    name = "jax_step"
    hvp_passes = 1  # forward-over-reverse: jax.jvp(jax.grad(loss)), a new trace (docs/adapters/jax.md)
    compiled = True

    def make_step(self, rule, hyper, counter, compiled):
        def loss_fn(p, X, y):
            counter.calls += 1
            return self.loss(p, X, y)

        def step(params, state, data):
            return self.gj.step(params, loss_fn, *data, rule=rule, state=state, **hyper)

        return self.jax.jit(step) if compiled else step

    def run(self, *args, variant="float32", **kwargs):
        with self.x64(variant):
            return super().run(*args, variant=variant, **kwargs)


class JaxTransform(JaxMixin, Backend):
    name = "jax_transform"
    hvp_passes = 1
    compiled = True

    def run(self, rule, hyper, *, variant="float32", seeds=SEEDS, split=None, lr=LR, compiled=False, cache=None,
            base="momentum"):
        with self.x64(variant):
            return self._run(rule, hyper, variant, seeds, split, lr, compiled, cache, base)

    def _run(self, rule, hyper, variant, seeds, split, lr, compiled, cache, base):
        import optax

        jax = self.jax
        dtypes = leaf_dtypes(variant)
        if variant == "hyper0d":
            hyper = array_hyper(rule, hyper, self.scalar)
        cache = {} if cache is None else cache
        if "fn" not in cache:
            counter = Counter()
            opt = optax.sgd(lr, momentum=MOMENTUM) if base == "momentum" else optax.identity()
            tx = self.gj.transform(opt, rule=rule, **hyper)

            def counted(p, X, y):
                counter.calls += 1
                return self.loss(p, X, y)

            def train_step(params, state, X, y):
                value, grads = jax.value_and_grad(self.loss)(params, X, y)  # the user's own gradient
                updates, state = tx.update(grads, state, params, value=value, loss_fn=lambda p: counted(p, X, y))
                return updates, state

            cache.update(tx=tx, counter=counter, fn=jax.jit(train_step) if compiled else train_step)
        tx, counter, fn = cache["tx"], cache["counter"], cache["fn"]
        params = self.lib_params(dtypes)
        state = tx.init(params)
        out = []
        for k, seed in enumerate(seeds):
            if split is not None and k == split:  # a checkpoint: the optax state as NumPy arrays, and back
                host = jax.tree.map(np.asarray, state)
                state = jax.tree.map(self.jnp.asarray, host)
            X, y = self.lib_data(seed, dtypes)
            counter.reset()
            updates, state = fn(params, state, X, y)
            out.append(Record(
                params={k_: self.to_np(v) for k_, v in params.items()},
                direction={k_: self.to_np(v) for k_, v in updates.items()},
                direction_dtypes={k_: self.dtype_name(v) for k_, v in updates.items()},
                grad_evals=int(state.info["grad_evals"]), hvp_evals=int(state.info["hvp_evals"]),
                calls=counter.calls, hvp_calls=None, finite=bool(state.info["finite"]),
            ))
            params = optax.apply_updates(params, updates)
        return out


class TFStep(Functional):
    name = "tf_step"
    mixed = False  # TensorFlow does not mix float32 and float64 in one operation
    compiled = True
    # hvp: "reverse_over_reverse" (default) differentiates the first pass's tape: no new pass

    def setup(self):
        self.tf = pytest.importorskip("tensorflow")
        self.gt = pytest.importorskip("gradnorm.tf")

    def scalar(self, value):
        return self.tf.constant(value)

    def lib_params(self, dtypes):
        tf = self.tf
        return {"w": tf.Variable(W0, dtype=getattr(tf, dtypes["w"])), "b": tf.Variable(B0, dtype=getattr(tf, dtypes["b"]))}

    def lib_data(self, seed, dtypes):
        X, y = batch(seed)
        dtype = self.tf.float64 if dtypes["w"] == "float64" else self.tf.float32  # cast to the leaves' in the loss
        return self.tf.constant(X, dtype), self.tf.constant(y, dtype)

    def init_state(self, rule, hyper, params):
        return gradnorm.rules.get(rule, **hyper).init([v.read_value() for v in params.values()])

    def to_np(self, x):
        a = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
        return a.astype(np.float32) if a.dtype.name == "bfloat16" else a

    def from_np(self, a, like):
        return self.tf.constant(a, dtype=like.dtype)

    def dtype_name(self, x):
        return x.dtype.name

    def update(self, params, direction, lr):
        for k, v in params.items():
            v.assign_sub(lr * direction[k])
        return params

    def make_step(self, rule, hyper, counter, compiled):
        tf = self.tf

        def step(params, state, data):
            X, y = data
            w, b = params["w"], params["b"]

            def loss_fn():
                counter.calls += 1
                r = tf.linalg.matvec(tf.cast(X, w.dtype), w) + b - tf.cast(y, w.dtype)
                return 0.5 * tf.reduce_mean(r * r)

            res = self.gt.step([w, b], loss_fn, rule=rule, state=state, **hyper)
            return gradnorm.StepResult({"w": res.grad[0], "b": res.grad[1]}, res.loss, res.state, res.info)

        return tf.function(step) if compiled else step


class Keras(Backend):
    name = "keras"
    mixed = False
    compiled = True

    def setup(self):
        self.tf = pytest.importorskip("tensorflow")
        self.keras = pytest.importorskip("keras")
        if self.keras.backend.backend() != "tensorflow":
            pytest.skip("gradnorm.tf.keras needs the TensorFlow backend of Keras")
        self.gk = pytest.importorskip("gradnorm.tf.keras")

    def scalar(self, value):
        return self.tf.constant(value)

    def data(self, seeds, dtype):
        tf = self.tf
        X = np.concatenate([batch(s)[0] for s in seeds])
        y = np.concatenate([batch(s)[1] for s in seeds])[:, None]
        return tf.constant(X, dtype=dtype), tf.constant(y, dtype=dtype)

    def model(self, rule, hyper, dtype, counter):
        keras, tf = self.keras, self.tf
        net = keras.Sequential([keras.Input((3,), dtype=dtype), keras.layers.Dense(1, dtype=dtype)])
        net.set_weights([W0.reshape(3, 1).astype(np.float32), np.array([B0], np.float32)])

        def loss(y_true, y_pred):
            counter.calls += 1
            r = y_pred - tf.cast(y_true, y_pred.dtype)
            return 0.5 * tf.reduce_mean(r * r)

        return self.gk.GradnormModel(net, rule=rule, **hyper), loss

    def optimizer(self, lr):
        keras = self.keras
        seen = []

        class RecordingSGD(keras.optimizers.SGD):
            """Records the dtypes of the directions it applies (at trace time)."""

            def apply_gradients(self, grads_and_vars):
                grads_and_vars = list(grads_and_vars)
                seen.append([g.dtype.name for g, _ in grads_and_vars])  # [kernel, bias]
                return super().apply_gradients(grads_and_vars)

        return RecordingSGD(lr, momentum=MOMENTUM), seen

    def weights(self, trainer):
        return {("w" if i == 0 else "b"): self.to_np(v) for i, v in enumerate(trainer.model.weights)}

    def to_np(self, v):
        a = np.asarray(v.numpy())
        return a.astype(np.float32) if a.dtype.name == "bfloat16" else a

    def run(self, rule, hyper, *, variant="float32", seeds=SEEDS, split=None, lr=LR, compiled=False, cache=None,
            tmp_path=None):
        keras = self.keras
        dtype = leaf_dtypes(variant)["w"]
        if variant == "hyper0d":
            hyper = array_hyper(rule, hyper, self.scalar)
        counter = Counter()
        trainer, loss = self.model(rule, hyper, dtype, counter)
        opt, seen = self.optimizer(lr)
        if split is not None:  # plain SGD: the saved file must rebuild the optimizer
            opt, seen = keras.optimizers.SGD(lr, momentum=MOMENTUM), []
        trainer.compile(optimizer=opt, loss=loss, run_eagerly=not compiled)
        # built before fit: an optimizer that creates its variables in the first trace makes Keras
        # trace its training function twice (Keras's own train_step too)
        trainer.optimizer.build(trainer.trainable_variables)
        X, y = self.data(seeds, dtype)
        out = []
        parts = [(0, len(seeds))] if split is None else [(0, split), (split, len(seeds))]
        for start, stop in parts:
            if start > 0:  # model.save, keras.models.load_model, continue fit
                path = tmp_path / "trainer.keras"
                trainer.save(path)
                trainer = keras.models.load_model(path, custom_objects={"loss": loss})
            counter.reset()
            if compiled:
                history = trainer.fit(X[start * N:stop * N], y[start * N:stop * N], batch_size=N, epochs=1,
                                      shuffle=False, verbose=0).history
                nonfinite = history["nonfinite_steps"][-1]
            else:  # the same train_step eagerly, a batch at a time (train_on_batch: no fit loop around it)
                for i in range(start, stop):
                    logs = trainer.train_on_batch(X[i * N:(i + 1) * N], y[i * N:(i + 1) * N], return_dict=True)
                nonfinite = logs["nonfinite_steps"]
            out.append(Record(
                params=self.weights(trainer), direction=None,
                direction_dtypes={"w": seen[-1][0], "b": seen[-1][1]} if seen else None,
                grad_evals=None, hvp_evals=None, calls=counter.calls, hvp_calls=None,
                finite=int(nonfinite) == 0,
            ))
        return out


BACKENDS = {b.name: b for b in (NumpyCore(), StrictCore(), TorchCore(), TorchOptimizer(), TorchFunctional(),
                                JaxStep(), JaxTransform(), TFStep(), Keras())}


def get_backend(name: str) -> Backend:
    backend = BACKENDS[name]
    backend.setup()  # pytest.importorskip of its framework
    return backend


# ----------------------------------------------------------------------------------------------
# the cells: every rule, setting and dtype on every backend, except that Keras (slow, and the same
# gradnorm.tf step underneath, which tf_step checks in every setting) runs each rule's default
# setting only, and that a dtype a library does not have (NumPy: bfloat16; array-api-strict:
# float16 and bfloat16) or a float32/float64 tree TensorFlow cannot mix is not a cell.

ADAPTER = adapter_settings()
DEFAULT = default_settings()
ZERO = zero_settings()
FIRST_ZERO = [(rule, hyper) for rule, hyper in ZERO if hyper == next(h for r, h in ZERO if r == rule)]
VARIANTS = (*FLOATS, "mixed", "hyper0d")


def _settings_for(name: str, settings: list) -> list:
    return [(r, h) for r, h in settings if name != "keras" or (r, h) in DEFAULT]


def _supports(name: str, variant: str) -> bool:
    backend = BACKENDS[name]
    return backend.mixed if variant == "mixed" else variant not in FLOATS or variant in backend.dtypes


def _has_real_hyperparameter(rule: str, hyper: dict) -> bool:
    return array_hyper(rule, hyper, lambda v: "0-d") != hyper


def _cells(settings, variants=(None,), per_backend=_settings_for):
    cells = []
    for name in BACKENDS:
        for (rule, hyper), variant in itertools.product(per_backend(name, settings), variants):
            if variant is None or (_supports(name, variant)
                                   and (variant != "hyper0d" or _has_real_hyperparameter(rule, hyper))):
                label = f"{name}-{setting_id(rule, hyper)}" + ("" if variant is None else f"-{variant}")
                cells.append(pytest.param(name, rule, hyper, *(() if variant is None else (variant,)), id=label))
    return cells


def expected_calls(backend: Backend, rule_obj, grad_evals: int | None = None, hvp_evals: int | None = None) -> int:
    """Gradient / loss function calls of one step: the rule's gradient evaluations (or `grad_evals`,
    what a step of a rule of varying cost spent), plus the passes the backend's HVP makes (the optax
    transform gets the first gradient as `updates`)."""
    grads = rule_obj.grad_evals if grad_evals is None else grad_evals
    hvps = rule_obj.hvp_evals if hvp_evals is None else hvp_evals
    n = grads + backend.hvp_passes * hvps
    return n - 1 if backend.name == "jax_transform" else n


def varying_cost(rule_obj) -> bool:
    """A rule whose steps cost different numbers of evaluations (``periodic``, ``looksam``): it declares
    the most one step costs (`grad_evals`) and its long-run average (`mean_grad_evals`)."""
    return rule_obj.mean_grad_evals != rule_obj.grad_evals


@functools.cache
def _spent_by_numpy(rule: str, setting: str) -> tuple[int, ...]:
    """``info["grad_evals"]`` of each step of the contract's run on the NumPy core (eager: what ran,
    counted), the spend every backend must report for a rule of varying cost."""
    hyper = next(h for r, h in ADAPTER if r == rule and setting_id(r, h) == setting)
    return tuple(rec.grad_evals for rec in get_backend("numpy").run(rule, hyper))


def identity_base(backend: Backend) -> dict:
    """The optax transform around `optax.identity()`: its updates are the rule's direction."""
    return {"base": "identity"} if backend.name == "jax_transform" else {}


@functools.cache
def _sgd_step(name: str) -> Record:
    backend = BACKENDS[name]
    return backend.run("sgd", {}, seeds=SEEDS[:1], **identity_base(backend))[0]


# ----------------------------------------------------------------------------------------------
# the contract


@pytest.mark.parametrize("name,rule,hyper", _cells(ADAPTER))
def test_contract(name, rule, hyper, tmp_path):
    backend = get_backend(name)
    rule_obj = gradnorm.rules.get(rule, **hyper)
    cache: dict = {}
    kwargs = {"tmp_path": tmp_path} if name == "keras" else {}
    # under jax.jit, tf.function or Keras's compiled train function (JAX: each rule's default setting,
    # its other settings eagerly, as every XLA compilation costs a fraction of a second)
    traced = backend.compiled and not (isinstance(backend, JaxMixin) and (rule, hyper) not in DEFAULT)
    run = backend.run(rule, hyper, compiled=traced, cache=cache, **kwargs)
    problems = []
    want = expected_calls(backend, rule_obj)
    varying = varying_cost(rule_obj)
    # a rule of varying cost: every backend reports what the NumPy core spent at each step (traced, both
    # branches are traced once, at the most a step costs; run, only one)
    spent = _spent_by_numpy(rule, setting_id(rule, hyper)) if varying else None
    for k, rec in enumerate(run):
        step = f"step {k + 1}" if len(run) > 1 else f"steps 1-{len(SEEDS)} (one fit)"
        if not rec.unchanged:
            problems.append(f"{step}: an input (params, data or hyperparameters) was modified")
        if rec.grad_evals is not None and not varying and rec.grad_evals != rule_obj.grad_evals:
            problems.append(f"{step}: info['grad_evals'] = {rec.grad_evals}, rule.grad_evals = {rule_obj.grad_evals}")
        if rec.grad_evals is not None and varying and not (
            1 <= rec.grad_evals <= rule_obj.grad_evals and rec.grad_evals == spent[k]
        ):
            problems.append(f"{step}: info['grad_evals'] = {rec.grad_evals}; the NumPy core spent {spent[k]}, "
                            f"rule.grad_evals (the most) = {rule_obj.grad_evals}")
        if rec.hvp_evals is not None and rec.hvp_evals != rule_obj.hvp_evals:
            problems.append(f"{step}: info['hvp_evals'] = {rec.hvp_evals}, rule.hvp_evals = {rule_obj.hvp_evals}")
        calls_want = want if (k == 0 or not traced) else 0
        if varying and not traced and rec.grad_evals is not None:  # eagerly, what the step spent ran
            calls_want = expected_calls(backend, rule_obj, rec.grad_evals, rec.hvp_evals)
        if rec.calls != calls_want:
            what = "retraced: " if traced and (k > 0 or len(run) == 1) and rec.calls > calls_want else ""
            problems.append(f"{step}: {what}the loss/gradient function ran {rec.calls} times, expected {calls_want}"
                            + (" (at trace time)" if traced else ""))
        if rec.hvp_calls is not None and rec.hvp_calls != rule_obj.hvp_evals:
            problems.append(f"{step}: hvp_fn ran {rec.hvp_calls} times, rule.hvp_evals = {rule_obj.hvp_evals}")
        if rec.direction_dtypes is not None and set(rec.direction_dtypes.values()) != {"float32"}:
            problems.append(f"{step}: direction dtypes {rec.direction_dtypes} for float32 parameters")
        if rec.finite is not None and not rec.finite:
            problems.append(f"{step}: not finite")
    # the state through each adapter's save/load round trip: the run continues bit for bit
    resumed = backend.run(rule, hyper, split=SPLIT, compiled=traced, cache=cache, **kwargs)
    last, again = run[-1], resumed[-1]
    for leaf in last.params:
        if not same_bits(last.params[leaf], again.params[leaf]):
            problems.append(f"after save/load: parameter {leaf!r} {again.params[leaf]!r}, uninterrupted "
                            f"{last.params[leaf]!r}")
        if last.direction is not None and not same_bits(last.direction[leaf], again.direction[leaf]):
            problems.append(f"after save/load: direction {leaf!r} {again.direction[leaf]!r}, uninterrupted "
                            f"{last.direction[leaf]!r}")
    # the optimizers put the weights back exactly: with a learning rate of 0 nothing moves
    if isinstance(backend, (TorchOptimizer, Keras)):
        still = backend.run(rule, hyper, seeds=SEEDS[:1], lr=0.0, compiled=False)
        start = {"w": W0.astype(np.float32), "b": np.asarray(B0, np.float32)}
        for leaf, value in still[-1].params.items():
            if not np.array_equal(np.reshape(value, -1), np.reshape(start[leaf], -1)):
                problems.append(f"weights changed by a step with learning rate 0: {leaf!r} {value!r}")
    assert not problems, f"{name}, {setting_id(rule, hyper)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name,rule,hyper", _cells(ZERO, per_backend=lambda name, settings: (
    FIRST_ZERO if name == "keras" else settings)))
def test_zero_strength_is_sgd(name, rule, hyper):
    backend = get_backend(name)
    got = backend.run(rule, hyper, seeds=SEEDS[:1], **identity_base(backend))[0]
    sgd = _sgd_step(name)
    if got.direction is not None:
        for leaf in got.direction:
            assert same_bits(got.direction[leaf], sgd.direction[leaf]), (
                f"{name}, {setting_id(rule, hyper)}: direction {leaf!r} {got.direction[leaf]!r}, "
                f"sgd {sgd.direction[leaf]!r}")
    else:  # Keras: the weights after the step
        for leaf in got.params:
            assert same_bits(got.params[leaf], sgd.params[leaf]), (
                f"{name}, {setting_id(rule, hyper)}: weights {leaf!r} {got.params[leaf]!r}, sgd {sgd.params[leaf]!r}")
    assert got.calls == expected_calls(backend, gradnorm.rules.get("sgd")), got.calls
    if got.grad_evals is not None:
        assert (got.grad_evals, got.hvp_evals) == (1, 0)


@pytest.mark.parametrize("name,rule,hyper,variant", _cells(DEFAULT, VARIANTS))
def test_dtypes(name, rule, hyper, variant):
    backend = get_backend(name)
    rec = backend.run(rule, hyper, variant=variant, seeds=SEEDS[:1], compiled=False, **identity_base(backend))[0]
    assert rec.direction_dtypes == leaf_dtypes(variant), (
        f"{name}, {setting_id(rule, hyper)} ({variant}): direction dtypes {rec.direction_dtypes} for parameters "
        f"{leaf_dtypes(variant)}"
    )


@pytest.mark.parametrize("name,rule,hyper,dtype", _cells(ADAPTER, FLOATS))
def test_zero_gradient_is_finite(name, rule, hyper, dtype):
    backend = get_backend(name)
    rec = backend.run(rule, hyper, variant=dtype, seeds=("zero",), compiled=False, **identity_base(backend))[0]
    label = f"{name}, {setting_id(rule, hyper)} ({dtype})"
    if rec.direction is not None:
        bad = {k: v for k, v in rec.direction.items() if not np.all(np.isfinite(v))}
        assert not bad, f"{label}: direction at a zero gradient {bad}"
    else:  # Keras: the weights after the step
        bad = {k: v for k, v in rec.params.items() if not np.all(np.isfinite(v))}
        assert not bad, f"{label}: weights after a step at a zero gradient {bad}"
    assert rec.finite, f"{label}: info['finite'] is false at a zero gradient"
