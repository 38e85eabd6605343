"""gradnorm.torch.diagnostics: exact against the full Hessian (numpy.linalg.eigh of the matrix built
from torch.autograd.functional.hessian), against the hessian-eigenthings package on the same model
and data, and against the core gradnorm.diagnostics; the model is never changed; the Monitor logs
during training without changing it."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradnorm
import gradnorm.diagnostics as core
import gradnorm.torch as gt
import gradnorm.torch.diagnostics as gtd

F = torch.nn.functional
CE = F.cross_entropy


# --------------------------------------------------------------------------------------------
# problems and the reference Hessian


def mlp(seed=0, batchnorm=False, dropout=0.0):
    g = torch.Generator().manual_seed(seed)
    layers = [torch.nn.Linear(5, 7)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(7))
    layers += [torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    layers.append(torch.nn.Linear(7, 3))
    model = torch.nn.Sequential(*layers).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        if batchnorm:  # non-trivial running statistics, so eval mode differs from batch statistics
            model[1].running_mean.copy_(0.5 * torch.randn(7, generator=g, dtype=torch.float64))
            model[1].running_var.copy_(0.5 + torch.rand(7, generator=g, dtype=torch.float64))
    return model


def data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def size(model):
    return sum(p.numel() for p in model.parameters())


def reference_hessian(model, x, y, train=False):
    """The full Hessian of the cross-entropy by torch.autograd.functional.hessian on the flat
    parameter vector (independent of gradnorm), in `named_parameters` order."""
    named = list(model.named_parameters())
    shapes = [p.shape for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    model.train(train)

    def loss(flat):
        parts, i = {}, 0
        for (n, _), s in zip(named, shapes):
            k = int(np.prod(s))
            parts[n] = flat[i:i + k].reshape(s)
            i += k
        fresh = {n: b.clone() for n, b in buffers.items()}
        return CE(torch.func.functional_call(model, {**parts, **fresh}, (x,)), y)

    try:
        return torch.autograd.functional.hessian(loss, flat0).numpy()
    finally:
        for m, mode in zip(model.modules(), modes):
            m.training = mode


def flat(tree):
    return torch.cat([t.reshape(-1) for t in tree.values()]).numpy()


def hvp_matrix(model, batch, **kwargs):
    """The Hessian built column by column from the adapter's HVP."""
    d = gtd.diagnostics(model, CE, batch, **kwargs)
    leaves = d.curv.leaves
    cols, sizes = [], [leaf.numel() for leaf in leaves]
    for i in range(sum(sizes)):
        e = torch.zeros(sum(sizes), dtype=torch.float64)
        e[i] = 1.0
        v = [part.reshape(leaf.shape) for part, leaf in zip(torch.split(e, sizes), leaves)]
        cols.append(torch.cat([h.reshape(-1) for h in d.curv.matvec(v)]))
    return torch.stack(cols, dim=1).numpy()


