"""Worker of tests/test_torch_ddp.py: one rank of a 2-process gloo run of
gradnorm.torch.Optimizer around a DistributedDataParallel model. Writes its final parameters."""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import gradnorm.torch as gt


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def main(rank: int, world: int, port: str, rule: str, perturbation: str, out: str) -> None:
    # a rendezvous that cannot complete fails after a minute instead of hanging the test
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    print(f"rank {rank}: joined", flush=True)  # progress, shown if the test times out
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    x, y = make_data()
    xb, yb = x.chunk(world)[rank], y.chunk(world)[rank]
    hyper = {"sam": {"rho": 0.1}, "flooding": {"b": 1.0}}[rule]
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, model=model, perturbation=perturbation,
                       lr=0.3, momentum=0.9, **hyper)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(4)]
    torch.save({"params": [p.detach().clone() for p in model.parameters()], "losses": losses}, out)
    print(f"rank {rank}: saved", flush=True)
    # both ranks reach the shutdown together: gloo's destroy_process_group can hang in a rank whose
    # peer has already exited (seen on CI as a rank that finished its work and never returned)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, port, rule, perturbation, out = sys.argv[1:]
    main(int(rank), int(world), port, rule, perturbation, out)
