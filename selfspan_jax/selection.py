"""`Selection`: what one query row may read, in the kernel's vocabulary, and helpers over it.

Policies (`selfspan_jax.policies`) produce selections; the decode loop hands
them to the kernels and measures them (`loop_stats`). Kept apart from both so
that each can import it.

Shapes use the house letters: B batch, S cache length, K KV heads, NB = S // block_size.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Selection:
    """What one query row may read, in the kernel's vocabulary.

    block_indices: int32 [B, NB] (shared by all heads) or [B, K, NB] (per KV
        head); the first `block_counts` entries are the active blocks.
    block_counts: int32 [B] or [B, K].
    token_mask: bool [B, S]; True = this cache position is visible. It is the
        exact row of the attention mask, so statistics computed from it are
        measurements of what the kernel attended to.

    Token-granular policies (SparQ) set instead of reading blocks:
    token_indices: int32 [B, K, T], token_counts int32 [B, K]: the rows each KV
        head reads (`pallas_kernels.token_sparse_decode`); the block fields
        then only describe the causal extent.
    rows_read: f32 [B]: K+V rows read per KV head (row equivalents, mean over
        heads), the policy's own count of its reads, for the statistics; a
        block-list policy sets it when it reads more than its blocks (Quest's
        per-block key bounds).
    mix_alpha: f32 [B, N] and mix_vsum f32 [B, K, H]: output = alpha * y +
        (1 - alpha) * mean(V[0..t]), where the loop completes the mean with the
        query's own V row: mean = (mix_vsum + v[t]) / (t + 1).
    rebuilt: f32 [B]: released tokens re-admitted for this query in this
        layer (ADORE's rebuilds, mean over KV heads; the loop sums the layers).
    policy_carry: what a query-aware policy decided in `select` and keeps
        (ADORE's retained tokens); the loop hands the step's selections back
        to `observe_step`.
    """

    block_indices: jax.Array
    block_counts: jax.Array
    token_mask: jax.Array
    token_indices: Any = None
    token_counts: Any = None
    rows_read: Any = None
    mix_alpha: Any = None
    mix_vsum: Any = None
    rebuilt: Any = None
    policy_carry: Any = None


def dense_selection(lengths: jax.Array, cache_len: int, block_size: int) -> Selection:
    """Causal row for the query at position `lengths[b]`: every j <= lengths[b]."""
    # [S]
    pos = jnp.arange(cache_len, dtype=jnp.int32)
    # [B, S]
    token_mask = pos[None, :] <= lengths[:, None]
    num_blocks = cache_len // block_size
    # [B]
    counts = (lengths // block_size + 1).astype(jnp.int32)
    # [NB]
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    # [B, NB]; padding entries 0 as block_select does
    indices = jnp.where(blocks[None, :] < counts[:, None], blocks[None, :], 0)
    return Selection(indices, counts, token_mask)



def listed(indices: jax.Array, counts: jax.Array, size: int) -> jax.Array:
    """bool [B, K, size]: which ids the first counts[b, k] entries of indices [B, K, n] name (entries
    past the count are padding, whatever they hold)."""
    B, K, n = indices.shape
    live = jnp.arange(n)[None, None, :] < counts[..., None]
    return jnp.zeros((B, K, size), bool).at[jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None],
                                           indices].max(live)
