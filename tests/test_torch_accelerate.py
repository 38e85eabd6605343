"""gradnorm.torch.Optimizer through Hugging Face accelerate's real ``Accelerator`` on the CPU, against a
direct gradnorm loop on the same batches: `step(closure)` with ``accelerator.backward`` (float64, and
bf16 mixed precision on a float32 model), gradient accumulation with ``accelerator.accumulate`` by
registering every micro-batch (`gradnorm.torch.accelerate.backward`, and by hand) and by
`accumulating_closure` with ``gradient_accumulation_steps=1``; the forward passes per step; and
`step(closure)` under ``gradient_accumulation_steps > 1`` (which accelerate would silently reduce to
every other micro-batch) refused before anything changes."""

from __future__ import annotations

import ast
import pathlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

import gradnorm  # noqa: E402
import gradnorm.torch as gt  # noqa: E402
import gradnorm.torch.accelerate as gta  # noqa: E402

F = torch.nn.functional
BASE = {"lr": 0.1, "momentum": 0.9}
RULES = {"sam": {"rho": 0.1}, "gnp": {"r": 0.1, "alpha": 0.8}, "fd_gr": {"gamma": 0.1, "eps": 0.01}, "gam": {},
         "flooding": {"b": 5.0}, "gr": {"gamma": 0.1}}
PASSES = {"sam": 2, "gnp": 2, "fd_gr": 2, "gam": 4, "flooding": 1, "gr": 1}  # forward passes per batch and step
ROWS, MICRO = 40, 8  # five micro-batches of 8


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps its state in process-wide singletons: every test starts from none."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def data(dtype):
    g = torch.Generator().manual_seed(0)
    return torch.randn(ROWS, 5, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 3, (ROWS,), generator=g)


def net(dtype):
    g = torch.Generator().manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    model.forwards = 0

    def count(*_):
        model.forwards += 1

    model.register_forward_hook(count)
    return model


def loader(dtype, batch_size=MICRO):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data(dtype)), batch_size=batch_size)


def optimizer(model, rule):
    return gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, **RULES[rule], **BASE)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a, b):
    return max(float((u.double() - v.double()).abs().max()) for u, v in zip(a, b))


def direct(rule, steps, dtype=torch.float64, bf16=False, scale=None):
    """The reference: gradnorm.torch.Optimizer without accelerate. `steps` lists each step's
    micro-batches (row ranges); every micro-batch's loss is multiplied by `scale` (accelerate's
    1 / gradient_accumulation_steps, as `accelerator.backward` does), or by its share of the step's
    examples when `scale` is None (`accumulating_closure`'s default)."""
    model = net(dtype)
    opt = optimizer(model, rule)
    x, y = data(dtype)

    def loss_fn(xb, yb):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(xb)
        return F.cross_entropy(out.float() if bf16 else out, yb)  # accelerate returns float32 outputs under bf16

    losses, forwards = [], []
    for micro in steps:
        before = model.forwards
        batches = [(x[a:b], y[a:b]) for a, b in micro]
        shares = None if scale is None else [scale] * len(batches)
        losses.append(float(opt.step(gt.accumulating_closure(opt, loss_fn, batches, weights=shares))))
        forwards.append(model.forwards - before)
    return weights(model), losses, forwards


def one_per_step(batch_size=MICRO):
    return [[(a, a + batch_size)] for a in range(0, ROWS, batch_size)]


def assert_same(got, want, tol):
    assert max_diff(got, want) <= tol, f"max |difference| {max_diff(got, want):.3g} > {tol:g}"


# -- no accumulation: step(closure) through AcceleratedOptimizer ------------------------------------


def test_step_with_the_first_pass_given_goes_through_unwrap():
    """`prepared.step(closure, loss=loss)` is refused by accelerate's wrapper (its `step` takes no
    `loss`); the documented way, `gta.unwrap(prepared).step(closure, loss=loss)`, equals the direct loop."""
    want, _, _ = direct("sam", one_per_step())
    accelerator = Accelerator(cpu=True)
    model = net(torch.float64)
    opt = optimizer(model, "sam")
    model, prepared, dl = accelerator.prepare(model, opt, loader(torch.float64))
    for i, (x, y) in enumerate(dl):
        def closure():
            prepared.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss

        prepared.zero_grad()
        loss = closure()
        if i == 0:
            with pytest.raises(TypeError, match="loss"):
                prepared.step(closure, loss=loss)
        gta.unwrap(prepared).step(closure, loss=loss)
    assert_same(weights(model), want, 1e-12)




