"""Per-leaf hyperparameters (`gradnorm.PerLeaf`) and PyTorch parameter groups with their own
rule hyperparameters.

The reference is the NumPy float64 math of the conformance suite (`conformance/reference.py`,
written from ALGORITHMS.md, never from gradnorm's rules) with each per-leaf value expanded to
the coordinates of its leaf: `rho * g / ||g||` then reads coordinate-wise, the norm staying
global. For SAM with groups, `pytorch_optimizer.SAM` (whose groups carry their own `rho`) is a
second, external reference.
"""

from __future__ import annotations

import numpy as np
import optree
import pytest

import gradnorm
from conformance.problems import PROBLEMS
from conformance.reference import FlatProblem, reference
from gradnorm import HyperparameterError, PerLeaf

MLP = PROBLEMS["mlp"]  # six leaves of different shapes, a nested dict
N_LEAVES = len(optree.tree_leaves(MLP.params0()))
VALUES = [0.3, 0.0, 0.05, 0.12, 0.2, 0.07]  # one per leaf, one of them zero

# (rule, fixed hyperparameters, the leafwise one varied, scale of its per-leaf values)
CASES = [
    ("sam", {}, "rho", 1.0),
    ("sam", {"rho": 0.5, "adaptive": True}, "eta", 0.1),
    ("gnp", {"alpha": 0.8}, "r", 1.0),
    ("gnp", {"r": 0.1}, "alpha", 3.0),
    ("gr", {}, "gamma", 1.0),
    ("gr", {"penalty": "norm"}, "gamma", 1.0),
    ("fd_gr", {"eps": 0.01}, "gamma", 1.0),
    ("fd_gr", {"eps": 0.05, "difference": "central", "normalize": True}, "gamma", 1.0),
    ("gam", {}, "grad_rho", 0.2),
    ("gam", {}, "grad_norm_rho", 1.0),
    ("gam", {}, "grad_gamma", 2.0),
    ("coherent", {"threshold": 0.0}, "lam", 1.0),
]
IDS = [f"{rule}-{name}" + ("-" + "-".join(f"{k}={v}" for k, v in fixed.items()) if fixed else "") for rule, fixed, name, _ in CASES]


def per_leaf_values(scale):
    return [scale * v for v in VALUES]


def expanded(values):
    """Per-leaf values as a vector over the flat parameter coordinates."""
    flat = FlatProblem(MLP)
    return np.concatenate([np.full(size, v) for v, size in zip(values, flat.sizes)])


def expected_direction(rule, fixed, name, values):
    flat = FlatProblem(MLP)
    return reference(rule, flat, flat.x0, **fixed, **{name: expanded(values)}).direction


@pytest.mark.parametrize("rule,fixed,name,scale", CASES, ids=IDS)
def test_core_step_with_per_leaf_values_matches_the_expanded_reference(rule, fixed, name, scale):
    values = per_leaf_values(scale)
    hyper = {**fixed, name: PerLeaf(values)}
    res = gradnorm.step(MLP.params0(), MLP.grad_fn(), rule=rule, hvp_fn=MLP.hvp_fn(), **hyper)
    got = FlatProblem(MLP).flatten(res.grad)
    want = expected_direction(rule, fixed, name, values)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # and the per-leaf values made a difference: not the same as one value for all
    uniform = reference(rule, FlatProblem(MLP), FlatProblem(MLP).x0, **fixed, **{name: max(values)}).direction
    assert np.max(np.abs(got - uniform)) > 1e-6


def test_per_leaf_given_as_a_tree_like_the_params():
    params = MLP.params0()
    leaves, treedef = optree.tree_flatten(params)
    tree = optree.tree_unflatten(treedef, VALUES)
    a = gradnorm.step(params, MLP.grad_fn(), rule="sam", rho=PerLeaf(tree)).grad
    b = gradnorm.step(params, MLP.grad_fn(), rule="sam", rho=PerLeaf(VALUES)).grad
    for u, v in zip(optree.tree_leaves(a), optree.tree_leaves(b)):
        np.testing.assert_array_equal(u, v)


