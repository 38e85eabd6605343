#!/usr/bin/env bash
# Set up the environment and run the full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
.venv/bin/python -m pytest -n 2 "$@"
