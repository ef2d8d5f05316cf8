"""Hugging Face interop: the one place that knows HF's names, config and adapter layout, both ways.

- parameter names: `HF_TOP` / `HF_LAYER` map our parameter paths to
  `LlamaForCausalLM` tensor names (and say which are transposed kernels);
  `weights.py` reads checkpoints through them (`our_name`) and
  `hf_state_dict` writes them;
- config: read and written through `transformers.LlamaConfig`, which also
  normalises the two rope layouts (transformers 4's `rope_theta` +
  `rope_scaling`, 5's `rope_parameters`);
- adapters: LoRA in PEFT's layout (`save_lora_adapters` / `load_lora_adapters`);
- tokenizers of a checkpoint directory: `PreTrainedTokenizerFast.from_pretrained`.

Written by hand only where transformers has nothing to call without torch:
the tensor layout conversion (kernels [in, out] vs weights [out, in]).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from selfspan_jax.config import LlamaConfig, RopeScaling
from selfspan_jax.lora import is_lora, merge_lora

try:
    from huggingface_hub.errors import StrictDataclassError as _StrictDataclassError
except ImportError:  # huggingface_hub before its strict dataclasses: transformers raises ValueError
    _StrictDataclassError = ValueError

# our path -> HF name, outside the layers
HF_TOP = {"embed.embedding": "model.embed_tokens.weight", "final_norm.scale": "model.norm.weight",
          "lm_head.kernel": "lm_head.weight"}
# HF name inside model.layers.<i>. -> (our path inside layers.<i>., stored transposed)
HF_LAYER = {
    "input_layernorm.weight": ("attn_norm.scale", False),
    "post_attention_layernorm.weight": ("mlp_norm.scale", False),
    **{f"self_attn.{p}_proj.weight": (f"attn.{p}_proj.kernel", True) for p in "qkvo"},
    **{f"mlp.{p}_proj.weight": (f"mlp.{p}_proj.kernel", True) for p in ("gate", "up", "down")},
}
_OURS_LAYER = {ours: (hf, t) for hf, (ours, t) in HF_LAYER.items()}
_OURS_TOP = {hf: ours for ours, hf in HF_TOP.items()}
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# Our names for the rows `Llama.add_tokens` appended (the span tokens): PEFT
# has no standard slot for new-token rows, so they travel under these keys.
# The span-token rows in PEFT's own format (a `trainable_token_indices` adapter: the rows that replace
# those of the resized base embedding / head), so `PeftModel.from_pretrained` restores them too.
NEW_EMBED_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
NEW_HEAD_KEY = "base_model.model.lm_head.token_adapter.trainable_tokens_delta"
# where adapters written before the PEFT format kept them (still read)
_LEGACY_NEW_KEYS = {"selfspan.new_token_embed": NEW_EMBED_KEY, "selfspan.new_token_head": NEW_HEAD_KEY}


def hf_name(ours: str) -> str:
    """The HF checkpoint tensor name of one of our parameter paths."""
    if ours in HF_TOP:
        return HF_TOP[ours]
    _, layer, rest = ours.split(".", 2)
    return f"model.layers.{layer}.{_OURS_LAYER[rest][0]}"


def our_name(name: str) -> tuple[str, bool] | None:
    """(our parameter path, stored transposed) of an HF tensor name; None for a name a Llama does not have."""
    if name in _OURS_TOP:
        return _OURS_TOP[name], name == HF_TOP["lm_head.kernel"]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in HF_LAYER:
        ours, transposed = HF_LAYER[parts[3]]
        return f"layers.{int(parts[2])}.{ours}", transposed
    return None


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def config_from_hf(d: dict[str, Any]) -> LlamaConfig:
    """LlamaConfig from an HF LlamaConfig dict (config.json), either rope layout."""
    if d.get("model_type", "llama") != "llama":
        raise ValueError(f"config.json model_type {d.get('model_type')!r} is not supported (only 'llama')")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise ValueError(f"config.json sets {flag}=true; Llama has no biases")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act {d.get('hidden_act')!r} is not supported (only 'silu')")
    try:
        hc = transformers.LlamaConfig(**{k: v for k, v in d.items() if k != "model_type"})
    except (TypeError, ValueError, _StrictDataclassError) as err:
        # transformers 5 validates through huggingface_hub's strict dataclasses, whose errors are
        # neither ValueError nor short: keep the line that names the field
        reason = [line.strip() for line in str(err).splitlines() if line.strip()][-1]
        raise ValueError(f"config.json is not a valid Llama config: {reason}") from err
    # transformers 5 normalises both layouts into rope_parameters; 4.x keeps rope_theta / rope_scaling
    rope = dict(getattr(hc, "rope_parameters", None)
                or {"rope_theta": getattr(hc, "rope_theta", 10_000.0), **(getattr(hc, "rope_scaling", None) or {})})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"config.json rope type {kind!r} is not supported (only default and 'llama3')")
    scaling = None if kind == "default" else RopeScaling(
        factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    D, N = int(hc.hidden_size), int(hc.num_attention_heads)
    head_dim = int(hc.head_dim)
    return LlamaConfig(
        vocab_size=int(hc.vocab_size),
        d_model=D,
        n_layers=int(hc.num_hidden_layers),
        n_heads=N,
        n_kv_heads=int(hc.num_key_value_heads or N),
        mlp_dim=int(hc.intermediate_size),
        head_dim_override=None if head_dim * N == D else head_dim,
        norm_eps=float(hc.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", 10_000.0)),
        rope_scaling=scaling,
        tie_embeddings=bool(hc.tie_word_embeddings),
        max_seq_len=int(hc.max_position_embeddings),
    )


def hf_config_dict(config: LlamaConfig, tokenizer=None) -> dict[str, Any]:
    """config.json of our `LlamaConfig`, written by `transformers.LlamaConfig`.

    The top-level `rope_theta` / `rope_scaling` of transformers 4 are kept
    beside transformers 5's `rope_parameters`, so older readers (the 3.11
    PyTorch reference environment) read the same rope.
    """
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        rope.update(rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                    high_freq_factor=rs.high_freq_factor,
                    original_max_position_embeddings=rs.original_max_position_embeddings)
    specials = {name: int(getattr(tokenizer, name)) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
                if tokenizer is not None and getattr(tokenizer, name, None) is not None}
    hc = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings, attention_bias=False, mlp_bias=False,
        architectures=["LlamaForCausalLM"], **specials,
    )
    d = hc.to_dict()
    d["rope_theta"] = config.rope_theta
    if config.rope_scaling is not None:
        d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    d["torch_dtype"] = "float32"
    return d


# ---------------------------------------------------------------------------
# Tensors, tokenizer
# ---------------------------------------------------------------------------
def _np32(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def hf_state_dict(model, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF `LlamaForCausalLM` tensors of `model` with any LoRA adapters merged.

    Kernels [in, out] become HF weights [out, in]; the span-token rows appended
    by `add_tokens` are concatenated onto embed_tokens (and lm_head), so the
    exported vocabulary is the tokenizer's full vocabulary. `model` is not
    modified (the merge happens on a copy).
    """
    if is_lora(model):
        model = merge_lora(nnx.merge(*nnx.split(model)))
    out: dict[str, np.ndarray] = {HF_TOP["embed.embedding"]: _np32(model.embedding_matrix())}
    if not model.config.tie_embeddings:
        out[HF_TOP["lm_head.kernel"]] = _np32(model.head_matrix()).T
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        ours = ".".join(str(p) for p in path)
        if ours.startswith("layers.") or ours == "final_norm.scale":
            transposed = ours.startswith("layers.") and _OURS_LAYER[ours.split(".", 2)[2]][1]
            value = _np32(var[...])
            out[hf_name(ours)] = value.T if transposed else value
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in out.items()}


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checkpoint directory (`tokenizer.json`; special tokens, flags and the chat
    template from `tokenizer_config.json` / `chat_template.jinja`), as transformers loads it."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ValueError(f"no tokenizer.json in {str(path)!r}")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))


