"""Bad input gets a clear error (DESIGN.md section 6).

Every error names the argument, what was expected and what was received, and is raised before
``grad_fn`` runs wherever the mistake is detectable without evaluating the loss. Errors in
what ``grad_fn`` / ``hvp_fn`` return are raised on the first answer that is wrong. A zero
gradient never gives NaN, rules are immutable, and an exception raised by ``grad_fn`` propagates
unchanged with the parameters untouched.
"""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest

import gradnorm
from gradnorm import (
    GradnormError,
    HyperparameterError,
    MissingHVPError,
    OracleOutputError,
    ParamsError,
    UnknownRuleError,
)
from conformance.settings import valid_settings
from gradnorm import rules

# ---------------------------------------------------------------------------------------
# helpers

# A valid hyperparameter set for each rule (conformance/settings.py), and every rule.
VALID = valid_settings()
ALL_RULES = list(VALID)


def make_params():
    return {"w": np.array([1.0, -2.0, 0.5]), "b": np.asarray(0.25)}


def quadratic(params):
    """L = 0.5 * sum(p^2), grad = p (new arrays)."""
    loss = sum(0.5 * float(np.sum(v * v)) for v in params.values())
    return np.asarray(loss), {k: np.array(v, copy=True) for k, v in params.items()}


def identity_hvp(params, v):
    return {k: np.array(x, copy=True) for k, x in v.items()}


class Recorder:
    """A grad_fn (or hvp_fn) that counts its calls and delegates to ``fn``."""

    def __init__(self, fn=quadratic):
        self.fn = fn
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def never_called(*args):  # pragma: no cover - the point is that it never runs
    raise AssertionError("grad_fn must not be called when the input is invalid")


def hvp_for(rule):
    return identity_hvp if rule == "gr" else None


def run_step(params, grad_fn, rule, **hyper):
    return gradnorm.step(params, grad_fn, rule=rule, hvp_fn=hvp_for(rule) if isinstance(rule, str) else None, **hyper)


def rx(*parts: str) -> str:
    """A regex requiring every part, in order, anywhere in the message."""
    return ".*".join(parts)


# ---------------------------------------------------------------------------------------
# unknown rule names


@pytest.mark.parametrize(
    "name, suggestion",
    [("sma", "sam"), ("fdgr", "fd_gr"), ("SAM", "sam"), ("flood", "flooding"), ("coherant", "coherent")],
)
def test_unknown_rule_suggests_closest(name, suggestion):
    g = Recorder()
    with pytest.raises(UnknownRuleError, match=rx("`rule`", re.escape(f"Received: {name!r}"), f"Did you mean '{suggestion}'")) as info:
        gradnorm.step(make_params(), g, rule=name)
    msg = str(info.value)
    for valid in ALL_RULES:
        assert f"'{valid}'" in msg, f"valid name {valid!r} is not listed in: {msg}"
    assert g.calls == 0
    assert isinstance(info.value, ValueError)


def test_unknown_rule_without_close_match_lists_valid_names():
    with pytest.raises(UnknownRuleError, match=rx("`rule`", "'sgd'", "'coherent'", re.escape("Received: 'xyzzy'"))):
        gradnorm.step(make_params(), never_called, rule="xyzzy")
    with pytest.raises(UnknownRuleError, match=rx("`rule`", "Received: 'xyzzy'")):
        rules.get("xyzzy")


@pytest.mark.parametrize(
    "bad, received",
    [(3, r"3 \(type int\)"), (None, r"None \(type NoneType\)"), (1.5, r"1\.5"), (["sam"], r"\['sam'\]"), (object(), "object")],
)
def test_rule_of_wrong_type(bad, received):
    g = Recorder()
    with pytest.raises(GradnormError, match=rx("`rule`", "Received", received)):
        gradnorm.step(make_params(), g, rule=bad)
    assert g.calls == 0


def test_rule_class_not_a_rule():
    with pytest.raises(GradnormError, match=rx("`rule`", "Received", "dict")):
        gradnorm.step(make_params(), never_called, rule=dict)


# ---------------------------------------------------------------------------------------
# hyperparameters

