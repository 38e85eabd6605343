"""`periodic` and `looksam` (gradnorm.rules.Periodic, gradnorm.rules.LookSAM): a multi-pass rule every k
steps, the plain gradient or LookSAM's correction in between.

* cost: exactly k + 1 gradient evaluations over k steps (counted calls and ``info["grad_evals"]``), eagerly,
  in the PyTorch optimizer, and at run time under ``jax.jit`` and ``tf.function`` (a callback / a variable
  in the loss counts what really runs: the skipped branch does not), without recompilation;
* the full steps equal the wrapped rule bit for bit, the others the plain gradient (`periodic`) or
  g + alpha ||g|| / (||g_v|| + eps) g_v computed by hand here (reuse, globally and per tensor);
* the state (the wrapped rule's, the counter, the g_v leaves, kept at unit length) through a torch checkpoint
  (``weights_only=True``) and a Keras ``model.save`` / ``load_model``, continuing bit for bit;
* errors: the wrapped rule (one-pass, HVP, nested, not a rule), `every`, `alpha`, `decomposition`.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

import gradnorm
from gradnorm import HyperparameterError
from gradnorm.rules import GNP, SAM, LookSAM, Periodic, PeriodicState

EPS = 1e-12
X = np.random.default_rng(0).normal(size=(24, 4))
Y = np.tanh(X @ np.array([1.0, -2.0, 0.5, 0.3])) + 0.1 * np.random.default_rng(1).normal(size=24)
W0 = {"b": np.array([0.2]), "w": np.array([0.3, -0.1, 0.4, 0.05]), "u": np.array([[0.5, -0.5], [0.1, 0.2]])}


class Counting:
    """``grad_fn`` of a small nonlinear least-squares problem on three leaves (one of one element),
    counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, p):
        self.calls += 1
        z = X @ p["w"] + p["b"][0] + 0.1 * np.sum(p["u"] ** 2)
        r = np.tanh(z) - Y
        dz = r * (1 - np.tanh(z) ** 2) / len(Y)
        return 0.5 * np.mean(r**2), {"b": np.array([dz.sum()]), "w": X.T @ dz, "u": 0.2 * dz.sum() * p["u"]}


def run(rule, steps, lr=0.1, params=None, **hyper):
    """`steps` numpy-core steps of SGD with `rule`; the StepResults and the calls of each step."""
    f = Counting()
    p = {k: v.copy() for k, v in (params or W0).items()}
    state, out, calls = None, [], []
    for _ in range(steps):
        before = f.calls
        res = gradnorm.step(p, f, rule=rule, state=state, **hyper)
        calls.append(f.calls - before)
        out.append((p, res))
        state = res.state
        p = {k: p[k] - lr * res.grad[k] for k in p}
    return out, calls


def flat(tree):
    return np.concatenate([np.ravel(tree[k]) for k in sorted(tree)])


# -- cost --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("rule", ["periodic", "looksam"])
def test_k_plus_one_gradient_evaluations_per_k_steps(rule, k):
    hyper = {"inner": SAM(rho=0.05), "every": k} if rule == "periodic" else {"rho": 0.05, "every": k}
    obj = gradnorm.rules.get(rule, **hyper)
    assert obj.grad_evals == 2 and obj.mean_grad_evals == pytest.approx((k + 1) / k)
    out, calls = run(rule, 3 * k, **hyper)
    assert sum(calls) == 3 * (k + 1)
    assert calls == [int(res.info["grad_evals"]) for _, res in out]
    assert calls == ([2] + [1] * (k - 1)) * 3
    assert [bool(res.info["full_step"]) for _, res in out] == ([True] + [False] * (k - 1)) * 3


def test_the_cost_of_a_wrapped_rule_of_four_evaluations():
    obj = Periodic(gradnorm.rules.GAM(), every=4)
    assert (obj.grad_evals, obj.mean_grad_evals) == (4, 7 / 4)
    _, calls = run(obj, 8)
    assert calls == [4, 1, 1, 1, 4, 1, 1, 1]


# -- what each step computes ----------------------------------------------------------------------


