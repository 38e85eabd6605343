"""Benchmark: the price of exact GR, every Hessian-vector-product route of every adapter, in units
of one gradient and of one fd_gr step, on the deep narrow MLP and on a small CNN with BatchNorm.

Exact GR is d = g + gamma H g: one gradient and one HVP along that gradient. F-GR (``fd_gr``)
replaces H g by a finite difference of two gradients. In matrix products a gradient costs 3 units
per layer (forward 1, backward 2), fd_gr 6 and exact GR 9 when the HVP reuses the gradient's pass
(reverse-over-reverse on the recorded graph, or ``jax.linearize``): 1.5 x fd_gr (Karakida et al.,
ICML 2023, count 9L against 6L). A forward-over-reverse HVP that runs a new pass costs 3 + 9 = 12
units, 2 x fd_gr. The routes timed, per framework (each step returns the direction only: no base
optimizer update):

* PyTorch (eager): the ``gradnorm.torch.Optimizer`` closure's double backward (reverse over reverse
  on the graph of ``closure(create_graph=True)``, the only route a closure allows); forward over
  reverse in eager autograd (the closure's gradient, then one more forward-backward through
  ``torch.func.functional_call`` with ``torch.autograd.forward_ad`` dual parameters: what the
  Optimizer could do if it called the model itself); ``gradnorm.torch.step`` with
  ``hvp="reverse_over_reverse"`` (``torch.func.vjp`` of the gradient, its pullback kept from the
  gradient pass) and ``hvp="forward_over_reverse"`` (``torch.func.jvp`` of ``torch.func.grad``).
* JAX (each route one ``jax.jit`` program): ``gradnorm.jax.step`` (its default route); by hand,
  the gradient then ``jax.jvp`` of ``jax.grad`` (jvp of grad), ``jax.vjp`` of ``jax.grad`` (grad
  of grad, the gradient from the same pass) and ``jax.linearize`` of ``jax.grad`` (the gradient
  from the linearization's primal pass).
* TensorFlow (each route one ``tf.function``): ``gradnorm.tf.step`` with
  ``hvp="reverse_over_reverse"`` (an outer ``GradientTape`` over the gradient's tape) and
  ``hvp="forward_over_reverse"`` (a new pass under ``tf.autodiff.ForwardAccumulator``).

Every framework runs in its own process; within it all routes and both models' references are
timed interleaved (`_timing.timed_interleaved`: the median over rounds of the mean time per
call), so that drift of a shared machine affects them alike. "x gradient" divides by one plain
gradient of the same framework (PyTorch: the closure's forward-backward); "x fd_gr" by the fd_gr
step of the same API (``Optimizer``, ``gradnorm.torch.step``, ``gradnorm.jax.step``,
``gradnorm.tf.step``; the hand-written JAX routes by ``gradnorm.jax.step``'s). Prints markdown
tables; no assertion.

    python benchmarks/hvp_routes.py [--frameworks torch,jax,tf] [--models mlp,cnn,cnn_nobn] [--steps 5]
                                    [--repeats 5] [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

GAMMA = 0.05
FD_GR = {"gamma": GAMMA, "eps": 0.01}
FRAMEWORKS = ("torch", "jax", "tf")


# -- PyTorch -------------------------------------------------------------------------------------
def torch_routes(model_name: str, threads: int) -> tuple[dict, dict]:
    """``(fns, meta)``: the zero-argument functions to time and, per route, its description and the
    names of its references."""
    import torch
    import torch.autograd.forward_ad as fwAD

    import gradnorm.torch as gt
    from _models import torch_functional_loss, torch_model

    if threads:
        torch.set_num_threads(threads)
    model, x, y = torch_model(model_name)
    loss_of = torch.nn.functional.cross_entropy
    names = [n for n, _ in model.named_parameters()]
    plist = list(model.parameters())

    def closure(create_graph: bool = False) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        loss = loss_of(model(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    def optimizer_step(rule: str, **hyper: float):
        opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.0, model=model, **hyper)

        def run() -> torch.Tensor:
            for p in plist:  # another route's gradients (a bare loop: model.zero_grad walks the modules)
                p.grad = None
            return opt.step(closure)

        return run

    buffers = dict(model.named_buffers())

    def eager_forward_over_reverse() -> list[torch.Tensor]:
        """g from the closure; H g from one more forward-backward with dual parameters (forward-mode
        tangents through the backward pass), then d = g + gamma H g."""
        closure()
        g = [p.grad for p in plist]
        model.zero_grad(set_to_none=True)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p.detach(), t).requires_grad_() for p, t in zip(plist, g)]
            state = dict(zip(names, duals))
            state.update({k: b.clone() for k, b in buffers.items()})
            loss = loss_of(torch.func.functional_call(model, state, (x,)), y)
            grads = torch.autograd.grad(loss, duals)
            hv = [fwAD.unpack_dual(gi).tangent for gi in grads]
        return torch._foreach_add(g, hv, alpha=GAMMA)

    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = torch_functional_loss(model)

    def functional(rule: str, **hyper: object):
        return lambda: gt.step(params, loss_fn, x, y, rule=rule, **hyper).grad

    fns = {
        "gradient": closure,
        "Optimizer fd_gr": optimizer_step("fd_gr", **FD_GR),
        "Optimizer gr": optimizer_step("gr", gamma=GAMMA),
        "eager forward-over-reverse": eager_forward_over_reverse,
        "gt.step fd_gr": functional("fd_gr", **FD_GR),
        "gt.step gr reverse_over_reverse": functional("gr", gamma=GAMMA, hvp="reverse_over_reverse"),
        "gt.step gr forward_over_reverse": functional("gr", gamma=GAMMA, hvp="forward_over_reverse"),
    }
    meta = {
        "gradient": ("one gradient (the closure's forward-backward)", None),
        "Optimizer fd_gr": ("`gt.Optimizer` fd_gr: 2 gradients", "Optimizer fd_gr"),
        "Optimizer gr": ("`gt.Optimizer` gr: double backward through `closure(create_graph=True)` "
                         "(reverse over reverse, gradient pass reused)", "Optimizer fd_gr"),
        "eager forward-over-reverse": ("closure gradient + forward-over-reverse pass with `forward_ad` dual "
                                       "parameters (eager; what the Optimizer could do with the model)",
                                       "Optimizer fd_gr"),
        "gt.step fd_gr": ("`gt.step` fd_gr: 2 `torch.func` gradients", "gt.step fd_gr"),
        "gt.step gr reverse_over_reverse": ("`gt.step` gr, `hvp=\"reverse_over_reverse\"`: `torch.func.vjp` "
                                            "of the gradient, pullback kept from the gradient pass",
                                            "gt.step fd_gr"),
        "gt.step gr forward_over_reverse": ("`gt.step` gr, `hvp=\"forward_over_reverse\"`: `torch.func.jvp` "
                                            "of `torch.func.grad` (a new pass)", "gt.step fd_gr"),
    }
    info = f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    return fns, {"meta": meta, "info": info, "flops": {name: torch_flops(fn) for name, fn in fns.items()}}


def torch_flops(fn) -> float | None:
    """The matrix-multiplication and convolution FLOPs of one call (``torch.utils.flop_counter``,
    which counts nothing else: elementwise work is not in it)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except Exception:  # a route the counter cannot follow
        return None
    return float(counter.get_total_flops())


