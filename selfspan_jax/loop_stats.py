"""What the decode loop measures of a selection: the per-step statistics and the attention-recall diagnostic.

`selection_stats` feeds `LoopState`'s statistics (keys attended, blocks read,
blocks a dense read touches); `read_keys` and `attention_recall` compare a
selection with the model's dense attention (`generate(outputs=Outputs(recall=True))`).
Every number is computed from the selection the kernel was handed, so it is a
measurement of what was read, not an estimate.

Shapes use the house letters: B batch, S cache length, N query heads, K KV heads, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from selfspan_jax.selection import Selection, listed


def selection_stats(sel: Selection, pos: jax.Array, block_size: int):
    """Measured from the selection itself: (keys attended f32 [B], blocks read f32 [B], dense blocks [B]).

    Shared lists: the token mask lies inside the listed blocks, so the keys
    attended are its causal entries. Per-KV-head lists [B, K, L]: the causal
    token-mask entries inside each head's listed blocks, averaged over heads
    (as are the blocks read).
    """
    S = sel.token_mask.shape[-1]
    # [B, S]
    row = sel.token_mask & (jnp.arange(S)[None, :] <= pos[:, None])
    counts = sel.block_counts.astype(jnp.float32)
    if sel.token_indices is not None:  # token lists: listed rows per head
        visible = jnp.mean(sel.token_counts.astype(jnp.float32), axis=-1)
    elif counts.ndim == 1:
        visible = jnp.sum(row, axis=-1).astype(jnp.float32)
    else:
        B = sel.block_indices.shape[0]
        # [B, K, NB]: which blocks each head reads (entries past the count are not read)
        member = listed(sel.block_indices, sel.block_counts, S // block_size)
        # [B, NB] visible keys per block
        per_block = row.reshape(B, S // block_size, block_size).sum(-1).astype(jnp.float32)
        visible = jnp.mean(jnp.sum(member * per_block[:, None, :], axis=-1), axis=-1)
        counts = jnp.mean(counts, axis=-1)
    if sel.rows_read is not None:  # the policy counts its own reads (token lists; blocks plus key bounds)
        counts = sel.rows_read / (2.0 * block_size)
    return visible, counts, (pos // block_size + 1).astype(jnp.int32)


def read_keys(sel: Selection, pos, block_size: int, n_kv_heads: int) -> jax.Array:
    """bool [B, K, S]: the keys each KV head's attention reads under `sel` (causal, listed and unmasked)."""
    B, S = sel.token_mask.shape
    causal = jnp.arange(S)[None, :] <= pos[:, None]  # [B, S]
    if sel.token_indices is not None:  # token lists: the first token_counts rows of each head
        keys = listed(sel.token_indices, sel.token_counts, S) & causal[:, None, :]
    else:
        idx, counts = sel.block_indices, sel.block_counts
        if idx.ndim == 2:  # one list for every head
            idx, counts = idx[:, None, :], counts[:, None]
        blocks = jnp.repeat(listed(idx, counts, S // block_size), block_size, axis=-1)  # [B, K or 1, S]
        keys = blocks & (sel.token_mask & causal)[:, None, :]
    return jnp.broadcast_to(keys, (B, n_kv_heads, S))


def attention_recall(q, k, sel: Selection, pos, block_size: int) -> jax.Array:
    """[B]: the share of dense softmax attention (q [B, N, H] against every key k [B, K, S, H] at or
    before `pos`, fp32, 1/sqrt(H)) on the keys `sel` reads, mean over query heads.

    A selection's quality apart from what the kernel does with it: a SparQ or Quest list that
    misses where the dense attention goes shows here before it shows in accuracy."""
    B, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, K, N // K, H)
    logits = jnp.einsum("bkgh,bksh->bkgs", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(H))
    causal = (jnp.arange(S)[None, :] <= pos[:, None])[:, None, None, :]
    p = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    member = read_keys(sel, pos, block_size, K)[:, :, None, :]
    return jnp.mean(jnp.sum(jnp.where(member, p, 0.0), axis=-1), axis=(1, 2))
