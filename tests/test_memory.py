"""Memory of a step, without timing: which parameter-sized arrays are alive when each pass starts.

A rule's step should hold only the parameter-sized buffers its math needs at once (ALGORITHMS.md,
section 0; benchmarks/torch_memory.py measures the peak RSS): the first gradient is released by
SAM once the perturbed point is formed, GNP and F-GR keep it and compute the direction in the
buffer of the perturbed gradient, GAM keeps three gradients at its fourth pass. These tests count,
at the start of every pass (inside the closure or ``loss_fn``), the distinct storages of live
tensors of the shape of one weight, which no other tensor of the problem has, so a gradient or
temporary kept alive by mistake (a reference in the oracle, the optimizer or a rule's frame) fails
them; weak references check that the first pass's gradient tensors themselves are gone. The
weights still come back bit for bit (checked too).
"""

from __future__ import annotations

import gc
import warnings
import weakref

import numpy as np
import pytest

import gradnorm

SHAPE = (24, 40)  # the first layer's weight: no other tensor of the problems below has this shape

# the live tensors of SHAPE at the start of each pass of a step (after the first two steps):
# the parameter, the momentum buffer and the optimizer's snapshot of the weights, plus the
# gradients (and points) the rule still needs.
OPTIMIZER_LIVE = {
    "sgd": [2],  # no snapshot: the weights never move
    "sam": [3, 3],  # g is released before the second pass
    "gnp": [3, 4],  # g is kept for (1 - alpha) g + alpha g_p
    "fd_gr": [3, 4],  # g is kept for g + gamma (g+ - g) / s
    "gam": [3, 4, 6, 6],  # g0 | g0, g1, x2 | g0, g1, g2 (x2 released once the last point is formed)
}
# gradnorm.torch.step: the parameters, plus each pass's point (a new tensor) and the kept gradients
FUNCTIONAL_LIVE = {
    "sgd": [1],
    "sam": [1, 2],  # the point; g is released once it is formed
    "gnp": [1, 3],  # g and the point
    "fd_gr": [1, 3],
    "gam": [1, 3, 4, 5],  # g0 + point | g0, g1, x2 (the point) | g0, g1, g2 + point
}
HYPER = {"sgd": {}, "sam": {"rho": 0.05}, "gnp": {"r": 0.05, "alpha": 0.8}, "fd_gr": {"gamma": 0.05, "eps": 0.01},
         "gam": {}}


def live_storages(torch, shape=SHAPE) -> int:
    """The number of distinct storages of live (plain, not functorch-wrapped) tensors of `shape`."""
    gc.collect()
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)
    seen = set()
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and tuple(obj.shape) == shape and not wrapped(obj):
                seen.add(obj.untyped_storage().data_ptr())
    return len(seen)


def make_problem(torch):
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))
    x = torch.randn(16, 40, generator=g)
    y = torch.randn(16, 3, generator=g)
    return model, x, y


@pytest.mark.parametrize("rule", list(OPTIMIZER_LIVE))
def test_optimizer_holds_only_what_the_rule_needs_at_each_pass(rule):
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gt

    model, x, y = make_problem(torch)
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.05, momentum=0.9, **HYPER[rule])
    counts: list[int] = []

    def closure():
        counts.append(live_storages(torch))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):  # the momentum buffers and the snapshot exist from here on
        opt.step(closure)
    counts.clear()
    opt.step(closure)
    assert counts == OPTIMIZER_LIVE[rule], f"{rule}: live {SHAPE} tensors at each pass {counts}"
    assert opt.last_info["grad_evals"] == len(counts)


@pytest.mark.parametrize("rule", ["sam", "gnp", "fd_gr"])
def test_a_tensor_strength_holds_no_more_than_a_number(rule):
    """A strength given as a 0-d tensor (what a schedule may pass) is compared with 0 at every
    step (the run-time skip); eagerly the branch is chosen on the host, so the step holds the same
    buffers at each pass as with the number."""
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gt

    model, x, y = make_problem(torch)
    hyper = {k: torch.tensor(v) if isinstance(v, float) and k != "eps" else v for k, v in HYPER[rule].items()}
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.05, momentum=0.9, **hyper)
    counts: list[int] = []

    def closure():
        counts.append(live_storages(torch))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    counts.clear()
    opt.step(closure)
    assert counts == OPTIMIZER_LIVE[rule], f"{rule}: live {SHAPE} tensors at each pass {counts}"


