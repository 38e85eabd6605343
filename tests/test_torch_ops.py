"""TorchForeachOps (fused ``torch._foreach_*`` kernels) against the Array API ``ArrayOps``.

Every method equals ``ArrayOps(array_api_compat.torch)`` up to rounding on lists of several
shapes (0-d and non-contiguous leaves included) in float64, float32, bfloat16, float16 and
mixed-dtype lists, with Python-number and 0-d tensor scalars; inputs are never mutated;
dtypes and devices are kept; nothing is read back to the host; coherent's sparsity
(``gradnorm.rules._coherent.fraction_below``) through it equals a NumPy count; scalars too large
for a leaf's dtype saturate instead of overflowing; every rule gives the same direction, info and
state through it as through the default ops.
"""

from __future__ import annotations

import contextlib
import math

import array_api_compat
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradnorm  # noqa: E402
from gradnorm import ArrayOps, PerLeaf  # noqa: E402
from gradnorm.torch import TorchForeachOps  # noqa: E402
from gradnorm.rules._coherent import fraction_below  # noqa: E402
from gradnorm.torch import _ops  # noqa: E402
from conformance.settings import settings  # noqa: E402

XP = array_api_compat.array_namespace(torch.empty(0))

# five leaves: a matrix, a vector, a 0-d leaf, a 3-d leaf, a transposed (non-contiguous) view
SHAPES = [(3, 4), (5,), (), (2, 1, 3), "transposed"]

DTYPE_SETS = {
    "float64": [torch.float64] * 5,
    "float32": [torch.float32] * 5,
    "bfloat16": [torch.bfloat16] * 5,
    "float16": [torch.float16] * 5,
    "mixed": [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float16],
    "mixed-no-float64": [torch.bfloat16, torch.float32, torch.float32, torch.float16, torch.bfloat16],
}

SCALARS = {
    "python": 0.37,
    "python-negative": -1.75,
    "python-int": 2,
    "tensor64": lambda: torch.tensor(0.37, dtype=torch.float64),
    "tensor32": lambda: torch.tensor(-1.3, dtype=torch.float32),
    "tensor-bf16": lambda: torch.tensor(0.61, dtype=torch.bfloat16),
    # one value per leaf (parameter groups with their own hyperparameter values)
    "per-leaf": lambda: PerLeaf([0.37, -1.75, 2.0, 0.0, 1.5]),
    "per-leaf-tensor-factor": lambda: PerLeaf([0.37, -1.75, 2.0, 0.0, 1.5]) / torch.tensor(3.0, dtype=torch.float64),
    "per-leaf-tensors": lambda: PerLeaf([torch.tensor(v, dtype=torch.float32) for v in (0.5, -1.0, 2.0, 0.25, 1.0)]),
}


def make_leaves(dtypes, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in zip(SHAPES, dtypes):
        if shape == "transposed":
            leaf = (torch.randn(4, 3, generator=g, dtype=torch.float64) * scale).to(dtype).T
            assert not leaf.is_contiguous()
        else:
            leaf = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        out.append(leaf)
    return out


def scalar_of(name):
    s = SCALARS[name]
    return s() if callable(s) else s


def eps(dtype):
    return torch.finfo(dtype).eps


def acc_dtype(leaves):
    return torch.float64 if any(t.dtype == torch.float64 for t in leaves) else torch.float32


def magnitude(*things):
    """max |entry| over the leaf lists and scalars given (the scale of a rounding error)."""
    m = 0.0
    for t in things:
        if isinstance(t, list):
            m = max([m] + [float(a.abs().max()) for a in t if a.numel()])
        elif isinstance(t, torch.Tensor):
            m = max(m, abs(float(t)))
        elif isinstance(t, PerLeaf):
            m = max([m] + [abs(float(v)) for v in t.leaf_values()])
        else:
            m = max(m, abs(float(t)))
    return m


def assert_leaves_close(got, want, scale):
    """Leafwise: same dtype, shape and device, values within a few units in the last place of
    the leaf dtype relative to `scale` (the size of the terms that were rounded)."""
    assert isinstance(got, list) and len(got) == len(want)
    for u, v in zip(got, want):
        assert u.dtype == v.dtype and u.shape == v.shape and u.device == v.device, (u, v)
        tol = 4 * eps(v.dtype) * max(scale, 1.0)
        torch.testing.assert_close(u.double(), v.double(), rtol=tol, atol=tol, equal_nan=True)


def assert_scalar_close(got, want, atol):
    assert isinstance(got, torch.Tensor) and got.shape == () and got.dtype == want.dtype, (got, want)
    assert got.device == want.device
    torch.testing.assert_close(got.double(), want.double(), rtol=atol, atol=atol, equal_nan=True)


def ops_pair():
    return TorchForeachOps(), ArrayOps(XP)


def snapshot(*things):
    return [[t.clone() for t in x] if isinstance(x, list) else (x.clone() if isinstance(x, torch.Tensor) else x) for x in things]


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        if isinstance(a, list):
            for u, v in zip(b, a):
                torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True)
        elif isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------
