"""Rules that exist only for tests (never registered): one that lies about its cost, and one whose
state holds parameter-sized buffers (the shape of a periodic / LookSAM-style rule)."""

from __future__ import annotations

from typing import Any, NamedTuple

from gradnorm.rules import Hyperparameter, Rule, real


class Underreporting(Rule):
    """Declares one gradient evaluation and spends two: the gradient at theta + rho * g."""

    name = "_test_underreporting"
    hyperparameters = (Hyperparameter("rho", real(0.0), 0.1, "step along g"),)

    @property
    def grad_evals(self) -> int:
        return 1  # a lie: compute_direction evaluates twice

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        perturbed_loss, perturbed = oracle.value_and_grad_along(params, self.rho, grads)
        return perturbed, state, {"perturbed_loss": perturbed_loss}


class BufferState(NamedTuple):
    count: Any  # 0-d int32
    previous: list[Any]  # the direction of the previous step, one array per parameter leaf


class WithBuffer(Rule):
    """d_t = g_t + beta * d_{t-1}: a state with one parameter-sized array per leaf."""

    name = "_test_with_buffer"
    state_type = BufferState
    hyperparameters = (Hyperparameter("beta", real(0.0), 0.5, "weight of the previous direction"),)

    def init_leaves(self, params, ops):
        xp = ops.xp
        return BufferState(count=xp.zeros((), dtype=xp.int32), previous=[xp.zeros_like(p) for p in params])

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        direction = ops.axpy(self.beta, state.previous, grads)
        return direction, BufferState(count=state.count + 1, previous=direction), {}
