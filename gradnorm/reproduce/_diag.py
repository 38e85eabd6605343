"""Flatness measurements as plain floats, from `gradnorm.diagnostics` (Lanczos for the top Hessian
eigenvalue, Hutchinson with Rademacher probes for the trace; exact HVPs from the backend).

Every measurement uses the same seed, so the trace estimates of different runs share their probes
(common random numbers): their differences are measured more precisely than their values."""

from __future__ import annotations

from typing import Any

from ..diagnostics import gradient_norm, hessian_eigenvalues, hessian_trace

__all__ = ["LANCZOS_ITERS", "SOURCE", "TRACE_SAMPLES", "grad_norm", "lambda_max", "trace"]

SOURCE = "gradnorm.diagnostics (λmax: Lanczos with full reorthogonalization; trace: Hutchinson, Rademacher probes)"
LANCZOS_ITERS = 30
TRACE_SAMPLES = 100


def lambda_max(params: Any, grad_fn: Any, hvp_fn: Any, seed: int = 0, iters: int = LANCZOS_ITERS) -> float:
    """The largest Hessian eigenvalue (``iters`` Lanczos steps, one HVP each)."""
    res = hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn, k=1, iters=iters, seed=seed)
    return float(res.eigenvalues[0])


def trace(params: Any, grad_fn: Any, hvp_fn: Any, samples: int = TRACE_SAMPLES, seed: int = 0) -> float:
    """The Hessian trace (Hutchinson, ``samples`` Rademacher probes)."""
    return float(hessian_trace(params, grad_fn, hvp_fn=hvp_fn, samples=samples, seed=seed).trace)


def grad_norm(params: Any, grad_fn: Any) -> float:
    return float(gradient_norm(params, grad_fn))
