"""gradnorm.torch.Optimizer and gradients it did not compute: accumulated micro-batches are refused
by step(closure) with an error that shows the supported ways; `accumulating_closure` equals the rule
on the whole batch; `register_batch` (trainers that run the backward themselves and call `step()`)
equals the closure path and refuses a missing or stale registration; `current_pass` tells user code
which pass runs; `clip_grad_norm` clips the rule's direction."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import gradnorm  # noqa: E402
import gradnorm.torch as gt  # noqa: E402

RULES = [("sam", {"rho": 0.1}), ("gnp", {"r": 0.1, "alpha": 0.8}), ("fd_gr", {"gamma": 0.1, "eps": 0.01}),
         ("gam", {}), ("flooding", {"b": 5.0}), ("coherent", {"lam": 0.1, "threshold": 0.0}), ("sgd", {})]


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return model, x, y


def loss_fn(model):
    return lambda xb, yb: torch.nn.functional.cross_entropy(model(xb), yb)


def full_batch_run(rule, hyper, steps=3, **opt_kwargs):
    model, x, y = problem()
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.1, momentum=0.9, **hyper, **opt_kwargs)

    def closure(create_graph=False):
        opt.zero_grad()
        loss = loss_fn(model)(x, y)
        loss.backward(create_graph=create_graph)
        return loss

    losses = [float(opt.step(closure)) for _ in range(steps)]
    return [p.detach().clone() for p in model.parameters()], losses


@pytest.mark.parametrize("rule,hyper", RULES, ids=[r for r, _ in RULES])
def test_accumulating_closure_equals_the_full_batch_rule(rule, hyper):
    want, want_losses = full_batch_run(rule, hyper)
    model, x, y = problem()
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.1, momentum=0.9, **hyper)
    micro = list(zip(x.split([10, 8, 6]), y.split([10, 8, 6])))  # unequal sizes: weighted by share
    losses = [float(opt.step(gt.accumulating_closure(opt, loss_fn(model), micro))) for _ in range(3)]
    for got, ref in zip(model.parameters(), want):
        torch.testing.assert_close(got.detach(), ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-12)


def test_accumulating_closure_with_exact_gr():
    want, _ = full_batch_run("gr", {"gamma": 0.1})
    model, x, y = problem()
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="gr", gamma=0.1, lr=0.1, momentum=0.9)
    micro = list(zip(x.split(12), y.split(12)))
    for _ in range(3):
        opt.step(gt.accumulating_closure(opt, loss_fn(model), micro))
    for got, ref in zip(model.parameters(), want):
        torch.testing.assert_close(got.detach(), ref, rtol=1e-12, atol=1e-13)


def test_accumulated_gradients_are_refused_by_step_with_a_closure():
    model, x, y = problem()
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.1, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn(model)(x[:12], y[:12]).backward()  # a micro-batch accumulated by a trainer

    def closure():  # the next micro-batch, accumulating (no zero_grad), as Lightning's closure does
        loss = loss_fn(model)(x[12:], y[12:])
        loss.backward()
        return loss

    with pytest.raises(gradnorm.GradnormError, match="accumulate_grad_batches.*accumulating_closure"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # its own direction left in .grad, and zeros from its own zero_grad, are not foreign
    opt.zero_grad(set_to_none=False)
    opt.step(lambda: (opt.zero_grad(), loss_fn(model)(x, y))[1].backward() or loss_fn(model)(x, y))
    opt.step(lambda: (opt.zero_grad(), loss_fn(model)(x, y))[1].backward() or loss_fn(model)(x, y))


def registered_run(rule, hyper, micro_sizes, steps=3, scale=1.0):
    """A trainer's loop: forward + backward per micro-batch, register_batch, then step() without closure."""
    model, x, y = problem()
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.1, momentum=0.9, **hyper)
    fn = loss_fn(model)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        for xb, yb in zip(x.split(micro_sizes), y.split(micro_sizes)):
            w = xb.shape[0] / x.shape[0]

            def micro_closure(xb=xb, yb=yb, w=w):
                loss = fn(xb, yb) * w
                loss.backward()
                return loss

            loss = micro_closure()
            opt.register_batch(loss, micro_closure)
        losses.append(float(opt.step()))
    return [p.detach().clone() for p in model.parameters()], losses