MISSING = [
    ("sam", "rho"),
    ("gnp", "r"),
    ("gnp", "alpha"),
    ("gr", "gamma"),
    ("fd_gr", "gamma"),
    ("fd_gr", "eps"),
    ("flooding", "b"),
    ("coherent", "lam"),
    ("coherent", "threshold"),
]


@pytest.mark.parametrize("rule, missing", MISSING)
def test_missing_required_hyperparameter(rule, missing):
    hyper = {k: v for k, v in VALID[rule].items() if k != missing}
    g = Recorder()
    with pytest.raises(HyperparameterError, match=rx(f"'{rule}'", f"`{missing}`")) as info:
        run_step(make_params(), g, rule, **hyper)
    assert g.calls == 0
    assert isinstance(info.value, ValueError)
    # the class constructor and rules.get say the same
    with pytest.raises(HyperparameterError, match=f"`{missing}`"):
        rules.REGISTRY[rule](**hyper)
    with pytest.raises(HyperparameterError, match=f"`{missing}`"):
        rules.get(rule, **hyper)


NAN, INF = float("nan"), float("inf")

# (rule, overriding hyperparameters, argument named, expectation regex, received regex)
BAD_HYPER = [
    # sam
    ("sam", {"rho": -1}, "rho", ">= 0", r"-1(\.0)?\b"),
    ("sam", {"rho": -0.05}, "rho", ">= 0", r"-0\.05"),
    ("sam", {"rho": NAN}, "rho", "finite", "nan"),
    ("sam", {"rho": INF}, "rho", "finite", "inf"),
    ("sam", {"rho": -INF}, "rho", "finite", "-inf"),
    ("sam", {"rho": True}, "rho", "number", "True"),
    ("sam", {"rho": "0.05"}, "rho", "number", "'0.05'"),
    ("sam", {"rho": None}, "rho", "number", "None"),
    ("sam", {"rho": [0.05]}, "rho", "number", r"\[0\.05\]"),
    ("sam", {"rho": np.array([0.1, 0.2])}, "rho", "0-d", r"shape \(2,\)"),
    ("sam", {"adaptive": "yes"}, "adaptive", "True or False", "'yes'"),
    ("sam", {"adaptive": 1}, "adaptive", "True or False", r"1 \(type int\)"),
    ("sam", {"adaptive": None}, "adaptive", "True or False", "None"),
    ("sam", {"eta": -0.1}, "eta", ">= 0", r"-0\.1"),
    ("sam", {"eta": NAN}, "eta", "finite", "nan"),
    # gnp
    ("gnp", {"alpha": -0.1}, "alpha", ">= 0", r"-0\.1"),
    ("gnp", {"alpha": NAN}, "alpha", "finite", "nan"),
    ("gnp", {"r": -1}, "r", ">= 0", r"-1(\.0)?\b"),
    ("gnp", {"r": "0.1"}, "r", "number", "'0.1'"),
    ("gnp", {"mix_unit_gradient": "no"}, "mix_unit_gradient", "True or False", "'no'"),
    # gr
    ("gr", {"gamma": -1}, "gamma", ">= 0", r"-1(\.0)?\b"),
    ("gr", {"gamma": INF}, "gamma", "finite", "inf"),
    ("gr", {"gamma": False}, "gamma", "number", "False"),
    ("gr", {"penalty": "l3"}, "penalty", "one of 'squared', 'norm'", "'l3'"),
    ("gr", {"penalty": None}, "penalty", "one of", "None"),
    # fd_gr
    ("fd_gr", {"eps": 0}, "eps", "> 0", r"\b0(\.0)?\b"),
    ("fd_gr", {"eps": 0.0}, "eps", "> 0", r"\b0(\.0)?\b"),
    ("fd_gr", {"eps": -0.01}, "eps", "> 0", r"-0\.01"),
    ("fd_gr", {"eps": NAN}, "eps", "finite", "nan"),
    ("fd_gr", {"gamma": -1}, "gamma", ">= 0", r"-1(\.0)?\b"),
    ("fd_gr", {"difference": "sideways"}, "difference", "one of 'forward', 'backward', 'central'", "'sideways'"),
    ("fd_gr", {"difference": 1}, "difference", "one of", r"1 \(type int\)"),
    ("fd_gr", {"normalize": "true"}, "normalize", "True or False", "'true'"),
    # gam
    ("gam", {"grad_beta_0": 1.5}, "grad_beta_0", "<= 1", r"1\.5"),
    ("gam", {"grad_beta_0": -0.5}, "grad_beta_0", ">= 0", r"-0\.5"),
    ("gam", {"grad_beta_1": 2}, "grad_beta_1", "<= 1", r"\b2(\.0)?\b"),
    ("gam", {"grad_rho": -0.02}, "grad_rho", ">= 0", r"-0\.02"),
    ("gam", {"grad_norm_rho": NAN}, "grad_norm_rho", "finite", "nan"),
    ("gam", {"grad_gamma": -0.03}, "grad_gamma", ">= 0", r"-0\.03"),
    ("gam", {"adaptive": "yes"}, "adaptive", "True or False", "'yes'"),
    ("gam", {"variant": "official"}, "variant", "one of 'code', 'paper'", "'official'"),
    # flooding
    ("flooding", {"b": NAN}, "b", "finite", "nan"),
    ("flooding", {"b": INF}, "b", "finite", "inf"),
    ("flooding", {"b": "0.1"}, "b", "number", "'0.1'"),
    ("flooding", {"b": None}, "b", "number", "None"),
    # coherent
    ("coherent", {"threshold": 2}, "threshold", "<= 1", r"\b2(\.0)?\b"),
    ("coherent", {"threshold": -1.5}, "threshold", ">= -1", r"-1\.5"),
    ("coherent", {"threshold": NAN}, "threshold", "finite", "nan"),
    ("coherent", {"lam": -1}, "lam", ">= 0", r"-1(\.0)?\b"),
    ("coherent", {"delay": -1}, "delay", "integer >= 0", r"-1 \(type int\)"),
    ("coherent", {"delay": 1.5}, "delay", "integer", r"1\.5"),
    ("coherent", {"delay": True}, "delay", "integer", "True"),
    ("coherent", {"delay": "3"}, "delay", "integer", "'3'"),
    ("coherent", {"penalty": "l3"}, "penalty", "one of 'l2', 'l1'", "'l3'"),
    ("coherent", {"sparsity_tol": -1e-3}, "sparsity_tol", ">= 0", r"-0\.001"),
]
# norm_eps exists for every rule
for _rule in ALL_RULES:
    BAD_HYPER.append((_rule, {"norm_eps": -1}, "norm_eps", ">= 0", r"-1(\.0)?\b"))
    BAD_HYPER.append((_rule, {"norm_eps": NAN}, "norm_eps", "finite", "nan"))
    BAD_HYPER.append((_rule, {"norm_eps": "1e-12"}, "norm_eps", "number", "'1e-12'"))


