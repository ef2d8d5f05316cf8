#!/usr/bin/env bash
# One GPU visit for the block-sparse decode kernel (kernel tests and the sweep).
#
#   tools/gpu/gpu_session.sh            # tests, then the bench sweep in the time left
#   tools/gpu/gpu_session.sh tests      # kernel tests only (backend=pallas subclass runs on a GPU)
#   tools/gpu/gpu_session.sh bench      # full bench sweep only
#   tools/gpu/gpu_session.sh kernel     # issue 13's visit: tests -x, XLA's PTX against the offline
#                                     # sm_90 compile, LLaMA-7B/GQA bf16 T=8k B in {1,8}, density
#                                     # {1/8, 1}, num_stages {2,3,5}, against jax's decode/paged kernels
#   tools/gpu/gpu_session.sh fixedcost  # second visit (~7 min): where XLA leaves the PTX; the kernel's fixed
#                                     # cost per call against live blocks (benchmarks/kernel_fixed_cost.py);
#                                     # a sweep at 32k tokens, blocks 64/256, B 8/1
#   tools/gpu/gpu_session.sh mosaic     # the Mosaic GPU kernel: its tests on the real backend, its
#                                     # fixed cost per call (kernel_fixed_cost.py), then Triton and
#                                     # Mosaic side by side (density x block x batch, 8k and 32k
#                                     # tokens): decides backend="auto"
#   tools/gpu/gpu_session.sh visit      # one ~9-minute visit: the Triton-backend kernel tests (TestPallas and
#                                     # test_sparq), XLA's PTX against the offline compile, a short kernel
#                                     # sweep, then the decode loop at LLaMA-7B widths (8 layers, bf16):
#                                     # dense vs self_span per step, B 8/1/32, 2k and 512 tokens (issue 15)
#
# With a `.whl/` folder carried (flax 0.12.12, the version the project is tested with), the wheels
# are installed to /tmp/site first; the GPU image's own jax (0.11.2) is used as it is.
#
# Runs in the repository root on the device machine, under its python3 (jax
# 0.11.2, pytest, hypothesis, matplotlib, triton preinstalled; no network).
# Everything it writes lands in $OUT (at most 8 files come back): log.txt,
# pytest.xml, kernel_gpu.json, kernel_gpu.png (kernel stage: ptx_check.json,
# kernel_gpu_stages.json and .png). Commit the JSON and PNG under
# benchmarks/results/kernel/ afterwards. One device call is capped at 600 s: the
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

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  "$PY" -c 'import flax; print("flax", flax.__version__, flax.__file__)' 2>&1 | tee -a "$LOG"
fi

# The GPU image brings its own jax. Say before any stage how it stands against the tested pin
# (constraints.txt), and stop at once if it cannot run the kernel (no Pallas Triton backend) rather
# than after minutes of device time. jax's own decode/paged ops (bench_kernel's comparison
# columns) were removed in 0.12.1: their columns are then left out with the reason.
"$PY" - <<'PYCHECK' 2>&1 | tee -a "$LOG"
import re, sys
import jax
pin = re.search(r"^jax==(\S+)$", open("constraints.txt").read(), re.M)
pin = pin.group(1) if pin else "?"
print(f"== jax on this machine {jax.__version__}, tested pin {pin}"
      + ("" if jax.__version__ == pin else ": not the tested version; results say which ran"))
try:
    from jax.experimental.pallas import triton  # noqa: F401  (the kernel's backend)
except ImportError as err:
    print(f"STOP: jax {jax.__version__} has no Pallas Triton backend ({err}); the kernel cannot run here")
    sys.exit(3)
from selfspan_jax.kernel_bench import peer_ops  # the comparison columns, as the sweep will see them
for column, op in peer_ops(gpu=True).items():
    if isinstance(op, str):
        print(f"   bench_kernel leaves column {column} out: {op}")
PYCHECK
[[ ${PIPESTATUS[0]} -eq 0 ]] || exit 3

