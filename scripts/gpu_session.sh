#!/usr/bin/env bash
# One GPU visit for the block-sparse decode kernel (shared/GPU_CHECKS.md items 1-2).
#
#   scripts/gpu_session.sh            # tests, then the bench sweep in the time left
#   scripts/gpu_session.sh tests      # kernel tests only (backend=pallas subclass runs on a GPU)
#   scripts/gpu_session.sh bench      # full bench sweep only
#   scripts/gpu_session.sh kernel     # issue 13's visit: tests -x, XLA's PTX against the offline
#                                     # sm_90 compile, LLaMA-7B/GQA bf16 T=8k B in {1,8}, density
#                                     # {1/8, 1}, num_stages {2,3,5}, against jax's decode/paged kernels
#
# Runs in the repository root on the device machine, under its python3 (jax
# 0.11.2, pytest, hypothesis, matplotlib, triton preinstalled; no network).
# Everything it writes lands in $OUT (at most 8 files come back): log.txt,
# pytest.xml, kernel_gpu.json, kernel_gpu.png (kernel stage: ptx_check.json,
# kernel_gpu_stages.json and .png). Commit the JSON and PNG under
# benchmarks/results/ afterwards. One device call is capped at 600 s: the
# budget below leaves ~40 s for machine start-up noise and the transfer.
set -u -o pipefail

STAGE="${1:-all}"
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The bench holds three layouts of the largest cache at once; let jax take
# most of the card instead of its default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
PY="${PYTHON:-python3}"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

{
  echo "== gpu_session stage=$STAGE $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'
  git log --oneline -1 2>/dev/null || true
} 2>&1 | tee "$LOG"

status=0
if [[ "$STAGE" == "all" || "$STAGE" == "tests" ]]; then
  echo "== tests (t=$(elapsed)s)" | tee -a "$LOG"
  # -rs lists skip reasons: TestPallas must NOT be skipped here.
  timeout 260 "$PY" -m pytest -p no:cacheprovider -rs --durations=15 --junitxml="$OUT/pytest.xml" \
    tests/test_block_sparse_decode.py tests/test_kernel_lowering.py 2>&1 | tee -a "$LOG"
  status=$?
  echo "== tests exit $status (t=$(elapsed)s)" | tee -a "$LOG"
fi

if [[ "$STAGE" == "kernel" ]]; then
  echo "== kernel tests -x (t=$(elapsed)s)" | tee -a "$LOG"
  # test_kernel_sm90.py is left out: it builds its own triton venv from PyPI (no network here);
  # gpu_ptx_check.py below compares with its committed numbers instead.
  timeout 240 "$PY" -m pytest -x -p no:cacheprovider -rs --durations=10 --junitxml="$OUT/pytest.xml" \
    tests/test_block_sparse_decode.py tests/test_kernel_lowering.py tests/test_sparq.py 2>&1 | tee -a "$LOG"
  status=$?
  echo "== tests exit $status (t=$(elapsed)s)" | tee -a "$LOG"
  echo "== XLA's PTX vs the offline sm_90 compile (t=$(elapsed)s)" | tee -a "$LOG"
  timeout 90 "$PY" scripts/gpu_ptx_check.py --out "$OUT/ptx_check.json" 2>&1 | tee -a "$LOG"
  budget=$(( 545 - $(elapsed) ))
  echo "== kernel bench, ${budget}s budget (t=$(elapsed)s)" | tee -a "$LOG"
  timeout $(( budget + 40 )) "$PY" scripts/bench_kernel.py --out "$OUT/kernel_gpu_stages.json" \
    --heads mha gqa --batches 1 8 --contexts 8192 --block-sizes 64 --densities 0.125 1 \
    --dtype bfloat16 --num-stages 2 3 5 --max-seconds "$(( budget - 40 ))" 2>&1 | tee -a "$LOG"
  bstatus=$?
  echo "== kernel bench exit $bstatus (t=$(elapsed)s)" | tee -a "$LOG"
  [[ $status -eq 0 ]] && status=$bstatus
fi

if [[ "$STAGE" == "all" || "$STAGE" == "bench" ]]; then
  budget=$(( 545 - $(elapsed) ))
  echo "== bench, ${budget}s budget for new groups (t=$(elapsed)s)" | tee -a "$LOG"
  # --max-seconds stops starting new groups; a group itself takes < ~40 s.
  timeout $(( budget + 40 )) "$PY" scripts/bench_kernel.py --out "$OUT/kernel_gpu.json" \
    --max-seconds "$(( budget - 40 ))" 2>&1 | tee -a "$LOG"
  bstatus=$?
  echo "== bench exit $bstatus (t=$(elapsed)s)" | tee -a "$LOG"
  [[ $status -eq 0 ]] && status=$bstatus
fi
exit $status