@pytest.mark.parametrize("inner", [SAM(rho=0.05), GNP(r=0.1, alpha=0.8), gradnorm.rules.FDGR(gamma=0.1, eps=0.01)])
def test_full_steps_are_the_wrapped_rule_and_the_others_the_gradient(inner):
    out, _ = run(Periodic(inner, every=3), 7)
    for t, (p, res) in enumerate(out):
        if t % 3 == 0:
            want = gradnorm.step(p, Counting(), rule=inner)
        else:
            want = gradnorm.step(p, Counting(), rule="sgd")
        for key in p:
            np.testing.assert_array_equal(res.grad[key], want.grad[key])
        assert int(res.state.step) == t + 1


def test_every_one_is_the_wrapped_rule():
    out, calls = run(Periodic(SAM(rho=0.05), every=1), 4)
    assert calls == [2, 2, 2, 2]
    for p, res in out:
        want = gradnorm.step(p, Counting(), rule="sam", rho=0.05)
        assert all(np.array_equal(res.grad[k], want.grad[k]) for k in p)


def orthogonal_part(g, d, slices):
    """LookSAM's g_v = d - <g, d> / (||g||^2 + eps^2) g, by hand, on each block of coordinates (a block of
    one coordinate has none: 0)."""
    gv = np.zeros_like(d)
    for sl in slices:
        if sl.stop - sl.start > 1 or len(slices) == 1:
            gv[sl] = d[sl] - (g[sl] @ d[sl]) / (g[sl] @ g[sl] + EPS**2) * g[sl]
    return gv


def with_reuse(g, gv, alpha, slices):
    d = g.copy()
    for sl in slices:
        if sl.stop - sl.start > 1 or len(slices) == 1:
            d[sl] = g[sl] + alpha * np.linalg.norm(g[sl]) / (np.linalg.norm(gv[sl]) + EPS) * gv[sl]
    return d