status=0
if [[ "$STAGE" == "fixedcost" ]]; then
  # Second visit (issue 15, kernel notes): where XLA leaves the PTX, the kernel's fixed cost per call
  # against live blocks (op / k_splits=1 / pallas_call alone / launched ops), then a sweep at 32k tokens.
  # The kernel code is the one TestPallas passed 32/32 on in the first visit (pallas_call unchanged).
  echo "== XLA's PTX vs the offline sm_90 compile (t=$(elapsed)s)" | tee -a "$LOG"
  timeout 75 "$PY" tools/gpu/gpu_ptx_check.py --out "$OUT/ptx_check.json" 2>&1 | tail -c 6000 | tee -a "$LOG"
  echo "== kernel fixed cost (t=$(elapsed)s)" | tee -a "$LOG"
  timeout 200 "$PY" benchmarks/kernel_fixed_cost.py --out "$OUT/kernel_fixed_cost_gpu.json" --backend pallas \
    --heads gqa mha --batches 1 8 --max-seconds 150 2>&1 | tee -a "$LOG"
  status=$?
  echo "== fixed cost exit $status (t=$(elapsed)s)" | tee -a "$LOG"
  budget=$(( 400 - $(elapsed) ))
  echo "== kernel sweep at 32k tokens, ${budget}s (t=$(elapsed)s)" | tee -a "$LOG"
  timeout $(( budget + 30 )) "$PY" benchmarks/bench_kernel.py --out "$OUT/kernel_gpu_32k.json" \
    --heads gqa mha --batches 8 1 --contexts 32768 --block-sizes 64 256 --densities 0.0625 0.125 0.25 1 \
    --dtype bfloat16 --max-seconds $(( budget - 40 )) 2>&1 | tee -a "$LOG"
  echo "== sweep exit $? (t=$(elapsed)s)" | tee -a "$LOG"
  nvidia-smi --query-gpu=temperature.gpu,clocks.sm,power.draw,utilization.gpu --format=csv 2>&1 | tee -a "$LOG"
  echo "== fixedcost done (t=$(elapsed)s)" | tee -a "$LOG"
fi

if [[ "$STAGE" == "unroll" ]]; then
  # Follow-up of fixedcost: the harness alone (q + j) cost 12-19 µs a call at 8 calls per executable,
  # so the executable's own launch is in every small number. The same at 64 calls per executable.
  echo "== kernel fixed cost, 64 calls per executable (t=$(elapsed)s)" | tee -a "$LOG"
  timeout 220 "$PY" benchmarks/kernel_fixed_cost.py --out "$OUT/kernel_fixed_cost_gpu_unroll64.json" --backend pallas \
    --heads gqa mha --batches 1 8 --counts 0 1 4 16 64 128 --unroll 64 --reps 10 --max-seconds 170 2>&1 | tee -a "$LOG"
  status=$?
  budget=$(( 330 - $(elapsed) ))
  echo "== first visit's T=8k sweep again, 64 calls per executable, ${budget}s (t=$(elapsed)s)" | tee -a "$LOG"
  timeout $(( budget + 30 )) "$PY" benchmarks/bench_kernel.py --out "$OUT/kernel_gpu_8k_unroll64.json" \
    --heads gqa mha --batches 1 8 --contexts 8192 --block-sizes 64 --densities 0.125 1 --dtype bfloat16 \
    --unroll 64 --reps 10 --max-seconds $(( budget - 40 )) 2>&1 | tee -a "$LOG"
  echo "== unroll done (t=$(elapsed)s)" | tee -a "$LOG"
fi

if [[ "$STAGE" == "distinct" ]]; then
  # Second follow-up: every call reads its own cache copy (so XLA cannot merge the dpa dots of the
  # unrolled baseline), and the fixed cost with CUDA graphs (XLA command buffers) off and forced on.
  kfc=(benchmarks/kernel_fixed_cost.py --backend pallas --counts 0 4 16 128 --unroll 32 --copies 32 --reps 10)
  echo "== fixed cost, 32 calls / 32 copies, default flags (t=$(elapsed)s)" | tee -a "$LOG"
  timeout 110 "$PY" "${kfc[@]}" --out "$OUT/kernel_fixed_cost_gpu_distinct.json" --heads gqa mha --batches 1 8 \
    --max-seconds 80 2>&1 | grep -v "^  fits" | tee -a "$LOG"
  echo "== command buffers off (t=$(elapsed)s)" | tee -a "$LOG"
  XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout 60 "$PY" "${kfc[@]}" \
    --out "$OUT/kernel_fixed_cost_gpu_cmdbuf_off.json" --heads gqa --batches 1 8 2>&1 | grep -v "^  fits" | tee -a "$LOG"
  echo "== command buffers for everything, min graph size 1 (t=$(elapsed)s)" | tee -a "$LOG"
  XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1" \
    timeout 60 "$PY" "${kfc[@]}" --out "$OUT/kernel_fixed_cost_gpu_cmdbuf_all.json" --heads gqa --batches 1 8 2>&1 \
    | grep -v "^  fits" | tee -a "$LOG"
  echo "== distinct done (t=$(elapsed)s)" | tee -a "$LOG"
