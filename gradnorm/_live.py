"""Evaluating by writing into live weights: the state machine the PyTorch and TensorFlow adapters share.

`gradnorm.torch.Optimizer` and `gradnorm.tf.step` cannot call the loss at an arbitrary point: the
user's closure (or `loss_fn`) reads the model's weights. So their oracle evaluates the loss at a
point by writing it into the weights, running a pass, and, when the step is over, writing the
original values back. Everything about that which does not depend on the framework lives here, once:

* **which values the weights hold** (`at`): evaluating at the point the weights already hold costs
  no write;
* **the snapshot**, an exact copy of the original values, taken the first time the weights are
  about to move, whatever the rule declared about its cost (a rule that under-reports its
  evaluations still gets its weights back bit for bit), and never for a rule that does not move
  them (sgd, flooding, coherent: no copy at all);
* **the rule's view**: the list the rule reads as its parameters. When the snapshot is taken, the
  framework hook may re-bind the elements of that very list to the copy (PyTorch does: the live
  tensors are about to change), so the rule's arithmetic on `params` after a move still sees the
  original values;
* **side state of the first pass** (BatchNorm statistics): saved before the first extra pass and
  put back at the end, so that it comes from the pass at the unperturbed weights only;
* **randomness** (`same_randomness`): the random state before the first pass is replayed before
  every extra pass, so that dropout draws the same masks;
* **restore**: `restore()` writes the snapshot back and the side state, on success and on any
  exception (the adapter calls it in a ``finally``);
* **memory**: a point along a direction is formed in the weights in place (`_assign_axpy`), and
  the lists a rule donates (`LeafOracle.value_and_grad_along(..., donate=...)`) are released right
  after, before the pass, so that the pass's gradient can take their memory. The snapshot is the one
  parameter-sized buffer this machine adds; a donation never releases it (`_keeps`).

A framework supplies the hooks: `_take_snapshot`, `_assign`, `_assign_axpy`, `_evaluate`, and
optionally `_read_rng`/`_write_rng`, `_read_side_state`/`_write_side_state` and `_hvp`.
"""

from __future__ import annotations

import operator
from typing import Any

from ._oracle import LeafOracle

__all__ = ["LiveWeights", "same_list"]


def same_list(a: Any, b: Any) -> bool:
    """Whether two leaf lists hold the very same objects (identity, never values)."""
    return a is b or (len(a) == len(b) and all(map(operator.is_, a, b)))


class LiveWeights(LeafOracle):
    """A `LeafOracle` that evaluates the loss by writing points into the live weights.

    Args:
        view: the list the rule reads as its parameters; before the first write its values are the
            weights' values (it may hold the weights themselves).
        ops: the adapter's leaf arithmetic.
        has_hvp: whether `_hvp` answers.
        same_randomness: replay the random state of the first pass before every extra pass.
        first_pass_done: the caller evaluated the first pass itself (the loss and gradient at the
            current weights came with the step), so every pass this oracle runs is an extra one.
    """

    def __init__(self, view: list[Any], ops: Any, *, has_hvp: bool = False, same_randomness: bool = False,
                 first_pass_done: bool = False):
        super().__init__(ops)
        self.view = view
        self.has_hvp = has_hvp
        self.same_randomness = same_randomness
        self.at: list[Any] | None = view  # a list whose values the weights hold now (None: a point formed in place)
        self.snapshot_taken = False
        self.moved = False  # whether the weights left their values (then they must be restored)
        self.passes = 1 if first_pass_done else 0
        self._rng_before_first: Any = None
        self._side_after_first: Any = None

    # -- the hooks a framework implements ------------------------------------------------
    def _take_snapshot(self) -> None:
        """Make `self.view` an exact copy of the weights that later writes do not change (copy the
        values and re-bind the view's elements, or nothing where the view is a copy already)."""
        raise NotImplementedError

    def _assign(self, values: list[Any]) -> Any:
        """Write `values` into the weights; returns the write ops (graph frameworks) or None."""
        raise NotImplementedError

    def _assign_axpy(self, step: Any, v: list[Any]) -> None:
        """`weights += step * v`, in place (the weights hold the base point)."""
        raise NotImplementedError

    def _evaluate(self, first: bool) -> tuple[Any, list[Any]]:
        """One pass at the values the weights hold now: `(loss, grads)` as the rule sees them
        (unscaled, reduced over replicas where the adapter does that). `first`: the pass at the
        unperturbed weights (an adapter may keep its graph for a Hessian-vector product)."""
        raise NotImplementedError

    def _read_rng(self) -> Any:
        return None

    def _write_rng(self, state: Any) -> None:
        pass

    def _read_side_state(self) -> Any:
        return None

    def _write_side_state(self, saved: Any) -> list[Any]:
        return []

    # -- the machine -----------------------------------------------------------------------
    def _before_write(self) -> None:
        """Called before anything moves the weights: snapshot first (once), then mark them moved,
        so that a failure half way through a write is still restored."""
        if not self.snapshot_taken:
            self._take_snapshot()
            self.snapshot_taken = True
        self.moved = True

    def holds(self, point: list[Any]) -> bool:
        """Whether the weights hold the values of `point` now."""
        return self.at is not None and same_list(point, self.at)

    def move_to(self, point: list[Any]) -> None:
        """Make the weights hold the values of `point` (no write if they do already)."""
        if self.holds(point):
            return
        self._before_write()
        self._assign(point)
        self.at = point

    def _value_and_grad(self, point: list[Any]) -> tuple[Any, list[Any]]:
        self.move_to(point)
        return self._pass()

    def _value_and_grad_along(self, base: list[Any], step: Any, v: list[Any]) -> tuple[Any, list[Any]]:
        self.move_to(base)
        self._before_write()
        self.at = None
        self._assign_axpy(step, v)
        del base, v
        self.release_donated()  # the weights hold the point: donated gradients are dead before the pass
        return self._pass()

    def _keeps(self, leaves: list[Any]) -> bool:
        return leaves is self.view  # the rule's parameters, and after the snapshot the copy restored from

    def _pass(self) -> tuple[Any, list[Any]]:
        return self._evaluate(self.begin_pass())

    def begin_pass(self) -> bool:
        """The bookkeeping before a pass at the values the weights hold (count it; before an extra
        pass, save the side state and replay the randomness). Returns whether it is the first."""
        first = self.passes == 0
        if first:
            if self.same_randomness:
                self._rng_before_first = self._read_rng()
        else:
            if self._side_after_first is None:
                self._side_after_first = self._read_side_state()
            if self._rng_before_first is not None:
                self._write_rng(self._rng_before_first)
        self.passes += 1
        return first

    def prepare_traced_branches(self) -> None:
        """Read the side state of the first pass now, not at the first extra pass: that pass may be traced
        inside a branch of ``tf.cond``, whose values `restore` (after the branch) could not use."""
        if self.passes > 0 and self._side_after_first is None:
            self._side_after_first = self._read_side_state()

    def restore(self) -> list[Any]:
        """Put the weights back (bit for bit, from the snapshot) and the side state to its values
        after the first pass. Returns the write ops (graph frameworks; empty lists elsewhere)."""
        writes: list[Any] = []
        if self.moved:
            out = self._assign(self.view)
            writes += list(out or ())
            self.at = self.view
            self.moved = False
        if self._side_after_first is not None:
            writes += list(self._write_side_state(self._side_after_first) or ())
            self._side_after_first = None
        return writes
