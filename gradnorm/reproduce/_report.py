"""Output: rich tables and a progress bar on the console, a Markdown report and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Self

import numpy as np

from ._claims import ClaimResult, Table
from ._verdict import INCONCLUSIVE, NOT_REPRODUCED, PARTLY, REPRODUCED

__all__ = ["Progress", "plot_claim", "print_claim", "print_summary", "write_markdown"]

_STYLE = {REPRODUCED: "bold green", NOT_REPRODUCED: "bold red", INCONCLUSIVE: "bold yellow", PARTLY: "bold yellow"}


# ---------------------------------------------------------------------------------------------
# Progress


class _Task:
    def __init__(self, progress: Any, task_id: Any):
        self.progress, self.id = progress, task_id

    def describe(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.id, description=text)

    def advance(self, n: float = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.id, n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.remove_task(self.id)


class Progress:
    """A rich progress bar (one task per claim) that stays quiet when the console is not a
    terminal."""

    def __init__(self, console: Any, enabled: bool = True):
        self._progress = None
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._progress = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, transient=True,
            )

    def __enter__(self) -> Self:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def task(self, description: str, total: float) -> _Task:
        if self._progress is None:
            return _Task(None, None)
        return _Task(self._progress, self._progress.add_task(description, total=total))


# ---------------------------------------------------------------------------------------------
# Console


def _rich_table(t: Table) -> Any:
    from rich.table import Table as RichTable

    table = RichTable(title=t.title, title_justify="left")
    for i, h in enumerate(t.headers):
        table.add_column(h, justify="left" if i < 3 else "right", overflow="fold")
    for row in t.rows:
        table.add_row(*row)
    return table


def print_claim(console: Any, res: ClaimResult) -> None:
    from rich.rule import Rule
    from rich.text import Text

    console.print(Rule(f"Claim {res.number}: {res.title}"))
    console.print(Text("Paper: " + "; ".join(res.papers), style="dim"))
    for t in res.tables:
        console.print(_rich_table(t))
    for st in res.statements:
        mark = "" if st.headline else ("  " if st.text.startswith("(") else "  (detail) ")
        line = Text(f"  {mark}{st.text}: ")
        line.append(_vtext(st.verdict, st.unit), style=_STYLE[st.verdict.status])
        console.print(line)
    v = res.verdict
    line = Text(f"Verdict, claim {res.number}: ", style="bold")
    line.append(str(v), style=_STYLE[v.status])
    line.append(f"   ({res.seconds:.1f} s)", style="dim")
    console.print(line)
    console.print()


def print_summary(console: Any, results: list[ClaimResult], title: str) -> None:
    from rich.table import Table as RichTable
    from rich.text import Text

    table = RichTable(title=title, title_justify="left")
    for h in ("claim", "verdict", "paper", "time"):
        table.add_column(h, overflow="fold")
    for res in results:
        table.add_row(f"{res.number}. {res.title}", Text(str(res.verdict), style=_STYLE[res.verdict.status]),
                      _short(res.papers), f"{res.seconds:.0f} s")
    console.print(table)


def _vtext(v: Any, unit: str) -> str:
    text = str(v)
    return text if unit == "seeds" else text.replace(" seeds)", f" {unit})").replace(" seed)", f" {unit})")


def _short(papers: list[str]) -> str:
    out = []
    for p in papers:
        head = p.split(".")[0]
        arxiv = [w.strip(";,.()") for w in p.split() if w.startswith("arXiv:")]
        out.append(head + (f" ({arxiv[0]})" if arxiv else ""))
    return "; ".join(out)


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_table(t: Table) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in row] for row in t.rows]
    return [f"**{t.title}**", "", "| " + " | ".join(t.headers) + " |", "|" + "|".join("---" for _ in t.headers) + "|",
            *("| " + " | ".join(r) + " |" for r in esc), ""]


def write_markdown(path: Path, results: list[ClaimResult], header: list[str], footer: list[str]) -> None:
    lines = ["# gradnorm reproduce", "", *header, "", "## Verdicts", "",
             "| claim | verdict | paper | time |", "|---|---|---|---|"]
    for res in results:
        lines.append(f"| {res.number}. {res.title} | **{res.verdict}** | "
                     f"{_short(res.papers)} | {res.seconds:.0f} s |")
    lines.append("")
    for res in results:
        lines += [f"## Claim {res.number}: {res.title}", "", "Paper: " + "; ".join(res.papers) + ".", "",
                  "Setup: " + res.setup, ""]
        for t in res.tables:
            lines += _md_table(t)
        lines += ["Statements (per-seed outcome: ✓ holds, ✗ does not, ? undefined):", ""]
        for st in res.statements:
            marks = " ".join("?" if o is None else ("✓" if o else "✗") for o in st.outcomes)
            kind = "" if st.headline else " *(detail, not in the verdict)*"
            lines.append(f"- {st.text}{kind}: **{_vtext(st.verdict, st.unit)}** [{marks}]")
        lines += ["", f"**Verdict: {res.verdict}**", ""]
        if res.notes:
            lines += [*(f"- {n}" for n in res.notes), ""]
        for fig in res.figures:
            lines += [f"![claim {res.number}]({fig})", ""]
    lines += footer
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean(values: list[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def plot_claim(res: ClaimResult, out: Path) -> list[str]:
    """Write the claim's PNG(s) into ``out``; return their file names."""
    fn = {1: _plot1, 2: _plot2, 3: _plot3, 4: _plot4, 5: _plot5, 6: _plot6}[res.number]
    plt = _plt()
    names = fn(plt, res.data, out)
    plt.close("all")
    res.figures = names
    return names


