"""Checkpoints of `gradnorm.torch.Optimizer`: the rule and its state in the state dict, loaded atomically.

``state_dict()`` is the base optimizer's state dict plus an entry ``"gradnorm"``::

    {"rule": "coherent", "hyperparameters": {...}, "state": [tensor, ...] or None}

``state`` holds the leaves of the rule state, flattened as a pytree (optree's order), so a rule
whose state holds parameter-sized buffers round-trips as well as one with a 0-d counter; ``None``
before the first step. Loading validates everything before it changes anything: the entry's keys,
the rule's name, and every leaf against the state the rule would start from (`rule.init`: the
number of leaves, their shapes and dtypes); errors name ``state_dict`` and the offending key. The
leaves are moved to the device of the state the rule makes.
"""

from __future__ import annotations

from typing import Any

import optree
import torch

from .. import rules as _rules
from .._errors import describe

__all__ = ["KEY", "rule_entry", "checked_rule_state"]

KEY = "gradnorm"
_FIELDS = ("rule", "hyperparameters", "state")


def rule_entry(rule: _rules.Rule, state: Any) -> dict[str, Any]:
    """The ``"gradnorm"`` entry of a state dict."""
    leaves = None if state is None else list(optree.tree_leaves(state))
    return {"rule": rule.name, "hyperparameters": _plain(rule.to_config()["hyperparameters"]), "state": leaves}


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as plain data (``torch.load(weights_only=True)`` reads them back): tensors as
    lists, a wrapped rule (`gradnorm.rules.Periodic`'s `inner`) as its nested config."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, torch.Tensor):
            v = v.tolist()
        elif isinstance(v, dict) and set(v) == {"rule", "hyperparameters"}:
            v = {"rule": v["rule"], "hyperparameters": _plain(v["hyperparameters"])}
        out[k] = v
    return out


def checked_rule_state(entry: Any, rule: _rules.Rule, params: list[torch.Tensor]) -> Any:
    """The rule state an entry holds, validated against `rule` (nothing is changed); a `ValueError` or
    `TypeError` naming ``state_dict`` and the key otherwise."""
    where = f"state_dict['{KEY}']"
    if not isinstance(entry, dict):
        raise TypeError(f"`{where}` must be a dict with keys {list(_FIELDS)}. Received: {describe(entry)}.")
    missing = [k for k in _FIELDS if k not in entry]
    extra = sorted(str(k) for k in entry if k not in _FIELDS)
    if missing or extra:
        raise ValueError(
            f"`{where}` must have exactly the keys {list(_FIELDS)}."
            + (f" Missing: {missing}." if missing else "") + (f" Unexpected: {extra}." if extra else "")
        )
    if entry["rule"] != rule.name:
        raise ValueError(
            f"`{where}['rule']` is {entry['rule']!r}: the checkpoint was saved with that rule; this optimizer runs "
            f"rule '{rule.name}'. Build the optimizer with rule={entry['rule']!r} to load it."
        )
    if not isinstance(entry["hyperparameters"], dict):
        raise TypeError(f"`{where}['hyperparameters']` must be a dict. Received: {describe(entry['hyperparameters'])}.")
    saved = entry["state"]
    if saved is None:
        return None
    template = rule.init(params)
    want, treedef = optree.tree_flatten(template)
    if not isinstance(saved, (list, tuple)) or len(saved) != len(want):
        raise ValueError(
            f"`{where}['state']` must be None or a list of the {len(want)} tensor(s) of the state of rule "
            f"'{rule.name}' ({type(template).__name__}). Received: {describe(saved)}."
        )
    out = []
    for i, (got, ref) in enumerate(zip(saved, want)):
        if not isinstance(got, torch.Tensor) or got.shape != ref.shape or got.dtype != ref.dtype:
            raise ValueError(
                f"`{where}['state'][{i}]` must be a tensor of shape {tuple(ref.shape)} and dtype {ref.dtype} (leaf {i} "
                f"of the state of rule '{rule.name}'). Received: {describe(got)}."
            )
        out.append(got.detach().to(ref.device, copy=True))
    return optree.tree_unflatten(treedef, out)
