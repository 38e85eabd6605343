"""gradnorm.torch.step: torch.func gradients and HVPs, the same result as the core."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gradnorm  # noqa: E402
import gradnorm.torch as gt  # noqa: E402


def problem(dtype=torch.float64):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)
    x = torch.randn(16, 4, dtype=dtype)
    y = torch.randint(0, 3, (16,))

    def loss_fn(p, x, y):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return params, loss_fn, x, y


def autograd_fns(loss_fn, x, y):
    def grad_fn(p):
        with torch.enable_grad():
            q = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            loss = loss_fn(q, x, y)
            return loss.detach(), dict(zip(q, torch.autograd.grad(loss, list(q.values()))))

    def hvp_fn(p, v):
        with torch.enable_grad():
            q = {k: t.detach().requires_grad_(True) for k, t in p.items()}
            g = torch.autograd.grad(loss_fn(q, x, y), list(q.values()), create_graph=True)
            return dict(zip(q, torch.autograd.grad(g, list(q.values()), grad_outputs=[v[k] for k in q])))

    return grad_fn, hvp_fn


SETTINGS = [("sgd", {}), ("sam", {"rho": 0.05}), ("gnp", {"r": 0.05, "alpha": 0.8}), ("gr", {"gamma": 0.1}),
            ("fd_gr", {"gamma": 0.1, "eps": 0.01, "difference": "backward"}), ("gam", {}),
            ("flooding", {"b": 5.0}), ("coherent", {"lam": 0.1, "threshold": 0.0})]


@pytest.mark.parametrize("rule,hyper", SETTINGS, ids=[r for r, _ in SETTINGS])
def test_equals_core_step_with_autograd(rule, hyper):
    params, loss_fn, x, y = problem()
    before = {k: v.clone() for k, v in params.items()}
    res = gt.step(params, loss_fn, x, y, rule=rule, **hyper)
    grad_fn, hvp_fn = autograd_fns(loss_fn, x, y)
    want = gradnorm.step(params, grad_fn, rule=rule, hvp_fn=hvp_fn, **hyper)
    for k in params:
        torch.testing.assert_close(res.grad[k], want.grad[k], rtol=1e-12, atol=1e-13)
        assert torch.equal(params[k], before[k])
    assert float(res.loss) == pytest.approx(float(want.loss), rel=1e-14)
    assert res.info["grad_evals"] == want.info["grad_evals"]


def test_both_hvp_modes_agree():
    params, loss_fn, x, y = problem()
    a = gt.step(params, loss_fn, x, y, rule="gr", gamma=0.3)
    b = gt.step(params, loss_fn, x, y, rule="gr", gamma=0.3, hvp="reverse_over_reverse")
    for k in params:
        torch.testing.assert_close(a.grad[k], b.grad[k], rtol=1e-12, atol=1e-13)


def test_bad_input_raises_before_loss_fn_runs():
    params, loss_fn, x, y = problem()
    calls = []

    def counting(p, x, y):
        calls.append(1)
        return loss_fn(p, x, y)

    with pytest.raises(ValueError, match="`hvp`.*forward_over_reverse.*Received: 'fwd'"):
        gt.step(params, counting, x, y, rule="gr", gamma=0.1, hvp="fwd")
    with pytest.raises(gradnorm.UnknownRuleError, match="Did you mean 'sam'"):
        gt.step(params, counting, x, y, rule="sma", rho=0.1)
    with pytest.raises(gradnorm.HyperparameterError, match="`rho`"):
        gt.step(params, counting, x, y, rule="sam")
    with pytest.raises(TypeError, match="`loss_fn`"):
        gt.step(params, "loss", x, y, rule="sgd")
    assert calls == []


def test_float32_training_loop_decreases_the_loss():
    params, loss_fn, x, y = problem(torch.float32)
    opt = torch.optim.SGD(list(params.values()), lr=0.5, momentum=0.9)
    first = None
    for _ in range(30):
        res = gt.step(params, loss_fn, x, y, rule="sam", rho=0.05)
        assert all(d.dtype == torch.float32 for d in res.grad.values())
        for k, p in params.items():
            p.grad = res.grad[k]
        opt.step()
        first = float(res.loss) if first is None else first
    assert float(res.loss) < 0.7 * first
