"""``gradnorm.tf.keras``: an alias of `gradnorm.keras` (Keras ``fit()`` with any gradnorm rule), kept for
code written when the Keras integration ran on TensorFlow only. It runs on whatever backend Keras uses."""

from __future__ import annotations

from ..keras import GradnormModel, GradnormTrainStep

__all__ = ["GradnormModel", "GradnormTrainStep"]