def _case_id(case):
    rule, hyper, *_ = case
    return f"{rule}-" + ",".join(f"{k}={v!r}" for k, v in hyper.items())


@pytest.mark.parametrize("case", BAD_HYPER, ids=[_case_id(c) for c in BAD_HYPER])
def test_bad_hyperparameter(case):
    rule, override, name, expectation, received = case
    hyper = {**VALID[rule], **override}
    pattern = rx(f"`{name}`", re.escape(expectation), r"Received:?", received)
    g = Recorder()
    with pytest.raises(HyperparameterError, match=pattern) as info:
        run_step(make_params(), g, rule, **hyper)
    assert g.calls == 0, "the error must come before grad_fn is called"
    assert isinstance(info.value, ValueError)
    with pytest.raises(HyperparameterError, match=pattern):
        rules.REGISTRY[rule](**hyper)
    with pytest.raises(HyperparameterError, match=pattern):
        rules.get(rule, **hyper)


@pytest.mark.parametrize("rule", ALL_RULES)
def test_unknown_hyperparameter_lists_the_rules_hyperparameters(rule):
    g = Recorder()
    with pytest.raises(HyperparameterError, match=rx(f"'{rule}'", "`bogus`")) as info:
        run_step(make_params(), g, rule, **VALID[rule], bogus=1.0)
    assert g.calls == 0
    msg = str(info.value)
    for h in rules.REGISTRY[rule].spec():
        assert h.name in msg, f"hyperparameter {h.name!r} of {rule!r} not listed in: {msg}"


