"""The rules, as public objects and by name.

>>> import gradnorm
>>> gradnorm.rules.SAM(rho=0.05)
SAM(rho=0.05, adaptive=False, eta=0.0, norm_eps=1e-12)
>>> gradnorm.rules.get("fd_gr", gamma=0.1, eps=0.01).grad_evals
2
"""

from __future__ import annotations

import difflib
from typing import Any

from .._errors import UnknownRuleError, describe
from ._base import REQUIRED, EmptyState, Hyperparameter, Rule, choice, flag, integer, real
from ._coherent import Coherent, CoherentState, coherence
from ._fd_gr import FDGR
from ._flooding import Flooding, flood, iflood
from ._gam import GAM
from ._gnp import GNP
from ._gr import GR
from ._periodic import LookSAM, Periodic, PeriodicState
from ._sam import SAM
from ._sgd import SGD

__all__ = [
    "Rule",
    "Hyperparameter",
    "EmptyState",
    "REQUIRED",
    "real",
    "choice",
    "flag",
    "integer",
    "SGD",
    "SAM",
    "GNP",
    "GR",
    "FDGR",
    "GAM",
    "Flooding",
    "Coherent",
    "CoherentState",
    "Periodic",
    "LookSAM",
    "PeriodicState",
    "coherence",
    "flood",
    "iflood",
    "REGISTRY",
    "get",
    "from_config",
    "register",
    "names",
]

REGISTRY: dict[str, type[Rule]] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Add a `Rule` subclass to the registry under `cls.name` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise TypeError(f"`cls` must be a subclass of gradnorm.rules.Rule. Received: {describe(cls)}.")
    if not isinstance(cls.name, str) or not cls.name:
        raise ValueError(f"`cls.name` must be a non-empty string. Received: {cls.name!r}.")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"A rule named '{cls.name}' is already registered ({REGISTRY[cls.name].__qualname__}).")
    REGISTRY[cls.name] = cls
    return cls


for _cls in (SGD, SAM, GNP, GR, FDGR, GAM, Flooding, Coherent, Periodic, LookSAM):
    register(_cls)


def names() -> list[str]:
    """The registered rule names."""
    return list(REGISTRY)


def get(rule: Any, **hyperparameters: Any) -> Rule:
    """A rule object from a name and hyperparameters, or a rule object itself.

    `rule` may be a registered name (`"sam"`), a `Rule` subclass, or a `Rule`
    instance; hyperparameters given with an instance replace its own (`rule.replace`).
    """
    if isinstance(rule, Rule):
        return rule.replace(**hyperparameters) if hyperparameters else rule
    if isinstance(rule, type) and issubclass(rule, Rule):
        return rule(**hyperparameters)
    if not isinstance(rule, str):
        raise UnknownRuleError(
            f"`rule` must be a rule name ({', '.join(repr(n) for n in REGISTRY)}) or a gradnorm.rules.Rule. "
            f"Received: {describe(rule)}."
        )
    cls = REGISTRY.get(rule)
    if cls is None:
        close = difflib.get_close_matches(rule.lower(), list(REGISTRY), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownRuleError(
            f"`rule` must be one of {', '.join(repr(n) for n in REGISTRY)}. Received: {rule!r}.{hint}"
        )
    return cls(**hyperparameters)


def from_config(config: Any) -> Rule:
    """The rule a ``{"rule": name, "hyperparameters": {...}}`` dict describes (`Rule.to_config`'s
    output, as a Keras config or a checkpoint stores it): ``get(config["rule"], **config["hyperparameters"])``.
    A hyperparameter that takes a rule (`Periodic`'s `inner`) accepts the nested dict as it is."""
    if not (isinstance(config, dict) and set(config) == {"rule", "hyperparameters"}
            and isinstance(config["hyperparameters"], dict)):
        raise TypeError(
            f"`config` must be a dict {{'rule': name, 'hyperparameters': {{...}}}} (from `Rule.to_config()`). "
            f"Received: {describe(config)}."
        )
    return get(config["rule"], **config["hyperparameters"])
