"""The rule protocol: hyperparameter specs, validation and the update template.

A rule is an immutable object holding its hyperparameters, with two pure functions in the
spirit of optax's `GradientTransformation`:

* `init(params) -> state`
* `update(params, state, oracle) -> (direction, state, info)`

`direction` has the tree structure of `params`; the user's base optimizer (SGD, momentum,
Adam, ...) applies it. Rules are written against the Python Array API through
`gradnorm._tree.ArrayOps`, never against a framework, never mutate an input, and are
traceable: no Python `if` on array values and no `float()` of an array, so the same code
runs eagerly, under `jax.jit` and under `tf.function` without a device-to-host copy.
Python branches on *hyperparameters* that are Python numbers are allowed (they are static):
for example a rule whose strength is the number `0.0` returns the gradient without spending
the extra evaluations.

Writing a new rule means subclassing `Rule`, declaring `name`, `hyperparameters`
and implementing `Rule.compute_direction` on flat lists of leaves (see the built-in rules and
docs/writing-a-rule.md).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import array_api_compat

from .. import _tree
from .._errors import HyperparameterError, MissingHVPError, ParamsError, describe
from .._oracle import LeafOracle, Oracle, TreeOracle, check_loss, check_tree

__all__ = ["Rule", "Hyperparameter", "EmptyState", "REQUIRED", "NORM_EPS_DEFAULT"]

NORM_EPS_DEFAULT = 1e-12


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class EmptyState(NamedTuple):
    """State of a rule that keeps none."""


# --------------------------------------------------------------------------------------
# hyperparameter validators: each takes (rule name, argument name, value) and returns the
# normalised value or raises HyperparameterError naming the argument, the expectation and
# what was received.


def _is_scalar_array(value: Any) -> bool:
    """A 0-d array of a real floating dtype."""
    if not _tree.is_array(value) or tuple(getattr(value, "shape", (1,))) != ():
        return False
    return bool(_tree.array_namespace(value).isdtype(value.dtype, "real floating"))


def _fail(rule: str, name: str, expectation: str, value: Any) -> HyperparameterError:
    return HyperparameterError(f"`{name}` of rule '{rule}' must be {expectation}. Received: {describe(value)}.")


def real(lo: float | None = None, *, lo_open: bool = False, hi: float | None = None) -> Callable[[str, str, Any], Any]:
    """A finite real number in `[lo, hi]` (`(lo, hi]` with `lo_open`).

    A 0-d array is accepted too (for schedules and traced values); its value is not checked,
    because reading it would force a device-to-host copy.
    """
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    expectation = "a finite number" + (" " + " and ".join(parts) if parts else "")

    def check(rule: str, name: str, value: Any) -> Any:
        # Python and NumPy scalars (numbers.Real) are static: range-checked, and a zero
        # strength takes the exact shortcut. 0-d arrays are dynamic.
        if isinstance(value, bool):
            raise _fail(rule, name, expectation, value)
        if not isinstance(value, numbers.Real):
            if _is_scalar_array(value):
                return value
            raise _fail(rule, name, expectation + " (or a 0-d floating-point array)", value)
        value = float(value)
        bad = not math.isfinite(value)
        bad = bad or (lo is not None and (value <= lo if lo_open else value < lo))
        bad = bad or (hi is not None and value > hi)
        if bad:
            raise _fail(rule, name, expectation, value)
        return value

    check.expectation = expectation  # type: ignore[attr-defined]
    return check


def choice(*options: str) -> Callable[[str, str, Any], Any]:
    expectation = "one of " + ", ".join(repr(o) for o in options)

    def check(rule: str, name: str, value: Any) -> Any:
        if not isinstance(value, str) or value not in options:
            raise _fail(rule, name, expectation, value)
        return value

    check.expectation = expectation  # type: ignore[attr-defined]
    return check


def flag() -> Callable[[str, str, Any], Any]:
    def check(rule: str, name: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise _fail(rule, name, "True or False", value)
        return value

    check.expectation = "True or False"  # type: ignore[attr-defined]
    return check


def integer(lo: int = 0) -> Callable[[str, str, Any], Any]:
    """An integer `>= lo`: a Python int or any `numbers.Integral` (a NumPy integer), normalised to
    a Python int. A bool is not an integer here."""
    expectation = f"an integer >= {lo}"

    def check(rule: str, name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
            raise _fail(rule, name, expectation, value)
        return int(value)

    check.expectation = expectation  # type: ignore[attr-defined]
    return check


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of a rule: its name, validator, default and meaning.

    `leafwise`: the rule's math uses the value only as a coefficient of leafwise operations, so
    it may differ between parameters: a `gradnorm.PerLeaf` value (one per leaf, for example
    one per PyTorch parameter group) is accepted and each of its values is validated.
    """

    name: str
    check: Callable[[str, str, Any], Any]
    default: Any = REQUIRED
    doc: str = ""
    leafwise: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