@pytest.mark.parametrize("rule", ["sam", "gnp", "fd_gr", "gam"])
def test_optimizer_computes_the_direction_in_a_gradient_buffer(rule):
    """The direction left in ``.grad`` lives in the buffer of a gradient a pass made (the rule combined
    in place), not in a new tensor allocated after the last pass."""
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gt

    model, x, y = make_problem(torch)
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.05, **HYPER[rule])
    made: set[int] = set()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        made.update(p.grad.untyped_storage().data_ptr() for p in model.parameters())
        return loss

    opt.step(closure)
    assert all(p.grad.untyped_storage().data_ptr() in made for p in model.parameters())


@pytest.mark.parametrize("rule", list(FUNCTIONAL_LIVE))
def test_functional_step_holds_only_what_the_rule_needs_at_each_pass(rule):
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gt

    model, x, y = make_problem(torch)
    params = {k: v.detach() for k, v in model.named_parameters()}
    counts: list[int] = []

    def loss_fn(p, xb, yb):
        counts.append(live_storages(torch))
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (xb,)), yb)

    state = gt.step(params, loss_fn, x, y, rule=rule, **HYPER[rule]).state
    counts.clear()
    gt.step(params, loss_fn, x, y, rule=rule, state=state, **HYPER[rule])
    assert counts == FUNCTIONAL_LIVE[rule], f"{rule}: live {SHAPE} tensors at each pass {counts}"


@pytest.mark.parametrize("first_pass", ["closure", "loss"])
def test_sam_frees_the_first_gradient_before_the_second_backward(first_pass):
    """The tensors of the first pass's gradient (the closure's, or the caller's with
    ``step(closure, loss=...)``) are gone when the second pass runs, and the weights come back bit for
    bit (lr 0: the step is the restore alone)."""
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gt

    model, x, y = make_problem(torch)
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.0)
    first: list[weakref.ref] = []
    alive_at_second: list[bool] = []
    live_at_second: list[int] = []

    def loss_and_backward():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    def closure():
        if first:
            alive_at_second.append(any(r() is not None for r in first))
            live_at_second.append(live_storages(torch))
        opt.zero_grad()
        loss = loss_and_backward()
        if not first:
            first.extend(weakref.ref(p.grad) for p in model.parameters())
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    if first_pass == "closure":
        opt.step(closure)
    else:
        opt.zero_grad()
        loss = loss_and_backward()
        first.extend(weakref.ref(p.grad) for p in model.parameters())
        opt.step(closure, loss=loss)
    assert alive_at_second == [False]
    assert live_at_second == [3]  # the weight, its snapshot and `before`'s copy: no storage of g either
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("rule", ["sam", "gnp", "fd_gr", "gam"])
def test_weights_come_back_bit_for_bit_after_in_place_steps(rule):
    """The rules compute in the gradients' buffers, never in the weights: a step with lr 0 leaves
    every weight bit for bit as it was (float32, over a few steps with a changing minibatch)."""
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gt

    model, x, y = make_problem(torch)
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.0, **HYPER[rule])
    before = [p.detach().clone() for p in model.parameters()]
    for k in range(3):
        xb = x + 0.1 * k

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), y)
            loss.backward()
            return loss

        opt.step(closure)
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p.detach(), b), f"{rule}: step {k} changed the weights"
        assert bool(opt.last_info["finite"])


def test_the_last_direction_is_released_when_the_next_step_starts():
    """``.grad`` holds the direction between steps; the optimizer remembers it by weak reference
    only, so it is freed when the next step's first pass clears ``.grad``."""
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gt

    model, x, y = make_problem(torch)
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule="gnp", r=0.05, alpha=0.8, lr=0.05)
    alive: list[bool] = []

    def closure():
        if last:
            alive.append(any(r() is not None for r in last))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    last: list[weakref.ref] = []
    opt.step(closure)
    last.extend(weakref.ref(p.grad) for p in model.parameters())
    opt.step(closure)
    assert alive == [False, False]


# -- the core: donation through a tree-level oracle (NumPy, immutable semantics in the rules) --