def test_equal_per_leaf_values_collapse_to_the_scalar_rule_bit_for_bit():
    rule = gradnorm.rules.get("sam", rho=PerLeaf([0.05] * N_LEAVES))
    assert rule == gradnorm.rules.SAM(rho=0.05) and rule.rho == 0.05
    a = gradnorm.step(MLP.params0(), MLP.grad_fn(), rule=rule).grad
    b = gradnorm.step(MLP.params0(), MLP.grad_fn(), rule="sam", rho=0.05).grad
    for u, v in zip(optree.tree_leaves(a), optree.tree_leaves(b)):
        np.testing.assert_array_equal(u, v)


def test_per_leaf_errors_name_the_argument_and_what_fits():
    with pytest.raises(HyperparameterError, match=r"`adaptive` of rule 'sam' takes one value.*accepted for: rho, eta"):
        gradnorm.rules.get("sam", rho=0.1, adaptive=PerLeaf([True, False]))
    with pytest.raises(HyperparameterError, match=r"leaf 1 of a PerLeaf: `rho` of rule 'sam' must be a finite number >= 0"):
        gradnorm.rules.get("sam", rho=PerLeaf([0.1, -0.2]))
    with pytest.raises(HyperparameterError, match=r"flooding.*no per-leaf"):
        gradnorm.rules.get("flooding", b=PerLeaf([0.1, 0.2]))
    with pytest.raises(HyperparameterError, match=rf"PerLeaf with 3 values.*`params` has {N_LEAVES} leaves"):
        gradnorm.step(MLP.params0(), MLP.grad_fn(), rule="sam", rho=PerLeaf([0.1, 0.2, 0.3]))
    wrong_tree = {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4, "e": 0.5, "f": 0.6}  # six values, other structure
    with pytest.raises(HyperparameterError, match="of structure"):
        gradnorm.step(MLP.params0(), MLP.grad_fn(), rule="sam", rho=PerLeaf(wrong_tree))
    with pytest.raises(ValueError, match="at least one value"):
        PerLeaf([])


def test_per_leaf_arithmetic_acts_on_every_value():
    p = PerLeaf([1.0, 2.0, 4.0])
    assert (p * 3.0).leaf_values() == [3.0, 6.0, 12.0]
    assert (2.0 * p).leaf_values() == [2.0, 4.0, 8.0]
    assert (p / 2.0).leaf_values() == [0.5, 1.0, 2.0]
    assert (8.0 / p).leaf_values() == [8.0, 4.0, 2.0]
    assert (1.0 - p).leaf_values() == [0.0, -1.0, -3.0]
    assert (p + 1.0).leaf_values() == [2.0, 3.0, 5.0]
    assert (-p).leaf_values() == [-1.0, -2.0, -4.0]
    assert (p * PerLeaf([1.0, 0.5, 0.25])).leaf_values() == [1.0, 1.0, 1.0]
    assert p.take([2, 0]).leaf_values() == [4.0, 1.0]
    assert p == PerLeaf([1.0, 2.0, 4.0]) and hash(p) == hash(PerLeaf([1.0, 2.0, 4.0]))
    with pytest.raises(ValueError, match="different lengths"):
        p + PerLeaf([1.0])


