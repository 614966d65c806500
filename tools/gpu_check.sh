#!/usr/bin/env bash
# The prepared GPU check: build for this GPU only, selftest, GPU tests, CUDA-graph capture,
# torch.compile, a bandwidth microbenchmark; one JSON file, within 10 minutes.
#     tools/gpu_check.sh [--json gpu_check.json] [--skip-build] [--budget-s 570]
# See tools/gpu_check.py for the steps and the JSON fields.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tools/gpu_check.py "$@"
