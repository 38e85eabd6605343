"""gradnorm rules in the Hugging Face ``transformers.Trainer``.

The ``Trainer`` runs every micro-batch's forward and backward itself and then calls
``optimizer.step()`` without a closure, so a plain ``gradnorm.torch.Optimizer`` given to it refuses
to step (a rule such as SAM needs the loss again at perturbed weights). This module closes the gap::

    from gradnorm.torch.transformers import GradnormTrainer

    trainer = GradnormTrainer(model=model, args=args, train_dataset=train,
                              rule="sam", rule_kwargs={"rho": 0.05})
    trainer.train()

After each micro-batch's backward, :class:`GradnormTrainerMixin` registers the micro-batch with the
optimizer (``register_batch``) together with a closure that repeats the Trainer's own
``training_step`` for it (forward, ``compute_loss``, the gradient-accumulation scaling and
``accelerator.backward``); ``optimizer.step()`` then evaluates the rule's extra passes over all the
registered micro-batches, so each step is the rule on the whole accumulated batch. The Trainer's
``max_grad_norm`` clips the rule's direction (the optimizer's ``clip_grad_norm``) instead of the
first pass's gradient.

Importing this module imports ``transformers``; ``import gradnorm.torch`` does not.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from typing import Any

try:
    import transformers as _transformers
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "gradnorm.torch.transformers needs Hugging Face transformers: `pip install transformers accelerate`."
    ) from err

import torch

from .._errors import describe
from ._closure import rng_state as _rng_state
from ._closure import set_rng_state as _set_rng_state
from ._optimizer import Optimizer

__all__ = ["GradnormTrainer", "GradnormTrainerMixin", "unwrap"]

_UNSUPPORTED_OPTIM = ("lomo", "layerwise")  # update inside backward: no step to wrap


def unwrap(optimizer: Any) -> Optimizer:
    """The `gradnorm.torch.Optimizer` of a trainer: ``trainer.optimizer`` itself or behind
    accelerate's ``AcceleratedOptimizer`` (``unwrap(trainer.optimizer).last_info``)."""
    found = _find(optimizer)
    if found is None:
        raise TypeError(
            f"`optimizer` must be a gradnorm.torch.Optimizer or accelerate's wrapper of one. Received: "
            f"{describe(optimizer)}."
        )
    return found


def _find(optimizer: Any) -> Optimizer | None:
    for _ in range(8):  # AcceleratedOptimizer, possibly inside another wrapper
        if optimizer is None or isinstance(optimizer, Optimizer):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _copy_inputs(inputs: Any) -> Any:
    """A shallow copy, so that a ``compute_loss`` that pops ``labels`` leaves the batch whole for the
    next pass."""
    return copy.copy(inputs) if isinstance(inputs, (Mapping, list)) else inputs


