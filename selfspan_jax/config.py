"""Model configuration: a frozen dataclass, presets as a classmethod.

Shapes use the house letters (STYLE.md): B batch, T query length, S key/value
length, N query heads, K KV heads, G = N/K, H head dim, D model dim, F MLP
hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_name(dtype, what: str = "dtype") -> str:
    """The name ("float32", "bfloat16", "float16") of a dtype given as that name, a jnp/np scalar
    type (jnp.bfloat16) or a dtype object; ValueError naming `what` for anything else."""
    if isinstance(dtype, str) and dtype in _DTYPES:
        return dtype
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"{what} must be one of {sorted(_DTYPES)} (or the jnp/np dtype), got {dtype!r}")
    return name


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1-style frequency-dependent RoPE scaling (HF `rope_type="llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor < 1:
            raise ValueError(f"RopeScaling.factor must be >= 1, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "RopeScaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor}, {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                "RopeScaling.original_max_position_embeddings must be > 0, got "
                f"{self.original_max_position_embeddings}"
            )


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a LLaMA-family decoder.

    `dtype` is the compute (activation) dtype, `param_dtype` the storage dtype
    of the weights; both are names ("float32", "bfloat16") so the config stays
    hashable and JSON-serialisable.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_dim: int
    head_dim_override: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim_override is None and self.d_model % self.n_heads:
            raise ValueError(
                f"LlamaConfig.d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); "
                "set head_dim_override"
            )
        if self.head_dim % 2:
            which = "head_dim_override" if self.head_dim_override else "d_model / n_heads"
            raise ValueError(f"LlamaConfig head dim ({which}) must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype"):
            # a name keeps the config hashable and JSON-serialisable; jnp.bfloat16 is accepted too
            object.__setattr__(self, name, dtype_name(getattr(self, name), f"LlamaConfig.{name}"))
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("LlamaConfig.norm_eps and rope_theta must be > 0")
        if isinstance(self.rope_scaling, dict):  # allow plain dicts from JSON/YAML
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    # ---- derived values -------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.d_model // self.n_heads

    @property
    def group_size(self) -> int:
        """G = N / K query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    def num_params(self) -> int:
        D, F, V, H = self.d_model, self.mlp_dim, self.vocab_size, self.head_dim
        attn = D * H * (self.n_heads * 2 + self.n_kv_heads * 2)
        layer = attn + 3 * D * F + 2 * D
        return V * D * (1 if self.tie_embeddings else 2) + self.n_layers * layer + D

    def replace(self, **overrides) -> "LlamaConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
        return cls(**d)

    # ---- presets ----------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, LlamaConfig] = {
    # Small enough to train on a 2-core CPU in minutes with the character
    # tokenizer (vocab is overridden by the tokenizer's size at build time).
    "tiny": LlamaConfig(
        vocab_size=64, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=384,
        rope_theta=10_000.0, tie_embeddings=True, max_seq_len=512,
    ),
    # HuggingFaceTB/SmolLM2-135M(-Instruct) config.json.
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, mlp_dim=1536,
        norm_eps=1e-5, rope_theta=100_000.0, tie_embeddings=True, max_seq_len=8192,
    ),
    # meta-llama/Llama-2-7b-hf config.json.
    "llama2-7b": LlamaConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_dim=11008,
        norm_eps=1e-5, rope_theta=10_000.0, tie_embeddings=False, max_seq_len=4096,
    ),
    # meta-llama/Meta-Llama-3-8B config.json (3.1 adds rope_scaling=RopeScaling()).
    "llama3-8b": LlamaConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336,
        norm_eps=1e-5, rope_theta=500_000.0, tie_embeddings=False, max_seq_len=8192,
    ),
}
