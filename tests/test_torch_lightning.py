"""gradnorm.torch.Optimizer inside the real Lightning Trainer (automatic optimization), against a
direct `opt.step(closure)` loop on the same batches: plain float64, bf16-mixed, an LR scheduler,
`gradient_clip_val` (on the rule's direction, with `GradnormModule`), checkpoint resume,
`accumulate_grad_batches` (refused; the manual-optimization recipe with `accumulating_closure` is
exact), logging from the first pass only, and the forward passes per step."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning")
import gradnorm  # noqa: E402
import gradnorm.torch as gt  # noqa: E402
from gradnorm.torch.lightning import GradnormModule  # noqa: E402

RULE = {"rule": "sam", "rho": 0.1}
BASE = {"lr": 0.1, "momentum": 0.9}
STEPS = 4

g = torch.Generator().manual_seed(0)
X = torch.randn(64, 5, generator=g, dtype=torch.float64)
Y = torch.randint(0, 3, (64,), generator=g)


def net(dtype=torch.float64):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)


def loader(batch_size=16, dtype=torch.float64):
    data = torch.utils.data.TensorDataset(X.to(dtype), Y)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


class Model(GradnormModule, L.LightningModule):
    def __init__(self, rule=RULE, schedule=False, dtype=torch.float64):
        super().__init__()
        self.net = net(dtype)
        self.rule, self.schedule = dict(rule), schedule
        self.forwards = 0
        self.logged = []

    def training_step(self, batch, batch_idx):
        self.forwards += 1
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        if not gt.is_extra_pass():
            self.logged.append(float(loss))
        return loss

    def configure_optimizers(self):
        opt = gt.Optimizer(self.parameters(), torch.optim.SGD, **self.rule, **BASE)
        if not self.schedule:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def trainer(**kwargs):
    kwargs.setdefault("precision", "64-true")
    if kwargs["precision"] is None:  # a precision plugin decides
        del kwargs["precision"]
    kwargs.setdefault("max_steps", STEPS)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def fit(model, batch_size=16, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice (num_workers, ...)
        trainer(**kwargs).fit(model, loader(batch_size, dtype=next(model.parameters()).dtype))
    return model


def direct(steps=STEPS, rule=RULE, schedule=False, autocast=None, clip=None, dtype=torch.float64):
    model = net(dtype)
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, **rule, **BASE, clip_grad_norm=clip)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if schedule else None
    losses = []
    for x, y in list(loader(dtype=dtype))[:steps]:
        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure)))
        if sched:
            sched.step()
    return model, losses


def max_diff(a, b):
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_plain_float64_equals_the_direct_loop_and_logs_the_first_pass():
    model = fit(Model())
    ref, losses = direct()
    assert max_diff(model.net, ref) <= 1e-15
    assert model.forwards == 2 * STEPS  # SAM: the first and the perturbed pass per step
    assert model.logged == pytest.approx(losses, rel=1e-15)


@pytest.mark.parametrize("rule", [{"rule": "gnp", "r": 0.1, "alpha": 0.8}, {"rule": "fd_gr", "gamma": 0.1, "eps": 0.01},
                                  {"rule": "gam"}, {"rule": "coherent", "lam": 0.1, "threshold": 0.0}],
                         ids=lambda r: r["rule"])
def test_other_rules_and_a_scheduler(rule):
    model = fit(Model(rule=rule, schedule=True))
    ref, _ = direct(rule=rule, schedule=True)
    assert max_diff(model.net, ref) <= 1e-15


def test_bf16_mixed_equals_the_direct_loop_under_autocast():
    model = fit(Model(dtype=torch.float32), precision="bf16-mixed")
    ref, _ = direct(autocast=torch.bfloat16, dtype=torch.float32)
    assert max_diff(model.net, ref) <= 1e-6


def test_gradient_clip_val_clips_the_rule_direction():
    model = fit(Model(), gradient_clip_val=0.01)
    ref, _ = direct(clip=0.01)
    unclipped, _ = direct()
    assert max_diff(model.net, ref) <= 1e-15
    assert max_diff(model.net, unclipped) > 1e-3  # the clip mattered
    with pytest.raises(gradnorm.GradnormError, match="gradient_clip_algorithm='norm'"):
        fit(Model(), gradient_clip_val=0.01, gradient_clip_algorithm="value")


def test_checkpoint_resume_continues_the_same_trajectory(tmp_path):
    """A ModelCheckpoint written at step 2 of a run, resumed to step 4, ends where the run did. The
    checkpoint is at an epoch boundary (two batches of 32 an epoch): resumed mid-epoch, Lightning
    restarts a plain DataLoader's epoch (a plain torch.optim.SGD then differs too)."""
    rule = {"rule": "coherent", "lam": 0.1, "threshold": 0.0}  # keeps a step count in its state
    every2 = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="s{step}", every_n_train_steps=2,
                                                  save_top_k=-1)
    straight = Model(rule=rule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  precision="64-true", max_steps=STEPS, callbacks=[every2]).fit(straight, loader(32))
        resumed = Model(rule=rule)
        trainer(max_steps=STEPS).fit(resumed, loader(32), ckpt_path=tmp_path / "sstep=2.ckpt")
    saved = torch.load(tmp_path / "sstep=2.ckpt", weights_only=False)["optimizer_states"][0]["gradnorm"]
    assert saved["rule"] == "coherent" and int(saved["state"][0]) == 2
    assert resumed.forwards == 2 and max_diff(resumed.net, straight.net) == 0.0


