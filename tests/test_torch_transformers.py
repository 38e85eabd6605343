"""The transformers ``Trainer`` with a gradnorm rule (`gradnorm.torch.transformers`).

A real ``transformers.Trainer`` trains a tiny float64 model built from a config (a Llama: its loss is
normalised by the Trainer's ``num_items_in_batch`` under gradient accumulation) or a plain module
returning ``{"loss": ...}`` (the Trainer divides its loss by the accumulation steps), on a
synthetic dataset in order. After a few steps the weights must equal a direct
``gradnorm.torch.Optimizer`` loop, ``opt.step(closure)``, on the same batches: with gradient
accumulation the direct loop takes the whole accumulated batch in one closure; with
``max_grad_norm`` it uses ``clip_grad_norm=``. The logged loss is the first pass's.
"""

from __future__ import annotations

import copy
import gc
import re
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import gradnorm.torch as gt  # noqa: E402
from gradnorm.torch.transformers import GradnormTrainer, unwrap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, N = 50, 8, 24
HYPER = {"sam": {"rho": 0.05}, "gnp": {"r": 0.05, "alpha": 0.5}, "fd_gr": {"gamma": 0.1, "eps": 0.01}, "sgd": {}}
TOL = 1e-12  # float64


@pytest.fixture(autouse=True, scope="module")
def _fast():
    """Every `Trainer.train()` runs `gc.collect()` (accelerate's `free_memory`), which walks all of
    transformers' objects: keep those out of the collector while this module runs. The models are
    tiny: one thread. accelerate's process-wide state starts and ends clean (the Trainer creates an
    `Accelerator`)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ----------------------------------------------------------------------------------------
# models, data, trainer


def causal_lm(dropout: float = 0.0):
    """A one-layer Llama (hidden size 16, vocabulary 50) in float64, built from its config."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
                                   attention_dropout=dropout, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).double()


class Regressor(torch.nn.Module):
    """A plain module returning ``{"loss": mean squared error}``: the Trainer divides its loss by
    the accumulation steps (no ``num_items_in_batch``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()

    def forward(self, x, labels=None):
        out = self.net(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Tokens(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, VOCAB, (N, SEQ), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}

    def batch(self, rows):
        return {"input_ids": self.x[rows], "labels": self.x[rows]}


class Points(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(2)
        self.x = torch.randn(N, 6, generator=g, dtype=torch.float64)
        self.y = torch.randn(N, generator=g, dtype=torch.float64)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}

    def batch(self, rows):
        return {"x": self.x[rows], "labels": self.y[rows]}


def arguments(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, report_to=[],
              use_cpu=True, save_strategy="no", train_sampling_strategy="sequential", optim="sgd",
              learning_rate=0.1, lr_scheduler_type="constant", logging_steps=1, max_grad_norm=0.0,
              disable_tqdm=True, seed=0)
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)


def record_passes(model):
    """The `gradnorm.torch.current_pass()` of every forward of `model` (None: the Trainer's own)."""
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(gt.current_pass()))
    return seen


def step_batches(data, args):
    """The rows of each optimizer step, as the Trainer takes them in order."""
    size = args.per_device_train_batch_size * args.gradient_accumulation_steps
    return [list(range(s * size, (s + 1) * size)) for s in range(args.max_steps)]


def direct_loop(model, data, args, rule, *, clip=None, batches=None):
    """`gradnorm.torch.Optimizer` around SGD with `opt.step(closure)` on each step's whole batch
    (`batches`, or the Trainer's order); returns the first and second losses of every step (at the
    current and the first extra point)."""
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, clip_grad_norm=clip, lr=args.learning_rate,
                       **HYPER[rule])
    losses = []
    if batches is None:
        batches = [data.batch(rows) for rows in step_batches(data, args)]
    for batch in batches:
        seen = []

        def closure():
            opt.zero_grad()
            loss = model(**batch)["loss"]
            loss.backward()
            seen.append(loss.detach())
            return loss

        opt.step(closure)
        losses.append(seen)
    return losses


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def logged_losses(trainer):
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


