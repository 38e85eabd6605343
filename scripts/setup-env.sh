#!/usr/bin/env bash
# Create (or reuse) .venv and install gradnorm with everything the demo and the tests need,
# from the package registries, with torch pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# TensorFlow as its CPU build (tensorflow-cpu): the `tf` extra names `tensorflow`, which users
# with a GPU want; the tests need only the CPU.
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,examples,torch,jax]" "tensorflow-cpu>=2.16"
