#!/usr/bin/env bash
# One call on a GPU machine: end-to-end decode throughput, LLaMA-7B shape (random
# bf16 weights), dense vs self_span on the recorded span traces, batch 8/16/32 at
# 2k-token contexts. Writes $OUT/decode_gpu.json and a log; copy the JSON to
# benchmarks/results/ with the date.
#   run: bash tools/gpu/gpu_bench_decode.sh
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository
OUT="${OUT:-benchmarks/results/decode}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TRACES=benchmarks/results/decode/decode_traces_arithmetic.json
TRACE_ARGS=()
if [ -f "$TRACES" ]; then TRACE_ARGS=(--traces "$TRACES"); fi
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/decode_gpu.log"
# prefill 4 sequences at a time: a 2k-token prefill of 32 sequences at 7B
# shape would otherwise materialise ~17 GB of scores per layer.
PYTHONPATH=. "$PY" benchmarks/bench_decode.py --shape llama2-7b --dtype bfloat16 --batch 8,16,32 \
  --context 2048 --new-tokens 64 --block-size 64 --backend pallas --repeats 3 --prefill-chunk 4 \
  "${TRACE_ARGS[@]}" --out "$OUT/decode_gpu.json" 2>&1 | tee -a "$OUT/decode_gpu.log"
