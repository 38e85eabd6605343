"""The gradient oracle: how a rule evaluates the loss and its derivatives.

A rule never calls a framework. It receives an oracle that evaluates
`value_and_grad(params) -> (loss, grads)` at any point and, for rules that need it,
`hvp(params, v) -> H(params) v`. `gradnorm.step` builds one from the user's `grad_fn`
(and `hvp_fn`); each framework adapter builds one from a loss function with its autodiff.

Inside a step, rules talk to a `FlatOracle`, the same oracle seen through flat lists
of leaves. It checks every answer (tree structure, shapes, dtypes, a scalar loss) so that a
`grad_fn` returning the wrong thing fails with a clear message on its first call, and it
counts evaluations for `info`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import array_api_compat

from . import _tree
from ._errors import MissingHVPError, OracleOutputError, describe

__all__ = ["Oracle", "FunctionOracle", "FlatOracle"]


@runtime_checkable
class Oracle(Protocol):
    """What a rule may ask of the loss.

    `value_and_grad(params)` returns `(loss, grads)` with `loss` a scalar and `grads`
    a tree of the same structure, shapes and dtypes as `params`. `hvp(params, v)` returns
    the Hessian of the loss at `params` applied to the tree `v`; `has_hvp` says whether
    it is available. Every call within one step must use the same minibatch (and, where the
    user asks for it, the same dropout randomness).
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


class FlatOracle:
    """An `Oracle` seen through flat leaf lists, with checked answers and call counts.

    Args:
        oracle: the oracle to wrap.
        treedef: tree structure of the parameters.
        reference: the parameter leaves; answers must match their shapes and dtypes.
        xp: the array namespace of the parameters (a Python-float loss is converted with it).
        check: validate each answer (on by default; adapters that build correct answers by
            construction may turn it off).
    """

    def __init__(self, oracle: Oracle, treedef: Any, reference: list[Any], xp: Any, *, check: bool = True,
                 ops: Any = None):
        self.oracle = oracle
        self.ops = ops if ops is not None else _tree.ArrayOps(xp)
        self.treedef = treedef
        self.reference = reference
        self.xp = xp
        self.check = check
        self.grad_evals = 0
        self.hvp_evals = 0

    @property
    def has_hvp(self) -> bool:
        return bool(getattr(self.oracle, "has_hvp", False))

    def value_and_grad(self, leaves: list[Any]) -> tuple[Any, list[Any]]:
        self.grad_evals += 1
        return self._checked_pair(self.oracle.value_and_grad(_tree.unflatten(self.treedef, leaves)))

    def _checked_pair(self, out: Any) -> tuple[Any, list[Any]]:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise OracleOutputError(
                f"`grad_fn` must return a pair `(loss, grads)`. Received: {describe(out)}."
            )
        loss, grads = out
        loss = self._check_loss(loss)
        return loss, self._check_tree(grads, "grads", "`grad_fn`")

    def value_and_grad_along(self, base: list[Any], step: Any, v: list[Any]) -> tuple[Any, list[Any]]:
        """Loss and gradient at `base + step * v` (`step` a scalar or a `PerLeaf`).

        Rules ask for their evaluation points this way, so that an oracle which evaluates by
        writing the point into live weights (`gradnorm.torch.Optimizer`) can form it there in
        place, without a parameter-sized temporary: it implements
        `value_and_grad_along(base, step, v)` on trees. Otherwise the point is computed with
        `ops.axpy` and passed to `value_and_grad`.
        """
        along = getattr(self.oracle, "value_and_grad_along", None)
        if along is None:
            return self.value_and_grad(self.ops.axpy(step, v, base))
        self.grad_evals += 1
        out = along(_tree.unflatten(self.treedef, base), step, _tree.unflatten(self.treedef, v))
        return self._checked_pair(out)

    def hvp(self, leaves: list[Any], v: list[Any]) -> list[Any]:
        self.hvp_evals += 1
        out = self.oracle.hvp(_tree.unflatten(self.treedef, leaves), _tree.unflatten(self.treedef, v))
        return self._check_tree(out, "the Hessian-vector product", "`hvp_fn`")

    def _check_loss(self, loss: Any) -> Any:
        if not _tree.is_array(loss):
            if isinstance(loss, bool) or not isinstance(loss, (int, float)):
                raise OracleOutputError(f"The loss returned by `grad_fn` must be a scalar. Received: {describe(loss)}.")
            ref = self.reference[0]
            loss = self.xp.asarray(float(loss), dtype=ref.dtype, device=array_api_compat.device(ref))
        if self.check and tuple(loss.shape) != ():
            raise OracleOutputError(
                f"The loss returned by `grad_fn` must be a scalar (shape ()). Received: shape {tuple(loss.shape)}."
            )
        return loss

    def _check_tree(self, tree: Any, what: str, source: str) -> list[Any]:
        leaves, treedef = _tree.flatten(tree)
        if not self.check:
            return leaves
        if treedef != self.treedef:
            raise OracleOutputError(
                f"{source} must return {what} with the same tree structure as `params`"
                f"{_structure_difference(self.treedef, treedef)}. Expected: {self.treedef}. Received: {treedef}."
            )
        for i, (leaf, ref) in enumerate(zip(leaves, self.reference)):
            same_kind = type(leaf) is type(ref)
            if not same_kind and not _tree.is_array(leaf):
                raise OracleOutputError(f"{source} must return arrays in {what}; leaf {_leaf_path(self.treedef, i)} is {describe(leaf)}.")
            if tuple(leaf.shape) != tuple(ref.shape):
                raise OracleOutputError(
                    f"{source} must return {what} with the shapes of `params`: leaf {_leaf_path(self.treedef, i)} must have shape "
                    f"{tuple(ref.shape)}. Received: shape {tuple(leaf.shape)}."
                )
            if not same_kind and _tree.array_namespace(leaf) is not self.xp:
                raise OracleOutputError(
                    f"{source} must return {what} in the array library of `params`: leaf {_leaf_path(self.treedef, i)} must be an array of "
                    f"{self.xp.__name__} with dtype {ref.dtype}. Received: {describe(leaf)}."
                )
            if leaf.dtype != ref.dtype:
                raise OracleOutputError(
                    f"{source} must return {what} with the dtypes of `params`: leaf {_leaf_path(self.treedef, i)} must have dtype "
                    f"{ref.dtype}. Received: dtype {leaf.dtype}."
                )
        return leaves


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
