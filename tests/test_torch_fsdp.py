"""FSDP2 (`fully_shard`, DTensor parameters) with 2 processes on gloo: every rule equals one process
training the same model on the global batch (under FSDP2 every pass is global: each backward
reduce-scatters, i.e. averages, the gradient over the ranks), also with `step(closure, loss=)`
(the given loss is averaged over the ranks too); the weights are restored bit for bit
before every base update and after an exception in an extra pass; the norms are global; no step
warns. One spawn of the two ranks runs every rule."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError:  # pragma: no cover - torch < 2.6
    pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available", allow_module_level=True)

import gradnorm.torch as gt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker  # noqa: E402

TOL = 1e-12


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_ranks(tmp_path) -> list[dict]:
    port = free_port()
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    worker = str(Path(__file__).parent / "fsdp_worker.py")
    procs = [
        subprocess.Popen([sys.executable, worker, str(r), "2", port, str(outs[r])],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:  # pragma: no cover - a hang (a collective one rank missed)
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, out
    return [torch.load(o, weights_only=False) for o in outs]


def one_process(rule: str, hyper: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
    """The same model on the global batch in one process: parameters after the steps and after one
    more, and the losses."""
    model = fsdp_worker.make_model()
    x, y = fsdp_worker.make_data()
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, **fsdp_worker.BASE, **hyper)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(fsdp_worker.STEPS)]
    after_steps = [p.detach().clone() for p in model.parameters()]
    losses.append(float(opt.step(closure)))
    return after_steps, [p.detach().clone() for p in model.parameters()], losses


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((u - v).abs().max()) for u, v in zip(a, b))


def test_every_rule_under_fully_shard_equals_one_process_on_the_global_batch(tmp_path):
    """One test for the one spawn (pytest-xdist would give separate tests each their own)."""
    ranks = run_ranks(tmp_path)
    check_reductions(ranks)
    problems, diffs = [], {}
    for name, (rule, hyper) in fsdp_worker.RULES.items():
        want, want_after, want_losses = one_process(rule, hyper)
        for rank, result in enumerate(ranks):
            got = result["rules"][name]
            d = max(max_diff(got["params"], want), max_diff(got["params_after"], want_after))
            diffs[name] = max(diffs.get(name, 0.0), d)
            where = f"{name}, rank {rank}"
            if d > TOL:
                problems.append(f"{where}: parameters differ from one process on the global batch by {d:.3g}")
            loss_diff = max(abs(a - b) for a, b in zip(got["losses"], want_losses))
            if loss_diff > TOL:
                problems.append(f"{where}: losses differ by {loss_diff:.3g} (the loss must be the global one)")
            if len(got["restored"]) != fsdp_worker.STEPS + 1 or not all(got["restored"]):
                problems.append(f"{where}: weights not restored bit for bit before the base update: {got['restored']}")
            if (rule in fsdp_worker.ONE_PASS) == bool(got["moved"]) or not all(got["moved"]):
                problems.append(f"{where}: the extra passes did not all run at moved weights: {got['moved']}")
            if rule not in fsdp_worker.ONE_PASS and not (got["raised"] and got["restored_after_exception"]):
                problems.append(f"{where}: the exception in the extra pass did not propagate ({got['raised']}) "
                                f"or the weights were not restored bit for bit ({got['restored_after_exception']})")
            if got["warnings"]:
                problems.append(f"{where}: warnings during the steps: {got['warnings']}")
        for a, b in zip(ranks[0]["rules"][name]["params_after"], ranks[1]["rules"][name]["params_after"]):
            if not torch.equal(a, b):
                problems.append(f"{name}: the ranks' full parameters differ")
    print("max |FSDP2 - one process| per rule:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert not problems, "\n".join(problems)


def check_reductions(ranks: list[dict]) -> None:
    """`TorchForeachOps` on DTensor lists: the norm is the full parameters' norm on every rank (not
    one shard's), a NaN in one rank's shard is seen by all, the results are plain 0-d tensors."""
    full, full_y = ranks[0]["ops"]["full"], ranks[0]["ops"]["full_y"]
    norm = torch.sqrt(sum((a * a).sum() for a in full))
    vdot = sum((a * b).sum() for a, b in zip(full, full_y))
    for rank, result in enumerate(ranks):
        ops = result["ops"]
        assert ops["types"] == ["Tensor"], rank  # plain 0-d tensors, not DTensors
        torch.testing.assert_close(ops["norm"], norm, rtol=1e-14, atol=0)  # the full parameters' norm
        torch.testing.assert_close(ops["vdot"], vdot, rtol=1e-14, atol=1e-15)
        assert ops["finite"] is True
        assert ops["finite_nan"] is False, rank  # a NaN in rank 1's shard is seen on rank 0 too
        assert not ops["warnings"], ops["warnings"]
    local_norm = torch.sqrt(sum((a.chunk(2)[0] ** 2).sum() for a in full))
    assert abs(float(ranks[0]["ops"]["norm"]) - float(local_norm)) > 1e-3  # not the norm of one shard
