"""The KV cache: a typed pytree, never a dict.

Shapes use the house letters (STYLE.md): L layers, B batch, K KV heads,
S_max cache capacity, H head dim.

Cache index == token position: prompts are right-padded and each sequence
keeps its own `lengths[b]`, so no position offsets are stored. The [B, K, S, H]
slice of one layer is the layout `block_sparse_decode` reads directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from selfspan_jax.config import LlamaConfig


@struct.dataclass
class KVCache:
    """Keys/values of every layer plus the number of valid positions per sequence.

    k, v: [L, B, K, S_max, H] in the compute dtype (RoPE already applied to k).
    lengths: int32 [B]; positions >= lengths[b] hold stale or zero data that
    no attention path may read.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        """An empty cache (all lengths 0) for `batch` sequences of up to `max_len` positions."""
        if not isinstance(batch, int) or batch <= 0:
            raise ValueError(f"KVCache.init: batch must be a positive int, got {batch!r}")
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"KVCache.init: max_len must be a positive int, got {max_len!r}")
        dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def check(self, config: LlamaConfig, batch: int) -> None:
        """Raise ValueError if this cache cannot serve `config` at batch size `batch`."""
        want = (config.n_layers, batch, config.n_kv_heads, self.max_len, config.head_dim)
        if self.k.shape != want or self.v.shape != want:
            raise ValueError(
                f"KVCache k/v shapes {self.k.shape}/{self.v.shape} do not match "
                f"[L, B, K, S_max, H] = {want} for this model and batch"
            )
        if self.lengths.shape != (batch,):
            raise ValueError(f"KVCache.lengths shape {self.lengths.shape} != (batch,) = {(batch,)}")