# ----------------------------------------------------------------------------------------
# the Trainer's steps equal the direct loop


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("rule", ["sam", "gnp", "fd_gr"])
def test_trainer_equals_direct_loop(tmp_path, rule, accumulation):
    model, data = causal_lm(), Tokens()
    reference = copy.deepcopy(model)
    args = arguments(tmp_path, gradient_accumulation_steps=accumulation)
    passes = record_passes(model)
    trainer = GradnormTrainer(model=model, args=args, train_dataset=data, rule=rule, rule_kwargs=HYPER[rule])
    trainer.train()
    losses = direct_loop(reference, data, args, rule)
    diff = max_diff(model, reference)
    print(f"{rule} accumulation={accumulation}: max |trainer - direct| = {diff:.3g}")
    assert diff <= TOL
    # two passes per micro-batch: the Trainer's own, then one extra pass flagged by is_extra_pass()
    micro = args.max_steps * accumulation
    assert len(passes) == 2 * micro
    assert passes == ([None] * accumulation + [1] * accumulation) * args.max_steps
    # the logged loss is the first pass's loss (of the whole accumulated batch), not the perturbed one
    logged = logged_losses(trainer)
    assert len(logged) == args.max_steps
    for value, (first, extra) in zip(logged, losses):
        assert value == pytest.approx(first.item(), rel=1e-6)
        assert abs(first.item() - extra.item()) > 1e-4


def test_the_rule_moves_the_weights(tmp_path):
    """The comparison above is not vacuous: SAM's trajectory differs from plain SGD's."""
    data, args = Tokens(), arguments(tmp_path)
    sam, sgd = causal_lm(), causal_lm()
    direct_loop(sam, data, args, "sam")
    direct_loop(sgd, data, args, "sgd")
    assert max_diff(sam, sgd) > 1e-4


def test_plain_module_with_accumulation(tmp_path):
    """No `num_items_in_batch`: the Trainer divides each micro-batch's mean loss by the
    accumulation steps; the step equals SAM on the whole batch."""
    model, data = Regressor(), Points()
    reference = copy.deepcopy(model)
    args = arguments(tmp_path, gradient_accumulation_steps=2)
    passes = record_passes(model)
    trainer = GradnormTrainer(model=model, args=args, train_dataset=data, rule="sam", rule_kwargs=HYPER["sam"])
    assert not trainer.model_accepts_loss_kwargs
    trainer.train()
    losses = direct_loop(reference, data, args, "sam")
    diff = max_diff(model, reference)
    print(f"plain module, accumulation=2: max |trainer - direct| = {diff:.3g}")
    assert diff <= TOL
    assert passes == [None, None, 1, 1] * args.max_steps
    assert logged_losses(trainer) == pytest.approx([first.item() for first, _ in losses], rel=1e-6)


def test_bf16_autocast(tmp_path):
    """bf16 mixed precision (no loss scaling): every pass runs under the Trainer's autocast."""
    model, data = causal_lm().float(), Tokens()
    reference = copy.deepcopy(model)
    args = arguments(tmp_path, gradient_accumulation_steps=2, bf16=True)
    passes = record_passes(model)
    GradnormTrainer(model=model, args=args, train_dataset=data, rule="sam", rule_kwargs=HYPER["sam"]).train()
    assert passes == [None, None, 1, 1] * args.max_steps
    direct_loop(reference, data, args, "sam")  # float32, no autocast
    assert max_diff(model, reference) < 1e-3


# ----------------------------------------------------------------------------------------
# clipping acts on the rule's direction


@pytest.mark.parametrize("rule", ["sam", "gnp"])
def test_max_grad_norm_clips_the_direction(tmp_path, rule):
    model, data = causal_lm(), Tokens()
    reference, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    args = arguments(tmp_path, gradient_accumulation_steps=2, max_grad_norm=0.05)
    trainer = GradnormTrainer(model=model, args=args, train_dataset=data, rule=rule, rule_kwargs=HYPER[rule])
    trainer.train()
    assert unwrap(trainer.optimizer).clip_grad_norm == 0.05
    direct_loop(reference, data, args, rule, clip=0.05)
    direct_loop(unclipped, data, args, rule)
    diff = max_diff(model, reference)
    print(f"{rule} max_grad_norm=0.05, accumulation=2: max |trainer - direct(clip_grad_norm)| = {diff:.3g}")
    assert diff <= TOL
    assert max_diff(reference, unclipped) > 1e-4  # the clipping was active
    # the logged grad_norm is the first pass's gradient norm, unclipped (the Trainer did not clip it)
    norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(norms) == args.max_steps and min(norms) > 0.05