# every method against ArrayOps


def test_namespace_is_array_api_compat_torch():
    assert TorchForeachOps().xp is XP
    assert isinstance(TorchForeachOps(), ArrayOps)


@pytest.mark.parametrize("scalar", list(SCALARS))
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS))
def test_elementwise_operations_match_array_ops(dtypes, scalar):
    dts = DTYPE_SETS[dtypes]
    x, y = make_leaves(dts, 0), make_leaves(dts, 1)
    s = scalar_of(scalar)
    fast, ref = ops_pair()
    m = magnitude(x, y) * (1 + magnitude(s))
    calls = [
        ("add", (x, y)),
        ("sub", (x, y)),
        ("mul", (x, y)),
        ("abs", (x,)),
        ("sign", (x,)),
        ("scale", (s, x)),
        ("axpy", (s, x, y)),
        ("add_scalar", (x, s)),
        ("lincomb", (s, x, -1.5, y)),
        ("lincomb", (0.5, x, s, y)),
        ("lincomb", (s, x, s, y)),
        ("lincomb", (0.25, x, 3.0, y)),
    ]
    for name, args in calls:
        before = snapshot(*args)
        got = getattr(fast, name)(*args)
        assert_unchanged(before, args)
        want = getattr(ref, name)(*args)
        assert_leaves_close(got, want, 4 * m if name == "lincomb" else m)
        for out, leaf in zip(got, x):
            assert out.dtype == leaf.dtype and out.device == leaf.device  # the dtype of each leaf is kept
        for out in got:
            assert all(out is not t for t in x + y)  # fresh tensors, never an input


@pytest.mark.parametrize("dtypes", list(DTYPE_SETS))
def test_reductions_match_array_ops(dtypes):
    dts = DTYPE_SETS[dtypes]
    x, y, w = make_leaves(dts, 0), make_leaves(dts, 1), make_leaves(dts, 2)
    fast, ref = ops_pair()
    acc = acc_dtype(x)
    n = sum(t.numel() for t in x)
    before = snapshot(x, y, w)

    norm_x, norm_y = float(ref.norm(x)), float(ref.norm(y))
    assert_scalar_close(fast.norm(x), ref.norm(x), 8 * eps(acc) * norm_x)
    assert_scalar_close(fast.vdot(x, x), ref.vdot(x, x), 8 * eps(acc) * norm_x**2)
    # the error of a dot product scales with sum |x_i y_i| <= ||x|| ||y||, not with the result
    assert_scalar_close(fast.vdot(x, y), ref.vdot(x, y), 8 * eps(acc) * math.sqrt(n) * norm_x * norm_y)
    for tol in (0.0, 0.05, 0.5, 1.0, 10.0):
        want = numpy_fraction_below(x, tol)
        for ops in (fast, ref):
            got = fraction_below(x, tol, ops)
            assert got.dtype == acc and got.device == x[0].device
            assert float(got) == pytest.approx(want, rel=8 * eps(acc), abs=0.0)
    for result in (fast.norm(x), fast.vdot(x, y)):
        assert result.dtype == acc and result.device == x[0].device
    assert_unchanged(before, [x, y, w])


