"""gradnorm.torch.Optimizer under torch.compile (docs/adapters/torch.md, "torch.compile").

Both ways of compiling work from the first call and follow the eager trajectory:

* a compiled model (``model = torch.compile(model)``, ``opt.step(closure)`` eagerly), for every rule;
* a compiled whole step (``torch.compile(lambda: opt.step(closure))``): with Inductor for ``sgd``
  and ``sam`` (the rules of benchmarks/torch_compile.py; all rules pass with Inductor too, but
  compiling each takes 10-60 s here), and for every other rule with Dynamo's ``"eager"`` backend,
  which traces the same frames (guards, graph breaks, side effects on the optimizer) without
  Inductor's code generation, to keep this file fast on a small CPU.

After the warm-up (two steps: torch.optim's SGD compiles once more when its momentum buffers
appear at the second step) no step compiles anything, with a radius schedule and an LR scheduler
too. Exact GR needs a double backward, which AOT autograd refuses: the test asserts PyTorch's
error and that the weights are restored.

Tolerance: float32 on CPU, 5 steps, ``atol = rtol = 1e-6``. Compiled kernels round differently
from the eager ones (Inductor fuses the matmul epilogues and sums the reductions of the loss and
of the norms in another order; a traced norm is ``_foreach_norm`` squared, as Dynamo cannot
trace ``_foreach_powsum``), a few units in the last place per step (6e-8 at |w| ~ 0.5) that
momentum carries over the steps; the largest difference seen is 2.4e-7.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
if not hasattr(torch, "compiler") or not hasattr(torch.compiler, "is_compiling"):  # pragma: no cover
    pytest.skip("torch.compile needs PyTorch >= 2.3", allow_module_level=True)

import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import gradnorm.torch as gt  # noqa: E402
from conformance.settings import settings  # noqa: E402

# Inductor's import of torch.jit warns about its own deprecation
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

SETTINGS = [(r, h) for r, h in settings("torch_optimizer") if r != "gr"]
GR = [(r, h) for r, h in settings("torch_optimizer") if r == "gr"]
IDS = [f"{r}-{h}" for r, h in SETTINGS]
INDUCTOR = [(r, h) for r, h in SETTINGS if r in ("sgd", "sam") and "adaptive" not in h]
TRACED = [(r, h) for r, h in SETTINGS if (r, h) not in INDUCTOR]  # every other rule
STEPS = 5
WARMUP = 2  # the steps that may compile: the first, and the second (SGD's momentum buffers appear)
TOL = {"atol": 1e-6, "rtol": 1e-6}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(32, 5, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return model, x, y


def train(rule, hyper, mode="eager", backend="inductor", steps=STEPS, **options):
    """`steps` SGD-momentum steps of `rule`; `mode`: "eager", "model" (compiled model) or "step"
    (compiled whole step). Returns the optimizer, the model, the data, the step function and the
    number of frames Dynamo had compiled after each step."""
    model, x, y = make_problem()
    net = torch.compile(model, backend=backend) if mode == "model" else model
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.1, momentum=0.9, **options, **hyper)

    def closure(create_graph=False):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    def step():
        return opt.step(closure)

    if mode == "step":
        step = torch.compile(step, backend=backend)
    frames = []
    for _ in range(steps):
        loss = step()
        assert torch.isfinite(loss)
        frames.append(counters["frames"]["total"])
    return opt, model, x, step, frames


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_same_weights(a, b):
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **TOL)


@pytest.mark.parametrize("rule,hyper", SETTINGS + GR, ids=IDS + [f"{r}-{h}" for r, h in GR])
def test_rule_state_exists_from_construction(rule, hyper):
    # a compiled step must find the state: it is not created lazily inside step()
    model, _, _ = make_problem()
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.1, **hyper)
    assert opt.rule_state is not None
    assert type(opt.rule_state) is type(opt.rule.init(list(model.parameters())))


@pytest.mark.parametrize("rule,hyper", SETTINGS, ids=IDS)
def test_compiled_model_equals_eager(rule, hyper):
    _, eager, *_ = train(rule, hyper)
    _, model, _, _, frames = train(rule, hyper, mode="model")
    assert_same_weights(weights(model), weights(eager))
    assert frames[0] >= 1, "nothing was compiled"
    assert frames[-1] == frames[0], f"a step compiled again: frames compiled after each step {frames}"


@pytest.mark.parametrize("rule,hyper", INDUCTOR, ids=[r for r, _ in INDUCTOR])
def test_compiled_step_equals_eager(rule, hyper):
    _, eager, *_ = train(rule, hyper)
    opt, model, x, step, frames = train(rule, hyper, mode="step")
    assert_same_weights(weights(model), weights(eager))
    assert frames[-1] == frames[WARMUP - 1], f"a step compiled again: frames compiled after each step {frames}"
    # a non-finite loss: the step is skipped, the weights kept (the skip decision's host read)
    before = weights(model)
    x.fill_(math.nan)
    step()
    assert not bool(opt.last_info["finite"])
    for u, v in zip(weights(model), before):
        assert torch.equal(u, v)


@pytest.mark.parametrize("rule,hyper", TRACED, ids=[f"{r}-{h}" for r, h in TRACED])
def test_compiled_step_traces_every_rule(rule, hyper):
    """Dynamo with its "eager" backend: the frames, guards and side effects of the compiled step,
    without Inductor's code generation."""
    _, eager, *_ = train(rule, hyper)
    opt, model, _, _, frames = train(rule, hyper, mode="step", backend="eager")
    assert_same_weights(weights(model), weights(eager))
    assert frames[-1] == frames[WARMUP - 1], f"a step compiled again: frames compiled after each step {frames}"
    assert bool(opt.last_info["finite"])