def test_array_ops_apply_leaf_i_value_to_leaf_i():
    xp = pytest.importorskip("array_api_strict")

    ops = gradnorm.ArrayOps(xp)
    x = [xp.asarray([1.0, 2.0]), xp.asarray([3.0])]
    y = [xp.asarray([10.0, 10.0]), xp.asarray([10.0])]
    s = PerLeaf([2.0, -1.0]) * xp.asarray(0.5)  # a 0-d array factor
    np.testing.assert_array_equal(np.asarray(ops.scale(s, x)[0]), [1.0, 2.0])
    np.testing.assert_array_equal(np.asarray(ops.scale(s, x)[1]), [-1.5])
    np.testing.assert_array_equal(np.asarray(ops.axpy(s, x, y)[1]), [8.5])
    np.testing.assert_array_equal(np.asarray(ops.lincomb(s, x, 1.0 - PerLeaf([0.0, 1.0]), y)[0]), [11.0, 12.0])
    np.testing.assert_array_equal(np.asarray(ops.lincomb(s, x, 1.0 - PerLeaf([0.0, 1.0]), y)[1]), [-1.5])
    np.testing.assert_array_equal(np.asarray(ops.add_scalar(x, PerLeaf([1.0, 2.0]))[1]), [5.0])


# ------------------------------------------------------------------------------------------
# PyTorch: per-leaf values through torch.func and through parameter groups

torch = pytest.importorskip("torch")


def _torch_tree(dtype=None):
    dtype = dtype or torch.float64
    return optree.tree_map(lambda a: torch.as_tensor(np.array(a), dtype=dtype), MLP.params0())


def _torch_loss():
    import array_api_compat.torch as xp

    data = {k: torch.as_tensor(v) for k, v in MLP.data.items()}
    return lambda p: MLP.loss(xp, p, data)


@pytest.mark.parametrize("rule,fixed,name,scale", CASES, ids=IDS)
def test_torch_functional_step_with_per_leaf_values(rule, fixed, name, scale):
    import gradnorm.torch as gt

    values = per_leaf_values(scale)
    res = gt.step(_torch_tree(), _torch_loss(), rule=rule, **fixed, **{name: PerLeaf(values)})
    got = np.concatenate([d.numpy().reshape(-1) for d in optree.tree_leaves(res.grad)])
    np.testing.assert_allclose(got, expected_direction(rule, fixed, name, values), rtol=1e-9, atol=1e-12)


def _group_optimizer(rule, fixed, name, values, lr=0.0):
    """A gradnorm.torch.Optimizer with one parameter group per leaf, each with its own value."""
    import gradnorm.torch as gt

    leaves = [leaf.requires_grad_(True) for leaf in optree.tree_leaves(_torch_tree())]
    treedef = optree.tree_structure(MLP.params0())
    groups = [{"params": [leaf], name: v} for leaf, v in zip(leaves, values)]
    default = {"gamma": 0.01, "lam": 0.01, "rho": 0.01, "r": 0.01, "alpha": 0.5}
    kwargs = {name: default[name]} if name in default and name not in fixed else {}
    opt = gt.Optimizer(groups, torch.optim.SGD, rule=rule, lr=lr, **fixed, **kwargs)
    loss = _torch_loss()

    def closure(create_graph=False):
        opt.zero_grad()
        value = loss(optree.tree_unflatten(treedef, leaves))
        value.backward(create_graph=create_graph)
        return value

    return opt, closure, leaves


@pytest.mark.parametrize("rule,fixed,name,scale", CASES, ids=IDS)
def test_torch_optimizer_groups_carry_their_own_values(rule, fixed, name, scale):
    values = per_leaf_values(scale)
    opt, closure, leaves = _group_optimizer(rule, fixed, name, values)
    opt.step(closure)
    got = np.concatenate([p.grad.detach().numpy().reshape(-1) for p in leaves])
    np.testing.assert_allclose(got, expected_direction(rule, fixed, name, values), rtol=1e-9, atol=1e-12)


def test_torch_groups_follow_a_schedule_of_their_values():
    opt, closure, leaves = _group_optimizer("sam", {}, "rho", per_leaf_values(1.0))
    for group, v in zip(opt.param_groups, reversed(VALUES)):
        group["rho"] = v  # as a scheduler would
    opt.step(closure)
    got = np.concatenate([p.grad.detach().numpy().reshape(-1) for p in leaves])
    np.testing.assert_allclose(got, expected_direction("sam", {}, "rho", list(reversed(VALUES))), rtol=1e-9)


