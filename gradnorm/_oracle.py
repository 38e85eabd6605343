"""The gradient oracle: how a rule evaluates the loss and its derivatives.

A rule never calls a framework. It asks an oracle, at two levels:

* `Oracle` (trees): what a user supplies to `gradnorm.step` through `FunctionOracle`
  (`grad_fn(params) -> (loss, grads)`, `hvp_fn(params, v) -> H v`), or any object with
  `value_and_grad(params)`, `hvp(params, v)` and `has_hvp`.
* `LeafOracle` (flat lists of leaves): what a rule talks to inside `Rule.update_leaves`. It asks
  `value_and_grad(leaves)`, `value_and_grad_along(base, step, v)` (the point `base + step * v`,
  which an adapter that evaluates by writing into live weights forms there in place) and
  `hvp(leaves, v)`, and it counts the evaluations for `info`. Adapters subclass it (the JAX
  oracle, the live-weights oracles of `gradnorm._live`); `TreeOracle` adapts an `Oracle` and
  checks every answer (structure, shapes, dtypes, a real scalar loss), so that a `grad_fn`
  returning the wrong thing fails with a clear message on its first call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import array_api_compat

from . import _tree
from ._errors import MissingHVPError, OracleOutputError, describe

__all__ = ["Oracle", "FunctionOracle", "LeafOracle", "TreeOracle", "HVP_MODES", "PERTURBATIONS"]

#: How an adapter may compute a Hessian-vector product: differentiate the gradient once more
#: (reverse mode, reusing the first pass where the framework allows) or take the forward-mode
#: derivative (JVP) of the gradient. Every adapter that offers a choice uses these names.
HVP_MODES = ("reverse_over_reverse", "forward_over_reverse")

#: The data-parallel perturbation policies: "local" (every replica computes the rule on its own
#: minibatch, as in the SAM and GNP papers; the directions are averaged once) or "global" (every
#: evaluation is averaged over the replicas, so the rule sees the gradient of the global batch).
PERTURBATIONS = ("local", "global")


@runtime_checkable
class Oracle(Protocol):
    """What a rule may ask of the loss, on parameter trees.

    `value_and_grad(params)` returns `(loss, grads)` with `loss` a real scalar and `grads` a tree
    of the same structure, shapes and dtypes as `params`. `hvp(params, v)` returns the Hessian of
    the loss at `params` applied to the tree `v`; `has_hvp` says whether it is available. Every
    call within one step must use the same minibatch (and, where the user asks for it, the same
    dropout randomness).
    """

    has_hvp: bool

    def value_and_grad(self, params: Any) -> tuple[Any, Any]: ...

    def hvp(self, params: Any, v: Any) -> Any: ...


class FunctionOracle:
    """An `Oracle` from plain functions.

    Args:
        grad_fn: `grad_fn(params) -> (loss, grads)`.
        hvp_fn: optional `hvp_fn(params, v) -> H v`.
    """

    def __init__(self, grad_fn: Callable[[Any], tuple[Any, Any]], hvp_fn: Callable[[Any, Any], Any] | None = None):
        if not callable(grad_fn):
            raise TypeError(f"`grad_fn` must be a callable `grad_fn(params) -> (loss, grads)`. Received: {describe(grad_fn)}.")
        if hvp_fn is not None and not callable(hvp_fn):
            raise TypeError(f"`hvp_fn` must be None or a callable `hvp_fn(params, v) -> H v`. Received: {describe(hvp_fn)}.")
        self._grad_fn = grad_fn
        self._hvp_fn = hvp_fn
        self.has_hvp = hvp_fn is not None

    def value_and_grad(self, params: Any) -> tuple[Any, Any]:
        return self._grad_fn(params)

    def hvp(self, params: Any, v: Any) -> Any:
        if self._hvp_fn is None:
            raise MissingHVPError("This oracle has no Hessian-vector product: pass `hvp_fn(params, v) -> H v`.")
        return self._hvp_fn(params, v)


class LeafOracle:
    """The oracle a rule talks to: the loss and its derivatives on flat lists of leaves.

    A rule calls the three public methods; each counts in `grad_evals` / `hvp_evals` (the step's
    `info`, and the contract that a rule's declared cost is what it spends). A subclass implements

    * `_value_and_grad(leaves) -> (loss, grad_leaves)`: the loss (a 0-d array) and gradient at the
      point whose leaves are `leaves`;
    * optionally `_value_and_grad_along(base, step, v)`: the same at `base + step * v`, with `step`
      a scalar (Python number or 0-d array) or a `gradnorm.PerLeaf`. The default forms the point
      with `ops.axpy`; an oracle that evaluates by writing into live weights forms it in place.
      Either calls `release_donated()` once the point is formed and before the pass (see below);
    * optionally `_hvp(leaves, v) -> H v` (and sets `has_hvp = True`).

    Memory (donation). A rule that reads a list no more once a point is formed (SAM's first
    gradient, once the weights hold theta + e) says so: `value_and_grad_along(base, step, v,
    donate=(v,))`. The oracle then *releases* those lists between forming the point and running
    the pass: it replaces their elements by None, in place, so that every holder of the list (the
    rule, `update_leaves`, the adapter) lets go of the arrays at once and the pass's new gradient
    can take their memory. A donated list must be one the rule owns (an answer of this oracle,
    an `ops` result, or `grads` of `compute_direction`, which `update_leaves` hands over as its own
    list), never the parameters; the rule must not read it afterwards. An oracle whose own
    `_value_and_grad_along` does not call `release_donated()` releases them after the pass instead
    (later, but just as correct).

    Args:
        ops: the leaf arithmetic used to form points along a direction (default: `ArrayOps` of
            the leaves' namespace).
    """

    has_hvp: bool = False

    def __init__(self, ops: Any = None):
        self.ops = ops
        self.grad_evals = 0
        self.hvp_evals = 0
        self._donated: tuple[list[Any], ...] = ()

    def value_and_grad(self, leaves: list[Any]) -> tuple[Any, list[Any]]:
        """Loss and gradient at the point `leaves`."""
        self.grad_evals += 1
        return self._value_and_grad(leaves)

    def value_and_grad_along(self, base: list[Any], step: Any, v: list[Any], *,
                             donate: tuple[list[Any], ...] = ()) -> tuple[Any, list[Any]]:
        """Loss and gradient at `base + step * v`. Rules ask for a point along a direction this way
        (rather than computing it and calling `value_and_grad`), so that an oracle which evaluates
        by writing into live weights can form the point there without a parameter-sized temporary.

        `donate`: lists the caller reads no more once the point is formed (`v`, `base`, or any other
        list it owns, never the parameters): they are released (their elements set to None) before
        the pass, so that their memory is free for the pass's gradient. See the class docstring."""
        for leaves in donate:
            if not isinstance(leaves, list):
                raise TypeError(
                    f"`donate` of value_and_grad_along must be a tuple of leaf lists, such as `(v,)`. "
                    f"Received an element {describe(leaves)}."
                )
        self.grad_evals += 1
        self._donated = tuple(donate)
        try:
            return self._value_and_grad_along(base, step, v)
        finally:
            self.release_donated()

    def release_donated(self) -> None:
        """Release the lists donated to the current `value_and_grad_along` call (set their elements
        to None, in place), unless they are lists this oracle must keep (`_keeps`). Called by
        `_value_and_grad_along` once the point is formed; a second call does nothing."""
        donated, self._donated = self._donated, ()
        for leaves in donated:
            if not self._keeps(leaves):
                leaves[:] = [None] * len(leaves)

    def _keeps(self, leaves: list[Any]) -> bool:
        """Whether `leaves` is a list the oracle itself reads later (the parameters it checks
        answers against, the copy it restores weights from), which a donation must not release."""
        return False

    def hvp(self, leaves: list[Any], v: list[Any]) -> list[Any]:
        """The Hessian of the loss at `leaves` applied to `v`."""
        if not self.has_hvp:
            raise MissingHVPError("This oracle has no Hessian-vector product.")
        self.hvp_evals += 1
        return self._hvp(leaves, v)

    def prepare_traced_branches(self) -> None:
        """Called by a rule before both branches of a traced conditional (`ArrayOps.cond` under
        ``jax.jit`` / ``tf.function``) that may evaluate through this oracle: whatever the oracle would
        otherwise create lazily at its first evaluation inside a branch and use after the step (a
        graph value of that branch, out of scope outside it) is made now. Nothing by default."""

    # -- what subclasses implement -------------------------------------------------------
    def _value_and_grad(self, leaves: list[Any]) -> tuple[Any, list[Any]]:
        raise NotImplementedError

    def _value_and_grad_along(self, base: list[Any], step: Any, v: list[Any]) -> tuple[Any, list[Any]]:
        ops = self.ops if self.ops is not None else _tree.ArrayOps(_tree.namespace_of(base))
        point = ops.axpy(step, v, base)
        del base, v
        self.release_donated()  # the point is formed: what the rule donated is free before the pass
        return self._value_and_grad(point)

    def _hvp(self, leaves: list[Any], v: list[Any]) -> list[Any]:
        raise MissingHVPError("This oracle has no Hessian-vector product.")


class TreeOracle(LeafOracle):
    """A tree-level `Oracle` seen by a rule through flat leaf lists, with checked answers.

    Args:
        oracle: the `Oracle` to wrap.
        treedef: tree structure of the parameters.
        reference: the parameter leaves; answers must match their shapes and dtypes.
        xp: the array namespace of the parameters (a Python-float loss is converted with it).
        check: validate each answer (on by default; adapters that build correct answers by
            construction turn it off).
        ops: as for `LeafOracle`.
    """

    def __init__(self, oracle: Oracle, treedef: Any, reference: list[Any], xp: Any, *, check: bool = True,
                 ops: Any = None):
        super().__init__(ops if ops is not None else _tree.ArrayOps(xp))
        self.oracle = oracle
        self.treedef = treedef
        self.reference = reference
        self.xp = xp
        self.check = check
        self.has_hvp = bool(getattr(oracle, "has_hvp", False))

    def _value_and_grad(self, leaves: list[Any]) -> tuple[Any, list[Any]]:
        out = self.oracle.value_and_grad(_tree.unflatten(self.treedef, leaves))
        if not (isinstance(out, tuple) and len(out) == 2):
            raise OracleOutputError(f"`grad_fn` must return a pair `(loss, grads)`. Received: {describe(out)}.")
        loss, grads = out
        loss = check_loss(loss, self.reference, self.xp, "`grad_fn`", strict=self.check)
        return loss, self._leaves(grads, "grads", "`grad_fn`")

    def _hvp(self, leaves: list[Any], v: list[Any]) -> list[Any]:
        out = self.oracle.hvp(_tree.unflatten(self.treedef, leaves), _tree.unflatten(self.treedef, v))
        return self._leaves(out, "the Hessian-vector product", "`hvp_fn`")

    def _keeps(self, leaves: list[Any]) -> bool:
        return leaves is self.reference

    def _leaves(self, tree: Any, what: str, source: str) -> list[Any]:
        leaves, treedef = _tree.flatten(tree)
        if self.check:
            check_tree(leaves, treedef, self.treedef, self.reference, self.xp, what, source)
        return leaves


def check_loss(loss: Any, reference: list[Any], xp: Any, source: str, *, strict: bool = True) -> Any:
    """The loss as a 0-d array: a Python number is converted (to the dtype of the first parameter);
    with `strict`, anything but a real floating 0-d array is an `OracleOutputError`."""
    if not _tree.is_array(loss):
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise OracleOutputError(f"The loss returned by {source} must be a real scalar. Received: {describe(loss)}.")
        ref = reference[0]
        return xp.asarray(float(loss), dtype=ref.dtype, device=array_api_compat.device(ref))
    if strict and tuple(loss.shape) != ():
        raise OracleOutputError(
            f"The loss returned by {source} must be a scalar (shape ()). Received: shape {tuple(loss.shape)}."
        )
    if strict and not _tree.array_namespace(loss).isdtype(loss.dtype, "real floating"):
        raise OracleOutputError(
            f"The loss returned by {source} must have a real floating-point dtype. Received: dtype {loss.dtype}."
        )
    return loss


def check_tree(leaves: list[Any], treedef: Any, expected: Any, reference: list[Any], xp: Any, what: str,
               source: str) -> None:
    """An `OracleOutputError` unless `leaves` (of structure `treedef`) match the structure `expected`
    and the shapes, dtypes and array library of `reference`."""
    if treedef != expected:
        raise OracleOutputError(
            f"{source} must return {what} with the same tree structure as `params`"
            f"{_structure_difference(expected, treedef)}. Expected: {expected}. Received: {treedef}."
        )
    for i, (leaf, ref) in enumerate(zip(leaves, reference)):
        same_kind = type(leaf) is type(ref)
        if not same_kind and not _tree.is_array(leaf):
            raise OracleOutputError(f"{source} must return arrays in {what}; leaf {_leaf_path(expected, i)} is {describe(leaf)}.")
        if tuple(leaf.shape) != tuple(ref.shape):
            raise OracleOutputError(
                f"{source} must return {what} with the shapes of `params`: leaf {_leaf_path(expected, i)} must have shape "
                f"{tuple(ref.shape)}. Received: shape {tuple(leaf.shape)}."
            )
        if not same_kind and _tree.array_namespace(leaf) is not xp:
            raise OracleOutputError(
                f"{source} must return {what} in the array library of `params`: leaf {_leaf_path(expected, i)} must be an array of "
                f"{xp.__name__} with dtype {ref.dtype}. Received: {describe(leaf)}."
            )
        if leaf.dtype != ref.dtype:
            raise OracleOutputError(
                f"{source} must return {what} with the dtypes of `params`: leaf {_leaf_path(expected, i)} must have dtype "
                f"{ref.dtype}. Received: dtype {leaf.dtype}."
            )


def _structure_difference(expected: Any, received: Any) -> str:
    """'': missing leaves ..., unexpected leaves ...' when both trees name their leaves."""
    try:
        want = {"".join(f"[{k!r}]" for k in path) for path in expected.paths()}
        got = {"".join(f"[{k!r}]" for k in path) for path in received.paths()}
    except Exception:  # pragma: no cover
        return ""
    parts = []
    if want - got:
        parts.append("missing leaves " + ", ".join(sorted(want - got)))
    if got - want:
        parts.append("unexpected leaves " + ", ".join(sorted(got - want)))
    return " (" + "; ".join(parts) + ")" if parts else ""


def _leaf_path(treedef: Any, index: int) -> str:
    try:
        paths = treedef.paths()
        return "".join(f"[{k!r}]" for k in paths[index]) or "<root>"
    except Exception:  # pragma: no cover - path names are a courtesy
        return f"#{index}"
