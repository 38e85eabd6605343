"""Gradient-coherent strong L1/L2 regularization."""

from __future__ import annotations

from typing import Any, NamedTuple

from .._tree import placement
from ._base import Hyperparameter, Rule, choice, integer, is_static_zero, real

__all__ = ["Coherent", "CoherentState", "coherence", "fraction_below"]


class CoherentState(NamedTuple):
    """`step`: a 0-d int32 count of updates so far (for the `delay`)."""

    step: Any


def coherence(grads: list[Any], regularized: list[Any], grad_norm: Any, norm_eps: float, ops) -> Any:
    r"""gradnorm's coherence criterion: the cosine between the data gradient $g$ and the
    regularized direction $g + \lambda\nabla R$,
    $\langle g, g + \lambda\nabla R\rangle / (\lVert g\rVert\,\lVert g + \lambda\nabla R\rVert + \epsilon)$.

    Kept as a small function of its own so that it can be replaced once the paper's exact
    measure is known.
    """
    return ops.vdot(grads, regularized) / (grad_norm * ops.norm(regularized) + norm_eps)


def fraction_below(params: list[Any], tol: Any, ops) -> Any:
    """The fraction of all entries with $|\\theta| <$ `tol` (0-d, in the accumulation dtype): the
    paper's "compression", reported as `info["sparsity"]`. `tol` is a number or a 0-d array.
    Counted by `ops.fraction_below` (an adapter's ops count in few fused passes)."""
    return ops.fraction_below(params, tol)


class Coherent(Rule):
    r"""Gradient-coherent strong regularization: apply a strong L1/L2 term only while the
    gradients stay coherent in its presence.

    $$
    R = \tfrac12\lVert\theta\rVert^2 \ (\text{l2}) \quad\text{or}\quad \lVert\theta\rVert_1
    \ (\text{l1, subgradient } \operatorname{sign}\theta), \qquad
    d = g + \text{gate}\cdot\lambda \nabla R,
    $$

    where gate is 1 while $\cos(g, g + \lambda\nabla R) \ge$ `threshold` and the step
    count is at least `delay` (the "delayed strong regularization" of the authors' first
    version), and 0 otherwise. One gradient evaluation; the gate costs two reductions.
    `info` reports `gate`, `coherence` (the cosine) and `sparsity`, the fraction of
    parameters with $|\theta| <$ `sparsity_tol` (the paper's "compression").

    References:
        Park, Ho, Chang, Zhang. [Gradient-Coherent Strong Regularization for Deep Neural
        Networks](https://arxiv.org/abs/1811.08056) (earlier: "Achieving Strong
        Regularization for Deep Neural Networks", ICLR 2018 submission).

    The paper's exact coherence measure, threshold and hysteresis could not be retrieved (only
    the abstracts were): the cosine criterion is **gradnorm's reading** of "impose the
    regularizer only when the gradients stay coherent", implemented by `coherence`.
    """

    name = "coherent"
    state_type = CoherentState
    hyperparameters = (
        Hyperparameter("lam", real(0.0), doc="the regularization strength lambda", leafwise=True),
        Hyperparameter("penalty", choice("l2", "l1"), "l2", "R = ||theta||^2 / 2 or ||theta||_1"),
        Hyperparameter("threshold", real(-1.0, hi=1.0), doc="minimum cosine between g and g + lam grad R"),
        Hyperparameter("delay", integer(0), 0, "steps without regularization at the start"),
        Hyperparameter("sparsity_tol", real(0.0), 1e-3, "|theta| below this counts as zero in info['sparsity']"),
    )

    def init_leaves(self, params, ops):
        xp = ops.xp
        # zeros, not asarray(0): a Python number copied to a GPU would synchronize with the host
        return CoherentState(step=xp.zeros((), dtype=xp.int32, device=placement(params[0])))

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        info = {"sparsity": fraction_below(params, self.sparsity_tol, ops)}
        new_state = CoherentState(step=state.step + 1)
        if is_static_zero(self.lam):
            zero = ops.scalar(0.0, params)
            return grads, new_state, {**info, "gate": zero, "coherence": zero + 1.0}
        reg_grad = params if self.penalty == "l2" else ops.sign(params)
        regularized = ops.axpy(self.lam, reg_grad, grads)
        cos = coherence(grads, regularized, grad_norm, self.norm_eps, ops)
        active = ops.xp.logical_and(cos >= self.threshold, state.step >= self.delay)
        gate = ops.xp.astype(active, cos.dtype)
        direction = ops.axpy(gate * self.lam, reg_grad, grads)
        return direction, new_state, {**info, "gate": gate, "coherence": cos}
