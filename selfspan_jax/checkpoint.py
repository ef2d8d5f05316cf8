"""Training checkpoints (orbax) and weight export for other tools.

A checkpoint is one orbax step directory holding two items:

- ``state``: the array pytree ``{"params", "opt_state", "step"}`` — the
  trainable parameters (all weights for full fine-tuning or from scratch, the
  LoRA adapters only for LoRA; the frozen base is reloaded from its source),
  the optax state, and the step counter;
- ``data``: JSON with the data-iterator position (epoch, index within the
  epoch's permutation, seed) and anything else small the loop needs to resume.

Orbax writes each step into a temporary directory and renames it when
complete, so a process killed at any moment (SIGKILL included) leaves either a
whole checkpoint or a temporary directory that the next start ignores and
deletes. Restores go into an abstract target (`jax.ShapeDtypeStruct` leaves
with shardings, e.g. from `nnx.eval_shape`), so arrays land directly on their
devices in their FSDP layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read back (corrupt, truncated, or
    written by a run with different shapes)."""


def abstract_tree(tree, shardings=None):
    """`jax.ShapeDtypeStruct` leaves (with shardings) mirroring `tree`.

    `tree` may hold arrays or ShapeDtypeStructs (an `nnx.eval_shape` state);
    `shardings`, when given, is a matching pytree of `jax.sharding.Sharding`.
    """
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
        )
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _restore_args(target, partial: bool):
    if target is None:
        return ocp.args.StandardRestore()
    if not partial:
        return ocp.args.StandardRestore(target)
    # PyTreeRestore is what can skip saved entries; leaves without a sharding
    # land on the default device as jax arrays (not numpy).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None
                          else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
    return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)


class Checkpointer:
    """`orbax.checkpoint.CheckpointManager` over a run's ``checkpoints/`` dir.

    Keeps the newest `max_to_keep` steps. Saves are asynchronous (training
    continues while arrays are written); `wait()` blocks until the last one
    is committed.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # A SIGKILL during an async save leaves "<step>.orbax-checkpoint-tmp-*"
            # behind; remove it on the next start so it cannot shadow a step.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ---- queries -------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # ---- save / restore ------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], data: dict[str, Any]) -> bool:
        """Queue `state` (array pytree) and `data` (JSON-able dict) as `step`."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
        json.dumps(data)  # fail here, not in the background thread
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
            force=True,
        )

    def restore(self, target, step: int | None = None, *, partial: bool = False) -> tuple[Any, dict[str, Any]]:
        """Restore (state, data) of `step` (default: the latest) into `target`.

        `target` is an abstract pytree shaped like the saved ``state`` (see
        `abstract_tree`); None restores the saved structure as nested dicts
        of arrays on the default device (for inspection). With `partial`,
        `target` may name a subset of the saved entries (e.g. only
        ``{"params": ...}``) and only those are read: loading a run for
        inference needs no optimizer state to restore into. Raises
        `CheckpointError` naming the step directory when it cannot be read or
        does not match the target.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        path = self.directory / str(step)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=_restore_args(target, partial),
                    data=ocp.args.JsonRestore(),
                ),
            )
            state, data = restored["state"], restored["data"]
        except Exception as err:  # orbax raises a zoo of types (ValueError, KeyError, tensorstore errors)
            raise CheckpointError(
                f"checkpoint {path} is corrupt or does not match this run "
                f"({type(err).__name__}: {str(err)[:500]}); delete that directory to fall back "
                "to the previous checkpoint"
            ) from err
        if not isinstance(data, dict):
            raise CheckpointError(f"checkpoint {path} has no data-position record")
        return state, data

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



# ---------------------------------------------------------------------------
# Export for other tools: merged weights in HF layout, LoRA-only adapters
# ---------------------------------------------------------------------------
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# Our names for the rows `Llama.add_tokens` appended (the span tokens): PEFT
# has no standard slot for new-token rows, so they travel under these keys.
NEW_EMBED_KEY = "selfspan.new_token_embed"
NEW_HEAD_KEY = "selfspan.new_token_head"


def _np32(x) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def hf_state_dict(model, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF `LlamaForCausalLM` tensors of `model` with any LoRA adapters merged.

    Kernels [in, out] become HF weights [out, in]; the span-token rows appended
    by `add_tokens` are concatenated onto embed_tokens (and lm_head), so the
    exported vocabulary is the tokenizer's full vocabulary. `model` is not
    modified (the merge happens on a copy).
    """
    from selfspan_jax.lora import is_lora, merge_lora

    from flax import nnx

    if is_lora(model):
        model = merge_lora(nnx.merge(*nnx.split(model)))
    out: dict[str, np.ndarray] = {"model.embed_tokens.weight": _np32(model.embedding_matrix())}
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = _np32(layer.attn_norm.scale[...])
        out[pre + "post_attention_layernorm.weight"] = _np32(layer.mlp_norm.scale[...])
        for name in ATTN_PROJ:
            out[pre + f"self_attn.{name}.weight"] = _np32(getattr(layer.attn, name).kernel[...]).T
        for name in MLP_PROJ:
            out[pre + f"mlp.{name}.weight"] = _np32(getattr(layer.mlp, name).kernel[...]).T
    out["model.norm.weight"] = _np32(model.final_norm.scale[...])
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = _np32(model.head_matrix()).T
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in out.items()}