def test_torch_groups_with_equal_values_take_the_scalar_path():
    import gradnorm.torch as gt

    opt, _, _ = _group_optimizer("sam", {}, "rho", [0.05] * N_LEAVES)
    opt._groups.for_step(opt.param_groups, opt._params())
    assert opt._groups.for_step(opt.param_groups, opt._params()) == gradnorm.rules.SAM(rho=0.05)
    plain = gt.Optimizer([torch.zeros(2, requires_grad=True)], torch.optim.SGD, rule="sam", rho=0.05, lr=0.1)
    assert plain.param_groups[0]["rho"] == 0.05  # every group carries the value, as it carries lr


def test_torch_group_errors():
    import gradnorm.torch as gt

    w, b = torch.zeros(3, requires_grad=True), torch.zeros(1, requires_grad=True)
    with pytest.raises(HyperparameterError, match=r"`adaptive` of rule 'sam' cannot differ between parameter groups"):
        gt.Optimizer([{"params": [w]}, {"params": [b], "adaptive": True}], torch.optim.SGD, rule="sam", rho=0.1, lr=0.1)
    with pytest.raises(HyperparameterError, match=r"param_groups\[1\]: `rho` of rule 'sam' must be a finite number >= 0"):
        gt.Optimizer([{"params": [w]}, {"params": [b], "rho": -1.0}], torch.optim.SGD, rule="sam", rho=0.1, lr=0.1)
    with pytest.raises(HyperparameterError, match=r"parameter groups"):
        gt.Optimizer([w, b], torch.optim.SGD, rule="sam", rho=PerLeaf([0.1, 0.2]), lr=0.1)
    opt = gt.Optimizer([{"params": [w]}], torch.optim.SGD, rule="sam", rho=0.1, lr=0.1)
    with pytest.raises(HyperparameterError, match="cannot differ"):
        opt.add_param_group({"params": [b], "adaptive": True})
    opt.add_param_group({"params": [b], "rho": 0.3})
    assert [g["rho"] for g in opt.param_groups] == [0.1, 0.3] and opt.base.param_groups is opt.param_groups


def test_torch_base_argument_of_the_same_name_stays_the_base_optimizers():
    """GNP's `alpha` and RMSprop's `alpha` share a name: the groups' `alpha` is RMSprop's and the
    rule uses the value given to the optimizer for every group."""
    import gradnorm.torch as gt

    w = torch.ones(3, requires_grad=True)
    opt = gt.Optimizer([w], torch.optim.RMSprop, rule="gnp", r=0.1, alpha=0.8, lr=0.01)
    assert opt.param_groups[0]["alpha"] == 0.99  # RMSprop's default
    assert opt._groups.for_step(opt.param_groups, opt._params()).alpha == 0.8


def test_torch_groups_match_pytorch_optimizer_sam_with_per_group_rho():
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    import copy

    import gradnorm.torch as gt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))

    def groups(m):
        ps = list(m.parameters())
        return [{"params": ps[:2], "rho": 0.2}, {"params": ps[2:], "rho": 0.02, "lr": 0.05}]

    opt = gt.Optimizer(groups(model), torch.optim.SGD, rule="sam", rho=0.05, lr=0.1, momentum=0.9)
    peer = pytorch_optimizer.SAM(groups(twin), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss

        return closure

    ours, theirs = closure_for(model, opt), closure_for(twin, peer)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(10):
        opt.step(ours)
        theirs()
        peer.step(theirs)
    moved = max((a - b).abs().max().item() for a, b in zip(model.parameters(), start))
    gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters()))
    assert moved > 1e-2
    # pytorch_optimizer takes the global norm in float32 (DESIGN.md section 8): about 1e-10 apart
    assert gap < 1e-8, gap