def test_sam_with_gamma_lists_sams_hyperparameters():
    with pytest.raises(HyperparameterError, match=rx("'sam'", "`gamma`", "rho", "adaptive", "eta", "norm_eps")):
        gradnorm.step(make_params(), never_called, rule="sam", rho=0.05, gamma=0.1)
    with pytest.raises(HyperparameterError, match=rx("`gamma`", "rho")):
        rules.SAM(rho=0.05, gamma=0.1)


def test_bad_hyperparameter_with_a_rule_object():
    g = Recorder()
    with pytest.raises(HyperparameterError, match=rx("`rho`", "Received", r"-1(\.0)?\b")):
        gradnorm.step(make_params(), g, rule=rules.SAM(rho=0.05), rho=-1)
    with pytest.raises(HyperparameterError, match="`gamma`"):
        gradnorm.step(make_params(), g, rule=rules.SAM(rho=0.05), gamma=0.1)
    with pytest.raises(HyperparameterError, match="`rho`"):
        gradnorm.step(make_params(), g, rule=rules.SAM)  # a class without its required rho
    assert g.calls == 0


def test_valid_hyperparameter_forms_are_accepted():
    """The validators do not over-reject: ints, numpy floats, fractions and 0-d arrays pass."""
    assert rules.SAM(rho=1).rho == 1.0
    assert rules.SAM(rho=np.float64(0.05)).rho == 0.05
    assert rules.SAM(rho=Fraction(1, 20)).rho == pytest.approx(0.05)
    assert rules.SAM(rho=np.asarray(0.05)).rho is not None
    assert rules.Coherent(lam=0.1, threshold=-1, delay=0).threshold == -1.0
    assert rules.Coherent(lam=0.1, threshold=1.0).threshold == 1.0
    assert rules.GAM(grad_beta_0=0.0, grad_beta_1=1.0).grad_beta_1 == 1.0
    assert rules.Flooding(b=-0.5).b == -0.5
    assert rules.FDGR(gamma=0.0, eps=1e-8).eps == 1e-8


# ---------------------------------------------------------------------------------------
# hvp


@pytest.mark.parametrize("penalty", ["squared", "norm"])
def test_gr_without_hvp_fn(penalty):
    g = Recorder()
    with pytest.raises(MissingHVPError, match=rx("'gr'", "`hvp_fn")) as info:
        gradnorm.step(make_params(), g, rule="gr", gamma=0.1, penalty=penalty)
    assert g.calls == 0
    assert isinstance(info.value, ValueError)


def test_gr_hvp_fn_not_callable():
    g = Recorder()
    with pytest.raises(TypeError, match=rx("`hvp_fn`", "Received", "int")):
        gradnorm.step(make_params(), g, rule="gr", gamma=0.1, hvp_fn=3)
    assert g.calls == 0


def test_grad_fn_not_callable():
    with pytest.raises(TypeError, match=rx("`grad_fn`", "callable", "Received", r"\{")):
        gradnorm.step(make_params(), {"w": 1}, rule="sgd")


@pytest.mark.parametrize(
    "bad_hvp, pattern",
    [
        (lambda p, v: [v["b"], v["w"]], rx("`hvp_fn`", "tree structure", "Received", r"\[\*, \*\]")),
        (lambda p, v: {"w": v["w"]}, rx("`hvp_fn`", "tree structure")),
        (lambda p, v: {**v, "w": np.zeros(4)}, rx("`hvp_fn`", r"\['w'\]", r"\(3,\)", r"Received:? shape \(4,\)")),
        (lambda p, v: {**v, "w": v["w"].astype(np.float32)}, rx("`hvp_fn`", r"\['w'\]", "float64", "float32")),
        (lambda p, v: {**v, "b": 0.0}, rx("`hvp_fn`", r"\['b'\]", "float")),
        (lambda p, v: np.zeros(3), rx("`hvp_fn`", "tree structure")),
    ],
    ids=["list", "missing-key", "shape", "dtype", "python-float-leaf", "single-array"],
)
def test_hvp_fn_wrong_output(bad_hvp, pattern):
    g = Recorder()
    h = Recorder(bad_hvp)
    with pytest.raises(OracleOutputError, match=pattern):
        gradnorm.step(make_params(), g, rule="gr", gamma=0.1, hvp_fn=h)
    assert h.calls == 1