fi

if [[ "$STAGE" == "ptxas" ]]; then
  # the PTX check without a PTX dump (jax 0.11.2's XLA writes HLO, buffer and thunk dumps but no
  # PTX, even with --xla_gpu_dump_llvmir): ask XLA's ptxas for its -v report, and make any register
  # spill a compile error, while the five checked kernels compile.
  echo "== ptxas -v through XLA, spills fatal (t=$(elapsed)s)" | tee -a "$LOG"
  XLA_FLAGS="--xla_gpu_ptx_compiler_extra_flags=-v --xla_gpu_fail_ptx_compilation_on_register_spilling=true --xla_gpu_enable_libnvptxcompiler=false" \
    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_MAX_VLOG_LEVEL=2 timeout 120 "$PY" tools/gpu/gpu_ptx_check.py --out "$OUT/ptx_check_v.json" \
    > "$OUT/ptxas_stdout.txt" 2> "$OUT/ptxas_stderr_full.txt"
  echo "== exit $? (t=$(elapsed)s)" | tee -a "$LOG"
  grep -E "ptxas|registers|spill|smem|block_sparse|token_sparse|Compiling|error" "$OUT/ptxas_stderr_full.txt" \
    | grep -v "^$" | head -c 400000 > "$OUT/ptxas_v.txt"
  wc -l "$OUT/ptxas_stderr_full.txt" "$OUT/ptxas_v.txt" | tee -a "$LOG"
  grep -E "registers|spill" "$OUT/ptxas_v.txt" | head -40 | tee -a "$LOG"
  tail -c 3000 "$OUT/ptxas_stdout.txt" | tee -a "$LOG"
  rm -f "$OUT/ptxas_stderr_full.txt"
fi

if [[ "$STAGE" == "visit" ]]; then
  echo "== Triton-backend kernel tests (t=$(elapsed)s)" | tee -a "$LOG"
  # The interpret/XLA classes are proven on the CPU in CI; here only what needs the GPU.
  timeout 230 "$PY" -m pytest -p no:cacheprovider -q -rs --durations=10 --junitxml="$OUT/pytest.xml" \
    tests/test_block_sparse_decode.py::TestPallas tests/test_sparq.py 2>&1 | tee -a "$LOG"
  status=$?
  echo "== tests exit $status (t=$(elapsed)s)" | tee -a "$LOG"
  echo "== XLA's PTX vs the offline sm_90 compile (t=$(elapsed)s)" | tee -a "$LOG"
  timeout 60 "$PY" tools/gpu/gpu_ptx_check.py --out "$OUT/ptx_check.json" 2>&1 | tee -a "$LOG"
  echo "== kernel sweep (t=$(elapsed)s)" | tee -a "$LOG"
  timeout 130 "$PY" benchmarks/bench_kernel.py --out "$OUT/kernel_gpu_stages.json" \
    --heads mha gqa --batches 1 8 --contexts 8192 --block-sizes 64 --densities 0.125 1 \
    --dtype bfloat16 --num-stages 2 3 --max-seconds 80 2>&1 | tee -a "$LOG"
  echo "== kernel sweep exit $? (t=$(elapsed)s)" | tee -a "$LOG"
  budget=$(( 520 - $(elapsed) ))
  echo "== decode loop at LLaMA-7B widths, ${budget}s (t=$(elapsed)s)" | tee -a "$LOG"
  loop_args=(--shape llama2-7b-8l --dtype bfloat16 --batch 8,1,32 --context 2048,512 --steps 64 --repeats 7
             --variants "dense,self_span,self_span +stats" --block-size 64 --out "$OUT/decode_loop_gpu.json"
             --plot "$OUT/decode_loop_gpu.png")
  timeout $(( budget + 20 )) "$PY" benchmarks/profile_loop.py "${loop_args[@]}" --backend pallas \
    --max-seconds $(( budget - 60 )) 2>&1 | tee -a "$LOG"
  lstatus=$?
  echo "== decode loop exit $lstatus (t=$(elapsed)s)" | tee -a "$LOG"
  if [[ $lstatus -ne 0 && ! -s "$OUT/decode_loop_gpu.json" && $(( 540 - $(elapsed) )) -gt 90 ]]; then
    echo "== decode loop again on the XLA path (t=$(elapsed)s)" | tee -a "$LOG"
    timeout $(( 540 - $(elapsed) )) "$PY" benchmarks/profile_loop.py "${loop_args[@]}" --backend xla --overwrite \
      --max-seconds $(( 480 - $(elapsed) )) 2>&1 | tee -a "$LOG"
  fi
  nvidia-smi --query-gpu=temperature.gpu,clocks.sm,power.draw,utilization.gpu --format=csv 2>&1 | tee -a "$LOG"
  echo "== visit done (t=$(elapsed)s)" | tee -a "$LOG"