@pytest.mark.parametrize("decomposition", ["global", "per_tensor"])
def test_reuse_against_a_hand_computation(decomposition):
    """LookSAM: the SAM gradient g_s at a full step, its part orthogonal to g stored; the other steps
    g + alpha ||g|| / (||g_v|| + eps) g_v, globally or per leaf (leaves b (1), u (2 x 2), w (4), in
    sorted-key order; b has one element, so per leaf it gets nothing)."""
    alpha = 0.6
    sizes = [1, 4, 4]
    bounds = np.cumsum([0, *sizes])
    slices = [slice(0, 9)] if decomposition == "global" else [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    out, _ = run("looksam", 6, rho=0.1, every=3, alpha=alpha, decomposition=decomposition)
    gv = None
    for t, (p, res) in enumerate(out):
        g = flat(Counting()(p)[1])
        if t % 3 == 0:
            gs = flat(gradnorm.step(p, Counting(), rule="sam", rho=0.1).grad)
            want = gs
            gv = orthogonal_part(g, gs, slices)
            assert abs(gv @ g) < 1e-12 * np.linalg.norm(gv) * np.linalg.norm(g) or decomposition == "per_tensor"
        else:
            want = with_reuse(g, gv, alpha, slices)
        np.testing.assert_allclose(flat(res.grad), want, rtol=1e-13, atol=1e-15)
        # the state keeps g_v scaled to unit length (per block), which the skipped steps rescale to ||g||
        unit = np.concatenate([gv[sl] / (np.linalg.norm(gv[sl]) + EPS) for sl in slices])
        np.testing.assert_allclose(flat({k: v for k, v in zip(sorted(p), res.state.reuse)}), unit, rtol=1e-12, atol=1e-15)
    if decomposition == "per_tensor":  # the one-element leaf: the plain gradient on the skipped steps
        p, res = out[1]
        assert res.grad["b"][0] == Counting()(p)[1]["b"][0]


def test_looksam_is_periodic_sam_with_reuse():
    a, _ = run("looksam", 5, rho=0.05, every=2, alpha=0.5, decomposition="per_tensor")
    b, _ = run(Periodic(SAM(rho=0.05), every=2, reuse=True, alpha=0.5, decomposition="per_tensor"), 5)
    for (_, x), (_, y) in zip(a, b):
        assert all(np.array_equal(x.grad[k], y.grad[k]) for k in x.grad)


def test_reuse_of_gnp_is_normalized_like_sams():
    """GNP's direction differs from the SAM gradient at the same point only along g and in scale: the
    reused g_v, normalized, gives the same skipped steps as LookSAM with rho = r."""
    p = {k: v.copy() for k, v in W0.items()}
    gnp = gradnorm.step(p, Counting(), rule=Periodic(GNP(r=0.05, alpha=0.5), every=2, reuse=True))
    sam = gradnorm.step(p, Counting(), rule=LookSAM(rho=0.05, every=2))
    second = [gradnorm.step(p, Counting(), rule=r, state=s.state)
              for r, s in ((Periodic(GNP(r=0.05, alpha=0.5), every=2, reuse=True), gnp), (LookSAM(rho=0.05, every=2), sam))]
    # up to rounding: g_v is a small difference of nearly parallel vectors (here ||g_v|| ~ 1e-5 ||g_s||)
    np.testing.assert_allclose(flat(second[0].grad), flat(second[1].grad), rtol=1e-9)


def test_zero_strength_is_the_gradient_at_every_step():
    out, calls = run("looksam", 4, rho=0.0, every=2)
    assert calls == [1, 1, 1, 1]
    out2, calls2 = run(Periodic(SAM(rho=0.0), every=2, reuse=True), 4)
    assert calls2 == [1, 1, 1, 1]
    for p, res in out + out2:
        g = Counting()(p)[1]
        assert all(np.array_equal(res.grad[k], g[k]) for k in g)


def test_zero_gradient_is_finite():
    zero = {"b": np.zeros(1), "w": np.zeros(4), "u": np.zeros((2, 2))}

    def grad_fn(p):
        return np.float64(0.0), {k: np.zeros_like(v) for k, v in p.items()}

    for decomposition in ("global", "per_tensor"):
        state = None
        for _ in range(3):
            res = gradnorm.step(zero, grad_fn, rule="looksam", rho=0.05, every=2, decomposition=decomposition,
                                state=state)
            state = res.state
            assert all(np.all(np.isfinite(v)) for v in res.grad.values()) and bool(res.info["finite"])


def test_state_is_a_tree_with_the_counter_and_the_reuse_leaves():
    p = {k: v.copy() for k, v in W0.items()}
    state = LookSAM(rho=0.05, every=2).init(p)
    assert isinstance(state, PeriodicState) and state.inner == gradnorm.rules.EmptyState()
    assert state.step.shape == () and state.step.dtype == np.int32
    assert [x.shape for x in state.reuse] == [(1,), (2, 2), (4,)]
    assert Periodic(SAM(rho=0.05), every=2).init(p).reuse == []


def test_config_round_trip():
    rule = Periodic(GNP(r=0.05, alpha=0.8), every=3, reuse=True, alpha=0.5)
    config = rule.to_config()
    assert config["hyperparameters"]["inner"] == {"rule": "gnp", "hyperparameters": GNP(r=0.05, alpha=0.8).config}
    assert gradnorm.rules.from_config(config) == rule
    assert gradnorm.rules.get("periodic", inner=config["hyperparameters"]["inner"], every=3, reuse=True, alpha=0.5) == rule
    assert Periodic("gam", every=2).inner == gradnorm.rules.GAM()
    assert rule.replace(every=5).every == 5 and rule.replace(every=5).inner == rule.inner


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner,message", [
    (gradnorm.rules.GR(gamma=0.1), "needs a Hessian-vector product"),
    (gradnorm.rules.GR(gamma=0.0), "needs a Hessian-vector product"),
    (gradnorm.rules.SGD(), "nothing to skip"),
    (gradnorm.rules.Flooding(b=0.1), "nothing to skip"),
    (gradnorm.rules.Coherent(lam=0.1, threshold=0.0), "nothing to skip"),
    (Periodic(SAM(rho=0.05), every=2), "must not be a periodic rule"),
    (LookSAM(rho=0.05, every=2), "must not be a periodic rule"),
    (0.05, "must be a gradnorm.rules.Rule"),
    ("sam", r"building it failed.*`rho`"),
    ({"rule": "sam"}, "must be a gradnorm.rules.Rule"),
    ("nope", "building it failed"),
])
def test_refused_inner_rules(inner, message):
    f = Counting()
    with pytest.raises(HyperparameterError, match=message) as info:
        gradnorm.step(W0, f, rule="periodic", inner=inner, every=2)
    assert "`inner`" in str(info.value) and f.calls == 0


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2", None, np.float64(2.0)])
def test_bad_every(every):
    with pytest.raises(HyperparameterError, match="`every`.*integer >= 1"):
        Periodic(SAM(rho=0.05), every=every)
    with pytest.raises(HyperparameterError, match="`every`.*integer >= 1"):
        LookSAM(rho=0.05, every=every)