def snapshot(model):
    return {
        "params": {n: (p.detach().clone(), p._version) for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state().clone(),
        "np_rng": np.random.get_state()[1].copy(),
    }


def assert_same_snapshot(a, b):
    for n, (p, version) in a["params"].items():
        assert torch.equal(p, b["params"][n][0]) and version == b["params"][n][1], n
    for n, g in a["grads"].items():
        assert (g is None and b["grads"][n] is None) or torch.equal(g, b["grads"][n]), n
    for n, buf in a["buffers"].items():
        assert torch.equal(buf, b["buffers"][n]), n
    assert a["modes"] == b["modes"]
    assert torch.equal(a["rng"], b["rng"])
    assert np.array_equal(a["np_rng"], b["np_rng"])


# --------------------------------------------------------------------------------------------
# exact: the full Hessian


@pytest.mark.parametrize("batchnorm", [False, True], ids=["mlp", "batchnorm-eval"])
def test_hvp_columns_are_the_hessian_and_eigenpairs_match_eigh(batchnorm):
    model = mlp(batchnorm=batchnorm, dropout=0.3 if batchnorm else 0.0)
    model.train()  # the diagnostics evaluate in eval mode regardless
    x, y = data()
    ref = reference_hessian(model, x, y)
    h = hvp_matrix(model, (x, y))
    assert np.max(np.abs(h - ref)) < 1e-12 * max(1.0, np.max(np.abs(ref)))
    evals, evecs = np.linalg.eigh(ref)
    top = evals[::-1][:3]
    res = gtd.hessian_eigenvalues(model, CE, (x, y), k=3, iters=40)
    assert res.method == "exact" and bool(res.converged.all())
    np.testing.assert_allclose(res.eigenvalues.numpy(), top, rtol=0, atol=1e-8)
    for i in range(3):
        alignment = abs(float(flat(res.eigenvectors[i]) @ evecs[:, -1 - i]))
        assert alignment > 1 - 1e-8, (i, alignment)
    smallest = gtd.hessian_eigenvalues(model, CE, (x, y), k=2, iters=40, which="SA").eigenvalues.numpy()
    np.testing.assert_allclose(smallest, evals[:2], rtol=0, atol=1e-8)
    magnitude = gtd.hessian_eigenvalues(model, CE, (x, y), k=1, iters=40, which="LM").eigenvalues.numpy()
    np.testing.assert_allclose(magnitude, evals[np.argmax(np.abs(evals))], rtol=0, atol=1e-8)


def test_trace_hutchinson_and_hutch_plus_plus_against_the_exact_trace():
    model = mlp()
    x, y = data()
    ref = reference_hessian(model, x, y)
    exact = np.trace(ref)
    hutch = gtd.hessian_trace(model, CE, (x, y), samples=200)
    assert hutch.method == "hutchinson" and hutch.matvecs == 200
    assert abs(float(hutch.trace) - exact) < 4 * float(hutch.stderr)
    # the exact standard deviation of one Rademacher term: sqrt(2 (||H||_F^2 - sum H_ii^2))
    sd = np.sqrt(2 * (np.sum(ref**2) - np.sum(np.diag(ref) ** 2)))
    assert 0.7 * sd / np.sqrt(200) < float(hutch.stderr) < 1.3 * sd / np.sqrt(200)
    plus = gtd.hessian_trace(model, CE, (x, y), samples=150, method="hutch++")
    assert plus.method == "hutch++" and plus.matvecs == 150
    assert abs(float(plus.trace) - exact) < 4 * float(plus.stderr)


def test_finite_difference_hvp_agrees_with_the_exact_one():
    model = mlp(batchnorm=True)
    x, y = data()
    exact = hvp_matrix(model, (x, y))
    fd = hvp_matrix(model, (x, y), hvp="fd")
    assert np.max(np.abs(fd - exact)) < 1e-8 * np.max(np.abs(exact))
    a = gtd.hessian_eigenvalues(model, CE, (x, y), k=2, iters=40)
    b = gtd.hessian_eigenvalues(model, CE, (x, y), k=2, iters=40, hvp="fd")
    assert b.method == "fd"
    np.testing.assert_allclose(b.eigenvalues.numpy(), a.eigenvalues.numpy(), rtol=1e-8)


def test_dataloader_is_the_batch_size_weighted_average():
    """Batches of 10, 10 and 4 examples: the loss, gradient and Hessian of the whole data set."""
    model = mlp()
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10, shuffle=True)
    full = gtd.diagnostics(model, CE, (x, y))
    averaged = gtd.diagnostics(model, CE, loader)
    (l1, g1), (l2, g2) = full.loss_and_grad(), averaged.loss_and_grad()
    assert abs(float(l1 - l2)) < 1e-14
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    np.testing.assert_allclose(hvp_matrix(model, loader), reference_hessian(model, x, y), rtol=0, atol=1e-13)
    top = gtd.hessian_eigenvalues(model, CE, [(x[:10], y[:10]), (x[10:], y[10:])], k=2, iters=40)  # a list works too
    np.testing.assert_allclose(top.eigenvalues.numpy(), np.linalg.eigvalsh(reference_hessian(model, x, y))[::-1][:2],
                               atol=1e-9)


def test_train_mode_uses_batch_statistics_on_copies_of_the_buffers():
    model = mlp(batchnorm=True)
    model.eval()
    x, y = data()
    before = snapshot(model)
    ref = reference_hessian(model, x, y, train=True)
    top = gtd.hessian_eigenvalues(model, CE, (x, y), k=2, iters=40, train_mode=True).eigenvalues.numpy()
    np.testing.assert_allclose(top, np.linalg.eigvalsh(ref)[::-1][:2], atol=1e-8)
    assert_same_snapshot(before, snapshot(model))
    eval_top = np.linalg.eigvalsh(reference_hessian(model, x, y))[::-1][0]
    assert abs(top[0] - eval_top) > 1e-3  # the two modes do differ here