# ---------------------------------------------------------------------------------------
# what grad_fn returns


def _grads(params):
    return {k: np.array(v, copy=True) for k, v in params.items()}


BAD_GRAD_FN = [
    ("grads-only", lambda p: _grads(p), rx("`grad_fn`", "pair", "Received", "dict")),
    ("triple", lambda p: (np.asarray(1.0), _grads(p), None), rx("`grad_fn`", "pair", "Received", "tuple")),
    ("list-pair", lambda p: [np.asarray(1.0), _grads(p)], rx("`grad_fn`", "pair", "Received", "list")),
    ("none", lambda p: None, rx("`grad_fn`", "pair", "Received", "None")),
    ("vector-loss", lambda p: (np.ones(3), _grads(p)), rx("loss", "`grad_fn`", "scalar", r"\(3,\)")),
    ("matrix-loss", lambda p: (np.ones((2, 1)), _grads(p)), rx("loss", "`grad_fn`", "scalar", r"\(2, 1\)")),
    ("string-loss", lambda p: ("abc", _grads(p)), rx("loss", "`grad_fn`", "scalar", "'abc'")),
    ("none-loss", lambda p: (None, _grads(p)), rx("loss", "`grad_fn`", "scalar", "None")),
    ("missing-key", lambda p: (np.asarray(1.0), {"w": p["w"].copy()}),
     rx("`grad_fn`", "tree structure", "'b'", "Received", r"\{'w': \*\}")),
    ("extra-key", lambda p: (np.asarray(1.0), {**_grads(p), "c": np.zeros(2)}),
     rx("`grad_fn`", "tree structure", "Received", "'c'")),
    ("list-not-dict", lambda p: (np.asarray(1.0), [p["b"].copy(), p["w"].copy()]),
     rx("`grad_fn`", "tree structure", r"\{'b': \*, 'w': \*\}", "Received", r"\[\*, \*\]")),
    ("tuple-not-dict", lambda p: (np.asarray(1.0), (p["b"].copy(), p["w"].copy())),
     rx("`grad_fn`", "tree structure", "Received", r"\(\*, \*\)")),
    ("none-grads", lambda p: (np.asarray(1.0), None), rx("`grad_fn`", "tree structure", "Received")),
    ("wrong-shape", lambda p: (np.asarray(1.0), {**_grads(p), "w": np.zeros(4)}),
     rx("`grad_fn`", r"\['w'\]", r"shape \(3,\)", r"Received:? shape \(4,\)")),
    ("wrong-shape-0d", lambda p: (np.asarray(1.0), {**_grads(p), "b": np.zeros(1)}),
     rx("`grad_fn`", r"\['b'\]", r"shape \(\)", r"Received:? shape \(1,\)")),
    ("float32-for-float64", lambda p: (np.asarray(1.0), {k: v.astype(np.float32) for k, v in p.items()}),
     rx("`grad_fn`", r"\['b'\]|\['w'\]", "dtype float64", "Received:? dtype float32")),
    ("python-float-leaf", lambda p: (np.asarray(1.0), {**_grads(p), "b": 0.25}),
     rx("`grad_fn`", r"\['b'\]", r"0\.25", "float")),
    ("torch-grads", lambda p: (np.asarray(1.0), {k: __import__("torch").asarray(v) for k, v in p.items()}),
     rx("`grad_fn`", r"\['(b|w)'\]", "float64", "torch")),
]


@pytest.mark.parametrize("rule", ["sgd", "sam", "fd_gr"])
@pytest.mark.parametrize("case", BAD_GRAD_FN, ids=[c[0] for c in BAD_GRAD_FN])
def test_grad_fn_wrong_output(case, rule):
    _, fn, pattern = case
    g = Recorder(fn)
    with pytest.raises(OracleOutputError, match=pattern) as info:
        run_step(make_params(), g, rule, **VALID[rule])
    assert g.calls == 1, "the first wrong answer must be reported, not used"
    assert isinstance(info.value, ValueError)