def numpy_fraction_below(leaves, tol):
    """The fraction of entries with |x| < tol, counted in NumPy float64, with `tol` rounded to each
    leaf's dtype first (a comparison with a Python number happens in the tensor's dtype)."""
    count, size = 0, 0
    for leaf in leaves:
        threshold = float(torch.tensor(float(tol), dtype=leaf.dtype)) if not isinstance(tol, torch.Tensor) else float(tol.to(leaf.dtype))
        values = leaf.detach().double().numpy()
        count += int(np.count_nonzero(np.abs(values) < threshold))
        size += values.size
    return count / max(size, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scalar_matches_array_ops(dtype):
    fast, ref = ops_pair()
    x = make_leaves([dtype] * 5, 0)
    like = fast.scalar(2.5, x)
    assert like.dtype == ref.scalar(2.5, x).dtype and like.shape == () and float(like) == 2.5


def test_fraction_below_at_the_threshold_matches_numpy():
    """|x| == tol is not below; the next number down is; nan and inf never are (every dtype, a
    Python-number and a float64 0-d tensor tolerance)."""
    fast, ref = ops_pair()
    tol = 1e-3
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        t = torch.tensor(tol, dtype=dtype)
        below = torch.nextafter(t, torch.zeros_like(t))  # the next number down, in the dtype
        assert below < t
        nan, inf = torch.tensor(float("nan"), dtype=dtype), torch.tensor(float("inf"), dtype=dtype)
        leaf = torch.stack([t, -t, below, -below, nan, inf, -inf, torch.zeros((), dtype=dtype)])
        for x in ([leaf], [leaf, torch.ones((), dtype=dtype) * 1e-5]):
            for tolerance in (tol, torch.tensor(tol, dtype=torch.float64)):
                want = numpy_fraction_below(x, tolerance)
                assert want == (3 + len(x) - 1) / sum(a.numel() for a in x)  # below, -below, 0 (and 1e-5)
                for ops in (fast, ref):
                    got = fraction_below(x, tolerance, ops)
                    assert got.dtype == acc_dtype(x) and float(got) == pytest.approx(want, rel=1e-7, abs=0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_special_values_match_array_ops(dtype):
    """sign(nan) is nan (the Array API's answer, not torch.sign's 0), infinities keep their sign,
    and nan/inf flow through the reductions as in ArrayOps."""
    fast, ref = ops_pair()
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 2.0, -3.0], dtype=dtype)
    x = [special, torch.tensor(float("nan"), dtype=dtype), torch.tensor(-0.0, dtype=dtype)]
    y = [torch.flip(special, (0,)), torch.tensor(1.0, dtype=dtype), torch.tensor(5.0, dtype=dtype)]
    got = fast.sign(x)
    assert_leaves_close(got, ref.sign(x), 1.0)
    assert torch.isnan(got[0][0]) and torch.isnan(got[1])
    for name, args in [("abs", (x,)), ("add", (x, y)), ("mul", (x, y)), ("axpy", (2.0, x, y)), ("scale", (0.5, x))]:
        assert_leaves_close(getattr(fast, name)(*args), getattr(ref, name)(*args), 1.0)
    for name, args in [("norm", (x,)), ("vdot", (x, y)), ("vdot", (y, y))]:
        assert_scalar_close(getattr(fast, name)(*args), getattr(ref, name)(*args), 1e-6)
    assert float(fraction_below(x, 1.0, fast)) == pytest.approx(numpy_fraction_below(x, 1.0), rel=1e-7)
    assert torch.isinf(fast.norm([special[1:3]]))


def test_zero_size_and_all_zero_dimensional_leaves():
    fast, ref = ops_pair()
    for x in (
        [torch.ones(0, dtype=torch.float32), torch.tensor(3.0), torch.tensor(-4.0)],
        [torch.tensor(3.0, dtype=torch.float64)],
        [torch.zeros(2, 0, dtype=torch.float64), torch.ones(3, dtype=torch.float64)],
    ):
        y = [t + 1 for t in x]
        for name, args in [("add", (x, y)), ("axpy", (torch.tensor(2.0), x, y)), ("sign", (x,)), ("lincomb", (1.0, x, torch.tensor(0.5), y))]:
            assert_leaves_close(getattr(fast, name)(*args), getattr(ref, name)(*args), 10.0)
        for name, args in [("norm", (x,)), ("vdot", (x, y))]:
            assert_scalar_close(getattr(fast, name)(*args), getattr(ref, name)(*args), 1e-6)
        assert float(fraction_below(x, 3.5, fast)) == pytest.approx(numpy_fraction_below(x, 3.5), rel=1e-7)


def test_empty_lists():
    fast = TorchForeachOps()
    for name, args in [("add", ([], [])), ("scale", (2.0, [])), ("axpy", (torch.tensor(1.0), [], [])),
                       ("lincomb", (1.0, [], 2.0, [])), ("sign", ([],)), ("add_scalar", ([], 1.0))]:
        assert getattr(fast, name)(*args) == []
    for name, args in [("norm", ([],)), ("vdot", ([], []))]:
        out = getattr(fast, name)(*args)
        assert out.shape == () and out.dtype == torch.float32 and float(out) == 0.0


# --------------------------------------------------------------------------------------------
# precision of the reductions


