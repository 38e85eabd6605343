"""DistributedDataParallel with 2 processes on gloo: 'local' perturbation equals each rank's own
rule step followed by averaging; 'global' equals the single-process rule on the full batch; the
ranks stay bit-identical."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import gradnorm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402

HYPER = {"sam": {"rho": 0.1}, "flooding": {"b": 1.0}}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


_RUNS: dict = {}


def run_ranks(rule, perturbation, tmp_path):
    if (rule, perturbation) in _RUNS:
        return _RUNS[rule, perturbation]
    for attempt in range(2):  # a second rendezvous, on a fresh port, if the first one hung
        outs = [tmp_path / f"try{attempt}-rank{r}.pt" for r in range(2)]
        if _launch(rule, perturbation, outs, last=attempt == 1):
            break
    _RUNS[rule, perturbation] = [torch.load(o) for o in outs]
    return _RUNS[rule, perturbation]


def _launch(rule, perturbation, outs, last):
    """Run the two ranks; True when both wrote their results. A rank that hangs is killed: if both
    results are written (the hang was in gloo's shutdown, after the work) they count; if the
    rendezvous itself never completed (no rank printed "joined"), the run is retried once on a
    fresh port; anything else fails with what each rank printed."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, str(Path(__file__).parent / "ddp_worker.py"), str(r), "2", port, rule, perturbation, str(outs[r])],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:  # no rank left behind; show what each printed
                q.kill()
            printed = [q.communicate()[0] or "" for q in procs]
            if all(o.exists() for o in outs):
                return True
            if not last and not any("joined" in o for o in printed):
                return False
            raise AssertionError("a rank timed out:\n" + "\n-----\n".join(o[-3000:] for o in printed)) from None
        assert p.returncode == 0, out
    return True


def grad_fn_for(model, x, y):
    names = [n for n, _ in model.named_parameters()]

    def grad_fn(leaves):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in leaves]
            out = torch.func.functional_call(model, dict(zip(names, leaves)), (x,))
            loss = torch.nn.functional.cross_entropy(out, y)
            return loss.detach(), list(torch.autograd.grad(loss, leaves))

    return grad_fn


def expected(rule, perturbation):
    model = ddp_worker.make_model()
    x, y = ddp_worker.make_data()
    params = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(params, lr=0.3, momentum=0.9)
    shards = list(zip(x.chunk(2), y.chunk(2)))
    for _ in range(4):
        if perturbation == "global":
            direction = gradnorm.step(params, grad_fn_for(model, x, y), rule=rule, **HYPER[rule]).grad
        else:
            per_rank = [gradnorm.step(params, grad_fn_for(model, xb, yb), rule=rule, **HYPER[rule]).grad for xb, yb in shards]
            direction = [(a + b) / 2 for a, b in zip(*per_rank)]
        for p, d in zip(params, direction):
            p.grad = d
        sgd.step()
    return params


@pytest.mark.parametrize("perturbation", ["local", "global"])
@pytest.mark.parametrize("rule", ["sam", "flooding"])
def test_ddp_policies_give_the_trajectory_they_claim(rule, perturbation, tmp_path):
    ranks = run_ranks(rule, perturbation, tmp_path)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)  # the ranks stay bit-identical
    for got, want in zip(ranks[0]["params"], expected(rule, perturbation)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_the_two_policies_differ(tmp_path):
    local = run_ranks("sam", "local", tmp_path)[0]["params"]
    glob = run_ranks("sam", "global", tmp_path)[0]["params"]
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(local, glob))
