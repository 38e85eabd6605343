"""Benchmark: gradnorm.torch.Optimizer step time per rule against its floor, and SAM against
pytorch_optimizer.SAM(foreach=True) and a hand-written SAM, on a deep narrow MLP (40 layers of width
64, batch 128) or (``--model cnn``) a small CNN with BatchNorm (benchmarks/_models.py).

The floor of a rule is (gradient evaluations per step) x (one forward-backward pass) + (one
base-optimizer update), all measured in this process; for a rule whose cost varies from step to step
(``periodic``, ``looksam``) the evaluations per step are its average, ``rule.mean_grad_evals`` ((k + 1) / k
for SAM every k steps; each timed run is many periods long). The floor of ``gr`` is one gradient
with its graph plus one Hessian-vector product along it (``closure(create_graph=True)`` and
``torch.autograd.grad`` of the gradients: the double backward, without the rule) + the update. The
hand-written SAM is the usual loop: gradient, ``p += e`` in place, second gradient, ``p -= e``, base
step (foreach ops throughout); the minimal SAM is the least a step with gradnorm's promises computes
(a copy of the weights and the exact restore from it, the fused inf/nan check and the skip decision),
without its bookkeeping. Prints a table; no assertion.

    python benchmarks/torch_step.py [--steps 200] [--repeats 5] [--device cpu] [--threads 2] [--model mlp|cnn]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _models import DESCRIPTION, torch_model
from _rules import RULES
from _timing import timed_interleaved

import gradnorm.torch as gt


def make(device: str, depth: int = 40, width: int = 64, batch: int = 128):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10)).to(device)
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "mlp":
        model, x, y = make(args.device)
    else:
        model, x, y = torch_model(args.model, args.device)
    # a model with buffers (BatchNorm): the optimizer restores them after the first pass
    with_model = {"model": model} if list(model.buffers()) else {}
    loss_fn = torch.nn.functional.cross_entropy

    def closure(create_graph=False):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    params = list(model.parameters())

    def gradient_and_hvp():  # gr's floor without the update: the gradient's graph, one double backward
        with warnings.catch_warnings():  # the .grad <-> parameter cycle: .grad is reset right below
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            closure(create_graph=True)
        grads = [p.grad for p in params]
        model.zero_grad(set_to_none=True)
        return torch.autograd.grad(grads, params, grad_outputs=[g.detach() for g in grads])

    # The update of the floor: the base optimizer on a shadow copy of the parameters holding fixed
    # gradients (the same sizes, so the same cost). On the model's own parameters it would find the
    # gradients another timed function left, or none: `gradient_and_hvp` drops them, and an SGD step
    # over parameters without gradients does nothing (it measured 0.024 ms against 0.25 ms).
    closure()
    shadow = [p.detach().clone().requires_grad_(True) for p in params]
    for s, p in zip(shadow, params):
        s.grad = p.grad.detach().clone()
    shadow_base = torch.optim.SGD(shadow, lr=1e-4, momentum=0.9, foreach=True)
    fns = {"gradient": closure, "gradient + HVP": gradient_and_hvp, "update": shadow_base.step}
    opts = {}

    def gradnorm_step(opt):
        def run():
            # the optimizers share the model: another's gradients in .grad are not this one's, and
            # step(closure) refuses gradients it did not leave there (accumulated micro-batches).
            # Dropped with a bare loop: `model.zero_grad()` walks the module tree (0.36 ms on the
            # 81-module MLP, 13% of a gradient), a cost a training loop does not have on top of
            # the closure's own zero_grad, which the floor includes.
            for p in params:
                p.grad = None
            return opt.step(closure)

        return run

    for rule, hyper in RULES:
        opts[rule] = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=1e-4, momentum=0.9, foreach=True,
                                  **with_model, **hyper)
        fns[rule] = gradnorm_step(opts[rule])
    # the same SAM step without its one device-to-host read (the skip decision): on a GPU that
    # read stalls the host until the device has caught up
    opts["sam, skip_nonfinite=False"] = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="sam", lr=1e-4,
                                                    momentum=0.9, foreach=True, skip_nonfinite=False, rho=0.05,
                                                    **with_model)
    fns["sam, skip_nonfinite=False"] = gradnorm_step(opts["sam, skip_nonfinite=False"])
    try:
        from pytorch_optimizer import SAM

        peer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-4, momentum=0.9, foreach=True)

        def peer_step():  # its step(closure) expects the gradients of the first pass in .grad
            closure()
            peer.step(closure)

        fns["peer"] = peer_step
    except ImportError:
        pass
    hand_base = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)

    def handwritten_sam():
        """The SAM step people write by hand: e = rho g / ||g|| added to the weights in place, the
        second gradient, e subtracted again (BatchNorm statistics updated by both passes)."""
        closure()
        with torch.no_grad():
            grads = [p.grad for p in params]
            scale = 0.05 / (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) + 1e-12)
            eps = torch._foreach_mul(grads, scale)
            torch._foreach_add_(params, eps)
        closure()
        with torch.no_grad():
            torch._foreach_sub_(params, eps)
        hand_base.step()

    fns["hand-written SAM"] = handwritten_sam
    minimal_base = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    saved = [torch.empty_like(p) for p in params]
    found, one = torch.zeros(1, device=params[0].device), torch.ones((), device=params[0].device)

    def minimal_sam():
        """The least a SAM step with gradnorm's promises computes, without its bookkeeping: the
        norm, a copy of the weights, the point formed in place, the second gradient, the exact
        restore from the copy, the fused inf/nan check of the direction and its skip decision."""
        closure()
        with torch.no_grad():
            grads = [p.grad for p in params]
            scale = 0.05 / (torch.stack(torch._foreach_powsum(grads, 2)).sum().sqrt() + 1e-12)
            torch._foreach_copy_(saved, params)
            torch._foreach_addcmul_(params, grads, [scale] * len(grads))
            del grads
        closure()
        with torch.no_grad():
            torch._foreach_copy_(params, saved)
            found.zero_()
            torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in params], found, one)
        if found.item() == 0:
            minimal_base.step()

    if hasattr(torch, "_foreach_powsum"):
        fns["minimal SAM"] = minimal_sam
    closure()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    t = timed_interleaved(fns, args.steps, args.repeats, finish=lambda out: sync())
    t_grad, t_update = t["gradient"], t["update"]
    rows = []
    for rule in [r for r, _ in RULES] + ["sam, skip_nonfinite=False"]:
        opt = opts[rule]
        evals, mean = opt.rule.grad_evals, opt.rule.mean_grad_evals
        label = f"{evals} grad{'s' if evals > 1 else ''}" + (" + 1 HVP" if opt.rule.needs_hvp else "")
        if mean != evals:  # varying cost: the average per step (a full step every k)
            label = f"{mean:.3g} grads avg"
        floor = mean * t_grad + t_update
        if opt.rule.needs_hvp and opt.rule.hvp_evals:
            floor = t["gradient + HVP"] + t_update
        rows.append((f"gradnorm {rule}", label, t[rule], floor))
    if "peer" in t:
        rows.append(("pytorch_optimizer.SAM(foreach=True)", "2 grads", t["peer"], 2 * t_grad + t_update))
    rows.append(("hand-written SAM (foreach)", "2 grads", t["hand-written SAM"], 2 * t_grad + t_update))
    if "minimal SAM" in t:
        rows.append(("minimal SAM (exact restore, inf check)", "2 grads", t["minimal SAM"], 2 * t_grad + t_update))

    print(f"{DESCRIPTION[args.model]}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} interleaved rounds of {args.steps} steps; "
          f"one gradient {t_grad:.3f} ms, one gradient + HVP {t['gradient + HVP']:.3f} ms, "
          f"one SGD update {t_update:.3f} ms")
    print(f"| {'step':38s} | {'cost':14s} | {'ms/step':>8s} | {'floor ms':>8s} | {'x floor':>7s} |")
    print(f"|{'-' * 40}|{'-' * 16}|{'-' * 10}|{'-' * 10}|{'-' * 9}|")
    for name, cost, t, floor in rows:
        print(f"| {name:38s} | {cost:14s} | {t:8.3f} | {floor:8.3f} | {t / floor:7.3f} |")


if __name__ == "__main__":
    main()
