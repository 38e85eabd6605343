"""Gradient norm penalty (GNP)."""

from __future__ import annotations

from ._base import Hyperparameter, Rule, flag, is_static, is_static_zero, real
from ._sam import ascent_step

__all__ = ["GNP"]


class GNP(Rule):
    r"""Gradient norm penalty: the finite-difference gradient of $L + \lambda\lVert g\rVert$.

    $$
    \hat g = \frac{g}{\lVert g\rVert + \epsilon}, \qquad
    d = (1 - \alpha)\, g + \alpha\, \nabla L(\theta + r \hat g), \qquad \alpha = \lambda / r.
    $$

    `alpha = 1` is SAM with `rho = r` (bit for bit: both use the same ascent point);
    `alpha = 0` or `r = 0` returns $g$ after one evaluation. Two gradient evaluations
    on the same minibatch.

    References:
        Zhao, Zhang, Hu. [Penalizing Gradient Norm for Efficiently Improving Generalization
        in Deep Learning](https://arxiv.org/abs/2202.03599), ICML 2022. Code: zhaoyang-0204/gnp.

    Differences from the official code:
        * The official code's default (`norm_perturbations=True`) mixes the *unit* vector:
          $d = (1-\alpha)\hat g + \alpha \nabla L(\theta + r\hat g)$. gradnorm follows the
          paper by default; `mix_unit_gradient=True` reproduces the code.
        * The official code divides by the raw norm (no epsilon) and clips the final gradient
          at global norm 5; clipping is the base optimizer's business here.
        * The papers' recipes use `alpha = 0.8` and `r = 0.1` (CIFAR) or `0.05` (ImageNet).
    """

    name = "gnp"
    hyperparameters = (
        Hyperparameter("r", real(0.0), doc="the perturbation radius; 0.1 (CIFAR) or 0.05 (ImageNet) in the paper", leafwise=True),
        Hyperparameter("alpha", real(0.0), doc="the mixing weight lambda / r; 0.8 in the paper's recipes", leafwise=True),
        Hyperparameter(
            "mix_unit_gradient", flag(), False, "mix g/||g|| instead of g, as the official code's default does"
        ),
    )

    def _identity(self) -> bool:
        return (is_static_zero(self.alpha) or is_static_zero(self.r)) and not self.mix_unit_gradient

    @property
    def grad_evals(self) -> int:
        return 1 if self._identity() else 2

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        if self._identity():
            return grads, state, {"perturbed_loss": loss}
        step = ascent_step(grad_norm, self.r, self.norm_eps)
        if is_static(self.alpha, 1.0):  # SAM: g is dead once the point is formed
            perturbed_loss, perturbed_grads = oracle.value_and_grad_along(params, step, grads, donate=(grads,))
            return perturbed_grads, state, {"perturbed_loss": perturbed_loss}
        perturbed_loss, perturbed_grads = oracle.value_and_grad_along(params, step, grads)
        # (1 - alpha) g_first + alpha g_p, computed in the buffer of g_p (the oracle's answer, read no
        # more), so a step holds g, g_p and the oracle's copy of the weights and nothing else. The
        # unit gradient of `mix_unit_gradient` is folded into the coefficient: no scaled copy of g.
        first = (1.0 - self.alpha) / (grad_norm + self.norm_eps) if self.mix_unit_gradient else 1.0 - self.alpha
        direction = ops.lincomb_into(first, grads, self.alpha, perturbed_grads, out=perturbed_grads)
        return direction, state, {"perturbed_loss": perturbed_loss}
