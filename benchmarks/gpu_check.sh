#!/usr/bin/env bash
# The single-GPU check (issue "GPU-ready by construction"): the `gpu`-marked tests, then the MFU benchmark with
# the document mask on and off; writes benchmarks/results/gpu_check.json. Under 8 minutes on one H100/H200.
#
#     bash benchmarks/gpu_check.sh [--output PATH] [--skip-mfu] [--mfu-arg=--steps=8]
#
# Without CUDA it says so and exits 0 without writing anything (CI runs it that way). Details: gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
