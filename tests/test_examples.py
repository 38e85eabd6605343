"""The main job's hand-written derivatives are right, and the code shown in README.md and docs/
runs as printed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradnorm.reproduce._models import MLP

ROOT = Path(__file__).resolve().parent.parent

TINY = (5, 4, 3)  # small enough for a full finite-difference Jacobian
FULL = (64, 64, 10)  # the size `gradnorm reproduce` trains


def _problem(sizes, n=7, seed=0):
    rng = np.random.default_rng(seed)
    model = MLP(sizes)
    x = rng.uniform(0.0, 1.0, size=(n, sizes[0]))
    y = np.eye(sizes[2])[rng.integers(0, sizes[2], size=n)]
    params = model.init(seed)
    params["b1"] = 0.1 * rng.normal(size=sizes[1])  # non-zero biases, so their derivatives are tested too
    params["b2"] = 0.1 * rng.normal(size=sizes[2])
    return model, params, x, y, rng


def _axpy(a, v, p):
    return {k: p[k] + a * v[k] for k in p}


def _random_like(rng, params):
    return {k: rng.normal(size=v.shape) for k, v in params.items()}


# ----------------------------------------------------------------------------------------
# hand-written derivatives of the MLP that `gradnorm reproduce --backend numpy` trains


def test_gradient_matches_central_differences_every_coordinate():
    model, params, x, y, _ = _problem(TINY)
    value, grads = model.numpy_value_and_grad(params, x, y)
    assert value == pytest.approx(model.value(params, x, y), rel=1e-15)
    h = 1e-6
    for key, leaf in params.items():
        fd = np.zeros_like(leaf)
        for i in np.ndindex(leaf.shape):
            bumped = {k: v.copy() for k, v in params.items()}
            bumped[key][i] += h
            up = model.value(bumped, x, y)
            bumped[key][i] -= 2 * h
            down = model.value(bumped, x, y)
            fd[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grads[key], fd, rtol=1e-6, atol=1e-9, err_msg=key)


def test_gradient_matches_directional_differences_full_size():
    model, params, x, y, rng = _problem(FULL, n=32)
    _, grads = model.numpy_value_and_grad(params, x, y)
    h = 1e-5
    for _ in range(3):
        v = _random_like(rng, params)
        exact = sum(float(np.vdot(grads[k], v[k])) for k in params)
        fd = (model.value(_axpy(h, v, params), x, y) - model.value(_axpy(-h, v, params), x, y)) / (2 * h)
        assert exact == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("sizes,n", [(TINY, 7), (FULL, 32)])
def test_hvp_matches_central_differences_of_the_gradient(sizes, n):
    model, params, x, y, rng = _problem(sizes, n=n)
    h = 1e-5
    for _ in range(3):
        v = _random_like(rng, params)
        hv = model.numpy_hvp(params, v, x, y)
        _, g_up = model.numpy_value_and_grad(_axpy(h, v, params), x, y)
        _, g_down = model.numpy_value_and_grad(_axpy(-h, v, params), x, y)
        scale = max(float(np.max(np.abs(hv[k]))) for k in hv)
        for k in params:
            fd = (g_up[k] - g_down[k]) / (2 * h)
            np.testing.assert_allclose(hv[k], fd, rtol=1e-6, atol=1e-8 * scale, err_msg=k)


def test_hvp_is_symmetric_and_linear():
    model, params, x, y, rng = _problem(FULL, n=16)
    u, v = _random_like(rng, params), _random_like(rng, params)
    hu, hv = model.numpy_hvp(params, u, x, y), model.numpy_hvp(params, v, x, y)
    u_hv = sum(float(np.vdot(u[k], hv[k])) for k in params)
    v_hu = sum(float(np.vdot(v[k], hu[k])) for k in params)
    assert u_hv == pytest.approx(v_hu, rel=1e-12)
    h_sum = model.numpy_hvp(params, {k: 2.0 * u[k] - v[k] for k in params}, x, y)
    for k in params:
        np.testing.assert_allclose(h_sum[k], 2.0 * hu[k] - hv[k], rtol=1e-12, atol=1e-14)


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
