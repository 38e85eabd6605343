"""Worker of tests/test_torch_fsdp.py: one rank of a 2-process gloo run of gradnorm.torch.Optimizer
around an FSDP2 (`fully_shard`) model, every rule in one go. Writes, per rule, the full parameters
after the steps, the losses, whether the weights were restored bit for bit before every base
update and after an exception in an extra pass, and every warning raised during the steps; and
the global reductions of `TorchForeachOps` on DTensor lists."""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist

import gradnorm.torch as gt

RULES = {  # case name: (rule, hyperparameters)
    "sgd": ("sgd", {}),
    "sam": ("sam", {"rho": 0.1}),
    "sam_adaptive": ("sam", {"rho": 0.1, "adaptive": True, "eta": 0.01}),
    "gnp": ("gnp", {"r": 0.05, "alpha": 0.5}),
    "fd_gr": ("fd_gr", {"gamma": 0.1, "eps": 0.01}),
    "gam": ("gam", {}),
    # b between the two ranks' losses: the sign is that of the global loss only if the loss is global
    "flooding": ("flooding", {"b": 1.17}),
    "coherent": ("coherent", {"lam": 0.1, "threshold": 0.8, "delay": 1}),
    "flooding_given_loss": ("flooding", {"b": 1.17}),  # the first pass run by the caller: step(closure, loss=)
}
GIVEN_LOSS = {"flooding_given_loss"}
STEPS = 4
ONE_PASS = {"sgd", "flooding", "coherent"}  # rules without extra passes: no exception test
BASE = {"lr": 0.3, "momentum": 0.9}


class Scale(torch.nn.Module):
    """A one-entry parameter: its shard is empty on rank 1."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((1,), 1.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3), Scale()).double()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model


def recover(model: torch.nn.Module) -> None:
    """FSDP2's recovery after an exception in a forward (its documented `reset_iter_state`, or
    resharding every FSDP module where torch is older): without it the root keeps the parameters
    the aborted forward all-gathered, the perturbed ones, and the next forward would use them."""
    if hasattr(model, "reset_iter_state"):
        model.reset_iter_state()
        return
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def bits(params) -> list[torch.Tensor]:
    """The local shards' bit patterns (so that -0.0 and NaN payloads count too)."""
    return [p.to_local().detach().clone().view(torch.int64) for p in params]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


def run_rule(name: str, rule: str, hyper: dict, xb: torch.Tensor, yb: torch.Tensor) -> dict:
    model = shard(make_model())
    params = list(model.parameters())
    opt = gt.Optimizer(params, torch.optim.SGD, rule=rule, **BASE, **hyper)
    before: list[list[torch.Tensor]] = []
    restored: list[bool] = []
    opt.base.register_step_pre_hook(lambda *_: restored.append(same_bits(bits(params), before[-1])))
    calls = [0]
    fail_at = [None]
    moved: list[bool] = []  # whether an extra pass ran at weights other than the step's

    def closure():
        calls[0] += 1
        if calls[0] > 1:
            moved.append(not same_bits(bits(params), before[-1]))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        if calls[0] == fail_at[0]:  # after the forward (FSDP2 has all-gathered), before the backward
            raise RuntimeError("boom")
        loss.backward()
        return loss

    out: dict = {"losses": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(STEPS):
            before.append(bits(params))
            calls[0] = 0
            if name in GIVEN_LOSS:
                out["losses"].append(float(opt.step(closure, loss=closure())))
                continue
            out["losses"].append(float(opt.step(closure)))
        out["params"] = [p.full_tensor().detach().clone() for p in params]
        if rule not in ONE_PASS:  # an exception in the extra pass (the second closure call of a step)
            before.append(bits(params))
            calls[0], fail_at[0] = 0, 2
            try:
                opt.step(closure)
                out["raised"] = False
            except RuntimeError as e:
                out["raised"] = str(e) == "boom"
            out["restored_after_exception"] = same_bits(bits(params), before[-1])
            recover(model)
            fail_at[0] = None
        before.append(bits(params))
        calls[0] = 0
        out["losses"].append(float(opt.step(closure)))  # and training goes on as if nothing happened
        out["params_after"] = [p.full_tensor().detach().clone() for p in params]
    out["restored"] = restored
    out["moved"] = moved
    out["warnings"] = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    return out


def check_ops(rank: int) -> dict:
    """`TorchForeachOps` reductions on DTensor lists, with the full tensors to check them against."""
    model = shard(make_model())
    x = [p.detach() for p in model.parameters()]
    ops = gt.TorchForeachOps()
    y = ops.add_scalar(ops.sign(x), 0.25)
    nan = [p.detach().clone() for p in model.parameters()]
    if rank == 1:  # a NaN in rank 1's shard only
        nan[0].to_local()[0, 0] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = {
            "full": [p.full_tensor() for p in x],
            "full_y": [p.full_tensor() for p in y],
            "norm": ops.norm(x),
            "vdot": ops.vdot(x, y),
            "finite": bool(ops.all_finite(x)),
            "finite_nan": bool(ops.all_finite(nan)),
            "types": sorted({type(v).__name__ for v in (ops.norm(x), ops.vdot(x, y), ops.all_finite(x))}),
        }
    out["warnings"] = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    return out


def main(rank: int, world: int, port: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, y = make_data()
    xb, yb = x.chunk(world)[rank], y.chunk(world)[rank]
    result = {"rules": {name: run_rule(name, rule, hyper, xb, yb) for name, (rule, hyper) in RULES.items()},
              "ops": check_ops(rank)}
    torch.save(result, out)
    # both ranks reach the shutdown together: gloo's destroy_process_group can hang in a rank whose
    # peer has already exited (seen on CI as a rank that finished its work and never returned)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, port, out = sys.argv[1:]
    main(int(rank), int(world), port, out)
