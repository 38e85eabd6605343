"""The data of the claims, all from seeds and without download: scikit-learn's digits (bundled
with scikit-learn), symmetric label noise, and the Gaussian design of the diagonal linear network."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DLNData", "Digits", "digits", "dln_data", "one_hot", "symmetric_noise"]

N_CLASSES = 10


@dataclass(frozen=True)
class Digits:
    """A digits split; ``x_*`` are (n, 64) in [0, 1], ``y_*`` integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits(n_train: int = 1000, n_val: int = 0, split_seed: int = 0, dtype: str = "float64") -> Digits:
    """The 1797 digits, pixels scaled to [0, 1], shuffled once by ``split_seed`` into
    ``n_train`` training, ``n_val`` validation and the rest test examples. The split is fixed
    (the same for every seed and rule); seeds vary the initial weights, the minibatch order and
    the label noise."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(dtype)
    perm = np.random.default_rng(split_seed).permutation(len(y))
    tr, va, te = perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
    return Digits(x[tr], y[tr], x[va], y[va], x[te], y[te])


def one_hot(y: np.ndarray, dtype: str = "float64", n_classes: int = N_CLASSES) -> np.ndarray:
    out = np.zeros((len(y), n_classes), dtype=dtype)
    out[np.arange(len(y)), y] = 1.0
    return out


def symmetric_noise(y: np.ndarray, rate: float, seed: int, n_classes: int = N_CLASSES) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric label noise: each label is, with probability ``rate``, replaced by one of the
    *other* classes drawn uniformly. Returns ``(noisy labels, flipped mask)``."""
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y)) < rate
    shift = rng.integers(1, n_classes, size=len(y))  # 1..n_classes-1: never the true class
    noisy = np.where(flip, (y + shift) % n_classes, y)
    return noisy, flip


@dataclass(frozen=True)
class DLNData:
    x: np.ndarray  # (n, d)
    y: np.ndarray  # (n,)
    beta: np.ndarray  # (d,) the sparse target


def dln_data(seed: int, n: int = 40, d: int = 100, k: int = 5, dtype: str = "float64") -> DLNData:
    """n Gaussian samples in d dimensions, a k-sparse target with +-1 entries, noiseless labels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    beta = np.zeros(d)
    support = rng.choice(d, size=k, replace=False)
    beta[support] = rng.choice([-1.0, 1.0], size=k)
    return DLNData(x.astype(dtype), (x @ beta).astype(dtype), beta.astype(dtype))
