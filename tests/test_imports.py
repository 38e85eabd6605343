"""Importing gradnorm and running NumPy steps imports no deep-learning framework; the core imports
no adapter (read from its source, and checked on TensorFlow tensors); the public names exist; every
rule documents its paper."""

from __future__ import annotations

import ast
import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

import gradnorm
from gradnorm import rules

FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow", "keras", "flax", "optax")

# Runs every registered rule once on NumPy arrays and prints which frameworks got imported.
_SCRIPT = textwrap.dedent(
    """
    import json, sys
    BLOCK = {block!r}
    if BLOCK:
        import importlib.abc

        class _Blocker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCK:
                    raise ImportError(f"{{name}} is blocked in this test (simulated numpy-only install)")
                return None

        sys.meta_path.insert(0, _Blocker())

    FRAMEWORKS = {frameworks!r}

    def loaded():
        return sorted(m for m in FRAMEWORKS if m in sys.modules)

    import gradnorm
    after_import = loaded()

    import numpy as np

    HYPER = {{
        "sgd": {{}},
        "sam": {{"rho": 0.05}},
        "gnp": {{"r": 0.1, "alpha": 0.8}},
        "gr": {{"gamma": 0.1}},
        "fd_gr": {{"gamma": 0.1, "eps": 0.01}},
        "gam": {{}},
        "flooding": {{"b": 0.1}},
        "coherent": {{"lam": 0.1, "threshold": 0.0}},
        "periodic": {{"inner": gradnorm.rules.SAM(rho=0.05), "every": 2, "reuse": True}},
        "looksam": {{"rho": 0.05, "every": 2}},
    }}

    def grad_fn(p):
        return np.asarray(0.5 * sum(float(np.sum(v * v)) for v in p.values())), {{k: v.copy() for k, v in p.items()}}

    def hvp_fn(p, v):
        return {{k: x.copy() for k, x in v.items()}}

    params = {{"w": np.array([1.0, -2.0, 0.5]), "b": np.asarray(0.25)}}
    ran = []
    for name in gradnorm.available_rules():
        res = gradnorm.step(params, grad_fn, rule=name, hvp_fn=hvp_fn if name == "gr" else None, **HYPER.get(name, {{}}))
        res = gradnorm.step(params, grad_fn, rule=name, state=res.state, hvp_fn=hvp_fn if name == "gr" else None,
                            **HYPER.get(name, {{}}))
        assert bool(res.info["finite"]), name
        ran.append(name)
    gradnorm.flood(np.asarray(0.3), 0.1)
    found = gradnorm.diagnostics.measure(params, grad_fn, hvp_fn=hvp_fn, iters=4, samples=3,
                                         quantities=gradnorm.diagnostics.QUANTITIES)
    assert abs(float(found["lambda_max"]) - 1.0) < 1e-12, found
    gradnorm.iflood(np.array([0.3, 0.05]), 0.1)
    print(json.dumps({{"after_import": after_import, "after_steps": loaded(), "ran": ran}}))
    """
)


def _run(block=()):
    code = _SCRIPT.format(block=tuple(block), frameworks=FRAMEWORKS)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"subprocess failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_and_numpy_steps_import_no_framework():
    out = _run()
    assert out["after_import"] == [], f"`import gradnorm` imported {out['after_import']}"
    assert out["after_steps"] == [], f"NumPy steps imported {out['after_steps']}"
    assert sorted(out["ran"]) == sorted(rules.names())


def test_works_when_frameworks_cannot_be_imported():
    """A NumPy-only install: torch/jax/tensorflow raise ImportError; everything still works."""
    out = _run(block=FRAMEWORKS)
    assert out["after_import"] == [] and out["after_steps"] == []
    assert sorted(out["ran"]) == sorted(rules.names())


# ---------------------------------------------------------------------------------------
# the core imports no adapter
#
# The core (gradnorm/*.py, gradnorm/rules/*.py, gradnorm/_compat/*.py, gradnorm/diagnostics/*.py) is what `gradnorm.step` runs
# on any array library. It must never import an adapter (gradnorm.torch, gradnorm.jax, gradnorm.tf:
# each imports its framework and more), and it imports no framework when it is imported. Backends are
# detected through sys.modules in gradnorm/_backend.py; the one framework import is the TensorFlow
# shim gradnorm/_compat/tensorflow.py, which _backend loads only when TensorFlow is already imported.

CORE = pathlib.Path(gradnorm.__file__).resolve().parent
ADAPTERS = ("gradnorm.torch", "gradnorm.jax", "gradnorm.tf")


def _core_modules() -> list[tuple[str, pathlib.Path]]:
    """(dotted name, path) of every core module."""
    out = []
    for package in ("gradnorm", "gradnorm.rules", "gradnorm._compat", "gradnorm.diagnostics"):
        folder = CORE.joinpath(*package.split(".")[1:])
        for path in sorted(folder.glob("*.py")):
            out.append((package if path.stem == "__init__" else f"{package}.{path.stem}", path))
    return out


