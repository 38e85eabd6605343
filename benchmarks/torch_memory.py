"""Benchmark: extra peak memory of gradnorm's PyTorch steps over plain SGD-momentum, in units of P (the
parameters' bytes), on a wide MLP (16 layers of 1024 x 1024 float32, batch 4).

Each measurement runs in its own process: import everything, build the model and read the RSS
(``base``); take one step (so that gradients, momentum buffers and any buffer an optimizer keeps
between steps exist), reset the peak RSS (``/proc/self/clear_refs``), run 3 steps and read the peak
(``VmHWM``) and the RSS after them. ``peak`` is the peak minus ``base`` and ``held`` the RSS after the
steps minus ``base``, so both count the buffers kept between steps (the snapshot of the weights, the
momentum) as well as the temporaries of a step; each is reported minus the same quantity of plain
SGD-momentum, over P. The children run with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so that
every tensor of more than 64 KiB is its own mapping, returned to the system when it is freed: the RSS
is then the memory of the live tensors (with glibc's adaptive threshold, freed tensors stay in the
heap and the RSS depends on the order of the frees).

Two paths:

* ``optimizer``: ``gradnorm.torch.Optimizer(model.parameters(), torch.optim.SGD, rule=...)`` with
  ``step(closure)``, against ``torch.optim.SGD`` with the closure's backward (the closure zeroes the
  gradients with ``set_to_none=False``, as the baseline wants), and ``pytorch_optimizer.SAM``.
* ``functional``: ``gradnorm.torch.step(params, loss_fn, rule=...)`` with ``torch.func.functional_call``,
  the direction handed to ``torch.optim.SGD`` over the same tensors, against the same loop with
  ``torch.func.grad_and_value`` (``.grad`` is set to None before each step in both).

The minimum is what the math needs (ALGORITHMS.md, section 0): SAM 1 (the perturbation, or the saved
weights), GNP 2, F-GR 2, GAM 4. Prints a table; no assertion. Linux only (``/proc``).

    python benchmarks/torch_memory.py [--rules sam,gnp] [--paths optimizer,functional] [--width 1024] [--depth 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MINIMUM = {"sgd": 0, "sam": 1, "gnp": 2, "fd_gr": 2, "gam": 4, "gr": 2, "flooding": 0, "coherent": 0}


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(rule: str, path: str, width: int, depth: int, batch: int) -> None:
    import torch

    import gradnorm.torch as gt

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _rules import RULES

    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers)
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hyper = dict(RULES).get(rule, {})

    def closure(create_graph=False):
        model.zero_grad(set_to_none=False)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    if path == "functional":
        params = {k: v.detach() for k, v in model.named_parameters()}
        opt = torch.optim.SGD(list(params.values()), lr=1e-4, momentum=0.9)

        def loss_fn(p, xb, yb):
            return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (xb,)), yb)

        state = [None]
        if rule == "baseline":
            grad_fn = torch.func.grad_and_value(loss_fn)

            def step():
                opt.zero_grad(set_to_none=True)
                grads, _ = grad_fn(params, x, y)
                for k, p in params.items():
                    p.grad = grads[k]
                del grads
                opt.step()
        else:
            def step():
                opt.zero_grad(set_to_none=True)
                res = gt.step(params, loss_fn, x, y, rule=rule, state=state[0], **hyper)
                state[0] = res.state
                for k, p in params.items():
                    p.grad = res.grad[k]
                del res
                opt.step()
    elif rule == "baseline":
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def step():
            closure()
            opt.step()
    elif rule == "pytorch_optimizer.SAM":
        from pytorch_optimizer import SAM

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-4, momentum=0.9)

        def step():
            closure()
            opt.step(closure)
    else:
        opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=1e-4, momentum=0.9, **hyper)

        def step():
            opt.step(closure)

    base = _status("VmRSS")
    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(3):
        step()
    peak, held = _status("VmHWM"), _status("VmRSS")
    print(json.dumps({"peak": (peak - base) / nbytes, "held": (held - base) / nbytes, "P_MB": nbytes / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", default="sam,gnp,fd_gr,gam")
    parser.add_argument("--paths", default="optimizer,functional")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default="optimizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.width, args.depth, args.batch)
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}

    def run(rule: str, path: str) -> dict[str, float]:
        cmd = [sys.executable, __file__, "--child", rule, "--path", path, "--width", str(args.width),
               "--depth", str(args.depth), "--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    for path in args.paths.split(","):
        base = run("baseline", path)
        names = args.rules.split(",")
        if path == "optimizer":
            try:
                import pytorch_optimizer  # noqa: F401

                names.append("pytorch_optimizer.SAM")
            except ImportError:
                pass
        for rule in names:
            got = run(rule, path)
            minimum = MINIMUM.get("sam" if rule == "pytorch_optimizer.SAM" else rule)
            label = rule if path == "optimizer" or rule.startswith("pytorch") else f"{rule} (gt.step)"
            rows.append((label, got["peak"] - base["peak"], got["held"] - base["held"], minimum))
    print(f"extra memory over SGD-momentum, units of P ({args.depth} x {args.width}^2 float32, batch {args.batch}; "
          f"P = {base['P_MB']:.0f} MiB)")
    print(f"{'step':<24}{'peak':>8}{'held':>8}{'minimum':>9}")
    for label, peak, held, minimum in rows:
        print(f"{label:<24}{peak:>8.2f}{held:>8.2f}{minimum if minimum is not None else '':>9}")


if __name__ == "__main__":
    main()