fi

if [[ "$STAGE" == "mosaic" ]]; then
  # Decides backend="auto" between the Triton and the Mosaic GPU kernels: the Mosaic tests on the
  # real backend (the same file runs the GPU interpreter in CI), its fixed cost per call, then both
  # kernels timed side by side on the same inputs (bench_kernel --backends; *_net = minus the
  # harness), 8k and 32k tokens. DRY_RUN=1 with MOSAIC_BACKEND=mosaic_interpret TRITON_BACKEND=xla
  # runs the same steps at toy sizes on a CPU (tests/test_gpu_session_script.py).
  MOSAIC="${MOSAIC_BACKEND:-mosaic}"
  TRITON="${TRITON_BACKEND:-pallas}"
  tests=(tests/test_block_sparse_mosaic.py)
  kfc=(--heads gqa mha --batches 1 8 --counts 0 1 4 16 128 --unroll 32 --copies 32 --max-seconds 70)
  sweep=(--heads gqa mha --batches 1 8 --contexts 8192 32768 --block-sizes 64 256 16 --densities 0.0625 0.125 0.25 1)
  if [[ -n "${DRY_RUN:-}" ]]; then
    tests=(tests/test_block_sparse_mosaic.py -k "tiles or refuses")
    kfc=(--quick --reps 1)
    sweep=(--quick --heads gqa --batches 1 --contexts 256 --block-sizes 64 --densities 0.5 --reps 1 --rotate-mb 1)
  fi
  echo "== Mosaic GPU kernel tests (t=$(elapsed)s)" | tee -a "$LOG"
  timeout 200 "$PY" -m pytest -p no:cacheprovider -q -rs --durations=10 --junitxml="$OUT/pytest.xml" \
    "${tests[@]}" 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  echo "== tests exit $status (t=$(elapsed)s)" | tee -a "$LOG"
  echo "== Mosaic fixed cost per call against live blocks (t=$(elapsed)s)" | tee -a "$LOG"
  timeout 100 "$PY" benchmarks/kernel_fixed_cost.py --out "$OUT/kernel_fixed_cost_gpu_mosaic.json" --backend "$MOSAIC" \
    "${kfc[@]}" 2>&1 | grep -v "^  fits" | tee -a "$LOG"
  kstatus=${PIPESTATUS[0]}
  echo "== fixed cost exit $kstatus (t=$(elapsed)s)" | tee -a "$LOG"
  budget=$(( 545 - $(elapsed) ))
  echo "== Triton vs Mosaic, ${budget}s budget (t=$(elapsed)s)" | tee -a "$LOG"
  timeout $(( budget + 40 )) "$PY" benchmarks/bench_kernel.py --out "$OUT/kernel_gpu_mosaic.json" \
    --backends "$TRITON" "$MOSAIC" "${sweep[@]}" --dtype bfloat16 --max-seconds "$(( budget - 40 ))" 2>&1 | tee -a "$LOG"
  bstatus=${PIPESTATUS[0]}
  echo "== bench exit $bstatus (t=$(elapsed)s)" | tee -a "$LOG"
  [[ $status -eq 0 ]] && status=$kstatus
  [[ $status -eq 0 ]] && status=$bstatus
fi

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
  timeout 90 "$PY" tools/gpu/gpu_ptx_check.py --out "$OUT/ptx_check.json" 2>&1 | tee -a "$LOG"
  budget=$(( 545 - $(elapsed) ))
  echo "== kernel bench, ${budget}s budget (t=$(elapsed)s)" | tee -a "$LOG"
  timeout $(( budget + 40 )) "$PY" benchmarks/bench_kernel.py --out "$OUT/kernel_gpu_stages.json" \
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
  timeout $(( budget + 40 )) "$PY" benchmarks/bench_kernel.py --out "$OUT/kernel_gpu.json" \
    --max-seconds "$(( budget - 40 ))" 2>&1 | tee -a "$LOG"
  bstatus=$?
  echo "== bench exit $bstatus (t=$(elapsed)s)" | tee -a "$LOG"
  [[ $status -eq 0 ]] && status=$bstatus
fi
exit $status
