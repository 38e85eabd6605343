"""gradnorm's main demonstration: every rule on scikit-learn's handwritten digits.

A one-hidden-layer MLP (64 -> 32 tanh -> 10 softmax, cross-entropy) in pure NumPy float64,
with a hand-written gradient (backprop) and a hand-written exact Hessian-vector product
(Pearlmutter's R-operator, i.e. forward-over-reverse by hand), trained with minibatch
SGD + heavy-ball momentum. At every step ``gradnorm.step`` turns the plain gradient into the
rule's direction and the momentum optimizer applies ``res.grad``; nothing else changes between
rules: the same data split, initial weights and minibatch order (per seed), the same base
optimizer and learning rate.

The data is ``sklearn.datasets.load_digits`` (1797 8x8 images, bundled with scikit-learn, no
download). A small stratified training set (35% by default) leaves generalization differences
room to show. Prints a table, writes it to ``<out>/digits_demo.md`` and plots the learning curves
to ``<out>/digits_demo.png``.

Run::

    python examples/digits_demo.py              # full run (under a minute on 2 CPU cores)
    python examples/digits_demo.py --quick      # a few seconds, for tests
    python examples/digits_demo.py --epochs 100 --seeds 5 --out /tmp/results

Requires numpy, scikit-learn and matplotlib (``pip install "gradnorm[examples]"``); ``rich``
is used for the console table when installed.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import gradnorm

# ----------------------------------------------------------------------------------------
# The rules compared, with their hyperparameters. Chosen once, from the papers' usual values
# or as a sensible scale for this problem; not tuned on the test set.

RULES: list[tuple[str, str, dict[str, Any]]] = [
    # (label, rule name, hyperparameters)
    ("sgd", "sgd", {}),
    ("sam", "sam", {"rho": 0.05}),
    ("gnp", "gnp", {"r": 0.05, "alpha": 0.8}),
    ("gr", "gr", {"gamma": 0.05}),
    ("fd_gr", "fd_gr", {"gamma": 0.05, "eps": 0.01, "difference": "forward"}),
    ("gam", "gam", {}),  # the authors' code defaults
    ("flooding", "flooding", {"b": 0.05}),
    # a strong L2 term, gated: on while it turns the direction by less than ~45 degrees
    ("coherent", "coherent", {"lam": 0.1, "penalty": "l2", "threshold": 0.7}),
    # the same strong L2 term with the gate always open (threshold -1): what the gate prevents
    ("coherent, always on", "coherent", {"lam": 0.1, "penalty": "l2", "threshold": -1.0}),
]

SIZES = (64, 32, 10)


# ----------------------------------------------------------------------------------------
# The model: params = {"W1": (d_in, d_h), "b1": (d_h,), "W2": (d_h, d_out), "b2": (d_out,)}


def init_params(rng: np.random.Generator, sizes: tuple[int, int, int] = SIZES) -> dict[str, np.ndarray]:
    """Glorot-style normal initial weights, zero biases (float64)."""
    d_in, d_h, d_out = sizes
    return {
        "W1": rng.normal(0.0, 1.0 / math.sqrt(d_in), size=(d_in, d_h)),
        "b1": np.zeros(d_h),
        "W2": rng.normal(0.0, 1.0 / math.sqrt(d_h), size=(d_h, d_out)),
        "b2": np.zeros(d_out),
    }


def _forward(params: dict[str, np.ndarray], x: np.ndarray):
    h = np.tanh(x @ params["W1"] + params["b1"])
    z = h @ params["W2"] + params["b2"]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    logp = z - np.log(e.sum(axis=1, keepdims=True))
    return h, p, logp


def loss(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of the integer labels ``y``."""
    _, _, logp = _forward(params, x)
    return float(-logp[np.arange(len(y)), y].mean())


