"""Parameter groups: how `gradnorm.torch.Optimizer` splits its keyword arguments between the rule
and the base optimizer, and builds the rule of a step from the groups' per-group values.

Every group carries the rule's *leafwise* hyperparameters (the radii and strengths: ``rho``, ``r``,
``gamma``, ``lam``, ...), as it carries ``lr``: a scheduler or the user may change them between
steps, and groups may differ (the rule then gets a `gradnorm.PerLeaf`). The other hyperparameters
change the rule's form and must be the same everywhere. A name the base optimizer uses too
(RMSprop's ``alpha`` and GNP's) belongs to the base in the groups.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from .. import rules as _rules
from .._errors import HyperparameterError
from .._tree import PerLeaf
from ..rules._base import describe_spec

__all__ = ["GroupRules", "rule_class", "check_base_kwargs", "same_value"]


def same_value(a: Any, b: Any) -> bool:
    """Equal hyperparameter values, without reading a tensor (identity for tensors)."""
    return a is b or (isinstance(a, (int, float, str, bool)) and isinstance(b, (int, float, str, bool)) and a == b)


def rule_class(rule: Any) -> type[_rules.Rule] | None:
    """The class of a rule given by name or class (None for an instance); unknown names raise."""
    if isinstance(rule, _rules.Rule):
        return None
    if isinstance(rule, type) and issubclass(rule, _rules.Rule):
        return rule
    if isinstance(rule, str) and rule in _rules.REGISTRY:
        return _rules.REGISTRY[rule]
    _rules.get(rule)  # raises the unknown-rule error with suggestions
    return None  # pragma: no cover


def check_base_kwargs(base: type, kwargs: dict[str, Any], rule: _rules.Rule, names: set[str]) -> None:
    """A `HyperparameterError` for keyword arguments that neither the rule nor `base` accepts."""
    try:
        params = inspect.signature(base.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown:
        accepted = sorted(k for k in params if k not in ("self", "params"))
        raise HyperparameterError(
            f"Unknown keyword arguments {unknown}: they are neither hyperparameters of rule '{rule.name}' "
            f"({', '.join(sorted(names))}) nor arguments of {base.__module__}.{base.__qualname__} ({', '.join(accepted)})."
        )


class GroupRules:
    """The rule of each step from the optimizer's rule and its parameter groups.

    Args:
        rule: the rule built from the optimizer's keyword arguments (one value per hyperparameter).
        base_defaults: the base optimizer's ``defaults`` (names it owns).
    """

    def __init__(self, rule: _rules.Rule, base_defaults: dict[str, Any]):
        spec = type(rule).spec()
        self.rule = rule
        self.leafwise = tuple(h.name for h in spec if h.leafwise and h.name not in base_defaults)
        self.checks = {h.name: h.check for h in spec if h.name not in base_defaults}
        # a PerLeaf of equal values is kept by the rule as one number: refused here all the same
        given = {**rule.config, **getattr(rule, "_collapsed_per_leaf", {})}
        for name, value in given.items():
            if isinstance(value, PerLeaf):
                raise HyperparameterError(
                    f"`{name}` of gradnorm.torch.Optimizer must be one value; give per-parameter values through "
                    f"parameter groups (`{{'params': ..., '{name}': ...}}`). Received: {value!r}."
                )
        self._cached: tuple[Any, _rules.Rule] | None = None

    def group_defaults(self) -> dict[str, Any]:
        """The rule's per-group values every group starts with."""
        return {name: self.rule.config[name] for name in self.leafwise}

    def check_group(self, group: dict[str, Any]) -> None:
        """A new group may carry its own leafwise values; the rule's other hyperparameters must not differ."""
        for name in group:
            if name in self.checks and name not in self.leafwise and not same_value(group[name], self.rule.config[name]):
                raise HyperparameterError(
                    f"`{name}` of rule '{self.rule.name}' cannot differ between parameter groups: a group has "
                    f"{group[name]!r}, the optimizer {self.rule.config[name]!r}. Per-group values are accepted for: "
                    f"{', '.join(self.leafwise) or 'none of its hyperparameters'}."
                )

    def set_hyperparameters(self, param_groups: list[dict[str, Any]], values: dict[str, Any]) -> _rules.Rule:
        """Set rule hyperparameters between steps: a per-group (leafwise) name in every group, any other
        in the rule itself. Everything is validated first and nothing changes on an error. Returns
        the rule with the new fixed values (the optimizer's `rule`)."""
        names = {h.name for h in type(self.rule).spec()}
        unknown = sorted(k for k in values if k not in names)
        if unknown:
            raise HyperparameterError(
                f"Rule '{self.rule.name}' has no hyperparameter {', '.join(f'`{k}`' for k in unknown)}. "
                f"Its hyperparameters are: {describe_spec(type(self.rule))}."
            )
        fixed = {k: v for k, v in values.items() if k not in self.leafwise}
        grouped = {k: self.checks[k](self.rule.name, k, v) for k, v in values.items() if k in self.leafwise}
        rule = self.rule.replace(**fixed) if fixed else self.rule  # validates the fixed values
        for group in param_groups:
            group.update(grouped)
        if fixed:
            self.rule = rule
            self._cached = None
        return rule

    def for_step(self, param_groups: list[dict[str, Any]], params: list[torch.Tensor]) -> _rules.Rule:
        """The rule with the groups' current values: one value where all groups agree, else a
        `PerLeaf` over `params` (the trainable parameters in group order). Cached while unchanged."""
        if not self.leafwise:
            return self.rule
        key = [(len(params),)] + [tuple(group[n] for n in self.leafwise) for group in param_groups]
        cached = self._cached
        if cached is not None and len(cached[0]) == len(key) and all(
            all(same_value(a, b) for a, b in zip(old, new)) for old, new in zip(cached[0], key)
        ):
            return cached[1]
        changes: dict[str, Any] = {}
        for name in self.leafwise:
            per_group = []
            for i, group in enumerate(param_groups):
                try:
                    value = self.checks[name](self.rule.name, name, group[name])
                except HyperparameterError as err:
                    raise HyperparameterError(f"In param_groups[{i}]: {err}") from None
                per_group.append((value, sum(1 for p in group["params"] if p.requires_grad)))
            if all(same_value(v, per_group[0][0]) for v, _ in per_group):
                changes[name] = per_group[0][0]
            else:
                changes[name] = PerLeaf([v for v, count in per_group for _ in range(count)])
        rule = self.rule.replace(**changes)
        self._cached = (key, rule)
        return rule
