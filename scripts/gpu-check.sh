#!/usr/bin/env bash
# The GPU check (issue 23): CUDA-marked tests, a bf16 training step per plugin, the memory model
# against torch.cuda.max_memory_allocated, and LoRA / IA3 steps against peft's, in one report
# (bench/results/gpu-check.md unless --out DIR). Models come from configs: nothing is downloaded.
# --dry runs it on the CPU at tiny sizes (the test suite does, so that it works when a GPU comes).
#
#   scripts/gpu-check.sh [--dry] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  python=.venv/bin/python
fi
PYTHONPATH=. exec "$python" -m bench.gpu_check "$@"
