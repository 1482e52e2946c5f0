#!/usr/bin/env bash
# The GPU checks of issues 4 and 5, in stages that each fit one 10-minute call of the device tool.
#
#   bash benchmarks/gpu_session.sh tests         # tests/gpu: every GPU path vs the float64 reference
#   bash benchmarks/gpu_session.sh local         # triton vs flex vs SDPA on windows / neighbourhoods
#   bash benchmarks/gpu_session.sh local-sweep   # the same with a sweep over tile configurations
#   bash benchmarks/gpu_session.sh linear        # Triton chunked linear attention vs fla and SDPA
#   bash benchmarks/gpu_session.sh ring          # ring attention over NCCL, 1/2/4/8 processes (one GPU each)
#   bash benchmarks/gpu_session.sh routed        # routed flex vs a FlexAttention block mask rebuilt per call
#
# Logs (and JSON rows) go to $OUT when it is set (the device tool's output folder), else ./gpu-out.
# Runs from a checkout without installing it (PYTHONPATH), with whatever torch/triton the machine has.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stage="${1:?usage: gpu_session.sh tests|local|local-sweep|linear|ring|pooling|routed}"

{
    date -u '+%Y-%m-%d %H:%M UTC'
    git rev-parse --short HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || echo "torch: not importable"
    python -c "import triton; print('triton', triton.__version__)" || echo "triton: not installed"
} | tee "$out/machine-$stage.txt"

case "$stage" in
    tests)
        python -m pytest -q -p no:logging -p no:cacheprovider tests/gpu 2>&1 | tee "$out/gpu-tests.log" ;;
    local)
        python benchmarks/bench_triton_local.py --json "$out/triton-local.json" 2>&1 | tee "$out/triton-local.log" ;;
    local-sweep)
        python benchmarks/bench_triton_local.py --sweep --json "$out/triton-local-sweep.json" 2>&1 \
            | tee "$out/triton-local-sweep.log" ;;
    linear)
        python benchmarks/bench_triton_linear.py 2>&1 | tee "$out/triton-linear.log" ;;
    ring)
        # Configurations with more processes than GPUs are skipped (NCCL: one GPU per process).
        python benchmarks/bench_ring.py --device cuda --n 131072 --heads 8 --dim 128 --procs 1 2 4 8 \
            --window-ns 131072 524288 --repeats 5 --timeout 500 --json "$out/ring.json" 2>&1 | tee "$out/ring.log" ;;
    pooling)
        python benchmarks/bench_pooling.py --device cuda --repeats 5 2>&1 | tee "$out/pooling.log" ;;
    routed)
        python benchmarks/bench_routed_flex.py --n 8192 32768 --json "$out/routed-flex.json" 2>&1 \
            | tee "$out/routed-flex.log" ;;
    *)
        echo "unknown stage: $stage (expected tests, local, local-sweep, linear, ring, pooling or routed)" >&2
        exit 2 ;;
esac
