"""``gradnorm.torch.RuleScheduler``: schedules of a rule's strengths, stepped like an LR scheduler."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._errors import HyperparameterError, describe
from ..schedules import check_schedules

__all__ = ["RuleScheduler"]

_WHERE = "gradnorm.torch.RuleScheduler"


def _schedulable(rule: Any) -> dict[str, Any]:
    """The rule's real-valued hyperparameters (its radii, strengths, levels): ``{name: Hyperparameter}``."""
    return {
        h.name: h for h in type(rule).spec()
        if str(getattr(h.check, "expectation", "")).startswith("a finite number") and h.name != "norm_eps"
    }


class RuleScheduler:
    r"""Sets rule hyperparameters of a `gradnorm.torch.Optimizer` from schedules, once per step, in
    the idiom of ``torch.optim.lr_scheduler``: it composes with any LR scheduler (each writes its own
    keys of the shared ``param_groups``), and ``state_dict()`` / ``load_state_dict()`` resume it.

    Args:
        optimizer: a `gradnorm.torch.Optimizer`.
        schedules: ``{hyperparameter name: schedule(step) -> float}`` (`gradnorm.schedules`, such as
            ``gradnorm.schedules.gnp_warmup("r", r=0.1, alpha=0.8, warmup_steps=W)``, or any callable),
            applied to every parameter group; or a list of such dicts, one per parameter group (for
            the per-group hyperparameters: ``rho``, ``r``, ``alpha``, ``gamma``, ``lam``, ...; an empty
            dict leaves a group alone).
        last_step: the index of the last step taken (``-1``: none, as a fresh LR scheduler).

    At construction the values of step ``last_step + 1`` are applied; every :meth:`step` (call it
    after ``optimizer.step(...)``, beside the LR scheduler's) advances by one, so the ``t``-th update
    (from 0) runs with ``schedule(t)``, as optax's count and the official GNP code's step do. A
    per-group hyperparameter is written into ``param_groups`` (``group["r"] = value``); any other
    (``flooding``'s level ``b``) is set with `Optimizer.set_rule_hyperparameters`. Values are Python
    floats, so a zero strength takes the rule's one-evaluation shortcut (GNP's ``"zero"`` warm-up
    costs one gradient evaluation per step while it is off).

    Example::

        opt = gradnorm.torch.Optimizer(model.parameters(), torch.optim.Adam, rule="gnp", r=0.1,
                                       alpha=0.8, mix_unit_gradient=True, lr=1e-3)
        warmup = 40 * steps_per_epoch
        lr_sched = torch.optim.lr_scheduler.LinearLR(opt, 1e-8, 1.0, total_iters=warmup)
        gr_sched = gradnorm.torch.RuleScheduler(
            opt, gradnorm.schedules.gnp_warmup("r", r=0.1, alpha=0.8, warmup_steps=warmup))
        for x, y in loader:
            opt.step(closure)
            lr_sched.step()
            gr_sched.step()
    """

    def __init__(self, optimizer: Any, schedules: Any, *, last_step: int = -1):
        from ._optimizer import Optimizer

        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"`optimizer` of {_WHERE} must be a gradnorm.torch.Optimizer (whose rule the schedules drive). "
                f"Received: {describe(optimizer)}."
            )
        if isinstance(last_step, bool) or not isinstance(last_step, int) or last_step < -1:
            raise ValueError(f"`last_step` of {_WHERE} must be an integer >= -1. Received: {describe(last_step)}.")
        self.optimizer = optimizer
        groups = optimizer.param_groups
        if isinstance(schedules, Sequence) and not isinstance(schedules, (str, bytes)):
            if len(schedules) != len(groups):
                raise ValueError(
                    f"`schedules` of {_WHERE} is a list of {len(schedules)} dict(s); the optimizer has {len(groups)} "
                    f"parameter group(s): give one dict per group (or one dict for all)."
                )
            per_group = [check_schedules(s, _WHERE) if s else {} for s in schedules]
            if not any(per_group):
                raise TypeError(f"`schedules` of {_WHERE} holds no schedule. Received: {schedules!r}.")
        else:
            per_group = None
            schedules = check_schedules(schedules, _WHERE)
        rule = optimizer.rule
        allowed = _schedulable(rule)
        leafwise = set(optimizer._groups.leafwise)
        names = set().union(*per_group) if per_group is not None else set(schedules)
        for name in sorted(names):
            if name not in allowed:
                raise HyperparameterError(
                    f"`schedules` of {_WHERE} has `{name}`, which is not a real-valued hyperparameter of rule "
                    f"'{rule.name}'. Its schedulable hyperparameters are: {', '.join(sorted(allowed)) or 'none'}."
                )
            if per_group is not None and name not in leafwise:
                raise HyperparameterError(
                    f"`{name}` of rule '{rule.name}' is one value for all parameter groups: schedule it with one dict "
                    f"for all groups, not per group. Per-group values are accepted for: "
                    f"{', '.join(sorted(leafwise)) or 'none of its hyperparameters'}."
                )
        self._per_group = per_group
        self._schedules: dict[str, Callable[[int], Any]] = {} if per_group is not None else schedules
        self._leafwise = leafwise
        self._spec = allowed
        self.last_step = last_step
        self.step()

    @property
    def names(self) -> list[str]:
        """The scheduled hyperparameters, sorted."""
        if self._per_group is not None:
            return sorted(set().union(*self._per_group))
        return sorted(self._schedules)

    def _value(self, name: str, schedule: Callable[[int], Any], step: int) -> float:
        value = schedule(step)
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise HyperparameterError(f"must be a number. Received: {describe(value)}")
            return self._spec[name].check(self.optimizer.rule.name, name, float(value))
        except HyperparameterError as err:
            raise HyperparameterError(
                f"The schedule of `{name}` ({schedule!r}) of {_WHERE} gave an invalid value at step {step}: {err}"
            ) from None

    def values_at(self, step: int) -> list[dict[str, float]]:
        """The scheduled values of each parameter group at ``step`` (nothing is changed)."""
        groups = self.optimizer.param_groups
        if self._per_group is not None:
            return [{n: self._value(n, s, step) for n, s in g.items()} for g in self._per_group]
        common = {n: self._value(n, s, step) for n, s in self._schedules.items()}
        return [dict(common) for _ in groups]

    def _apply(self, step: int) -> None:
        values = self.values_at(step)  # all computed and checked before anything changes
        groups = self.optimizer.param_groups
        fixed = {k: v for k, v in values[0].items() if k not in self._leafwise} if values else {}
        if fixed:
            self.optimizer.set_rule_hyperparameters(**fixed)
        for group, group_values in zip(groups, values):
            group.update({k: v for k, v in group_values.items() if k in self._leafwise})
        self._last_values = values

    def step(self) -> None:
        """Advance one step and apply the schedules' values there (an invalid value raises and
        changes nothing: neither the optimizer nor ``last_step``)."""
        self._apply(self.last_step + 1)
        self.last_step += 1

    def get_last_values(self) -> list[dict[str, float]]:
        """The values last applied, one dict per parameter group (as ``get_last_lr``)."""
        return [dict(v) for v in self._last_values]

    def state_dict(self) -> dict[str, Any]:
        """``{"last_step": int, "hyperparameters": [names]}``: plain data (the schedules are code, as an
        LR scheduler's lambdas are; build the scheduler with the same ones before loading)."""
        return {"last_step": self.last_step, "hyperparameters": self.names}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resume at the saved step: its values are applied to the optimizer at once (after
        ``optimizer.load_state_dict``, which restores the groups' values too, this is the same)."""
        if not isinstance(state_dict, Mapping) or set(state_dict) != {"last_step", "hyperparameters"}:
            raise ValueError(
                f"`state_dict` of {_WHERE}.load_state_dict must be a dict with keys 'last_step' and 'hyperparameters' "
                f"(from RuleScheduler.state_dict()). Received: {describe(state_dict)}."
            )
        step, names = state_dict["last_step"], state_dict["hyperparameters"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`state_dict['last_step']` must be an integer >= 0. Received: {describe(step)}.")
        if sorted(names) != self.names:
            raise ValueError(
                f"`state_dict['hyperparameters']` is {sorted(names)}: the checkpoint scheduled those; this scheduler "
                f"schedules {self.names}. Build it with the same schedules to resume."
            )
        self._apply(step)
        self.last_step = step

    def __repr__(self) -> str:
        shown = self._per_group if self._per_group is not None else self._schedules
        return f"gradnorm.torch.RuleScheduler({shown!r}, last_step={self.last_step})"