@pytest.mark.parametrize("rule,hyper", RULES, ids=[r for r, _ in RULES])
def test_registered_batches_equal_the_full_batch_rule(rule, hyper):
    want, want_losses = full_batch_run(rule, hyper)
    for sizes in ([24], [10, 14]):
        got, losses = registered_run(rule, hyper, sizes)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(losses, want_losses, rtol=1e-12)


def test_missing_or_stale_registrations_are_errors():
    model, x, y = problem()
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.1, lr=0.1)
    fn = loss_fn(model)
    before = [p.detach().clone() for p in model.parameters()]
    fn(x, y).backward()
    with pytest.raises(gradnorm.ClosureError, match="no batch was registered"):
        opt.step()

    def closure():
        loss = fn(x, y)
        loss.backward()
        return loss

    opt.zero_grad()
    opt.register_batch(closure(), closure)
    closure()  # a second backward that nobody registered
    with pytest.raises(gradnorm.ClosureError, match="2 backward pass.*1 batch"):
        opt.step()
    opt.zero_grad()
    loss = closure()
    opt.register_batch(loss, closure)
    opt.register_batch(loss, closure)  # registered twice for one backward
    with pytest.raises(gradnorm.ClosureError, match="1 backward pass.*2 batch"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.zero_grad()
    loss = closure()
    opt.register_batch(loss, closure)
    opt.step()
    with pytest.raises(gradnorm.ClosureError, match="no batch was registered"):
        opt.step()  # registrations are used by one step only
    with pytest.raises(gradnorm.ClosureError, match="`closure` of register_batch"):
        opt.register_batch(loss, "not callable")
    with pytest.raises(gradnorm.ClosureError, match="`loss`"):
        opt.register_batch(loss.expand(2), closure)


def test_current_pass_tells_the_clean_pass_from_the_extra_ones():
    model, x, y = problem()
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="gam", lr=0.1)
    seen = []

    def closure():
        seen.append((gt.current_pass(), gt.is_extra_pass()))
        opt.zero_grad()
        loss = loss_fn(model)(x, y)
        loss.backward()
        return loss

    assert gt.current_pass() is None and not gt.is_extra_pass()
    opt.step(closure)
    assert seen == [(0, False), (1, True), (2, True), (3, True)]
    assert gt.current_pass() is None


def test_clip_grad_norm_clips_the_rule_direction():
    model, x, y = problem()
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.1, lr=1.0, clip_grad_norm=0.05)
    ref_model, _, _ = problem()
    ref = gt.Optimizer(ref_model.parameters(), torch.optim.SGD, rule="sam", rho=0.1, lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            loss = loss_fn(m)(x, y)
            loss.backward()
            return loss
        return closure

    opt.step(closure_for(model, opt))
    ref.step(closure_for(ref_model, ref))
    step = [b - p.detach() for b, p in zip(before, model.parameters())]
    direction = [b - p.detach() for b, p in zip(before, ref_model.parameters())]
    norm = torch.sqrt(sum((d**2).sum() for d in direction))
    assert norm > 0.05
    for s, d in zip(step, direction):
        torch.testing.assert_close(s, d * (0.05 / (norm + 1e-6)), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="`clip_grad_norm`"):
        gt.Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.1, lr=1.0, clip_grad_norm=-1.0)


def test_same_randomness_needs_a_first_pass_it_can_replay():
    """The optimizer cannot replay the random state of a first pass it did not run: `loss=` and a
    registration that does not replay it itself are refused (never new dropout masks silently)."""
    model, x, y = problem()
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.1, lr=0.1, same_randomness=True)
    fn = loss_fn(model)

    def closure():
        opt.zero_grad()
        loss = fn(x, y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = closure()
    with pytest.raises(gradnorm.ClosureError, match="same_randomness"):
        opt.step(closure, loss=loss)

    def micro():
        loss = fn(x, y)
        loss.backward()
        return loss

    opt.zero_grad()
    opt.register_batch(micro(), micro)
    with pytest.raises(gradnorm.ClosureError, match="replays_randomness=True"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.zero_grad()
    opt.register_batch(micro(), micro, replays_randomness=True)  # (no dropout here: nothing to replay)
    opt.step()