def test_reductions_accumulate_in_float32_for_half_precision():
    x = [torch.full((1000,), 300.0, dtype=torch.float16), torch.full((10,), 300.0, dtype=torch.bfloat16)]
    fast = TorchForeachOps()
    n = fast.norm(x)  # 300^2 * 1010 overflows float16
    assert n.dtype == torch.float32
    assert float(n) == pytest.approx(300.0 * math.sqrt(1010), rel=1e-6)
    assert float(fast.vdot(x, [t * 1 for t in x])) == pytest.approx(300.0**2 * 1010, rel=1e-6)


def test_reductions_accumulate_in_float64_when_one_leaf_is_float64():
    """Products and sums of a float32 leaf are exact in float64 here, and not in float32."""
    fast = TorchForeachOps()
    x32 = torch.tensor([4097.0, 1.0, -4097.0], dtype=torch.float32)
    y32 = torch.tensor([4097.0, 1.0, 4097.0], dtype=torch.float32)
    zero64 = torch.zeros((), dtype=torch.float64)
    d = fast.vdot([x32, zero64], [y32, zero64])
    assert d.dtype == torch.float64 and float(d) == 1.0  # 4097^2 = 16785409 needs 25 bits
    n = fast.norm([x32, zero64])
    assert n.dtype == torch.float64
    assert float(n) == pytest.approx(math.sqrt(2 * 4097.0**2 + 1), rel=1e-15)


def test_vdot_of_nearly_orthogonal_lists_is_accurate():
    """The signed sum 2 sum(max(p, 0)) - sum(|p|) keeps the accuracy of a plain sum."""
    fast, ref = ops_pair()
    g = torch.Generator().manual_seed(5)
    x = [torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(7, 9, generator=g, dtype=torch.float64)]
    y = [t.clone() for t in x]
    y[1] = -x[1] * float(x[0] @ x[0]) / float((x[1] * x[1]).sum())  # <x, y> = 0 exactly in real numbers
    exact = math.fsum((x[0] * y[0]).tolist()) + math.fsum((x[1] * y[1]).reshape(-1).tolist())
    scale = float(ref.norm(x)) * float(ref.norm(y))
    assert abs(float(fast.vdot(x, y)) - exact) < 64 * eps(torch.float64) * scale
    assert abs(float(ref.vdot(x, y)) - exact) < 64 * eps(torch.float64) * scale


def test_older_pytorch_fallback_for_sums_of_squares(monkeypatch):
    """Without torch._foreach_powsum (older PyTorch) the sums of squares come from _foreach_norm."""
    monkeypatch.setattr(_ops, "_sumsq", _ops._sumsq_via_norm)
    fast, ref = ops_pair()
    for dts in (DTYPE_SETS["float64"], DTYPE_SETS["mixed"]):
        x, y = make_leaves(dts, 0), make_leaves(dts, 1)
        acc = acc_dtype(x)
        assert_scalar_close(fast.norm(x), ref.norm(x), 16 * eps(acc) * float(ref.norm(x)))
        assert_scalar_close(fast.vdot(x, y), ref.vdot(x, y), 32 * eps(acc) * float(ref.norm(x)) * float(ref.norm(y)))


# --------------------------------------------------------------------------------------------
# no host synchronization


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Any Python-level read of a tensor's value (item, float, int, bool, tolist, numpy)
    raises: on an accelerator each of those would wait for the device."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"):
            m.setattr(torch.Tensor, name, refuse)
        yield