NORM_EPS = Hyperparameter(
    "norm_eps",
    real(0.0),
    NORM_EPS_DEFAULT,
    "added to a norm that divides, outside the square root (as in the PyTorch reference code); the quotient "
    "saturates at the largest finite value of a float16/bfloat16 leaf, so a zero gradient never gives NaN",
)


def is_static_zero(value: Any) -> bool:
    """True for the Python number 0 (a static hyperparameter); False for arrays."""
    return isinstance(value, float) and value == 0.0


def is_static(value: Any, target: float) -> bool:
    return isinstance(value, float) and value == target


# --------------------------------------------------------------------------------------


class Rule:
    """Base class of every gradient-regularization rule.

    Subclasses set `name`, `hyperparameters` (`norm_eps` is added for every rule),
    `needs_hvp` and implement `compute_direction` (and `init_leaves` with `state_type` if they
    keep state). Adapters call `update_leaves`, the kernel on flat leaf lists; `update` is its
    wrapper on trees.
    Construct with keyword arguments: `SAM(rho=0.05)`. Instances are immutable, comparable
    and hashable (when their hyperparameters are Python values), and `replace` returns a
    copy with some hyperparameters changed.
    """

    name: ClassVar[str] = ""
    hyperparameters: ClassVar[tuple[Hyperparameter, ...]] = ()
    needs_hvp: ClassVar[bool] = False
    state_type: ClassVar[type] = EmptyState

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "init_leaves" in cls.__dict__ and "state_type" not in cls.__dict__:
            raise TypeError(
                f"Rule subclass {cls.__qualname__} overrides `init_leaves`, so it must also set the class attribute "
                f"`state_type` to the type `init_leaves` returns (a NamedTuple), which `update` checks `state` against."
            )

    def __init__(self, **hyperparameters: Any):
        values = validate_hyperparameters(type(self), hyperparameters)
        object.__setattr__(self, "_values", values)
        for key, value in values.items():
            object.__setattr__(self, key, value)
        # A PerLeaf of equal numbers is kept as one number (the scalar path, bit for bit); the
        # PerLeaf itself is kept here so that its length is still checked against the parameters.
        collapsed = {
            k: v for k, v in hyperparameters.items()
            if isinstance(v, _tree.PerLeaf) and not isinstance(values.get(k), _tree.PerLeaf)
        }
        object.__setattr__(self, "_collapsed_per_leaf", collapsed)
        # 0-d array hyperparameters, checked against the parameters' array library once per namespace
        arrays = tuple((k, v) for k, v in values.items() if _holds_array(v))
        object.__setattr__(self, "_array_hyperparameters", arrays)
        object.__setattr__(self, "_namespaces_checked", set())

    # -- value semantics --------------------------------------------------------------
    @classmethod
    def spec(cls) -> tuple[Hyperparameter, ...]:
        """All hyperparameters of the rule, `norm_eps` last."""
        return (*cls.hyperparameters, NORM_EPS)

    @property
    def config(self) -> dict[str, Any]:
        """The hyperparameters as a dict (a copy)."""
        return dict(self._values)  # type: ignore[attr-defined]

    def replace(self, **changes: Any) -> Rule:
        """A copy of this rule with some hyperparameters changed (validated again)."""
        new = type(self)(**{**self.config, **changes})
        kept = {k: v for k, v in self._collapsed_per_leaf.items() if k not in changes}  # type: ignore[attr-defined]
        if kept:
            object.__setattr__(new, "_collapsed_per_leaf", {**kept, **new._collapsed_per_leaf})  # type: ignore[attr-defined]
        return new

    def to_config(self) -> dict[str, Any]:
        """The rule as plain data, ``{"rule": name, "hyperparameters": {...}}``, with a rule held as a
        hyperparameter (the inner rule of `gradnorm.rules.Periodic`) in the same form: what a Keras
        config or a checkpoint stores. `gradnorm.rules.from_config` (and every hyperparameter that
        takes a rule) builds the rule back. Array and `PerLeaf` values are kept as they are."""
        return {
            "rule": self.name,
            "hyperparameters": {k: v.to_config() if isinstance(v, Rule) else v for k, v in self.config.items()},
        }

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; use `.replace({key}=...)` for a changed copy.")

    def __getstate__(self) -> dict[str, Any]:
        # the namespaces checked are ids of this process: a copy or an unpickled rule checks again
        return {**self.__dict__, "_namespaces_checked": set()}

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; `{key}` cannot be deleted.")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            a is b or (isinstance(a, (int, float, str, bool, _tree.PerLeaf, Rule)) and a == b)
            for a, b in zip(self.config.values(), other.config.values())  # type: ignore[attr-defined]
        )

    def __hash__(self) -> int:
        try:
            return hash((type(self), tuple(self.config.items())))
        except TypeError:
            return id(self)

    # -- cost -------------------------------------------------------------------------
    @property
    def grad_evals(self) -> int:
        """Gradient evaluations one step costs (the performance floor's multiplier); for a rule
        whose cost varies from step to step (`gradnorm.rules.Periodic`), the most one step costs."""
        return 1

    @property
    def mean_grad_evals(self) -> float:
        """Gradient evaluations per step on average over a long run: `grad_evals` for a rule that
        costs the same at every step; less for one that skips evaluations on some steps
        (`gradnorm.rules.Periodic` with ``every=k``: ``(grad_evals + k - 1) / k``)."""
        return float(self.grad_evals)

    @property
    def hvp_evals(self) -> int:
        """Hessian-vector products one step costs."""
        return 0

    @property
    def uses_grad_norm(self) -> bool:
        """Whether `compute_direction` reads `grad_norm`. With `update(..., norms=False)` a rule that does
        not gets `grad_norm=None`, and the reduction is not computed."""
        return True

    # -- the two pure functions -------------------------------------------------------
    def init(self, params: Any) -> Any:
        """The initial state for the parameter tree `params`."""
        leaves, _ = _tree.flatten(params)
        xp = check_params(leaves)
        return self.init_leaves(leaves, _tree.ArrayOps(xp))

    def update(
        self,
        params: Any,
        state: Any,
        oracle: Oracle | LeafOracle,
        *,
        loss: Any = None,
        grads: Any = None,
        ops: _tree.ArrayOps | None = None,
        check: bool = True,
        norms: bool = True,
    ) -> tuple[Any, Any, dict[str, Any]]:
        """One step on parameter trees: the descent direction at `params`.

        A thin wrapper of `update_leaves`: flattens `params` (and `grads`), wraps a tree-level
        `oracle` in a `TreeOracle` (which checks its answers when `check` is True), and
        unflattens the direction.

        Args:
            params: the parameter tree (not modified).
            state: the rule state from `init` or the previous update.
            oracle: an `Oracle` on trees (evaluates the loss, its gradient and, for `gr`,
                Hessian-vector products), or a `LeafOracle` on the flat leaves of `params`.
            loss, grads: the loss and gradient (a tree like `params`) at `params` if the caller
                already has them (an optimizer whose closure just ran); otherwise the oracle
                is asked.
            ops: leaf-list arithmetic; an adapter may pass a faster implementation.
            check: validate the oracle's answers and `grads` (structure, shapes, dtypes).
            norms: as for `update_leaves`.

        Returns:
            `(direction, state, info)`, `direction` a tree like `params`; see `update_leaves`.
        """
        leaves, treedef = _tree.flatten(params)
        xp = check_params(leaves)
        self._check_per_leaf_values(len(leaves), treedef)
        ops = ops if ops is not None else _tree.ArrayOps(xp)
        if (loss is None) != (grads is None):
            raise TypeError("`loss` and `grads` must be given together (both at `params`) or not at all.")
        if grads is not None:
            loss = check_loss(loss, leaves, xp, "`loss`", strict=check)
            grad_leaves, grad_treedef = _tree.flatten(grads)
            if check:
                check_tree(grad_leaves, grad_treedef, treedef, leaves, xp, "grads", "`grads`")
            grads = grad_leaves
        if not isinstance(oracle, LeafOracle):
            if not callable(getattr(oracle, "value_and_grad", None)):
                raise TypeError(
                    "`oracle` must be a gradnorm.Oracle (an object with `value_and_grad(params)`, `hvp(params, v)` and "
                    f"`has_hvp`, e.g. gradnorm.FunctionOracle(grad_fn)) or a gradnorm.LeafOracle. Received: {describe(oracle)}."
                )
            oracle = TreeOracle(oracle, treedef, leaves, xp, check=check, ops=ops)
        direction, state, info = self.update_leaves(leaves, state, oracle, loss=loss, grads=grads, ops=ops, norms=norms)
        return _tree.unflatten(treedef, direction), state, info

    def update_leaves(
        self,
        params: list[Any],
        state: Any,
        oracle: LeafOracle,
        *,
        loss: Any = None,
        grads: list[Any] | None = None,
        ops: _tree.ArrayOps | None = None,
        norms: bool = True,
        donate_grads: bool = False,
    ) -> tuple[list[Any], Any, dict[str, Any]]:
        """One step on flat lists of leaves: the kernel every adapter calls.

        Evaluates the gradient at `params` (unless `loss` and `grads` are given), computes its
        norm where needed, calls `compute_direction` (the rule's math) and assembles `info`.

        Args:
            params: the parameter leaves (not modified). An oracle that evaluates by writing
                into live weights may re-bind the elements of this list to an exact copy of the
                original values when it first moves the weights; rules read the parameters from
                the list and never hold a leaf across an evaluation.
            state: the rule state from `init`/`init_leaves` or the previous update.
            oracle: a `LeafOracle` on these leaves.
            loss, grads: the loss and the gradient leaves at `params`, if the caller has them;
                they are trusted (not checked): `update` checks what users pass. Their arrays are
                never written.
            ops: leaf-list arithmetic (default `ArrayOps` of the leaves' namespace).
            norms: report `grad_norm` and `update_norm` in `info`. With False, the reductions
                the rule does not need itself are skipped (each is a pass over the
                parameters, a few percent of a step of a small model in eager PyTorch).
            donate_grads: the caller gives the list `grads` to the step and reads it no more: a
                rule that donates its gradient to the oracle (SAM, once the perturbed point is
                formed) then releases the elements of this very list, so that the caller holds no
                reference that would keep the first gradient alive through the next pass (the
                PyTorch optimizer passes True). Otherwise the rule works on a copy of the list
                (of the references, not of the arrays), and the caller's list is never changed.

        Memory: the rule owns the gradient lists the oracle returns and the results of `ops`; it
        donates those it reads no more to the oracle (`value_and_grad_along(..., donate=...)`) and
        combines them with the `ops.*_into` methods, which an adapter's in-place ops (PyTorch)
        computes in their buffers. So a step holds, at its peak, only the parameter-sized lists the
        rule's math needs at once (ALGORITHMS.md, section 0), on a backend with mutable arrays.

        Returns:
            `(direction, state, info)`, `direction` a list like `params`. `info` holds 0-d
            arrays (never read back to the host here): `loss`, `grad_norm` (of the gradient at
            `params`), `update_norm` (of the direction), `finite` (the loss and every entry of
            the direction finite, checked elementwise, so a norm that overflows does not count),
            the Python ints `grad_evals` and `hvp_evals` (counted by the oracle), and
            rule-specific entries.
        """
        xp = ops.xp if ops is not None else check_params(params)
        ops = ops if ops is not None else _tree.ArrayOps(xp)
        if not isinstance(oracle, LeafOracle):
            raise TypeError(
                f"`oracle` of update_leaves must be a gradnorm.LeafOracle (wrap a tree-level oracle with "
                f"gradnorm.TreeOracle, or call `update`). Received: {describe(oracle)}."
            )
        if not isinstance(state, self.state_type):
            raise TypeError(
                f"`state` of rule '{self.name}' must be a {self.state_type.__name__} (from `rule.init(params)` or "
                f"the previous step; pass `state=None` to start). Received: {describe(state)}."
            )
        if self.needs_hvp and not oracle.has_hvp:
            raise MissingHVPError(
                f"Rule '{self.name}' needs Hessian-vector products: pass `hvp_fn(params, v) -> H v` "
                f"to gradnorm.step (or use an adapter, which computes them by autodiff). "
                f"Rule 'fd_gr' approximates the same update with gradients only."
            )
        self._check_per_leaf_values(len(params))
        if self._array_hyperparameters and id(xp) not in self._namespaces_checked:  # type: ignore[attr-defined]
            self._check_array_hyperparameters(xp)
        if (loss is None) != (grads is None):
            raise TypeError("`loss` and `grads` must be given together (both at `params`) or not at all.")
        evals_before, hvps_before = oracle.grad_evals, oracle.hvp_evals
        if grads is None:
            loss, grads = oracle.value_and_grad(params)
            given = 0
        else:
            given = 1
            if not donate_grads:
                grads = list(grads)  # the rule may release the elements of its list: not the caller's
        grad_norm = ops.norm(grads) if norms or self.uses_grad_norm else None
        direction, state, info = self.compute_direction(params, grads, loss, grad_norm, state, oracle, ops)
        out: dict[str, Any] = {"loss": loss}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        if norms:
            # A rule that returns the gradient list itself (sgd, zero strength) saves a reduction.
            out["update_norm"] = grad_norm if direction is grads else ops.norm(direction)
        # Elementwise, not from the norm: a norm can overflow while every entry is finite.
        out["finite"] = xp.logical_and(xp.isfinite(loss), ops.all_finite(direction))
        # A rule whose cost varies from step to step reports what its compute_direction spent (a
        # branch under jax.jit / tf.function is traced, and counted, whichever runs): the first
        # gradient is added here.
        spent_grads, spent_hvps = info.get("grad_evals"), info.get("hvp_evals")
        out.update(info)
        out["grad_evals"] = (oracle.grad_evals - evals_before + given) if spent_grads is None else spent_grads + 1
        out["hvp_evals"] = (oracle.hvp_evals - hvps_before) if spent_hvps is None else spent_hvps
        return direction, state, out

    def _check_array_hyperparameters(self, xp: Any) -> None:
        """A `HyperparameterError` for a 0-d array hyperparameter of another array library than the
        parameters (namespace `xp`); the parameters' own library is remembered, so that each rule
        object checks each namespace once. NumPy arrays are accepted with JAX parameters (JAX takes
        NumPy arrays as its own input)."""
        library = _library(xp)
        for key, value in self._array_hyperparameters:  # type: ignore[attr-defined]
            arrays = (
                [v for v in (*value.values, value.factor) if _tree.is_array(v)]
                if isinstance(value, _tree.PerLeaf) else [value]
            )
            for array in arrays:
                other = _library(_tree.array_namespace(array))
                if other != library and not (other == "numpy" and library == "jax"):
                    raise HyperparameterError(
                        f"`{key}` of rule '{self.name}' is an array of {_library_name(other)}, but `params` are arrays "
                        f"of {_library_name(library)}: give it as a Python number, or as a 0-d array of "
                        f"{_library_name(library)}. Received: {describe(array)}."
                    )
        self._namespaces_checked.add(id(xp))  # type: ignore[attr-defined]  (ids: a rule stays deep-copyable)

    def _check_per_leaf_values(self, n: int, treedef: Any = None) -> None:
        given = [*self._values.items(), *self._collapsed_per_leaf.items()]  # type: ignore[attr-defined]
        for key, value in given:
            if isinstance(value, _tree.PerLeaf) and not (
                value.matches(treedef, n) if treedef is not None else len(value) == n
            ):
                raise HyperparameterError(
                    f"`{key}` of rule '{self.name}' is a PerLeaf with {len(value)} values"
                    + (f" of structure {value.treedef}" if value.treedef is not None else "")
                    + f"; `params` has {n} leaves" + (f" of structure {treedef}" if treedef is not None else "")
                    + ". Give one value per leaf."
                )

    # -- what subclasses implement ----------------------------------------------------
    def init_leaves(self, params: list[Any], ops: _tree.ArrayOps) -> Any:
        """The initial state for the parameter leaves `params` (override in a stateful rule, and
        set `state_type` to the type returned). The state may be any pytree of arrays (a NamedTuple
        of 0-d counters, or parameter-sized buffers): adapters save and move it leaf by leaf."""
        return EmptyState()

    def compute_direction(
        self,
        params: list[Any],
        grads: list[Any],
        loss: Any,
        grad_norm: Any,
        state: Any,
        oracle: LeafOracle,
        ops: _tree.ArrayOps,
    ) -> tuple[list[Any], Any, dict[str, Any]]:
        """The rule's math on flat leaf lists: `(direction, new_state, info)`. What a rule author
        implements (see docs/writing-a-rule.md).

        Args:
            params: the parameter leaves (read them from this list; see `update_leaves`).
            grads: the gradient leaves at `params` (never write into its arrays, which the caller
                may have supplied; returning this very list means "the plain gradient" and saves a
                reduction). The list is the rule's own: once the rule reads it no more it may
                donate it to the oracle (`value_and_grad_along(..., donate=(grads,))`), which
                frees the first gradient's memory before the next pass.
            loss: the loss at `params` (a 0-d array).
            grad_norm: the global L2 norm of `grads` (0-d, float32 at least), or None when the
                rule declares `uses_grad_norm = False` and the caller asked for no norms.
            state: the rule state.
            oracle: the `LeafOracle`: `value_and_grad(leaves)`, `value_and_grad_along(base, step,
                v, donate=...)`, `hvp(leaves, v)`; the evaluations it spends must equal
                `grad_evals`. The gradient lists it returns are the rule's: it may pass them as
                `out` to the `ops.*_into` methods once it reads them no more.
            ops: leaf-list arithmetic (`ArrayOps`), with `ops.xp` the array namespace.

        `info` may hold ``"grad_evals"`` / ``"hvp_evals"``: the gradient evaluations / HVPs this
        method spent at this step (a Python int, or a 0-d integer array where that depends on a
        traced branch of `ArrayOps.cond`), for a rule whose cost varies from step to step; then
        `update_leaves` reports them (plus the first gradient) instead of what the oracle counted,
        which under ``jax.jit`` / ``tf.function`` includes the branches not taken.
        """
        raise NotImplementedError