def test_params_subset_is_the_block_of_the_hessian():
    model = mlp()
    x, y = data()
    ref = reference_hessian(model, x, y)
    n_first = 5 * 7 + 7
    block = ref[n_first:, n_first:]  # the last layer's weight and bias
    for params in ([model[2].weight, model[2].bias], ["2.weight", "2.bias"]):
        res = gtd.hessian_eigenvalues(model, CE, (x, y), k=2, params=params, iters=24)
        np.testing.assert_allclose(res.eigenvalues.numpy(), np.linalg.eigvalsh(block)[::-1][:2], atol=1e-9)
        assert list(res.eigenvectors[0]) == ["2.weight", "2.bias"]


def test_loss_form_model_takes_any_batch():
    model = mlp()
    x, y = data()

    def loss_fn(m, batch):
        return CE(m(batch["x"]), batch["y"])

    a = gtd.measure(model, CE, (x, y), quantities=("loss", "grad_norm", "lambda_max", "trace"), samples=5)
    b = gtd.measure(model, loss_fn, {"x": x, "y": y}, loss_form="model",
                    quantities=("loss", "grad_norm", "lambda_max", "trace"), samples=5)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=0)


def test_first_order_measures_match_their_definitions():
    model = mlp()
    x, y = data()
    flat0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss_at(params):
        return CE(torch.func.functional_call(model, params, (x,)), y)

    with torch.enable_grad():
        q = {n: p.clone().requires_grad_(True) for n, p in flat0.items()}
        grads = dict(zip(q, torch.autograd.grad(loss_at(q), list(q.values()))))
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    torch.testing.assert_close(gtd.gradient_norm(model, CE, (x, y)), norm, rtol=1e-13, atol=0)
    rho = 0.1
    with torch.no_grad():
        sharp = loss_at({n: flat0[n] + rho * grads[n] / norm for n in flat0}) - loss_at(flat0)
    torch.testing.assert_close(gtd.sam_sharpness(model, CE, (x, y), rho=rho), sharp, rtol=1e-12, atol=0)
    fof = gtd.first_order_flatness(model, CE, (x, y), rho=rho, steps=3)
    assert fof.grad_norms.shape == (4,) and abs(float(fof.grad_norms[0] - norm)) < 1e-13
    assert float(fof.flatness) >= rho * float(norm) - 1e-15
    delta_norm = torch.sqrt(sum((d**2).sum() for d in fof.perturbation.values()))
    assert abs(float(delta_norm) - rho) < 1e-12


# --------------------------------------------------------------------------------------------
# against hessian-eigenthings (an external reference on the same model and data)


@pytest.fixture(scope="module")
def he():
    return pytest.importorskip("hessian_eigenthings")


def _shared_problem():
    model = mlp(seed=3)
    model.eval()
    x, y = data(n=24, seed=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)  # 3 equal batches
    return model, x, y, loader


