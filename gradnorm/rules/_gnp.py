"""Gradient norm penalty (GNP)."""

from __future__ import annotations

from typing import Any

from ._base import Hyperparameter, Rule, flag, is_static, is_static_zero, real
from ._sam import ascent_step
from ._skip import any_zero, dynamic, unless_off

__all__ = ["GNP"]


class GNP(Rule):
    r"""Gradient norm penalty: the finite-difference gradient of $L + \lambda\lVert g\rVert$.

    $$
    \hat g = \frac{g}{\lVert g\rVert + \epsilon}, \qquad
    d = (1 - \alpha)\, g + \alpha\, \nabla L(\theta + r \hat g), \qquad \alpha = \lambda / r.
    $$

    `alpha = 1` is SAM with `rho = r` (bit for bit: both use the same ascent point).
    `r = 0` or `alpha = 0` returns $g$ after one gradient evaluation, with or without
    `mix_unit_gradient`: a Python number takes the shortcut when the rule is built; a 0-d array
    (a schedule's value, as in a GR warm-up) is compared with 0 at every step, and the second
    evaluation runs only when neither is 0 (``ops.cond``: ``jax.lax.cond`` under ``jax.jit``,
    ``tf.cond`` under ``tf.function``, a host read eagerly), so ``info["grad_evals"]`` is 1 at
    such a step. Otherwise two gradient evaluations on the same minibatch.

    References:
        Zhao, Zhang, Hu. [Penalizing Gradient Norm for Efficiently Improving Generalization
        in Deep Learning](https://arxiv.org/abs/2202.03599), ICML 2022. Code: zhaoyang-0204/gnp.
        Zhao, Zhang, Hu. When Will Gradient Regularization Be Harmful?, ICML 2024 (the GR
        warm-up, `gradnorm.schedules.gnp_warmup`).

    Differences from the official code:
        * The official code's default (`norm_perturbations=True`) mixes the *unit* vector:
          $d = (1-\alpha)\hat g + \alpha \nabla L(\theta + r\hat g)$. gradnorm follows the
          paper by default; `mix_unit_gradient=True` reproduces the code, including its
          fallback to the plain gradient when `r` is 0 (``train_step``: ``if r > 0: ... else:``
          one plain gradient).
        * The official code applies that fallback to its configured `r` only: a warmed-up value
          that is 0 at the first step (strategy ``"r"``: $r_0 = 0$; ``"lambda"``: $\alpha_0 = 0$)
          still goes through the formula, which with the unit mix gives
          $(1-\alpha)\hat g + \alpha g$ (``"r"``) or $\hat g$ (``"lambda"``) at that one step.
          gradnorm returns $g$ there (zero strength is the plain gradient, in every setting);
          from the second step on the two agree. Without `mix_unit_gradient` both give $g$.
        * The official code divides by the raw norm (no epsilon): `norm_eps=0` matches it (and
          gives NaN weights at a zero gradient, as the official code does; the default
          `norm_eps` keeps them finite). It clips the final gradient at global norm 5; clipping
          is the base optimizer's business here (``clip_grad_norm`` of the adapters).
        * The papers' recipes use `alpha = 0.8` and `r = 0.1` (CIFAR) or `0.05` (ImageNet),
          except the ViT CIFAR recipe with GR warm-up (`alpha = 1.0`, `r = 0.1`, strategy
          ``"zero"``).
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
        return is_static_zero(self.alpha) or is_static_zero(self.r)

    @property
    def grad_evals(self) -> int:
        """The most one step costs: 1 at a zero strength given as a number, else 2 (a step whose
        0-d array `r` or `alpha` is 0 spends 1, reported in ``info["grad_evals"]``)."""
        return 1 if self._identity() else 2

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        if self._identity():
            return grads, state, {"perturbed_loss": loss}
        arrays = [v for v in (self.r, self.alpha) if dynamic(v)]
        if not arrays:
            direction, perturbed_loss = self._penalized(params, grads, grad_norm, oracle, ops, donate=True)
            return direction, state, {"perturbed_loss": perturbed_loss}

        # A 0-d array strength: the plain gradient, after one evaluation, at a step where it is 0.
        def penalized(g: list[Any], donate: bool) -> tuple[list[Any], dict[str, Any]]:
            direction, perturbed_loss = self._penalized(params, g, grad_norm, oracle, ops, donate=donate)
            return direction, {"perturbed_loss": perturbed_loss}

        direction, info = unless_off(any_zero(ops.xp, arrays), grads, oracle, ops, penalized,
                                     {"perturbed_loss": loss}, {"perturbed_loss": loss.dtype})
        return direction, state, info

    def _penalized(self, params, grads, grad_norm, oracle, ops, *, donate: bool) -> tuple[list[Any], Any]:
        r"""$(1-\alpha)\,g + \alpha\,\nabla L(\theta + r\hat g)$ (the unit $\hat g$ in the first term with
        `mix_unit_gradient`) and the loss at the ascent point."""
        step = ascent_step(grad_norm, self.r, self.norm_eps)
        if is_static(self.alpha, 1.0):  # SAM: g is dead once the point is formed
            perturbed_loss, perturbed_grads = oracle.value_and_grad_along(
                params, step, grads, donate=(grads,) if donate else ()
            )
            return perturbed_grads, perturbed_loss
        perturbed_loss, perturbed_grads = oracle.value_and_grad_along(params, step, grads)
        # (1 - alpha) g_first + alpha g_p, computed in the buffer of g_p (the oracle's answer, read no
        # more), so a step holds g, g_p and the oracle's copy of the weights and nothing else. The
        # unit gradient of `mix_unit_gradient` is folded into the coefficient: no scaled copy of g.
        first = (1.0 - self.alpha) / (grad_norm + self.norm_eps) if self.mix_unit_gradient else 1.0 - self.alpha
        direction = ops.lincomb_into(first, grads, self.alpha, perturbed_grads, out=perturbed_grads)
        return direction, perturbed_loss
