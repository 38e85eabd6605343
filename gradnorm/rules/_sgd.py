"""The plain gradient: the baseline every rule reduces to."""

from __future__ import annotations

from ._base import Rule

__all__ = ["SGD"]


class SGD(Rule):
    r"""The plain minibatch gradient, $d = g = \nabla L(\theta)$.

    The reference every other rule must reduce to at zero strength. One gradient evaluation.
    """

    name = "sgd"
    uses_grad_norm = False

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        return grads, state, {}