def hf_config_dict(config, tokenizer=None) -> dict[str, Any]:
    """HF `LlamaConfig` JSON for our `LlamaConfig`."""
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        d["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                             "high_freq_factor": rs.high_freq_factor,
                             "original_max_position_embeddings": rs.original_max_position_embeddings}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None) if tokenizer is not None else None
        if value is not None:
            d[name] = int(value)
    return d


def export_merged_safetensors(model, out_dir: str | os.PathLike, *, tokenizer=None, dtype=np.float32) -> Path:
    """Write model.safetensors + config.json (HF layout) into `out_dir`.

    LoRA adapters are merged into the kernels. A tokenizer with
    `save_pretrained` (HF) is saved beside them; the character tokenizer is
    described in tokenizer_info.json (it is not an HF tokenizer).
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model, dtype)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
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


def _lora_modules(model):
    """(HF module name, LoRALinear) of every adapted projection."""
    from flax import nnx

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
    W' = W + (alpha / r) B A in HF terms) plus the span-token rows under
    `selfspan.new_token_embed` / `selfspan.new_token_head`;
    adapter_config.json records rank, alpha and the target modules.
    """
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    targets = set()
    for name, mod in _lora_modules(model):
        tensors[f"base_model.model.{name}.lora_A.weight"] = _np32(mod.lora.lora_a[...]).T
        tensors[f"base_model.model.{name}.lora_B.weight"] = _np32(mod.lora.lora_b[...]).T
        targets.add(name.rsplit(".", 1)[1])
    if not tensors:
        raise ValueError("save_lora_adapters: the model has no LoRA adapters")
    if model.new_token_embed is not None:
        tensors[NEW_EMBED_KEY] = _np32(model.new_token_embed[...])
    if model.new_token_head is not None:
        tensors[NEW_HEAD_KEY] = _np32(model.new_token_head[...])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(alpha),
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
              "base_vocab_size": int(model.base_vocab_size), "num_new_tokens": int(model.num_new_tokens)}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def load_lora_adapters(model, adapter_dir: str | os.PathLike):
    """Copy adapters written by `save_lora_adapters` into `model` (which must
    already carry LoRA adapters of the same rank and targets), in place."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise ValueError(f"no adapter_model.safetensors in {str(adapter_dir)!r}")
    tensors = load_file(str(path))
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
    for key, attr in ((NEW_EMBED_KEY, "new_token_embed"), (NEW_HEAD_KEY, "new_token_head")):
        if key in tensors:
            var = getattr(model, attr)
            if var is None or var.shape != tensors[key].shape:
                raise ValueError(f"{path}: {key} shape {tensors[key].shape} does not fit the model")
            var[...] = tensors[key].astype(var.dtype)
            seen.add(key)
    extra = sorted(set(tensors) - seen)
    if extra:
        raise ValueError(f"{path}: tensors the model has no slot for: {extra[:5]}")
    return model
