"""What the Keras integration shares on every backend: the settings of a model (rule, options,
which hyperparameters live in variables), their validation, the rule-hyperparameter variables
(`set_rule_hyperparameters`), and saving the rule state with the model's own variables.

Nothing here runs a rule: each backend module (`_tensorflow`, `_jax`, `_torch`) builds its training
step on its gradnorm adapter and subclasses `TrainStepBase`.
"""

from __future__ import annotations

import numbers
from typing import Any

import keras
import numpy as np

from .. import rules as _rules
from .._errors import HyperparameterError, describe
from .._oracle import HVP_MODES, PERTURBATIONS

__all__ = ["BACKENDS", "STATE_KEY", "RuntimeBase", "Settings", "TrainStepBase", "backend", "check_backend", "state_template"]

BACKENDS = ("tensorflow", "jax", "torch")
STATE_KEY = "gradnorm_rule_state_"  # prefix of the rule state's entries among a model's own saved variables
_STATIC = ("norm_eps",)  # float hyperparameters kept as constants (a guard against division by zero, not a strength)


def backend() -> str:
    return keras.backend.backend()


def check_backend() -> None:
    if backend() not in BACKENDS:
        raise RuntimeError(
            f"gradnorm.keras trains on the TensorFlow, JAX and PyTorch backends of Keras 3 "
            f"(KERAS_BACKEND=tensorflow, jax or torch, set before Keras is imported). Received: {backend()!r}."
        )


def float_dtype(variables: list[Any]) -> str:
    """float64 if a trainable variable is float64, else float32: the dtype of the norms and the loss the
    rule sees, and of the hyperparameter variables."""
    return "float64" if any(keras.backend.standardize_dtype(v.dtype) == "float64" for v in variables) else "float32"


def is_integer(v: Any) -> bool:
    return np.dtype(keras.backend.standardize_dtype(v.dtype)).kind in "iub"


def is_float(v: Any) -> bool:
    return np.dtype(keras.backend.standardize_dtype(v.dtype)).kind == "f"


def _layers(model: Any) -> list[Any]:
    return model._flatten_layers(include_self=True, recursive=True) if hasattr(model, "_flatten_layers") else [model]


def moving_stat_ids(model: Any) -> set[int]:
    """ids of the floating-point non-trainable weights outside frozen layers (BatchNormalization's
    moving mean and variance): what a training forward pass may update."""
    frozen = {id(w) for layer in _layers(model) if not layer.trainable for w in layer.weights}
    return {id(w) for w in model.non_trainable_weights if id(w) not in frozen and is_float(w)}


def random_state_ids(model: Any) -> set[int]:
    """ids of the integer non-trainable variables that are not weights: Keras ``SeedGenerator`` states."""
    weights = {id(w) for w in model.non_trainable_weights}
    return {id(v) for v in model.non_trainable_variables if id(v) not in weights and is_integer(v)}


def fully_built(model: Any) -> bool:
    return all(layer.built for layer in _layers(model)) and bool(model.trainable_variables)


def state_template(rule: _rules.Rule, variables: list[Any]) -> list[tuple[int, ...]]:
    """The shapes of the leaves of the state `rule` keeps for `variables` (from NumPy zeros of their
    shapes: the built-in rules' states do not depend on the values)."""
    import optree

    zeros = [np.zeros(tuple(v.shape), keras.backend.standardize_dtype(v.dtype)) for v in variables]
    return [tuple(np.shape(x)) for x in optree.tree_leaves(rule.init(zeros))]


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False. Received: {describe(value)}.")


class Settings:
    """The rule and options of a model (plain Python: not tracked by Keras; the rule state and the
    hyperparameter variables live in the backend's runtime, made when training starts).

    ``rule`` always holds the hyperparameters as given (Python numbers, kept current by
    `TrainStepBase.set_rule_hyperparameters`); ``dynamic`` names those that the training step reads
    from variables."""

    def __init__(self, rule: Any, perturbation: str, same_randomness: bool, hvp: str, dynamic_hyperparameters: bool,
                 hyperparameters: dict[str, Any]):
        self.rule = _rules.get(rule, **hyperparameters)
        if not isinstance(perturbation, str) or perturbation not in PERTURBATIONS:
            raise ValueError(f"`perturbation` must be one of {', '.join(repr(p) for p in PERTURBATIONS)}. Received: {describe(perturbation)}.")
        _check_flag("same_randomness", same_randomness)
        _check_flag("dynamic_hyperparameters", dynamic_hyperparameters)
        if not isinstance(hvp, str) or hvp not in HVP_MODES:
            raise HyperparameterError(f"`hvp` must be one of {', '.join(repr(m) for m in HVP_MODES)}. Received: {describe(hvp)}.")
        self.perturbation = perturbation
        self.same_randomness = same_randomness
        self.hvp = hvp
        self.dynamic_hyperparameters = dynamic_hyperparameters
        self.runtime: Any = None
        self.loaded_state: list[Any] | None = None  # rule state read from a file before the runtime exists

    @property
    def dynamic(self) -> list[str]:
        """The hyperparameters held in variables: every float the rule was given as a Python number
        (radii, strengths, mixing weights, flood levels), except `norm_eps`; none with
        ``dynamic_hyperparameters=False``."""
        if not self.dynamic_hyperparameters:
            return []
        return [k for k, v in self.rule.config.items() if type(v) is float and k not in _STATIC]

    def rule_with(self, values: dict[str, Any]) -> _rules.Rule:
        """The rule with the dynamic hyperparameters replaced by `values` (0-d arrays of the backend)."""
        return self.rule.replace(**values) if values else self.rule


