"""Finite-difference gradient regularization (F-GR, B-GR, central)."""

from __future__ import annotations

from typing import Any

from ._base import Hyperparameter, Rule, choice, flag, is_static_zero, real
from ._skip import any_zero, dynamic, unless_off

__all__ = ["FDGR"]


class FDGR(Rule):
    r"""Gradient regularization with the Hessian-vector product replaced by a finite difference.

    The objective is $L + \tfrac{\gamma}{2}\lVert g\rVert^2$ (as `gr` with
    `penalty="squared"`), whose gradient $g + \gamma H g$ is approximated along
    $g$ with step $s = \varepsilon$ (or $s = \varepsilon/(\lVert g\rVert +
    \epsilon)$ with `normalize=True`):

    * `difference="forward"` (F-GR, an ascent step):
      $Hg \approx (\nabla L(\theta + s g) - g) / s$
    * `difference="backward"` (B-GR, a descent step):
      $Hg \approx (g - \nabla L(\theta - s g)) / s$
    * `difference="central"`:
      $Hg \approx (\nabla L(\theta + s g) - \nabla L(\theta - s g)) / (2s)$

    and $d = g + \gamma\,(Hg \text{ estimate})$. On a quadratic loss all three equal
    `gr` exactly, for any step. With `gamma == eps` (forward, not normalized) the direction
    is $\nabla L(\theta + \varepsilon g)$, an un-normalized SAM step. Cost: 2 gradient
    evaluations (central: 3); `gamma = 0` returns $g$ after one (a 0-d array `gamma` too, at the steps
    where it is 0: ``info["grad_evals"]`` is 1 there).

    References:
        Karakida, Takase, Hayase, Osawa. [Understanding Gradient Regularization in Deep
        Learning: Efficient Finite-Difference Computation and Implicit Bias
](https://arxiv.org/abs/2210.02720), ICML 2023. The paper finds the forward (ascent)
        difference with a large step works best, better than backward and than double backprop.

    The paper defines the step on the raw gradient (no $1/\lVert g\rVert$), which is the
    default here; its experiments use SAM-like step grids, so `normalize=True` offers the
    gradient-normalized step as well (which of the two the experiments used is unverified).
    No official code was released.
    """

    name = "fd_gr"
    hyperparameters = (
        Hyperparameter("gamma", real(0.0), doc="the penalty strength of (gamma/2)||g||^2", leafwise=True),
        Hyperparameter("eps", real(0.0, lo_open=True), doc="the finite-difference step along g"),
        Hyperparameter("difference", choice("forward", "backward", "central"), "forward", "which finite difference"),
        Hyperparameter("normalize", flag(), False, "divide the step by ||g|| + norm_eps"),
    )

    @property
    def grad_evals(self) -> int:
        if is_static_zero(self.gamma):
            return 1
        return 3 if self.difference == "central" else 2

    @property
    def uses_grad_norm(self) -> bool:
        return self.normalize

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        if is_static_zero(self.gamma):
            return grads, state, {"step_size": self.eps}
        step = self.eps / (grad_norm + self.norm_eps) if self.normalize else self.eps
        if not dynamic(self.gamma):
            direction, info = self._difference(params, grads, step, oracle, ops)
            return direction, state, {"step_size": step, **info}

        # a 0-d array gamma: the plain gradient, after one evaluation, at a step where it is 0
        losses = {"forward": ("ascent_loss",), "backward": ("descent_loss",)}.get(
            self.difference, ("ascent_loss", "descent_loss"))
        direction, info = unless_off(
            any_zero(ops.xp, [self.gamma]), grads, oracle, ops,
            lambda g, donate: self._difference(params, g, step, oracle, ops),
            {k: loss for k in losses}, {k: loss.dtype for k in losses},
        )
        return direction, state, {"step_size": step, **info}

    def _difference(self, params, grads, step, oracle, ops) -> tuple[list[Any], dict[str, Any]]:
        """The direction from the finite difference and the losses at its points."""
        info: dict[str, Any] = {}
        # Memory: the difference and then the direction are computed in the buffer of the oracle's
        # last answer (read no more), so a step holds g, the perturbed gradient(s) and the oracle's
        # copy of the weights, and nothing else.
        if self.difference == "forward":
            info["ascent_loss"], g_plus = oracle.value_and_grad_along(params, step, grads)
            difference, denominator = ops.sub_into(g_plus, grads, out=g_plus), step
        elif self.difference == "backward":
            info["descent_loss"], g_minus = oracle.value_and_grad_along(params, -step, grads)
            difference, denominator = ops.sub_into(grads, g_minus, out=g_minus), step
        else:
            info["ascent_loss"], g_plus = oracle.value_and_grad_along(params, step, grads)
            info["descent_loss"], g_minus = oracle.value_and_grad_along(params, -step, grads)
            difference, denominator = ops.sub_into(g_plus, g_minus, out=g_plus), 2.0 * step
            del g_minus
        return ops.axpy_into(self.gamma / denominator, difference, grads, out=difference), info