def test_against_hessian_eigenthings_operator_and_eigenvalues(he):
    model, x, y, loader = _shared_problem()
    op = he.HessianOperator(model, loader, he.supervised_loss(CE))
    d = gtd.diagnostics(model, CE, loader)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # the same operator: their full-dataset matvec = our HVP
        v = torch.randn(op.size, generator=g, dtype=torch.float64)
        sizes = [leaf.numel() for leaf in d.curv.leaves]
        ours = torch.cat([h.reshape(-1) for h in d.curv.matvec(
            [p.reshape(leaf.shape) for p, leaf in zip(torch.split(v, sizes), d.curv.leaves)])])
        torch.testing.assert_close(ours, op.matvec(v), rtol=1e-13, atol=1e-15)
    theirs = he.lanczos(op, k=3, which="LA", max_iter=40, seed=0)
    ours = gtd.hessian_eigenvalues(model, CE, loader, k=3, iters=40)
    exact = np.linalg.eigvalsh(reference_hessian(model, x, y))[::-1][:3]
    np.testing.assert_allclose(ours.eigenvalues.numpy(), theirs.eigenvalues.numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(ours.eigenvalues.numpy(), exact, rtol=0, atol=1e-10)
    for i in range(3):
        assert abs(float(flat(ours.eigenvectors[i]) @ theirs.eigenvectors[i].numpy())) > 1 - 1e-8
    theirs_lm = he.lanczos(op, k=2, max_iter=40, seed=1)  # their default: largest magnitude
    ours_lm = gtd.hessian_eigenvalues(model, CE, loader, k=2, iters=40, which="LM")
    np.testing.assert_allclose(ours_lm.eigenvalues.numpy(), theirs_lm.eigenvalues.numpy(), rtol=0, atol=1e-10)


def test_against_hessian_eigenthings_trace_and_density(he):
    model, x, y, loader = _shared_problem()
    op = he.HessianOperator(model, loader, he.supervised_loss(CE))
    ref = reference_hessian(model, x, y)
    exact = np.trace(ref)
    theirs = he.hutchinson(op, num_samples=64, seed=0)
    ours = gtd.hessian_trace(model, CE, loader, samples=64)
    both = np.hypot(theirs.stderr, float(ours.stderr))
    assert abs(float(ours.trace) - theirs.estimate) < 4 * both
    # TorchProbes(0) on CPU draws the Rademacher stream of hessian-eigenthings' seed=0 (torch.randint on
    # a CPU generator, leaf after leaf = their flat vector), so the two estimates agree to rounding
    assert abs(float(ours.trace) - theirs.estimate) < 1e-12
    assert abs(float(ours.trace) - exact) < 4 * float(ours.stderr)
    assert abs(theirs.estimate - exact) < 4 * theirs.stderr
    assert 0.6 < float(ours.stderr) / theirs.stderr < 1.6  # the same estimator: the same spread
    theirs_pp = he.hutch_plus_plus(op, num_matvecs=45, seed=0)
    ours_pp = gtd.hessian_trace(model, CE, loader, samples=45, method="hutch++")
    assert abs(float(ours_pp.trace) - theirs_pp.estimate) < 4 * np.hypot(theirs_pp.stderr, float(ours_pp.stderr))
    assert abs(float(ours_pp.trace) - exact) < 4 * float(ours_pp.stderr)
    assert abs(float(ours_pp.trace) - theirs_pp.estimate) < 1e-12  # the same probes again

    # SLQ: 6 runs of 25 Lanczos steps each; the quadrature's moments estimate tr(H)/P and tr(H^2)/P
    p = ref.shape[0]
    theirs_d = he.spectral_density(op, num_runs=6, lanczos_steps=25, seed=0, num_grid_points=400)
    ours_d = gtd.spectral_density(model, CE, loader, runs=6, iters=25)
    assert ours_d.nodes.shape == (6, 25) and np.allclose(ours_d.weights.sum(axis=1), 1.0)
    their_nodes, their_weights = theirs_d.raw_eigenvalues.numpy(), theirs_d.raw_weights.numpy()
    evals = np.linalg.eigvalsh(ref)
    sd_one = np.sqrt(2 * (np.sum(ref**2) - np.sum(np.diag(ref) ** 2)))  # of one run's trace estimate
    for nodes, weights in ((ours_d.nodes, ours_d.weights), (their_nodes, their_weights)):
        first = p * np.mean(np.sum(weights * nodes, axis=1))
        assert abs(first - exact) < 4 * sd_one / np.sqrt(6)
        second = np.mean(np.sum(weights * nodes**2, axis=1))
        assert abs(second - np.mean(evals**2)) < 0.5 * np.mean(evals**2)
        # 25 steps resolve the extreme eigenvalues
        assert np.max(np.abs(nodes.max(axis=1) - evals[-1])) < 1e-6
        assert np.max(np.abs(nodes.min(axis=1) - evals[0])) < 1e-6
    # the two smoothed densities on their grid, same bandwidth: close in L1 (both integrate to 1)
    grid = theirs_d.grid.numpy()
    ours_on_grid = ours_d.density(grid, theirs_d.sigma)
    step = grid[1] - grid[0]
    assert abs(np.sum(ours_on_grid) * step - 1) < 0.02
    l1 = np.sum(np.abs(ours_on_grid - theirs_d.density.numpy())) * step
    assert l1 < 0.5, l1


# --------------------------------------------------------------------------------------------
# the core, with the same probes


def test_same_as_the_core_on_torch_tensors_with_the_same_probes():
    model = mlp()
    x, y = data()
    params = OrderedDict((n, p.detach().clone()) for n, p in model.named_parameters())

    def loss(p):
        return CE(torch.func.functional_call(model, p, (x,)), y)

    def grad_fn(p):
        with torch.enable_grad():
            q = OrderedDict((k, v.detach().requires_grad_(True)) for k, v in p.items())
            value = loss(q)
            return value.detach(), OrderedDict(zip(q, torch.autograd.grad(value, list(q.values()))))

    def hvp_fn(p, v):
        with torch.enable_grad():
            q = OrderedDict((k, t.detach().requires_grad_(True)) for k, t in p.items())
            g = torch.autograd.grad(loss(q), list(q.values()), create_graph=True)
            return OrderedDict(zip(q, torch.autograd.grad(g, list(q.values()), grad_outputs=list(v.values()))))

    a = core.hessian_eigenvalues(params, grad_fn, hvp_fn=hvp_fn, k=3, iters=30, seed=5)
    b = gtd.hessian_eigenvalues(model, CE, (x, y), k=3, iters=30, seed=5, probes="numpy")
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-12, atol=1e-14)
    for u, w in zip(a.eigenvectors, b.eigenvectors):
        np.testing.assert_allclose(np.abs(flat(u) @ flat(w)), 1.0, atol=1e-10)
    ta = core.hessian_trace(params, grad_fn, hvp_fn=hvp_fn, samples=20, seed=5)
    tb = gtd.hessian_trace(model, CE, (x, y), samples=20, seed=5, probes="numpy")
    torch.testing.assert_close(ta.samples, tb.samples, rtol=1e-12, atol=1e-13)
    ma = core.measure(params, grad_fn, hvp_fn=hvp_fn, quantities=core.QUANTITIES, samples=10, iters=20, seed=2)
    mb = gtd.measure(model, CE, (x, y), quantities=gtd.QUANTITIES, samples=10, iters=20, seed=2, probes="numpy")
    for name in core.QUANTITIES:
        torch.testing.assert_close(ma[name], mb[name], rtol=1e-11, atol=1e-14)


