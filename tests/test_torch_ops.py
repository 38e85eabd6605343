"""TorchForeachOps (fused torch._foreach_* kernels) equals the Array API ArrayOps, never
mutates its inputs and keeps dtypes; the rules give the same directions through it."""

from __future__ import annotations

import array_api_compat
import pytest

torch = pytest.importorskip("torch")

import gradnorm  # noqa: E402
from gradnorm import ArrayOps  # noqa: E402
from gradnorm.torch import TorchForeachOps  # noqa: E402

SHAPES = [(3, 4), (5,), (), (2, 1, 3)]


def leaves(dtypes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(d) for s, d in zip(SHAPES, dtypes)]


DTYPE_SETS = {
    "float64": [torch.float64] * 4,
    "float32": [torch.float32] * 4,
    "bfloat16": [torch.bfloat16] * 4,
    "mixed": [torch.float32, torch.float64, torch.float32, torch.bfloat16],
}
SCALARS = {
    "python": 0.37,
    "tensor64": torch.tensor(0.37, dtype=torch.float64),
    "tensor32": torch.tensor(0.37, dtype=torch.float32),
}


def tol(dtypes):
    if torch.bfloat16 in dtypes:
        return 1e-2
    if torch.float32 in dtypes:
        return 1e-6
    return 1e-13


def check_same(a, b, rtol):
    if isinstance(a, list):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert u.dtype == v.dtype and u.shape == v.shape
            torch.testing.assert_close(u.double(), v.double(), rtol=rtol, atol=rtol)
    else:
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("scalar", list(SCALARS))
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS))
def test_every_operation_matches_array_ops_and_mutates_nothing(dtypes, scalar):
    dts = DTYPE_SETS[dtypes]
    x, y = leaves(dts, 0), leaves(dts, 1)
    xc, yc = [t.clone() for t in x], [t.clone() for t in y]
    s = SCALARS[scalar]
    fast, ref = TorchForeachOps(), ArrayOps(array_api_compat.array_namespace(x[0]))
    rtol = tol(dts)
    calls = [
        ("add", (x, y)), ("sub", (x, y)), ("scale", (s, x)), ("axpy", (s, x, y)), ("lincomb", (s, x, -1.5, y)),
        ("lincomb", (0.5, x, s, y)), ("mul", (x, y)), ("abs", (x,)), ("sign", (x,)), ("add_scalar", (x, s)),
        ("vdot", (x, y)), ("vdot", (x, x)), ("norm", (x,)), ("weighted_norm", (x, y)), ("count_below", (x, 0.5)),
    ]
    for name, args in calls:
        check_same(getattr(fast, name)(*args), getattr(ref, name)(*args), rtol)
    for a, b in zip(x + y, xc + yc):
        assert torch.equal(a, b)  # inputs untouched


def test_reductions_accumulate_in_float32_for_half_precision():
    x = [torch.full((1000,), 300.0, dtype=torch.float16)]  # squares overflow float16
    n = TorchForeachOps().norm(x)
    assert n.dtype == torch.float32 and torch.isfinite(n)
    assert float(n) == pytest.approx(300.0 * 1000**0.5, rel=1e-3)


SETTINGS = [
    ("sgd", {}), ("sam", {"rho": 0.05}), ("sam", {"rho": 0.5, "adaptive": True, "eta": 0.01}),
    ("gnp", {"r": 0.05, "alpha": 0.8, "mix_unit_gradient": True}), ("gr", {"gamma": 0.1, "penalty": "norm"}),
    ("fd_gr", {"gamma": 0.1, "eps": 0.01, "difference": "central", "normalize": True}),
    ("gam", {"adaptive": True}), ("gam", {"variant": "paper"}), ("flooding", {"b": 10.0}),
    ("coherent", {"lam": 0.3, "threshold": 0.2, "penalty": "l1"}),
]


@pytest.mark.parametrize("rule,hyper", SETTINGS, ids=[f"{r}-{h}" for r, h in SETTINGS])
def test_rules_give_the_same_direction_through_foreach_ops(rule, hyper):
    g = torch.Generator().manual_seed(3)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = A @ A.T + torch.eye(6, dtype=torch.float64)

    def grad_fn(p):
        x = torch.cat([p["a"].reshape(-1), p["b"].reshape(-1)])
        gx = A @ x
        return 0.5 * x @ gx + torch.sin(x).sum(), {"a": (gx + torch.cos(x))[:4].reshape(2, 2), "b": (gx + torch.cos(x))[4:]}

    def hvp_fn(p, v):
        x = torch.cat([p["a"].reshape(-1), p["b"].reshape(-1)])
        u = torch.cat([v["a"].reshape(-1), v["b"].reshape(-1)])
        hu = A @ u - torch.sin(x) * u
        return {"a": hu[:4].reshape(2, 2), "b": hu[4:]}

    params = {"a": torch.randn(2, 2, generator=g, dtype=torch.float64), "b": torch.randn(2, generator=g, dtype=torch.float64)}
    r = gradnorm.rules.get(rule, **hyper)
    oracle = gradnorm.FunctionOracle(grad_fn, hvp_fn)
    d_ref, s_ref, i_ref = r.update(params, r.init(params), oracle)
    d_fast, s_fast, i_fast = r.update(params, r.init(params), oracle, ops=TorchForeachOps())
    for k in params:
        torch.testing.assert_close(d_fast[k], d_ref[k], rtol=1e-12, atol=1e-13)
    for k in ("loss", "grad_norm", "update_norm"):
        torch.testing.assert_close(torch.as_tensor(i_fast[k]), torch.as_tensor(i_ref[k]), rtol=1e-12, atol=1e-13)
