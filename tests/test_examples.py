"""The examples and the documentation's code: the digits demo runs, its hand-written
derivatives are right, and the code shown in README.md and docs/ runs as printed."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "digits_demo.py"

pytest.importorskip("sklearn", reason="the digits demo needs scikit-learn (pip install 'gradnorm[examples]')")


def _load_demo():
    spec = importlib.util.spec_from_file_location("digits_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("digits_demo", module)
    spec.loader.exec_module(module)
    return module


demo = _load_demo()

TINY = (5, 4, 3)  # small enough for a full finite-difference Jacobian


def _problem(sizes, n=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(n, sizes[0]))
    y = rng.integers(0, sizes[2], size=n)
    params = demo.init_params(rng, sizes)
    params["b1"] = 0.1 * rng.normal(size=sizes[1])  # non-zero biases, so their derivatives are tested too
    params["b2"] = 0.1 * rng.normal(size=sizes[2])
    return params, x, y, rng


def _axpy(a, v, p):
    return {k: p[k] + a * v[k] for k in p}


def _random_like(rng, params):
    return {k: rng.normal(size=v.shape) for k, v in params.items()}


# ----------------------------------------------------------------------------------------
# hand-written derivatives of the demo's model


def test_gradient_matches_central_differences_every_coordinate():
    params, x, y, _ = _problem(TINY)
    value, grads = demo.loss_and_grad(params, x, y)
    assert value == pytest.approx(demo.loss(params, x, y), rel=1e-15)
    h = 1e-6
    for key, leaf in params.items():
        fd = np.zeros_like(leaf)
        for i in np.ndindex(leaf.shape):
            bumped = {k: v.copy() for k, v in params.items()}
            bumped[key][i] += h
            up = demo.loss(bumped, x, y)
            bumped[key][i] -= 2 * h
            down = demo.loss(bumped, x, y)
            fd[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grads[key], fd, rtol=1e-6, atol=1e-9, err_msg=key)


def test_gradient_matches_directional_differences_full_size():
    params, x, y, rng = _problem(demo.SIZES, n=32)
    _, grads = demo.loss_and_grad(params, x, y)
    h = 1e-5
    for _ in range(3):
        v = _random_like(rng, params)
        exact = sum(float(np.vdot(grads[k], v[k])) for k in params)
        fd = (demo.loss(_axpy(h, v, params), x, y) - demo.loss(_axpy(-h, v, params), x, y)) / (2 * h)
        assert exact == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("sizes,n", [(TINY, 7), (demo.SIZES, 32)])
def test_hvp_matches_central_differences_of_the_gradient(sizes, n):
    params, x, y, rng = _problem(sizes, n=n)
    h = 1e-5
    for _ in range(3):
        v = _random_like(rng, params)
        hv = demo.hvp(params, v, x, y)
        _, g_up = demo.loss_and_grad(_axpy(h, v, params), x, y)
        _, g_down = demo.loss_and_grad(_axpy(-h, v, params), x, y)
        scale = max(float(np.max(np.abs(hv[k]))) for k in hv)
        for k in params:
            fd = (g_up[k] - g_down[k]) / (2 * h)
            np.testing.assert_allclose(hv[k], fd, rtol=1e-6, atol=1e-8 * scale, err_msg=k)


def test_hvp_is_symmetric_and_linear():
    params, x, y, rng = _problem(demo.SIZES, n=16)
    u, v = _random_like(rng, params), _random_like(rng, params)
    hu, hv = demo.hvp(params, u, x, y), demo.hvp(params, v, x, y)
    u_hv = sum(float(np.vdot(u[k], hv[k])) for k in params)
    v_hu = sum(float(np.vdot(v[k], hu[k])) for k in params)
    assert u_hv == pytest.approx(v_hu, rel=1e-12)
    h_sum = demo.hvp(params, {k: 2.0 * u[k] - v[k] for k in params}, x, y)
    for k in params:
        np.testing.assert_allclose(h_sum[k], 2.0 * hu[k] - hv[k], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------
# the demo itself


def test_quick_demo_writes_table_and_plot(tmp_path, capsys):
    rows = demo.main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    labels = [label for label, _, _ in demo.RULES]
    assert [r["rule"] for r in rows] == labels
    table = (tmp_path / "digits_demo.md").read_text(encoding="utf-8")
    png = (tmp_path / "digits_demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for label in labels:
        assert f"| {label} |" in table
        assert label in printed

    by_rule = {r["rule"]: r for r in rows}
    expected_evals = {"sgd": 1, "sam": 2, "gnp": 2, "gr": 1, "fd_gr": 2, "gam": 4, "flooding": 1, "coherent": 1}
    for name, evals in expected_evals.items():
        assert by_rule[name]["grad_evals"] == evals, name
    assert by_rule["gr"]["hvp_evals"] == 1
    assert "1 + 1 HVP" in table
    for r in rows:
        mean_acc, std_acc = r["test_acc"]
        assert 0.5 < mean_acc <= 1.0, r
        assert np.isfinite(r["train_loss"][0]) and std_acc >= 0.0
        assert r["ms_per_step"] > 0.0
    assert by_rule["sgd"]["ratio"] == pytest.approx(1.0)
    # flooding never reaches its level in 3 epochs: it is sgd, step for step
    assert by_rule["flooding"]["test_acc"] == by_rule["sgd"]["test_acc"]
    assert by_rule["flooding"]["train_loss"] == by_rule["sgd"]["train_loss"]


def test_demo_rejects_unknown_rule_label(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--quick", "--rules", "adamw", "--out", str(tmp_path)])


# ----------------------------------------------------------------------------------------
# code in the documentation runs as printed


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.DOTALL)


DOC_PAGES = [ROOT / "README.md", ROOT / "docs" / "index.md", ROOT / "docs" / "writing-a-rule.md",
             ROOT / "docs" / "diagnostics.md", *sorted((ROOT / "docs" / "adapters").glob("*.md"))]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_python_runs(page):
    """Every ```python block of the page, in order, in one fresh interpreter (a page may
    register a rule, which must not leak into this test process)."""
    blocks = [b for b in _python_blocks(page) if "# doc: skip" not in b]
    assert blocks, f"no python code in {page}"
    code = "\n\n".join(blocks)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT)
    )
    assert done.returncode == 0, f"{page.name} code failed:\n{done.stdout}\n{done.stderr}"


# ----------------------------------------------------------------------------------------
# the documentation covers every rule and cites the same papers as the code


def test_every_rule_has_a_docs_page_in_the_nav():
    import gradnorm

    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for name in gradnorm.available_rules():
        page = ROOT / "docs" / "rules" / f"{name}.md"
        assert page.is_file(), f"no documentation page for rule {name!r}"
        assert f"rules/{name}.md" in nav, f"docs/rules/{name}.md is not in mkdocs.yml's nav"
        assert f"(docs/rules/{name}.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


PAPERS = {  # rule class -> arXiv ids its docstring must cite (as README.md and docs/rules do)
    "SAM": ["2010.01412", "2102.11600"],
    "GNP": ["2202.03599"],
    "GR": ["2009.11162", "2210.02720"],
    "FDGR": ["2210.02720"],
    "GAM": ["2303.03108"],
    "Flooding": ["2002.08709"],
    "Coherent": ["1811.08056"],
}


@pytest.mark.parametrize("cls_name", sorted(PAPERS))
def test_rule_docstrings_cite_the_right_papers(cls_name):
    import gradnorm

    doc = getattr(gradnorm.rules, cls_name).__doc__
    for arxiv_id in PAPERS[cls_name]:
        assert f"arxiv.org/abs/{arxiv_id}" in doc, f"{cls_name} docstring should link arXiv:{arxiv_id}"