def test_python_float_loss_is_accepted():
    res = gradnorm.step(make_params(), lambda p: (1.5, _grads(p)), rule="sgd")
    assert float(res.loss) == 1.5


@pytest.mark.parametrize("rule", ["sam", "gnp", "fd_gr", "gam"])
def test_grad_fn_wrong_output_on_an_extra_pass(rule):
    """A grad_fn that answers correctly at params and wrongly at a perturbed point."""

    def fn(p):
        loss, grads = quadratic(p)
        if g.calls > 1:
            grads = {k: v.astype(np.float32) for k, v in grads.items()}
        return loss, grads

    g = Recorder(fn)
    with pytest.raises(OracleOutputError, match=rx("`grad_fn`", "float64", "Received:? dtype float32")):
        run_step(make_params(), g, rule, **VALID[rule])
    assert g.calls == 2


# ---------------------------------------------------------------------------------------
# params

BAD_PARAMS = [
    ("empty-dict", lambda: {}, rx("`params`", "at least one array", "Received", "empty")),
    ("empty-list", lambda: [], rx("`params`", "at least one array", "Received", "empty")),
    ("none", lambda: None, rx("`params`", "at least one array", "Received", "empty")),
    ("list-leaf", lambda: {"w": [1.0, 2.0]}, rx("`params`", "array", "Received", r"1\.0 \(type float\)")),
    ("int-leaf", lambda: {"w": np.ones(2), "b": 3}, rx("`params`", "array", "Received", r"3 \(type int\)")),
    ("float-leaf", lambda: 0.5, rx("`params`", "array", "Received", r"0\.5 \(type float\)")),
    ("string-leaf", lambda: {"w": "abc"}, rx("`params`", "array", "Received", "'abc'")),
    ("int-dtype", lambda: {"w": np.arange(3)}, rx("`params`", "real floating", "Received", "int")),
    ("int32-dtype", lambda: {"w": np.ones(3), "b": np.asarray(1, dtype=np.int32)},
     rx("`params`", "real floating", "Received", "int32")),
    ("bool-dtype", lambda: {"w": np.ones(3, dtype=bool)}, rx("`params`", "real floating", "Received", "bool")),
    ("complex-dtype", lambda: {"w": np.ones(3, dtype=np.complex128)},
     rx("`params`", "real floating", "Received", "complex128")),
    ("numpy-and-torch", lambda: {"w": np.ones(3), "b": __import__("torch").ones(2, dtype=__import__("torch").float64)},
     rx("`params`", "one array library", "Received", "numpy", "torch")),
    ("numpy-and-strict", lambda: {"w": np.ones(3), "b": __import__("array_api_strict").ones(2)},
     rx("`params`", "one array library", "Received", "array_api_strict|numpy")),
]