def _plot1(plt: Any, d: dict[str, Any], out: Path) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab10")
    for i, label in enumerate(d["labels"]):
        lam, tr = np.asarray(d["lambda_max"][label]), np.asarray(d["trace"][label])
        axes[0].scatter(lam, tr, color=cmap(i % 10), alpha=0.5, s=25)
        axes[0].scatter([_mean(lam)], [_mean(tr)], color=cmap(i % 10), marker="*", s=220, edgecolor="k", label=label)
        axes[1].bar(i, _mean(d["steps"][label]), color=cmap(i % 10))
    axes[0].set_xlabel("λmax (full training loss)")
    axes[0].set_ylabel("Hessian trace")
    axes[0].set_title("Flatness at equal training loss (dots: seeds, stars: means)")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].set_xticks(range(len(d["labels"])), d["labels"], rotation=35, ha="right", fontsize=8)
    axes[1].set_ylabel("SGD steps to the target loss")
    axes[1].set_title("Steps to reach the target loss")
    fig.tight_layout()
    fig.savefig(out / "claim1_flatness.png", dpi=110)
    return ["claim1_flatness.png"]


def _plot2(plt: Any, d: dict[str, Any], out: Path) -> list[str]:
    noise = d["noise"]
    fig, axes = plt.subplots(1, len(noise) + 1, figsize=(6 * (len(noise) + 1), 4.8), squeeze=False)
    axes = axes[0]
    cmap = plt.get_cmap("tab10")
    for j, rate in enumerate(noise):
        for i, label in enumerate(d["labels"]):
            curves = [c for c in d["curves"][f"{rate}|{label}"] if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            m = np.mean([c[:n] for c in curves], axis=0)
            axes[j].plot(np.arange(1, n + 1), m * 100, color=cmap(i % 10), label=label, lw=1.4)
        axes[j].set_title(f"{rate:.0%} symmetric label noise")
        axes[j].set_xlabel("epoch")
        axes[j].set_ylabel("clean test accuracy (%)")
        axes[j].grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    width = 0.8 / max(len(noise), 1)
    for j, rate in enumerate(noise):
        vals = [_mean(d["memorized"][f"{rate}|{label}"]) * 100 for label in d["labels"]]
        axes[-1].bar(np.arange(len(d["labels"])) + j * width, vals, width, label=f"{rate:.0%} noise")
    axes[-1].set_xticks(np.arange(len(d["labels"])) + width * (len(noise) - 1) / 2, d["labels"], rotation=30,
                        ha="right", fontsize=8)
    axes[-1].set_ylabel("flipped training labels memorized (%)")
    axes[-1].set_title("Memorization at the end")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "claim2_label_noise.png", dpi=110)
    return ["claim2_label_noise.png"]


