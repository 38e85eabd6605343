"""Refuse ``step(closure)`` under Hugging Face accelerate's gradient accumulation.

With ``Accelerator(gradient_accumulation_steps=N)``, N > 1, ``AcceleratedOptimizer.step`` does
nothing on the micro-batches where ``accelerator.sync_gradients`` is False, so a closure passed to
it is never run for them: ``step(closure)`` would silently be the rule on every N-th micro-batch
(its loss divided by N by ``accelerator.backward``). Nothing reaches gradnorm on those calls, so the
optimizer checks accelerate's state on the calls that do reach it, before anything changes.

This module reads accelerate's process-wide ``GradientState`` only when accelerate is already
imported; it never imports accelerate itself.
"""

from __future__ import annotations

import sys

from .._errors import GradnormError

__all__ = ["accumulation_steps", "refuse_closure_under_accumulation"]


def accumulation_steps() -> int:
    """accelerate's ``gradient_accumulation_steps`` in this process (1 when accelerate is not
    imported, no ``Accelerator`` exists, or its state cannot be read)."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return 1
    try:
        shared = state.GradientState._shared_state  # a dict (thread-local storage under XLA)
        steps = (shared.get("plugin_kwargs") or {}).get("num_steps", 1)
        return int(steps) if steps else 1
    except Exception:  # noqa: BLE001 - another accelerate version: never break a step over this check
        return 1


def refuse_closure_under_accumulation() -> None:
    """A `GradnormError` if ``step(closure)`` runs while accelerate accumulates gradients."""
    steps = accumulation_steps()
    if steps <= 1:
        return
    raise GradnormError(
        f"step(closure) with accelerate's gradient_accumulation_steps={steps}: `AcceleratedOptimizer.step` does "
        f"nothing on the micro-batches where `accelerator.sync_gradients` is False, so their closures never run and "
        f"the step would be the rule on every {steps}th micro-batch only (its loss divided by {steps} by "
        f"`accelerator.backward`). Either keep `accelerator.accumulate(model)` and, per micro-batch, run the forward "
        f"and `accelerator.backward(loss)` yourself, register the batch and call `optimizer.step()` without a "
        f"closure: `loss = gradnorm.torch.accelerate.backward(accelerator, optimizer, loss_fn, *batch); "
        f"optimizer.step(); optimizer.zero_grad()` (equal to the rule on the whole accumulated batch); or use "
        f"gradient_accumulation_steps=1 and accumulate inside the closure: `optimizer.step(gradnorm.torch."
        f"accumulating_closure(gradnorm_optimizer, loss_fn, micro_batches, backward=accelerator.backward))`."
    )
