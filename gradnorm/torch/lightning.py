"""gradnorm inside the Lightning ``Trainer``: a mixin for ``LightningModule``.

``gradnorm.torch.Optimizer`` already works in Lightning's automatic optimization as it is (the
optimizer calls Lightning's closure, which runs ``training_step`` and the backward, once per pass).
Three things need the module's cooperation, and `GradnormModule` provides them::

    class Model(gradnorm.torch.lightning.GradnormModule, L.LightningModule):
        def training_step(self, batch, batch_idx):
            ...
            self.log("train_loss", loss)    # logged from the first pass only
            return loss

        def configure_optimizers(self):
            return gradnorm.torch.Optimizer(self.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.1)

* **Logging**: ``training_step`` runs in every pass; ``self.log``/``self.log_dict`` are ignored during
  the extra passes (at perturbed weights), so ``train_loss`` is the loss at the current weights.
* **Clipping**: Lightning clips after every closure call, i.e. every pass's gradient, not the
  rule's direction. With this mixin, ``Trainer(gradient_clip_val=c)`` (norm clipping) clips the
  direction instead (`Optimizer.clip_grad_norm`); value clipping is refused.
* **float16** (``GradScaler``): Lightning's ``"16-mixed"`` precision unscales the first pass and calls
  ``optimizer.step()`` without a closure, which cannot run the extra passes. Give the Trainer
  `GradnormMixedPrecision` instead (``plugins=[GradnormMixedPrecision("16-mixed", "cuda")]``): the
  gradnorm optimizer then owns Lightning's scaler (unscales every pass, skips an overflow step
  with the weights exactly as they were, updates the scale).
* **Accumulation**: ``accumulate_grad_batches > 1`` cannot be exact (Lightning runs the earlier
  micro-batches before the optimizer step, and the rule's extra passes need all of them at the
  perturbed weights): refused at the start of ``fit`` with the recipe, `accumulating_closure` in
  manual optimization.

Importing this module imports Lightning; ``import gradnorm.torch`` does not.
"""

from __future__ import annotations

from typing import Any

import lightning  # noqa: F401  (the integration is for Lightning 2.x)
from lightning.pytorch.plugins.precision import MixedPrecision

from .._errors import GradnormError
from ._optimizer import Optimizer
from ._passes import is_extra_pass

__all__ = ["GradnormMixedPrecision", "GradnormModule", "unwrap"]


def unwrap(optimizer: Any) -> Any:
    """The optimizer behind Lightning's ``LightningOptimizer`` wrapper (or `optimizer` itself)."""
    return getattr(optimizer, "optimizer", optimizer) if not isinstance(optimizer, Optimizer) else optimizer


class GradnormModule:
    """Mixin for a ``LightningModule`` trained with `gradnorm.torch.Optimizer` (put it first:
    ``class Model(GradnormModule, L.LightningModule)``)."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        if not is_extra_pass():
            super().log(*args, **kwargs)  # type: ignore[misc]

    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        if not is_extra_pass():
            super().log_dict(*args, **kwargs)  # type: ignore[misc]

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        inner = unwrap(optimizer)
        if not isinstance(inner, Optimizer):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)  # type: ignore[misc]
        if not gradient_clip_val:
            return None
        if str(gradient_clip_algorithm or "norm") != "norm":
            raise GradnormError(
                f"gradient_clip_algorithm={gradient_clip_algorithm!r} would clip each pass's gradient, not the rule's "
                f"direction: use gradient_clip_algorithm='norm' (clips the direction) or no clipping."
            )
        inner.clip_grad_norm = float(gradient_clip_val)  # applied to the direction in step(); nothing per pass
        return None

    def on_fit_start(self) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        if self.automatic_optimization and trainer.accumulate_grad_batches > 1:  # type: ignore[attr-defined]
            raise GradnormError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) cannot be exact with a gradnorm rule: "
                f"Lightning back-propagates the earlier micro-batches before the optimizer step, and the rule's extra "
                f"passes need every micro-batch at the perturbed weights. Use accumulate_grad_batches=1 and accumulate "
                f"inside the step: set `self.automatic_optimization = False` and in training_step call "
                f"`opt = self.optimizers(); opt.step(gradnorm.torch.accumulating_closure(opt.optimizer, loss_fn, "
                f"micro_batches, backward=self.manual_backward))` (equal to the rule on the whole batch)."
            )
        parent = getattr(super(), "on_fit_start", None)
        if parent is not None:
            parent()


class GradnormMixedPrecision(MixedPrecision):
    """Lightning's mixed precision for `gradnorm.torch.Optimizer`: with a ``GradScaler`` (``"16-mixed"``)
    the optimizer owns the scaler and runs Lightning's closure (``training_step`` and the scaled
    backward) in every pass; ``Trainer(gradient_clip_val=c)`` clips the rule's direction. Other
    optimizers, and ``"bf16-mixed"``, go through Lightning's own path."""

    def optimizer_step(self, optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        inner = unwrap(optimizer)
        if self.scaler is None or not isinstance(inner, Optimizer):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if inner.grad_scaler is not self.scaler:
            inner.use_grad_scaler(self.scaler)
        trainer = getattr(model, "trainer", None)
        clip = getattr(trainer, "gradient_clip_val", None)
        if clip:
            if str(getattr(trainer, "gradient_clip_algorithm", None) or "norm") != "norm":
                raise GradnormError("Only gradient_clip_algorithm='norm' is supported with a gradnorm rule: it clips the "
                                    "rule's direction.")
            inner.clip_grad_norm = float(clip)
        # Lightning's closure only: the optimizer unscales every pass itself (no per-pass unscale or
        # clipping here; Lightning's on_before_optimizer_step hooks do not run in this path)
        return inner.step(closure, **kwargs)