class GradnormTrainerMixin:
    """Makes a ``transformers.Trainer`` (or a subclass of it, such as TRL's trainers) train with a
    `gradnorm.torch.Optimizer`. Put it first among the bases::

        class MySFTTrainer(GradnormTrainerMixin, trl.SFTTrainer):
            pass

    Args:
        rule: the gradnorm rule (``"sam"``, ``"gnp"``, ``"fd_gr"``, ``"gam"``, ``"flooding"``, ...,
            or a ``gradnorm.rules.Rule``) when the Trainer creates the optimizer. Default ``"sam"``.
            Must be left unset when ``optimizers=(optimizer, scheduler)`` passes a
            `gradnorm.torch.Optimizer` (its rule is used).
        rule_kwargs: keyword arguments of `gradnorm.torch.Optimizer` when the Trainer creates it:
            the rule's hyperparameters (``{"rho": 0.05}``) and the optimizer's options
            (``same_randomness``, ``skip_nonfinite``, ``info_norms``, ``model``). Clipping is
            ``TrainingArguments.max_grad_norm`` (see below).
        *args, **kwargs: the Trainer's own arguments.

    The Trainer creates the optimizer as it always does (``TrainingArguments.optim``,
    ``learning_rate``, weight decay and its parameter groups, ``optimizer_cls_and_kwargs``) and wraps
    it: ``gradnorm.torch.Optimizer(base, rule=rule, model=trainer.model, **rule_kwargs)``.

    Every ``training_step`` registers its micro-batch with the optimizer's ``register_batch``, with
    a closure that repeats the Trainer's own ``training_step`` (forward, ``compute_loss``, the
    gradient-accumulation scaling, ``accelerator.backward``) for it; ``optimizer.step()`` runs these
    closures for the rule's extra passes, so a step is the rule on the whole accumulated batch. The
    logged loss is the first pass's. ``TrainingArguments.max_grad_norm`` becomes the optimizer's
    ``clip_grad_norm`` (it clips the rule's direction); the Trainer's own clipping of the first
    pass's gradient is switched off, and the logged ``grad_norm`` is that gradient's norm, unclipped.
    Refused with an error: rules that differentiate the gradient (``"gr"``: use ``"fd_gr"``),
    fp16 with its GradScaler (use bf16), DeepSpeed, FSDP, and optimizers that update inside the
    backward (LOMO, layer-wise GaLore).
    """

    def __init__(self, *args: Any, rule: Any = None, rule_kwargs: Mapping[str, Any] | None = None, **kwargs: Any):
        if rule_kwargs is not None and not isinstance(rule_kwargs, Mapping):
            raise TypeError(
                f"`rule_kwargs` must be None or a dict of keyword arguments. Received: {describe(rule_kwargs)}."
            )
        self._gradnorm_rule = "sam" if rule is None else rule
        self._gradnorm_kwargs = dict(rule_kwargs or {})
        for name in ("grad_scaler", "perturbation"):
            if name in self._gradnorm_kwargs:
                raise ValueError(_KWARG_ADVICE[name])
        self._gradnorm_clip_routed = False  # this trainer wrote max_grad_norm into the optimizer
        super().__init__(*args, **kwargs)
        given = getattr(self, "optimizer", None)
        if given is not None:
            if rule is not None or rule_kwargs:
                raise ValueError(
                    "`rule` and `rule_kwargs` configure the optimizer the Trainer creates; the optimizer passed with "
                    "`optimizers=(optimizer, scheduler)` already has its rule. Give one or the other."
                )
            self._gradnorm_setup(given)
        self._gradnorm_check_trainer()

    # -- the optimizer ------------------------------------------------------------------------
    def create_optimizer(self, model: Any = None) -> Any:
        """The Trainer's optimizer (built by ``Trainer.create_optimizer``), wrapped in a
        `gradnorm.torch.Optimizer` with this trainer's rule; an optimizer given with
        ``optimizers=`` is checked and used as it is."""
        if getattr(self, "optimizer", None) is None:
            self._gradnorm_check_trainer()
            optim = str(getattr(self.args.optim, "value", self.args.optim)).lower()
            if any(word in optim for word in _UNSUPPORTED_OPTIM):
                raise ValueError(
                    f"TrainingArguments.optim={optim!r} updates the weights inside the backward pass, so there is "
                    f"no optimizer step for a gradnorm rule to wrap. Choose an optimizer with a step (adamw_torch, "
                    f"sgd, ...)."
                )
            base = super().create_optimizer(model)  # sets self.optimizer to the base optimizer
            kwargs = dict(self._gradnorm_kwargs)
            kwargs.setdefault("model", self.model)  # buffers (BatchNorm statistics) follow the first pass only
            try:
                self.optimizer = Optimizer(base.param_groups, base, rule=self._gradnorm_rule, **kwargs)
            except BaseException:
                self.optimizer = None
                raise
        self._gradnorm_setup(self.optimizer)
        return self.optimizer

    def _gradnorm_optimizer(self) -> Optimizer:
        opt = _find(getattr(self, "optimizer", None))
        if opt is None:
            raise TypeError(
                f"{type(self).__name__} trains with a gradnorm.torch.Optimizer, but the Trainer's optimizer is "
                f"{describe(getattr(self, 'optimizer', None))}. Pass `optimizers=(gradnorm.torch.Optimizer(...), "
                f"scheduler)` or leave `optimizers` unset and give `rule=`/`rule_kwargs=`."
            )
        return opt

    def _gradnorm_setup(self, optimizer: Any) -> None:
        """Check `optimizer` and route ``max_grad_norm`` to its ``clip_grad_norm``."""
        opt = _find(optimizer)
        if opt is None:
            raise TypeError(
                f"{type(self).__name__} needs a gradnorm.torch.Optimizer in `optimizers=(optimizer, scheduler)` (or "
                f"none, and `rule=`/`rule_kwargs=`). Received: {describe(optimizer)}."
            )
        if opt.rule.needs_hvp:
            raise ValueError(
                f"Rule '{opt.rule.name}' differentiates the gradient (a double backward through the first pass), "
                f"which the Trainer's own backward cannot provide: use rule='fd_gr', the same update by a finite "
                f"difference."
            )
        if opt.grad_scaler is not None:
            raise ValueError(
                "The Trainer scales the loss itself (fp16); do not give the gradnorm optimizer a `grad_scaler`."
            )
        max_norm = getattr(self.args, "max_grad_norm", None) or 0.0
        if max_norm > 0:
            if not callable(getattr(_transformers.Trainer, "_clip_grad_norm", None)):  # pragma: no cover - old versions
                raise ValueError(
                    f"This transformers version ({_transformers.__version__}) clips the first pass's gradient inside "
                    f"its training loop, where a gradnorm rule's direction cannot be clipped. Set "
                    f"`TrainingArguments(max_grad_norm=0)` and give the gradnorm optimizer `clip_grad_norm=` instead."
                )
            if not math.isfinite(max_norm):
                raise ValueError(f"`max_grad_norm` must be finite. Received: {max_norm!r}.")
            if opt.clip_grad_norm is None or self._gradnorm_clip_routed:
                opt.clip_grad_norm = float(max_norm)
                self._gradnorm_clip_routed = True
            elif opt.clip_grad_norm != float(max_norm):
                raise ValueError(
                    f"TrainingArguments.max_grad_norm={max_norm!r} and the gradnorm optimizer's "
                    f"clip_grad_norm={opt.clip_grad_norm!r} disagree. Under {type(self).__name__} `max_grad_norm` "
                    f"clips the rule's direction through the optimizer's `clip_grad_norm`: set one of them (or "
                    f"`max_grad_norm=0` to keep the optimizer's)."
                )
        elif self._gradnorm_clip_routed:  # max_grad_norm was switched off since this trainer set it
            opt.clip_grad_norm = None
            self._gradnorm_clip_routed = False

    def _gradnorm_check_trainer(self) -> None:
        for flag, what in (("is_deepspeed_enabled", "DeepSpeed"), ("is_fsdp_enabled", "FSDP"),
                           ("is_fsdp_xla_enabled", "FSDP on XLA")):
            if getattr(self, flag, False):
                raise ValueError(
                    f"{type(self).__name__} does not support {what}: the optimizer step and the gradient norms of a "
                    f"gradnorm rule need whole (unsharded) parameters and gradients on every rank. Use "
                    f"DistributedDataParallel (the default multi-GPU mode)."
                )
        if getattr(self.accelerator, "scaler", None) is not None:
            raise ValueError(
                "fp16 mixed precision is not supported by gradnorm's Trainer integration: accelerate's GradScaler "
                "would unscale and check only the first pass. Use `bf16=True` (no loss scaling), or float32."
            )

    # -- clipping -----------------------------------------------------------------------------
    def _clip_grad_norm(self, model: Any) -> Any:
        """The Trainer would clip the first pass's gradient here; the gradnorm optimizer clips the
        rule's direction instead (``max_grad_norm`` is its ``clip_grad_norm``). Returning None makes
        the Trainer log the norm of the first pass's gradient, unclipped."""
        return None

    # -- one micro-batch ----------------------------------------------------------------------
    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``training_step``, then ``register_batch`` with a closure that repeats it
        (forward, ``compute_loss``, loss scaling, ``accelerator.backward``) at whatever weights the
        parameters hold. Returns the first pass's loss, which is what the Trainer logs."""
        opt = self._gradnorm_optimizer()
        run = super().training_step  # type: ignore[misc]
        replay = _rng_state() if opt.same_randomness else None
        loss = run(model, _copy_inputs(inputs), num_items_in_batch, *args, **kwargs)
        # Micro-batches the Trainer ran under no_sync (all but the last of an accumulation) are
        # repeated under no_sync too: one gradient all-reduce per pass, as in the first one.
        synced = bool(self.accelerator.sync_gradients)
        accelerator = self.accelerator

        def closure() -> torch.Tensor:
            if replay is not None:  # the dropout masks of this micro-batch's first pass
                _set_rng_state(replay)
            with contextlib.nullcontext() if synced else accelerator.no_sync(model):
                value = run(model, _copy_inputs(inputs), num_items_in_batch, *args, **kwargs)
            return self._gradnorm_loss(value)

        opt.register_batch(self._gradnorm_loss(loss), closure, replays_randomness=True)
        return loss

    def _gradnorm_loss(self, loss: Any) -> Any:
        """The loss the rule sees: with several processes, the mean over them (as the gradients are),
        so every rank makes the same decisions (flooding's sign, skipping a non-finite step)."""
        if isinstance(loss, torch.Tensor) and self.accelerator.num_processes > 1:
            return self.accelerator.reduce(loss.detach().clone(), reduction="mean")
        return loss


_KWARG_ADVICE = {
    "grad_scaler": "The Trainer scales the loss itself; `grad_scaler` cannot be given in `rule_kwargs`.",
    "perturbation": "Under the Trainer every pass's gradient is all-reduced across processes as the Trainer's "
                    "own backward is (the perturbation of the global batch); `perturbation` cannot be given in "
                    "`rule_kwargs`.",
}


class GradnormTrainer(GradnormTrainerMixin, _transformers.Trainer):
    """``transformers.Trainer`` with a gradnorm rule: ``GradnormTrainer(model=..., args=...,
    train_dataset=..., rule="sam", rule_kwargs={"rho": 0.05})``. See `GradnormTrainerMixin`."""