def test_user_optimizer_gets_max_grad_norm(tmp_path):
    """`optimizers=(gradnorm optimizer, scheduler)`: the Trainer's max_grad_norm becomes its
    clip_grad_norm; a conflicting value is an error, not a silent choice."""
    model, data = causal_lm(), Tokens()
    reference = copy.deepcopy(model)
    args = arguments(tmp_path, max_grad_norm=0.05)
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="gnp", lr=0.1, **HYPER["gnp"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = GradnormTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    assert opt.clip_grad_norm == 0.05
    trainer.train()
    direct_loop(reference, data, args, "gnp", clip=0.05)
    diff = max_diff(model, reference)
    print(f"user gnp optimizer, max_grad_norm=0.05: max |trainer - direct(clip_grad_norm)| = {diff:.3g}")
    assert diff <= TOL

    other = gt.Optimizer(causal_lm().parameters(), torch.optim.SGD, rule="sam", lr=0.1, clip_grad_norm=0.5,
                         **HYPER["sam"])
    with pytest.raises(ValueError, match="max_grad_norm=0.05 and the gradnorm optimizer's clip_grad_norm=0.5"):
        GradnormTrainer(model=causal_lm(), args=args, train_dataset=data, optimizers=(other, None))
    with pytest.raises(ValueError, match="already has its rule"):
        GradnormTrainer(model=causal_lm(), args=args, train_dataset=data, optimizers=(other, None), rule="sam")


def test_default_adamw_and_linear_schedule(tmp_path):
    """The optimizer the Trainer would build (TrainingArguments.optim, weight decay groups, its
    kwargs) wrapped in gradnorm, with the Trainer's default linear schedule."""
    model, data = causal_lm(), Tokens()
    reference = copy.deepcopy(model)
    args = arguments(tmp_path, optim="adamw_torch", learning_rate=0.01, weight_decay=0.1,
                     lr_scheduler_type="linear", gradient_accumulation_steps=2)
    trainer = GradnormTrainer(model=model, args=args, train_dataset=data, rule="sam", rule_kwargs=HYPER["sam"])
    trainer.train()
    opt = unwrap(trainer.optimizer)
    assert isinstance(opt.base, torch.optim.AdamW) and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [g["rho"] for g in opt.param_groups] == [0.05, 0.05]

    decay = set(trainer.get_decay_parameter_names(reference))
    named = list(reference.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, reference)
    direct = gt.Optimizer(groups, cls, rule="sam", **kwargs, **HYPER["sam"])
    sched = transformers.get_scheduler("linear", direct, num_warmup_steps=0, num_training_steps=args.max_steps)
    for rows in step_batches(data, args):
        batch = data.batch(rows)

        def closure():
            direct.zero_grad()
            loss = reference(**batch)["loss"]
            loss.backward()
            return loss

        direct.step(closure)
        sched.step()
    diff = max_diff(model, reference)
    print(f"sam, adamw_torch + linear schedule, accumulation=2: max |trainer - direct| = {diff:.3g}")
    assert diff <= 1e-10  # Adam divides by sqrt(v): rounding of the first steps is amplified


# ----------------------------------------------------------------------------------------
# DistributedDataParallel: 2 processes on gloo


def free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_two_processes_equal_the_rule_on_the_global_batch(tmp_path):
    """The Trainer wraps the model in DDP (2 CPU processes, gloo), with gradient accumulation 2 and
    max_grad_norm: every pass all-reduces once, so each step is SAM (clipped) on the union of the
    ranks' micro-batches, and the ranks stay bit-identical."""
    import os
    import subprocess

    port, world = free_port(), 2
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    procs = []
    for r in range(world):
        env = {**os.environ, "PYTHONPATH": path, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "transformers_ddp_worker.py"), "sam", "2",
                                       "0.05", str(outs[r])], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-5000:]
    runs = [torch.load(o) for o in outs]
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["params"], runs[1]["params"]))
    assert runs[0]["logged"] == runs[1]["logged"]  # the loss of the global batch

    # the steps: each rank's first passes (None), then one extra pass (1) per micro-batch
    steps = []
    for run in runs:
        passes = [p for p, _ in run["seen"]]
        assert passes == [None, None, 1, 1, None, 1]  # 24 rows, 2 ranks, batch 4: micro-batches 2 + 1
        firsts = [ids for p, ids in run["seen"] if p is None]
        steps.append([firsts[:2], firsts[2:]])
    batches = []
    for step in range(2):
        ids = torch.cat([ids for rank in steps for ids in rank[step]])
        batches.append({"input_ids": ids, "labels": ids})
    assert sorted(torch.cat([b["input_ids"] for b in batches])[:, 0].tolist()) == sorted(Tokens().x[:, 0].tolist())
    reference = causal_lm()
    losses = direct_loop(reference, None, arguments(tmp_path), "sam", clip=0.05, batches=batches)
    diff = max(max((p - q).abs().max().item() for p, q in zip(run["params"], reference.parameters())) for run in runs)
    print(f"DDP 2 ranks, sam, accumulation=2, max_grad_norm=0.05: max |rank - direct(global batch)| = {diff:.3g}")
    assert diff <= TOL
    assert runs[0]["logged"] == pytest.approx([first.item() for first, _ in losses], rel=1e-6)


