"""gradnorm.torch on a CUDA device: everything stays on the device, no step synchronises with
the host, and the trajectories equal the CPU ones. Skipped where there is no GPU (CI); run on
a lent GPU machine with ``pytest tests/test_torch_cuda.py``."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

import gradnorm.torch as gt  # noqa: E402
from conformance.settings import ids, settings  # noqa: E402

RULES = settings("torch_cuda")  # every rule (conformance/settings.py)
IDS = ids(RULES)


def problem(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(64, 16, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    return model.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype), y.to(device)


def train(device, rule, hyper, steps=5, groups=False, sync_check=False):
    model, x, y = problem(device)
    params = list(model.parameters())
    spec = [{"params": params[:2], **({"rho": 0.1} if groups else {})}, {"params": params[2:]}]
    opt = gt.Optimizer(spec, torch.optim.SGD, rule=rule, lr=0.1, momentum=0.9, skip_nonfinite=False, **hyper)

    def closure(create_graph=False):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    opt.step(closure)  # warm-up: lazy CUDA init, momentum buffers
    torch.cuda.synchronize()
    if sync_check:
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            loss = opt.step(closure)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [p.detach() for p in params], loss, opt


@pytest.mark.parametrize("rule,hyper", RULES, ids=IDS)
def test_optimizer_steps_on_cuda_without_host_synchronisation(rule, hyper):
    params, loss, opt = train("cuda", rule, hyper, sync_check=True)
    assert all(p.device.type == "cuda" for p in params) and loss.device.type == "cuda"
    for entry in opt.base.state.values():
        assert all(t.device.type == "cuda" for t in entry.values() if isinstance(t, torch.Tensor))
    assert all(t.device.type == "cuda" for t in getattr(opt, "_scratch", None) or [])
    cpu_params, _, _ = train("cpu", rule, hyper)
    for p, q in zip(params, cpu_params):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-4, atol=1e-5)


def test_per_group_values_on_cuda_without_host_synchronisation():
    params, _, _ = train("cuda", "sam", {"rho": 0.05}, groups=True, sync_check=True)
    cpu_params, _, _ = train("cpu", "sam", {"rho": 0.05}, groups=True)
    for p, q in zip(params, cpu_params):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule,hyper", RULES, ids=IDS)
def test_functional_step_on_cuda_without_host_synchronisation(rule, hyper):
    model, x, y = problem("cuda")
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_fn(p):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    gt.step(params, loss_fn, rule=rule, **hyper)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = gt.step(params, loss_fn, rule=rule, **hyper)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(d.device.type == "cuda" for d in res.grad.values())
    assert all(v.device.type == "cuda" for v in res.info.values() if isinstance(v, torch.Tensor))