def test_no_tensor_is_read_back_to_the_host(monkeypatch):
    x, y = make_leaves(DTYPE_SETS["mixed"], 0), make_leaves(DTYPE_SETS["mixed"], 1)
    s = torch.tensor(0.3, dtype=torch.float64)
    fast = TorchForeachOps()
    with no_host_reads(monkeypatch):
        fast.scale(s, x), fast.axpy(s, x, y), fast.lincomb(s, x, s, y), fast.add_scalar(x, s)
        fast.sign(x), fast.norm(x), fast.vdot(x, y), fraction_below(x, 0.1, fast)
        fraction_below(x, s, fast)
        n = fast.norm(x)
        fast.scale(1.0 / (n + 1e-12), x)
    with pytest.raises(AssertionError, match="read back"), no_host_reads(monkeypatch):
        float(n)  # the guard itself works


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_paths_do_not_synchronize():
    dev = torch.device("cuda")
    x = [t.to(dev) for t in make_leaves(DTYPE_SETS["mixed"], 0)]
    y = [t.to(dev) for t in make_leaves(DTYPE_SETS["mixed"], 1)]
    fast, ref = TorchForeachOps(), ArrayOps(XP)
    cpu_scalar = torch.tensor(0.5, dtype=torch.float64)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        n = fast.norm(x)
        s = 0.1 / (n + 1e-12)
        out = [fast.axpy(s, x, y), fast.lincomb(s, x, 0.5, y), fast.scale(cpu_scalar, x), fast.sign(x)]
        reds = [fast.vdot(x, y), fraction_below(x, 0.5, fast)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_leaves_close(out[0], ref.axpy(s, x, y), 10.0)
    assert_leaves_close(out[2], ref.scale(cpu_scalar, x), 10.0)
    assert all(t.device.type == "cuda" for t in out[0] + reds)
    assert_scalar_close(reds[0], ref.vdot(x, y), 1e-10)


# --------------------------------------------------------------------------------------------
# every rule through TorchForeachOps


SETTINGS = settings("torch_ops")  # every rule and its variants (conformance/settings.py)


def problem(dtype=torch.float64):
    """A small tanh network on a dict of leaves (a 0-d leaf included), with autograd
    gradients and double-backward Hessian-vector products."""
    g = torch.Generator().manual_seed(3)
    params = {
        "w1": torch.randn(4, 3, generator=g, dtype=torch.float64).to(dtype),
        "b1": torch.randn(4, generator=g, dtype=torch.float64).to(dtype),
        "w2": torch.randn(2, 4, generator=g, dtype=torch.float64).to(dtype),
        "temperature": torch.tensor(0.7, dtype=dtype),
    }
    x = torch.randn(8, 3, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randn(8, 2, generator=g, dtype=torch.float64).to(dtype)

    def loss(p):
        h = torch.tanh(x @ p["w1"].T + p["b1"])
        return ((p["temperature"] * h @ p["w2"].T - t) ** 2).mean()

    def grad_fn(p):
        with torch.enable_grad():
            q = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            value = loss(q)
            grads = torch.autograd.grad(value, list(q.values()))
        return value.detach(), dict(zip(q, grads))

    def hvp_fn(p, v):
        with torch.enable_grad():
            q = {k: t.detach().requires_grad_(True) for k, t in p.items()}
            grads = torch.autograd.grad(loss(q), list(q.values()), create_graph=True)
            hv = torch.autograd.grad(grads, list(q.values()), grad_outputs=[v[k] for k in q])
        return dict(zip(q, hv))

    return params, gradnorm.FunctionOracle(grad_fn, hvp_fn)


def assert_trees_close(a, b, rtol, atol):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_trees_close(a[k], b[k], rtol, atol)
    elif isinstance(a, (tuple, list)):  # a NamedTuple state, a list of buffers in one
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b):
            assert_trees_close(u, v, rtol, atol)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    else:
        assert a == b


def run_steps(rule, params, oracle, ops, steps=3, lr=0.1):
    """A few plain gradient steps along the rule's direction: (directions, states, infos)."""
    state = rule.init(params)
    record = []
    for _ in range(steps):
        direction, state, info = rule.update(params, state, oracle, ops=ops)
        record.append((direction, state, info))
        params = {k: p - lr * direction[k] for k, p in params.items()}
    return record


@pytest.mark.parametrize("rule,hyper", SETTINGS, ids=[f"{r}-{'-'.join(f'{k}={v}' for k, v in h.items())}" for r, h in SETTINGS])
def test_rules_give_the_same_steps_through_foreach_ops(rule, hyper):
    params, oracle = problem()
    before = {k: v.clone() for k, v in params.items()}
    r = gradnorm.rules.get(rule, **hyper)
    want = run_steps(r, params, oracle, None)
    got = run_steps(r, params, oracle, TorchForeachOps())
    for (d1, s1, i1), (d2, s2, i2) in zip(got, want):
        assert_trees_close(d1, d2, rtol=1e-12, atol=1e-14)
        assert_trees_close(s1, s2, rtol=1e-12, atol=1e-14)  # counters exactly; buffers (periodic's g_v) closely
        assert_trees_close(i1, i2, rtol=1e-12, atol=1e-14)
    for k in params:
        assert torch.equal(params[k], before[k])


@pytest.mark.parametrize("rule,hyper", settings("torch_ops_tensor"), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("scalar_dtype", [torch.float64, torch.float32])
def test_rules_with_tensor_hyperparameters(rule, hyper, scalar_dtype):
    """0-d tensor hyperparameters (schedules) take the arithmetic path: 0-d tensor scalars of
    another dtype than the leaves, cast per leaf, never read back."""
    params, oracle = problem()
    hyper = {k: torch.tensor(v, dtype=scalar_dtype) if isinstance(v, float) else v for k, v in hyper.items()}
    r = gradnorm.rules.get(rule, **hyper)
    d_ref, s_ref, i_ref = r.update(params, r.init(params), oracle)
    d_fast, s_fast, i_fast = r.update(params, r.init(params), oracle, ops=TorchForeachOps())
    tol = 1e-12 if scalar_dtype == torch.float64 else 1e-6
    assert_trees_close(d_fast, d_ref, rtol=tol, atol=tol)
    assert_trees_close(i_fast, i_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("rule,hyper", SETTINGS[::2], ids=[r for r, _ in SETTINGS[::2]])
def test_rules_in_float32_and_without_host_reads(rule, hyper, monkeypatch):
    params, oracle = problem(torch.float32)
    r = gradnorm.rules.get(rule, **hyper)
    if r.mean_grad_evals != r.grad_evals:
        pytest.skip("a periodic rule picks its branch by reading its step counter, which it keeps in host memory "
                    "(tests/test_periodic.py checks that this is the one read)")
    d_ref, _, i_ref = r.update(params, r.init(params), oracle)
    with no_host_reads(monkeypatch):  # the rule math on TorchForeachOps (the oracle is autograd's)
        d_fast, _, i_fast = r.update(params, r.init(params), oracle, ops=TorchForeachOps())
    assert_trees_close(d_fast, d_ref, rtol=2e-5, atol=2e-6)
    assert all(d.dtype == torch.float32 for d in d_fast.values())
    assert i_fast["grad_norm"].dtype == torch.float32


# --------------------------------------------------------------------------------------------
# the in-place axpy the optimizer forms evaluation points with, and the fused finiteness check


@pytest.mark.parametrize("scalar", list(SCALARS))
@pytest.mark.parametrize("dtypes", ["float64", "float32", "mixed"])
def test_inplace_axpy_matches_axpy(dtypes, scalar):
    dts = DTYPE_SETS[dtypes]
    x, y = make_leaves(dts, 0), make_leaves(dts, 1)
    s = scalar_of(scalar)
    fast, ref = ops_pair()
    want = ref.axpy(s, x, y)
    target = [t.clone() for t in y]
    x_before = snapshot(x)
    assert fast.axpy_(s, x, target) is None
    assert_unchanged(x_before, [x])
    assert_leaves_close(target, want, magnitude(x, y) * (1 + magnitude(s)))


# the `*_into` methods: (name, arguments from (s, x, y), which list is `out`, bit for bit with the
# out-of-place method for which scalar kinds: "all", "number" or "array" (a tensor or a PerLeaf))
INTO_CASES = [
    ("add", lambda s, x, y: (x, y), "x", "all"),
    ("add", lambda s, x, y: (x, y), "y", "all"),
    ("sub", lambda s, x, y: (x, y), "x", "all"),
    ("sub", lambda s, x, y: (x, y), "y", "all"),
    ("mul", lambda s, x, y: (x, y), "x", "all"),
    ("mul", lambda s, x, y: (x, y), "y", "all"),
    ("scale", lambda s, x, y: (s, x), "x", "all"),
    ("add_scalar", lambda s, x, y: (x, s), "x", "all"),
    ("axpy", lambda s, x, y: (s, x, y), "x", "array"),
    ("axpy", lambda s, x, y: (s, x, y), "y", "number"),
    ("lincomb", lambda s, x, y: (s, x, -1.5, y), "x", "number"),
    ("lincomb", lambda s, x, y: (s, x, -1.5, y), "y", None),
    ("lincomb", lambda s, x, y: (0.5, x, s, y), "x", "number"),
    ("lincomb", lambda s, x, y: (0.5, x, s, y), "y", None),
]


def _scalar_kind(s):
    return "array" if isinstance(s, (torch.Tensor, PerLeaf)) else "number"


@pytest.mark.parametrize("scalar", list(SCALARS))
@pytest.mark.parametrize("dtypes", list(DTYPE_SETS))
def test_into_methods_compute_in_the_buffers_of_out(dtypes, scalar):
    """`TorchForeachOps(in_place=True).op_into(..., out=z)` writes `op(...)` into z's tensors (a new
    list holding them), leaves the other input alone, and equals the out-of-place result: bit for bit
    where the same kernels run, within rounding elsewhere."""
    dts = DTYPE_SETS[dtypes]
    s = scalar_of(scalar)
    fast, ref = TorchForeachOps(in_place=True), ArrayOps(XP)
    for name, make_args, which, exact in INTO_CASES:
        x, y = make_leaves(dts, 0), make_leaves(dts, 1)
        args = make_args(s, x, y)
        out, other = (x, y) if which == "x" else (y, x)
        m = magnitude(x, y) * (1 + magnitude(s)) * (4 if name == "lincomb" else 1)
        want = getattr(ref, name)(*args)
        same_kernels = getattr(TorchForeachOps(), name)(*args)
        other_before = snapshot(other)
        buffers = list(out)
        got = getattr(fast, name + "_into")(*args, out=out)
        assert got is not out and all(a is b for a, b in zip(got, buffers)), (name, which)
        if other is not out:
            assert_unchanged(other_before, [other])
        assert_leaves_close(got, want, m)
        if exact == "all" or exact == _scalar_kind(s):
            for u, v in zip(got, same_kernels):
                torch.testing.assert_close(u, v, rtol=0, atol=0, equal_nan=True, msg=f"{name} into {which}")


def test_into_methods_without_in_place_or_where_they_must_not_write():
    """`in_place=False` (the default), `ArrayOps`, a list that requires grad, and a list of another
    dtype than the leaves it meets are all computed out of place: `out` is left as it was."""
    x, y = make_leaves([torch.float32] * 5, 0), make_leaves([torch.float32] * 5, 1)
    for ops in (TorchForeachOps(), ArrayOps(XP)):
        before = snapshot(x, y)
        got = ops.axpy_into(0.5, x, y, out=y)
        assert_unchanged(before, [x, y])
        assert all(u is not v for u, v in zip(got, y))
        assert_leaves_close(got, ops.axpy(0.5, x, y), magnitude(x, y))
    fast = TorchForeachOps(in_place=True)
    needs_grad = [t.clone().requires_grad_(True) for t in y]
    before = snapshot(needs_grad)
    got = fast.sub_into(x, needs_grad, out=needs_grad)
    assert_unchanged(before, [needs_grad]) and all(u is not v for u, v in zip(got, needs_grad))
    wider = [t.double() for t in x]  # float64 into float32 buffers would round: not written
    before = snapshot(y)
    got = fast.add_into(wider, y, out=y)
    assert_unchanged(before, [y])
    assert all(u.dtype == torch.float64 for u in got)


@pytest.mark.parametrize("ops", [TorchForeachOps(in_place=True), ArrayOps(XP)])
def test_into_methods_refuse_an_out_that_is_not_an_input(ops):
    x, y = make_leaves([torch.float32] * 5, 0), make_leaves([torch.float32] * 5, 1)
    with pytest.raises(ValueError, match="`out`"):
        ops.axpy_into(0.5, x, y, out=list(y))  # equal elements, another list: not given up
    with pytest.raises(ValueError, match="`out`"):
        ops.scale_into(0.5, x, out=y)
    with pytest.raises(TypeError, match="in_place"):
        TorchForeachOps(in_place=1)


def test_temporaries_are_made_for_chunks_of_leaves(monkeypatch):
    """Where an in-place kernel needs a temporary (`s * x` before `y += ...` with a PerLeaf, or a 0-d
    tensor off the CPU), it is made for chunks of at most 1/16 of the list's bytes (one leaf at least),
    and the result is the same as in one piece."""
    leaves = [torch.zeros(n) for n in (10, 300, 5, 5, 5, 40)]  # float32: 4 bytes each
    monkeypatch.setattr(_ops, "_MIN_CHUNK_BYTES", 0)
    chunks = _ops._chunks(leaves)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(leaves)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    budget = 365 * 4 // 16
    for i, j in chunks:
        assert j - i == 1 or sum(leaves[k].numel() * 4 for k in range(i, j)) <= budget
    assert len(chunks) > 1
    x, y = make_leaves([torch.float64] * 5, 0), make_leaves([torch.float64] * 5, 1)
    s = PerLeaf([0.37, -1.75, 2.0, 0.0, 1.5]) / torch.tensor(3.0, dtype=torch.float64)
    want = TorchForeachOps().axpy(s, x, y)
    TorchForeachOps().axpy_(s, x, y)
    for u, v in zip(y, want):
        assert torch.equal(u, v)
    monkeypatch.setattr(_ops, "_MIN_CHUNK_BYTES", 4 << 20)
    assert _ops._chunks(leaves) == [(0, len(leaves))]  # a small list is one piece


@pytest.mark.parametrize("dtypes", list(DTYPE_SETS))
def test_all_finite_matches_array_ops_and_leaves_values_unchanged(dtypes):
    dts = DTYPE_SETS[dtypes]
    fast, ref = ops_pair()
    for bad in (None, float("nan"), float("inf"), -float("inf")):
        x = make_leaves(dts, 2)
        if bad is not None:
            x[3][0, 0, 1] = bad
        before = snapshot(x)
        got, want = fast.all_finite(x), ref.all_finite(x)
        assert got.dtype == torch.bool and got.shape == () and bool(got) == bool(want) == (bad is None)
        assert_unchanged(before, [x])
    needs_grad = [t.clone().requires_grad_(True) for t in make_leaves([torch.float32] * 5, 3)]
    assert bool(fast.all_finite(needs_grad))  # the per-leaf path: such tensors must not be written
    assert bool(fast.all_finite([])) and bool(ref.all_finite([]))


# --------------------------------------------------------------------------------------------
# scalars too large for a leaf's dtype saturate (a zero gradient never gives NaN)


@pytest.mark.parametrize("dtypes", ["float16", "bfloat16", "float32", "mixed"])
@pytest.mark.parametrize("scalar", ["tensor32-huge", "tensor64-huge", "python-huge", "per-leaf-tensor-factor-huge"])
def test_scalars_saturate_at_the_leaf_dtype_range(dtypes, scalar):
    """`rho / (||g|| + 1e-12)` at a zero gradient is 5e10 in float32: a float16 leaf gets 65504, not inf,
    so `s * 0` is 0 (every method, in place too, as ArrayOps); a nonzero entry gets the saturated
    product, and NaN stays NaN."""
    s = {
        "tensor32-huge": lambda: torch.tensor(5e10, dtype=torch.float32),
        "tensor64-huge": lambda: torch.tensor(-1e300, dtype=torch.float64),
        "python-huge": lambda: 1e300,
        "per-leaf-tensor-factor-huge": lambda: PerLeaf([0.05, 0.1, 1.0, 2.0, 0.5]) / torch.tensor(1e-12, dtype=torch.float32) ** 3,
    }[scalar]()
    dts = DTYPE_SETS[dtypes]
    zeros = [torch.zeros_like(a) for a in make_leaves(dts, 0)]
    y = make_leaves(dts, 1)
    fast, ref = ops_pair()
    for ops in (fast, ref):
        for out in (ops.scale(s, zeros), ops.axpy(s, zeros, y), ops.lincomb(s, zeros, 1.0, y), ops.lincomb(1.0, y, s, zeros)):
            for o, a in zip(out, y):
                assert o.dtype == a.dtype and not torch.isnan(o).any(), (ops, o)
        target = [t.clone() for t in y]
        fast.axpy_(s, zeros, target)
        for t, a in zip(target, y):
            assert torch.equal(t, a)  # y + s * 0 is y
    # a nonzero entry: the product of the saturated scalar, the same through both ops (a PerLeaf's
    # values and factor saturate separately in TorchForeachOps, their product in ArrayOps)
    x = make_leaves(dts, 2)
    if not isinstance(s, PerLeaf):
        assert_leaves_close(fast.scale(s, x), ref.scale(s, x), 10.0)
    nan = [torch.full_like(a, float("nan")) for a in x]
    assert all(torch.isnan(o).all() for o in fast.scale(s, nan))


def test_scalars_in_range_are_unchanged_bit_for_bit():
    """Saturation never touches a value inside the range, nor a cast that does not narrow it."""
    fast, ref = ops_pair()
    for dts in (DTYPE_SETS["float16"], DTYPE_SETS["bfloat16"], DTYPE_SETS["mixed"], DTYPE_SETS["float64"]):
        x = make_leaves(dts, 0)
        for s in (torch.tensor(0.37, dtype=torch.float32), torch.tensor(60000.0, dtype=torch.float32),
                  torch.tensor(-1.3e38, dtype=torch.float64), 12345.0):
            for ops in (fast, ref):
                got = ops.scale(s, x)
                for g, a in zip(got, x):
                    want = (s if isinstance(s, float) else s.to(a.dtype)) * a
                    assert torch.equal(g, want) or not torch.isfinite(want).all() and torch.equal(g.isnan(), want.isnan())
