"""The identities that tie the rules together (DESIGN.md section 5), checked on every backend.

Each identity compares two directions computed by the same backend at the problem's initial
parameters:

* every rule at zero strength equals ``sgd`` (exactly: the zero-strength path returns the
  gradient itself);
* ``gnp`` with ``alpha = 1`` equals ``sam`` with ``rho = r``;
* ``fd_gr`` forward, backward and central equal ``gr`` on the quadratic (exact in exact
  arithmetic; the tolerance covers the rounding of the finite difference);
* ``flooding`` equals ``sgd`` while the loss is above the flood level, and ``-sgd`` below it;
* ``periodic`` and ``looksam`` with ``every=1`` (every step full) equal the wrapped ``sam`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .problems import PROBLEMS
from gradnorm.rules import SAM

from .settings import format_value, zero_settings

__all__ = ["Identity", "IDENTITIES", "check_identity"]


@dataclass(frozen=True)
class Identity:
    name: str
    problem: str
    lhs: tuple[str, tuple[tuple[str, Any], ...]]
    rhs: tuple[str, tuple[tuple[str, Any], ...]]
    sign: float = 1.0  # lhs == sign * rhs
    rtol64: float = 0.0
    rtol32: float = 0.0

    @property
    def id(self) -> str:
        return f"{self.problem}-{self.name}"

    def tolerance(self, dtype: str) -> float:
        return self.rtol64 if dtype == "float64" else self.rtol32


def _h(**kw: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(kw.items())


_SGD = ("sgd", _h())
# every rule's zero-strength settings (conformance/settings.py; flooding's is a level below any
# loss), but sgd's own
_ZERO = [(rule, tuple(hyper.items())) for rule, hyper in zero_settings() if rule != "sgd"]


def _build() -> list[Identity]:
    out = []
    for problem in PROBLEMS:
        for rule, hyper in _ZERO:
            label = ",".join(f"{k}={format_value(v)}" for k, v in hyper)
            out.append(Identity(f"{rule}[{label}]==sgd", problem, (rule, hyper), _SGD))
        for r in (0.05, 0.5):
            out.append(Identity(f"gnp[alpha=1,r={r}]==sam[rho={r}]", problem, ("gnp", _h(r=r, alpha=1.0)),
                                ("sam", _h(rho=r)), rtol64=1e-15, rtol32=1e-6))
        out.append(Identity("flooding[b=1e6]==-sgd", problem, ("flooding", _h(b=1e6)), _SGD, sign=-1.0))
        # a period of one: every step is full, the wrapped rule itself
        sam = ("sam", _h(rho=0.05))
        out.append(Identity("periodic[inner=sam(rho=0.05),every=1]==sam", problem,
                            ("periodic", _h(inner=SAM(rho=0.05), every=1)), sam))
        out.append(Identity("looksam[rho=0.05,every=1]==sam", problem, ("looksam", _h(rho=0.05, every=1)), sam))
    for difference in ("forward", "backward", "central"):
        for normalize in (False, True):
            hyper = _h(gamma=0.05, eps=0.5, difference=difference, normalize=normalize)
            out.append(Identity(f"fd_gr[{difference},normalize={normalize}]==gr", "quadratic", ("fd_gr", hyper),
                                ("gr", _h(gamma=0.05)), rtol64=1e-10, rtol32=2e-5))
    return out


IDENTITIES: list[Identity] = _build()


def check_identity(backend: Any, identity: Identity, dtype: str) -> tuple[bool, float, str]:
    """``(passed, relative deviation, message)`` of ``identity`` on ``backend`` in ``dtype``."""
    problem = PROBLEMS[identity.problem]
    left = backend.direction(problem, identity.lhs[0], dict(identity.lhs[1]), dtype)
    right = identity.sign * backend.direction(problem, identity.rhs[0], dict(identity.rhs[1]), dtype)
    dev = float(np.max(np.abs(left - right)) / max(float(np.max(np.abs(right))), 1e-300))
    tol = identity.tolerance(dtype)
    ok = bool(np.all(np.isfinite(left))) and (np.array_equal(left, right) if tol == 0.0 else dev <= tol)
    message = (
        f"identity {identity.name} on problem '{identity.problem}', backend '{backend.name}', dtype {dtype}: "
        f"relative deviation {dev:.3e} (tolerance {'exact' if tol == 0 else f'{tol:.0e}'}); "
        f"lhs {identity.lhs}, rhs {identity.rhs}"
    )
    return ok, dev, message
