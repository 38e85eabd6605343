"""Benchmark: gradnorm.torch.Optimizer under torch.compile, eager against a compiled model and a
compiled whole step, on an MLP (8 hidden layers of width 256, batch 128).

Three ways to run the same training step (`opt.step(closure)`, SGD with momentum as the base):

* ``eager``: nothing compiled;
* ``compiled model``: ``model = torch.compile(model)``, the optimizer step runs eagerly;
* ``compiled step``: ``step = torch.compile(lambda: opt.step(closure))`` (Dynamo traces the
  optimizer, the rule, the closure and the base update; the backward is a graph break).

The compile cost is measured in a fresh process per configuration with an empty Inductor cache, so
that "first call" is a cold compile (what a new training run pays once; a warm cache on disk
shortens it). "calls 2-3" is the rest of the warm-up (torch.optim's SGD compiles once more when its
momentum buffers appear at step 2). The steady state of the three modes of a rule is timed in one
process, interleaved (`_timing.timed_interleaved`: the median over rounds of the mean time per
step), so that drift of a shared machine affects the modes alike. ``torch`` is the same loop with plain
``torch.optim.SGD`` and no gradnorm (the floor). Prints a table; no assertion.

    python benchmarks/torch_compile.py [--threads 1] [--rules torch,sgd,sam] [--steps 50] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

MODES = ("eager", "compiled model", "compiled step")


def make(depth: int = 8, width: int = 256, batch: int = 128):
    import torch

    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))
    x = torch.randn(batch, width)
    y = torch.randint(0, 10, (batch,))
    return model, x, y


def build(rule: str, mode: str):
    """A fresh model, optimizer and zero-argument training step of `rule` run in `mode`."""
    import torch

    import gradnorm.torch as gt

    model, x, y = make()
    net = torch.compile(model) if mode == "compiled model" else model
    if rule == "torch":
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    else:
        hyper = {"sam": {"rho": 0.05}}.get(rule, {})
        opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=1e-4, momentum=0.9, foreach=True, **hyper)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    if rule == "torch":
        def step():
            loss = closure()
            opt.step()
            return loss
    else:
        def step():
            return opt.step(closure)

    return torch.compile(step) if mode == "compiled step" else step


def child_compile(rule: str, mode: str) -> dict:
    """The warm-up of one configuration, in this fresh process (an empty Inductor cache)."""
    from torch._dynamo.utils import counters

    step = build(rule, mode)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"first": times[0], "next": times[1] + times[2], "frames": counters["frames"]["total"],
            "graphs": counters["stats"]["unique_graphs"]}


def child_steady(rule: str, steps: int, repeats: int) -> dict:
    """The steady state of the three modes of `rule`, timed interleaved in this process."""
    from _timing import timed_interleaved

    fns = {mode: build(rule, mode) for mode in MODES}
    return timed_interleaved(fns, steps, repeats, warmup=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--rules", default="torch,sgd,sam")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.child:
        import warnings

        warnings.filterwarnings("ignore")
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.child[0] == "compile":
            out = child_compile(args.child[1], args.child[2])
        else:
            out = child_steady(args.child[1], args.steps, args.repeats)
        print(json.dumps(out))
        return

    here = os.path.dirname(os.path.abspath(__file__))

    def run_child(*what: str) -> dict | str:
        with tempfile.TemporaryDirectory() as cache:  # a cold compile: nothing from earlier runs
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(here), here, env.get("PYTHONPATH")]))
            cmd = [sys.executable, os.path.abspath(__file__), "--child", *what, "--steps", str(args.steps),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            return "failed: " + (run.stderr.strip().splitlines() or ["?"])[-1]
        return json.loads(run.stdout.strip().splitlines()[-1])

    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} thread(s), MLP 8 x 256, batch 128, "
          f"SGD(momentum=0.9, foreach=True); steady state: median of {args.repeats} interleaved rounds of "
          f"{args.steps} steps\n")
    print("| rule | mode | ms/step | x eager | first call (s) | calls 2-3 (s) | graphs / frames compiled |")
    print("|---|---|---|---|---|---|---|")
    for rule in args.rules.split(","):
        steady = run_child("steady", rule)
        for mode in MODES:
            warm = run_child("compile", rule, mode) if mode != "eager" else {}
            if isinstance(steady, str) or isinstance(warm, str):
                print(f"| {rule} | {mode} | {steady if isinstance(steady, str) else warm} | | | | |")
                continue
            ms, ratio = steady[mode], steady[mode] / steady["eager"]
            cost = "- | - | -"
            if warm:
                cost = f"{warm['first']:.1f} | {warm['next']:.1f} | {warm['graphs']} / {warm['frames']}"
            print(f"| {rule} | {mode} | {ms:.2f} | {ratio:.2f} | {cost} |", flush=True)


if __name__ == "__main__":
    main()
