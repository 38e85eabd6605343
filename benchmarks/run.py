"""Run every benchmark and write one report: ``results/benchmarks.md`` (all tables, the machine, the
date, the command) and ``results/benchmarks.png`` (each rule's step time over its floor, per adapter).

Each benchmark script runs as a subprocess, one after the other (nothing else of this run competes
for the CPU), and its tables are copied into the report as they are:

* ``torch``: ``torch_step.py``, every rule of ``gradnorm.torch.Optimizer`` on the deep narrow MLP,
  with the peers ``pytorch_optimizer.SAM`` and a hand-written SAM;
* ``torch-cnn``: ``torch_step.py --model cnn``, the same on the small CNN with BatchNorm;
* ``jax``: ``jax_step.py``, every rule of ``gradnorm.jax.step`` (jitted), ``gradnorm.jax.transform``
  and the peer ``optax.contrib.sam``;
* ``tf``: ``tf_step.py``, every rule of ``gradnorm.tf.step`` under ``tf.function`` and the peer, a
  hand-written ``tf.function`` SAM;
* ``hvp``: ``hvp_routes.py``, the price of exact GR by every Hessian-vector-product route of every
  adapter, on the MLP and the CNN;
* ``memory``: ``torch_memory.py``, the extra peak memory of the PyTorch steps in units of P;
* ``jax-memory``: ``jax_memory.py``, the extra temporaries of the jitted JAX step (XLA's memory
  analysis), in units of P;
* ``tf-memory``: ``tf_memory.py``, the extra peak memory of the ``tf.function`` step (TensorFlow's
  allocator statistics), in units of P;
* ``compile``: ``torch_compile.py``, ``gradnorm.torch.Optimizer`` under ``torch.compile``.

Every timing inside a script is interleaved (``_timing.timed_interleaved``): ratios to a floor are
measured in one process, in the same rounds. ``--quick`` runs few steps and repeats on smaller
settings (the tables and the plot are all there, the numbers are rough): a smoke test of the whole
pipeline, not a measurement.

    python benchmarks/run.py [--quick] [--only torch,jax,...] [--skip compile] [--frameworks torch,jax,tf]
                             [--threads 1] [--hvp-models mlp,cnn] [--timeout SECONDS] [--out results]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SECTIONS = ("torch", "torch-cnn", "jax", "tf", "hvp", "memory", "jax-memory", "tf-memory", "compile")
FRAMEWORKS = ("torch", "jax", "tf")
#: the framework of each section (hvp: all of them, restricted by --frameworks)
FRAMEWORK_OF = {"torch": "torch", "torch-cnn": "torch", "jax": "jax", "tf": "tf", "memory": "torch", "jax-memory": "jax",
                "tf-memory": "tf", "compile": "torch"}
TITLES = {
    "torch": "PyTorch: gradnorm.torch.Optimizer per rule, deep narrow MLP (torch_step.py)",
    "torch-cnn": "PyTorch: gradnorm.torch.Optimizer per rule, CNN with BatchNorm (torch_step.py --model cnn)",
    "jax": "JAX: gradnorm.jax.step per rule, jitted (jax_step.py)",
    "tf": "TensorFlow: gradnorm.tf.step per rule, tf.function (tf_step.py)",
    "hvp": "Exact GR: every Hessian-vector-product route (hvp_routes.py)",
    "memory": "PyTorch: extra peak memory over SGD-momentum (torch_memory.py)",
    "jax-memory": "JAX: extra temporaries of the jitted step over SGD-momentum (jax_memory.py)",
    "tf-memory": "TensorFlow: extra peak memory of the tf.function step over SGD-momentum (tf_memory.py)",
    "compile": "PyTorch: torch.compile (torch_compile.py)",
}
#: the adapter a step table's rows belong to, in the plot
ADAPTER = {"torch": "PyTorch (MLP)", "torch-cnn": "PyTorch (CNN)", "jax": "JAX (MLP)", "tf": "TensorFlow (MLP)"}
#: the first-column prefixes of a gradnorm rule's row, and the peers' rows (plotted as "SAM peer")
PREFIXES = ("gradnorm.jax.step ", "gradnorm ")
PEERS = ("pytorch_optimizer.SAM", "optax.contrib.sam", "hand-written tf.function SAM")


def commands(quick: bool, threads: int) -> dict[str, list[str]]:
    """The command line of every section (the script and its arguments)."""
    t = ["--threads", str(threads)]
    if quick:
        step, hvp = ["--steps", "2", "--repeats", "1"], ["--steps", "1", "--repeats", "1"]
        memory = ["--width", "512", "--depth", "4", "--rules", "sam", "--paths", "optimizer"]
        small = ["--width", "512", "--depth", "4", "--rules", "sam"]
        compile_ = ["--rules", "sam", "--steps", "2", "--repeats", "1"]
    else:
        step, hvp = ["--steps", "20", "--repeats", "7"], ["--steps", "4", "--repeats", "7"]
        memory, small, compile_ = [], [], []
    cnn_step = ["--steps", "1", "--repeats", "1"] if quick else ["--steps", "3", "--repeats", "7"]
    return {
        "torch": ["torch_step.py", *step, *t],
        "torch-cnn": ["torch_step.py", "--model", "cnn", *cnn_step, *t],
        "jax": ["jax_step.py", *step, *t],
        "tf": ["tf_step.py", *step, *t],
        "hvp": ["hvp_routes.py", *hvp, *t],
        "memory": ["torch_memory.py", *memory],
        "jax-memory": ["jax_memory.py", *small],
        "tf-memory": ["tf_memory.py", *small],
        "compile": ["torch_compile.py", *compile_, "--threads", str(threads or 1)],
    }


def machine() -> list[str]:
    """Lines describing this machine and the library versions."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        memory = f"{kib / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    versions = []
    for dist, *aliases in (("torch",), ("jax",), ("jaxlib",), ("optax",), ("tensorflow", "tensorflow-cpu"),
                           ("keras",), ("pytorch_optimizer",), ("numpy",)):
        for name in (dist, *aliases):
            try:
                versions.append(f"{dist} {importlib.metadata.version(name)}")
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        else:
            versions.append(f"{dist} (not installed)")
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
    return [
        f"* machine: {platform.system()} {platform.release()}, {cpu}, {cores} CPU core(s) available, {memory} memory",
        f"* load average when the run started (1, 5, 15 min): {load}",
        f"* Python {platform.python_version()}; " + ", ".join(versions),
        f"* gradnorm: commit {commit or '?'}{dirty}",
    ]


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def run_section(cmd: list[str], timeout: float | None) -> tuple[str, float, str | None]:
    """``(stdout, seconds, error or None)`` of one benchmark script."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, HERE, env.get("PYTHONPATH")]))
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, cmd[0]), *cmd[1:]], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return out, time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return proc.stdout, seconds, f"exit status {proc.returncode}:\n{tail}"
    return proc.stdout, seconds, None


def as_markdown(text: str) -> str:
    """A script's output as markdown: its tables as they are (each preceded by a blank line),
    other lines as paragraphs; an output without a markdown table goes in a code block."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    if not any(line.startswith("|") for line in lines):
        return "```\n" + "\n".join(lines) + "\n```"
    out: list[str] = []
    for line in lines:
        is_row = line.startswith("|")
        if out and out[-1] and (is_row != out[-1].startswith("|")):
            out.append("")  # a table starts or ends: a blank line around it
        out.append(line)
    return "\n".join(out)


def x_floor_rows(text: str) -> list[tuple[str, float]]:
    """``(first column, x floor)`` of every row of every table in `text` that has an "x floor" column."""
    rows: list[tuple[str, float]] = []
    column = None
    for line in text.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if column is None:
            column = cells.index("x floor") if "x floor" in cells else -1
            continue
        if column < 0 or set(cells[0]) <= set("-: "):
            continue
        try:
            rows.append((cells[0], float(cells[column])))
        except (ValueError, IndexError):
            pass
    return rows


def plot_data(outputs: dict[str, str]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """``(rules in order, {adapter: {rule: x floor}})`` from the step tables."""
    order: list[str] = []
    data: dict[str, dict[str, float]] = {}
    for section, adapter in ADAPTER.items():
        if section not in outputs:
            continue
        for name, ratio in x_floor_rows(outputs[section]):
            if name.startswith(PEERS):
                rule = "SAM peer"
            else:
                prefix = next((p for p in PREFIXES if name.startswith(p)), None)
                if prefix is None:
                    continue
                rule = name[len(prefix):]
                if not re.fullmatch(r"[a-z_]+", rule):  # variants: "sam, skip_nonfinite=False", "gr (forward-...)"
                    continue
            data.setdefault(adapter, {})[rule] = ratio
            if rule not in order:
                order.append(rule)
    if "SAM peer" in order:  # last
        order.remove("SAM peer")
        order.append("SAM peer")
    return order, data


def write_plot(path: str, rules: list[str], data: dict[str, dict[str, float]], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    adapters = list(data)
    width = 0.8 / max(len(adapters), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(rules) + 2), 4.5))
    for i, adapter in enumerate(adapters):
        xs = [j + (i - (len(adapters) - 1) / 2) * width for j, r in enumerate(rules) if r in data[adapter]]
        ys = [data[adapter][r] for r in rules if r in data[adapter]]
        ax.bar(xs, ys, width, label=adapter)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rules)))
    ax.set_xticklabels(rules, rotation=30, ha="right")
    ax.set_ylabel("step time / floor")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps and repeats, smaller settings: a smoke test")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, of {', '.join(SECTIONS)}")
    parser.add_argument("--skip", default="", help="sections to leave out")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help="run the sections of these frameworks only (the HVP routes of these only)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per framework (default 1: reproducible on a shared machine; "
                             "0: the frameworks' defaults)")
    parser.add_argument("--hvp-models", default=None, help="models of the HVP-route section (default mlp,cnn)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per section (default: none)")
    parser.add_argument("--out", default=os.path.join(ROOT, "results"),
                        help="folder of benchmarks.md and benchmarks.png")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = [s for s in [*chosen, *skipped] if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if not frameworks or any(f not in FRAMEWORKS for f in frameworks):
        parser.error(f"--frameworks: choose from {', '.join(FRAMEWORKS)}")
    sections = [s for s in SECTIONS
                if s in chosen and s not in skipped and (s == "hvp" or FRAMEWORK_OF[s] in frameworks)]
    cmds = commands(args.quick, args.threads)
    cmds["hvp"] += ["--frameworks", ",".join(frameworks)]
    if args.hvp_models:
        cmds["hvp"] += ["--models", args.hvp_models]

    os.makedirs(args.out, exist_ok=True)
    started = datetime.datetime.now().astimezone()
    given = sys.argv[1:] if argv is None else list(argv)
    command = "python benchmarks/run.py" + (" " + shlex.join(given) if given else "")
    header = [
        "# gradnorm benchmarks",
        "",
        f"Generated by `{command}` on {started:%Y-%m-%d %H:%M %Z}" + (" (**--quick**: rough numbers, a smoke test)"
                                                                      if args.quick else "") + ".",
        "",
        *machine(),
        "",
        "Every ratio is measured within one process, interleaved (each round times every function once, "
        "round-robin; the median round is reported), so that drift of the machine affects all alike. "
        "See docs/performance.md for how to read the tables.",
        "",
    ]
    body: list[str] = []
    outputs: dict[str, str] = {}
    failed = []
    for section in sections:
        cmd = cmds[section]
        print(f"[{section}] python benchmarks/{shlex.join(cmd)}", flush=True)
        out, seconds, error = run_section(cmd, args.timeout)
        print(f"[{section}] {'failed' if error else 'done'} in {seconds:.0f} s", flush=True)
        body += [f"## {TITLES[section]}", "", f"`python benchmarks/{shlex.join(cmd)}` ({seconds:.0f} s)", ""]
        if out.strip():
            body += [as_markdown(out), ""]
        if error:
            failed.append(section)
            body += ["**Failed**:", "", "```", error, "```", ""]
        outputs[section] = out

    rules, data = plot_data(outputs)
    png = os.path.join(args.out, "benchmarks.png")
    plotted = bool(data) and write_plot(png, rules, data, f"step time / floor per rule ({started:%Y-%m-%d}"
                                        + (", --quick" if args.quick else "") + "; 1 = the floor)")
    if plotted:
        header += ["![step time over floor per rule and adapter](benchmarks.png)", "",
                   "The plot: each rule's step time over its floor (the x floor column of the step tables: its "
                   "gradient evaluations, for gr one gradient and one HVP, plus the base update); \"SAM peer\" is "
                   "pytorch_optimizer.SAM, optax.contrib.sam and the hand-written tf.function SAM.", ""]
    with open(os.path.join(args.out, "benchmarks.md"), "w") as f:
        f.write("\n".join(header + body).rstrip() + "\n")
    print(f"wrote {os.path.join(args.out, 'benchmarks.md')}" + (f" and {png}" if plotted else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