# --------------------------------------------------------------------------------------------
# determinism, probes, the model untouched


def test_deterministic_given_a_seed():
    model = mlp(batchnorm=True, dropout=0.2)
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    for kwargs in ({}, {"train_mode": True}, {"probes": "numpy"}):
        runs = [gtd.measure(model, CE, loader, quantities=gtd.QUANTITIES, samples=8, iters=10, seed=7, **kwargs)
                for _ in range(2)]
        for name in gtd.QUANTITIES:
            assert torch.equal(runs[0][name], runs[1][name]), (kwargs, name)
    t1 = gtd.hessian_trace(model, CE, (x, y), samples=8, seed=1)
    t2 = gtd.hessian_trace(model, CE, (x, y), samples=8, seed=2)
    assert not torch.equal(t1.samples, t2.samples)


def test_train_mode_dropout_masks_are_fixed_so_the_hessian_is_symmetric():
    model = mlp(dropout=0.5)
    x, y = data()
    h = hvp_matrix(model, (x, y), train_mode=True)
    assert np.max(np.abs(h - h.T)) < 1e-12
    assert np.max(np.abs(h - hvp_matrix(model, (x, y)))) > 1e-3  # dropout is on


def test_torch_probes():
    like = [torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5, dtype=torch.float32)]
    a, b = gtd.TorchProbes(3), gtd.TorchProbes(3)
    ra, rb = a.rademacher(like), b.rademacher(like)
    for r, s, leaf in zip(ra, rb, like):
        assert torch.equal(r, s) and r.dtype == leaf.dtype and r.shape == leaf.shape
        assert set(r.unique().tolist()) <= {-1.0, 1.0}
    na = a.normal(like)
    assert [n.dtype for n in na] == [torch.float64, torch.float32] and not torch.equal(na[0], b.normal(like)[0] * 0)
    assert torch.equal(gtd.TorchProbes(3).normal(like)[0], gtd.TorchProbes(3).normal(like)[0])
    big = gtd.TorchProbes(0).rademacher([torch.zeros(20000)])[0]
    assert abs(float(big.mean())) < 0.03


def test_the_model_is_never_changed():
    model = mlp(batchnorm=True, dropout=0.3)
    model.train()
    model[0].eval()  # a mixed mode is restored module by module
    x, y = data()
    CE(model(x), y).backward()  # something in .grad
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    before = snapshot(model)
    for batches in ((x, y), loader):
        for kwargs in ({}, {"train_mode": True}, {"hvp": "fd"}, {"probes": "numpy"}):
            gtd.measure(model, CE, batches, quantities=gtd.QUANTITIES, samples=4, iters=5, **kwargs)
            gtd.spectral_density(model, CE, batches, iters=5, **{k: v for k, v in kwargs.items()})
            assert_same_snapshot(before, snapshot(model))
    with pytest.raises(RuntimeError, match="boom"):
        gtd.gradient_norm(model, lambda out, t: (_ for _ in ()).throw(RuntimeError("boom")), (x, y))
    assert_same_snapshot(before, snapshot(model))