def _resolve(name: str, level: int, package: str) -> str:
    """The absolute name of `from <level dots><name> import ...` in a module of `package`."""
    if level == 0:
        return name
    parts = package.split(".")
    if level - 1 >= len(parts):
        raise ValueError(f"relative import beyond the top-level package in {package!r}")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


class _Imports(ast.NodeVisitor):
    """Every module a source imports, as (absolute name, line, at module level): ``import a.b``;
    ``from a import b`` as ``a`` and ``a.b`` (``b`` may be a submodule); relative imports resolved
    against the module's package; imports inside functions (not at module level); and
    ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""

    def __init__(self, package: str):
        self.package, self.depth, self.found = package, 0, []

    def _add(self, name: str, node: ast.AST) -> None:
        self.found.append((name, node.lineno, self.depth == 0))

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(node.module or "", node.level, self.package)
        self._add(base, node)
        for alias in node.names:
            if alias.name != "*":
                self._add(f"{base}.{alias.name}", node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                level = len(arg.value) - len(arg.value.lstrip("."))
                self._add(_resolve(arg.value[level:], level, self.package), node)
        self.generic_visit(node)


def _violations(module: str, source: str, *, is_package: bool = False) -> list[str]:
    """What core module `module` (its text `source`) must not import: an adapter anywhere, or a
    framework at module level (except that a shim ``gradnorm._compat.<library>`` imports its library)."""
    visitor = _Imports(module if is_package else module.rpartition(".")[0])
    visitor.visit(ast.parse(source))
    out: dict[tuple[int, str], str] = {}  # one message per line and offending module
    for name, line, module_level in visitor.found:
        adapter = next((a for a in ADAPTERS if name == a or name.startswith(a + ".")), None)
        root = name.split(".")[0]
        if adapter is not None:
            out.setdefault((line, adapter), f"line {line}: imports the adapter {adapter} ({name})")
        elif module_level and root in FRAMEWORKS and module != f"gradnorm._compat.{root}":
            out.setdefault((line, root), f"line {line}: imports the framework {root} at module level ({name})")
    return [out[key] for key in sorted(out)]


def test_the_core_imports_no_adapter_and_no_framework():
    modules = _core_modules()
    names = {name for name, _ in modules}
    assert {"gradnorm", "gradnorm._backend", "gradnorm._tree", "gradnorm.rules", "gradnorm.rules._sam",
            "gradnorm._compat", "gradnorm._compat.tensorflow", "gradnorm.diagnostics",
            "gradnorm.diagnostics._curvature"} <= names, sorted(names)
    problems = [
        f"{path.relative_to(CORE.parent)}: {v}"
        for name, path in modules
        for v in _violations(name, path.read_text(encoding="utf-8"), is_package=path.stem == "__init__")
    ]
    assert not problems, "core modules import an adapter or a framework:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "module, source",
    [
        ("gradnorm._tree", "from .tf import _ops"),
        ("gradnorm._tree", "from . import torch"),
        ("gradnorm.rules._sam", "from ..torch import Optimizer"),
        ("gradnorm.rules._sam", "from .. import jax as gj"),
        ("gradnorm._step", "from gradnorm import tf"),
        ("gradnorm._step", "import gradnorm.jax._ops"),
        ("gradnorm._step", "def f():\n    from gradnorm.tf.keras import x\n    return x"),
        ("gradnorm._step", "class A:\n    def f(self):\n        import gradnorm.torch"),
        ("gradnorm._step", "import importlib\nget = lambda: importlib.import_module('gradnorm.tf')"),
        ("gradnorm._step", "import torch"),
        ("gradnorm._step", "try:\n    import jax.numpy as jnp\nexcept ImportError:\n    jnp = None"),
        ("gradnorm._step", "from keras import ops"),
        ("gradnorm._compat.tensorflow", "import torch"),
        ("gradnorm._compat.tensorflow", "from ..tf import namespace"),
    ],
)
def test_the_import_check_catches(module, source):
    assert _violations(module, source), f"not caught in {module}: {source!r}"


@pytest.mark.parametrize(
    "module, source",
    [
        ("gradnorm._backend", "def f():\n    from ._compat import tensorflow\n    return tensorflow"),
        ("gradnorm._compat.tensorflow", "import tensorflow as tf"),
        ("gradnorm._tree", "import sys\njax = sys.modules.get('jax')"),
        ("gradnorm._tree", "def f():\n    import jax  # only once jax is in sys.modules\n    return jax"),
        ("gradnorm._step", "from .tfx import y\nimport torchvision_like"),
    ],
)
def test_the_import_check_allows(module, source):
    assert _violations(module, source) == []


_TF_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    with_tf = set(sys.modules)  # TensorFlow may import jax and keras itself
    import gradnorm
    from gradnorm import _tree

    def adapters():
        return sorted(m for m in sys.modules if m.split(".")[:2] in (["gradnorm", "tf"], ["gradnorm", "torch"],
                                                                       ["gradnorm", "jax"]))

    after_import = adapters()
    HYPER = {"sam": {"rho": 0.05}, "gnp": {"r": 0.1, "alpha": 0.8}, "gr": {"gamma": 0.1}, "fd_gr": {"gamma": 0.1, "eps": 0.01},
             "flooding": {"b": 0.1}, "coherent": {"lam": 0.1, "threshold": 0.0},
             "periodic": {"inner": gradnorm.rules.SAM(rho=0.05), "every": 2, "reuse": True},
             "looksam": {"rho": 0.05, "every": 2, "decomposition": "per_tensor"}}

    def grad_fn(p):  # 0.5 |p|^2: the gradient is p, the Hessian the identity
        return 0.5 * (tf.reduce_sum(p["w"] * p["w"]) + p["b"] * p["b"]), dict(p)

    params = {"w": tf.constant([1.0, -2.0, 0.5]), "b": tf.constant(0.25)}
    xp = _tree.namespace_of([params["w"], tf.Variable(1.0)])
    ran = []
    for name in gradnorm.available_rules():
        res = gradnorm.step(params, grad_fn, rule=name, hvp_fn=lambda p, v: dict(v), **HYPER.get(name, {}))
        assert bool(res.info["finite"]) and isinstance(res.grad["w"], tf.Tensor), name
        ran.append(name)
    gradnorm.flood(tf.constant(0.3), 0.1)
    new = {m.split(".")[0] for m in set(sys.modules) - with_tf}
    print(json.dumps({"after_import": after_import, "after_steps": adapters(), "ran": ran, "xp": xp.__name__,
                      "new_frameworks": sorted(new & set(FRAMEWORKS))}))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_core_steps_on_tensorflow_tensors_do_not_import_the_tf_adapter():
    """With TensorFlow imported, the core finds the TensorFlow namespace (the `_compat` shim) and
    runs every rule on TensorFlow tensors without loading gradnorm.tf (or any other adapter)."""
    code = f"FRAMEWORKS = {FRAMEWORKS!r}\n" + _TF_SCRIPT
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["xp"] == "gradnorm._compat.tensorflow"
    assert out["after_import"] == [] and out["after_steps"] == [], out
    assert out["new_frameworks"] == [], f"gradnorm imported {out['new_frameworks']} beyond what TensorFlow did"
    assert sorted(out["ran"]) == sorted(rules.names())


# ---------------------------------------------------------------------------------------
# public names


def test_all_names_exist():
    assert len(gradnorm.__all__) == len(set(gradnorm.__all__)), "duplicates in gradnorm.__all__"
    missing = [n for n in gradnorm.__all__ if not hasattr(gradnorm, n)]
    assert not missing, f"gradnorm.__all__ names missing from the package: {missing}"
    for name in ("step", "StepResult", "rules", "Rule", "flood", "iflood", "available_rules", "GradnormError",
                 "UnknownRuleError", "HyperparameterError", "MissingHVPError", "OracleOutputError", "ParamsError"):
        assert name in gradnorm.__all__, name


def test_rules_all_names_exist():
    missing = [n for n in rules.__all__ if not hasattr(rules, n)]
    assert not missing, f"gradnorm.rules.__all__ names missing: {missing}"


def test_error_hierarchy():
    for cls in (gradnorm.UnknownRuleError, gradnorm.HyperparameterError, gradnorm.MissingHVPError,
                gradnorm.OracleOutputError):
        assert issubclass(cls, gradnorm.GradnormError) and issubclass(cls, ValueError), cls
    assert issubclass(gradnorm.ParamsError, gradnorm.GradnormError) and issubclass(gradnorm.ParamsError, TypeError)


def test_available_rules():
    names = gradnorm.available_rules()
    assert names == rules.names()
    assert set(names) >= {"sgd", "sam", "gnp", "gr", "fd_gr", "gam", "flooding", "coherent"}


# ---------------------------------------------------------------------------------------
# docstrings

_LINK = re.compile(r"https?://(?:www\.)?(?:arxiv\.org/abs/\d{4}\.\d{4,5}|openreview\.net/\S+|doi\.org/\S+|proceedings\.\S+)")


@pytest.mark.parametrize("name", rules.names())
def test_rule_docstring_has_references(name):
    cls = rules.REGISTRY[name]
    doc = cls.__doc__ or ""
    assert doc.strip(), f"{cls.__qualname__} has no docstring"
    if name == "sgd":
        return
    m = re.search(r"^\s*References:?\s*$", doc, flags=re.MULTILINE)
    assert m, f"{cls.__qualname__} docstring has no 'References' section"
    assert _LINK.search(doc[m.end():]), f"{cls.__qualname__} 'References' section has no arXiv/paper link"


def test_adapters_share_one_surface():
    """One `ClosureError`, one list of perturbation policies and HVP modes, declared in the core and
    re-exported by every adapter (each adapter's own error is catchable as the core's)."""
    import pytest

    import gradnorm

    for name in ("torch", "jax", "tf"):
        adapter = pytest.importorskip(f"gradnorm.{name}")
        assert adapter.ClosureError is gradnorm.ClosureError
        assert adapter.PERTURBATIONS is gradnorm.PERTURBATIONS
        if hasattr(adapter, "HVP_MODES"):
            assert adapter.HVP_MODES is gradnorm.HVP_MODES
    assert issubclass(gradnorm.ClosureError, gradnorm.OracleOutputError)
