"""gradnorm.keras on the three backends of Keras 3, each in its own process (Keras reads KERAS_BACKEND when
it is imported): tests/keras_worker.py trains there and saves the weights; this file compares them.

* the same model, data and rule give the same weights on tensorflow, jax and torch after three steps
  (float64 to 1e-10, float32 to 1e-5), and on each backend the same weights as a hand loop on that
  backend's own gradnorm adapter (gradnorm.tf.step, gradnorm.jax.step, gradnorm.torch.step) with a
  NumPy momentum update: correct, not only consistent;
* set_rule_hyperparameters changes a radius between steps without retracing; a saved stateful rule
  (looksam) continues its trajectory after load_model; same_randomness replays the dropout masks;
  fit's metrics, validation, callbacks, evaluate, predict, run_eagerly and jit_compile; mixed precision.

The three workers run at once (about a minute on 2 cores, most of it importing the frameworks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BACKENDS = ("tensorflow", "jax", "torch")
MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
WORKER = Path(__file__).with_name("keras_worker.py")
CASES = ("sam", "gnp", "fd_gr", "gam", "gr")
TOL = {"float64": 1e-10, "float32": 1e-5}

pytest.importorskip("keras")
for _module in MODULES.values():
    pytest.importorskip(_module)


def _run_workers(folder: Path) -> None:
    procs = {}
    for backend in BACKENDS:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        procs[backend] = subprocess.Popen(
            [sys.executable, str(WORKER), str(folder / f"{backend}.npz")], env=env, cwd=WORKER.parent.parent,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
    logs = {}
    try:
        for backend, proc in procs.items():
            logs[backend], _ = proc.communicate(timeout=600)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    for backend, proc in procs.items():
        assert proc.returncode == 0, f"the {backend} worker failed:\n{logs[backend][-6000:]}"
    (folder / "done").write_text("ok")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, np.ndarray], dict[str, str]]]:
    """The workers' results. Under pytest-xdist every worker process would build this module fixture:
    the first one runs the three backends, the others wait for it (a lock in the temporary folder they
    share) and read its files."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "gradnorm_keras_workers"
    folder.mkdir(exist_ok=True)
    with open(folder / "lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - not POSIX: each worker runs its own
            pass
        if not (folder / "done").exists():
            _run_workers(folder)
    out = {}
    for backend in BACKENDS:
        arrays = dict(np.load(folder / f"{backend}.npz"))
        messages = json.loads((folder / f"{backend}.npz.json").read_text())
        out[backend] = (arrays, messages)
    return out


def weights(arrays: dict[str, np.ndarray], key: str) -> list[np.ndarray]:
    found = sorted((k for k in arrays if k.startswith(key + "/") and k[len(key) + 1:].isdigit()),
                   key=lambda k: int(k.rsplit("/", 1)[1]))
    assert found, f"the worker saved nothing under {key!r}"
    return [arrays[k] for k in found]


def rel_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The largest difference, relative to the largest entry (at least 1) of each array of `b`."""
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return max(float(np.max(np.abs(x - y)) / max(1.0, float(np.max(np.abs(y))))) for x, y in zip(a, b))




@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES)
def test_same_weights_on_every_backend_and_as_the_adapters_hand_loop(runs, case, dtype):
    key = f"cross/{dtype}/{case}"
    tf_weights = weights(runs["tensorflow"][0], key + "/keras")
    start = weights(runs["tensorflow"][0], "cross/start/" + ("bn" if case != "gr" else "plain"))
    assert rel_diff(tf_weights, start) > 1e-2, "the three steps did not move the weights"
    for backend in BACKENDS:
        arrays = runs[backend][0]
        got = weights(arrays, key + "/keras")
        assert rel_diff(got, tf_weights) < TOL[dtype], f"{backend} vs tensorflow, {case}, {dtype}"
        assert rel_diff(got, weights(arrays, key + "/hand")) < TOL[dtype], f"{backend}: keras vs hand loop, {case}, {dtype}"
        assert float(arrays[key + "/nonfinite"]) == 0
        np.testing.assert_allclose(arrays[key + "/losses"], runs["tensorflow"][0][key + "/losses"], rtol=TOL[dtype])
    if case != "gr":  # the batch statistics of the pass at the unperturbed weights: the first step's, by NumPy
        x, w = runs["tensorflow"][0]["cross/x"][:16], start
        h = np.tanh(x @ w[0] + w[1])
        mean = 0.5 * w[4] + 0.5 * h.mean(0)
        for backend in BACKENDS:
            got = weights(runs[backend][0], f"cross/{dtype}/{case}/step1")[4]
            np.testing.assert_allclose(got, mean, rtol=TOL[dtype], atol=TOL[dtype])


def test_exact_gr_through_batchnorm_agrees_on_jax_and_torch(runs):
    """TensorFlow's second derivative through Keras's BatchNormalization is not exact (tf.nn.moments
    stops the gradient of the mean inside the variance): jax and torch agree with each other only."""
    jax_w = weights(runs["jax"][0], "cross/float64/gr_bn/keras")
    assert rel_diff(weights(runs["torch"][0], "cross/float64/gr_bn/keras"), jax_w) < 1e-10
    for backend in BACKENDS:
        arrays = runs[backend][0]
        assert rel_diff(weights(arrays, "cross/float64/gr_bn/keras"), weights(arrays, "cross/float64/gr_bn/hand")) < 1e-10


def test_set_rule_hyperparameters_takes_effect_at_the_next_step_without_retracing(runs):
    """A callback sets rho to 0.2 before the second step and to 0 before the third: the hand loop with
    that schedule, on every backend; the training step traced once (TF, JAX; torch runs eagerly)."""
    for backend in BACKENDS:
        arrays = runs[backend][0]
        got = weights(arrays, "schedule/keras")
        assert rel_diff(got, weights(arrays, "schedule/hand")) < 1e-10, backend
        assert rel_diff(got, weights(arrays, "cross/float64/sam/keras")) > 1e-6, "the schedule changed nothing"
        traces = arrays["schedule/traces"]
        assert len(traces) == 3 and traces[0] == traces[-1], f"{backend} retraced: {traces}"
        assert float(arrays["schedule/rho"]) == 0.0
    ref = weights(runs["tensorflow"][0], "schedule/keras")
    for backend in BACKENDS:
        assert rel_diff(weights(runs[backend][0], "schedule/keras"), ref) < 1e-10


def test_set_rule_hyperparameters_refuses_bad_values_and_names(runs):
    for backend in BACKENDS:
        messages = runs[backend][1]
        assert "`rho` of rule 'sam' must be a finite number >= 0" in messages["errors/negative"]
        assert "`radius`" in messages["errors/unknown"] and "'rho'" in messages["errors/unknown"]
        assert "`norm_eps`" in messages["errors/static"]
        assert messages["errors/rho_after"] == "0.05", "a refused value changed the rule"
    assert "`jit_compile` must be False" in runs["torch"][1]["errors/jit_compile"]


def test_a_saved_stateful_rule_resumes_its_trajectory(runs):
    """looksam (every=2): 2 steps, save to .keras, load_model, 2 steps = 4 uninterrupted steps; its state
    (step count and stored component) too, on every backend, and the same on every backend."""
    for backend in BACKENDS:
        arrays = runs[backend][0]
        assert bool(arrays["resume/loaded_is_gradnorm"])
        assert rel_diff(weights(arrays, "resume/loaded"), weights(arrays, "resume/whole")) < 1e-12, backend
        state = weights(arrays, "resume/state_loaded")
        assert rel_diff(state, weights(arrays, "resume/state_whole")) < 1e-12
        assert int(state[0]) == 4 and max(float(np.abs(s).max()) for s in state[1:]) > 0
        assert rel_diff(weights(arrays, "resume/loaded"), weights(runs["tensorflow"][0], "resume/loaded")) < 1e-10


def test_same_randomness_replays_the_dropout_masks(runs):
    """SAM of radius 1e-7 (its second pass runs, 1e-7 from the weights) with the first pass's masks
    replayed is the plain Keras step; with fresh masks it is not."""
    for backend in BACKENDS:
        arrays = runs[backend][0]
        plain = weights(arrays, "dropout/plain")
        assert rel_diff(weights(arrays, "dropout/same"), plain) < 1e-6, backend
        assert rel_diff(weights(arrays, "dropout/fresh"), plain) > 1e-3, backend


def test_fit_features_eager_jit_and_the_mixin(runs):
    ref32 = weights(runs["tensorflow"][0], "cross/float32/sam/keras")
    for backend in BACKENDS:
        arrays, messages = runs[backend]
        for mode in ("eager", "jit") if backend != "torch" else ("eager",):
            assert rel_diff(weights(arrays, f"features/{mode}"), ref32) < 1e-5, (backend, mode)
            assert set(messages[f"features/{mode}/keys"].split(",")) == {
                "loss", "categorical_accuracy", "nonfinite_steps", "val_loss", "val_categorical_accuracy"}
            assert float(arrays[f"features/{mode}/val_loss"]) == pytest.approx(float(arrays[f"features/{mode}/evaluate"]), rel=1e-6)
            np.testing.assert_allclose(arrays[f"features/{mode}/predict"], arrays[f"features/{mode}/inner_predict"], atol=1e-6)
        assert rel_diff(weights(arrays, "features/mixin"), weights(arrays, "cross/float64/gnp/keras")) < 1e-10, backend


def test_mixed_precision(runs):
    for backend in BACKENDS:
        arrays, messages = runs[backend]
        assert bool(arrays["mixed/compute_bf16"]) and np.all(np.isfinite(arrays["mixed/loss"]))
        assert all(np.all(np.isfinite(w)) for w in weights(arrays, "mixed/weights"))
        # float16 with loss scaling: near the float32 run (an unremoved scale of 2**15 would not be)
        assert messages["mixed/mixed_float16/optimizer"] == "LossScaleOptimizer"
        assert rel_diff(weights(arrays, "mixed/float16"), weights(arrays, "mixed/float32")) < 2e-3, backend


def test_the_docs_example_runs_on_every_backend(runs):
    for backend in BACKENDS:
        printed = runs[backend][1]["docs/printed"]
        assert printed.startswith(backend + " ['accuracy', 'loss', 'nonfinite_steps', 'val_accuracy', 'val_loss']"), printed
        assert "{'rho': 0.05, 'eta': 0.0}" in printed and "(2, 10)" in printed
