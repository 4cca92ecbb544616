#!/usr/bin/env bash
# One prepared GPU check (see bench/gpu_check.py and README.md, "Measuring on a GPU"):
#
#   bash bench/gpu_check.sh              # on a GPU machine: < 8.5 minutes, results in $OUT or bench/results/
#   bash bench/gpu_check.sh --dry-run    # the plumbing of every step on the CPU, reduced shapes (~1 minute)
#   bash bench/gpu_check.sh --list       # the steps and their time budgets
#
# PYTHON picks the interpreter that has torch (default python3). Every step runs under its own time limit
# in its own process group; nothing is downloaded and nothing needs a package index.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
