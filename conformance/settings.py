"""The rule settings, defined once: every test, the conformance suite and the benchmarks take the
hyperparameters they run a rule with from this table.

``TABLE`` has one entry per registered rule (``gradnorm.rules.REGISTRY``), keyed by its name.
``tests/test_settings.py`` fails when a registered rule has none, so a new rule needs its file and
one entry here; every test that runs "every rule" then runs it too.

An entry (`RuleSettings`) holds:

* ``adapter``: the variants the adapters' tests run (JAX step, TensorFlow step, torch functional
  step) and the contract test (``tests/test_contract.py``); the first one is the rule's
  *default setting*, used where a test runs one setting per rule;
* ``zero``: hyperparameters at which the rule equals ``sgd`` exactly (zero strength; for
  ``flooding``, a level below any loss), checked by the conformance identities and the contract;
* ``benchmark``: the one setting every framework's benchmark times, so that their tables compare;
* ``valid``: a small valid set, the base the error tests alter one hyperparameter of;
* ``conformance``: the conformance scenarios' settings, a `ByProblem` where a value depends on the
  problem (a flood level inside the range the loss crosses, coherence thresholds that open and close
  the gate); ``None``: the ``adapter`` variants;
* ``suites``: lists that some test deliberately runs differently (see `SUITES` for each one's
  purpose and default). A suite an entry does not name takes its default (the ``adapter``
  variants, the default setting alone, or nothing).

This module imports only gradnorm (no framework, no NumPy), so the benchmarks, run as scripts, can
import it too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gradnorm

__all__ = [
    "ByProblem",
    "RuleSettings",
    "TABLE",
    "SUITES",
    "missing",
    "entry",
    "settings",
    "setting_id",
    "format_value",
    "ids",
    "adapter_settings",
    "adapter_ids",
    "default_settings",
    "zero_settings",
    "benchmark_settings",
    "valid_settings",
    "conformance_settings",
]

Hyper = dict[str, Any]


@dataclass(frozen=True)
class ByProblem:
    """A conformance setting whose hyperparameters depend on the problem: ``{problem: hyper}``."""

    values: Mapping[str, Hyper]

    def resolve(self, problem: str) -> Hyper:
        try:
            return dict(self.values[problem])
        except KeyError:
            raise KeyError(f"no setting for conformance problem {problem!r} (known: {sorted(self.values)})") from None


@dataclass(frozen=True)
class RuleSettings:
    """The settings of one rule (see the module docstring)."""

    adapter: tuple[Hyper, ...]
    zero: tuple[Hyper, ...]
    benchmark: Hyper
    valid: Hyper
    conformance: tuple[Hyper | ByProblem, ...] | None = None
    suites: Mapping[str, tuple[Hyper, ...]] = field(default_factory=dict)


# The suites: lists that a test runs differently from the `adapter` variants on purpose, with the
# default an entry that does not name the suite gets: "adapter" (all its variants), "default" (its
# first variant alone) or "none" (the rule is not in that list).
SUITES: dict[str, tuple[str, str]] = {
    "jax_transform": ("adapter", "tests/test_jax_transform.py: one or two variants per rule (each jit compiles)"),
    "jax_libraries": ("adapter", "tests/test_jax_libraries.py: the rules that perturb or regularize, on flax/equinox trees"),
    "torch_ops": ("adapter", "tests/test_torch_ops.py: every rule through TorchForeachOps on a tanh network"),
    "torch_ops_tensor": ("adapter", "tests/test_torch_ops.py: 0-d tensor hyperparameters (the arithmetic path)"),
    "torch_optimizer": ("adapter", "tests/test_torch_optimizer.py: the optimizer against the NumPy core"),
    "torch_cuda": ("adapter", "tests/test_torch_cuda.py: every rule on a CUDA device"),
    "backends": ("adapter", "tests/test_backends.py: the core on every Array API library"),
    "backends_zero_grad": ("none", ("tests/test_backends.py: settings added to `backends` at a zero gradient "
                                    "(every norm that divides)")),
    "backends_jit": ("default", "tests/test_backends.py: one setting per rule for the slower jit test"),
}


def _h(**kwargs: Any) -> Hyper:
    return dict(kwargs)


_SAM = gradnorm.rules.SAM
_GNP = gradnorm.rules.GNP
_FDGR = gradnorm.rules.FDGR


TABLE: dict[str, RuleSettings] = {
    "sgd": RuleSettings(
        adapter=(_h(),),
        zero=(_h(),),
        benchmark=_h(),
        valid=_h(),
        suites={"jax_libraries": (), "torch_ops_tensor": ()},
    ),
    "sam": RuleSettings(
        adapter=(_h(rho=0.05), _h(rho=0.5, adaptive=True, eta=0.01)),
        zero=(_h(rho=0.0), _h(rho=0.0, adaptive=True, eta=0.01)),
        benchmark=_h(rho=0.05),
        valid=_h(rho=0.05),
        suites={
            "jax_libraries": (_h(rho=0.05),),
            "backends": (_h(rho=0.1), _h(rho=0.5, adaptive=True, eta=0.01)),
            "backends_jit": (_h(rho=0.5, adaptive=True, eta=0.01),),
        },
    ),
    "gnp": RuleSettings(
        adapter=(_h(r=0.05, alpha=0.8), _h(r=0.05, alpha=0.5, mix_unit_gradient=True)),
        zero=(_h(r=0.05, alpha=0.0), _h(r=0.0, alpha=0.8)),
        benchmark=_h(r=0.05, alpha=0.8),
        valid=_h(r=0.1, alpha=0.8),
        conformance=(_h(r=0.05, alpha=0.8),),
        suites={
            "jax_transform": (_h(r=0.05, alpha=0.8),),
            "jax_libraries": (_h(r=0.05, alpha=0.5),),
            "torch_ops": (_h(r=0.05, alpha=0.8), _h(r=0.05, alpha=0.8, mix_unit_gradient=True)),
            "torch_ops_tensor": (_h(r=0.05, alpha=0.8),),
            "torch_optimizer": (_h(r=0.05, alpha=0.8),),
            "torch_cuda": (_h(r=0.05, alpha=0.8),),
            "backends": (_h(r=0.1, alpha=0.8), _h(r=0.1, alpha=0.8, mix_unit_gradient=True)),
            "backends_zero_grad": (_h(r=0.1, alpha=0.5, mix_unit_gradient=True, norm_eps=1e-12),),
            "backends_jit": (_h(r=0.1, alpha=0.8),),
        },
    ),
    "gr": RuleSettings(
        adapter=(_h(gamma=0.1), _h(gamma=0.1, penalty="norm")),
        zero=(_h(gamma=0.0), _h(gamma=0.0, penalty="norm")),
        benchmark=_h(gamma=0.05),
        valid=_h(gamma=0.1),
        conformance=(_h(gamma=0.05), _h(gamma=0.05, penalty="norm")),
        suites={
            "jax_transform": (_h(gamma=0.1),),
            "jax_libraries": (_h(gamma=0.1),),
            "torch_ops_tensor": (_h(gamma=0.1, penalty="norm"),),
            "torch_optimizer": (_h(gamma=0.05), _h(gamma=0.05, penalty="norm")),
            "torch_cuda": (_h(gamma=0.05),),
            "backends_jit": (_h(gamma=0.1, penalty="norm"),),
        },
    ),
    "fd_gr": RuleSettings(
        adapter=(_h(gamma=0.1, eps=0.01), _h(gamma=0.1, eps=0.5, difference="central", normalize=True)),
        zero=(_h(gamma=0.0, eps=0.01), _h(gamma=0.0, eps=0.01, difference="central", normalize=True)),
        benchmark=_h(gamma=0.05, eps=0.01),
        valid=_h(gamma=0.1, eps=0.01),
        conformance=(
            _h(gamma=0.05, eps=0.01),
            _h(gamma=0.05, eps=0.01, difference="backward"),
            _h(gamma=0.05, eps=0.5, difference="central", normalize=True),
        ),
        suites={
            "jax_transform": (_h(gamma=0.1, eps=0.5, difference="central", normalize=True),),
            "jax_libraries": (_h(gamma=0.1, eps=0.01, difference="central"),),
            "torch_ops": (
                _h(gamma=0.1, eps=0.01),
                _h(gamma=0.1, eps=0.01, difference="central", normalize=True),
                _h(gamma=0.1, eps=0.02, difference="backward"),
            ),
            "torch_ops_tensor": (_h(gamma=0.1, eps=0.01, difference="central"),),
            "torch_optimizer": (_h(gamma=0.05, eps=0.01), _h(gamma=0.05, eps=0.05, difference="central", normalize=True)),
            "torch_cuda": (_h(gamma=0.05, eps=0.01, difference="central", normalize=True),),
            "backends": (
                _h(gamma=0.1, eps=0.05),
                _h(gamma=0.1, eps=0.05, difference="backward", normalize=True),
                _h(gamma=0.1, eps=0.05, difference="central"),
            ),
            "backends_zero_grad": (
                _h(gamma=0.1, eps=0.05, normalize=True),
                _h(gamma=0.1, eps=0.05, difference="central", normalize=True),
            ),
            "backends_jit": (_h(gamma=0.1, eps=0.05, difference="central"),),
        },
    ),
    "gam": RuleSettings(
        adapter=(_h(), _h(adaptive=True, variant="paper")),
        zero=(_h(grad_rho=0.0, grad_norm_rho=0.0),),
        benchmark=_h(),
        valid=_h(),
        suites={
            "jax_transform": (_h(),),
            "jax_libraries": (_h(),),
            "torch_ops_tensor": (_h(grad_gamma=0.1),),
            "torch_optimizer": (_h(),),
            "torch_cuda": (_h(),),
            "backends": (_h(), _h(variant="paper", adaptive=True)),
            "backends_zero_grad": (_h(adaptive=True), _h(variant="paper")),
            "backends_jit": (_h(variant="paper", adaptive=True),),
        },
    ),
    "flooding": RuleSettings(
        adapter=(_h(b=5.0), _h(b=0.01)),
        zero=(_h(b=-1e6),),  # a level below any loss: descent, sign +1
        benchmark=_h(b=0.01),
        valid=_h(b=0.1),
        # a level inside the range the loss crosses within 20 steps: descent and ascent steps
        conformance=(ByProblem({"quadratic": _h(b=5.0), "logistic": _h(b=0.36), "mlp": _h(b=1.05)}),),
        suites={
            "jax_transform": (_h(b=5.0),),
            "jax_libraries": (),
            "torch_ops": (_h(b=10.0), _h(b=0.01)),
            "torch_ops_tensor": (_h(b=0.5),),
            "torch_optimizer": (_h(b=0.5),),
            "torch_cuda": (_h(b=0.5),),
            "backends": (_h(b=-1.0), _h(b=100.0)),  # loss above the level (descent), below it (ascent)
            "backends_jit": (_h(b=100.0),),
        },
    ),
    "coherent": RuleSettings(
        adapter=(_h(lam=0.1, threshold=0.0), _h(lam=0.3, threshold=-1.0, penalty="l1", delay=1)),
        zero=(_h(lam=0.0, threshold=0.0),),
        benchmark=_h(lam=1e-4, threshold=0.0),
        valid=_h(lam=0.1, threshold=0.0),
        # thresholds at which the gate opens and closes within the run
        conformance=(
            ByProblem({
                "quadratic": _h(lam=5.0, penalty="l2", threshold=0.95, delay=2),
                "logistic": _h(lam=0.2, penalty="l2", threshold=0.8, delay=2),
                "mlp": _h(lam=0.3, penalty="l2", threshold=0.3, delay=2),
            }),
            ByProblem({
                "quadratic": _h(lam=5.0, penalty="l1", threshold=0.95, delay=2),
                "logistic": _h(lam=0.05, penalty="l1", threshold=0.9),
                "mlp": _h(lam=0.05, penalty="l1", threshold=0.5),
            }),
        ),
        suites={
            "jax_transform": (_h(lam=0.3, threshold=-1.0, penalty="l1"),),
            "jax_libraries": (_h(lam=0.3, threshold=-1.0, penalty="l1"),),
            "torch_ops": (_h(lam=0.3, threshold=0.2, penalty="l1"), _h(lam=0.1, threshold=-1.0, delay=1)),
            "torch_ops_tensor": (_h(lam=0.1, threshold=0.0),),
            "torch_optimizer": (_h(lam=0.1, threshold=0.5, delay=1),),
            "torch_cuda": (_h(lam=0.1, threshold=0.0, delay=1),),
            "backends": (
                _h(lam=0.1, threshold=-1.0),  # gate open
                _h(lam=0.1, threshold=1.0),  # gate closed
                _h(lam=0.1, penalty="l1", threshold=-1.0, delay=1),  # opens on the 2nd step
            ),
            "backends_zero_grad": (_h(lam=0.1, threshold=0.0),),
            "backends_jit": (_h(lam=0.1, penalty="l1", threshold=-1.0, delay=1),),
        },
    ),
    # wrappers: the wrapped rule is a rule object (`inner`); a full step when the count is a multiple of
    # `every`. The contract's three steps (a save/load before the third) and the 20 conformance steps
    # cross full and skipped steps; every=3 makes the contract's third step a skipped one that reads g_v.
    "periodic": RuleSettings(
        adapter=(
            _h(inner=_SAM(rho=0.05), every=2),
            _h(inner=_GNP(r=0.05, alpha=0.8), every=3, reuse=True, alpha=0.5, decomposition="per_tensor"),
        ),
        zero=(_h(inner=_SAM(rho=0.0), every=2),),
        benchmark=_h(inner=_SAM(rho=0.05), every=5),
        valid=_h(inner=_FDGR(gamma=0.05, eps=0.01), every=2),
        conformance=(
            _h(inner=_SAM(rho=0.05), every=3),
            _h(inner=_GNP(r=0.05, alpha=0.8), every=2, reuse=True, decomposition="per_tensor"),
        ),
        suites={
            "jax_transform": (_h(inner=_SAM(rho=0.05), every=2, reuse=True),),
            "jax_libraries": (_h(inner=_SAM(rho=0.05), every=2, reuse=True),),
            # float32 within 1e-5 of float64: a radius at which g_v is not a small difference of nearly
            # parallel vectors (its unit direction would carry float32 rounding, amplified)
            "backends": (
                _h(inner=_SAM(rho=0.1), every=2),
                _h(inner=_GNP(r=0.5, alpha=0.8), every=2, reuse=True, decomposition="per_tensor"),
            ),
            "backends_zero_grad": (_h(inner=_SAM(rho=0.1), every=2, reuse=True),),
            "backends_jit": (_h(inner=_SAM(rho=0.1), every=2, reuse=True, decomposition="per_tensor"),),
            # float32 against eager within 1e-6: per tensor, a small leaf's g_v at a small radius is a small
            # difference of nearly parallel vectors, whose unit direction carries (amplified) rounding
            "torch_optimizer": (
                _h(inner=_SAM(rho=0.05), every=2),
                _h(inner=_GNP(r=0.5, alpha=0.8), every=3, reuse=True, alpha=0.5, decomposition="per_tensor"),
            ),
        },
    ),
    "looksam": RuleSettings(
        adapter=(_h(rho=0.05, every=2), _h(rho=0.5, every=3, alpha=0.5, decomposition="per_tensor", adaptive=True, eta=0.01)),
        zero=(_h(rho=0.0, every=2),),
        benchmark=_h(rho=0.05, every=5),
        valid=_h(rho=0.05, every=2),
        conformance=(_h(rho=0.05, every=3), _h(rho=0.05, every=3, alpha=0.5, decomposition="per_tensor")),
        suites={
            "jax_transform": (_h(rho=0.05, every=2),),
            "jax_libraries": (_h(rho=0.05, every=2),),
            "torch_ops_tensor": (_h(rho=0.05, every=2, alpha=0.5),),
            "backends": (_h(rho=0.1, every=2), _h(rho=0.1, every=2, decomposition="per_tensor")),
            "backends_zero_grad": (_h(rho=0.1, every=2), _h(rho=0.1, every=2, decomposition="per_tensor")),
            "backends_jit": (_h(rho=0.1, every=3, decomposition="per_tensor"),),
        },
    ),
}


# --------------------------------------------------------------------------------------------
# lookups


def missing() -> list[str]:
    """Registered rules without an entry in `TABLE`."""
    return [name for name in gradnorm.rules.names() if name not in TABLE]


def entry(rule: str) -> RuleSettings:
    try:
        return TABLE[rule]
    except KeyError:
        raise KeyError(
            f"rule {rule!r} has no entry in conformance/settings.py TABLE: add one (its adapter variants, zero "
            f"strength, benchmark and valid settings)"
        ) from None


def _rules() -> list[str]:
    """The registered rules that have an entry, in registry order (a rule without one is reported
    by tests/test_settings.py, not by every test module that iterates the rules)."""
    return [name for name in gradnorm.rules.names() if name in TABLE]


def _copy(settings: Iterable[Hyper]) -> list[Hyper]:
    return [dict(h) for h in settings]


def _variants(rule: str, suite: str) -> list[Hyper]:
    e = TABLE[rule]
    if suite == "adapter":
        return _copy(e.adapter)
    if suite == "zero":
        return _copy(e.zero)
    if suite not in SUITES:
        raise KeyError(f"unknown suite {suite!r}; suites: 'adapter', 'zero', {', '.join(repr(s) for s in SUITES)}")
    if suite in e.suites:
        return _copy(e.suites[suite])
    default = SUITES[suite][0]
    return _copy(e.adapter) if default == "adapter" else _copy(e.adapter[:1]) if default == "default" else []


def settings(suite: str = "adapter") -> list[tuple[str, Hyper]]:
    """``[(rule, hyperparameters), ...]`` of a suite ("adapter", "zero" or one of `SUITES`), every
    registered rule in registry order; fresh dicts, so a test may change them."""
    return [(rule, hyper) for rule in _rules() for hyper in _variants(rule, suite)]


def format_value(value: Any) -> str:
    """A hyperparameter value in a test or scenario id: a rule (`periodic`'s `inner`) as its name and the
    hyperparameters that differ from their defaults, ``sam(rho=0.05)``; anything else as ``str``."""
    if isinstance(value, gradnorm.rules.Rule):
        defaults = {h.name: h.default for h in type(value).spec()}
        shown = ",".join(f"{k}={format_value(v)}" for k, v in value.config.items()
                         if not (isinstance(v, (int, float, str, bool)) and v == defaults.get(k)))
        return f"{value.name}({shown})"
    return str(value)


def setting_id(rule: str, hyper: Mapping[str, Any]) -> str:
    """``sam-rho=0.5-adaptive=True-eta=0.01``: the test id of a setting (a rule value as `format_value`
    writes it: ``periodic-inner=sam(rho=0.05)-every=2``)."""
    return f"{rule}-{'-'.join(f'{k}={format_value(v)}' for k, v in hyper.items())}"


def ids(pairs: Iterable[tuple[str, Mapping[str, Any]]]) -> list[str]:
    return [setting_id(rule, hyper) for rule, hyper in pairs]


def adapter_settings() -> list[tuple[str, Hyper]]:
    """Every rule with every variant the adapters' tests run."""
    return settings("adapter")


def adapter_ids() -> list[str]:
    return ids(adapter_settings())


def default_settings() -> list[tuple[str, Hyper]]:
    """One setting per rule: its first adapter variant."""
    return [(rule, dict(TABLE[rule].adapter[0])) for rule in _rules()]


def zero_settings() -> list[tuple[str, Hyper]]:
    """Hyperparameters at which each rule equals ``sgd`` exactly."""
    return settings("zero")


def benchmark_settings() -> list[tuple[str, Hyper]]:
    """The benchmarks' setting of every rule; rules that need Hessian-vector products last (their
    floor and cost are of another kind)."""
    rules = sorted(_rules(), key=lambda name: gradnorm.rules.REGISTRY[name].needs_hvp)
    return [(rule, dict(TABLE[rule].benchmark)) for rule in rules]


def valid_settings() -> dict[str, Hyper]:
    """``{rule: a small valid hyperparameter set}``: the base of the error tests."""
    return {rule: dict(TABLE[rule].valid) for rule in _rules()}


def conformance_settings(problem: str) -> list[tuple[str, Hyper]]:
    """The conformance scenarios' settings on `problem` (`ByProblem` values resolved)."""
    out = []
    for rule in _rules():
        e = TABLE[rule]
        for hyper in e.conformance if e.conformance is not None else e.adapter:
            out.append((rule, hyper.resolve(problem) if isinstance(hyper, ByProblem) else dict(hyper)))
    return out