# ----------------------------------------------------------------------------------------
# randomness, errors, the documented recipe


@pytest.mark.parametrize("same", [True, False])
def test_same_randomness_replays_each_micro_batch(tmp_path, same):
    """With `same_randomness=True` every extra pass of a micro-batch starts from the random state of
    that micro-batch's first pass (the same dropout masks); by default it draws new ones."""
    model, data = causal_lm(dropout=0.1), Tokens()
    states = []
    model.register_forward_pre_hook(lambda module, args: states.append(torch.get_rng_state().clone()))
    args = arguments(tmp_path, gradient_accumulation_steps=2, max_steps=2)
    trainer = GradnormTrainer(model=model, args=args, train_dataset=data, rule="sam",
                              rule_kwargs={**HYPER["sam"], "same_randomness": same})
    trainer.train()
    assert len(states) == 8
    for step in range(2):
        first, extra = states[4 * step: 4 * step + 2], states[4 * step + 2: 4 * step + 4]
        for a, b in zip(first, extra):
            assert torch.equal(a, b) is same
        assert not torch.equal(first[0], first[1])


def test_plain_trainer_refuses_a_gradnorm_optimizer(tmp_path):
    """Without the integration the Trainer calls step() with no closure and no registered batch:
    a clear ClosureError, not a silent plain step."""
    model = causal_lm()
    before = copy.deepcopy(model)
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="sam", lr=0.1, **HYPER["sam"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = transformers.Trainer(model=model, args=arguments(tmp_path, max_grad_norm=1.0), train_dataset=Tokens(),
                                   optimizers=(opt, sched))
    with pytest.raises(gt.ClosureError, match="without a closure and no batch was registered"):
        trainer.train()
    assert max_diff(model, before) == 0.0


def test_errors(tmp_path):
    data = Tokens()
    with pytest.raises(ValueError, match="use rule='fd_gr'"):
        GradnormTrainer(model=causal_lm(), args=arguments(tmp_path), train_dataset=data, rule="gr",
                        rule_kwargs={"gamma": 0.1}).train()
    plain = torch.optim.SGD(causal_lm().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="needs a gradnorm.torch.Optimizer"):
        GradnormTrainer(model=causal_lm(), args=arguments(tmp_path), train_dataset=data, optimizers=(plain, None))
    with pytest.raises(ValueError, match="`perturbation` cannot be given"):
        GradnormTrainer(model=causal_lm(), args=arguments(tmp_path), train_dataset=data, rule="sam",
                        rule_kwargs={"rho": 0.05, "perturbation": "global"})
    trainer = GradnormTrainer(model=causal_lm(), args=arguments(tmp_path), train_dataset=data, rule_kwargs=HYPER["sam"])
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")  # what fp16=True sets up on a GPU
    with pytest.raises(ValueError, match="fp16 mixed precision is not supported"):
        trainer.train()
    trainer.accelerator.scaler, trainer.is_deepspeed_enabled = None, True
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        trainer.create_optimizer()
    with pytest.raises(ValueError, match="updates the weights inside the backward pass"):
        GradnormTrainer(model=causal_lm(), args=arguments(tmp_path, optim="lomo"), train_dataset=data,
                        rule_kwargs=HYPER["sam"]).create_optimizer()


def test_import_gradnorm_torch_does_not_import_transformers():
    import subprocess

    code = "import sys, gradnorm.torch; print('transformers' in sys.modules, 'accelerate' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def test_documented_recipe_runs(tmp_path, monkeypatch):
    """The transformers section of docs/adapters/torch.md (skipped by the general docs test, which
    must not need transformers) runs as printed."""
    text = (ROOT / "docs" / "adapters" / "torch.md").read_text(encoding="utf-8")
    section = text.split("## transformers `Trainer`", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    runnable = [b for b in blocks if "needs transformers" in b]
    assert runnable
    monkeypatch.chdir(tmp_path)
    for code in runnable:
        exec(compile(code, "docs/adapters/torch.md", "exec"), {"__name__": "__doc__"})
