"""`GradnormModel`: any Keras model, trained by ``fit()`` with a gradnorm rule, on the backend Keras runs on."""

from __future__ import annotations

from typing import Any

import keras

from .._errors import describe
from ._common import Settings, check_backend

__all__ = ["make_model_class"]


def make_model_class(mixin: type) -> type:
    """`GradnormModel` on the backend's mixin (one class per process: Keras's backend is fixed at import)."""

    @keras.saving.register_keras_serializable(package="gradnorm")
    class GradnormModel(mixin, keras.Model):  # type: ignore[misc, valid-type]
        """Any Keras model, trained by ``fit()`` with a gradnorm rule.

        ::

            model = keras.Sequential([...])
            trainer = gradnorm.keras.GradnormModel(model, rule="sam", rho=0.05)
            trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                            loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            trainer.fit(x, y, epochs=10, validation_split=0.1, callbacks=[...])
            model.predict(x)   # the trained weights are the inner model's

        Args:
            model: the model to train (built or not); calling the wrapper calls it.
            rule, perturbation, same_randomness, hvp, dynamic_hyperparameters, **hyperparameters: as
                `GradnormTrainStep.set_rule`.
            name: the wrapper's name.

        Saving: ``save_weights``/``load_weights`` and checkpoints hold the inner model's weights;
        ``save`` stores the inner model and the rule (with the hyperparameters' current values), and
        ``keras.models.load_model`` rebuilds the wrapper. The rule's state (``coherent``'s step count,
        LookSAM's stored component) is saved with the wrapper's own variables, so that training resumed
        from a ``.keras`` file (which also holds the optimizer state) or from ``save_weights`` continues
        the same trajectory.
        """

        def __init__(self, model: keras.Model, rule: Any = "sam", *, perturbation: str = "local",
                     same_randomness: bool = False, hvp: str = "reverse_over_reverse",
                     dynamic_hyperparameters: bool = True, name: str | None = None, **hyperparameters: Any):
            check_backend()
            if not isinstance(model, keras.layers.Layer):
                raise TypeError(f"`model` must be a keras.Model (or layer). Received: {describe(model)}.")
            settings = Settings(rule, perturbation, same_randomness, hvp, dynamic_hyperparameters, hyperparameters)
            super().__init__(name=name, dtype=getattr(model, "dtype_policy", None))
            self._convert_input_args = False  # the inner model converts its inputs itself (a float64 model keeps float64)
            self.model = model
            self._gradnorm_settings = settings
            if getattr(model, "built", False):
                self.built = True  # no weights of its own: built when the inner model is

        def call(self, inputs: Any, training: Any = None) -> Any:
            return self.model(inputs, training=training)

        def get_config(self) -> dict[str, Any]:
            settings = self._settings()
            # a wrapped rule (gradnorm.rules.Periodic's `inner`) as its nested config {"rule", "hyperparameters"}
            hyper = settings.rule.to_config()["hyperparameters"]

            def plain(v: Any) -> bool:
                if isinstance(v, dict) and set(v) == {"rule", "hyperparameters"}:
                    return all(plain(x) for x in v["hyperparameters"].values())
                return isinstance(v, (int, float, str, bool))

            dynamic = [k for k, v in hyper.items() if not plain(v)]
            if dynamic:
                raise ValueError(
                    f"GradnormModel.get_config: hyperparameters {dynamic} are tensors, which a config cannot hold; "
                    f"save the inner model (`model.model.save(...)`) or the weights instead."
                )
            return {
                "name": self.name,
                "model": keras.saving.serialize_keras_object(self.model),
                "rule": settings.rule.name,
                "perturbation": settings.perturbation,
                "same_randomness": settings.same_randomness,
                "hvp": settings.hvp,
                "dynamic_hyperparameters": settings.dynamic_hyperparameters,
                "hyperparameters": hyper,
            }

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> Any:
            config = dict(config)
            model = keras.saving.deserialize_keras_object(config.pop("model"))
            hyper = config.pop("hyperparameters", {})
            return cls(model, **config, **hyper)

    GradnormModel.__module__ = "gradnorm.keras"
    GradnormModel.__qualname__ = "GradnormModel"
    return GradnormModel