def test_gradnorm_step_releases_a_donated_gradient_before_the_next_evaluation():
    """`gradnorm.step` with a plain `grad_fn`: SAM's first gradient is released (the `TreeOracle`
    drops the list's arrays) once the perturbed point is formed, before `grad_fn` runs again; GNP's is
    kept (it needs it) and the arrays the user's `grad_fn` returned are never written."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    params = {"w": rng.standard_normal(6)}
    refs: list[weakref.ref] = []
    alive: list[bool] = []

    def grad_fn(p):
        if refs:
            alive.append(refs[0]() is not None)
        g = a @ p["w"]
        if not refs:
            refs.append(weakref.ref(g))
        return 0.5 * float(p["w"] @ g), {"w": g}

    res = gradnorm.step(params, grad_fn, rule="sam", rho=0.1)
    assert alive == [False]
    assert np.all(np.isfinite(res.grad["w"]))

    kept: list[np.ndarray] = []

    def grad_fn_kept(p):
        g = a @ p["w"]
        kept.append(g)
        return 0.5 * float(p["w"] @ g), {"w": g}

    res = gradnorm.step(params, grad_fn_kept, rule="gnp", r=0.1, alpha=0.5)
    np.testing.assert_array_equal(kept[0], a @ params["w"])  # the user's arrays are never written
    np.testing.assert_allclose(res.grad["w"], 0.5 * kept[0] + 0.5 * kept[1], rtol=1e-12)


def test_donate_must_be_leaf_lists_and_never_releases_the_parameters():
    from gradnorm import LeafOracle

    class Quadratic(LeafOracle):
        def _value_and_grad(self, leaves):
            return np.asarray(0.0), [2.0 * w for w in leaves]

    oracle = Quadratic(gradnorm.ArrayOps(np))
    params = [np.ones(3)]
    g = [np.ones(3)]
    with pytest.raises(TypeError, match="donate"):
        oracle.value_and_grad_along(params, 0.1, g, donate=g)  # a list of arrays, not a tuple of lists
    _, out = oracle.value_and_grad_along(params, 0.1, g, donate=(g,))
    assert g == [None] and np.allclose(out[0], 2.2)

    class Keeping(Quadratic):
        def _keeps(self, leaves):
            return leaves is params

    oracle = Keeping(gradnorm.ArrayOps(np))
    oracle.value_and_grad_along(params, 0.1, [np.ones(3)], donate=(params,))
    assert params[0] is not None


# -- JAX: XLA's compiled memory analysis (deterministic; no run, no timing) ---------------------
# The minimum extra of a rule over plain SGD (ALGORITHMS.md section 0): the parameter-sized
# arrays its math holds at once besides the gradient. XLA may fuse some away (SAM's point is
# formed while the first gradient dies), never need more.
JAX_MINIMUM = {"sam": 1.0, "gnp": 2.0, "fd_gr": 2.0, "gam": 4.0}


@pytest.mark.parametrize("rule", list(JAX_MINIMUM))
def test_jitted_jax_step_needs_no_more_temporaries_than_the_math(rule):
    """A jitted gradnorm.jax.step + optax SGD-momentum step allocates at most the rule's minimum
    (+ 0.1 P) of temporaries more than the plain SGD step, on a wide MLP whose weights are 1 M
    entries each (a global reduction over the concatenated leaves once cost a whole P here)."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    import gradnorm.jax as gj

    width, depth = 1024, 4
    keys = jax.random.split(jax.random.key(0), depth + 2)
    params = [{"w": jax.random.normal(keys[i], (width, width)) / width**0.5, "b": jnp.zeros(width)}
              for i in range(depth)]
    x, y = jax.random.normal(keys[-2], (4, width)), jax.random.normal(keys[-1], (4, width))
    nbytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(params))

    def loss_fn(p, x, y):
        h = x
        for layer in p:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return jnp.mean((h - y) ** 2)

    opt = optax.sgd(1e-4, momentum=0.9)
    opt_state = opt.init(params)

    def plain(p, s):
        updates, s = opt.update(jax.grad(loss_fn)(p, x, y), s, p)
        return optax.apply_updates(p, updates), s

    def regularized(p, s):
        res = gj.step(p, loss_fn, x, y, rule=rule, **HYPER[rule])
        updates, s = opt.update(res.grad, s, p)
        return optax.apply_updates(p, updates), s

    def temporaries(fn):
        compiled = jax.jit(fn, donate_argnums=(0, 1)).lower(params, opt_state).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    extra = (temporaries(regularized) - temporaries(plain)) / nbytes
    assert extra <= JAX_MINIMUM[rule] + 0.1, f"{rule}: {extra:.2f} P of extra temporaries"
