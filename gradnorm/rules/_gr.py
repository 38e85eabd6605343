"""Exact gradient regularization by Hessian-vector products (double backprop)."""

from __future__ import annotations

from ._base import Hyperparameter, Rule, choice, is_static_zero, real

__all__ = ["GR"]


class GR(Rule):
    r"""Exact gradient regularization.

    `penalty="squared"`: the exact gradient of $L + \tfrac{\gamma}{2}\lVert g\rVert^2$,

    $$ d = g + \gamma\, H g. $$

    `penalty="norm"`: the exact gradient of $L + \gamma \lVert g\rVert$,

    $$ d = g + \gamma\, \frac{H g}{\lVert g\rVert + \epsilon}. $$

    $H g$ comes from the oracle's Hessian-vector product (double backprop, or
    forward-over-reverse autodiff in the adapters). Cost: one gradient and one HVP
    (about 3 backward passes' worth of matrix products). `gamma = 0` returns $g$.

    References:
        Barrett, Dherin. [Implicit Gradient Regularization](https://arxiv.org/abs/2009.11162),
        ICLR 2021 (the squared penalty). Karakida, Takase, Hayase, Osawa. [Understanding
        Gradient Regularization in Deep Learning: Efficient Finite-Difference Computation and
        Implicit Bias](https://arxiv.org/abs/2210.02720), ICML 2023 (double backprop as the
        exact baseline). Zhao, Zhang, Hu, ICML 2022 (the norm penalty).

    Exact second derivatives are unavailable for some kernels (fused attention, cuDNN RNNs)
    and under DistributedDataParallel; use `fd_gr` there.
    """

    name = "gr"
    needs_hvp = True
    hyperparameters = (
        Hyperparameter("gamma", real(0.0), doc="the penalty strength", leafwise=True),
        Hyperparameter("penalty", choice("squared", "norm"), "squared", "(gamma/2)||g||^2 or gamma ||g||"),
    )

    @property
    def uses_grad_norm(self) -> bool:
        return self.penalty == "norm"

    @property
    def hvp_evals(self) -> int:
        return 0 if is_static_zero(self.gamma) else 1

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        if is_static_zero(self.gamma):
            return grads, state, {}
        hg = oracle.hvp(params, grads)
        coeff = self.gamma if self.penalty == "squared" else self.gamma / (grad_norm + self.norm_eps)
        return ops.axpy(coeff, hg, grads), state, {}
