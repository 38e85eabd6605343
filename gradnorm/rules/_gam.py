"""Gradient norm aware minimization (GAM), accelerated version as released by its authors."""

from __future__ import annotations

from typing import Any

from ._base import Hyperparameter, Rule, choice, flag, is_static_zero, real
from ._skip import all_zero, dynamic, unless_off

__all__ = ["GAM"]


class GAM(Rule):
    r"""Gradient norm aware minimization: penalizes first-order flatness,
    $R^{(1)}_\rho(\theta) = \rho \max_{\lVert\delta\rVert\le\rho}\lVert\nabla L(\theta+\delta)\rVert$.

    The accelerated algorithm of the authors' code (four gradient evaluations, same minibatch),
    with $P(\theta, v, r) = \theta + r\, v/(\lVert v\rVert + \xi)$
    (`adaptive`: $\theta + r\,\theta^2 \odot v/(\lVert |\theta| \odot v\rVert + \xi)$):

    1. $g_0 = \nabla L(\theta)$
    2. $g_1 = \nabla L(P(\theta, g_0, \rho'))$ with $\rho'$ = `grad_rho`
    3. $g_2 = \nabla L(\theta_2)$, $\theta_2 = P(\theta, g_1 - g_0, \rho)$ with
       $\rho$ = `grad_norm_rho` (ascent on the gradient norm, by finite difference)
    4. $g_3 = \nabla L(P(\theta_2, g_2, \rho'))$
    5. $h_+ = \beta_1 g_1 + (1-\beta_1) g_3$ and
       $h_- = g_0 + |1-\beta_0|\, g_2$ (code) or $\beta_0 g_0 + (1-\beta_0) g_2$
       (paper, `variant="paper"`)
    6. $h_-^\perp = h_- - \cos(h_-, h_+)\, \lVert h_-\rVert\, h_+ / (\lVert h_+\rVert + \xi)$
       with $\cos = \langle h_-, h_+\rangle / (\lVert h_+\rVert \lVert h_-\rVert + \xi)$
    7. $d = h_+ - \gamma\, h_-^\perp$ ($\gamma$ = `grad_gamma`)

    Hyperparameter names are the code's (`grad_beta_0` = $\beta$,
    `grad_beta_1` = $\alpha$ in the paper). Defaults are the code's defaults
    (CIFAR-100, ResNet): `grad_rho=0.02, grad_norm_rho=0.2, grad_beta_0=0.5,
    grad_beta_1=0.6, grad_gamma=0.03`. With `grad_rho = grad_norm_rho = 0` all four points
    coincide and the rule returns $g$ after one evaluation (0-d array radii too, at the steps where
    both are 0: ``info["grad_evals"]`` is 1 there).

    References:
        Zhang, Xu, Yu, Zou, Cui. [Gradient Norm Aware Minimization Seeks First-Order Flatness
        and Improves Generalization](https://arxiv.org/abs/2303.03108), CVPR 2023.
        Code: xxgege/GAM (`gam/gam.py`).

    Differences from the paper: the code scales $g_0$ by 1 in $h_-$ instead of
    $\beta_0$; gradnorm follows the code by default (`variant="code"`). The code
    restores the weights by subtracting the perturbations; gradnorm never changes them.
    """

    name = "gam"
    hyperparameters = (
        Hyperparameter("grad_rho", real(0.0), 0.02, "radius of the SAM-like ascent steps (rho' in the paper)", leafwise=True),
        Hyperparameter("grad_norm_rho", real(0.0), 0.2, "radius of the gradient-norm ascent step (rho)", leafwise=True),
        Hyperparameter("grad_beta_0", real(0.0, hi=1.0), 0.5, "weight of g0 against g2 in h- (beta)"),
        Hyperparameter("grad_beta_1", real(0.0, hi=1.0), 0.6, "weight of g1 against g3 in h+ (alpha)"),
        Hyperparameter("grad_gamma", real(0.0), 0.03, "strength of the orthogonal correction (gamma)", leafwise=True),
        Hyperparameter("adaptive", flag(), False, "ASAM-style perturbations scaled by theta^2"),
        Hyperparameter("variant", choice("code", "paper"), "code", "h- as in the released code or the paper"),
    )

    def _identity(self) -> bool:
        return is_static_zero(self.grad_rho) and is_static_zero(self.grad_norm_rho)

    @property
    def grad_evals(self) -> int:
        return 1 if self._identity() else 4

    @property
    def uses_grad_norm(self) -> bool:
        return not self.adaptive

    def _along(self, base: list[Any], v: list[Any], radius: Any, ops, *, own_v: bool = False) -> tuple[Any, list[Any]]:
        r"""`(step, u)` with $P(\theta, v, r) = \theta + \text{step}\cdot u$. `own_v`: `v` is a
        list the rule reads no more (adaptive: `u` may be computed in its buffer)."""
        if self.adaptive:
            w = ops.abs(base)
            wv = ops.mul_into(w, v, out=w)
            step = radius / (ops.norm(wv) + self.norm_eps)
            del w, wv
            squares = ops.mul(base, base)
            return step, (ops.mul_into(squares, v, out=v) if own_v else ops.mul_into(squares, v, out=squares))
        return radius / (ops.norm(v) + self.norm_eps), v

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        if self._identity():
            return grads, state, {}
        radii = (self.grad_rho, self.grad_norm_rho)
        if not all(dynamic(v) or is_static_zero(v) for v in radii):  # a radius that is a nonzero number
            direction, info = self._passes(params, grads, grad_norm, oracle, ops)
            return direction, state, info
        # 0-d array radii: the plain gradient, after one evaluation, at a step where both are 0
        losses = ("perturbed_loss", "norm_ascent_loss", "norm_ascent_perturbed_loss")
        plain = {**{k: loss for k in losses}, "cosine": ops.xp.zeros((), dtype=ops.acc_dtype(grads))}
        dtypes = {**{k: loss.dtype for k in losses}, "cosine": ops.acc_dtype(grads)}
        direction, info = unless_off(
            all_zero(ops.xp, [v for v in radii if dynamic(v)]), grads, oracle, ops,
            lambda g, donate: self._passes(params, g, grad_norm, oracle, ops), plain, dtypes,
        )
        return direction, state, info

    def _passes(self, params, grads, grad_norm, oracle, ops) -> tuple[list[Any], dict[str, Any]]:
        """The accelerated GAM direction from the four gradients, and the losses and cosine of `info`."""
        # Memory: every combination is computed in the buffer of a list the rule reads no more (the
        # oracle's answers, earlier results: `ops.*_into`), and the base of the last point is donated
        # to the oracle once that point is formed. At its peak (the fourth pass) a step holds g0, g1,
        # g2, the gradient being computed and the oracle's copy of the weights: four
        # parameter-sized buffers beyond a plain step (ALGORITHMS.md, section 0).
        eps = self.norm_eps
        g0 = grads
        if self.adaptive:
            step1, u1 = self._along(params, g0, self.grad_rho, ops)
            loss1, g1 = oracle.value_and_grad_along(params, step1, u1, donate=(u1,))
        else:  # reuse the norm already computed
            loss1, g1 = oracle.value_and_grad_along(params, self.grad_rho / (grad_norm + eps), g0)
        step2, u2 = self._along(params, ops.sub(g1, g0), self.grad_norm_rho, ops, own_v=True)
        x2 = ops.axpy_into(step2, u2, params, out=u2)  # the base of the last point
        del u2
        loss2, g2 = oracle.value_and_grad(x2)
        step3, u3 = self._along(x2, g2, self.grad_rho, ops)
        loss3, g3 = oracle.value_and_grad_along(x2, step3, u3, donate=(x2, u3) if self.adaptive else (x2,))
        del x2, u3

        b0, b1 = self.grad_beta_0, self.grad_beta_1
        h_plus = ops.lincomb_into(b1, g1, 1.0 - b1, g3, out=g3)
        del g1, g3
        if self.variant == "code":
            h_minus = ops.axpy_into(abs(1.0 - b0) if isinstance(b0, float) else ops.xp.abs(1.0 - b0), g2, g0, out=g2)
        else:
            h_minus = ops.lincomb_into(b0, g0, 1.0 - b0, g2, out=g2)
        del g2
        n_plus, n_minus = ops.norm(h_plus), ops.norm(h_minus)
        cosine = ops.vdot(h_minus, h_plus) / (n_plus * n_minus + eps)
        perp = ops.axpy_into(-cosine * n_minus / (n_plus + eps), h_plus, h_minus, out=h_minus)
        direction = ops.axpy_into(-self.grad_gamma, perp, h_plus, out=h_plus)
        info = {"perturbed_loss": loss1, "norm_ascent_loss": loss2, "norm_ascent_perturbed_loss": loss3, "cosine": cosine}
        return direction, info
