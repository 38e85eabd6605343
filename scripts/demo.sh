#!/usr/bin/env bash
# Set up the environment and run the main demonstration: `gradnorm reproduce`, the papers' claims
# on scikit-learn's digits and synthetic problems (tables and verdicts on the console; the report
# results/reproduce.md and its PNG plots). Options pass through, e.g. `--quick`, `--backend torch`,
# `--claims 1,4`, `--seeds 5`, `--out DIR`; `--help` lists them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
.venv/bin/python -m gradnorm reproduce "$@"
