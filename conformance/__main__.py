"""``python -m conformance``: run the conformance suite on every installed backend and print a
backend x rule table (each cell: pass count and largest relative deviation from the reference)."""

from __future__ import annotations

import argparse
import sys
import time

from .backends import BACKENDS, available_backends
from .runner import render, run_identities, run_trajectories


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance", description=__doc__)
    parser.add_argument("--backend", action="append", choices=sorted(BACKENDS), help="repeatable; default: all installed")
    parser.add_argument("--dtype", action="append", choices=["float64", "float32"])
    parser.add_argument("--rule", action="append")
    parser.add_argument("--problem", action="append")
    parser.add_argument("--no-identities", action="store_true")
    parser.add_argument("--external", action="store_true", help="also compare sam with optax.contrib.sam and pytorch_optimizer.SAM")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every failure message")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    for name, backend in BACKENDS.items():
        reason = backend.unavailable_reason()
        if reason and (not args.backend or name in args.backend):
            print(f"skipping backend {name}: {reason}")
    backends = [b.name for b in available_backends(args.backend)]
    if not backends:
        print("no requested backend is available")
        return 1
    results = run_trajectories(backends, args.dtype, args.rule, args.problem)
    rows = [r.row() | {"message": r.message} for r in results]
    if not args.no_identities:
        rows += run_identities(backends, args.dtype)
    if args.external:
        from .external import compare_external, table_rows

        rows += table_rows(compare_external())
    print(render(rows))
    failures = [r for r in rows if not r["passed"]]
    for r in failures if args.verbose else failures[:10]:
        print("FAIL:", r["message"])
    if failures and not args.verbose and len(failures) > 10:
        print(f"... and {len(failures) - 10} more failures (-v shows all)")
    print(f"{len(rows) - len(failures)} passed, {len(failures)} failed ({time.perf_counter() - start:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
