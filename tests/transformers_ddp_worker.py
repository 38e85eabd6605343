"""Worker of tests/test_torch_transformers.py: one rank of a 2-process gloo (CPU) run of
`gradnorm.torch.transformers.GradnormTrainer` (the Trainer wraps the model in DDP itself). Writes
its final parameters, the micro-batches it trained on (in order) and the passes of its forwards."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_torch_transformers as T  # noqa: E402

import gradnorm.torch as gt  # noqa: E402
from gradnorm.torch.transformers import GradnormTrainer  # noqa: E402


def main(rule: str, accumulation: int, max_grad_norm: float, out: str) -> None:
    torch.set_num_threads(1)
    model, data = T.causal_lm(), T.Tokens()
    seen = []  # (pass, input_ids) of every forward

    def hook(module, args, kwargs):
        seen.append((gt.current_pass(), kwargs["input_ids"].clone()))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    args = T.arguments(Path(out).parent, gradient_accumulation_steps=accumulation, max_grad_norm=max_grad_norm,
                       ddp_backend="gloo", max_steps=2)
    trainer = GradnormTrainer(model=model, args=args, train_dataset=data, rule=rule, rule_kwargs=T.HYPER[rule])
    trainer.train()
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel), type(trainer.model_wrapped)
    torch.save({"params": [p.detach().clone() for p in model.parameters()], "seen": seen,
                "logged": T.logged_losses(trainer), "rank": int(os.environ["RANK"])}, out)


if __name__ == "__main__":
    rule, accumulation, max_grad_norm, out = sys.argv[1:]
    main(rule, int(accumulation), float(max_grad_norm), out)
