"""The GNP warm-up tests' problem and references, shared by the framework files
(tests/test_torch_schedule.py, test_jax_schedule.py, test_tf_schedule.py): least squares in NumPy
float64, the official code's float32 ramp written by hand, and SGD on the GNP direction driven by
given per-step strengths. Nothing here calls gradnorm."""

from __future__ import annotations

import numpy as np

F32 = np.float32
RNG = np.random.RandomState(0)
XS = RNG.randn(16, 3)
YS = RNG.randn(16)
W0 = np.array([0.5, -1.0, 2.0])
STEPS, WARM, R, ALPHA, LR = 9, 4, 0.1, 0.8, 0.1


def hand_ramp32(target, w, t):
    """The official ramp: float32(target) * min(1, t * float32(1 / w)), in float32 (XLA turns its
    division by w into a multiplication by the float32 reciprocal)."""
    fraction = F32(t) * (F32(1.0) / F32(w))
    return float(F32(target) * min(fraction, F32(1.0)))


def expected_values(strategy):
    """The per-step r and alpha of the three official strategies, by hand."""
    ramp_r = [hand_ramp32(R, WARM, t) for t in range(STEPS)]
    ramp_a = [hand_ramp32(ALPHA, WARM, t) for t in range(STEPS)]
    rs = {"r": ramp_r, "lambda": [R] * STEPS, "zero": [0.0] * WARM + [R] * (STEPS - WARM)}[strategy]
    alphas = {"r": [ALPHA] * STEPS, "lambda": ramp_a, "zero": [ALPHA] * STEPS}[strategy]
    return rs, alphas


def np_grad(w):
    """Gradient of 0.5 * mean((X w - y)^2)."""
    return XS.T @ (XS @ w - YS) / len(YS)


def numpy_trajectory(rs, alphas, lrs=None, *, mix=True, alpha_float32=False):
    """SGD on the GNP direction with r_t, alpha_t (and lr_t, default LR) given per step, norm_eps = 0
    (the official code's settings): the plain gradient where r_t or alpha_t is 0; `mix`: the unit
    gradient in the first term (``mix_unit_gradient``). `alpha_float32`: alpha is a float32 array
    (optax's inject_hyperparams keeps a float32 ramp in float32), so 1 - alpha is rounded to
    float32, as in the official code."""
    lrs = [LR] * len(rs) if lrs is None else lrs
    w, out = W0.copy(), []
    for r, a, lr in zip(rs, alphas, lrs):
        g = np_grad(w)
        if r == 0 or a == 0:
            d = g
        else:
            unit = g / np.linalg.norm(g)
            one_minus = float(F32(1.0) - F32(a)) if alpha_float32 else 1 - a
            d = one_minus * (unit if mix else g) + a * np_grad(w + r * unit)
        w = w - lr * d
        out.append(w.copy())
    return np.array(out)