def accuracy(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    _, p, _ = _forward(params, x)
    return float((p.argmax(axis=1) == y).mean())


def loss_and_grad(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """``(loss, grads)`` by hand-written backprop; ``grads`` has the structure of ``params``."""
    n = len(y)
    h, p, logp = _forward(params, x)
    value = -logp[np.arange(n), y].mean()
    dz2 = p.copy()
    dz2[np.arange(n), y] -= 1.0
    dz2 /= n
    dh = dz2 @ params["W2"].T
    dz1 = dh * (1.0 - h * h)
    grads = {"W1": x.T @ dz1, "b1": dz1.sum(axis=0), "W2": h.T @ dz2, "b2": dz2.sum(axis=0)}
    return value, grads


def hvp(params: dict[str, np.ndarray], v: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """The exact Hessian of the mean cross-entropy applied to ``v`` (a tree like ``params``).

    Pearlmutter's R-operator: every quantity of the forward and backward pass is
    differentiated along ``v`` (``r_*`` is the directional derivative of ``*``), which is
    forward-mode differentiation of the backprop above, written out by hand.
    """
    n = len(y)
    h, p, _ = _forward(params, x)
    w2 = params["W2"]
    # forward pass and its R-derivative
    s = 1.0 - h * h  # tanh'
    r_z1 = x @ v["W1"] + v["b1"]
    r_h = s * r_z1
    r_z2 = r_h @ w2 + h @ v["W2"] + v["b2"]
    r_p = p * (r_z2 - (p * r_z2).sum(axis=1, keepdims=True))  # softmax Jacobian-vector product
    # backward pass and its R-derivative
    dz2 = p.copy()
    dz2[np.arange(n), y] -= 1.0
    dz2 /= n
    r_dz2 = r_p / n
    dh = dz2 @ w2.T
    r_dh = r_dz2 @ w2.T + dz2 @ v["W2"].T
    r_dz1 = r_dh * s - 2.0 * dh * h * r_h  # d(1 - h^2) = -2 h r_h
    return {
        "W1": x.T @ r_dz1,
        "b1": r_dz1.sum(axis=0),
        "W2": r_h.T @ dz2 + h.T @ r_dz2,
        "b2": r_dz2.sum(axis=0),
    }


# ----------------------------------------------------------------------------------------
# Data


def load_data(train_fraction: float, split_seed: int = 0):
    """Digits scaled to [0, 1]; a stratified train/test split (fixed by ``split_seed``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float64) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, train_size=train_fraction, stratify=y, random_state=split_seed
    )
    return x_tr, y_tr, x_te, y_te


# ----------------------------------------------------------------------------------------
# Training


@dataclass
class Run:
    """One (rule, seed) training run."""

    label: str
    seed: int
    evals: list[float] = field(default_factory=list)  # cumulative oracle calls at each epoch end
    train_loss: list[float] = field(default_factory=list)  # full training set, per epoch
    test_acc: list[float] = field(default_factory=list)  # per epoch
    step_time: float = 0.0  # seconds in steps: gradnorm.step (with its oracle calls) + the momentum update
    oracle_time: float = 0.0  # seconds of step_time spent inside grad_fn / hvp_fn
    steps: int = 0
    grad_evals: int = 0  # per step, as reported in info
    hvp_evals: int = 0  # per step, as reported in info
    rel_change: list[float] = field(default_factory=list)  # ||d - g|| / ||g|| per step
    extra: dict[str, float] = field(default_factory=dict)


def _norm(tree: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.vdot(v, v)) for v in tree.values()))


def train(
    label: str,
    rule: gradnorm.Rule,
    seed: int,
    data,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
) -> Run:
    """SGD with heavy-ball momentum on ``res.grad`` of ``gradnorm.step`` with ``rule``."""
    x_tr, y_tr, x_te, y_te = data
    params = init_params(np.random.default_rng(seed))  # same initial weights for every rule
    order_rng = np.random.default_rng(10_000 + seed)  # same minibatch order for every rule
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    state = None
    run = Run(label, seed)
    evals = 0
    clock = [0.0]
    gates: list[float] = []
    signs: list[float] = []

    for _ in range(epochs):
        perm = order_rng.permutation(len(y_tr))
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = x_tr[idx], y_tr[idx]

            def grad_fn(p, xb=xb, yb=yb):
                t = time.perf_counter()
                out = loss_and_grad(p, xb, yb)
                clock[0] += time.perf_counter() - t
                return out

            def hvp_fn(p, v, xb=xb, yb=yb):
                t = time.perf_counter()
                out = hvp(p, v, xb, yb)
                clock[0] += time.perf_counter() - t
                return out

            t0 = time.perf_counter()
            res = gradnorm.step(params, grad_fn, rule=rule, state=state, hvp_fn=hvp_fn)
            state = res.state
            before = params
            params = {}
            for k in before:  # heavy-ball momentum, into new arrays
                velocity[k] = momentum * velocity[k] + res.grad[k]
                params[k] = before[k] - lr * velocity[k]
            run.step_time += time.perf_counter() - t0
            run.steps += 1

            info = res.info
            run.grad_evals, run.hvp_evals = info["grad_evals"], info["hvp_evals"]
            evals += info["grad_evals"] + info["hvp_evals"]
            # diagnostics, outside the timed region: how far the rule turned the gradient
            g_norm = float(info["grad_norm"])
            _, g = loss_and_grad(before, xb, yb)
            run.rel_change.append(_norm({k: res.grad[k] - g[k] for k in g}) / max(g_norm, 1e-300))
            if "gate" in info:
                gates.append(float(info["gate"]))
            if "flood_sign" in info:
                signs.append(float(info["flood_sign"]))
        run.evals.append(evals)
        run.train_loss.append(loss(params, x_tr, y_tr))
        run.test_acc.append(accuracy(params, x_te, y_te))
    run.oracle_time = clock[0]
    if gates:
        run.extra["gate open (fraction of steps)"] = float(np.mean(gates))
        run.extra["last step with the gate open"] = float(np.max(np.nonzero(gates)[0]) + 1) if any(gates) else 0.0
    if signs:
        run.extra["ascent steps (fraction)"] = float(np.mean(np.asarray(signs) < 0))
    return run


# ----------------------------------------------------------------------------------------
# Reporting


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else 0.0)


def summarize(runs: dict[str, list[Run]], hypers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per rule: hyperparameters, final train loss, test accuracy, cost, time."""
    rows = []
    for label, rs in runs.items():
        steps = max(sum(r.steps for r in rs), 1)
        extra = {key: float(np.mean([r.extra[key] for r in rs])) for key in rs[0].extra}
        rows.append(
            {
                "rule": label,
                "hyper": ", ".join(f"{k}={v}" for k, v in hypers[label].items()) or "-",
                "train_loss": _mean_std([r.train_loss[-1] for r in rs]),
                "test_acc": _mean_std([r.test_acc[-1] for r in rs]),
                "grad_evals": rs[0].grad_evals,
                "hvp_evals": rs[0].hvp_evals,
                "ms_per_step": sum(r.step_time for r in rs) / steps * 1e3,
                "oracle_ms_per_step": sum(r.oracle_time for r in rs) / steps * 1e3,
                "rel_change": float(np.mean([np.mean(r.rel_change) for r in rs])),
                "extra": extra,
            }
        )
    base = next((r["ms_per_step"] for r in rows if r["rule"] == "sgd"), float("nan"))
    for row in rows:
        row["ratio"] = row["ms_per_step"] / base
    return rows


HEADERS = [
    "rule",
    "hyperparameters",
    "final train loss",
    "test accuracy",
    "grad evals / step",
    "ms / step",
    "x sgd",
    "ms in grad_fn/hvp_fn",
    "‖d−g‖/‖g‖",
]


def _cells(row: dict[str, Any]) -> list[str]:
    lm, ls = row["train_loss"]
    am, as_ = row["test_acc"]
    evals = str(row["grad_evals"]) + (f" + {row['hvp_evals']} HVP" if row["hvp_evals"] else "")
    return [
        row["rule"],
        row["hyper"],
        f"{lm:.4f} ± {ls:.4f}",
        f"{am:.4f} ± {as_:.4f}",
        evals,
        f"{row['ms_per_step']:.3f}",
        f"{row['ratio']:.2f}",
        f"{row['oracle_ms_per_step']:.3f}",
        f"{row['rel_change']:.3f}",
    ]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        cells = [_cells(r) for r in rows]
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADERS)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)))
        print("  ".join("-" * w for w in widths))
        for c in cells:
            print("  ".join(x.ljust(w) for x, w in zip(c, widths)))
        return
    table = Table(title=title)
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i < 2 else "right", no_wrap=i < 2)
    for r in rows:
        table.add_row(*_cells(r))
    Console(width=200).print(table)


