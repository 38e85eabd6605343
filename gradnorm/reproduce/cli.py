"""The ``gradnorm`` command line: ``gradnorm reproduce [options]``.

Nothing heavy is imported at module level: the thread settings must come before NumPy loads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

__all__ = ["build_parser", "main", "reproduce"]

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def _single_thread() -> None:
    """One BLAS / OpenMP thread: environment variables before NumPy loads, threadpoolctl after."""
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "numpy" in sys.modules:  # too late for the variables (an embedding process); limit the pools
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(1)
        except ImportError:  # pragma: no cover
            pass


def _claims_arg(text: str) -> tuple[int, ...]:
    try:
        out = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of claim numbers, got {text!r}") from None
    if not out or any(c < 1 or c > 6 for c in out):
        raise argparse.ArgumentTypeError(f"claims are numbered 1 to 6, got {text!r}")
    return out


def _add_reproduce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("numpy", "torch", "jax", "tf"), default="numpy",
                   help="who differentiates the model: numpy (hand-written gradient and R-operator HVP), or the "
                        "autodiff of torch, jax or tf (default: numpy)")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, fewer epochs, one noise level: a quick look (under a minute with numpy)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # toy sizes, for the tests only
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3; --quick: 1)")
    p.add_argument("--claims", type=_claims_arg, default=(1, 2, 3, 4, 5, 6),
                   help="comma-separated claims to run, e.g. 1,4 (default: all six)")
    p.add_argument("--out", default="results", help="directory for reproduce.md and the PNGs (default: results/)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="default: float64")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradnorm", description="gradnorm's command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    rep = sub.add_parser(
        "reproduce", help="run the papers' claims and write a report",
        description="Run the claims of the SAM, GNP, GR/F-GR, GAM and flooding papers on scikit-learn's digits and "
                    "synthetic problems; print a table and a verdict per claim and write <out>/reproduce.md with "
                    "PNG plots.",
    )
    _add_reproduce_args(rep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``gradnorm`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "reproduce":
        return _run(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


def reproduce(argv: Sequence[str] | None = None) -> int:
    """``gradnorm reproduce`` with ``argv`` the arguments after ``reproduce``."""
    return main(["reproduce", *(argv if argv is not None else sys.argv[1:])])


def _run(args: argparse.Namespace) -> int:
    _single_thread()
    import platform
    from pathlib import Path

    import numpy as np
    from rich.console import Console

    from . import _diag
    from ._backends import get_backend
    from ._claims import CLAIMS, PRESETS, Context
    from ._report import Progress, plot_claim, print_claim, print_summary, write_markdown

    preset = "smoke" if args.smoke else ("quick" if args.quick else "full")
    sizes = PRESETS[preset]
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit("gradnorm reproduce: --seeds must be at least 1")
        from dataclasses import replace

        sizes = replace(sizes, seeds=args.seeds)
    console = Console(width=max(Console().width, 140) if sys.stdout.isatty() else 160)
    t_start = time.perf_counter()
    backend = get_backend(args.backend, jax_x64=args.dtype == "float64")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}, {backend.version}"
    label = {"full": "full run", "quick": "QUICK run (--quick: fewer seeds and epochs; indicative only)",
             "smoke": "SMOKE run (toy sizes for the tests; the verdicts mean nothing)"}[preset]
    console.print(f"[bold]gradnorm reproduce[/bold]: {label}; backend {args.backend} ({backend.version}), "
                  f"{args.dtype}, {sizes.seeds} seed(s), claims {','.join(map(str, args.claims))}; one BLAS thread")
    results = []
    with np.errstate(all="ignore"), Progress(console, enabled=not args.no_progress) as progress:
        ctx = Context(backend, args.dtype, sizes, progress, selected=tuple(args.claims))
        for number in args.claims:
            res = CLAIMS[number](ctx)
            plot_claim(res, out)
            print_claim(console, res)
            results.append(res)
    total = time.perf_counter() - t_start
    title = f"gradnorm reproduce: verdicts ({label}, backend {args.backend}, {total:.0f} s)"
    print_summary(console, results, title)
    header = [
        (f"{label.capitalize()}: backend **{args.backend}** ({backend.version}), {args.dtype}, {sizes.seeds} "
         f"seed(s), claims {', '.join(map(str, args.claims))}, total time {total:.0f} s on {machine}, one BLAS "
         "thread."),
        "",
        "Command: `gradnorm reproduce " + " ".join(_argv_echo(args)) + "`.",
        "",
        ("Verdicts are computed from the runs: a statement is **reproduced** when it holds in at least ⌈2N/3⌉ of "
        "the N seeds, **not reproduced** when it holds in none (with at least half of the seeds defined), "
        "**inconclusive** otherwise; a failed run (divergence, or a target not reached) makes its seed undefined and "
        "never counts as holding; comparisons are strict (ties do not hold). A claim is reproduced when all its "
        "headline statements are, partly reproduced when some are; when none is, it is not reproduced if at least one "
        "statement is not reproduced, else inconclusive. Statements marked *detail* are reported but do not enter "
        "the claim's verdict. Hyperparameters are fixed in advance (gradnorm/reproduce/_claims.py), never tuned on "
        "a test set."),
        "",
        (f"Sizes ({preset}): {sizes.seeds} seed(s); claim 1 stops at training loss {sizes.c1_target} (at most "
        f"{sizes.c1_max_epochs} epochs); claims 2-3: {sizes.c2_epochs} epochs at "
        f"{', '.join(f'{p:.0%}' for p in sizes.c2_noise)} label noise; claim 4: {sizes.c4_pairs} flooding pairs at "
        f"η ∈ {{{', '.join(f'{e:g}' for e in sizes.c4_etas)}}}; claim 5: ε ∈ "
        f"{{{', '.join(f'{e:g}' for e in sizes.c5_eps)}}}, at most {sizes.c5_max_steps} steps per run."),
        "",
        f"Flatness measurements: {_diag.SOURCE}.",
    ]
    footer = [f"Written by `gradnorm reproduce` in {total:.0f} s."]
    write_markdown(out / "reproduce.md", results, header, footer)
    figures = [f for r in results for f in r.figures]
    console.print(f"wrote {out / 'reproduce.md'} and {len(figures)} PNG(s) in {out}/: {', '.join(figures)}")
    return 0


def _argv_echo(args: argparse.Namespace) -> list[str]:
    out = [f"--backend {args.backend}"]
    if args.smoke:
        out.append("--smoke")
    elif args.quick:
        out.append("--quick")
    if args.seeds is not None:
        out.append(f"--seeds {args.seeds}")
    if tuple(args.claims) != (1, 2, 3, 4, 5, 6):
        out.append("--claims " + ",".join(map(str, args.claims)))
    if args.dtype != "float64":
        out.append(f"--dtype {args.dtype}")
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