def test_every_is_required():
    with pytest.raises(HyperparameterError, match="needs `every`"):
        LookSAM(rho=0.05)
    with pytest.raises(HyperparameterError, match="needs `inner`"):
        gradnorm.rules.get("periodic", every=2)
    assert Periodic(SAM(rho=0.05), every=np.int64(3)).every == 3


@pytest.mark.parametrize("hyper,message", [
    ({"alpha": -0.1}, "`alpha`.*>= 0"),
    ({"alpha": float("nan")}, "`alpha`.*finite"),
    ({"decomposition": "layerwise"}, "`decomposition`.*'global', 'per_tensor'"),
    ({"reuse": 1}, "`reuse`.*True or False"),
])
def test_bad_reuse_hyperparameters(hyper, message):
    with pytest.raises(HyperparameterError, match=message):
        Periodic(SAM(rho=0.05), every=2, **{"reuse": True, **hyper})


@pytest.mark.parametrize("hyper", [{"alpha": 0.5}, {"decomposition": "per_tensor"}])
def test_reuse_options_without_reuse_are_refused(hyper):
    with pytest.raises(HyperparameterError, match="only with reuse=True"):
        Periodic(SAM(rho=0.05), every=2, **hyper)


# -- PyTorch ----------------------------------------------------------------------------------------


def torch_trainer(rule, **hyper):
    torch = pytest.importorskip("torch")
    import gradnorm.torch as gt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)[:, None]
    opt = gt.Optimizer(model.parameters(), torch.optim.SGD, rule=rule, lr=0.1, momentum=0.9, **hyper)
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return model, opt, closure, calls


@pytest.mark.parametrize("k", [2, 5])
def test_torch_optimizer_spends_k_plus_one_per_k_steps(k):
    torch = pytest.importorskip("torch")
    _, opt, closure, calls = torch_trainer("looksam", rho=0.05, every=k)
    assert opt.rule_state.step.device == torch.device("cpu")  # the branch is chosen without a device sync
    spent = []
    for _ in range(2 * k):
        opt.step(closure)
        spent.append(int(opt.last_info["grad_evals"]))
    assert calls[0] == sum(spent) == 2 * (k + 1)


def test_torch_the_one_host_read_is_the_branch_on_the_host_counter(monkeypatch):
    """The rule math on TorchForeachOps reads nothing back but the 0-d boolean that picks the branch, made
    from the step counter, which lives in host memory (so on a GPU the read does not wait for the device)."""
    torch = pytest.importorskip("torch")
    from gradnorm.torch._ops import TorchForeachOps

    params = {k: torch.tensor(v) for k, v in W0.items()}

    x, y = torch.tensor(X), torch.tensor(Y)

    class Oracle:  # Counting's problem in torch: its evaluations read nothing back either
        has_hvp = False

        def value_and_grad(self, p):
            z = x @ p["w"] + p["b"][0] + 0.1 * torch.sum(p["u"] ** 2)
            r = torch.tanh(z) - y
            dz = r * (1 - torch.tanh(z) ** 2) / len(Y)
            return 0.5 * torch.mean(r**2), {"b": dz.sum().reshape(1), "w": x.T @ dz, "u": 0.2 * dz.sum() * p["u"]}

    reads = []
    real_bool = torch.Tensor.__bool__

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    def recorded(self):
        reads.append((tuple(self.shape), self.dtype, self.device.type))
        return real_bool(self)

    rule = LookSAM(rho=0.05, every=2)
    state = rule.init(params)
    for _ in range(3):
        loss, grads = Oracle().value_and_grad(params)  # the first pass, outside the check
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "numpy", "__float__", "__int__", "__index__"):
                m.setattr(torch.Tensor, name, refuse)
            m.setattr(torch.Tensor, "__bool__", recorded)
            _, state, _ = rule.update(params, state, Oracle(), loss=loss, grads=grads, ops=TorchForeachOps(),
                                      check=False)
    assert reads == [((), torch.bool, "cpu")] * 3