class TrainStepBase:
    """The backend-independent part of `GradnormTrainStep` (see the backend modules for the step)."""

    _gradnorm_settings: Settings | None = None
    #: the backend's runtime (what the step needs besides the model), made by `_gradnorm_runtime`
    _runtime_class: Any = None

    def _gradnorm_runtime(self) -> Any:
        """The runtime of the current settings, made anew when the trainable variables changed."""
        settings = self._settings()
        runtime = settings.runtime
        if runtime is None or runtime.trainable_ids != [id(v) for v in self.trainable_variables]:  # type: ignore[attr-defined]
            settings.runtime = runtime = self._runtime_class(self, settings)
        return runtime

    def set_rule(self, rule: Any = "sam", *, perturbation: str = "local", same_randomness: bool = False,
                 hvp: str = "reverse_over_reverse", dynamic_hyperparameters: bool = True, **hyperparameters: Any) -> None:
        """Train with `rule` (a name or a ``gradnorm.rules.Rule``) and its hyperparameters.

        Args:
            rule: the rule, e.g. ``"sam"``, ``"gnp"``, ``"fd_gr"``.
            perturbation: under ``tf.distribute`` (TensorFlow backend): ``"local"`` (each replica perturbs
                with the gradient of its own minibatch, as in the SAM paper) or ``"global"`` (losses,
                gradients and HVPs are averaged over the replicas first). Ignored on one device.
            same_randomness: replay the random state of the first pass (Keras ``SeedGenerator``\\ s:
                dropout) in every extra pass. Default False: each pass draws its own masks.
            hvp: Hessian-vector products for ``gr`` on TensorFlow (see `gradnorm.tf.step`); JAX uses
                forward-over-reverse, PyTorch double backward.
            dynamic_hyperparameters: hold every float hyperparameter given as a Python number (except
                ``norm_eps``) in a variable that the compiled step reads at run time, so that
                `set_rule_hyperparameters` changes it without retracing (default). False compiles them
                in as constants (a Python ``0.0`` strength then takes the rule's exact one-pass shortcut).
            **hyperparameters: the rule's hyperparameters.

        Call ``compile`` again after changing the rule of a model that was trained already.
        """
        check_backend()
        self._gradnorm_settings = Settings(rule, perturbation, same_randomness, hvp, dynamic_hyperparameters,
                                           hyperparameters)

    @property
    def rule(self) -> _rules.Rule:
        """The gradnorm rule this model trains with (its current hyperparameter values)."""
        return self._settings().rule

    def _settings(self) -> Settings:
        settings = self._gradnorm_settings
        if settings is None:
            raise RuntimeError(
                f"{type(self).__name__} trains with a gradnorm rule: call `set_rule(...)` before `fit` "
                f"(or wrap the model: gradnorm.keras.GradnormModel(model, rule=...))."
            )
        return settings

    def set_rule_hyperparameters(self, **values: Any) -> None:
        """Change float hyperparameters of the rule (``rho=0.1``): the next training step uses them,
        without retracing or recompiling the training function (they are variables of it).

        Each value must be a real number that the rule accepts (checked, with the rule's own error,
        before anything changes). Only the hyperparameters held in variables can change here (the
        floats given as Python numbers, see `set_rule`); for the others call `set_rule` and ``compile``.
        Callbacks call this between steps (``on_train_batch_begin``), on every backend.
        """
        settings = self._settings()
        dynamic = settings.dynamic
        if not values:
            raise TypeError(f"set_rule_hyperparameters needs keyword arguments, some of {dynamic}. Received none.")
        for name, value in values.items():
            if name not in dynamic:
                known = list(settings.rule.config)
                why = ("it is not a hyperparameter of rule '" + settings.rule.name + f"' (its hyperparameters: {known})"
                       if name not in known else
                       "the model holds no variable for it (only float hyperparameters given as Python numbers, "
                       "except norm_eps, and none with dynamic_hyperparameters=False)")
                raise HyperparameterError(
                    f"`{name}` cannot be changed by set_rule_hyperparameters: {why}. Variables: {dynamic}; "
                    f"call `set_rule(...)` and `compile` to change anything else."
                )
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise HyperparameterError(
                    f"`{name}` of set_rule_hyperparameters must be a real number. Received: {describe(value)}."
                )
        rule = settings.rule.replace(**{k: float(v) for k, v in values.items()})  # the rule's own checks
        settings.rule = rule
        runtime = settings.runtime
        if runtime is not None:
            for name in values:
                runtime.set_hyperparameter(name, rule.config[name])

    @property
    def rule_hyperparameters(self) -> dict[str, Any]:
        """The current values of the hyperparameters `set_rule_hyperparameters` can change."""
        settings = self._settings()
        return {k: settings.rule.config[k] for k in settings.dynamic}

    # -- saving ------------------------------------------------------------------------------------
    def save_own_variables(self, store: Any) -> None:
        """Keras saving (``save``, ``save_weights``, ``ModelCheckpoint``): the model's own variables
        and, for a rule that keeps one, the rule state (``coherent``'s step count, LookSAM's stored
        component), so that training resumed from the file continues the same trajectory."""
        super().save_own_variables(store)  # type: ignore[misc]
        settings = self._gradnorm_settings
        if settings is None:
            return
        if settings.runtime is not None:
            values: list[Any] = settings.runtime.state_numpy()
        elif settings.loaded_state is not None:
            values = settings.loaded_state
        else:
            return  # not trained yet: the state is the rule's initial one
        for i, x in enumerate(values):
            store[f"{STATE_KEY}{i}"] = x

    def load_own_variables(self, store: Any) -> None:
        """Keras loading: the counterpart of `save_own_variables` (a file without a rule state, such
        as one written before training, leaves the state as it is). A file's state is checked against
        this model's rule before anything is loaded."""
        keys = list(store.keys())
        ours = sorted((k for k in keys if str(k).startswith(STATE_KEY)), key=lambda k: int(str(k)[len(STATE_KEY):]))
        if not ours:
            super().load_own_variables(store)  # type: ignore[misc]
            return
        values = [np.asarray(store[k]) for k in ours]
        settings = self._settings()
        if settings.runtime is not None:
            settings.runtime.check_state(settings.rule, values)
        elif self.trainable_variables:  # type: ignore[attr-defined]
            shapes = state_template(settings.rule, self.trainable_variables)  # type: ignore[attr-defined]
            got = [tuple(np.shape(x)) for x in values]
            if got != shapes:
                raise ValueError(
                    f"The file holds a gradnorm rule state of {len(values)} leaves of shapes {got}; rule "
                    f"'{settings.rule.name}' keeps {len(shapes)} of shapes {shapes}. Load it into a model with the "
                    f"rule it was saved with."
                )
        super().load_own_variables({k: store[k] for k in keys if k not in ours})  # type: ignore[misc]
        if settings.runtime is not None:
            settings.runtime.load_state(settings.rule, values)
        else:
            settings.loaded_state = values  # set when the training function creates the state