# -- JAX -----------------------------------------------------------------------------------------
def jax_routes(model_name: str, threads: int) -> tuple[dict, dict]:
    import jax

    import gradnorm.jax as gj
    from _models import jax_model

    params, x, y, loss_fn = jax_model(model_name)

    def loss(p):
        return loss_fn(p, x, y)

    grad = jax.grad(loss)

    def combine(g, hv):
        return jax.tree_util.tree_map(lambda a, b: a + GAMMA * b, g, hv)

    def jvp_of_grad(p):
        g = grad(p)
        return combine(g, jax.jvp(grad, (p,), (g,))[1])

    def vjp_of_grad(p):
        g, pullback = jax.vjp(grad, p)
        return combine(g, pullback(g)[0])

    def linearize(p):
        g, f_jvp = jax.linearize(grad, p)
        return combine(g, f_jvp(g))

    def step(rule: str, **hyper):
        return lambda p: gj.step(p, loss_fn, x, y, rule=rule, **hyper).grad

    programs = {
        "gradient": grad,
        "gj.step fd_gr": step("fd_gr", **FD_GR),
        "gj.step gr": step("gr", gamma=GAMMA),
        "jvp of grad": jvp_of_grad,
        "vjp of grad": vjp_of_grad,
        "linearize": linearize,
    }
    fns, flops = {}, {}
    for name, program in programs.items():
        compiled = jax.jit(program)
        fns[name] = (lambda c=compiled: c(params))
        cost = compiled.lower(params).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops[name] = float(cost["flops"]) if cost and "flops" in cost else None
    meta = {
        "gradient": ("one gradient, `jax.grad`", None),
        "gj.step fd_gr": ("`gj.step` fd_gr: 2 gradients", "gj.step fd_gr"),
        "gj.step gr": ("`gj.step` gr (the adapter's route)", "gj.step fd_gr"),
        "jvp of grad": ("by hand: `jax.grad`, then `jax.jvp(jax.grad(loss), (p,), (g,))`", "gj.step fd_gr"),
        "vjp of grad": ("by hand: `g, pullback = jax.vjp(jax.grad(loss), p)`, `pullback(g)` "
                        "(grad of grad, reverse over reverse)", "gj.step fd_gr"),
        "linearize": ("by hand: `g, f = jax.linearize(jax.grad(loss), p)`, `f(g)` (forward over "
                      "reverse, one primal pass)", "gj.step fd_gr"),
    }
    xla = "1 XLA thread" if threads == 1 else "XLA's default threads"
    return fns, {"meta": meta, "info": f"jax {jax.__version__} on {jax.devices()[0].platform}, {xla}",
                 "finish": jax.block_until_ready, "flops": flops}