def validate_hyperparameters(cls: type[Rule], given: dict[str, Any]) -> dict[str, Any]:
    spec = cls.spec()
    known = {h.name for h in spec}
    unknown = [k for k in given if k not in known]
    if unknown:
        raise HyperparameterError(
            f"Rule '{cls.name}' has no hyperparameter {', '.join(f'`{k}`' for k in unknown)}. "
            f"Its hyperparameters are: {describe_spec(cls)}."
        )
    values: dict[str, Any] = {}
    for h in spec:
        if h.name in given and isinstance(given[h.name], _tree.PerLeaf):
            values[h.name] = _check_per_leaf(cls, h, given[h.name])
        elif h.name in given:
            values[h.name] = h.check(cls.name, h.name, given[h.name])
        elif h.required:
            raise HyperparameterError(
                f"Rule '{cls.name}' needs `{h.name}` ({getattr(h.check, 'expectation', '')}; {h.doc}). "
                f"Received no value."
            )
        else:
            values[h.name] = h.default
    return values


def _check_per_leaf(cls: type[Rule], h: Hyperparameter, value: _tree.PerLeaf) -> Any:
    """Each value validated; equal Python numbers collapse to one (the scalar path, bit for bit)."""
    if not h.leafwise:
        leafwise = [x.name for x in cls.spec() if x.leafwise]
        raise HyperparameterError(
            f"`{h.name}` of rule '{cls.name}' takes one value for all parameters, not a PerLeaf. "
            + (f"Per-leaf values are accepted for: {', '.join(leafwise)}." if leafwise else "The rule has no per-leaf hyperparameters.")
            + f" Received: {value!r}."
        )
    checked = []
    for i, v in enumerate(value.leaf_values()):
        try:
            checked.append(h.check(cls.name, h.name, v))
        except HyperparameterError as err:
            raise HyperparameterError(f"In the value for leaf {i} of a PerLeaf: {err}") from None
    if all(isinstance(v, float) for v in checked) and len(set(checked)) == 1:
        return checked[0]
    out = _tree.PerLeaf._make(tuple(checked))
    object.__setattr__(out, "treedef", value.treedef)
    return out


