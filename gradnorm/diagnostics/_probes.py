"""Random probe vectors for the stochastic estimators, deterministic given a seed.

The Array API has no random numbers, so probes come from a `Probes` object. The default,
`NumpyProbes`, draws with `numpy.random.Generator(PCG64(seed))` and converts each leaf to the
parameters' namespace, dtype and device: the same seed gives the same probes on every backend
(NumPy, PyTorch, JAX, TensorFlow, ...), so a diagnostic is comparable across frameworks. The JAX
adapter passes `JaxProbes` (`jax.random`, so a jitted diagnostic draws on the device instead of
baking the probes into the program as constants).
"""

from __future__ import annotations

from typing import Any, Protocol

import array_api_compat

from .._tree import namespace_of

__all__ = ["NumpyProbes", "Probes"]


class Probes(Protocol):
    """A source of random vectors shaped like a list of leaves."""

    def rademacher(self, like: list[Any]) -> list[Any]:
        """Entries ±1 with equal probability, in the dtype and on the device of each leaf."""
        ...

    def normal(self, like: list[Any]) -> list[Any]:
        """Standard normal entries, in the dtype and on the device of each leaf."""
        ...


class NumpyProbes:
    """Probes from `numpy.random.default_rng(seed)`, converted to each leaf's array type."""

    def __init__(self, seed: int):
        import numpy as np

        self._np = np
        self.rng = np.random.default_rng(seed)

    def _convert(self, values: list[Any], like: list[Any]) -> list[Any]:
        xp = namespace_of(like)
        # the TensorFlow namespace brings its own `device`; array_api_compat knows the others
        device = xp.device if xp.__name__ == "gradnorm._compat.tensorflow" else array_api_compat.device
        return [xp.asarray(v, dtype=leaf.dtype, device=device(leaf)) for v, leaf in zip(values, like)]

    def rademacher(self, like: list[Any]) -> list[Any]:
        values = [2.0 * self.rng.integers(0, 2, size=tuple(leaf.shape)) - 1.0 for leaf in like]
        return self._convert(values, like)

    def normal(self, like: list[Any]) -> list[Any]:
        return self._convert([self.rng.standard_normal(size=tuple(leaf.shape)) for leaf in like], like)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        from .._errors import describe

        raise TypeError(f"`seed` must be a non-negative int. Received: {describe(seed)}.")
    return seed