def test_accumulate_grad_batches_is_refused_with_the_recipe():
    with pytest.raises(gradnorm.GradnormError, match="accumulate_grad_batches=2.*accumulating_closure"):
        fit(Model(), accumulate_grad_batches=2)


def test_accumulate_grad_batches_without_the_mixin_is_refused_by_the_optimizer():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return gt.Optimizer(self.parameters(), torch.optim.SGD, **RULE, **BASE)

    with pytest.raises(gradnorm.GradnormError, match="accumulate_grad_batches"):
        fit(Plain(), accumulate_grad_batches=2)


class ManualAccumulation(GradnormModule, L.LightningModule):
    """The recipe: manual optimization, the batch split into micro-batches inside the step."""

    def __init__(self):
        super().__init__()
        self.net = net()
        self.automatic_optimization = False

    def loss_fn(self, x, y):
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        micro = list(zip(batch[0].split(8), batch[1].split(8)))
        closure = gt.accumulating_closure(opt.optimizer, self.loss_fn, micro, backward=self.manual_backward)
        loss = opt.step(closure)
        self.log("train_loss", loss)

    def configure_optimizers(self):
        return gt.Optimizer(self.parameters(), torch.optim.SGD, **RULE, **BASE)


def test_manual_accumulation_recipe_equals_the_full_batch_rule():
    model = fit(ManualAccumulation())
    ref, _ = direct()
    assert max_diff(model.net, ref) <= 1e-14


def test_exact_gr_is_refused_because_lightnings_closure_ignores_create_graph():
    with pytest.raises(gradnorm.ClosureError, match="fd_gr"):
        fit(Model(rule={"rule": "gr", "gamma": 0.1}))


def test_float16_grad_scaler_through_the_gradnorm_precision_plugin():
    """Lightning's own 16-mixed path calls step() without a closure: refused clearly. With
    GradnormMixedPrecision the optimizer owns Lightning's scaler: equal to a direct loop with
    `Optimizer(grad_scaler=...)` under float16 autocast."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from gradnorm.torch.lightning import GradnormMixedPrecision

    with pytest.raises(gradnorm.ClosureError, match="without a closure"):
        fit(Model(dtype=torch.float32), precision=None,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = fit(Model(dtype=torch.float32), precision=None, plugins=[GradnormMixedPrecision("16-mixed", "cpu", scaler=scaler)])
    ref = net(torch.float32)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = gt.Optimizer(ref.parameters(), torch.optim.SGD, **RULE, **BASE, grad_scaler=ref_scaler)
    for x, y in list(loader(dtype=torch.float32))[:STEPS]:
        def closure():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(ref(x), y)
            ref_scaler.scale(loss).backward()
            return loss

        opt.step(closure)
    assert model.forwards == 2 * STEPS
    assert max_diff(model.net, ref) <= 1e-7
    assert float(scaler.get_scale()) == float(ref_scaler.get_scale())
