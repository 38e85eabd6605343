"""Gradient accumulation for two-pass rules: a closure over micro-batches.

Plain SGD may accumulate micro-batch gradients in ``.grad`` and step once. A rule with extra passes
cannot take that shortcut: its perturbed point depends on the gradient of the *whole* batch, and its
extra passes need *every* micro-batch at that point. So gradnorm accumulates inside the closure: each
pass runs forward and backward over all micro-batches, each loss weighted by its share of the batch,
and the step equals the rule on the full batch (to rounding, when the loss is a mean over examples).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._errors import describe

__all__ = ["accumulating_closure"]


def _rows(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise TypeError(
            "`micro_batches` must hold tensors (or tuples/lists whose first element is a tensor) with the examples "
            f"along dimension 0, or give `weights`. Received a micro-batch {describe(batch)}."
        )
    return int(first.shape[0])


def accumulating_closure(optimizer: Any, loss_fn: Callable[..., torch.Tensor], micro_batches: Sequence[Any], *,
                         weights: Sequence[float] | None = None,
                         backward: Callable[..., Any] | None = None) -> Callable[..., torch.Tensor]:
    r"""A closure for ``optimizer.step`` that accumulates the gradient over micro-batches.

    Every call (one per gradient evaluation of the rule) zeroes the gradients, then for each
    micro-batch $b$ computes ``loss_fn(*b)`` (a mean over its examples), multiplies it by its weight
    $w_b$ (default: its share of the examples, $n_b / \sum n$) and back-propagates; it returns
    $\sum_b w_b L_b$, the loss of the whole batch. The gradient in ``.grad`` is then the full-batch
    gradient, at whatever weights the rule evaluates, so the step equals the rule on the full batch.
    It accepts ``create_graph`` (exact GR differentiates the accumulated gradient once more).

    Args:
        optimizer: the `gradnorm.torch.Optimizer` (its ``zero_grad`` is called).
        loss_fn: ``loss_fn(*micro_batch) -> scalar loss`` (a micro-batch that is not a tuple/list is
            passed as one argument).
        micro_batches: the micro-batches of one step (a list; it is iterated once per pass).
        weights: the weight of each micro-batch's loss (default: the examples' shares, read from the
            first tensor of each micro-batch along dimension 0).
        backward: how to back-propagate a loss (default ``loss.backward(create_graph=...)``); give the
            trainer's own where it scales or syncs (Lightning's ``self.manual_backward``,
            accelerate's ``accelerator.backward``).

    Example::

        micro = list(zip(x.split(16), y.split(16)))
        closure = gradnorm.torch.accumulating_closure(opt, lambda xb, yb: F.cross_entropy(model(xb), yb), micro)
        loss = opt.step(closure)   # SAM on the whole batch, in micro-batches of 16
    """
    if backward is not None and not callable(backward):
        raise TypeError(f"`backward` must be None or a callable `backward(loss)`. Received: {describe(backward)}.")
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be a callable `loss_fn(*micro_batch) -> loss`. Received: {describe(loss_fn)}.")
    batches = list(micro_batches)
    if not batches:
        raise ValueError("`micro_batches` must hold at least one micro-batch. Received an empty sequence.")
    if weights is None:
        rows = [_rows(b) for b in batches]
        total = sum(rows)
        weights = [n / total for n in rows]
    else:
        weights = [float(w) for w in weights]
        if len(weights) != len(batches):
            raise ValueError(f"`weights` must have one value per micro-batch ({len(batches)}). Received {len(weights)}.")

    def closure(create_graph: bool = False) -> torch.Tensor:
        optimizer.zero_grad()
        total_loss = None
        for batch, weight in zip(batches, weights):
            args = batch if isinstance(batch, (tuple, list)) else (batch,)
            loss = loss_fn(*args) * weight
            if backward is None:
                loss.backward(create_graph=create_graph)
            elif create_graph:
                backward(loss, create_graph=True)
            else:
                backward(loss)
            total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
        return total_loss

    return closure
