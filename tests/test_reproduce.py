"""`gradnorm reproduce`: the verdict logic on synthetic inputs, the same trajectory on every backend,
the flooding = F-GR pair identity, the hand-written HVPs, and an end-to-end run on toy sizes."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradnorm.reproduce import _verdict as V

NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# Verdicts


@pytest.mark.parametrize(
    ("outcomes", "status", "held"),
    [
        ([True, True, True], V.REPRODUCED, 3),
        ([True, False, True], V.REPRODUCED, 2),  # 2 of 3 is enough
        ([True, False, False], V.INCONCLUSIVE, 1),  # a minority
        ([False, False, False], V.NOT_REPRODUCED, 0),
        ([True], V.REPRODUCED, 1),  # one seed (--quick)
        ([False], V.NOT_REPRODUCED, 0),
        ([True, True, True, False, False], V.INCONCLUSIVE, 3),  # 3/5 < ceil(10/3) = 4
        ([True, True, True, True, False], V.REPRODUCED, 4),
        ([], V.INCONCLUSIVE, 0),
    ],
)
def test_verdict_counts(outcomes, status, held):
    v = V.verdict(outcomes)
    assert (v.status, v.held, v.total) == (status, held, len(outcomes))


def test_verdict_text():
    assert str(V.verdict([True, True, False])) == "reproduced (2/3 seeds)"
    assert str(V.verdict([False, False, False])) == "not reproduced (0/3 seeds)"
    assert str(V.verdict([True, None, False])) == "inconclusive (1/3 seeds), 1 undefined"
    assert str(V.verdict([True])) == "reproduced (1/1 seed)"


@pytest.mark.parametrize(
    ("outcomes", "status"),
    [
        ([True, True, None], V.REPRODUCED),  # a failed run does not hide a 2/3 majority
        ([True, NAN, NAN], V.INCONCLUSIVE),  # NaN counts as undefined, never as holding
        ([False, None, None], V.INCONCLUSIVE),  # too little evidence for "not reproduced"
        ([False, False, None], V.NOT_REPRODUCED),
        ([None, None, None], V.INCONCLUSIVE),
        ([NAN], V.INCONCLUSIVE),
    ],
)
def test_verdict_undefined_runs(outcomes, status):
    v = V.verdict(outcomes)
    assert v.status == status
    assert v.defined == sum(o is not None and not (isinstance(o, float) and math.isnan(o)) for o in outcomes)


def test_comparisons_are_strict_and_nan_aware():
    assert V.less(1.0, 2.0) is True
    assert V.less(2.0, 2.0) is False  # a tie does not hold
    assert V.greater(2.0, 2.0) is False
    assert V.less(1.9, 2.0, rel_tol=0.1) is False  # within the tolerance: a tie
    assert V.less(1.7, 2.0, rel_tol=0.1) is True
    assert V.less(NAN, 1.0) is None and V.greater(1.0, None) is None and V.less(math.inf, 1.0) is None
    assert V.increasing([1.0, 2.0, 3.0]) is True
    assert V.increasing([1.0, 1.0, 3.0]) is False
    assert V.increasing([1.0, NAN, 3.0]) is None
    assert V.within(1.05, 1.0, 0.1) is True and V.within(1.2, 1.0, 0.1) is False
    assert V.all_of([True, True]) is True
    assert V.all_of([True, None]) is None
    assert V.all_of([False, None]) is False  # one failure decides


def test_claim_verdict_combines_statements():
    r, n, i = V.verdict([True] * 3), V.verdict([False] * 3), V.verdict([True, False, False])
    assert V.combine([("a", r), ("b", r)]).status == V.REPRODUCED
    assert V.combine([("a", n), ("b", n)]).status == V.NOT_REPRODUCED
    assert V.combine([("a", i), ("b", i)]).status == V.INCONCLUSIVE
    assert V.combine([("a", r), ("b", n)]).status == V.PARTLY
    assert V.combine([("a", r), ("b", i)]).status == V.PARTLY
    assert V.combine([("a", n), ("b", i)]).status == V.NOT_REPRODUCED  # nothing reproduced, something refuted
    assert V.combine([]).status == V.INCONCLUSIVE
    assert str(V.combine([("a", r)])) == "reproduced (3/3 seeds)"
    assert str(V.combine([("a", r), ("b", n)])) == "partly reproduced (2 statements: 1 reproduced, 1 not reproduced)"


def test_claim_result_verdict_uses_headline_statements_only():
    from gradnorm.reproduce._claims import ClaimResult

    res = ClaimResult(0, "t", [], "")
    res.add("headline", [True, True, False])
    res.add("detail", [False, False, False], headline=False)
    res.finish(0.0)
    assert res.verdict.status == V.REPRODUCED
    assert [s.verdict.status for s in res.statements] == [V.REPRODUCED, V.NOT_REPRODUCED]


# ---------------------------------------------------------------------------------------------
# Models, backends and the claim-4 identity


def _tree_maxabs(a, b):
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


@pytest.mark.parametrize("which", ["mlp", "dln"])
def test_numpy_hvp_is_a_finite_difference_of_the_gradient(which):
    from gradnorm.reproduce._data import digits, dln_data, one_hot
    from gradnorm.reproduce._models import DLN, MLP

    rng = np.random.default_rng(0)
    if which == "mlp":
        model = MLP()
        params = model.init(0)
        d = digits(100, 0)
        x, y = d.x_train, one_hot(d.y_train)
    else:
        model = DLN()
        params = {"u": rng.normal(size=100), "v": rng.normal(size=100)}
        d = dln_data(0)
        x, y = d.x, d.y
    v = {k: rng.normal(size=p.shape) for k, p in params.items()}
    h = 1e-5
    plus = model.numpy_value_and_grad({k: params[k] + h * v[k] for k in params}, x, y)[1]
    minus = model.numpy_value_and_grad({k: params[k] - h * v[k] for k in params}, x, y)[1]
    fd = {k: (plus[k] - minus[k]) / (2 * h) for k in params}
    hv = model.numpy_hvp(params, v, x, y)
    scale = max(float(np.max(np.abs(hv[k]))) for k in hv)
    assert _tree_maxabs(hv, fd) <= 1e-7 * scale
    # and the hand-written gradient is the gradient of the value
    loss, g = model.numpy_value_and_grad(params, x, y)
    assert math.isclose(float(loss), model.value(params, x, y), rel_tol=1e-12)
    directional = (model.value({k: params[k] + h * v[k] for k in params}, x, y)
                   - model.value({k: params[k] - h * v[k] for k in params}, x, y)) / (2 * h)
    assert math.isclose(directional, sum(float(np.vdot(g[k], v[k])) for k in g), rel_tol=1e-6)


def _one_blas_thread():
    """One BLAS thread, as the command line runs (small matrices; a loaded 2-core machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(1)


def _silent():
    class _P:
        def task(self, *a, **k):
            return self

        def describe(self, *a):
            pass

        def advance(self, *a):
            pass

        def close(self):
            pass

    return _P()


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_flooding_pairs_equal_the_fd_gr_penalty_step(eta):
    from dataclasses import replace

    from gradnorm.reproduce._backends import get_backend
    from gradnorm.reproduce._claims import PRESETS, Context, _flood_instance

    sizes = replace(PRESETS["smoke"], c4_pairs=20)
    ctx = Context(get_backend("numpy"), "float64", sizes, _silent())
    with np.errstate(all="ignore"), _one_blas_thread():
        inst = _flood_instance(ctx, 0, eta, _silent())
    assert inst["reached"] and inst["pairs"] == 20
    assert inst["max_pair_diff"] <= 1e-13  # rounding only


# ---------------------------------------------------------------------------------------------
# The same trajectory on every backend

_RULES = [("sam", {"rho": 0.05}), ("gr", {"gamma": 0.5})]
_STEPS = 50


def _claim1_trajectory(backend, rule, hyper):
    from gradnorm.reproduce._claims import C1_BATCH, C1_LR, C1_TRAIN
    from gradnorm.reproduce._data import digits, one_hot
    from gradnorm.reproduce._models import MLP
    from gradnorm.reproduce._train import train

    data = digits(C1_TRAIN, 0)
    model = MLP()
    run = train(backend, model, data.x_train, one_hot(data.y_train), model.init(0), label=rule, rule=rule,
                hyper=hyper, seed=0, lr=C1_LR, batch_size=C1_BATCH, max_epochs=10, order_seed=10_000,
                max_steps=_STEPS)
    assert run.steps == _STEPS and not run.diverged
    return run.params


@pytest.fixture(scope="module")
def numpy_trajectories():
    from gradnorm.reproduce._backends import get_backend

    backend = get_backend("numpy")
    with _one_blas_thread():
        return {rule: _claim1_trajectory(backend, rule, hyper) for rule, hyper in _RULES}


@pytest.mark.parametrize("name", ["torch", "jax", "tf"])
def test_first_50_steps_agree_across_backends(name, numpy_trajectories):
    module = {"torch": "torch", "jax": "jax", "tf": "tensorflow"}[name]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    from contextlib import nullcontext

    from gradnorm.reproduce._backends import get_backend

    if name == "jax":
        import jax

        context = jax.enable_x64(True)  # float64 here only; other tests keep JAX's default
    else:
        context = nullcontext()
    with context, _one_blas_thread():
        backend = get_backend(name)
        for rule, hyper in _RULES:
            params = _claim1_trajectory(backend, rule, hyper)
            assert all(p.dtype == np.float64 for p in params.values())
            ref = numpy_trajectories[rule]
            assert _tree_maxabs(params, ref) <= 1e-10, (name, rule)
            # the trajectory moved: the comparison is not trivially between initial weights
            from gradnorm.reproduce._models import MLP

            assert _tree_maxabs(ref, MLP().init(0)) > 1e-2


# ---------------------------------------------------------------------------------------------
# The command line


def test_import_is_light():
    code = ("import sys, gradnorm, gradnorm.reproduce, gradnorm.reproduce.cli; "
            "print([m for m in ('numpy', 'torch', 'jax', 'tensorflow', 'sklearn', 'matplotlib', 'rich') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().replace("'", '"'))
    assert not {"torch", "jax", "tensorflow", "sklearn", "matplotlib", "rich"} & set(loaded)


def test_claims_option_is_validated():
    from gradnorm.reproduce.cli import build_parser

    args = build_parser().parse_args(["reproduce", "--claims", "4,1"])
    assert args.claims == (1, 4)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reproduce", "--claims", "7"])


def test_reproduce_quick_end_to_end(tmp_path: Path):
    """`gradnorm reproduce --quick` (the command CI runs, NumPy backend): every claim runs, prints a
    verdict, and the report and plots are written."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "gradnorm", "reproduce", "--quick", "--out", str(out), "--no-progress"],
        check=False, capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for n in range(1, 7):
        assert f"Verdict, claim {n}:" in proc.stdout
    report = (out / "reproduce.md").read_text(encoding="utf-8")
    for n in range(1, 7):
        assert f"## Claim {n}:" in report
    assert report.count("**Verdict: ") == 6
    pngs = sorted(p.name for p in out.glob("*.png"))
    for n in range(1, 7):
        assert any(name.startswith(f"claim{n}_") for name in pngs), pngs
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report