@pytest.mark.parametrize("rule", ["sam", "gnp", "gam"])
def test_step_closure_float64_equals_the_direct_loop(rule):
    want, want_losses, want_forwards = direct(rule, one_per_step())
    accelerator = Accelerator(cpu=True)
    model = net(torch.float64)
    opt = optimizer(model, rule)
    model, prepared, dl = accelerator.prepare(model, opt, loader(torch.float64))
    assert gta.unwrap(prepared) is opt
    losses, forwards = [], []
    for x, y in dl:
        def closure():
            prepared.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            return loss

        before = model.forwards
        assert prepared.step(closure) is None  # AcceleratedOptimizer.step does not return the loss
        losses.append(float(opt.last_info["loss"]))  # the loss at the current weights is here
        forwards.append(model.forwards - before)
    assert_same(weights(model), want, 1e-12)  # measured: 0.0 (bit for bit)
    assert losses == pytest.approx(want_losses, rel=1e-12)
    assert forwards == want_forwards == [PASSES[rule]] * (ROWS // MICRO)


def test_step_closure_bf16_equals_the_direct_autocast_loop():
    """bf16 autocast on a float64 model leaves it in float64 (CPU autocast does not cast float64), so
    this runs a float32 model; the reference autocasts the same forward, so the ops are the same."""
    want, want_losses, want_forwards = direct("sam", one_per_step(), dtype=torch.float32, bf16=True)
    float32, _, _ = direct("sam", one_per_step(), dtype=torch.float32)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = net(torch.float32)
    opt = optimizer(model, "sam")
    model, prepared, dl = accelerator.prepare(model, opt, loader(torch.float32))
    forwards = []
    for x, y in dl:
        def closure():
            prepared.zero_grad()
            out = model(x)
            assert out.dtype == torch.float32  # accelerate converts the bf16 outputs back
            loss = F.cross_entropy(out, y)
            accelerator.backward(loss)
            return loss

        before = model.forwards
        prepared.step(closure)
        forwards.append(model.forwards - before)
    assert_same(weights(model), want, 1e-6)  # measured: 0.0 (the same bf16 ops in the same order)
    assert max_diff(weights(model), float32) > 1e-5  # bf16 did run (measured 3.8e-3 from float32)
    assert forwards == want_forwards == [2] * (ROWS // MICRO)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# -- gradient accumulation ------------------------------------------------------------------------

ACCUMULATED = [[(0, 8), (8, 16)], [(16, 24), (24, 32)], [(32, 40)]]  # the last step: end of the loader


@pytest.mark.parametrize("rule", ["sam", "gnp", "fd_gr", "gam", "flooding"])
def test_accumulate_with_registered_batches_equals_the_rule_on_the_whole_batch(rule):
    want, want_losses, want_forwards = direct(rule, ACCUMULATED, scale=0.5)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = net(torch.float64)
    opt = optimizer(model, rule)
    model, prepared, dl = accelerator.prepare(model, opt, loader(torch.float64))

    def loss_fn(xb, yb):
        return F.cross_entropy(model(xb), yb)

    syncs, forwards, losses, micro_losses = [], [], [], []
    before = 0
    for x, y in dl:
        with accelerator.accumulate(model):
            loss = gta.backward(accelerator, prepared, loss_fn, x, y)
            micro_losses.append(float(loss.detach()))
            prepared.step()
            prepared.zero_grad()  # does nothing on the micro-batches that do not step: registrations survive
            syncs.append(accelerator.sync_gradients)
            if accelerator.sync_gradients:
                losses.append(float(opt.last_info["loss"]))
                forwards.append(model.forwards - before)
                before = model.forwards
    assert syncs == [False, True, False, True, True]  # accelerate steps at the end of the loader too
    assert_same(weights(model), want, 1e-12)  # measured: 0.0
    assert losses == pytest.approx(want_losses, rel=1e-12)  # the mean loss over the accumulated micro-batches
    assert losses[0] == pytest.approx((micro_losses[0] + micro_losses[1]) / 2, rel=1e-12)
    assert forwards == want_forwards == [2 * PASSES[rule], 2 * PASSES[rule], PASSES[rule]]


def test_accumulate_with_bf16_and_registered_batches():
    want, _, _ = direct("sam", ACCUMULATED, dtype=torch.float32, bf16=True, scale=0.5)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    model = net(torch.float32)
    opt = optimizer(model, "sam")
    model, prepared, dl = accelerator.prepare(model, opt, loader(torch.float32))
    for x, y in dl:
        with accelerator.accumulate(model):
            gta.backward(accelerator, prepared, lambda xb, yb: F.cross_entropy(model(xb), yb), x, y)
            prepared.step()
            prepared.zero_grad()
    assert model.forwards == 2 * ROWS // MICRO
    assert_same(weights(model), want, 1e-6)  # measured: 0.0


def test_accumulate_with_register_batch_by_hand():
    """The recipe without the helper: each micro-batch's closure must bind its own batch (default
    arguments), since it runs when the loop has moved on; losses divided as accelerator.backward does."""
    want, _, _ = direct("sam", ACCUMULATED, scale=0.5)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = net(torch.float64)
    opt = optimizer(model, "sam")
    model, prepared, dl = accelerator.prepare(model, opt, loader(torch.float64))
    steps = accelerator.gradient_accumulation_steps
    for x, y in dl:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)

            def closure(x=x, y=y):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                return loss.detach() / steps

            opt.register_batch(loss.detach() / steps, closure)
            prepared.step()
            prepared.zero_grad()
    assert_same(weights(model), want, 1e-12)  # measured: 0.0


@pytest.mark.parametrize("rule", ["sam", "gr"])
def test_accumulating_closure_without_accelerate_accumulation(rule):
    """gradient_accumulation_steps=1, a loader of whole batches, the micro-batches inside the closure
    (exact GR too: accelerator.backward passes `create_graph` on)."""
    want, want_losses, want_forwards = direct(rule, [[(0, 8), (8, 16)], [(16, 24), (24, 32)], [(32, 40)]])
    accelerator = Accelerator(cpu=True)
    model = net(torch.float64)
    opt = optimizer(model, rule)
    model, prepared, dl = accelerator.prepare(model, opt, loader(torch.float64, batch_size=16))
    forwards = []
    for x, y in dl:
        micro = list(zip(x.split(MICRO), y.split(MICRO)))
        before = model.forwards
        prepared.step(gt.accumulating_closure(opt, lambda xb, yb: F.cross_entropy(model(xb), yb), micro,
                                              backward=accelerator.backward))
        forwards.append(model.forwards - before)
    assert_same(weights(model), want, 1e-12)  # measured: 0.0
    assert float(opt.last_info["loss"]) == pytest.approx(want_losses[-1], rel=1e-12)
    assert forwards == want_forwards == [2 * PASSES[rule], 2 * PASSES[rule], PASSES[rule]]


# -- what is refused ------------------------------------------------------------------------------


@pytest.mark.parametrize("inside_accumulate", [True, False])
def test_step_closure_with_gradient_accumulation_is_refused(inside_accumulate):
    """Inside accumulate, accelerate drops step(closure) on the first micro-batch (its closure never
    runs) and forwards it on the second: the result would be SAM on every other micro-batch with half
    its gradient. Outside accumulate every call steps, with each loss divided by 2. Both are refused
    at the first call that reaches the optimizer, before anything changes."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = net(torch.float64)
    start = weights(model)
    opt = optimizer(model, "sam")
    model, prepared, dl = accelerator.prepare(model, opt, loader(torch.float64))
    calls = 0
    with pytest.raises(gradnorm.GradnormError, match="gradient_accumulation_steps=2"):
        for x, y in dl:
            with accelerator.accumulate(model) if inside_accumulate else torch.enable_grad():
                def closure():
                    prepared.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    accelerator.backward(loss)
                    return loss

                calls += 1
                prepared.step(closure)
    assert calls == (2 if inside_accumulate else 1)
    assert model.forwards == 0
    assert_same(weights(model), start, 0.0)


def test_a_micro_batch_without_registration_is_an_error_at_the_step():
    """accelerate drops the step calls in between; the optimizer still counts the backward passes."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = net(torch.float64)
    opt = optimizer(model, "sam")
    model, prepared, dl = accelerator.prepare(model, opt, loader(torch.float64))
    batches = iter(dl)

    def loss_fn(xb, yb):
        return F.cross_entropy(model(xb), yb)

    for _ in range(2):  # one complete step
        with accelerator.accumulate(model):
            gta.backward(accelerator, prepared, loss_fn, *next(batches))
            prepared.step()
            prepared.zero_grad()
    with accelerator.accumulate(model):
        accelerator.backward(loss_fn(*next(batches)))  # not registered
        prepared.step()
    start = weights(model)
    with accelerator.accumulate(model), pytest.raises(gradnorm.ClosureError, match="2 backward pass"):
        gta.backward(accelerator, prepared, loss_fn, *next(batches))
        prepared.step()
    assert_same(weights(model), start, 0.0)


def test_helper_refusals():
    accelerator = Accelerator(cpu=True)
    model = net(torch.float64)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="gradnorm.torch.Optimizer"):
        gta.unwrap(accelerator.prepare(plain))
    opt = optimizer(model, "sam")
    with pytest.raises(TypeError, match="accelerate.Accelerator"):
        gta.backward(object(), opt, lambda: model(torch.zeros(1, 5, dtype=torch.float64)).sum())
    accelerator.scaler = torch.amp.GradScaler("cpu")  # what mixed_precision="fp16" makes on a GPU
    with pytest.raises(gradnorm.GradnormError, match="bf16"):
        gta.backward(accelerator, opt, lambda: model(torch.zeros(1, 5, dtype=torch.float64)).sum())
    assert model.forwards == 0


def test_importing_gradnorm_torch_does_not_import_accelerate():
    """Only `gradnorm.torch.accelerate` imports accelerate (read from the sources: a subprocess that
    imports torch again costs seconds); `_accelerate_guard` reads `sys.modules` instead."""
    package = pathlib.Path(gt.__file__).parent
    for path in sorted(package.glob("*.py")):
        if path.name == "accelerate.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(n.split(".")[0] == "accelerate" for n in names), f"{path.name} imports accelerate"
