r"""``gradnorm.tf.diagnostics``: the flatness diagnostics of `gradnorm.diagnostics` on TensorFlow
variables and a loss closure, and a Keras callback that logs them during ``fit()``.

==========================================================  ======================================
``hessian_eigenvalues(variables, loss_fn, k=)``              top-k Hessian eigenpairs (Lanczos)
``hessian_trace(variables, loss_fn, samples=)``              Hutchinson / Hutch++ with its stderr
``spectral_density(variables, loss_fn)``                     stochastic Lanczos quadrature (eager)
``gradient_norm``, ``sam_sharpness``, ``first_order_flatness``  first-order flatness measures
``measure(variables, loss_fn, quantities=)``                 several at once, a dict of 0-d tensors
``DiagnosticsCallback(data, every=, quantities=)``           Keras callback: values in ``logs``
==========================================================  ======================================

As `gradnorm.tf.step`, ``loss_fn()`` takes no arguments and reads the variables (a Keras model's
weights, ``tf.Variable``\ s). The loss at another point is evaluated by writing that point into the
variables; afterwards they hold their original values again, bit for bit (also when a pass raises,
eagerly). Gradients come from ``tf.GradientTape``; Hessian-vector products are exact,
forward-over-reverse (a ``tf.autodiff.ForwardAccumulator`` around the tape of the gradient).

The algorithms are the core's, run on the variables seen as one flat vector (joined in the
accumulation dtype, float32 or float64), so that each vector operation of the Krylov and stochastic
loops is one TensorFlow op whatever the number of variables.

Everything but ``spectral_density`` works eagerly and inside ``tf.function``; the small tridiagonal
eigenproblem runs in TensorFlow, so nothing is read back to the host. Inside ``tf.function`` the
core's Python loops are unrolled into the graph: tracing takes time growing like ``iters**2`` (the
full reorthogonalization; several seconds for 30 Lanczos steps), paid once, after which a call is
as fast as the HVPs. Eagerly there is no tracing. The default random source is `TFProbes`
(``tf.random``'s stateless generators, seeded): deterministic given ``seed``, and inside
``tf.function`` the probes are drawn by the graph rather than stored in it as constants.
``probes=gradnorm.diagnostics.NumpyProbes(seed)`` gives the same probes as the NumPy core and the
other adapters (the same numbers, to rounding, on the same model).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from .. import diagnostics as _core
from .._compat import tensorflow as _namespace
from .._errors import describe
from .._oracle import LeafOracle
from ..diagnostics import (
    QUANTITIES,
    DensityResult,
    Diagnostics,
    EigenResult,
    FlatnessResult,
    NumpyProbes,
    Probes,
    TraceResult,
)
from ..diagnostics._curvature import check_positive_int
from ..diagnostics._probes import check_seed
from ._ops import TFOps
from ._step import VariableOracle, _check_variables, _Scaling

__all__ = [
    "QUANTITIES",
    "DensityResult",
    "DiagnosticsCallback",
    "EigenResult",
    "FlatnessResult",
    "NumpyProbes",
    "TFProbes",
    "TraceResult",
    "first_order_flatness",
    "gradient_norm",
    "hessian_eigenvalues",
    "hessian_trace",
    "measure",
    "sam_sharpness",
    "spectral_density",
]


# ------------------------------------------------------------------------------------------
# random probes


class TFProbes:
    """Probe vectors from TensorFlow's stateless random generators: draw ``i`` of the source uses the
    seed pair ``(seed, i)``, so the probes depend on `seed` only (eagerly and inside ``tf.function``,
    where they are ops of the graph, not constants). A draw is one vector for all the leaves together,
    in their accumulation dtype (float32, or float64 if a leaf is float64), cut into the leaves'
    shapes and cast to their dtypes.

    Args:
        seed: a non-negative int, or an integer 0-d tensor (e.g. a ``tf.Variable`` changed between
            calls of a ``tf.function``).
    """

    def __init__(self, seed: Any = 0):
        if isinstance(seed, (tf.Tensor, tf.Variable)):
            if seed.shape.rank != 0 or not seed.dtype.is_integer:
                raise TypeError(f"`seed` must be a non-negative int or an integer 0-d tensor. "
                                f"Received: {describe(seed)}.")
        else:
            check_seed(seed)
        self.seed = seed
        self.draws = 0

    def draw(self, kind: str, like: list[Any]) -> Any:
        """One draw (``kind`` "rademacher" or "normal") for all of `like`, as one flat vector."""
        seed = tf.stack([tf.cast(self.seed, tf.int64), tf.constant(self.draws, tf.int64)])
        self.draws += 1
        size = sum(_size(leaf) for leaf in like)
        dtype = _acc_dtype(like)
        if kind == "rademacher":
            bits = tf.random.stateless_uniform([size], seed, minval=0, maxval=2, dtype=tf.int32)
            return tf.cast(2 * bits - 1, dtype)
        return tf.random.stateless_normal([size], seed, dtype=dtype)

    def rademacher(self, like: list[Any]) -> list[Any]:
        return _cut(self.draw("rademacher", like), like)

    def normal(self, like: list[Any]) -> list[Any]:
        return _cut(self.draw("normal", like), like)


def _size(leaf: Any) -> int:
    return int(leaf.shape.num_elements())


def _acc_dtype(leaves: list[Any]) -> Any:
    return tf.float64 if any(leaf.dtype == tf.float64 for leaf in leaves) else tf.float32


def _cut(flat: Any, like: list[Any]) -> list[Any]:
    """`flat` cut into tensors shaped and typed like `like`."""
    parts = tf.split(flat, [_size(leaf) for leaf in like]) if len(like) > 1 else [flat]
    return [tf.cast(tf.reshape(part, leaf.shape), leaf.dtype) for part, leaf in zip(parts, like)]


def _join(leaves: list[Any], dtype: Any) -> Any:
    parts = [tf.reshape(tf.cast(leaf, dtype), [-1]) for leaf in leaves]
    return parts[0] if len(parts) == 1 else tf.concat(parts, 0)


# ------------------------------------------------------------------------------------------
# the TensorFlow namespace with the small dense algebra of the Lanczos step (so that it runs in the
# graph: the core falls back to NumPy for a namespace without `linalg.eigh`)


def _eye(n: int, /, n_cols: int | None = None, *, k: int = 0, dtype: Any = None, device: Any = None) -> Any:
    m = n if n_cols is None else n_cols
    dtype = dtype or tf.float32
    if k == 0:
        return tf.eye(n, m, dtype=dtype)
    return tf.linalg.diag(tf.ones([max(min(n, m - k) if k > 0 else min(n + k, m), 0)], dtype), k=k, num_rows=n,
                          num_cols=m)


def _argsort(x: Any, /, *, axis: int = -1, descending: bool = False, stable: bool = True) -> Any:
    return tf.argsort(x, axis=axis, direction="DESCENDING" if descending else "ASCENDING", stable=stable)


def _take(x: Any, indices: Any, /, *, axis: int | None = None) -> Any:
    return tf.gather(x, indices, axis=0 if axis is None else axis)


class _DenseNamespace(types.SimpleNamespace):
    """`gradnorm._compat.tensorflow` plus ``eye``, ``argsort``, ``take`` and ``linalg.eigh``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_namespace, name)


