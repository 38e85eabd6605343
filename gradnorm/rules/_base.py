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
and implementing `Rule._update` on flat lists of leaves (see the built-in rules).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .. import _tree
from .._errors import HyperparameterError, MissingHVPError, ParamsError, describe
from .._oracle import FlatOracle, Oracle

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
    expectation = f"an integer >= {lo}"

    def check(rule: str, name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise _fail(rule, name, expectation, value)
        return value

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
    "added to a norm that divides, outside the square root (as in the PyTorch reference code)",
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
    `needs_hvp` and implement `_update` (and `_init` if they keep state).
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
        if "_init" in cls.__dict__ and "state_type" not in cls.__dict__:
            raise TypeError(
                f"Rule subclass {cls.__qualname__} overrides `_init`, so it must also set the class attribute "
                f"`state_type` to the type `_init` returns (a NamedTuple), which `update` checks `state` against."
            )

    def __init__(self, **hyperparameters: Any):
        values = validate_hyperparameters(type(self), hyperparameters)
        object.__setattr__(self, "_values", values)
        for key, value in values.items():
            object.__setattr__(self, key, value)

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
        return type(self)(**{**self.config, **changes})

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; use `.replace({key}=...)` for a changed copy.")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; `{key}` cannot be deleted.")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            a is b or (isinstance(a, (int, float, str, bool, _tree.PerLeaf)) and a == b)
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
        """Gradient evaluations one step costs (the performance floor's multiplier)."""
        return 1

    @property
    def hvp_evals(self) -> int:
        """Hessian-vector products one step costs."""
        return 0

    @property
    def uses_grad_norm(self) -> bool:
        """Whether `_update` reads `grad_norm`. With `update(..., norms=False)` a rule that does
        not gets `grad_norm=None`, and the reduction is not computed."""
        return True

    # -- the two pure functions -------------------------------------------------------
    def init(self, params: Any) -> Any:
        """The initial state for `params`."""
        leaves, _ = _tree.flatten(params)
        xp = check_params(leaves)
        return self._init(leaves, _tree.ArrayOps(xp))

    def update(
        self,
        params: Any,
        state: Any,
        oracle: Oracle,
        *,
        loss: Any = None,
        grads: Any = None,
        ops: _tree.ArrayOps | None = None,
        check: bool = True,
        norms: bool = True,
    ) -> tuple[Any, Any, dict[str, Any]]:
        """One step: the descent direction at `params`.

        Args:
            params: the parameter tree (not modified).
            state: the rule state from `init` or the previous update.
            oracle: evaluates the loss, its gradient and, for `gr`, Hessian-vector products.
            loss, grads: the loss and gradient at `params` if the caller already has them
                (an optimizer whose closure just ran); otherwise the oracle is asked.
            ops: leaf-list arithmetic; an adapter may pass a faster implementation.
            check: validate the oracle's answers (structure, shapes, dtypes).
            norms: report `grad_norm` and `update_norm` in `info`. With False, the reductions
                the rule does not need itself are skipped (each is a pass over the
                parameters, a few percent of a step of a small model in eager PyTorch).

        Returns:
            `(direction, state, info)`. `info` holds 0-d arrays (never read back to the
            host here): `loss`, `grad_norm` (of the gradient at `params`),
            `update_norm` (of the direction), `finite` (the loss and every entry of the direction finite, checked
            elementwise, so a norm that overflows does not count), the
            Python ints `grad_evals` and `hvp_evals`, and rule-specific entries.
        """
        leaves, treedef = _tree.flatten(params)
        xp = check_params(leaves)
        if not isinstance(state, self.state_type):
            raise TypeError(
                f"`state` of rule '{self.name}' must be a {self.state_type.__name__} (from `rule.init(params)` or "
                f"the previous step; pass `state=None` to start). Received: {describe(state)}."
            )
        if self.needs_hvp and not getattr(oracle, "has_hvp", False):
            raise MissingHVPError(
                f"Rule '{self.name}' needs Hessian-vector products: pass `hvp_fn(params, v) -> H v` "
                f"to gradnorm.step (or use an adapter, which computes them by autodiff). "
                f"Rule 'fd_gr' approximates the same update with gradients only."
            )
        for key, value in self._values.items():  # type: ignore[attr-defined]
            if isinstance(value, _tree.PerLeaf) and not value.matches(treedef, len(leaves)):
                raise HyperparameterError(
                    f"`{key}` of rule '{self.name}' is a PerLeaf with {len(value)} values"
                    + (f" of structure {value.treedef}" if value.treedef is not None else "")
                    + f"; `params` has {len(leaves)} leaves of structure {treedef}. Give one value per leaf."
                )
        ops = ops if ops is not None else _tree.ArrayOps(xp)
        flat = FlatOracle(oracle, treedef, leaves, xp, check=check, ops=ops)
        if (loss is None) != (grads is None):
            raise TypeError("`loss` and `grads` must be given together (both at `params`) or not at all.")
        if grads is None:
            loss, g = flat.value_and_grad(leaves)
        else:
            flat.grad_evals += 1
            loss = flat._check_loss(loss)
            g = flat._check_tree(grads, "grads", "`grads`")
        grad_norm = ops.norm(g) if norms or self.uses_grad_norm else None
        direction, state, info = self._update(leaves, g, loss, grad_norm, state, flat, ops)
        out: dict[str, Any] = {"loss": loss}
        if grad_norm is not None:
            out["grad_norm"] = grad_norm
        if norms:
            # A rule that returns the gradient list itself (sgd, zero strength) saves a reduction.
            update_norm = grad_norm if direction is g else ops.norm(direction)
            out["update_norm"] = update_norm
        # Elementwise, not from the norm: a norm can overflow while every entry is finite.
        out["finite"] = xp.logical_and(xp.isfinite(loss), ops.all_finite(direction))
        out.update(info)
        out["grad_evals"] = flat.grad_evals
        out["hvp_evals"] = flat.hvp_evals
        return _tree.unflatten(treedef, direction), state, out

    # -- what subclasses implement ----------------------------------------------------
    def _init(self, params: list[Any], ops: _tree.ArrayOps) -> Any:
        return EmptyState()

    def _update(
        self,
        params: list[Any],
        grads: list[Any],
        loss: Any,
        grad_norm: Any,
        state: Any,
        oracle: FlatOracle,
        ops: _tree.ArrayOps,
    ) -> tuple[list[Any], Any, dict[str, Any]]:
        """The rule's math on flat leaf lists: `(direction, new_state, info)`."""
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