@pytest.mark.parametrize("rule", ALL_RULES)
@pytest.mark.parametrize("case", BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_params(case, rule):
    _, make, pattern = case
    g = Recorder(never_called)
    with pytest.raises(ParamsError, match=pattern) as info:
        run_step(make(), g, rule, **VALID[rule])
    assert g.calls == 0
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize("case", BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_params_in_init(case):
    _, make, pattern = case
    with pytest.raises(ParamsError, match=pattern):
        rules.SAM(rho=0.05).init(make())


def test_wrong_state_for_rule_is_reported_before_grad_fn():
    """``state`` of another rule (here the empty state of sam) given to coherent.

    Detectable before evaluation: the rule knows the type of its own state.
    """
    g = Recorder()
    params = make_params()
    with pytest.raises((TypeError, ValueError), match=rx("`state`", "Received", "EmptyState")):
        gradnorm.step(params, g, rule="coherent", lam=0.1, threshold=0.0, state=rules.EmptyState())
    assert g.calls == 0


# ---------------------------------------------------------------------------------------
# flood / iflood


@pytest.mark.parametrize("fn", [gradnorm.flood, gradnorm.iflood])
@pytest.mark.parametrize(
    "b, received",
    [(NAN, "nan"), (INF, "inf"), ("0.1", "'0.1'"), (None, "None"), (True, "True"), (np.array([0.1, 0.2]), r"shape \(2,\)")],
)
def test_flood_bad_level(fn, b, received):
    losses = np.asarray(0.3) if fn is gradnorm.flood else np.array([0.3, 0.1])
    with pytest.raises(ValueError, match=rx("`b`", "finite", "Received", received)) as info:
        fn(losses, b)
    assert isinstance(info.value, GradnormError)


@pytest.mark.parametrize("loss, received", [(0.3, r"0\.3 \(type float\)"), ([0.3], r"\[0\.3\]"), (None, "None"), ("0.3", "'0.3'")])
def test_flood_non_array_loss(loss, received):
    with pytest.raises(TypeError, match=rx("`loss`", "array", "Received", received)):
        gradnorm.flood(loss, 0.1)


@pytest.mark.parametrize("losses, received", [([0.3, 0.1], r"\[0\.3, 0\.1\]"), (0.3, r"0\.3"), (None, "None")])
def test_iflood_non_array_losses(losses, received):
    with pytest.raises(TypeError, match=rx("`losses`", "array", "Received", received)):
        gradnorm.iflood(losses, 0.1)


def test_iflood_zero_dim_loss():
    with pytest.raises(ValueError, match=rx("`losses`", "per-example", "Received", r"shape \(\)", "gradnorm.flood")):
        gradnorm.iflood(np.asarray(0.3), 0.1)


def test_flood_valid_levels():
    assert float(gradnorm.flood(np.asarray(0.05), 0.1)) == pytest.approx(0.15)
    assert float(gradnorm.iflood(np.array([0.05, 0.3]), 0)) == pytest.approx(0.175)


# ---------------------------------------------------------------------------------------
# zero gradient never gives NaN (RuntimeWarnings are errors in this suite too)

ZERO_CONFIGS = [
    ("sgd", {}),
    ("sam", {"rho": 0.05}),
    ("sam", {"rho": 0.5, "adaptive": True}),
    ("sam", {"rho": 0.5, "adaptive": True, "eta": 0.01}),
    ("gnp", {"r": 0.1, "alpha": 0.8}),
    ("gnp", {"r": 0.1, "alpha": 0.8, "mix_unit_gradient": True}),
    ("gr", {"gamma": 0.1}),
    ("gr", {"gamma": 0.1, "penalty": "norm"}),
    ("fd_gr", {"gamma": 0.1, "eps": 0.01}),
    ("fd_gr", {"gamma": 0.1, "eps": 0.01, "normalize": True}),
    ("fd_gr", {"gamma": 0.1, "eps": 0.01, "difference": "central", "normalize": True}),
    ("fd_gr", {"gamma": 0.1, "eps": 0.01, "difference": "backward"}),
    ("gam", {}),
    ("gam", {"adaptive": True}),
    ("gam", {"variant": "paper"}),
    ("flooding", {"b": 0.1}),
    ("flooding", {"b": 1.0}),  # L == b: sign 0
    ("coherent", {"lam": 0.1, "threshold": 0.0}),
    ("coherent", {"lam": 0.1, "threshold": 0.0, "penalty": "l1"}),
]


@pytest.mark.parametrize("at_zero", [False, True], ids=["params-nonzero", "params-zero"])
@pytest.mark.parametrize("rule, hyper", ZERO_CONFIGS, ids=[_case_id(c) for c in ZERO_CONFIGS])
def test_zero_gradient_gives_no_nan(rule, hyper, at_zero):
    params = make_params()
    if at_zero:
        params = {k: np.zeros_like(v) for k, v in params.items()}

    def flat(p):
        return np.asarray(1.0), {k: np.zeros_like(v) for k, v in p.items()}

    def zero_hvp(p, v):
        return {k: np.zeros_like(x) for k, x in v.items()}

    with np.errstate(all="raise"):
        res = gradnorm.step(params, flat, rule=rule, hvp_fn=zero_hvp if rule == "gr" else None, **hyper)
    for k, d in res.grad.items():
        assert np.all(np.isfinite(d)), f"{rule} {hyper}: direction[{k!r}] = {d}"
    for key, value in res.info.items():
        if isinstance(value, (int, bool)):
            continue
        arr = np.asarray(value)
        if np.issubdtype(arr.dtype, np.number):
            assert np.all(np.isfinite(arr)), f"{rule} {hyper}: info[{key!r}] = {value}"
    assert bool(res.info["finite"])


# ---------------------------------------------------------------------------------------
# immutability and replace


@pytest.mark.parametrize("rule", ALL_RULES)
def test_rules_are_immutable(rule):
    obj = rules.get(rule, **VALID[rule])
    before = obj.config
    for h in obj.spec():
        with pytest.raises(AttributeError, match=rx("immutable", "replace")):
            setattr(obj, h.name, getattr(obj, h.name))
    with pytest.raises(AttributeError):
        obj.new_attribute = 1
    with pytest.raises(AttributeError):
        obj.name = "other"
    cfg = obj.config
    cfg["norm_eps"] = -1.0  # config is a copy
    assert obj.config == before
    assert obj.norm_eps == before["norm_eps"]


@pytest.mark.parametrize("rule", ALL_RULES)
def test_rule_attributes_cannot_be_deleted(rule):
    obj = rules.get(rule, **VALID[rule])
    before = obj.config
    with pytest.raises(AttributeError):
        del obj.norm_eps
    assert obj.norm_eps == before["norm_eps"]


@pytest.mark.parametrize("case", BAD_HYPER, ids=[_case_id(c) for c in BAD_HYPER])
def test_replace_validates_again(case):
    rule, override, name, expectation, received = case
    obj = rules.get(rule, **VALID[rule])
    before = obj.config
    with pytest.raises(HyperparameterError, match=rx(f"`{name}`", re.escape(expectation), "Received", received)):
        obj.replace(**override)
    assert obj.config == before


@pytest.mark.parametrize("rule", ALL_RULES)
def test_replace_unknown_hyperparameter(rule):
    obj = rules.get(rule, **VALID[rule])
    with pytest.raises(HyperparameterError, match=rx("`bogus`", "norm_eps")):
        obj.replace(bogus=1)


def test_replace_returns_a_validated_copy():
    sam = rules.SAM(rho=0.05)
    other = sam.replace(rho=0.1)
    assert other is not sam and other.rho == 0.1 and sam.rho == 0.05
    assert sam.replace() == sam


# ---------------------------------------------------------------------------------------
# grad_fn raising: the exception propagates unchanged, params are untouched


class Boom(RuntimeError):
    pass


def _raising_cases():
    cases = []
    for name in ALL_RULES:
        n = rules.get(name, **VALID[name]).grad_evals
        for k in range(1, n + 1):
            cases.append((name, k))
    return cases


@pytest.mark.parametrize("rule, fail_on", _raising_cases())
def test_grad_fn_exception_propagates_and_params_unchanged(rule, fail_on):
    params = make_params()
    copy = {k: v.copy() for k, v in params.items()}
    ids = {k: id(v) for k, v in params.items()}
    err = Boom(f"failure on call {fail_on}")

    def fn(p):
        if g.calls == fail_on:
            raise err
        return quadratic(p)

    g = Recorder(fn)
    with pytest.raises(Boom) as info:
        run_step(params, g, rule, **VALID[rule])
    assert info.value is err
    assert str(info.value) == f"failure on call {fail_on}"
    assert g.calls == fail_on
    assert set(params) == set(copy)
    for k in copy:
        assert id(params[k]) == ids[k]
        assert params[k].dtype == copy[k].dtype
        assert params[k].tobytes() == copy[k].tobytes(), f"params[{k!r}] changed"


def test_hvp_fn_exception_propagates_and_params_unchanged():
    params = make_params()
    copy = {k: v.copy() for k, v in params.items()}
    err = Boom("hvp failed")

    def bad_hvp(p, v):
        raise err

    with pytest.raises(Boom) as info:
        gradnorm.step(params, quadratic, rule="gr", gamma=0.1, hvp_fn=bad_hvp)
    assert info.value is err
    for k in copy:
        assert params[k].tobytes() == copy[k].tobytes()


def test_error_messages_name_received_values_consistently():
    """Every hyperparameter error carries ``Received:`` (the documented format)."""
    for rule, override, *_ in BAD_HYPER:
        with pytest.raises(HyperparameterError) as info:
            rules.get(rule, **{**VALID[rule], **override})
        assert "Received: " in str(info.value), str(info.value)
