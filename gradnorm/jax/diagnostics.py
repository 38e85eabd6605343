r"""``gradnorm.jax.diagnostics``: the flatness diagnostics of `gradnorm.diagnostics` on a JAX loss
function, pure and jit-able, and an optax transformation that logs them during training.

==================================================  ============================================
``hessian_eigenvalues(loss_fn, params, *args, k=)``  top-k Hessian eigenpairs (Lanczos)
``hessian_trace(loss_fn, params, *args, samples=)``  Hutchinson / Hutch++ trace with its stderr
``spectral_density(loss_fn, params, *args)``         stochastic Lanczos quadrature
``gradient_norm``, ``sam_sharpness``,                first-order flatness measures
``first_order_flatness``
``measure(loss_fn, params, *args, quantities=)``     several at once, as a dict of 0-d arrays
``monitor(every, quantities=)``                      an optax transformation that measures every
                                                     ``every`` updates, inside the jitted step
==================================================  ============================================

``loss_fn(params, *args) -> loss`` (a scalar; ``(loss, aux)`` with ``has_aux=True``, the aux is
dropped). Gradients are ``jax.value_and_grad``, Hessian-vector products forward-over-reverse,
``jax.jvp(jax.grad(loss), (p,), (v,))``: exact, about the cost of two or three gradients.

Every function is pure: wrap it in ``jax.jit`` with the loss and the integer options bound
(``functools.partial(hessian_eigenvalues, loss_fn, k=3)``); ``params``, ``args`` and ``key`` may
be traced. Results are pytrees of arrays (their integer and string fields are static), so they come
out of ``jax.jit``; ``spectral_density`` is jit-able too (its nodes and weights are JAX arrays here).

How the iterations run. The parameters are seen as one flat vector (all leaves raveled into the
accumulation dtype: float32, or float64 when a leaf is float64), and with the default random source,
`JaxProbes`, the HVP loops of the Lanczos process, Hutchinson and Hutch++ are ``jax.lax.scan``
loops: the loss is traced once per loop, not once per Hessian-vector product, so compiling a
diagnostic costs about what compiling one HVP does, whatever ``iters`` or ``samples`` (on the
115-parameter test MLP, 1.7 s for 60 Lanczos steps, against 100 s for the core's loops unrolled into
the program: the full reorthogonalization makes that graph grow like ``iters**2``). They are the
algorithms of `gradnorm.diagnostics` step for step (the same breakdown handling, the same probe
draws), with the full reorthogonalization done as two products with the basis matrix; with any
other ``probes`` (e.g. ``gradnorm.diagnostics.NumpyProbes(seed)``, the same numbers on every backend)
the core's own Python loops run, unrolled under ``jax.jit`` (keep ``iters`` small there).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import diagnostics as _core
from .._errors import describe
from ..diagnostics import QUANTITIES, Diagnostics, NumpyProbes, Probes
from ..diagnostics._curvature import (
    LanczosRun,
    _eps,
    _normalize_or_zero,
    _tridiagonal_eigh,
    check_positive_int,
    top_eigenpairs,
)
from ..diagnostics._probes import check_seed
from ._common import JaxOracle, accumulation_dtype, param_leaves
from ._ops import JaxOps
from ._step import check_step_options

__all__ = [
    "QUANTITIES",
    "DensityResult",
    "EigenResult",
    "FlatnessResult",
    "JaxProbes",
    "MonitorState",
    "NumpyProbes",
    "TraceResult",
    "first_order_flatness",
    "gradient_norm",
    "hessian_eigenvalues",
    "hessian_trace",
    "measure",
    "monitor",
    "monitor_state",
    "sam_sharpness",
    "spectral_density",
]


# ------------------------------------------------------------------------------------------
# results: the core's NamedTuples, as JAX pytrees whose int and str fields are static


class EigenResult(_core.EigenResult):
    __doc__ = _core.EigenResult.__doc__
    __slots__ = ()


class TraceResult(_core.TraceResult):
    __doc__ = _core.TraceResult.__doc__
    __slots__ = ()


class DensityResult(_core.DensityResult):
    __doc__ = (_core.DensityResult.__doc__ or "") + (
        "\n    In `gradnorm.jax.diagnostics` `nodes` and `weights` are JAX arrays (float32, or float64 with\n"
        "    float64 parameters), so that the density is jit-able; `density()` and `trace` read them eagerly.\n"
    )
    __slots__ = ()


class FlatnessResult(_core.FlatnessResult):
    __doc__ = _core.FlatnessResult.__doc__
    __slots__ = ()


def _register(cls: type, dynamic: tuple[str, ...], static: tuple[str, ...]) -> None:
    fields = cls._fields  # type: ignore[attr-defined]
    assert set(dynamic) | set(static) == set(fields)

    def flatten(r: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return tuple(getattr(r, f) for f in dynamic), tuple(getattr(r, f) for f in static)

    def unflatten(aux: tuple[Any, ...], children: Any) -> Any:
        values = dict(zip(dynamic, children))
        values.update(zip(static, aux))
        return cls(**values)

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)


_register(EigenResult, ("eigenvalues", "eigenvectors", "residuals", "converged"), ("iterations", "method"))
_register(TraceResult, ("trace", "stderr", "samples"), ("matvecs", "method"))
_register(DensityResult, ("nodes", "weights"), ("size",))
_register(FlatnessResult, ("flatness", "grad_norms", "perturbation"), ("method",))


# ------------------------------------------------------------------------------------------
# random probes


class JaxProbes:
    """Probe vectors from ``jax.random``: deterministic given the key, drawn on the device (under
    ``jax.jit`` the key is an input, so the probes are not constants of the program).

    Each draw splits the key once (``key, subkey = jax.random.split(key)``, the first part kept in
    ``self.key`` for the next draw) and draws one vector for all the leaves together, in their
    accumulation dtype (float32, or float64 if a leaf is float64), cut into the leaves' shapes and
    cast to their dtypes: one random-number kernel per draw however many leaves the model has.

    Args:
        key: a PRNG key (``jax.random.key(0)`` or a raw ``jax.random.PRNGKey``), or a seed (an int
            or an integer 0-d array, possibly traced) to make one with ``jax.random.key``.
    """

    def __init__(self, key: Any = 0):
        self.key = _as_key(key, "key")

    def draw(self, kind: str, like: list[Any]) -> Any:
        """One draw (``kind`` "rademacher" or "normal") for all of `like` as one flat vector in their
        accumulation dtype (what `rademacher` and `normal` cut into leaves)."""
        self.key, sub = jax.random.split(self.key)
        size = sum(math.prod(tuple(leaf.shape)) for leaf in like)
        dtype = accumulation_dtype(like)
        if kind == "rademacher":
            return jax.random.rademacher(sub, (size,), dtype=dtype)
        return jax.random.normal(sub, (size,), dtype=dtype)

    @staticmethod
    def _cut(flat: Any, like: list[Any]) -> list[Any]:
        out, start = [], 0
        for leaf in like:
            size = math.prod(tuple(leaf.shape))
            out.append(jnp.reshape(flat[start:start + size], tuple(leaf.shape)).astype(leaf.dtype))
            start += size
        return out

    def rademacher(self, like: list[Any]) -> list[Any]:
        return self._cut(self.draw("rademacher", like), like)

    def normal(self, like: list[Any]) -> list[Any]:
        return self._cut(self.draw("normal", like), like)


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return True
    return dtype == jnp.uint32 and tuple(getattr(x, "shape", ())) == (2,)  # a raw jax.random.PRNGKey


def _as_key(key: Any, argument: str) -> Any:
    if _is_key(key):
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        return jax.random.key(check_seed(key))
    dtype = getattr(key, "dtype", None)
    if dtype is not None and tuple(getattr(key, "shape", (1,))) == () and jnp.issubdtype(dtype, jnp.integer):
        return jax.random.key(key)
    raise TypeError(
        f"`{argument}` must be a PRNG key (`jax.random.key(0)`, or a raw `jax.random.PRNGKey(0)`) or a "
        f"non-negative int seed. Received: {describe(key)}."
    )


class _Raveled:
    """A `Probes` source seen through the flat parameter vector: each draw is made like the original
    leaves (so a `NumpyProbes` gives the numbers it gives every other backend) and raveled."""

    def __init__(self, probes: Any, like: list[Any], ravel: Callable[[list[Any]], Any]):
        self.probes = probes
        self.like = like
        self.ravel = ravel

    def rademacher(self, like: list[Any]) -> list[Any]:
        return [self.ravel(self.probes.rademacher(self.like))]

    def normal(self, like: list[Any]) -> list[Any]:
        return [self.ravel(self.probes.normal(self.like))]


# ------------------------------------------------------------------------------------------
# the flat parameter vector


class _Flat:
    """The parameters as one vector in the accumulation dtype, and back."""

    def __init__(self, leaves: list[Any], treedef: Any):
        self.leaves = leaves
        self.treedef = treedef
        self.dtype = accumulation_dtype(leaves)
        self.shapes = [tuple(leaf.shape) for leaf in leaves]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.dtypes = [leaf.dtype for leaf in leaves]

    def ravel(self, leaves: list[Any]) -> Any:
        parts = [jnp.ravel(x).astype(self.dtype) for x in leaves]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    def unravel_leaves(self, flat: Any) -> list[Any]:
        out, start = [], 0
        for shape, size, dtype in zip(self.shapes, self.sizes, self.dtypes):
            out.append(jnp.reshape(flat[start:start + size], shape).astype(dtype))
            start += size
        return out

    def unravel(self, flat: Any) -> Any:
        return self.treedef.unflatten(self.unravel_leaves(flat))


# ------------------------------------------------------------------------------------------
# the diagnostics on the flat vector, with lax loops for the HVP iterations


class _Dense:
    """What `top_eigenpairs` reads of a `Curvature`, for a jitted selection outside one."""

    def __init__(self, dtype: Any):
        self.xp = jnp
        self.ops = JaxOps()
        self.dtype = dtype

    def tiny(self) -> Any:
        return jnp.asarray(1e-300 if self.dtype == jnp.float64 else 1e-30, dtype=self.dtype)


@functools.partial(jax.jit, static_argnames=("k", "which", "tol"))
def _select(alphas: Any, betas: Any, basis: Any, *, k: int, which: str, tol: float) -> tuple[Any, Any, Any, Any]:
    """The core's `top_eigenpairs` on a Lanczos run given as arrays; the Ritz vectors as a (k, P) array.
    Jitted (and cached across calls): eagerly, its many small indexing ops would each be compiled."""
    m = alphas.shape[0]
    run = LanczosRun([alphas[i] for i in range(m)], [betas[i] for i in range(m)], [[basis[i]] for i in range(m)])
    values, vectors, residuals, converged = top_eigenpairs(_Dense(basis.dtype), run, k, which, tol)
    return values, jnp.stack([v[0] for v in vectors]), residuals, converged


@jax.jit
def _quadrature(alphas: Any, betas: Any) -> tuple[Any, Any]:
    """Gauss quadrature of one Lanczos run (the core's `slq`): nodes and weights."""
    m = alphas.shape[0]
    values, vectors, _ = _tridiagonal_eigh(jnp, [alphas[i] for i in range(m)], [betas[i] for i in range(m - 1)])
    return values, vectors[0, :] ** 2


class _JaxDiagnostics(Diagnostics):
    def __init__(self, oracle: JaxOracle, flat: _Flat, point: Any, *, probes: Any, hvp: str, fd_step: Any):
        self.flat = flat
        self.jax_probes = probes if isinstance(probes, JaxProbes) else None
        source = _Raveled(probes, flat.leaves, flat.ravel)
        super().__init__(oracle, [point], None, ops=oracle.ops, hvp=hvp, fd_step=fd_step, probes=source)

    def _unflatten(self, leaves: list[Any]) -> Any:
        return self.flat.unravel(leaves[0])

    # -- helpers of the loops --------------------------------------------------------------
    def _draw(self, key: Any, kind: str) -> tuple[Any, Any]:
        """One draw of `JaxProbes(key)` like the parameters, raveled; returns (vector, next key)."""
        probes = JaxProbes(key)
        vector = probes.draw(kind, self.flat.leaves)
        if any(dtype != self.flat.dtype for dtype in self.flat.dtypes):  # as the leaves hold it
            vector = self.flat.ravel(self.flat.unravel_leaves(vector))
        return vector, probes.key

    def _matvec(self, v: Any) -> Any:
        return self.curv.matvec([v])[0]

    def _vdot(self, a: Any, b: Any) -> Any:
        return self.curv.ops.vdot([a], [b])

    @staticmethod
    def _orthogonalize(w: Any, basis: Any) -> Any:
        """`w` minus its components along the rows of `basis` (orthonormal rows, or zero rows), twice."""
        for _ in range(2):
            w = w - jnp.matmul(jnp.matmul(basis, w, precision="highest"), basis, precision="highest")
        return w

    def _normalize(self, w: Any, threshold: Any) -> tuple[Any, Any]:
        (q,), norm = _normalize_or_zero(self.curv, [w], threshold)
        return q, norm

    def _lanczos(self, start: Any, iters: int, key: Any) -> tuple[Any, Any, Any, Any]:
        """The core's `lanczos` (full reorthogonalization, a fresh random vector at a breakdown) as a
        ``lax.scan`` over the steps. Returns (alphas, betas, basis matrix, next key): the core's
        `LanczosRun` as arrays."""
        curv = self.curv
        dtype = curv.dtype
        root_eps = math.sqrt(_eps(jnp, dtype))
        q0, _ = self._normalize(start, curv.tiny())
        basis = jnp.zeros((iters, q0.shape[0]), dtype).at[0].set(q0)

        def body(carry: Any, j: Any) -> Any:
            q, basis, scale, key = carry
            w = self._matvec(q)
            alpha = self._vdot(q, w)
            w = self._orthogonalize(w, basis)
            scale = jnp.maximum(scale, jnp.abs(alpha))
            threshold = root_eps * scale
            q_next, residual = self._normalize(w, threshold)
            broke = residual <= threshold
            # a fresh vector for a breakdown (the last step draws one too, unused: the core draws none
            # there, so the key handed on is the one the last step started with)
            fresh, next_key = self._draw(key, "normal")
            fresh, _ = self._normalize(self._orthogonalize(fresh, basis), curv.tiny())
            q = jnp.where(broke, fresh, q_next)
            beta = jnp.where(broke, jnp.zeros_like(residual), residual)
            scale = jnp.maximum(scale, beta)
            basis = basis.at[j + 1].set(q, mode="drop")
            return (q, basis, scale, next_key), (alpha, beta, residual, key)

        carry = (q0, basis, jnp.zeros((), dtype), key)
        (_, basis, _, _), (alphas, betas, residuals, keys) = jax.lax.scan(body, carry, jnp.arange(iters))
        # the last beta is the residual norm (for the Ritz residuals), as in the core
        return alphas, jnp.concatenate([betas[:-1], residuals[-1:]]), basis, keys[-1]

    def _quadratic_forms(self, key: Any, n: int, basis: Any = None) -> tuple[Any, Any]:
        """`z^T H z` for `n` Rademacher probes (projected off the rows of `basis` if given), as a scan."""

        def body(key: Any, _: Any) -> Any:
            z, key = self._draw(key, "rademacher")
            if basis is not None:
                z = self._orthogonalize(z, basis)
            return key, self._vdot(z, self._matvec(z))

        key, terms = jax.lax.scan(body, key, None, length=n)
        return terms, key

    @staticmethod
    def _mean_and_stderr(terms: Any) -> tuple[Any, Any]:
        n = terms.shape[0]
        mean = jnp.sum(terms) / n
        if n < 2:
            return mean, jnp.asarray(float("nan"), dtype=mean.dtype)
        var = jnp.sum((terms - mean) ** 2) / (n - 1)
        return mean, jnp.sqrt(var / n)

    # -- the diagnostics (validation as the core's) ----------------------------------------
    def eigenvalues(self, k: int = 1, *, iters: int | None = None, which: str = "LA", tol: float = 1e-4) -> Any:
        if self.jax_probes is None:
            return EigenResult(*super().eigenvalues(k, iters=iters, which=which, tol=tol))
        check_positive_int("k", k)
        if k > self.size:
            raise ValueError(f"`k` must be at most the number of parameters ({self.size}). Received: {k}.")
        if which not in _core.WHICH:
            raise ValueError(f"`which` must be one of {_core.WHICH}. Received: {describe(which)}.")
        if iters is None:
            iters = min(self.size, max(2 * k + 20, 30))
        check_positive_int("iters", iters, k)
        if iters > self.size:
            raise ValueError(f"`iters` must be at most the number of parameters ({self.size}). Received: {iters}.")
        start, key = self._draw(self.jax_probes.key, "normal")
        alphas, betas, basis, self.jax_probes.key = self._lanczos(start, iters, key)
        values, vectors, residuals, converged = _select(alphas, betas, basis, k=k, which=which, tol=tol)
        return EigenResult(values, [self.flat.unravel(vectors[i]) for i in range(k)], residuals, converged, iters,
                           self.curv.method)

    def trace(self, samples: int = 100, *, method: str = "hutchinson") -> Any:
        if self.jax_probes is None:
            return TraceResult(*super().trace(samples, method=method))
        if method not in _core.TRACE_METHODS:
            raise ValueError(f"`method` must be one of {_core.TRACE_METHODS}. Received: {describe(method)}.")
        key = self.jax_probes.key
        if method == "hutchinson":
            check_positive_int("samples", samples)
            terms, key = self._quadratic_forms(key, samples)
            self.jax_probes.key = key
            mean, stderr = self._mean_and_stderr(terms)
            return TraceResult(mean, stderr, terms, samples, "hutchinson")
        check_positive_int("samples", samples, 3)
        return self._hutch_plus_plus(samples)

    def _hutch_plus_plus(self, matvecs: int) -> Any:
        """The core's `hutch_plus_plus` with scans: sketch, orthonormalize, exact part, residual probes."""
        dtype = self.curv.dtype
        root_eps = math.sqrt(_eps(jnp, dtype))
        n_sketch = matvecs // 3
        n_probe = matvecs - 2 * n_sketch

        def sketch(key: Any, _: Any) -> Any:
            z, key = self._draw(key, "rademacher")
            return key, self._matvec(z)

        key, sketches = jax.lax.scan(sketch, self.jax_probes.key, None, length=n_sketch)

        def orthonormalize(basis: Any, item: Any) -> Any:
            i, w = item
            reference = self.curv.ops.norm([w])
            q, _ = self._normalize(self._orthogonalize(w, basis), root_eps * reference)
            return basis.at[i].set(q), None

        basis, _ = jax.lax.scan(orthonormalize, jnp.zeros_like(sketches), (jnp.arange(n_sketch), sketches))

        def exact(total: Any, q: Any) -> Any:
            return total + self._vdot(q, self._matvec(q)), None

        exact_part, _ = jax.lax.scan(exact, jnp.zeros((), dtype), basis)
        terms, key = self._quadratic_forms(key, n_probe, basis)
        self.jax_probes.key = key
        mean, stderr = self._mean_and_stderr(terms)
        return TraceResult(exact_part + mean, stderr, terms, matvecs, "hutch++")

    def density(self, runs: int = 1, iters: int | None = None) -> Any:
        check_positive_int("runs", runs)
        iters = min(self.size, 80) if iters is None else iters
        check_positive_int("iters", iters)
        if iters > self.size:
            raise ValueError(f"`iters` must be at most the number of parameters ({self.size}). Received: {iters}.")
        if self.jax_probes is None:
            nodes, weights = [], []
            for _ in range(runs):  # the core's slq, kept in JAX arrays
                run = _core.lanczos(self.curv, self.probes.rademacher(self.curv.leaves), iters, self.probes)
                n, w = _quadrature(jnp.stack(run.alphas), jnp.stack(run.betas))
                nodes.append(n)
                weights.append(w)
            return DensityResult(jnp.stack(nodes), jnp.stack(weights), self.size)

        def one(key: Any, _: Any) -> Any:
            start, key = self._draw(key, "rademacher")
            alphas, betas, _, key = self._lanczos(start, iters, key)
            return key, _quadrature(alphas, betas)

        key, (nodes, weights) = jax.lax.scan(one, self.jax_probes.key, None, length=runs)
        self.jax_probes.key = key
        return DensityResult(nodes, weights, self.size)

    def first_order_flatness(self, rho: float = 0.05, steps: int = 3) -> Any:
        return FlatnessResult(*super().first_order_flatness(rho, steps))


# ------------------------------------------------------------------------------------------
# the public functions


def _check_static(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, jax.core.Tracer):
            raise TypeError(
                f"`{name}` must be a Python int, static under jax.jit: bind it with functools.partial (or list it "
                f"in static_argnames). Received a traced value: {describe(value)}."
            )


def _probes(probes: Any, key: Any, seed: Any, where: str) -> Any:
    """The random source: `JaxProbes` of `key` or `seed` (default), `NumpyProbes(seed)` for
    ``probes="numpy"``, or the object given."""
    if probes is None or isinstance(probes, str):
        if probes not in (None, "jax", "numpy"):
            raise ValueError(f"`probes` of {where} must be 'jax', 'numpy' or an object with `rademacher(like)` and "
                             f"`normal(like)` methods. Received: {describe(probes)}.")
        if key is not None and seed is not None:
            raise TypeError(f"{where}: pass at most one of `key` and `seed`.")
        if probes == "numpy":
            if key is not None:
                raise TypeError(f"{where}: `key` is the key of JaxProbes; with probes='numpy' pass `seed`.")
            return NumpyProbes(check_seed(0 if seed is None else seed))
        if key is not None:
            return JaxProbes(_as_key(key, "key"))
        return JaxProbes(_as_key(0 if seed is None else seed, "seed"))
    if key is not None or seed is not None:
        raise TypeError(f"{where}: `key` and `seed` are for the default probes; the `probes` object given draws "
                        f"on its own. Pass one or the other.")
    if not (callable(getattr(probes, "rademacher", None)) and callable(getattr(probes, "normal", None))):
        raise TypeError(
            f"`probes` of {where} must be 'jax', 'numpy' or an object with `rademacher(like)` and `normal(like)` "
            f"methods (a JaxProbes, a gradnorm.diagnostics.NumpyProbes, ...). Received: {describe(probes)}."
        )
    return probes


def _setup(loss_fn: Any, params: Any, args: tuple[Any, ...], *, has_aux: bool, key: Any, seed: Any, probes: Any,
           hvp: str, fd_step: Any, where: str) -> _JaxDiagnostics:
    check_step_options(loss_fn, has_aux, False, None, "local", where)
    if hvp not in _core.HVP_METHODS:
        raise ValueError(f"`hvp` of {where} must be one of {_core.HVP_METHODS}. Received: {describe(hvp)}.")
    probes = _probes(probes, key, seed, where)
    leaves, treedef = param_leaves(params)
    flat = _Flat(leaves, treedef)
    oracle = JaxOracle(lambda f, i: loss_fn(flat.unravel(f), *args), jax.tree_util.tree_structure(0.0),
                       has_aux=has_aux)
    return _JaxDiagnostics(oracle, flat, flat.ravel(leaves), probes=probes, hvp=hvp, fd_step=fd_step)


_COMMON_ARGS = """
    Args:
        loss_fn: ``loss_fn(params, *args) -> loss``, a scalar (``(loss, aux)`` with ``has_aux``).
        params: any JAX pytree of real floating-point arrays.
        *args: the batch and whatever else ``loss_fn`` takes, the same in every evaluation.
        key: a PRNG key for the probes (may be traced); or ``seed``: an int (default 0).
        probes: ``"jax"`` (default: `JaxProbes` of ``key`` or ``seed``), ``"numpy"``
            (``gradnorm.diagnostics.NumpyProbes(seed)``: the same probes as every other backend), or
            any object with ``rademacher(like)``/``normal(like)``.
        has_aux: ``loss_fn`` returns ``(loss, aux)``.
        hvp: ``"auto"``/``"exact"`` (forward-over-reverse) or ``"fd"`` (central differences of the
            gradient, step ``fd_step``).
"""


def hessian_eigenvalues(loss_fn: Callable[..., Any], params: Any, *args: Any, k: int = 1, iters: int | None = None,
                        which: str = "LA", tol: float = 1e-4, key: Any = None, seed: int | None = None,
                        probes: Probes | str | None = None, has_aux: bool = False, hvp: str = "auto",
                        fd_step: float | None = None) -> EigenResult:
    """The k extreme eigenpairs of the Hessian of ``loss_fn`` at ``params`` (Lanczos with full
    reorthogonalization, ``iters`` HVPs, default ``min(P, max(2k + 20, 30))``); see
    `gradnorm.diagnostics.hessian_eigenvalues` for ``which`` and ``tol``.

    Returns:
        ``EigenResult(eigenvalues, eigenvectors, residuals, converged, iterations, method)``, a pytree:
        ``eigenvectors`` is a list of k trees like ``params``.
    """
    _check_static(k=k, iters=iters)
    d = _setup(loss_fn, params, args, has_aux=has_aux, key=key, seed=seed, probes=probes, hvp=hvp, fd_step=fd_step,
               where="gradnorm.jax.diagnostics.hessian_eigenvalues")
    return d.eigenvalues(k, iters=iters, which=which, tol=tol)


def hessian_trace(loss_fn: Callable[..., Any], params: Any, *args: Any, samples: int = 100,
                  method: str = "hutchinson", key: Any = None, seed: int | None = None,
                  probes: Probes | str | None = None, has_aux: bool = False, hvp: str = "auto",
                  fd_step: float | None = None) -> TraceResult:
    """A stochastic estimate of the Hessian trace with its standard error: ``method="hutchinson"``
    (``samples`` Rademacher probes) or ``"hutch++"`` (``samples`` HVPs in all).

    Returns:
        ``TraceResult(trace, stderr, samples, matvecs, method)``, a pytree.
    """
    _check_static(samples=samples)
    d = _setup(loss_fn, params, args, has_aux=has_aux, key=key, seed=seed, probes=probes, hvp=hvp, fd_step=fd_step,
               where="gradnorm.jax.diagnostics.hessian_trace")
    return d.trace(samples, method=method)


def spectral_density(loss_fn: Callable[..., Any], params: Any, *args: Any, runs: int = 1, iters: int | None = None,
                     key: Any = None, seed: int | None = None, probes: Probes | str | None = None,
                     has_aux: bool = False, hvp: str = "auto", fd_step: float | None = None) -> DensityResult:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature: ``runs`` Lanczos runs of
    ``iters`` steps (default ``min(P, 80)``). Jit-able here: ``nodes`` and ``weights`` are JAX arrays
    of shape (runs, iters); evaluate with ``result.density(grid, sigma)`` (eagerly)."""
    _check_static(runs=runs, iters=iters)
    d = _setup(loss_fn, params, args, has_aux=has_aux, key=key, seed=seed, probes=probes, hvp=hvp, fd_step=fd_step,
               where="gradnorm.jax.diagnostics.spectral_density")
    return d.density(runs, iters)


def gradient_norm(loss_fn: Callable[..., Any], params: Any, *args: Any, has_aux: bool = False) -> Any:
    """The global L2 norm of the gradient (a 0-d array): one gradient evaluation."""
    d = _setup(loss_fn, params, args, has_aux=has_aux, key=None, seed=None, probes=None, hvp="auto", fd_step=None,
               where="gradnorm.jax.diagnostics.gradient_norm")
    return d.gradient_norm()


def sam_sharpness(loss_fn: Callable[..., Any], params: Any, *args: Any, rho: float = 0.05,
                  has_aux: bool = False) -> Any:
    """SAM's sharpness ``L(θ + ρ g/‖g‖) − L(θ)`` (a 0-d array): two gradient evaluations."""
    d = _setup(loss_fn, params, args, has_aux=has_aux, key=None, seed=None, probes=None, hvp="auto", fd_step=None,
               where="gradnorm.jax.diagnostics.sam_sharpness")
    return d.sam_sharpness(rho)


def first_order_flatness(loss_fn: Callable[..., Any], params: Any, *args: Any, rho: float = 0.05, steps: int = 3,
                         has_aux: bool = False, hvp: str = "auto", fd_step: float | None = None) -> FlatnessResult:
    """GAM's first-order flatness ``ρ · max_{‖δ‖≤ρ} ‖∇L(θ+δ)‖`` from below, by ``steps`` ascent steps
    (``steps`` HVPs and ``steps + 1`` gradients). Returns ``FlatnessResult`` (a pytree)."""
    _check_static(steps=steps)
    d = _setup(loss_fn, params, args, has_aux=has_aux, key=None, seed=None, probes=None, hvp=hvp, fd_step=fd_step,
               where="gradnorm.jax.diagnostics.first_order_flatness")
    return d.first_order_flatness(rho, steps)


def measure(loss_fn: Callable[..., Any], params: Any, *args: Any,
            quantities: Sequence[str] = ("grad_norm", "lambda_max", "trace"), rho: float = 0.05,
            iters: int | None = None, samples: int = 100, flatness_steps: int = 3, key: Any = None,
            seed: int | None = None, probes: Probes | str | None = None, has_aux: bool = False, hvp: str = "auto",
            fd_step: float | None = None) -> dict[str, Any]:
    """Several diagnostics at once (names from ``QUANTITIES``: ``loss``, ``grad_norm``,
    ``sam_sharpness``, ``lambda_max``, ``trace``, ``first_order_flatness``), sharing the gradient at
    ``params``. Returns a dict of 0-d arrays (a pytree)."""
    _check_static(iters=iters, samples=samples, flatness_steps=flatness_steps)
    d = _setup(loss_fn, params, args, has_aux=has_aux, key=key, seed=seed, probes=probes, hvp=hvp, fd_step=fd_step,
               where="gradnorm.jax.diagnostics.measure")
    return d.measure(quantities, rho=rho, iters=iters, samples=samples, flatness_steps=flatness_steps)


for _fn in (hessian_eigenvalues, hessian_trace, spectral_density, measure):
    _fn.__doc__ = (_fn.__doc__ or "") + _COMMON_ARGS


# ------------------------------------------------------------------------------------------
# logging during training: an optax transformation


class MonitorState(NamedTuple):
    """State of `monitor`.

    Attributes:
        count: int32, the updates seen so far.
        measured_at: int32, the ``count`` of the update at which ``diagnostics`` were measured
            (the parameters passed to that update); -1 before the first measurement.
        diagnostics: dict name -> 0-d array (float32, float64 with float64 parameters): the values
            of the last measurement, NaN before the first.
    """

    count: Any
    measured_at: Any
    diagnostics: dict[str, Any]


_check_quantities = _core.check_quantities


def monitor(every: int, quantities: Sequence[str] = ("loss", "grad_norm", "lambda_max"), *, has_aux: bool = False,
            rho: float = 0.05, iters: int | None = None, samples: int = 100, flatness_steps: int = 3,
            key: Any = None, seed: int | None = None, hvp: str = "auto") -> optax.GradientTransformationExtraArgs:
    r"""An optax transformation that measures diagnostics every ``every`` updates, inside the jitted
    train step, and keeps the last values in its state. It passes the updates through unchanged, so
    the trajectory is the same, bit for bit, with or without it.

    ``update(updates, state, params, *, loss_fn, **extra_args)`` takes ``loss_fn(params) -> loss``
    (or ``(loss, aux)`` with ``has_aux=True``) on the current batch through optax's extra arguments,
    as `gradnorm.jax.transform` does: in a chain with it, or with any optimizer, the same ``loss_fn=``
    serves both. At updates 0, ``every``, ``2 every``, ... it evaluates `measure` at ``params`` (the
    parameters before that update) with ``jax.lax.cond``, so the other updates run none of it (under
    ``vmap`` ``cond`` becomes a select and both branches run).

    A measurement costs one gradient plus, for ``lambda_max``, ``iters`` HVPs (default 30), for
    ``trace`` ``samples`` HVPs, for ``sam_sharpness`` one gradient, for ``first_order_flatness``
    ``flatness_steps`` HVPs and as many gradients; an HVP costs about two to three gradients. Choose
    ``every`` so that this is small against ``every`` training steps (``lambda_max`` with
    ``iters=20`` every 500 steps adds about 10 % to plain SGD). The probes are the same at every
    measurement (``key``/``seed``), so that differences between measurements are not probe noise.

    Read the values from the optimizer state: ``optax.tree_utils.tree_get(opt_state, "diagnostics")``
    or `monitor_state` ``(opt_state)``.

    Example::

        tx = optax.chain(gradnorm.jax.diagnostics.monitor(every=100), optax.adam(1e-3))
        # or inside a rule: gradnorm.jax.transform(optax.chain(monitor(100), optax.sgd(0.1)), rule="sam")
        updates, opt_state = tx.update(grads, opt_state, params, loss_fn=lambda p: loss_fn(p, x, y))
    """
    where = "gradnorm.jax.diagnostics.monitor"
    check_positive_int("every", every)
    names = _check_quantities(quantities, where)
    if not isinstance(has_aux, bool):
        raise TypeError(f"`has_aux` of {where} must be True or False. Received: {describe(has_aux)}.")
    _core.check_measure_options(where, hvp=hvp, rho=rho, samples=samples, flatness_steps=flatness_steps,
                                iters=iters)
    if key is not None and seed is not None:
        raise TypeError(f"{where}: pass at most one of `key` and `seed`.")
    if key is None:
        check_seed(0 if seed is None else seed)
    else:
        _as_key(key, "key")

    def init_fn(params: Any) -> MonitorState:
        leaves, _ = param_leaves(params)
        acc = accumulation_dtype(leaves)
        return MonitorState(jnp.zeros((), jnp.int32), jnp.full((), -1, jnp.int32),
                            {name: jnp.full((), jnp.nan, acc) for name in names})

    def update_fn(updates: Any, state: MonitorState, params: Any = None, *,
                  loss_fn: Callable[[Any], Any] | None = None, **extra_args: Any) -> tuple[Any, MonitorState]:
        if not isinstance(state, MonitorState):
            raise TypeError(f"`state` of {where}'s update must be the MonitorState from `init` or the previous "
                            f"update. Received: {describe(state)}.")
        if params is None:
            raise TypeError(f"{where} needs `params` in `update(updates, state, params, loss_fn=...)`: it measures "
                            f"at the current parameters.")
        if loss_fn is None or not callable(loss_fn):
            raise TypeError(f"{where} needs `loss_fn=lambda p: loss(p, batch)` (the loss on the current batch) in "
                            f"`update`, as an optax extra argument. Received: loss_fn={describe(loss_fn)}.")
        acc = accumulation_dtype(param_leaves(params)[0])
        probe_key = _as_key(0 if key is None and seed is None else (key if key is not None else seed), "key")

        def measured() -> dict[str, Any]:
            values = measure(loss_fn, params, quantities=names, rho=rho, iters=iters, samples=samples,
                             flatness_steps=flatness_steps, key=probe_key, has_aux=has_aux, hvp=hvp)
            return {name: jnp.asarray(values[name]).astype(acc) for name in names}

        now = state.count % every == 0
        values = jax.lax.cond(now, measured, lambda: state.diagnostics)
        measured_at = jnp.where(now, state.count, state.measured_at)
        return updates, MonitorState(state.count + 1, measured_at, values)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def monitor_state(opt_state: Any) -> MonitorState:
    """The `MonitorState` inside an optimizer state (a chain, `gradnorm.jax.transform`'s state, ...);
    a ``ValueError`` if there is none or more than one."""
    found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, MonitorState))
             if isinstance(x, MonitorState)]
    if len(found) != 1:
        raise ValueError(f"The optimizer state must hold exactly one gradnorm.jax.diagnostics.monitor state. "
                         f"Found {len(found)}.")
    return found[0]