def _plot3(plt: Any, d: dict[str, Any], out: Path) -> list[str]:
    noise = d["noise"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (group, labels) in zip(axes, d["groups"].items()):
        width = 0.8 / max(len(noise), 1)
        for j, rate in enumerate(noise):
            vals = [_mean(d["final"][f"{rate}|{label}"]) * 100 for label in labels]
            ax.bar(np.arange(len(labels)) + j * width, vals, width, label=f"{rate:.0%} noise")
        ax.set_xticks(np.arange(len(labels)) + width * (len(noise) - 1) / 2, labels, fontsize=9)
        finite = [_mean(d["final"][f"{r}|{lab}"]) * 100 for r in noise for lab in labels]
        finite = [v for v in finite if math.isfinite(v)]
        if finite:
            ax.set_ylim(min(finite) - 3, max(finite) + 2)
        ax.set_title(f"GNP, {group}")
        ax.set_ylabel("final clean test accuracy (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "claim3_gnp_alpha.png", dpi=110)
    return ["claim3_gnp_alpha.png"]


def _plot4(plt: Any, d: dict[str, Any], out: Path) -> list[str]:
    names = []
    etas = sorted({i["eta"] for i in d["insts"]})
    for eta in etas:
        inst = next(i for i in d["insts"] if i["eta"] == eta)  # the first seed
        fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
        styles = {"flood": ("flooding (x: pairs = steps/2)", "C0"), "fgr": ("penalty-only F-GR", "C1"),
                  "gr": ("penalty-only exact GR", "C2")}
        fl = np.asarray(inst["flood_loss"])
        axes[0].plot(np.arange(len(fl)) / 2, fl, color="C0", lw=0.8, label=styles["flood"][0])
        axes[1].plot(np.arange(len(fl)) / 2, inst["flood_g"], color="C0", lw=0.8)
        for key in ("fgr", "gr"):
            axes[0].plot(inst[f"{key}_loss"], color=styles[key][1], label=styles[key][0])
            axes[1].plot(inst[f"{key}_g"], color=styles[key][1])
        axes[0].axhline(d["b"], color="k", ls=":", lw=0.8, label="flood level b")
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        axes[0].set_title(f"loss (η = {eta:g})")
        axes[1].set_title("‖g‖")
        for ax, q, title in ((axes[2], "lambda_max", "λmax"), (axes[3], "trace", "trace")):
            for key in ("flood", "fgr", "gr"):
                m = inst[key]
                ks = sorted(m)
                ax.plot(ks, [m[k][q] for k in ks], "o-", color=styles[key][1], label=styles[key][0])
            ax.set_title(title)
            ax.set_xlabel("pairs / penalty steps")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].set_xlabel("pairs / penalty steps")
        axes[1].set_xlabel("pairs / penalty steps")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Claim 4: flooding vs penalty-only F-GR and exact GR from the same start (seed {inst['seed']})")
        fig.tight_layout()
        name = f"claim4_flooding_eta{eta:g}.png"
        fig.savefig(out / name, dpi=110)
        names.append(name)
    return names


def _plot5(plt: Any, d: dict[str, Any], out: Path) -> list[str]:
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    methods = d["methods"]
    for ax, regime in zip(axes[:2], d["regimes"]):
        vals = [d["err"][f"{regime}|{m}"] for m in methods]
        means = [_mean(v) for v in vals]
        colors = ["C7", "C3"] + ["C1"] * ((len(methods) - 2) // 2) + ["C0"] * ((len(methods) - 2) // 2)
        ax.bar(range(len(methods)), means, color=colors)
        for i, v in enumerate(vals):
            ax.scatter([i] * len(v), v, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("‖w − β*‖² at interpolation")
        ax.set_title(regime)
        ax.grid(alpha=0.3, axis="y")
    ex = d["example"]
    beta = np.asarray(ex["beta"])
    axes[2].stem(np.arange(len(beta)), beta, linefmt="k-", markerfmt="ko", basefmt=" ", label="β*")
    n_eps = (len(methods) - 2) // 2
    for m, c in ((methods[0], "C7"), (methods[1], "C3"), (methods[1 + n_eps], "C1")):
        w = ex.get(f"{d['regimes'][-1]}|{m}")
        if w is not None:
            axes[2].plot(np.arange(len(w)), w, ".", color=c, label=m)
    axes[2].set_title(f"seed 0, {d['regimes'][-1]}: recovered w")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "claim5_dln.png", dpi=110)
    return ["claim5_dln.png"]


def _plot6(plt: Any, d: dict[str, Any], out: Path) -> list[str]:
    labels = d["labels"]
    base = d["ms"].get("sgd", float("nan"))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [d["ms"][label] / base for label in labels], 0.4, label="wall time × sgd")
    ax.bar(x + 0.2, [d["evals"][label] for label in labels], 0.4, label="oracle calls per step (gradients + HVPs)")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    ax.set_title("Cost per step against SGD")
    fig.tight_layout()
    fig.savefig(out / "claim6_cost.png", dpi=110)
    return ["claim6_cost.png"]
