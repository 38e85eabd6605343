"""The one benchmark command, ``python benchmarks/run.py``: its ``--quick`` mode runs end to end on a
subset and writes a report with every table of that subset and the plot. No timing is asserted."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# benchmarks/run.py, loaded by path (the benchmarks folder is not a package, and its module names,
# `run`, `_timing`, ... should not be importable by the other tests)
_spec = importlib.util.spec_from_file_location("gradnorm_benchmarks_run", os.path.join(ROOT, "benchmarks", "run.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the subset runs the PyTorch benchmarks")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torch_memory.py reads /proc")
def test_quick_run_writes_every_table_of_the_subset(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--frameworks", "torch",
           "--skip", "torch-cnn,compile", "--hvp-models", "mlp", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (tmp_path / "benchmarks.md").read_text()
    # the header: the command, the date, the machine
    assert "python benchmarks/run.py --quick" in report and "* machine:" in report and "torch " in report
    for section in ("torch", "hvp", "memory"):
        assert f"## {bench.TITLES[section]}" in report, section
    for section in ("torch-cnn", "jax", "tf", "compile"):
        assert f"## {bench.TITLES[section]}" not in report, section
    assert "**Failed**" not in report
    # the step table with every rule and both SAM peers
    for row in ("| gradnorm sam ", "| gradnorm fd_gr ", "| gradnorm gr ", "| pytorch_optimizer.SAM",
                "| hand-written SAM"):
        assert row in report, row
    # the HVP-route table of PyTorch, every route
    for route in ("| Optimizer gr |", "| gt.step gr reverse_over_reverse |", "| gt.step gr forward_over_reverse |",
                  "| eager forward-over-reverse |"):
        assert route in report, route
    # the memory table
    assert "extra memory over SGD-momentum" in report and "\nsam " in report
    png = tmp_path / "benchmarks.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![step time over floor" in report


def test_the_plot_reads_every_adapters_step_table():
    outputs = {
        "torch": "one gradient 1 ms\n| step | cost | ms/step | floor ms | x floor |\n|---|---|---|---|---|\n"
                 "| gradnorm sam | 2 grads | 2.2 | 2.0 | 1.100 |\n"
                 "| gradnorm sam, skip_nonfinite=False | 2 grads | 2.1 | 2.0 | 1.050 |\n"
                 "| pytorch_optimizer.SAM(foreach=True) | 2 grads | 2.4 | 2.0 | 1.200 |\n",
        "jax": "| step | cost | ms/step | floor ms | x floor |\n|---|---|---|---|---|\n"
               "| gradnorm.jax.step sam | 2 grads | 2.2 | 2.0 | 0.95 |\n"
               "| gradnorm.jax.step gr | 1 grad + 1 HVP | 3.0 | 3.0 | 1.00 |\n"
               "| gradnorm.jax.transform sam | 2 grads | 2.2 | 2.0 | 1.10 |\n"
               "| optax.contrib.sam (opaque mode) | 2 grads | 2.4 | 2.0 | 1.30 |\n",
        "tf": "| step (tf.function) | cost | ms/step | floor ms | x floor | fused ms | x fused |\n"
              "|---|---|---|---|---|---|---|\n"
              "| gradnorm gr | 1 grad + 1 HVP | 3 | 2 | 1.5 | 2 | 1.5 |\n"
              "| gradnorm gr (forward-over-reverse) | 1 grad + 1 HVP | 4 | 2 | 2.0 | 2 | 2.0 |\n"
              "| hand-written tf.function SAM | 2 grads | 3 | 2 | 1.5 | 2 | 1.5 |\n",
    }
    rules, data = bench.plot_data(outputs)
    assert rules == ["sam", "gr", "SAM peer"]
    assert data == {"PyTorch (MLP)": {"sam": 1.1, "SAM peer": 1.2},
                    "JAX (MLP)": {"sam": 0.95, "gr": 1.0, "SAM peer": 1.3},
                    "TensorFlow (MLP)": {"gr": 1.5, "SAM peer": 1.5}}
    assert bench.as_markdown("text\n| a |\n|---|\n| 1 |\nmore") == "text\n\n| a |\n|---|\n| 1 |\n\nmore"
    assert bench.as_markdown("no table").startswith("```")
