"""gradnorm with Hugging Face accelerate, including ``gradient_accumulation_steps``.

``accelerator.prepare`` wraps a `gradnorm.torch.Optimizer` in accelerate's ``AcceleratedOptimizer``,
whose ``step`` runs only on the micro-batches where ``accelerator.sync_gradients`` is True. Without
gradient accumulation, ``optimizer.step(closure)`` works as it is (the closure may call
``accelerator.backward``). With ``accelerator.accumulate(model)`` and
``gradient_accumulation_steps > 1`` the closures of the other micro-batches would never run, so
``step(closure)`` is refused there; instead each micro-batch runs its forward and
``accelerator.backward`` and registers itself with the optimizer, and ``optimizer.step()`` (without
a closure) runs the rule on the whole accumulated batch. `backward` does the three in one call::

    import gradnorm.torch.accelerate as gta

    model, optimizer, loader = accelerator.prepare(model, gradnorm.torch.Optimizer(...), loader)
    for x, y in loader:
        with accelerator.accumulate(model):
            loss = gta.backward(accelerator, optimizer, lambda x, y: F.cross_entropy(model(x), y), x, y)
            optimizer.step()        # accelerate forwards it on the last micro-batch of each step
            optimizer.zero_grad()

Importing this module imports accelerate; ``import gradnorm.torch`` does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import accelerate
import torch
from accelerate.utils import DistributedType

from .._errors import GradnormError, describe
from ._closure import check_closure_loss, rng_state, set_rng_state
from ._optimizer import Optimizer

__all__ = ["backward", "unwrap"]


def unwrap(optimizer: Any) -> Optimizer:
    """The `gradnorm.torch.Optimizer` behind accelerate's ``AcceleratedOptimizer`` (or `optimizer`
    itself). Use it for what the wrapper does not pass on: ``register_batch``, ``last_info``,
    ``step(closure, loss=loss)``."""
    inner = optimizer
    for _ in range(8):  # AcceleratedOptimizer, possibly inside another wrapper
        if isinstance(inner, Optimizer):
            return inner
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            break
    raise TypeError(
        f"`optimizer` must be a gradnorm.torch.Optimizer or accelerate's wrapper of one (from "
        f"`accelerator.prepare`). Received: {describe(optimizer)}."
    )


def _check_accelerator(accelerator: Any) -> None:
    if not isinstance(accelerator, accelerate.Accelerator):
        raise TypeError(f"`accelerator` must be an accelerate.Accelerator. Received: {describe(accelerator)}.")
    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise GradnormError(
            f"gradnorm.torch.accelerate does not support {kind}: its engine runs the backward and the optimizer "
            f"step itself, so the rule's extra passes cannot be evaluated. Use DDP (multi-GPU/multi-CPU) or FSDP."
        )
    if accelerator.scaler is not None:
        raise GradnormError(
            "mixed_precision='fp16' with accelerate's GradScaler: `AcceleratedOptimizer.step` unscales and checks only "
            "the gradient in `.grad` (the first pass) and updates the scale itself, while the rule's extra passes "
            "back-propagate scaled losses. Use mixed_precision='bf16' (no loss scaling), or run float16 without "
            "`accelerator.prepare` on the optimizer and give the GradScaler to gradnorm.torch.Optimizer(grad_scaler=...)."
        )


def backward(accelerator: Any, optimizer: Any, loss_fn: Callable[..., torch.Tensor], *batch: Any,
             **kwargs: Any) -> torch.Tensor:
    """One (micro-)batch: ``loss = loss_fn(*batch, **kwargs)``, ``accelerator.backward(loss)``, and
    the batch registered with the optimizer (`gradnorm.torch.Optimizer.register_batch`) with a
    closure that repeats both at the weights the rule evaluates. Returns ``loss`` (the batch's
    own loss, not divided by ``gradient_accumulation_steps``; detach it to keep it).

    Call it once per (micro-)batch, inside ``accelerator.accumulate(model)`` when accumulating, and
    then ``optimizer.step()`` without a closure: accelerate forwards the call on the micro-batch that
    completes a step, and the rule runs on the sum of the registered micro-batches' gradients (its
    extra passes run every registered micro-batch again), exactly as on the whole batch. The loss
    the rule sees (``flooding``, ``last_info["loss"]``) is the mean over the accumulated micro-batches.

    `batch` is bound here, so the closure repeats this micro-batch even when it runs after the loop
    has moved on; `loss_fn` must read its inputs from its arguments, not from loop variables.
    """
    opt = unwrap(optimizer)
    _check_accelerator(accelerator)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be a callable `loss_fn(*batch) -> loss`. Received: {describe(loss_fn)}.")
    steps = accelerator.gradient_accumulation_steps
    replay = rng_state() if opt.same_randomness else None  # dropout masks of this micro-batch's first pass
    loss = check_closure_loss(loss_fn(*batch, **kwargs), "loss_fn")
    accelerator.backward(loss)

    def closure() -> torch.Tensor:
        if replay is not None:
            set_rng_state(replay)
        again = loss_fn(*batch, **kwargs)
        accelerator.backward(again)  # the same division by gradient_accumulation_steps as the first pass
        return again.detach() / steps

    opt.register_batch(loss.detach() / steps, closure, replays_randomness=True)
    return loss