_DENSE = _DenseNamespace(eye=_eye, argsort=_argsort, take=_take, linalg=types.SimpleNamespace(eigh=tf.linalg.eigh),
                         __name__=_namespace.__name__)


class _Ops(TFOps):
    def __init__(self) -> None:
        super().__init__()
        self.xp = _DENSE


# ------------------------------------------------------------------------------------------
# the functions


def _check_probes(probes: Any, where: str) -> None:
    if isinstance(probes, str):
        raise ValueError(f"`probes` of {where} must be 'tf', 'numpy' or an object with `rademacher(like)` and "
                         f"`normal(like)` methods. Received: {describe(probes)}.")
    if not (callable(getattr(probes, "rademacher", None)) and callable(getattr(probes, "normal", None))):
        raise TypeError(
            f"`probes` of {where} must be 'tf', 'numpy' or an object with `rademacher(like)` and `normal(like)` "
            f"methods (a TFProbes, a gradnorm.diagnostics.NumpyProbes, ...). Received: {describe(probes)}."
        )


class _Raveled:
    """A `Probes` source seen through the flat vector: each draw is made like the variables (so a
    `NumpyProbes` gives the numbers it gives every other backend) and joined."""

    def __init__(self, probes: Any, like: list[Any], dtype: Any):
        self.probes, self.like, self.dtype = probes, like, dtype

    def rademacher(self, like: list[Any]) -> list[Any]:
        return [_join(self.probes.rademacher(self.like), self.dtype)]

    def normal(self, like: list[Any]) -> list[Any]:
        return [_join(self.probes.normal(self.like), self.dtype)]


