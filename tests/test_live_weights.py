"""The live-weights mechanism (`gradnorm._live.LiveWeights`) in the PyTorch and TensorFlow adapters:
the snapshot is taken when the weights are first about to move, whatever the rule declares about its
cost, and the weights come back bit for bit on success and on any exception."""

from __future__ import annotations

import numpy as np
import pytest

import gradnorm
from tests._test_rules import Underreporting

RHO = 0.1
X = np.random.default_rng(0).normal(size=(16, 3))
Y = np.random.default_rng(1).normal(size=16)
W0 = np.array([0.3, -0.2, 0.5])


def np_grad(w):
    r = X @ w - Y
    return 0.5 * np.mean(r**2), X.T @ r / len(Y)


def expected_direction():
    """The gradient at w0 + rho * g(w0), the rule's true answer, in float64."""
    _, g = np_grad(W0)
    return np_grad(W0 + RHO * g)[1]


def test_the_core_counts_what_a_rule_spends_not_what_it_declares():
    rule = Underreporting(rho=RHO)

    def grad_fn(p):
        loss, g = np_grad(p["w"])
        return loss, {"w": g}

    res = gradnorm.step({"w": W0.copy()}, grad_fn, rule=rule)
    assert rule.grad_evals == 1 and res.info["grad_evals"] == 2
    np.testing.assert_allclose(res.grad["w"], expected_direction(), rtol=1e-14)


# -- PyTorch ------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")


def torch_setup():
    import gradnorm.torch as gt

    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    x, y = torch.tensor(X), torch.tensor(Y)
    opt = gt.Optimizer([w], torch.optim.SGD, rule=Underreporting(rho=RHO), lr=1.0)
    calls = []

    def closure():
        calls.append(w.detach().clone())
        opt.zero_grad()
        loss = 0.5 * ((x @ w - y) ** 2).mean()
        loss.backward()
        return loss

    return w, opt, closure, calls


def test_torch_underreporting_rule_gets_its_weights_back_and_the_right_direction():
    w, opt, closure, calls = torch_setup()
    before = w.detach().clone()
    opt.step(closure)
    assert len(calls) == 2 and not torch.equal(calls[1], before)  # the second pass ran at a moved point
    # the base SGD(lr=1) applied the direction to the original weights, not to the perturbed ones
    np.testing.assert_allclose((before - w.detach()).numpy(), expected_direction(), rtol=1e-13)


def test_torch_exception_in_an_extra_pass_restores_the_weights_bit_for_bit():
    w, opt, closure, calls = torch_setup()
    before = w.detach().clone()

    def failing():
        if calls:
            calls.append(None)
            raise RuntimeError("boom in the perturbed pass")
        return closure()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    assert torch.equal(w.detach(), before)


def test_torch_rule_without_extra_passes_takes_no_snapshot():
    import gradnorm.torch as gt

    w = torch.nn.Parameter(torch.tensor(W0))
    opt = gt.Optimizer([w], torch.optim.SGD, rule="sgd", lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt._scratch is None  # no parameter-sized copy for a one-pass rule


# -- TensorFlow ---------------------------------------------------------------------------------
def tf_setup():
    tf = pytest.importorskip("tensorflow")
    gt = pytest.importorskip("gradnorm.tf")
    w = tf.Variable(W0)
    x, y = tf.constant(X), tf.constant(Y)
    calls = []

    def loss_fn():
        calls.append(w.numpy().copy())
        return 0.5 * tf.reduce_mean((tf.linalg.matvec(x, w) - y) ** 2)

    return tf, gt, w, loss_fn, calls


def test_tf_underreporting_rule_gets_its_weights_back_and_the_right_direction():
    tf, gt, w, loss_fn, calls = tf_setup()
    res = gt.step([w], loss_fn, rule=Underreporting(rho=RHO))
    assert len(calls) == 2 and not np.array_equal(calls[1], W0)
    np.testing.assert_array_equal(w.numpy(), W0)
    np.testing.assert_allclose(res.grad[0].numpy(), expected_direction(), rtol=1e-13)


def test_tf_exception_in_an_extra_pass_restores_the_weights_bit_for_bit():
    tf, gt, w, loss_fn, calls = tf_setup()

    def failing():
        if calls:
            raise RuntimeError("boom in the perturbed pass")
        return loss_fn()

    with pytest.raises(RuntimeError, match="boom"):
        gt.step([w], failing, rule=Underreporting(rho=RHO))
    np.testing.assert_array_equal(w.numpy(), W0)