@pytest.mark.parametrize("rule,hyper", [
    ("looksam", {"rho": 0.05, "every": 3, "decomposition": "per_tensor"}),
    ("periodic", {"inner": GNP(r=0.05, alpha=0.8), "every": 3, "reuse": True}),
])
def test_torch_checkpoint_round_trip_continues_bit_for_bit(rule, hyper):
    torch = pytest.importorskip("torch")
    model, opt, closure, _ = torch_trainer(rule, **hyper)
    for _ in range(4):  # a full step, then a skipped one: the state holds g_v and a counter of 4
        opt.step(closure)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain data: the wrapped rule as its config
    assert [tuple(t.shape) for t in saved["gradnorm"]["state"]][0] == ()  # the counter, then the g_v leaves
    assert int(saved["gradnorm"]["state"][0]) == 4
    weights = copy.deepcopy(model.state_dict())
    for _ in range(3):
        opt.step(closure)
    model2, opt2, closure2, _ = torch_trainer(rule, **hyper)
    model2.load_state_dict(weights)
    opt2.load_state_dict(saved)
    for _ in range(3):
        opt2.step(closure2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


# -- JAX: jit, no recompilation, and the skipped branch does not run ---------------------------------


def test_jax_jit_runs_the_full_rule_only_at_full_steps():
    jax = pytest.importorskip("jax")
    gj = pytest.importorskip("gradnorm.jax")
    jnp = jax.numpy
    x, y = jnp.asarray(X, jnp.float32), jnp.asarray(Y, jnp.float32)
    traced, ran = [0], []

    def loss_fn(p):
        traced[0] += 1
        jax.debug.callback(lambda: ran.append(1))  # runs when the evaluation runs, not when traced
        return 0.5 * jnp.mean((jnp.tanh(x @ p["w"] + p["b"][0]) - y) ** 2)

    rule = LookSAM(rho=0.05, every=4)
    params = {"b": jnp.zeros(1, jnp.float32), "w": jnp.full(4, 0.1, jnp.float32)}  # not weakly typed
    step = jax.jit(lambda p, s: gj.step(p, loss_fn, rule=rule, state=s))
    state, spent, traces = rule.init(params), [], []
    for _ in range(8):
        res = step(params, state)
        traces.append(traced[0])
        jax.block_until_ready(res.grad)
        jax.effects_barrier()
        state, params = res.state, jax.tree.map(lambda a, d: a - 0.1 * d, params, res.grad)
        spent.append(int(res.info["grad_evals"]))
    assert spent == [2, 1, 1, 1, 2, 1, 1, 1]
    assert len(ran) == sum(spent) == 10  # (k + 1) per k steps at run time
    assert traces == traces[:1] * 8  # traced at the first call only (both branches, once)


# -- TensorFlow: tf.function and Keras ------------------------------------------------------------------


def test_tf_function_runs_the_full_rule_only_at_full_steps():
    tf = pytest.importorskip("tensorflow")
    gt = pytest.importorskip("gradnorm.tf")
    x, y = tf.constant(X, tf.float32), tf.constant(Y, tf.float32)
    w, b = tf.Variable(tf.fill([4], 0.1)), tf.Variable(tf.zeros([1]))
    evaluations = tf.Variable(0)
    rule = LookSAM(rho=0.05, every=3)

    def loss_fn():
        evaluations.assign_add(1)  # runs only where the evaluation runs
        return 0.5 * tf.reduce_mean((tf.tanh(tf.linalg.matvec(x, w) + b[0]) - y) ** 2)

    @tf.function
    def step(state):
        res = gt.step([w, b], loss_fn, rule=rule, state=state)
        w.assign_sub(0.1 * res.grad[0])
        b.assign_sub(0.1 * res.grad[1])
        return res.state, res.info["grad_evals"]

    state, spent = rule.init([w.read_value(), b.read_value()]), []
    for _ in range(6):
        state, n = step(state)
        spent.append(int(n))
    assert spent == [2, 1, 1, 2, 1, 1]
    assert int(evaluations.numpy()) == 8
    assert step.experimental_get_tracing_count() == 1


def test_keras_save_and_load_continue_bit_for_bit(tmp_path):
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    gk = pytest.importorskip("gradnorm.tf.keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("gradnorm.tf.keras needs the TensorFlow backend of Keras")

    def trainer():
        net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)])
        net.set_weights([np.full((4, 3), 0.1, np.float32), np.zeros(3, np.float32),
                         np.full((3, 1), 0.2, np.float32), np.zeros(1, np.float32)])
        model = gk.GradnormModel(net, rule="periodic", inner=GNP(r=0.05, alpha=0.8), every=3, reuse=True,
                                 decomposition="per_tensor")
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
        return model

    data = (X.astype(np.float32), Y.astype(np.float32)[:, None])
    straight = trainer()
    straight.fit(*data, batch_size=6, epochs=2, shuffle=False, verbose=0)  # 8 steps
    first = trainer()
    first.fit(*data, batch_size=6, epochs=1, shuffle=False, verbose=0)  # 4 steps: the next one is skipped
    path = tmp_path / "periodic.keras"
    first.save(path)
    resumed = keras.models.load_model(path)
    assert resumed.rule == first.rule
    counter = resumed._gradnorm_settings.loaded_state[0]  # the state leaves, read from the file
    assert np.shape(counter) == () and int(counter) == 4
    resumed.fit(*data, batch_size=6, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(resumed.model.get_weights(), straight.model.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_keras_batchnorm_statistics_come_from_the_first_pass_compiled_as_eagerly():
    """In Keras's compiled train function the full step is a branch of ``tf.cond``: the moving statistics
    of BatchNormalization are those of the pass at the unperturbed weights, as in the eager steps (the
    oracle reads them before the branches: `LeafOracle.prepare_traced_branches`)."""
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    gk = pytest.importorskip("gradnorm.tf.keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("gradnorm.tf.keras needs the TensorFlow backend of Keras")

    def train(run_eagerly):
        keras.utils.set_random_seed(0)
        net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                                keras.layers.Dense(1)])
        model = gk.GradnormModel(net, rule="looksam", rho=0.05, every=2)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", run_eagerly=run_eagerly)
        model.fit(X.astype(np.float32), Y.astype(np.float32)[:, None], batch_size=6, epochs=1, shuffle=False, verbose=0)
        return [w.numpy() for w in net.weights]  # kernels, biases, gamma, beta, moving mean and variance

    for got, want in zip(train(False), train(True)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


_SHARD_MAP_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import gradnorm, gradnorm.jax as gj

mesh = Mesh(np.array(jax.devices()), ("data",))
x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
y = jnp.zeros(8, jnp.float32)

def loss_fn(p, x, y):
    return 0.5 * jnp.mean((jnp.tanh(x @ p["w"]) - y + 1.0) ** 2)

out = {}
for policy in ("local", "global"):
    rule = gradnorm.rules.LookSAM(rho=0.05, every=2)
    p = jax.device_put({"w": jnp.full(3, 0.2, jnp.float32)}, NamedSharding(mesh, P()))
    step = jax.jit(lambda p, s, x, y: gj.data_parallel_step(p, loss_fn, x, y, mesh=mesh, rule=rule, state=s,
                                                            perturbation=policy))
    state, single, rows = rule.init(p), None, []
    for _ in range(4):
        res = step(p, state, x, y)
        state = res.state
        single = gj.step(p, loss_fn, x, y, rule=rule, state=None if single is None else single.state)
        rows.append([int(res.info["grad_evals"]), np.asarray(res.grad["w"]).tolist(), np.asarray(single.grad["w"]).tolist()])
    out[policy] = rows
print(json.dumps(out))
"""


def test_jax_shard_map_data_parallel_step():
    """Inside ``jax.shard_map`` the branches' outputs vary over the data axis alike (a state buffer passed
    through and one computed from this device's gradient): with the "global" policy the step equals the
    single-device step on the whole batch; with "local" (per-device perturbations) it runs too."""
    pytest.importorskip("jax")
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for policy, rows in out.items():
        assert [n for n, _, _ in rows] == [2, 1, 2, 1], policy
    for _, got, single in out["global"]:
        np.testing.assert_allclose(got, single, rtol=1e-5, atol=1e-6)