def test_results_are_tensors_and_the_builder_snapshots_the_weights():
    model = mlp(batchnorm=True)
    x, y = data()
    d = gtd.diagnostics(model, CE, (x, y), params=["0.weight", "3.weight"])
    before = d.eigenvalues(1, iters=20).eigenvalues
    assert isinstance(before, torch.Tensor) and before.dtype == torch.float64
    with torch.no_grad():  # training goes on: weights, the other parameters and the BatchNorm statistics change
        for p in model.parameters():
            p.mul_(1.5)
        model[1].running_mean.add_(1.0)
    # a copy of the old weights and buffers; the graph kept for its HVPs can be released
    torch.testing.assert_close(d.eigenvalues(1, iters=20).eigenvalues, before, rtol=1e-13, atol=0)
    d.curv.oracle.release()
    torch.testing.assert_close(d.eigenvalues(1, iters=20).eigenvalues, before, rtol=1e-13, atol=0)
    assert not torch.allclose(gtd.hessian_eigenvalues(model, CE, (x, y), iters=20).eigenvalues, before)


# --------------------------------------------------------------------------------------------
# errors


def test_clear_errors():
    model = mlp()
    x, y = data()
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        gtd.hessian_eigenvalues(model, "cross_entropy", (x, y))
    with pytest.raises(TypeError, match="`data` must be one batch"):
        gtd.hessian_trace(model, CE, 3)
    with pytest.raises(TypeError, match="`data` must be one batch"):
        gtd.hessian_trace(model, CE, "batch")
    with pytest.raises(TypeError, match="re-iterable"):
        gtd.hessian_trace(model, CE, iter([(x, y)]))
    with pytest.raises(ValueError, match="empty list"):
        gtd.hessian_trace(model, CE, [])
    with pytest.raises(ValueError, match="`k` must be at most the number of parameters"):
        gtd.hessian_eigenvalues(model, CE, (x, y), k=size(model) + 1)
    with pytest.raises(ValueError, match="`which`"):
        gtd.hessian_eigenvalues(model, CE, (x, y), which="BE")
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        gtd.gradient_norm(lambda t: t, CE, (x, y))
    with pytest.raises(ValueError, match="`loss_form`"):
        gtd.gradient_norm(model, CE, (x, y), loss_form="closure")
    with pytest.raises(TypeError, match=r"pair `\(inputs, targets\)`"):
        gtd.gradient_norm(model, CE, (x, y, y))
    with pytest.raises(gradnorm.ClosureError, match="scalar loss"):
        gtd.gradient_norm(model, lambda out, t: F.cross_entropy(out, t, reduction="none"), (x, y))
    with pytest.raises(ValueError, match="`params` must hold parameters of `model`"):
        gtd.gradient_norm(model, CE, (x, y), params=[torch.zeros(3)])
    with pytest.raises(ValueError, match="no parameter named"):
        gtd.gradient_norm(model, CE, (x, y), params=["3.weight"])
    with pytest.raises(ValueError, match="`hvp`"):
        gtd.hessian_trace(model, CE, (x, y), hvp="jvp")
    with pytest.raises(ValueError, match="`probes`"):
        gtd.hessian_trace(model, CE, (x, y), probes="jax")
    with pytest.raises(TypeError, match="`seed`"):
        gtd.hessian_trace(model, CE, (x, y), seed=-1)
    with pytest.raises(ValueError, match="`samples`"):
        gtd.hessian_trace(model, CE, (x, y), samples=2, method="hutch++")
    with pytest.raises(ValueError, match="`quantities`"):
        gtd.Monitor(model, CE, (x, y), quantities=("lambda_min",))
    with pytest.raises(ValueError, match="`every`"):
        gtd.Monitor(model, CE, (x, y), every=0)
    with pytest.raises(TypeError, match="`optimizer`"):
        gtd.Monitor(model, CE, (x, y)).attach(object())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        gtd.gradient_norm(model, CE, (x, y))


