#!/usr/bin/env bash
# Set up the environment and run the main demonstration (table + plot under results/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
.venv/bin/python examples/digits_demo.py "$@"
