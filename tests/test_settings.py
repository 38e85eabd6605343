"""The rule settings table (conformance/settings.py): one entry per registered rule, and every
entry's hyperparameters construct the rule."""

from __future__ import annotations

import pytest

import gradnorm
from conformance import settings as S


def test_every_registered_rule_has_an_entry():
    missing = S.missing()
    assert not missing, (
        f"registered rules without an entry in conformance/settings.py TABLE: {missing}; add one (its adapter "
        f"variants, zero-strength, benchmark and valid settings) and every test that runs every rule runs it"
    )


def test_a_rule_registered_without_an_entry_is_reported():
    """The check above fails for a new rule: register one for the duration of this test."""

    class Dummy(gradnorm.rules.Rule):  # registered, never run
        name = "dummy_rule_without_settings"

    gradnorm.rules.register(Dummy)
    try:
        assert S.missing() == ["dummy_rule_without_settings"]
        with pytest.raises(AssertionError, match="dummy_rule_without_settings"):
            test_every_registered_rule_has_an_entry()
        with pytest.raises(KeyError, match="no entry"):
            S.entry("dummy_rule_without_settings")
        # the lists the tests iterate skip it (this test reports it) instead of breaking every module
        assert "dummy_rule_without_settings" not in {rule for rule, _ in S.adapter_settings()}
    finally:
        del gradnorm.rules.REGISTRY["dummy_rule_without_settings"]
    assert not S.missing()


def test_no_entry_for_a_rule_that_is_not_registered():
    assert set(S.TABLE) <= set(gradnorm.rules.names())


def _every_setting():
    out = []
    for suite in ("adapter", "zero", *S.SUITES):
        out += [(suite, rule, hyper) for rule, hyper in S.settings(suite)]
    out += [("benchmark", rule, hyper) for rule, hyper in S.benchmark_settings()]
    out += [("valid", rule, hyper) for rule, hyper in S.valid_settings().items()]
    for problem in ("quadratic", "logistic", "mlp"):
        out += [(f"conformance:{problem}", rule, hyper) for rule, hyper in S.conformance_settings(problem)]
    return out


@pytest.mark.parametrize("suite,rule,hyper", _every_setting(),
                         ids=[f"{suite}:{S.setting_id(rule, hyper)}" for suite, rule, hyper in _every_setting()])
def test_every_setting_constructs_its_rule(suite, rule, hyper):
    obj = gradnorm.rules.get(rule, **hyper)
    assert obj.name == rule
    assert all(obj.config[k] == v for k, v in hyper.items())


@pytest.mark.parametrize("rule", sorted(S.TABLE))
def test_entry_shape(rule):
    e = S.entry(rule)
    assert e.adapter, f"{rule}: `adapter` needs at least one variant (the first is the rule's default setting)"
    assert e.zero, f"{rule}: `zero` needs the hyperparameters at which the rule equals sgd"
    assert set(e.suites) <= set(S.SUITES), f"{rule}: unknown suites {set(e.suites) - set(S.SUITES)}"
    for hyper in e.zero:  # a Python zero takes the exact shortcut: one gradient evaluation, no HVP
        if any(isinstance(v, float) and v == 0.0 for v in hyper.values()):
            obj = gradnorm.rules.get(rule, **hyper)
            assert obj.grad_evals == 1 and obj.hvp_evals == 0, (rule, hyper)


def test_ids_and_fresh_copies():
    pairs = S.adapter_settings()
    assert S.adapter_ids() == S.ids(pairs)
    assert S.setting_id("sam", {"rho": 0.5, "adaptive": True}) == "sam-rho=0.5-adaptive=True"
    assert len(set(S.adapter_ids())) == len(pairs)  # test ids are unique
    pairs[1][1]["rho"] = 123.0  # a test that changes its copy changes nothing else
    assert S.adapter_settings()[1][1]["rho"] != 123.0
    assert [rule for rule, _ in S.default_settings()] == [name for name in gradnorm.rules.names() if name in S.TABLE]


def test_benchmark_rules_needing_hvps_come_last():
    needs = [gradnorm.rules.REGISTRY[rule].needs_hvp for rule, _ in S.benchmark_settings()]
    assert needs == sorted(needs)
