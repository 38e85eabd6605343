"""gradnorm.torch.RuleScheduler: the GR warm-up of the official GNP code on gradnorm.torch.Optimizer.

The strength at every step is the hand-written float32 ramp; the trajectory is a NumPy loop with the
analytic gradient of a least-squares loss and the GNP formula written out; the "zero" strategy runs
the closure once per step while it is off; the scheduler composes with an LR scheduler and resumes
from state dicts bit for bit."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import gradnorm
from gradnorm.schedules import gnp_warmup, linear_warmup
from tests._warmup import F32, W0, XS, YS, hand_ramp32, numpy_trajectory

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gradnorm.torch")

def make(rule_kwargs, lr=0.1):
    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = gt.Optimizer([w], torch.optim.SGD, rule="gnp", lr=lr, **rule_kwargs)
    x, y = torch.tensor(XS), torch.tensor(YS)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = 0.5 * ((x @ w - y) ** 2).mean()
        loss.backward()
        return loss

    return w, opt, closure, calls


@pytest.mark.parametrize("strategy", ["r", "lambda", "zero"])
def test_warmup_strength_and_trajectory_against_the_hand_written_ramp(strategy):
    steps, warm, r, alpha = 9, 4, 0.1, 0.8
    w, opt, closure, calls = make({"r": r, "alpha": alpha, "mix_unit_gradient": True, "norm_eps": 0.0})
    sched = gt.RuleScheduler(opt, gnp_warmup(strategy, r=r, alpha=alpha, warmup_steps=warm))
    seen_r, seen_a, evals, traj = [], [], [], []
    for _ in range(steps):
        seen_r.append(opt.param_groups[0]["r"])
        seen_a.append(opt.param_groups[0]["alpha"])
        calls.clear()
        opt.step(closure)
        evals.append(len(calls))
        traj.append(w.detach().numpy().copy())
        sched.step()
    ramp_r = [hand_ramp32(r, warm, t) for t in range(steps)]
    ramp_a = [hand_ramp32(alpha, warm, t) for t in range(steps)]
    want_r = {"r": ramp_r, "lambda": [r] * steps, "zero": [0.0] * warm + [r] * (steps - warm)}[strategy]
    want_a = {"r": [alpha] * steps, "lambda": ramp_a, "zero": [alpha] * steps}[strategy]
    assert seen_r == want_r and seen_a == want_a
    # one closure call per step while the strength is 0 (step 0 of "r" and "lambda", the first w of "zero")
    assert evals == [1 if (a == 0 or b == 0) else 2 for a, b in zip(want_r, want_a)]
    if strategy == "zero":
        assert evals == [1] * warm + [2] * (steps - warm)
    want = numpy_trajectory(want_r, want_a, [0.1] * steps, mix=True)
    np.testing.assert_allclose(np.array(traj), np.array(want), rtol=1e-12, atol=0)


def test_composes_with_an_lr_scheduler():
    w, opt, closure, calls = make({"r": 0.1, "alpha": 0.8})
    lr_sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, end_factor=1.0, total_iters=4)
    sched = gt.RuleScheduler(opt, gnp_warmup("r", r=0.1, alpha=0.8, warmup_steps=4))
    lrs, rs = [], []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        rs.append(opt.param_groups[0]["r"])
        opt.step(closure)
        lr_sched.step()
        sched.step()
    np.testing.assert_allclose(lrs, [0.1 * (0.25 + 0.75 * min(t, 4) / 4) for t in range(6)], rtol=1e-12)
    assert rs == [hand_ramp32(0.1, 4, t) for t in range(6)]
    assert sched.get_last_values() == [{"r": hand_ramp32(0.1, 4, 6), "alpha": 0.8}]
    # the base optimizer (which applies the update) sees the same groups
    assert opt.base.param_groups[0]["r"] == rs[-1] == float(F32(0.1))


def test_state_dict_round_trip_resumes_bit_for_bit():
    kwargs = {"r": 0.1, "alpha": 0.8, "mix_unit_gradient": True}
    schedules = gnp_warmup("lambda", r=0.1, alpha=0.8, warmup_steps=5)
    w, opt, closure, _ = make(kwargs)
    sched = gt.RuleScheduler(opt, schedules)
    for _ in range(8):
        opt.step(closure)
        sched.step()
    straight = w.detach().clone()

    w1, opt1, closure1, _ = make(kwargs)
    sched1 = gt.RuleScheduler(opt1, schedules)
    for _ in range(3):
        opt1.step(closure1)
        sched1.step()
    saved = copy.deepcopy((opt1.state_dict(), sched1.state_dict(), w1.detach().clone()))
    assert saved[1] == {"last_step": 3, "hyperparameters": ["alpha", "r"]}

    w2, opt2, closure2, _ = make(kwargs)
    sched2 = gt.RuleScheduler(opt2, schedules)
    with torch.no_grad():
        w2.copy_(saved[2])
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    assert sched2.last_step == 3 and opt2.param_groups[0]["alpha"] == hand_ramp32(0.8, 5, 3)
    for _ in range(5):
        opt2.step(closure2)
        sched2.step()
    assert torch.equal(w2.detach(), straight)


def test_per_group_schedules_and_a_non_group_level():
    a = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    b = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = gt.Optimizer([{"params": [a]}, {"params": [b]}], torch.optim.SGD, rule="sam", rho=0.05, lr=0.1)
    sched = gt.RuleScheduler(opt, [{"rho": linear_warmup(0.05, 2)}, {}])
    sched.step()
    assert [g["rho"] for g in opt.param_groups] == [hand_ramp32(0.05, 2, 1), 0.05]
    # flooding's level is one value for the optimizer: set on the rule
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    fopt = gt.Optimizer([w], torch.optim.SGD, rule="flooding", b=0.0, lr=0.1)
    fs = gt.RuleScheduler(fopt, {"b": linear_warmup(0.5, 4, dtype="float64")})
    fs.step()
    fs.step()
    assert fopt.rule.b == 0.25 and fopt.state_dict()["gradnorm"]["hyperparameters"]["b"] == 0.25


def test_errors_name_the_argument():
    w, opt, closure, _ = make({"r": 0.1, "alpha": 0.8})
    with pytest.raises(TypeError, match="`optimizer` of gradnorm.torch.RuleScheduler must be a gradnorm.torch.Optimizer"):
        gt.RuleScheduler(torch.optim.SGD([w], lr=0.1), {"r": linear_warmup(0.1, 3)})
    with pytest.raises(gradnorm.HyperparameterError, match="`rho`.*not a real-valued hyperparameter of rule 'gnp'.*alpha, r"):
        gt.RuleScheduler(opt, {"rho": linear_warmup(0.1, 3)})
    with pytest.raises(gradnorm.HyperparameterError, match="`mix_unit_gradient`"):
        gt.RuleScheduler(opt, {"mix_unit_gradient": lambda t: 1.0})
    with pytest.raises(TypeError, match=r"`schedules\['r'\]`.*must be a callable.*Received: 0.1"):
        gt.RuleScheduler(opt, {"r": 0.1})
    with pytest.raises(ValueError, match="list of 2 dict.*1 parameter group"):
        gt.RuleScheduler(opt, [{"r": linear_warmup(0.1, 3)}, {}])
    before = opt.param_groups[0]["r"]
    with pytest.raises(gradnorm.HyperparameterError, match=r"schedule of `r`.*at step 0.*>= 0.*-0.5"):
        gt.RuleScheduler(opt, {"r": lambda t: -0.5})
    assert opt.param_groups[0]["r"] == before  # nothing changed
    # a schedule that turns invalid later: the failing step changes neither the groups nor last_step
    late = gt.RuleScheduler(opt, {"r": linear_warmup(-0.1, 3)})  # step 0: r = -0.0 (valid)
    with pytest.raises(gradnorm.HyperparameterError, match=r"schedule of `r`.*at step 1"):
        late.step()
    assert late.last_step == 0 and opt.param_groups[0]["r"] == 0.0
    sched = gt.RuleScheduler(opt, {"r": linear_warmup(0.1, 3)})
    with pytest.raises(ValueError, match=r"`state_dict\['hyperparameters'\]` is \['alpha'\]"):
        sched.load_state_dict({"last_step": 2, "hyperparameters": ["alpha"]})
    f = gt.Optimizer([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, rule="flooding", b=0.1, lr=0.1)
    with pytest.raises(gradnorm.HyperparameterError, match="`b` of rule 'flooding' is one value for all parameter groups"):
        gt.RuleScheduler(f, [{"b": linear_warmup(0.1, 3)}])