class _FlatOracle(LeafOracle):
    """The `VariableOracle` seen through one flat vector (the variables' values joined in the
    accumulation dtype): the Krylov and stochastic loops then do one operation per vector operation,
    not one per variable. The flat vector of the current values stands for the oracle's view, so
    evaluations there write nothing into the variables."""

    has_hvp = True

    def __init__(self, inner: VariableOracle, base: Any, dtype: Any):
        super().__init__(_Ops())
        self.inner, self.base, self.dtype = inner, base, dtype
        self.like = inner.view

    def _point(self, flat: Any) -> list[Any]:
        return self.inner.view if flat is self.base else _cut(flat, self.like)

    def _value_and_grad(self, leaves: list[Any]) -> tuple[Any, list[Any]]:
        loss, grads = self.inner.value_and_grad(self._point(leaves[0]))
        return loss, [_join(grads, self.dtype)]

    def _value_and_grad_along(self, base: list[Any], step: Any, v: list[Any]) -> tuple[Any, list[Any]]:
        loss, grads = self.inner.value_and_grad_along(self._point(base[0]), step, _cut(v[0], self.like))
        return loss, [_join(grads, self.dtype)]

    def _hvp(self, leaves: list[Any], v: list[Any]) -> list[Any]:
        return [_join(self.inner.hvp(self._point(leaves[0]), _cut(v[0], self.like)), self.dtype)]


class _TFDiagnostics(Diagnostics):
    def _unflatten(self, leaves: list[Any]) -> Any:
        return _cut(leaves[0], self.curv.oracle.like)


