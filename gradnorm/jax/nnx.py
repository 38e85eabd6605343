"""gradnorm for flax nnx: ``Optimizer``, a ``flax.nnx.Optimizer`` whose update takes a loss of
the **model**.

``nnx.Optimizer(model, gradnorm.jax.transform(...), wrt=nnx.Param)`` runs, but its ``loss_fn``
receives the parameters as a pure ``nnx.State``, not the model; rebuilding the model inside it
with ``nnx.merge`` touches the model's own BatchNorm and RNG variables from the perturbed passes
(a ``TraceContextError`` under ``nnx.jit``) unless the merge copies them; and the rule's ``info``
is held in the optimizer state as ``OptArray`` variables. This ``Optimizer`` does that work:

* ``update(model, loss_fn=lambda m: loss(m, x, y))`` evaluates ``loss_fn`` on the model itself
  at the current parameters (``nnx.value_and_grad``: BatchNorm statistics and RNG streams are
  updated by this pass, exactly as in a plain nnx training step), then the rule's extra passes on
  a copy of the model holding the perturbed parameters and the model's other variables as they
  were before the step: the extra passes update nothing, and (``same_key=True``, default) draw
  the same dropout masks as the first pass, as the reference JAX code of SAM does.
* ``info`` is the rule's ``info`` of the last update as plain ``jax.Array`` s.

Importing this module imports flax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from flax import nnx
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("gradnorm.jax.nnx needs flax (0.11 or later): `pip install flax`.") from err

from .._errors import describe
from ._common import check_loss_output
from ._transform import transform

__all__ = ["Optimizer"]


class Optimizer(nnx.Optimizer):
    """A ``flax.nnx.Optimizer`` that applies a gradnorm rule in front of any optax optimizer.

    Args:
        model: the ``nnx.Module`` to train.
        base: any optax ``GradientTransformation`` (``optax.sgd(0.1, momentum=0.9)``,
            ``optax.adamw(...)``, a chain): it receives the rule's direction in place of the
            gradient. Clip there (``optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))``)
            to clip the rule's direction.
        rule: a rule name (``gradnorm.available_rules()``) or a ``gradnorm.rules.Rule``.
        wrt: the variables to train (an nnx filter), as for ``nnx.Optimizer``; default
            ``nnx.Param``.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; ``update`` then returns ``(loss, aux)`` of
            the pass at the current parameters.
        same_key: ``True`` (default): the extra passes see the model's RNG streams as the first
            pass did (the same dropout masks in every pass); ``False``: as the first pass left
            them (the extra passes draw new masks; every extra pass of a step the same ones).
            Either way the model's streams advance by the first pass only.
        **hyperparameters: the rule's (``rho=0.05``, ...); also ``axis_name`` and
            ``perturbation`` of ``gradnorm.jax.transform``.

    The state is ``nnx.Optimizer``'s: ``step`` (the number of updates), ``opt_state`` (the
    state of ``gradnorm.jax.transform``, as ``OptState`` variables), ``tx`` and ``wrt``; save and
    restore it as any nnx optimizer (``nnx.state(optimizer)``).

    Example::

        model = Net(rngs=nnx.Rngs(0))
        optimizer = gradnorm.jax.nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), rule="sam", rho=0.05)

        @nnx.jit
        def train_step(model, optimizer, x, y):
            return optimizer.update(model, loss_fn=lambda m: cross_entropy(m(x), y))   # the loss

        loss = train_step(model, optimizer, x, y)
        optimizer.info["perturbed_loss"]
    """

    def __init__(self, model: Any, base: Any, *, rule: Any, wrt: Any = nnx.Param, has_aux: bool = False,
                 same_key: bool = True, **hyperparameters: Any):
        if not isinstance(model, nnx.Module):
            raise TypeError(
                f"`model` of gradnorm.jax.nnx.Optimizer must be a flax nnx.Module. Received: {describe(model)}."
            )
        if not isinstance(same_key, bool):
            raise TypeError(
                f"`same_key` of gradnorm.jax.nnx.Optimizer must be True or False. Received: {describe(same_key)}."
            )
        tx = transform(base, rule, has_aux=has_aux, **hyperparameters)
        super().__init__(model, tx, wrt=wrt)
        self.has_aux = has_aux
        self.same_key = same_key

    @property
    def info(self) -> dict[str, Any]:
        """The rule's ``info`` of the last update (before the first: zeros, ``finite=True``):
        ``loss``, ``grad_norm``, ``update_norm``, ``finite``, ``grad_evals``, ``hvp_evals`` and
        the rule's own entries, as 0-d ``jax.Array`` s."""
        return dict(nnx.as_pure(self.opt_state.info))

    def update(self, model: Any, grads: Any = None, /, *, loss_fn: Callable[[Any], Any] | None = None,
               value: Any = None, **kwargs: Any) -> Any:
        """One step: the rule's direction from ``loss_fn``, then ``base``; the model's parameters
        (the ``wrt`` variables) are updated in place.

        Args:
            model: the model given to the constructor.
            grads: optional: the gradient at the current parameters, if you computed it
                (``nnx.grad(loss_fn)(model)``, an ``nnx.State`` of the ``wrt`` variables);
                without it ``update`` computes it (and the loss) with ``nnx.value_and_grad``.
                Given, the extra passes see the model's variables as they are when ``update``
                is called, after your pass (``same_key`` then has no effect).
            loss_fn: ``loss_fn(model) -> loss`` (or ``(loss, aux)`` with ``has_aux=True``) on
                the current batch. Required.
            value: with ``grads``: the loss at the current parameters (without it the rule
                evaluates ``loss_fn`` once more, on a copy).
            **kwargs: passed on to ``base`` (as ``nnx.Optimizer.update`` does).

        Returns:
            The loss at the current parameters (before the update); with ``has_aux=True`` and
            no ``grads``, ``(loss, aux)``.
        """
        if loss_fn is None and callable(grads) and not isinstance(grads, nnx.State):
            raise TypeError(
                "gradnorm.jax.nnx.Optimizer.update takes the loss as a keyword: `update(model, loss_fn=...)`; "
                "it computes the gradient itself. Received a callable as `grads`."
            )
        if not callable(loss_fn):
            raise TypeError(
                f"`loss_fn` of gradnorm.jax.nnx.Optimizer.update must be a callable `loss_fn(model) -> loss` on the "
                f"current batch. Received: {describe(loss_fn)}."
            )
        if not isinstance(model, nnx.Module):
            raise TypeError(
                f"`model` of gradnorm.jax.nnx.Optimizer.update must be the nnx.Module being trained. "
                f"Received: {describe(model)}."
            )
        has_aux = self.has_aux
        graphdef, _, rest = nnx.split(model, self.wrt, ...)
        rest = nnx.as_pure(rest)  # the other variables (BatchNorm statistics, RNG streams) before this step
        out = None
        if grads is None:
            def checked(m: Any) -> tuple[Any, Any]:
                return check_loss_output(loss_fn(m), has_aux)

            (loss, aux), grads = nnx.value_and_grad(checked, argnums=nnx.DiffState(0, self.wrt), has_aux=True)(model)
            out = (loss, aux) if has_aux else loss
            value = loss
            if not self.same_key:
                rest = nnx.as_pure(nnx.split(model, self.wrt, ...)[2])

        def at(params: Any) -> Any:
            # a copy: the extra passes must not write into the model's variables
            return loss_fn(nnx.merge(graphdef, params, rest, copy=True))

        super().update(model, grads, loss_fn=at, value=value, **kwargs)
        return out if out is not None else self.info["loss"]