# --------------------------------------------------------------------------------------------
# the Monitor


def _train(make_optimizer, monitor_every=None, steps=6, **monitor_kwargs):
    model = mlp(batchnorm=True, dropout=0.2)
    model.train()
    x, y = data(n=32, seed=9)
    held_out = data(n=16, seed=10)
    opt = make_optimizer(model)
    monitor = None
    if monitor_every is not None:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*held_out), batch_size=8, shuffle=True)
        monitor = gtd.Monitor(model, CE, loader, every=monitor_every, **monitor_kwargs).attach(opt)
    torch.manual_seed(123)  # the dropout masks of the training passes
    for i in range(steps):
        xb, yb = x[i % 4 * 8:(i % 4 + 1) * 8], y[i % 4 * 8:(i % 4 + 1) * 8]

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = CE(model(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
    return model, opt, monitor


OPTIMIZERS = {
    "sgd-momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "gradnorm-sam": lambda m: gt.Optimizer(m.parameters(), torch.optim.SGD, rule="sam", rho=0.05, lr=0.1,
                                           momentum=0.9, model=m),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_monitor_does_not_change_training(name):
    logged = []
    plain, plain_opt, _ = _train(OPTIMIZERS[name])
    watched, watched_opt, monitor = _train(OPTIMIZERS[name], monitor_every=2, log_fn=logged.append, prefix="h/",
                                           quantities=("loss", "grad_norm", "lambda_max", "trace"))
    for (n, a), (_, b) in zip(plain.named_parameters(), watched.named_parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(a.grad, b.grad), n
    for (n, a), (_, b) in zip(plain.named_buffers(), watched.named_buffers()):
        assert torch.equal(a, b), n
    for a, b in zip(plain_opt.state.values(), watched_opt.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert watched.training and [e["step"] for e in monitor.history] == [2, 4, 6]
    assert [sorted(d) for d in logged] == [["h/grad_norm", "h/lambda_max", "h/loss", "h/trace"]] * 3
    assert all(isinstance(v, float) for v in logged[0].values())
    # the last entry was measured at the weights after step 6: the ones the model holds now
    again = monitor.measure()
    assert again == {k: v for k, v in monitor.history[-2].items() if k != "step"}
    assert monitor.history[-1]["step"] == 6
    monitor.detach()
    watched_opt.step(lambda: CE(watched(data()[0]), data()[1]))
    assert len(monitor.history) == 4  # detached: no more measurements


def test_monitor_called_explicitly_costs_nothing_between_measurements():
    model = mlp()
    x, y = data()
    calls = []
    monitor = gtd.Monitor(model, lambda out, t: calls.append(1) or CE(out, t), (x, y), every=3,
                          quantities=("grad_norm",))
    assert [monitor.step() for _ in range(2)] == [None, None] and not calls  # no evaluation on other steps
    values = monitor.step()
    assert set(values) == {"grad_norm"} and monitor.history == [{"step": 3, **values}]
    assert values["grad_norm"] == float(gtd.gradient_norm(model, CE, (x, y)))


def test_lazy_export():
    assert gt.diagnostics is gtd and "diagnostics" in gt.__all__


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_results_on_the_device_and_equal_to_cpu():
    model = mlp(batchnorm=True)
    x, y = data()
    cpu = gtd.measure(model, CE, (x, y), quantities=gtd.QUANTITIES, samples=8, iters=20, probes="numpy")
    cuda_model = mlp(batchnorm=True).cuda()
    before = snapshot(cuda_model)
    cuda_rng = torch.cuda.get_rng_state()
    out = gtd.measure(cuda_model, CE, (x, y), quantities=gtd.QUANTITIES, samples=8, iters=20, probes="numpy")
    for name in gtd.QUANTITIES:
        assert out[name].device.type == "cuda"
        torch.testing.assert_close(out[name].cpu(), cpu[name], rtol=1e-9, atol=1e-12)
    probes = gtd.TorchProbes(0).rademacher([torch.zeros(3, device="cuda")])
    assert probes[0].device.type == "cuda"
    res = gtd.hessian_trace(cuda_model, CE, (x.cuda(), y.cuda()), samples=8)  # TorchProbes drawn on the GPU
    assert res.trace.device.type == "cuda"
    assert_same_snapshot(before, snapshot(cuda_model))
    assert torch.equal(cuda_rng, torch.cuda.get_rng_state())