def _holds_array(value: Any) -> bool:
    """Whether a hyperparameter value is, or a PerLeaf holds, an array."""
    if isinstance(value, _tree.PerLeaf):
        return any(_tree.is_array(v) for v in (*value.values, value.factor))
    return _tree.is_array(value)


_LIBRARIES = ("numpy", "torch", "jax", "cupy", "dask", "array_api_strict", "ndonnx", "sparse")


def _library(xp: Any) -> Any:
    """The array library of the namespace `xp` ("numpy", "torch", "jax", ...; array-api-compat's
    wrappers and the libraries' own namespaces alike), or `xp` itself for any other namespace
    (TensorFlow's, `gradnorm._compat.tensorflow`)."""
    for name in _LIBRARIES:
        test = getattr(array_api_compat, f"is_{name}_namespace", None)
        if test is not None and test(xp):
            return name
    return xp


def _library_name(library: Any) -> str:
    if isinstance(library, str):
        return {"numpy": "NumPy", "torch": "PyTorch", "jax": "JAX", "cupy": "CuPy", "dask": "Dask",
                "array_api_strict": "array-api-strict"}.get(library, library)
    name = getattr(library, "__name__", repr(library))
    return "TensorFlow" if name.endswith("_compat.tensorflow") else name


def describe_spec(cls: type[Rule]) -> str:
    parts = []
    for h in cls.spec():
        parts.append(f"{h.name} (required)" if h.required else f"{h.name}={h.default!r}")
    return ", ".join(parts)


def check_params(leaves: list[Any]) -> Any:
    """The namespace of `leaves`; every leaf must be a real floating-point array."""
    xp = _tree.namespace_of(leaves)
    checked = set()
    for leaf in leaves:
        if leaf.dtype in checked:
            continue
        if not xp.isdtype(leaf.dtype, "real floating"):
            raise ParamsError(
                f"Every leaf of `params` must have a real floating-point dtype. Received a leaf {describe(leaf)}."
            )
        checked.add(leaf.dtype)
    return xp