def plot(runs: dict[str, list[Run]], path: Path) -> None:
    """Test accuracy and train loss (means over seeds) against epochs and against oracle calls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5), sharey="row")
    colors = plt.get_cmap("tab10")
    finals = []
    for i, (label, rs) in enumerate(runs.items()):
        epochs = np.arange(1, len(rs[0].test_acc) + 1)
        evals = np.asarray(rs[0].evals)
        acc = np.mean([r.test_acc for r in rs], axis=0)
        tl = np.mean([r.train_loss for r in rs], axis=0)
        finals.append(acc[-1])
        style = {"color": colors(i % 10), "label": label, "lw": 1.5, "ls": "-" if i < 10 else "--"}
        axes[0, 0].plot(epochs, acc, **style)
        axes[0, 1].plot(evals, acc, **style)
        axes[1, 0].semilogy(epochs, tl, **style)
        axes[1, 1].semilogy(evals, tl, **style)
    axes[0, 0].set_ylabel("test accuracy")
    axes[1, 0].set_ylabel("train loss (full training set)")
    axes[1, 0].set_xlabel("epoch")
    axes[1, 1].set_xlabel("oracle calls (gradient evaluations + HVPs)")
    axes[0, 0].set_ylim(min(min(finals) - 0.03, 0.9), 1.0)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 1].legend(loc="lower right", fontsize=9)
    n_seeds = len(next(iter(runs.values())))
    fig.suptitle(f"gradnorm rules on sklearn digits: MLP 64-32-10, SGD+momentum, mean of {n_seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------


def _single_threaded_blas():
    """One BLAS thread: the matrices are tiny, and a multi-threaded BLAS on a busy machine spins
    its threads for far longer than the products take (threadpoolctl comes with scikit-learn)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Every gradnorm rule on scikit-learn's digits (NumPy MLP, SGD + momentum).",
        epilog="Writes <out>/digits_demo.md and <out>/digits_demo.png.",
    )
    ap.add_argument("--epochs", type=int, default=60, help="training epochs per run (default 60)")
    ap.add_argument(
        "--seeds", type=int, default=5, help="seeds per rule: initial weights and minibatch order (default 5)"
    )
    ap.add_argument("--quick", action="store_true", help="a tiny run (3 epochs, 2 seeds) for tests")
    ap.add_argument("--train-fraction", type=float, default=0.35, help="stratified training fraction (default 0.35)")
    ap.add_argument("--batch-size", type=int, default=32, help="minibatch size (default 32)")
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate of the momentum optimizer (default 0.05)")
    ap.add_argument("--momentum", type=float, default=0.9, help="heavy-ball momentum (default 0.9)")
    ap.add_argument(
        "--rules",
        default=None,
        help="comma-separated subset of the rows, by label (default: all): " + ", ".join(l for l, _, _ in RULES),
    )
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results"), help="output folder")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 3, 2
    if args.epochs < 1 or args.seeds < 1:
        ap.error("--epochs and --seeds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the demo; returns the table rows (also printed and written to ``<out>``)."""
    args = parse_args(argv)
    hypers = {label: hyper for label, _, hyper in RULES}
    names = {label: name for label, name, _ in RULES}
    wanted = list(hypers) if args.rules is None else [n.strip() for n in args.rules.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in hypers]
    if unknown:
        raise SystemExit(f"unknown rule label(s) {unknown}; choose from {list(hypers)}")
    if "sgd" not in wanted:
        wanted.insert(0, "sgd")  # the baseline of the time ratio
    data = load_data(args.train_fraction)
    rules = {label: gradnorm.rules.get(names[label], **hypers[label]) for label in wanted}
    kw = {"batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum}

    runs: dict[str, list[Run]] = {label: [] for label in wanted}
    t_start = time.perf_counter()
    with _single_threaded_blas():
        for label, rule in rules.items():  # warm-up (caches, allocator), not recorded
            train(label, rule, 0, data, epochs=1, **kw)
        for seed in range(args.seeds):
            for label, rule in rules.items():  # interleaved, so slow drifts of the machine hit every rule alike
                runs[label].append(train(label, rule, seed, data, epochs=args.epochs, **kw))
    total = time.perf_counter() - t_start

    rows = summarize(runs, hypers)
    n_tr, n_te = len(data[1]), len(data[3])
    setup = (
        f"sklearn digits, {n_tr} train / {n_te} test (stratified, fixed split); "
        f"MLP 64-32(tanh)-10 in float64 NumPy; "
        f"SGD lr={args.lr}, momentum={args.momentum}, batch {args.batch_size}, {args.epochs} epochs; "
        f"one BLAS thread; "
        f"{args.seeds} seed(s) (initial weights and minibatch order, the same for every rule); "
        f"mean ± sample std over seeds"
    )
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, NumPy {np.__version__}"
    )
    notes = [f"{r['rule']}: {k} = {v:.3f}" for r in rows for k, v in r["extra"].items()]
    print(setup)
    print_table(rows, f"gradnorm digits demo ({args.epochs} epochs, {args.seeds} seeds)")
    print("\n".join(notes))
    print(f"total time {total:.1f} s ({machine})")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = [
        "# gradnorm digits demo",
        "",
        setup + ".",
        "",
        markdown_table(rows),
        "",
        "Final train loss (full training set) and test accuracy after the last epoch. \"grad evals / step\" is what "
        "gradnorm reports in `info`. \"ms / step\" is the wall time of `gradnorm.step` plus the momentum update, "
        "averaged over all steps and seeds, and \"x sgd\" its ratio to sgd's; \"ms in grad_fn/hvp_fn\" is the part "
        "of it spent in the model's own gradient and HVP code (the rest is gradnorm's bookkeeping and the momentum "
        "update). \"‖d−g‖/‖g‖\" is how far the rule's direction d is from the plain minibatch gradient g, "
        "averaged over steps.",
        "",
        *(f"- {n}" for n in notes),
        "",
        f"Total time {total:.1f} s on {machine}.",
        "",
    ]
    (out / "digits_demo.md").write_text("\n".join(md), encoding="utf-8")
    plot(runs, out / "digits_demo.png")
    print(f"wrote {out / 'digits_demo.md'} and {out / 'digits_demo.png'}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
