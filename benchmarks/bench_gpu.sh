#!/usr/bin/env bash
# Every GPU measurement in one go, within seven minutes on an H100/H200 (the slowest, torch.compile
# with CUDA graphs, last: cut off first when time runs out):
#   1. benchmarks/gpu_check.py: CUDA graph capture of the one-step denoise (replay vs eager),
#      the pipeline with CUDA graphs, host syncs per call, the auto-tile peak against its budget;
#   2. rcod bench: ours (eager, CUDA graph, torch.compile with CUDA graphs) against the unmerged-LoRA
#      eager baseline, batch 1 and 4, with FLOPs and the machine's matmul rate;
#   3. bench_memory.py on CUDA: tile auto at 1 and 4 MP output under a budget.
# Each step has its own time limit and writes under OUT_DIR as it goes, so a step that runs out of
# time or fails leaves the others' results.
#
#   bash benchmarks/bench_gpu.sh OUT_DIR
#
# Environment: PYTHON (default python3), BENCH_DTYPES (default bf16), BENCH_COMPILE
# (default none,cuda-graph,reduce-overhead), CHECK_TIMEOUT / BENCH_TIMEOUT / MEMORY_TIMEOUT (seconds).
set -uo pipefail
OUT=${1:?usage: bash benchmarks/bench_gpu.sh OUT_DIR}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd) || exit 2  # absolute: the steps run from the repository root
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

echo "## gpu_check"
timeout "${CHECK_TIMEOUT:-120}" "$PY" benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log" || status=1

echo "## rcod bench"
timeout "${BENCH_TIMEOUT:-240}" "$PY" -m rcod_core.cli bench --family sd21_base --device cuda \
    --dtypes "${BENCH_DTYPES:-bf16}" --compile "${BENCH_COMPILE:-none,cuda-graph,reduce-overhead}" \
    --batch 1,4 --size 512 --repeats 10 --warmup 3 --flops --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" || status=1

echo "## bench_memory (CUDA, tile auto)"
timeout "${MEMORY_TIMEOUT:-60}" "$PY" benchmarks/bench_memory.py --family sd21_base --device cuda --dtype bf16 \
    --sizes 1024,2048 --tile auto --max-memory 2GB --json "$OUT/bench_memory.json" 2>&1 | tee "$OUT/bench_memory.log" || status=1
exit $status