class RuntimeBase:
    """The part of a backend runtime that does not depend on the backend: the rule state's shapes,
    checks and loading, through `_state_values` and `_assign_state` of the backend."""

    state_vars: list[Any]

    def state_numpy(self) -> list[np.ndarray]:
        return [np.array(v.numpy()) if not isinstance(v, keras.Variable) else np.array(keras.ops.convert_to_numpy(v))
                for v in self.state_vars]

    def check_state(self, rule: _rules.Rule, values: list[Any]) -> None:
        """A `ValueError` unless saved values fit the rule state."""
        want = [tuple(v.shape) for v in self.state_vars]
        got = [tuple(np.shape(x)) for x in values]
        if want != got:
            raise ValueError(
                f"The saved gradnorm rule state does not fit rule '{rule.name}': it expects leaves of shapes "
                f"{want}, the file holds {got}. Load it into a model with the rule it was saved with."
            )

    def load_state(self, rule: _rules.Rule, values: list[Any]) -> None:
        self.check_state(rule, values)
        for v, x in zip(self.state_vars, values):
            self._assign_one(v, x)

    def _assign_one(self, var: Any, value: Any) -> None:
        var.assign(np.asarray(value).astype(keras.backend.standardize_dtype(var.dtype)))

    def set_hyperparameter(self, name: str, value: float) -> None:
        var = self.hyper[name]  # type: ignore[attr-defined]
        var.assign(np.asarray(value, keras.backend.standardize_dtype(var.dtype)))
