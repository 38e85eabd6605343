"""gradnorm.torch.Optimizer: the torch.optim contract, trajectories equal to the core rules,
checkpoints, LR schedulers, fault safety, non-finite steps and exact GR through the closure."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import gradnorm  # noqa: E402
from conformance.settings import settings  # noqa: E402
from gradnorm.torch import ClosureError, Optimizer  # noqa: E402

SETTINGS = settings("torch_optimizer")  # every rule and its variants (conformance/settings.py)


def make_problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    x = torch.randn(32, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (32,), generator=g)
    return model, x, y


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def make_closure(opt, model, x, y, calls=None):
    def closure(create_graph=False):
        if calls is not None:
            calls.append([p.detach().clone() for p in model.parameters()])
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward(create_graph=create_graph)
        return loss

    return closure


def core_trajectory(rule, hyper, steps, lr, momentum):
    """The same training with gradnorm.step (torch tensors, autograd grad_fn/hvp_fn) + torch SGD."""
    model, x, y = make_problem()
    params = list(model.parameters())

    def grad_fn(leaves):
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in leaves]
            out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], leaves)), (x,))
            loss = torch.nn.functional.cross_entropy(out, y)
            return loss.detach(), list(torch.autograd.grad(loss, leaves))

    def hvp_fn(leaves, v):
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) for p in leaves]
            out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], leaves)), (x,))
            loss = torch.nn.functional.cross_entropy(out, y)
            g = torch.autograd.grad(loss, leaves, create_graph=True)
            return list(torch.autograd.grad(g, leaves, grad_outputs=v))

    sgd = torch.optim.SGD(params, lr=lr, momentum=momentum)
    state, losses = None, []
    for _ in range(steps):
        res = gradnorm.step([p.detach() for p in params], grad_fn, rule=rule, state=state, hvp_fn=hvp_fn, **hyper)
        state = res.state
        for p, d in zip(params, res.grad):
            p.grad = d
        sgd.step()
        losses.append(float(res.loss))
    return [p.detach().clone() for p in params], losses


@pytest.mark.parametrize("rule,hyper", SETTINGS, ids=[f"{r}-{h}" for r, h in SETTINGS])
def test_trajectory_equals_core_rule(rule, hyper):
    model, x, y = make_problem()
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.2, momentum=0.9, **hyper)
    closure = make_closure(opt, model, x, y)
    losses = [float(opt.step(closure)) for _ in range(8)]
    want_params, want_losses = core_trajectory(rule, hyper, 8, 0.2, 0.9)
    for p, q in zip(model.parameters(), want_params):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-13)
    assert losses == pytest.approx(want_losses, rel=1e-12)


def test_closure_runs_first_at_the_current_weights_and_weights_are_restored():
    model, x, y = make_problem()
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.0)
    calls = []
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(make_closure(opt, model, x, y, calls))
    assert len(calls) == 2
    for a, b in zip(calls[0], before):
        assert torch.equal(a, b)  # the first pass is at the current weights
    assert any(not torch.equal(a, b) for a, b in zip(calls[1], before))  # the second is perturbed
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)  # lr=0: restored bit for bit
    assert float(loss) == pytest.approx(float(loss_of(model, x, y).detach()))


def test_param_groups_are_shared_and_lr_schedulers_work_without_warnings():
    model, x, y = make_problem()
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base.param_groups
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        closure = make_closure(opt, model, x, y)
        for _ in range(3):
            opt.step(closure)
            sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_groups_reach_the_base_optimizer():
    model, x, y = make_problem()
    groups = [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters()}]
    opt = Optimizer(groups, torch.optim.SGD, rule="gnp", r=0.05, alpha=0.8, lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]


@pytest.mark.parametrize("rule,hyper", [("sam", {"rho": 0.05}), ("coherent", {"lam": 0.1, "threshold": 0.5, "delay": 3})])
def test_state_dict_round_trip_continues_the_same_trajectory(rule, hyper):
    model, x, y = make_problem()
    opt = Optimizer(model.parameters(), torch.optim.Adam, rule=rule, lr=0.01, **hyper)
    closure = make_closure(opt, model, x, y)
    for _ in range(3):
        opt.step(closure)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert "gradnorm" in saved_opt and saved_opt["gradnorm"]["rule"] == rule
    # no scratch copies of weights in the checkpoint: only Adam's moments and step counts
    assert all(set(s) <= {"step", "exp_avg", "exp_avg_sq"} for s in saved_opt["state"].values())
    for _ in range(4):
        opt.step(closure)
    want = [p.detach().clone() for p in model.parameters()]

    model2, _, _ = make_problem(seed=1)
    model2.load_state_dict(saved_model)
    opt2 = Optimizer(model2.parameters(), torch.optim.Adam, rule=rule, lr=0.01, **hyper)
    opt2.load_state_dict(saved_opt)
    closure2 = make_closure(opt2, model2, x, y)
    for _ in range(4):
        opt2.step(closure2)
    for p, q in zip(model2.parameters(), want):
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("fail_on", [1, 2, 3, 4])
def test_an_exception_in_any_pass_restores_the_weights_and_propagates(fail_on):
    model, x, y = make_problem()
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule="gam", lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    count = [0]

    def closure():
        count[0] += 1
        if count[0] == fail_on:
            raise RuntimeError("boom")
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_nonfinite_gradients_skip_the_update_and_are_reported():
    model, x, y = make_problem()
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    bad_x = x.clone()
    bad_x[0, 0] = float("nan")
    opt.step(make_closure(opt, model, bad_x, y))
    assert not bool(opt.last_info["finite"])
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert not opt.base.state  # momentum buffers untouched: the base optimizer never ran


def test_two_phase_custom_loop_uses_existing_gradients():
    model, x, y = make_problem()
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.2)
    calls = []
    opt.zero_grad()
    loss = loss_of(model, x, y)
    loss.backward()
    opt.step(make_closure(opt, model, x, y, calls), loss=loss)
    assert len(calls) == 1  # only the perturbed pass
    want, _ = core_trajectory("sam", {"rho": 0.05}, 1, 0.2, 0.0)
    for p, q in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-13)
    # one-pass rules need no closure at all
    opt1 = Optimizer(model.parameters(), torch.optim.SGD, rule="flooding", b=0.1, lr=0.2)
    opt1.zero_grad()
    loss = loss_of(model, x, y)
    loss.backward()
    opt1.step(loss=loss)


def test_bad_input_is_reported_before_anything_runs():
    model, x, y = make_problem()
    with pytest.raises(gradnorm.HyperparameterError, match="nesterovv"):
        Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.1, nesterovv=True)
    with pytest.raises(gradnorm.UnknownRuleError, match="sam"):
        Optimizer(model.parameters(), torch.optim.SGD, rule="sma", rho=0.05, lr=0.1)
    with pytest.raises(gradnorm.HyperparameterError, match="rho"):
        Optimizer(model.parameters(), torch.optim.SGD, rule="sam", lr=0.1)
    with pytest.raises(TypeError, match="`base`"):
        Optimizer(model.parameters(), "sgd", rule="sam", rho=0.05)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(gradnorm.HyperparameterError, match="lr"):
        Optimizer(None, base, rule="sam", rho=0.05, lr=0.2)
    opt = Optimizer(None, base, rule="sam", rho=0.05)
    with pytest.raises(ClosureError, match="closure"):
        opt.step()
    gr = Optimizer(model.parameters(), torch.optim.SGD, rule="gr", gamma=0.1, lr=0.1)

    def plain_closure():
        gr.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with pytest.raises(ClosureError, match="create_graph"):
        gr.step(plain_closure)


# --------------------------------------------------------------------------------------------
# BatchNorm, dropout randomness, bf16 autocast, gradient accumulation


def bn_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(32, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    return model, x, y


@pytest.mark.parametrize("rule,hyper", [("sam", {"rho": 0.05}), ("gam", {}), ("fd_gr", {"gamma": 0.1, "eps": 0.05, "difference": "central"})])
def test_batchnorm_statistics_come_from_the_unperturbed_pass_only(rule, hyper):
    model, x, y = bn_problem()
    reference = copy.deepcopy(model)
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule=rule, model=model, lr=0.0, **hyper)
    opt.step(make_closure(opt, model, x, y))
    reference(x)  # one training-mode forward at the same (unchanged, lr=0) weights
    for (name, got), want in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(got, want), name
    # without `model=` the extra passes update the statistics too (so the test above can fail)
    model2, _, _ = bn_problem()
    opt2 = Optimizer(model2.parameters(), torch.optim.SGD, rule=rule, lr=0.0, **hyper)
    opt2.step(make_closure(opt2, model2, x, y))
    assert not torch.equal(model2[1].running_mean, reference[1].running_mean)
    assert int(model2[1].num_batches_tracked) == opt2.rule.grad_evals


@pytest.mark.parametrize("same", [True, False])
def test_same_randomness_reuses_the_dropout_masks(same):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule="gam", same_randomness=same, lr=0.1)
    masks = []
    model[1].register_forward_hook(lambda m, i, o: masks.append((o == 0).clone()))
    opt.step(make_closure(opt, model, x, y))
    assert len(masks) == 4
    assert all(torch.equal(m, masks[0]) for m in masks[1:]) == same


def test_bf16_autocast_closure_trains():
    model, x, y = make_problem(torch.float32)
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.3, momentum=0.9)

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, x, y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(30)]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert bool(opt.last_info["finite"]) and losses[-1] < 0.6 * losses[0]


def test_gradient_accumulation_in_the_closure_equals_the_full_batch():
    """Accumulating micro-batches inside the closure perturbs with the full-batch gradient:
    every pass (clean and perturbed) sees all micro-batches."""
    model, x, y = make_problem()
    full = copy.deepcopy(model)
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.2, momentum=0.9)
    opt_full = Optimizer(full.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.2, momentum=0.9)

    def accumulating_closure():
        opt.zero_grad()
        total = 0.0
        for xb, yb in zip(x.split(8), y.split(8)):
            loss = loss_of(model, xb, yb) / 4  # mean over 4 equal micro-batches
            loss.backward()
            total = total + loss.detach()
        return total

    for _ in range(5):
        a = opt.step(accumulating_closure)
        b = opt_full.step(make_closure(opt_full, full, x, y))
        assert float(a) == pytest.approx(float(b), rel=1e-12)
    for p, q in zip(model.parameters(), full.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_fp16_grad_scaler_skips_overflow_steps_exactly_and_trains():
    model, x, y = make_problem(torch.float32)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=2)
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.05, grad_scaler=scaler, lr=0.3, momentum=0.9)

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_of(model, x, y)
        scaler.scale(loss).backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)  # 2**40 overflows float16: the step is skipped and the scale backs off
    assert not bool(opt.last_info["finite"])
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert scaler.get_scale() == 2.0**39
    assert not opt.base.state  # the base optimizer never ran
    losses, skipped = [], 1
    for _ in range(60):
        losses.append(float(opt.step(closure)))
        skipped += not bool(opt.last_info["finite"])
    assert skipped < 40 and losses[-1] < 0.6 * losses[0]
    assert scaler.get_scale() < 2.0**30


def test_grad_scaler_directions_equal_the_unscaled_ones():
    """With a finite scale, the unscaled gradients (and so the rule's direction) equal a
    run without scaler up to the rounding of the scaling (float32 here, no autocast)."""
    model, x, y = make_problem(torch.float32)
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule="fd_gr", gamma=0.1, eps=0.01, grad_scaler=scaler, lr=0.2)
    ref = Optimizer(twin.parameters(), torch.optim.SGD, rule="fd_gr", gamma=0.1, eps=0.01, lr=0.2)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        scaler.scale(loss).backward()
        return loss

    for _ in range(3):
        opt.step(closure)
        ref.step(make_closure(ref, twin, x, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_nonfinite_direction_with_a_finite_loss_skips_the_step():
    """The loss is finite at every pass, but the perturbed gradient overflows: the fused inf/nan
    check of the direction (not the loss) must catch it."""
    model, x, y = make_problem()
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        if calls[0] == 2:
            next(model.parameters()).grad[0, 0] = float("inf")
        return loss

    loss = opt.step(closure)
    assert torch.isfinite(loss) and not bool(opt.last_info["finite"])
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert not opt.base.state


@pytest.mark.parametrize("rule,hyper", [("sgd", {}), ("sam", {"rho": 0.05}), ("fd_gr", {"gamma": 0.05, "eps": 0.01})])
def test_info_norms_on_request(rule, hyper):
    model, x, y = make_problem()
    opt = Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.0, info_norms=True, **hyper)
    closure = make_closure(opt, model, x, y)
    opt.step(closure)
    direction = [p.grad.detach().clone() for p in model.parameters()]
    closure()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    norm = lambda ts: torch.sqrt(sum((t.double() ** 2).sum() for t in ts))  # noqa: E731
    torch.testing.assert_close(opt.last_info["update_norm"].double(), norm(direction), rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.last_info["grad_norm"].double(), norm(grads), rtol=1e-12, atol=0)
    quiet = Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.0, **hyper)
    quiet.step(make_closure(quiet, model, x, y))
    assert "update_norm" not in quiet.last_info
    assert ("grad_norm" in quiet.last_info) == (rule == "sam")  # reported when the rule needs it anyway
    assert bool(quiet.last_info["finite"])
