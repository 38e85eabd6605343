"""The rule settings every framework's benchmark times, defined once so that their tables compare:
each rule's ``benchmark`` entry in conformance/settings.py (rules that need Hessian-vector
products last)."""

import os
import sys

# The benchmarks run as scripts (`python benchmarks/torch_step.py`): the repository root, where
# the `conformance` package lives, is not on sys.path then.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from conformance.settings import benchmark_settings  # noqa: E402

RULES = benchmark_settings()
