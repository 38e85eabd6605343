"""The PyTorch backend of `gradnorm.keras`: ``train_step`` on `gradnorm.torch`'s live-weights oracle.

On the torch backend a Keras model's variables are ``torch.nn.Parameter``\\ s and its training step
runs eagerly. The step here is `gradnorm.torch.Optimizer`'s: the oracle of its closure
(`gradnorm.torch._closure.ClosureOracle`, on the framework-neutral `gradnorm._live.LiveWeights`)
evaluates Keras's forward pass and loss at any point by writing it into the parameters in place,
restores them bit for bit from a snapshot, and takes exact GR's Hessian-vector product by double
backward. Keras's side state is the model's variables: BatchNorm moving statistics are put back to
their values after the first pass, and ``SeedGenerator`` states are replayed with
``same_randomness=True``. The direction goes to ``optimizer.apply``.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import optree
import torch

from ..torch._closure import ClosureOracle
from ..torch._ops import TorchForeachOps
from ._common import RuntimeBase, Settings, TrainStepBase, float_dtype, moving_stat_ids, random_state_ids

__all__ = ["GradnormTrainStep"]


class _Oracle(ClosureOracle):
    """The closure oracle with Keras's side state: moving statistics and random states are Keras
    variables (parameters that do not require grad), not module buffers or torch's global generator."""

    def __init__(self, *args: Any, moving_stats: list[Any], random_state: list[Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.moving_stats = moving_stats
        self.random_state = random_state

    def _read_rng(self) -> Any:
        return [v.value.detach().clone() for v in self.random_state]

    def _write_rng(self, state: Any) -> None:
        with torch.no_grad():
            for v, x in zip(self.random_state, state):
                v.value.copy_(x)

    def _read_side_state(self) -> Any:
        return [v.value.detach().clone() for v in self.moving_stats] if self.moving_stats else None

    def _write_side_state(self, saved: Any) -> list[Any]:
        with torch.no_grad():
            for v, x in zip(self.moving_stats, saved):
                v.value.copy_(x)
        return []


class _Runtime(RuntimeBase):
    """The rule state, the dynamic hyperparameters and the non-finite count as Keras variables, the
    snapshot buffer, and the model's moving statistics and random states."""

    def __init__(self, model: keras.Model, settings: Settings):
        trainable = list(model.trainable_variables)
        if not trainable:
            raise ValueError("The model has no trainable variables: build it (call it on data) before training with a gradnorm rule.")
        self.trainable = trainable
        self.trainable_ids = [id(v) for v in trainable]
        dtype = float_dtype(trainable)
        with torch.no_grad():
            init = settings.rule.init([torch.zeros_like(v.value) for v in trainable])
        leaves, self.state_treedef = optree.tree_flatten(init)
        self.state_vars = [keras.Variable(x.detach().cpu().numpy(), dtype=str(x.dtype).replace("torch.", ""),
                                          trainable=False, autocast=False, name=f"gradnorm_state_{i}")
                           for i, x in enumerate(leaves)]
        self.hyper = {k: keras.Variable(settings.rule.config[k], dtype=dtype, trainable=False, autocast=False,
                                        name=f"gradnorm_{k}") for k in settings.dynamic}
        self.nonfinite = keras.Variable(0, dtype="int64", trainable=False, autocast=False, name="gradnorm_nonfinite_steps")
        stats, seeds = moving_stat_ids(model), random_state_ids(model)
        self.moving_stats = [w for w in model.non_trainable_weights if id(w) in stats]
        self.random_state = [v for v in model.non_trainable_variables if id(v) in seeds] if settings.same_randomness else []
        self.scratch: list[torch.Tensor] | None = None
        self.traces = 0  # nothing is traced: the step runs eagerly
        if settings.loaded_state is not None:
            self.load_state(settings.rule, settings.loaded_state)
            settings.loaded_state = None

    def snapshot_buffer(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        buf = self.scratch
        if buf is None or any(b.shape != p.shape or b.dtype != p.dtype or b.device != p.device for b, p in zip(buf, params)):
            buf = self.scratch = [torch.empty_like(p, requires_grad=False) for p in params]
        return buf

    def _assign_one(self, var: Any, value: Any) -> None:
        var.assign(np.asarray(value).astype(keras.backend.standardize_dtype(var.dtype)))


class GradnormTrainStep(TrainStepBase):
    """Mixin that makes ``fit()`` train a ``keras.Model`` with a gradnorm rule (PyTorch backend).

    One training step (eager, as Keras's own torch step):

    1. the rule evaluates the loss ``compile`` defines and its gradient at the current weights (the
       pass whose predictions update the metrics and whose loss is logged), and at the perturbed
       points it asks for, written into the model's parameters in place;
    2. the parameters are restored bit for bit from a snapshot; BatchNorm moving statistics are put
       back to their values after the first pass;
    3. ``optimizer.apply`` applies the rule's direction in place of the gradient.

    A ``LossScaleOptimizer`` (or ``loss_scale_factor``) scales the loss as usual; the rule sees the
    unscaled loss and gradients, and the direction is scaled back before the optimizer unscales it.
    ``jit_compile=True`` (``torch.compile``) is refused: the step runs eagerly.
    """

    _runtime_class = _Runtime

    def make_train_function(self, force: bool = False) -> Any:
        if self.train_function is not None and not force:  # type: ignore[has-type]
            return self.train_function  # type: ignore[has-type]
        if self.jit_compile:  # type: ignore[attr-defined]
            raise ValueError(
                "`jit_compile` must be False for gradnorm.keras on the torch backend (the rule's step writes "
                "perturbed points into the parameters between passes, which torch.compile of Keras's train "
                "step does not support). Received: jit_compile=True; compile(..., jit_compile=False)."
            )
        return super().make_train_function(force)  # type: ignore[misc]

    def train_step(self, data: Any) -> Any:
        settings = self._settings()
        # NumPy arrays (train_on_batch) as tensors: a GradnormModel does not convert its inputs itself
        data = keras.tree.map_structure(lambda t: keras.ops.convert_to_tensor(t) if isinstance(t, np.ndarray) else t, data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        runtime = self._gradnorm_runtime()
        optimizer = self.optimizer  # type: ignore[attr-defined]
        has_training = getattr(self, "_call_has_training_arg", True)
        params = [v.value for v in runtime.trainable]
        scale = optimizer.scale_loss(1.0) if optimizer is not None else 1.0
        trivial = isinstance(scale, float) and scale == 1.0
        first: list[tuple[Any, Any]] = []

        def closure(create_graph: bool = False) -> Any:
            y_pred = self(x, training=True) if has_training else self(x)  # type: ignore[operator]
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)  # type: ignore[attr-defined]
            if not first:
                first.append((y_pred, loss.detach()))
            scaled = loss if trivial else optimizer.scale_loss(loss)
            scaled.backward(create_graph=create_graph)
            return loss

        def unscale(grads: list[torch.Tensor], in_place: bool = True) -> list[torch.Tensor]:
            s = torch.as_tensor(scale, dtype=torch.float32, device=grads[0].device)
            return [(g.float() / s).to(g.dtype) if g.dtype in (torch.float16, torch.bfloat16) else g / s.to(g.dtype)
                    for g in grads]

        rule = settings.rule_with({k: v.value for k, v in runtime.hyper.items()})
        rule_state = optree.tree_unflatten(runtime.state_treedef, [v.value for v in runtime.state_vars])
        ops = TorchForeachOps(in_place=True)
        oracle = _Oracle(params, closure, ops, scratch=lambda: runtime.snapshot_buffer(params), has_hvp=rule.needs_hvp,
                         same_randomness=settings.same_randomness, unscale=None if trivial else unscale,
                         moving_stats=runtime.moving_stats, random_state=runtime.random_state)
        try:
            with torch.no_grad():  # the closure's passes enable grad themselves
                direction, rule_state, info = rule.update_leaves(oracle.view, rule_state, oracle, ops=ops)
        finally:
            oracle.restore()
        if not trivial:
            direction = [d * torch.as_tensor(scale, dtype=d.dtype, device=d.device) for d in direction]
        with torch.no_grad():
            for v, new in zip(runtime.state_vars, optree.tree_leaves(rule_state)):
                v.value.copy_(torch.as_tensor(new, device=v.value.device))
            optimizer.apply(direction, runtime.trainable)
            runtime.nonfinite.value.add_(torch.logical_not(info["finite"]).to(torch.int64))

        y_pred, loss = first[0]
        self._loss_tracker.update_state(  # type: ignore[attr-defined]
            loss, sample_weight=next(i for i in optree.tree_leaves(x) if i is not None).shape[0])
        logs = dict(self.compute_metrics(x, y, y_pred, sample_weight=sample_weight))  # type: ignore[attr-defined]
        logs["nonfinite_steps"] = runtime.nonfinite.value.detach().clone()
        return logs
