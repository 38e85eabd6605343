"""gradnorm.torch.step: torch.func gradients and HVPs give the same steps as the core
gradnorm.step with hand-written or autograd gradients; validation happens before the loss
runs; params are never modified; float32 and training loops work."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")

import gradnorm
import gradnorm.torch as gt
from conformance.settings import adapter_ids, adapter_settings

SETTINGS = adapter_settings()  # every rule and its variants (conformance/settings.py)
IDS = adapter_ids()

# --------------------------------------------------------------------------------------------
# problems


def mlp_problem(dtype=torch.float64, seed=0):
    """A two-layer tanh MLP (an nn.Module, called through functional_call) with cross-entropy."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    x = torch.randn(16, 4, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (16,), generator=g)

    def loss_fn(p, x, y):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return model, params, loss_fn, x, y


def autograd_fns(loss_fn, *args):
    """grad_fn / hvp_fn for gradnorm.step from torch.autograd (double backward for H v)."""

    def grad_fn(p):
        with torch.enable_grad():
            q = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            loss = loss_fn(q, *args)
            return loss.detach(), dict(zip(q, torch.autograd.grad(loss, list(q.values()))))

    def hvp_fn(p, v):
        with torch.enable_grad():
            q = {k: t.detach().requires_grad_(True) for k, t in p.items()}
            g = torch.autograd.grad(loss_fn(q, *args), list(q.values()), create_graph=True)
            return dict(zip(q, torch.autograd.grad(g, list(q.values()), grad_outputs=[v[k] for k in q])))

    return grad_fn, hvp_fn


def quadratic_problem(dtype=torch.float64):
    """L(x) = 1/2 x^T A x - b^T x + c on a nested tree {"w": [matrix, vector], "s": 0-d},
    with the hand-written gradient A x - b and Hessian A."""
    g = torch.Generator().manual_seed(7)
    n = 6 + 3 + 1
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = (m @ m.T / n + torch.eye(n, dtype=torch.float64)).to(dtype)
    b = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    params = {
        "w": [torch.randn(2, 3, generator=g, dtype=torch.float64).to(dtype), torch.randn(3, generator=g, dtype=torch.float64).to(dtype)],
        "s": torch.tensor(0.5, dtype=dtype),
    }

    def flat(p):
        return torch.cat([p["w"][0].reshape(-1), p["w"][1], p["s"].reshape(1)])

    def tree(v):
        return {"w": [v[:6].reshape(2, 3), v[6:9]], "s": v[9]}

    def loss_fn(p, a, b):
        x = flat(p)
        return 0.5 * x @ (a @ x) - b @ x + 3.0

    def grad_fn(p):
        x = flat(p)
        return loss_fn(p, a, b), tree(a @ x - b)

    def hvp_fn(p, v):
        return tree(a @ flat(v))

    return params, loss_fn, (a, b), grad_fn, hvp_fn


def assert_trees_close(got, want, rtol, atol):
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want)
        for k in want:
            assert_trees_close(got[k], want[k], rtol, atol)
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want)
        for u, v in zip(got, want):
            assert_trees_close(u, v, rtol, atol)
    elif isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    else:
        assert got == want


