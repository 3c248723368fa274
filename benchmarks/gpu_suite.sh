#!/usr/bin/env bash
# Every benchmark on a CUDA machine, in one short run (the checkout is on PYTHONPATH; nothing
# is installed). Output goes to stdout and, when OUT is set, to $OUT/gpu_benchmarks.log.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/gpu_benchmarks.log"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    timeout 200 python3 benchmarks/run_suite.py --device cuda
    [ -n "${WITH_GRADIENT:-}" ] && timeout 60 python3 benchmarks/bench_gradient.py --device cuda --repeat 5
    timeout 75 python3 benchmarks/bench_low_rank.py --device cuda --repeat 2
} 2>&1 | tee "$log"