@pytest.mark.parametrize("mode", ["model", "step"])
def test_exact_gr_needs_double_backward_which_compile_refuses(mode):
    """AOT autograd (the compiled forward's backward) has no double backward: PyTorch refuses the
    create_graph pass (or, with torch._functorch.config.donated_buffer=False, the Hessian-vector
    product). The weights are restored; docs/adapters/torch.md points to fd_gr."""
    rule, hyper = GR[0]
    model, x, y = make_problem()
    net = torch.compile(model) if mode == "model" else model
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.1, momentum=0.9, **hyper)

    def closure(create_graph=False):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    step = torch.compile(lambda: opt.step(closure)) if mode == "step" else (lambda: opt.step(closure))
    before = weights(model)
    with pytest.raises(RuntimeError, match="double backward|donated buffers"):
        step()
    for u, v in zip(weights(model), before):
        assert torch.equal(u, v)


def test_schedules_do_not_recompile_every_step():
    """A schedule of the rule's radius (a Python float in param_groups) recompiles once, then Dynamo
    treats it as dynamic. The learning rate is read by torch.optim's update, which Inductor compiles
    with a Python float guarded by value (torch 2.13: a recompile every step, until Dynamo's
    recompile limit), so it is a 0-d tensor here, as PyTorch recommends for compiled optimizers
    with LR schedulers. Without the skip decision's host read (skip_nonfinite=False)."""
    results = []
    for mode in ("eager", "step"):
        torch._dynamo.reset()
        counters.clear()
        model, x, y = make_problem()
        opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.05, momentum=0.9,
                           lr=torch.tensor(0.1), skip_nonfinite=False)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        step = (lambda: opt.step(closure)) if mode == "eager" else torch.compile(lambda: opt.step(closure))
        frames = []
        for i in range(6):
            step()
            sched.step()
            for group in opt.param_groups:
                group["rho"] = 0.05 * (2 + i)
            frames.append(counters["frames"]["total"])
        results.append(weights(model))
    assert_same_weights(*results)
    assert frames[-1] == frames[WARMUP - 1], f"a step compiled again: frames compiled after each step {frames}"
