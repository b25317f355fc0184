#!/usr/bin/env bash
# GPU acceptance on one H100/H200 in under 10 minutes: see benchmarks/gpu_acceptance.py.
#   bash benchmarks/gpu_acceptance.sh            # run it, append the measured tables to benchmarks/RESULTS.md
#   bash benchmarks/gpu_acceptance.sh --dry-run  # the plan (every step, its command, its expected time)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" benchmarks/gpu_acceptance.py "$@"