# -- TensorFlow ----------------------------------------------------------------------------------
def tf_routes(model_name: str, threads: int) -> tuple[dict, dict]:
    import tensorflow as tf

    if threads and not getattr(tf_routes, "_threads_set", False):
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        tf_routes._threads_set = True  # type: ignore[attr-defined]
    import gradnorm.tf as gt
    from _models import tf_model

    model, x, y, loss_fn = tf_model(model_name)
    variables = model.trainable_variables
    stats = model.non_trainable_variables

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        return tape.gradient(loss, variables)

    def step(rule: str, **hyper):
        @tf.function
        def run():
            return gt.step(variables, loss_fn, rule=rule, moving_stats=stats, **hyper).grad

        return run

    fns = {
        "gradient": gradient,
        "gt.step fd_gr": step("fd_gr", **FD_GR),
        "gt.step gr reverse_over_reverse": step("gr", gamma=GAMMA, hvp="reverse_over_reverse"),
        "gt.step gr forward_over_reverse": step("gr", gamma=GAMMA, hvp="forward_over_reverse"),
    }
    meta = {
        "gradient": ("one gradient, `tf.GradientTape`", None),
        "gt.step fd_gr": ("`gt.step` fd_gr: 2 gradients", "gt.step fd_gr"),
        "gt.step gr reverse_over_reverse": ("`gt.step` gr, `hvp=\"reverse_over_reverse\"`: outer tape over the "
                                            "gradient's pass (reused)", "gt.step fd_gr"),
        "gt.step gr forward_over_reverse": ("`gt.step` gr, `hvp=\"forward_over_reverse\"`: a new pass under "
                                            "`tf.autodiff.ForwardAccumulator`", "gt.step fd_gr"),
    }
    threads_now = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    return fns, {"meta": meta, "info": f"tensorflow {tf.__version__}, {threads_now} intra-op thread(s)",
                 "finish": lambda out: [t.numpy() for t in out] if isinstance(out, (list, tuple)) else out}


ROUTES = {"torch": torch_routes, "jax": jax_routes, "tf": tf_routes}
LABEL = {"torch": "PyTorch", "jax": "JAX", "tf": "TensorFlow"}


def child(framework: str, models: list[str], steps: int, repeats: int, threads: int) -> dict:
    """Times every route of `framework` on every model, interleaved, in this process."""
    import warnings

    warnings.filterwarnings("ignore")
    from _timing import timed_interleaved

    fns, metas, flops, info, finish = {}, {}, {}, "", (lambda out: None)
    for model in models:
        got, extra = ROUTES[framework](model, threads)
        for name, fn in got.items():
            fns[(model, name)] = fn
        metas[model] = extra["meta"]
        flops[model] = extra.get("flops", {})
        info = extra["info"]
        finish = extra.get("finish", finish)
    keyed = {f"{m}|{n}": fn for (m, n), fn in fns.items()}
    times = timed_interleaved(keyed, steps, repeats, warmup=2, finish=finish)
    out = {"info": info, "models": {}}
    for model in models:
        rows = []
        for name, (what, ref) in metas[model].items():
            ms = times[f"{model}|{name}"]
            mine, theirs = flops[model].get(name), flops[model].get(ref)
            rows.append({"route": name, "what": what, "ms": ms, "x_gradient": ms / times[f"{model}|gradient"],
                         "x_fd_gr": ms / times[f"{model}|{ref}"] if ref else None,
                         "flops_x_fd_gr": mine / theirs if ref and mine and theirs else None})
        out["models"][model] = rows
    return out


def table(framework: str, result: dict) -> str:
    from _models import DESCRIPTION

    lines = []
    for model, rows in result["models"].items():
        lines.append(f"{LABEL[framework]}, {DESCRIPTION[model]}; {result['info']}")
        lines.append("")
        lines.append("| route | how | ms/step | x gradient | x fd_gr | FLOPs x fd_gr |")
        lines.append("|---|---|---|---|---|---|")
        for r in rows:
            fd = f"{r['x_fd_gr']:.2f}" if r["x_fd_gr"] is not None else "-"
            fl = f"{r['flops_x_fd_gr']:.2f}" if r.get("flops_x_fd_gr") is not None else "-"
            lines.append(f"| {r['route']} | {r['what']} | {r['ms']:.2f} | {r['x_gradient']:.2f} | {fd} | {fl} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="threads per framework (0: its default)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models.split(",")
    if args.child:
        if args.child == "jax" and args.threads == 1:  # must be set before jax starts
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        print(json.dumps(child(args.child, models, args.steps, args.repeats, args.threads)))
        return
    results = {}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(HERE), HERE, env.get("PYTHONPATH")]))
    for framework in args.frameworks.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", framework, "--models", args.models,
               "--steps", str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            print(f"{LABEL[framework]}: failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}\n", flush=True)
            continue
        results[framework] = json.loads(run.stdout.strip().splitlines()[-1])
        print(table(framework, results[framework]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
