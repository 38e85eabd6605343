"""float16 mixed precision: what `gradnorm.torch.Optimizer` does with a ``torch.amp.GradScaler``.

The closure calls ``grad_scaler.scale(loss).backward()``; every pass's gradients are unscaled here
before the rule sees them (as ``GradScaler.unscale_`` does: multiplied by the float32 reciprocal of
the scale, on the device), and after the step the scale is updated with the scaler's own
growth/backoff policy from whether the step was finite. The optimizer skips a non-finite step, so
the user calls neither ``scaler.step`` nor ``scaler.update``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ScalerHook"]


class ScalerHook:
    """The optimizer's side of a ``GradScaler``: `unscale` a pass's gradients, `update` the scale."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def unscale(self, grads: list[torch.Tensor], *, in_place: bool = False) -> list[torch.Tensor]:
        """`grads` times the reciprocal of the scale; `in_place`: in their own buffers (the pass's
        fresh gradients, as ``GradScaler.unscale_`` does), so that unscaling costs no second copy."""
        scale = self.scaler._scale
        if scale is None:  # the closure did not scale (the scaler makes its scale on first use)
            return grads
        inv_scale = scale.double().reciprocal().float()
        if in_place and not any(g.requires_grad for g in grads):
            torch._foreach_mul_(grads, inv_scale)
            return grads
        return list(torch._foreach_mul(grads, inv_scale))

    def update(self, finite: Any) -> None:
        """Grow or back off the scale, on the device (no host read), from the step's `finite` flag."""
        s = self.scaler
        if s._scale is None:
            return
        found_inf = (~finite).to(torch.float32)
        torch._amp_update_scale_(s._scale, s._growth_tracker, found_inf, s._growth_factor, s._backoff_factor,
                                 s._growth_interval)