def clone_tree(tree):
    if isinstance(tree, dict):
        return {k: clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [clone_tree(v) for v in tree]
    return tree.clone()


def assert_same_result(res, want, rtol=1e-12, atol=1e-13):
    assert isinstance(res, gradnorm.StepResult)
    assert_trees_close(res.grad, want.grad, rtol, atol)
    assert_trees_close(res.state, want.state, rtol, atol)  # counters exactly; buffers (periodic's g_v) closely
    assert set(res.info) == set(want.info)
    assert_trees_close(res.info, want.info, rtol, atol)
    torch.testing.assert_close(res.loss, want.loss, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# the same steps as the core


@pytest.mark.parametrize("rule,hyper", SETTINGS, ids=IDS)
def test_mlp_module_equals_core_step_with_autograd(rule, hyper):
    _, params, loss_fn, x, y = mlp_problem()
    before = clone_tree(params)
    grad_fn, hvp_fn = autograd_fns(loss_fn, x, y)
    state_fast = state_core = None
    for _ in range(2):  # two steps: the state (coherent's step counter) is carried the same way
        res = gt.step(params, loss_fn, x, y, rule=rule, state=state_fast, **hyper)
        want = gradnorm.step(params, grad_fn, rule=rule, state=state_core, hvp_fn=hvp_fn, **hyper)
        assert_same_result(res, want)
        state_fast, state_core = res.state, want.state
    assert_trees_close(params, before, 0, 0)  # params were not modified


@pytest.mark.parametrize("rule,hyper", SETTINGS, ids=IDS)
def test_quadratic_equals_core_step_with_hand_written_derivatives(rule, hyper):
    params, loss_fn, args, grad_fn, hvp_fn = quadratic_problem()
    before = clone_tree(params)
    res = gt.step(params, loss_fn, *args, rule=rule, **hyper)
    want = gradnorm.step(params, grad_fn, rule=rule, hvp_fn=hvp_fn, **hyper)
    assert_same_result(res, want)
    assert_trees_close(params, before, 0, 0)
    assert isinstance(res.grad["w"], list) and res.grad["s"].shape == ()


@pytest.mark.parametrize("penalty", ["squared", "norm"])
@pytest.mark.parametrize("problem", ["mlp", "quadratic"])
def test_both_hvp_modes_agree_for_gr(problem, penalty):
    if problem == "mlp":
        _, params, loss_fn, *args = mlp_problem()
    else:
        params, loss_fn, args, _, _ = quadratic_problem()
    a = gt.step(params, loss_fn, *args, rule="gr", gamma=0.3, penalty=penalty, hvp="forward_over_reverse")
    b = gt.step(params, loss_fn, *args, rule="gr", gamma=0.3, penalty=penalty)  # the default: reverse over reverse
    assert_same_result(a, b)
    assert a.info["hvp_evals"] == b.info["hvp_evals"] == 1


def counting(loss_fn):
    calls = []

    def counted(p, *args):
        calls.append(1)
        return loss_fn(p, *args)

    return counted, calls


def test_evaluation_counts():
    """sam: two gradients; gr forward-over-reverse: a gradient and a jvp of the gradient (two
    loss traces); reverse-over-reverse reuses the gradient pass for H g (one trace); gr with
    gamma=0 computes no HVP at all."""
    _, params, loss_fn, x, y = mlp_problem()
    for rule, hyper, hvp, traces, hvps in [
        ("sam", {"rho": 0.1}, "forward_over_reverse", 2, 0),
        ("gr", {"gamma": 0.1}, "forward_over_reverse", 2, 1),
        ("gr", {"gamma": 0.1}, "reverse_over_reverse", 1, 1),
        ("gr", {"gamma": 0.0}, "reverse_over_reverse", 1, 0),
    ]:
        counted, calls = counting(loss_fn)
        res = gt.step(params, counted, x, y, rule=rule, hvp=hvp, **hyper)
        assert len(calls) == traces, (rule, hyper, hvp)
        assert res.info["hvp_evals"] == hvps


def test_tensor_hyperparameters_and_rule_objects():
    _, params, loss_fn, x, y = mlp_problem()
    grad_fn, hvp_fn = autograd_fns(loss_fn, x, y)
    rho = torch.tensor(0.05, dtype=torch.float32)  # a 0-d tensor of another dtype: the arithmetic path
    res = gt.step(params, loss_fn, x, y, rule=gradnorm.rules.SAM(rho=rho))
    want = gradnorm.step(params, grad_fn, rule="sam", rho=rho)
    assert_same_result(res, want)
    res = gt.step(params, loss_fn, x, y, rule=gradnorm.rules.GR(gamma=0.5), gamma=0.2)  # replaces gamma
    want = gradnorm.step(params, grad_fn, rule="gr", gamma=0.2, hvp_fn=hvp_fn)
    assert_same_result(res, want)


# --------------------------------------------------------------------------------------------
# validation before evaluation


def test_bad_arguments_raise_before_loss_fn_runs():
    _, params, loss_fn, x, y = mlp_problem()
    counted, calls = counting(loss_fn)
    with pytest.raises(gradnorm.HyperparameterError, match=r"`hvp`.*'forward_over_reverse'.*Received: 'fwd'"):
        gt.step(params, counted, x, y, rule="gr", gamma=0.1, hvp="fwd")
    with pytest.raises(ValueError, match="`hvp`"):
        gt.step(params, counted, x, y, rule="sgd", hvp=None)  # checked for every rule
    with pytest.raises(gradnorm.UnknownRuleError, match="Did you mean 'sam'"):
        gt.step(params, counted, x, y, rule="sma", rho=0.1)
    with pytest.raises(gradnorm.HyperparameterError, match="`rho`"):
        gt.step(params, counted, x, y, rule="sam")
    with pytest.raises(gradnorm.HyperparameterError, match="`rho`"):
        gt.step(params, counted, x, y, rule="sam", rho=-1.0)
    with pytest.raises(gradnorm.HyperparameterError, match="no hyperparameter `gama`"):
        gt.step(params, counted, x, y, rule="gr", gama=0.1)
    with pytest.raises(TypeError, match="`loss_fn`"):
        gt.step(params, "loss", x, y, rule="sgd")
    with pytest.raises(gradnorm.ParamsError):
        gt.step({"w": torch.ones(3, dtype=torch.int64)}, counted, x, y, rule="sgd")
    with pytest.raises(gradnorm.ParamsError):
        gt.step({"w": [1.0, 2.0]}, counted, x, y, rule="sgd")
    with pytest.raises(TypeError, match="`state`"):
        gt.step(params, counted, x, y, rule="coherent", lam=0.1, threshold=0.0, state=())
    assert calls == []


# --------------------------------------------------------------------------------------------
# params, dtypes, autograd, host reads


def test_parameters_that_require_grad_are_accepted_and_untouched():
    model, _, loss_fn, x, y = mlp_problem()
    params = dict(model.named_parameters())  # not detached
    before = clone_tree({k: v.detach() for k, v in params.items()})
    for rule, hyper in [("sam", {"rho": 0.05}), ("gr", {"gamma": 0.1}), ("coherent", {"lam": 0.1, "threshold": -1.0})]:
        res = gt.step(params, loss_fn, x, y, rule=rule, **hyper)
        assert all(d.grad_fn is None and not d.requires_grad for d in res.grad.values())
        assert all(p.grad is None for p in params.values())  # no .grad side effect
    assert_trees_close({k: v.detach() for k, v in params.items()}, before, 0, 0)


@pytest.mark.parametrize("rule,hyper", SETTINGS[::2], ids=IDS[::2])
def test_float32(rule, hyper):
    _, params, loss_fn, x, y = mlp_problem(torch.float32)
    grad_fn, hvp_fn = autograd_fns(loss_fn, x, y)
    res = gt.step(params, loss_fn, x, y, rule=rule, **hyper)
    want = gradnorm.step(params, grad_fn, rule=rule, hvp_fn=hvp_fn, **hyper)
    assert all(d.dtype == torch.float32 for d in res.grad.values())
    assert res.loss.dtype == torch.float32 and res.info["grad_norm"].dtype == torch.float32
    assert_trees_close(res.grad, want.grad, rtol=1e-5, atol=1e-6)


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__"):
            m.setattr(torch.Tensor, name, refuse)
        yield


@pytest.mark.parametrize("hvp", ["forward_over_reverse", "reverse_over_reverse"])
def test_no_tensor_is_read_back_to_the_host(monkeypatch, hvp):
    params, loss_fn, args, _, _ = quadratic_problem()
    for rule, hyper in SETTINGS:
        gt.step(params, loss_fn, *args, rule=rule, hvp=hvp, **hyper)  # warm up torch.func's lazy imports
    with no_host_reads(monkeypatch):
        for rule, hyper in SETTINGS:
            if gradnorm.rules.get(rule, **hyper).mean_grad_evals != gradnorm.rules.get(rule, **hyper).grad_evals:
                continue  # periodic rules read their host-memory step counter (tests/test_periodic.py)
            state = None
            for _ in range(2):
                state = gt.step(params, loss_fn, *args, rule=rule, state=state, hvp=hvp, **hyper).state


# --------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("rule,hyper", [("sam", {"rho": 0.05}), ("gr", {"gamma": 0.05}), ("gam", {})])
def test_training_loop_with_torch_optim_decreases_the_loss(rule, hyper):
    model, _, loss_fn, x, y = mlp_problem(torch.float32, seed=1)
    params = {k: v.detach() for k, v in model.named_parameters()}  # views of the module's parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    state, losses = None, []
    for _ in range(25):
        res = gt.step(params, loss_fn, x, y, rule=rule, state=state, **hyper)
        state = res.state
        for k, p in model.named_parameters():
            p.grad = res.grad[k]
        opt.step()  # updates the module in place; `params` are detached views of the same storage
        losses.append(float(res.loss))
    final = float(loss_fn({k: v.detach() for k, v in model.named_parameters()}, x, y))
    assert final < 0.6 * losses[0], losses
    assert losses[-1] < losses[0]
