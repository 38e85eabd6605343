"""Sharpness-aware minimization (SAM) and its adaptive variant (ASAM)."""

from __future__ import annotations

from typing import Any

from ._base import Hyperparameter, Rule, flag, is_static_zero, real
from ._skip import any_zero, dynamic, unless_off

__all__ = ["SAM", "ascent_step"]


def ascent_step(direction_norm: Any, radius: Any, norm_eps: float) -> Any:
    r"""The step $r / (\lVert v\rVert + \epsilon)$ along $v$ to the ascent point
    $\theta + r\, v / (\lVert v\rVert + \epsilon)$, shared by SAM and GNP so that
    `gnp(alpha=1, r)` and `sam(rho=r)` take bit-identical steps.

    The step is a 0-d array in the accumulation dtype (float32 at least): at $v = 0$ it is
    $r / \epsilon$ (5e10 with the defaults), finite there. `ArrayOps` saturates it at the largest
    finite value of a narrower leaf dtype (65504 in float16) when it multiplies a leaf, so the
    ascent point at a zero gradient is $\theta$ itself, never NaN."""
    return radius / (direction_norm + norm_eps)


class SAM(Rule):
    r"""Sharpness-aware minimization, optionally adaptive (ASAM).

    $$
    e = \rho\, \frac{g}{\lVert g\rVert + \epsilon}, \qquad d = \nabla L(\theta + e).
    $$

    Adaptive (ASAM): with $T = |\theta| + \eta$ elementwise,
    $e = \rho\, T^2 \odot g / (\lVert T \odot g\rVert + \epsilon)$.

    Two gradient evaluations on the same minibatch; `rho = 0` returns $g$ after one (a 0-d array
    `rho`, a schedule's value, is compared with 0 at every step: ``info["grad_evals"]`` is 1 where
    it is 0).
    The norm is global over all leaves and $\epsilon$ (`norm_eps`) is added outside the
    square root, as in the PyTorch reference code (davda54/sam, pytorch_optimizer).

    References:
        Foret, Kleiner, Mobahi, Neyshabur. [Sharpness-Aware Minimization for Efficiently
        Improving Generalization](https://arxiv.org/abs/2010.01412), ICLR 2021.
        Kwon, Kim, Park, Choi. [ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
        Learning of Deep Neural Networks](https://arxiv.org/abs/2102.11600), ICML 2021.

    A zero gradient never gives NaN, in any dtype: `norm_eps` keeps the step finite in the
    accumulation dtype (float32 at least), and the step saturates at the largest finite value of a
    float16 or bfloat16 leaf instead of overflowing to ``inf`` there (see `gradnorm.ArrayOps`); in
    float16 a gradient with $\lVert g\rVert < \rho / 65504$ thus gets a shorter perturbation.

    Differences from the official code:
        * google-research/sam and `optax.contrib.sam` divide by the raw norm (NaN at
          $g = 0$); gradnorm adds `norm_eps` (set it to 0 to match them exactly).
        * The official ASAM applies $\eta$ only to parameters named `weight` (biases get
          $T = 1$); gradnorm, like davda54/sam, applies $T = |\theta| + \eta$ to
          every leaf. ASAM needs a larger `rho` than SAM (0.5 to 2.0 in the papers' code).
        * Weight decay belongs to the base optimizer, so it is not part of the perturbation.
    """

    name = "sam"
    hyperparameters = (
        Hyperparameter("rho", real(0.0), doc="the perturbation radius; 0.05 in the SAM paper", leafwise=True),
        Hyperparameter("adaptive", flag(), False, "ASAM: scale the perturbation by |theta| + eta"),
        Hyperparameter("eta", real(0.0), 0.0, "ASAM's offset in T = |theta| + eta", leafwise=True),
    )

    @property
    def grad_evals(self) -> int:
        return 1 if is_static_zero(self.rho) else 2

    @property
    def uses_grad_norm(self) -> bool:
        return not self.adaptive  # ASAM normalizes T * g instead

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        if is_static_zero(self.rho):
            return grads, state, {"perturbed_loss": loss}
        if not dynamic(self.rho):
            direction, perturbed_loss = self._perturbed(params, grads, grad_norm, oracle, ops, donate=True)
            return direction, state, {"perturbed_loss": perturbed_loss}

        # a 0-d array rho: the plain gradient, after one evaluation, at a step where it is 0
        def perturbed(g: list[Any], donate: bool) -> tuple[list[Any], dict[str, Any]]:
            direction, perturbed_loss = self._perturbed(params, g, grad_norm, oracle, ops, donate=donate)
            return direction, {"perturbed_loss": perturbed_loss}

        direction, info = unless_off(any_zero(ops.xp, [self.rho]), grads, oracle, ops, perturbed,
                                     {"perturbed_loss": loss}, {"perturbed_loss": loss.dtype})
        return direction, state, info

    def _perturbed(self, params, grads, grad_norm, oracle, ops, *, donate: bool) -> tuple[list[Any], Any]:
        """The gradient at the ascent point and the loss there. `donate`: `grads` is read no more."""
        # Memory: g is dead once the weights hold theta + e, so it is donated to the oracle, which
        # releases it before the second pass; the perturbed gradient takes its place (the extra
        # memory of a step is the oracle's copy of the weights, nothing else).
        if self.adaptive:
            t = ops.abs(params)
            if not is_static_zero(self.eta):
                t = ops.add_scalar_into(t, self.eta, out=t)
            tg = ops.mul(t, grads)
            step = ascent_step(ops.norm(tg), self.rho, self.norm_eps)
            v = ops.mul_into(t, tg, out=tg)  # T * (T * g)
            del t, tg
            perturbed_loss, perturbed_grads = oracle.value_and_grad_along(
                params, step, v, donate=(grads, v) if donate else (v,)
            )
        else:
            step = ascent_step(grad_norm, self.rho, self.norm_eps)
            perturbed_loss, perturbed_grads = oracle.value_and_grad_along(
                params, step, grads, donate=(grads,) if donate else ()
            )
        return perturbed_grads, perturbed_loss