def _run(variables: Any, loss_fn: Any, where: str, fn: Callable[[Diagnostics], Any], *, seed: Any = 0,
         probes: Any = None, hvp: str = "auto", fd_step: Any = None) -> Any:
    """`fn(diagnostics)` at the variables' current values; the variables are restored afterwards."""
    tvars = _check_variables(variables, "variables", floating=True)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` of {where} must be a callable `loss_fn() -> scalar tensor` that reads the "
                        f"variables. Received: {describe(loss_fn)}.")
    if hvp not in _core.HVP_METHODS:
        raise ValueError(f"`hvp` of {where} must be one of {_core.HVP_METHODS}. Received: {describe(hvp)}.")
    if probes is None or (isinstance(probes, str) and probes == "tf"):
        probes = TFProbes(seed)
    elif isinstance(probes, str) and probes == "numpy":
        probes = NumpyProbes(check_seed(seed))
    else:
        _check_probes(probes, where)
    point = [v.read_value() for v in tvars]
    acc = _acc_dtype(tvars)
    inner = VariableOracle(tvars, loss_fn, point, has_hvp=True, hvp_mode="forward_over_reverse", scaling=_Scaling(),
                           reduce=None, acc_dtype=acc, ops=TFOps())
    try:
        base = _join(point, acc)
        oracle = _FlatOracle(inner, base, acc)
        d = _TFDiagnostics(oracle, [base], None, ops=oracle.ops, hvp=hvp, fd_step=fd_step,
                           probes=_Raveled(probes, point, acc))
        return fn(d)
    finally:
        inner.restore()


_COMMON_ARGS = """
    Args:
        variables: the variables to differentiate, a list of ``tf.Variable`` or ``keras.Variable``
            (``model.trainable_variables``) of floating-point dtypes.
        loss_fn: ``loss_fn() -> scalar tensor`` reading the variables, the same batch in every call
            (deterministic: use the model in inference mode, ``model(x, training=False)``).
        seed: the seed of the probes (default 0).
        probes: ``"tf"`` (default: `TFProbes(seed)`), ``"numpy"``
            (``gradnorm.diagnostics.NumpyProbes(seed)``: the same probes as every other backend), or any
            object with ``rademacher(like)``/``normal(like)``.
        hvp: ``"auto"``/``"exact"`` (forward-over-reverse) or ``"fd"`` (central differences of the
            gradient, step ``fd_step``).
"""


@tf.autograph.experimental.do_not_convert
def hessian_eigenvalues(variables: Sequence[Any], loss_fn: Callable[[], Any], *, k: int = 1,
                        iters: int | None = None, which: str = "LA", tol: float = 1e-4, seed: Any = 0,
                        probes: Probes | str | None = None, hvp: str = "auto",
                        fd_step: float | None = None) -> EigenResult:
    """The k extreme eigenpairs of the Hessian of ``loss_fn`` with respect to ``variables`` (Lanczos
    with full reorthogonalization, ``iters`` HVPs, default ``min(P, max(2k + 20, 30))``); see
    `gradnorm.diagnostics.hessian_eigenvalues` for ``which`` and ``tol``.

    Returns:
        ``EigenResult(eigenvalues, eigenvectors, residuals, converged, iterations, method)``:
        ``eigenvectors`` is a list of k lists of tensors matching ``variables``.
    """
    return _run(variables, loss_fn, "gradnorm.tf.diagnostics.hessian_eigenvalues",
                lambda d: d.eigenvalues(k, iters=iters, which=which, tol=tol), seed=seed, probes=probes, hvp=hvp,
                fd_step=fd_step)


@tf.autograph.experimental.do_not_convert
def hessian_trace(variables: Sequence[Any], loss_fn: Callable[[], Any], *, samples: int = 100,
                  method: str = "hutchinson", seed: Any = 0, probes: Probes | str | None = None, hvp: str = "auto",
                  fd_step: float | None = None) -> TraceResult:
    """A stochastic estimate of the Hessian trace with its standard error: ``method="hutchinson"``
    (``samples`` Rademacher probes) or ``"hutch++"`` (``samples`` HVPs in all).

    Returns:
        ``TraceResult(trace, stderr, samples, matvecs, method)``.
    """
    return _run(variables, loss_fn, "gradnorm.tf.diagnostics.hessian_trace", lambda d: d.trace(samples, method=method),
                seed=seed, probes=probes, hvp=hvp, fd_step=fd_step)


@tf.autograph.experimental.do_not_convert
def spectral_density(variables: Sequence[Any], loss_fn: Callable[[], Any], *, runs: int = 1,
                     iters: int | None = None, seed: Any = 0, probes: Probes | str | None = None, hvp: str = "auto",
                     fd_step: float | None = None) -> DensityResult:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature (``runs`` Lanczos runs of
    ``iters`` steps, default ``min(P, 80)``), with NumPy nodes and weights: eager only (a
    ``RuntimeError`` inside ``tf.function``). Evaluate with ``result.density(grid, sigma)``."""
    if tf.inside_function():
        raise RuntimeError(
            "gradnorm.tf.diagnostics.spectral_density returns NumPy arrays and runs eagerly only: call it outside "
            "tf.function (the other diagnostics work inside)."
        )
    return _run(variables, loss_fn, "gradnorm.tf.diagnostics.spectral_density", lambda d: d.density(runs, iters),
                seed=seed, probes=probes, hvp=hvp, fd_step=fd_step)


@tf.autograph.experimental.do_not_convert
def gradient_norm(variables: Sequence[Any], loss_fn: Callable[[], Any]) -> Any:
    """The global L2 norm of the gradient (a 0-d tensor): one gradient evaluation."""
    return _run(variables, loss_fn, "gradnorm.tf.diagnostics.gradient_norm", lambda d: d.gradient_norm())


@tf.autograph.experimental.do_not_convert
def sam_sharpness(variables: Sequence[Any], loss_fn: Callable[[], Any], *, rho: float = 0.05) -> Any:
    """SAM's sharpness ``L(θ + ρ g/‖g‖) − L(θ)`` (a 0-d tensor): two gradient evaluations."""
    return _run(variables, loss_fn, "gradnorm.tf.diagnostics.sam_sharpness", lambda d: d.sam_sharpness(rho))


@tf.autograph.experimental.do_not_convert
def first_order_flatness(variables: Sequence[Any], loss_fn: Callable[[], Any], *, rho: float = 0.05, steps: int = 3,
                         hvp: str = "auto", fd_step: float | None = None) -> FlatnessResult:
    """GAM's first-order flatness ``ρ · max_{‖δ‖≤ρ} ‖∇L(θ+δ)‖`` from below, by ``steps`` ascent steps
    (``steps`` HVPs and ``steps + 1`` gradients); ``perturbation`` is a list of tensors."""
    return _run(variables, loss_fn, "gradnorm.tf.diagnostics.first_order_flatness",
                lambda d: d.first_order_flatness(rho, steps), hvp=hvp, fd_step=fd_step)


@tf.autograph.experimental.do_not_convert
def measure(variables: Sequence[Any], loss_fn: Callable[[], Any], *,
            quantities: Sequence[str] = ("grad_norm", "lambda_max", "trace"), rho: float = 0.05,
            iters: int | None = None, samples: int = 100, flatness_steps: int = 3, seed: Any = 0,
            probes: Probes | str | None = None, hvp: str = "auto", fd_step: float | None = None) -> dict[str, Any]:
    """Several diagnostics at once (names from ``QUANTITIES``: ``loss``, ``grad_norm``,
    ``sam_sharpness``, ``lambda_max``, ``trace``, ``first_order_flatness``), sharing the gradient at the
    current values. Returns a dict of 0-d tensors."""
    return _run(variables, loss_fn, "gradnorm.tf.diagnostics.measure",
                lambda d: d.measure(quantities, rho=rho, iters=iters, samples=samples, flatness_steps=flatness_steps),
                seed=seed, probes=probes, hvp=hvp, fd_step=fd_step)


for _fn in (hessian_eigenvalues, hessian_trace, spectral_density, measure):
    _fn.__doc__ = (_fn.__doc__ or "") + _COMMON_ARGS


# ------------------------------------------------------------------------------------------
# Keras: a callback (the class is made on first use, so that importing this module does not import Keras)


_check_quantities = _core.check_quantities


def _as_tensor(x: Any) -> Any:
    return x if x is None or isinstance(x, (tf.Tensor, tf.Variable)) else tf.convert_to_tensor(x)


def _callback_class() -> type:
    import keras

    class DiagnosticsCallback(keras.callbacks.Callback):
        r"""Measures diagnostics of the model on a fixed batch during ``fit()`` and writes them into the
        logs, so that ``History``, ``TensorBoard``, ``CSVLogger`` and the progress bar see them.

        The loss is the one ``compile`` defines (``model.compute_loss``, with the model's
        regularization losses), on ``data`` with the model in inference mode
        (``model(x, training=False)``: no dropout, BatchNorm with its moving statistics, none of
        them updated), so that it is a deterministic function of the weights. The weights are restored
        bit for bit after each measurement, and nothing else of the training state is touched (the
        probes come from stateless generators; the model's metrics are restored too), so training
        follows the same trajectory, bit for bit, with or without the callback. Works with any
        compiled Keras model, `gradnorm.tf.keras.GradnormModel` included.

        Args:
            data: the batch to measure on, ``(x, y)`` or ``(x, y, sample_weight)`` (arrays or tensors;
                keep it small: every HVP is a forward and backward pass on it).
            every: measure after every ``every``-th training batch (counted across epochs) and add the
                values to that batch's logs (``TensorBoard(update_freq=...)`` writes them as
                ``batch_<name>``); ``None`` (default): only at the end of each epoch.
            at_epoch_end: also measure at the end of each epoch, into the epoch's logs (what
                ``History`` keeps: ``history.history["diag_lambda_max"]``).
            quantities: names from ``QUANTITIES``; default ``("loss", "grad_norm", "lambda_max")``.
            prefix: prepended to each name in the logs (default ``"diag_"``, so that ``loss`` does not
                replace the training loss).
            rho, iters, samples, flatness_steps, seed, hvp, fd_step: as for `measure`. The probes
                are the same at every measurement (``seed``).

        Put it before ``TensorBoard`` in the ``callbacks`` list (callbacks see the logs in that
        order); ``History`` and the progress bar always come after it.

        Attributes:
            records: every measurement, a dict with ``epoch``, ``batch`` (the global batch count,
                ``None`` at an epoch end) and the values (Python floats).
        """

        def __init__(self, data: Any, *, every: int | None = None, at_epoch_end: bool = True,
                     quantities: Sequence[str] = ("loss", "grad_norm", "lambda_max"), prefix: str = "diag_",
                     rho: float = 0.05, iters: int | None = None, samples: int = 100, flatness_steps: int = 3,
                     seed: int = 0, hvp: str = "auto", fd_step: float | None = None):
            super().__init__()
            where = "gradnorm.tf.diagnostics.DiagnosticsCallback"
            if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
                raise TypeError(f"`data` of {where} must be a tuple `(x, y)` or `(x, y, sample_weight)`. "
                                f"Received: {describe(data)}.")
            if every is not None:
                check_positive_int("every", every)
            if not isinstance(at_epoch_end, bool):
                raise TypeError(f"`at_epoch_end` of {where} must be True or False. Received: {describe(at_epoch_end)}.")
            if every is None and not at_epoch_end:
                raise ValueError(f"{where} with `every=None` and `at_epoch_end=False` would never measure.")
            if not isinstance(prefix, str):
                raise TypeError(f"`prefix` of {where} must be a string. Received: {describe(prefix)}.")
            _core.check_measure_options(where, hvp=hvp, rho=rho, samples=samples, flatness_steps=flatness_steps,
                                        iters=iters)
            check_seed(seed)
            data = tuple(data) if len(data) == 3 else (data[0], data[1], None)
            self.data = tf.nest.map_structure(_as_tensor, data)
            self.every = every
            self.at_epoch_end = at_epoch_end
            self.quantities = _check_quantities(quantities, where)
            self.prefix = prefix
            self.options = dict(rho=rho, iters=iters, samples=samples, flatness_steps=flatness_steps, hvp=hvp,
                                fd_step=fd_step)
            self.seed = seed
            self.records: list[dict[str, Any]] = []
            self._batches = 0
            self._epoch = 0

        # -- the measurement -------------------------------------------------------------
        def _loss_fn(self) -> Callable[[], Any]:
            model = self.model
            x, y, sample_weight = self.data
            compute_loss = getattr(model, "_compute_loss", model.compute_loss)

            def loss_fn() -> Any:
                y_pred = model(x, training=False)
                return compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=False)

            return loss_fn

        def measure(self) -> dict[str, float]:
            """Measure now (the values, keyed with ``prefix``); the weights and metrics are restored."""
            model = self.model
            if model is None:
                raise RuntimeError("DiagnosticsCallback.measure needs a model: pass the callback to `fit`, or call "
                                   "`set_model(model)` first.")
            metric_vars = list(getattr(model, "metrics_variables", []))
            saved = [v.numpy() for v in metric_vars]
            try:
                values = measure(model.trainable_variables, self._loss_fn(), quantities=self.quantities,
                                 seed=self.seed, **self.options)
            finally:
                for v, x in zip(metric_vars, saved):
                    v.assign(x)
            return {self.prefix + name: float(values[name]) for name in self.quantities}

        def _record(self, logs: Any, batch: int | None) -> None:
            values = self.measure()
            self.records.append({"epoch": self._epoch, "batch": batch, **values})
            if isinstance(logs, dict):
                logs.update(values)

        # -- Keras hooks -----------------------------------------------------------------
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._epoch = epoch

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self._batches += 1
            if self.every is not None and self._batches % self.every == 0:
                self._record(logs, self._batches)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if self.at_epoch_end:
                self._record(logs, None)

    DiagnosticsCallback.__module__ = __name__
    DiagnosticsCallback.__qualname__ = "DiagnosticsCallback"
    return DiagnosticsCallback


_LAZY: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    if name == "DiagnosticsCallback":
        if name not in _LAZY:
            _LAZY[name] = _callback_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
