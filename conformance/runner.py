"""Running the whole suite and printing the backend x rule table."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from . import golden as _golden
from .backends import available_backends
from .checks import Result, check
from .identities import IDENTITIES, check_identity
from .scenarios import SCENARIOS, Scenario


def select(scenarios: Iterable[Scenario], rules: list[str] | None, problems: list[str] | None) -> list[Scenario]:
    return [s for s in scenarios if (not rules or s.rule in rules) and (not problems or s.problem in problems)]


def run_trajectories(backend_names: list[str] | None = None, dtypes: list[str] | None = None,
                     rules: list[str] | None = None, problems: list[str] | None = None,
                     progress: Any = None) -> list[Result]:
    golden = _golden.load()
    results = []
    for backend in available_backends(backend_names):
        for dtype in backend.dtypes:
            if dtypes and dtype not in dtypes:
                continue
            for scenario in select(SCENARIOS, rules, problems):
                if not backend.covers(scenario):
                    continue
                results.append(check(backend, scenario, dtype, golden))
                if progress:
                    progress(results[-1])
    return results


def run_identities(backend_names: list[str] | None = None, dtypes: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for backend in available_backends(backend_names):
        for dtype in backend.dtypes:
            if dtypes and dtype not in dtypes:
                continue
            for identity in IDENTITIES:
                try:
                    ok, dev, message = check_identity(backend, identity, dtype)
                except Exception as err:
                    ok, dev, message = False, float("inf"), f"{identity.id} on '{backend.name}' raised {err!r}"
                rows.append({"backend": backend.name, "dtype": dtype, "rule": "identities", "passed": ok,
                             "max_deviation": dev, "tolerance": identity.tolerance(dtype), "scenario": identity.id,
                             "message": message})
    return rows


def summarize(rows: list[dict[str, Any]]) -> tuple[list[str], list[tuple[str, str]], dict[tuple[str, str, str], list[dict[str, Any]]]]:
    """Group result rows by (backend, dtype) x rule."""
    cells: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    rules: list[str] = []
    lines: list[tuple[str, str]] = []
    for row in rows:
        key = (row["backend"], row["dtype"])
        if key not in lines:
            lines.append(key)
        if row["rule"] not in rules:
            rules.append(row["rule"])
        cells[(row["backend"], row["dtype"], row["rule"])].append(row)
    import gradnorm

    order = {name: i for i, name in enumerate([*gradnorm.rules.names(), "sam(adaptive)", "identities"])}
    rules.sort(key=lambda r: order.get(r, len(order)))
    from .backends import BACKENDS

    backend_order = {name: i for i, name in enumerate(BACKENDS)}
    lines.sort(key=lambda bd: (backend_order.get(bd[0], len(backend_order)), bd[0], bd[1] != "float64"))
    return rules, lines, cells


def cell_text(group: list[dict[str, Any]]) -> str:
    if not group:
        return "-"
    passed = sum(r["passed"] for r in group)
    worst = max(r["max_deviation"] for r in group)
    mark = "PASS" if passed == len(group) else "FAIL"
    return f"{mark} {passed}/{len(group)} {worst:.0e}"


def render(rows: list[dict[str, Any]], title: str = "gradnorm conformance") -> str:
    """The backend x rule table as text: each cell 'PASS n/n max-deviation'."""
    rules, lines, cells = summarize(rows)
    header = ["backend", "dtype", *rules]
    body = [[b, d, *(cell_text(cells.get((b, d, r), [])) for r in rules)] for b, d in lines]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        out = [title, fmt.format(*header), "-+-".join("-" * w for w in widths)]
        out += [fmt.format(*row) for row in body]
        return "\n".join(out)
    table = Table(title=title)
    for name in header:
        table.add_column(name, no_wrap=True)
    for row in body:
        table.add_row(*[f"[red]{c}[/red]" if c.startswith("FAIL") else c for c in row])
    import io

    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    console = Console(record=True, file=io.StringIO(), width=sum(w + 3 for w in widths) + 1)
    console.print(table)
    return console.export_text()