def export_merged_safetensors(model, out_dir: str | os.PathLike, *, tokenizer=None, dtype=np.float32) -> Path:
    """Write model.safetensors + config.json (HF layout) into `out_dir`.

    LoRA adapters are merged into the kernels. A tokenizer with
    `save_pretrained` (HF) is saved beside them; the character tokenizer is
    described in tokenizer_info.json (it is not an HF tokenizer).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model, dtype), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(model.config, tokenizer), indent=2))
    if tokenizer is not None:
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(str(out_dir))
        else:
            info = {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer)}
            if hasattr(tokenizer, "get_vocab"):
                info["vocab"] = tokenizer.get_vocab()
            (out_dir / "tokenizer_info.json").write_text(json.dumps(info, indent=1))
    return out_dir


# ---------------------------------------------------------------------------
# PEFT adapters
# ---------------------------------------------------------------------------
def _lora_modules(model):
    """(HF module name, LoRALinear) of every adapted projection."""
    for i, layer in enumerate(model.layers):
        for group, hf_group, names in ((layer.attn, "self_attn", ATTN_PROJ), (layer.mlp, "mlp", MLP_PROJ)):
            for name in names:
                mod = getattr(group, name)
                if isinstance(mod, nnx.LoRALinear):
                    yield f"model.layers.{i}.{hf_group}.{name}", mod


def save_lora_adapters(model, out_dir: str | os.PathLike, *, rank: int, alpha: float) -> Path:
    """Write the LoRA adapters alone (PEFT layout) into `out_dir`.

    adapter_model.safetensors holds `base_model.model.<module>.lora_A.weight`
    [r, in] and `.lora_B.weight` [out, r] (PEFT's names and orientation, so
    W' = W + (alpha / r) B A in HF terms) plus the span-token rows as PEFT
    trainable tokens (`NEW_EMBED_KEY`, and `NEW_HEAD_KEY` [n_new, D] for an
    untied head); adapter_config.json records rank, alpha, the target modules
    and `trainable_token_indices` (only keys PEFT knows). In PEFT: resize the
    base model's embeddings to the last of those indices + 1, then
    `PeftModel.from_pretrained(model, out_dir)`; tests/test_peft_fixture.py
    checks the logits PEFT gets against ours.
    """
    tensors: dict[str, np.ndarray] = {}
    targets = set()
    for name, mod in _lora_modules(model):
        tensors[f"base_model.model.{name}.lora_A.weight"] = _np32(mod.lora.lora_a[...]).T
        tensors[f"base_model.model.{name}.lora_B.weight"] = _np32(mod.lora.lora_b[...]).T
        targets.add(name.rsplit(".", 1)[1])
    if not tensors:
        raise ValueError("save_lora_adapters: the model has no LoRA adapters")
    new_ids = list(range(int(model.base_vocab_size), int(model.base_vocab_size) + int(model.num_new_tokens)))
    token_indices: list[int] | dict[str, list[int]] | None = None
    if model.new_token_embed is not None:
        tensors[NEW_EMBED_KEY] = _np32(model.new_token_embed[...])
        token_indices = new_ids  # a tied head shares the embedding's rows (PEFT ties the adapter too)
    if model.new_token_head is not None:
        tensors[NEW_HEAD_KEY] = _np32(model.new_token_head[...]).T  # ours [D, n_new], HF rows [n_new, D]
        token_indices = {"embed_tokens": new_ids, "lm_head": new_ids}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(alpha),
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
              "trainable_token_indices": token_indices}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def load_lora_adapters(model, adapter_dir: str | os.PathLike):
    """Copy adapters written by `save_lora_adapters` into `model` (which must
    already carry LoRA adapters of the same rank and targets), in place."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise ValueError(f"no adapter_model.safetensors in {str(adapter_dir)!r}")
    tensors = {}
    for key, value in load_file(str(path)).items():
        # the legacy head rows kept our [D, n_new] orientation; PEFT's are [n_new, D]
        tensors[_LEGACY_NEW_KEYS.get(key, key)] = value.T if key == "selfspan.new_token_head" else value
    seen = set()
    for name, mod in _lora_modules(model):
        for key, var in (("lora_A", mod.lora.lora_a), ("lora_B", mod.lora.lora_b)):
            full = f"base_model.model.{name}.{key}.weight"
            if full not in tensors:
                raise ValueError(f"{path}: missing {full}")
            value = tensors[full].T
            # .shape, not [...].shape: an abstract (eval_shape) model has no data to index
            if value.shape != var.shape:
                raise ValueError(f"{path}: {full} has shape {tensors[full].shape}, model expects {var.shape[::-1]}")
            var[...] = value.astype(var.dtype)
            seen.add(full)
    for key, attr, transpose in ((NEW_EMBED_KEY, "new_token_embed", False), (NEW_HEAD_KEY, "new_token_head", True)):
        if key in tensors:
            var = getattr(model, attr)
            value = tensors[key].T if transpose else tensors[key]
            if var is None or var.shape != value.shape:
                raise ValueError(f"{path}: {key} shape {tensors[key].shape} does not fit the model")
            var[...] = value.astype(var.dtype)
            seen.add(key)
    extra = sorted(set(tensors) - seen)
    if extra:
        raise ValueError(f"{path}: tensors the model has no slot for: {extra[:5]}")
    return model
