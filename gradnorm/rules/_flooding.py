"""Flooding, as a rule (a direction) and as loss transforms."""

from __future__ import annotations

from typing import Any

from .. import _tree
from .._errors import HyperparameterError, describe
from ._base import Hyperparameter, Rule, real

__all__ = ["Flooding", "flood", "iflood"]


class Flooding(Rule):
    r"""Flooding: the gradient of the flooded loss $|L - b| + b$,

    $$ d = \operatorname{sign}(L - b)\, g, $$

    descent while the minibatch-mean loss is above the flood level $b$ and ascent
    below it (exactly `sgd` while $L > b$). One gradient evaluation, no state.
    For full-batch gradient descent with learning rate $\eta$, an ascent step followed by
    a descent step moves $\theta$ by $-\eta^2 H g + O(\eta^3)$, one
    finite-difference gradient-regularization step with step $\eta$ (Karakida et al.,
    2023): flooding performs FD-GR implicitly while the loss oscillates around $b$.

    `info["flood_sign"]` is the sign applied (+1 descent, -1 ascent).

    References:
        Ishida, Yamane, Sakai, Niu, Sugiyama. [Do We Need Zero Training Loss After Achieving
        Zero Training Error?](https://arxiv.org/abs/2002.08709), ICML 2020.
        For the loss transforms see `flood` and `iflood`.
    """

    name = "flooding"
    uses_grad_norm = False
    hyperparameters = (Hyperparameter("b", real(), doc="the flood level, a loss value (the paper picks it from 0.00 to 0.10 for benchmarks)"),)

    def compute_direction(self, params, grads, loss, grad_norm, state, oracle, ops):
        # ops.sign, not xp.sign: array_api_compat's torch sign fixes nan with a masked write,
        # which synchronizes a GPU with the host
        sign = ops.sign([loss - self.b])[0]
        return ops.scale(sign, grads), state, {"flood_sign": sign}


def _check_level(b: Any, fn: str) -> Any:
    try:
        return real()(fn, "b", b)
    except HyperparameterError as err:
        raise HyperparameterError(str(err).replace(f"of rule '{fn}'", f"of gradnorm.{fn}")) from None


def flood(loss: Any, b: float) -> Any:
    r"""The flooded loss $|L - b| + b$ of a minibatch-mean loss `loss` (Ishida et al., 2020).

    Works on a scalar of any Array API library (and on autodiff tensors: differentiate the
    result instead of `loss`). Equivalent to the `flooding` rule.
    """
    b = _check_level(b, "flood")
    xp = _namespace(loss, "loss")
    return xp.abs(loss - b) + b


def iflood(losses: Any, b: float) -> Any:
    r"""Instance-level flooding (iFlood, Xie et al., ICLR 2022): $\frac1B\sum_i (|\ell_i - b| + b)$.

    `losses` are the per-example losses (`reduction="none"`); each example is flooded
    separately, then the mean is taken, so an example already below the flood level is pushed
    back up while the others keep descending.
    """
    b = _check_level(b, "iflood")
    xp = _namespace(losses, "losses")
    if losses.ndim < 1:
        raise ValueError(
            f"`losses` of iflood must be the per-example losses (an array with at least one dimension). "
            f"Received: {describe(losses)}; for a batch-mean loss use `gradnorm.flood`."
        )
    return xp.mean(xp.abs(losses - b) + b)


def _namespace(x: Any, name: str) -> Any:
    if not _tree.is_array(x):
        raise TypeError(f"`{name}` must be an array (NumPy, PyTorch, JAX, TensorFlow, ...). Received: {describe(x)}.")
    return _tree.array_namespace(x)
