"""XLA gather path of block-sparse decode attention (the CPU backend).

Gathers only the live KV blocks and runs masked attention over them in plain
jnp. Array shapes must be static, but the number of live blocks is data; so the
gather runs at one of a few static capacities ("buckets"), picked at run time
with lax.switch from the largest live count in the batch. On CPU a conditional
executes only the taken branch, so the work (and the bytes read) scale with the
live count rounded up to the next bucket, not with the cache length.

Letters: B batch, K KV heads, G = N/K, H head dim, S cache length, L list
length, C bucket capacity (blocks gathered), NB blocks in the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def bucket_capacities(list_len: int) -> tuple[int, ...]:
    """Static gather capacities up to list_len: 1, 2, 3, 4, 6, 8, 12, 16, 24, ...

    Steps of 4/3 and 3/2 alternate, so rounding the live count up wastes at
    most 50% (usually ~33%), at ~2 log2(L) compiled branches.
    """
    caps = []
    p = 1
    while p < list_len:
        caps.append(p)
        if p >= 2 and p * 3 // 2 < list_len:
            caps.append(p * 3 // 2)
        p *= 2
    caps.append(list_len)
    return tuple(sorted(set(caps)))


def _gather_attend(q, k, v, idx, cnt, token_mask, *, capacity, block_size, sm_scale, precision):
    """Attention over the first `capacity` list entries; entries >= cnt are masked."""
    from pallas_kernels.block_sparse_decode import masked_attention

    batch, kv_heads, seq_len, head_dim = k.shape
    num_blocks = seq_len // block_size
    sel = idx[:, :, :capacity]  # [B, K, C]
    # Row gather on a [B*K*NB, bs*H] view: each row is one contiguous block, so
    # XLA emits one memcpy-sized slice per gathered block.
    rows = (jnp.arange(batch)[:, None, None] * kv_heads + jnp.arange(kv_heads)[None, :, None]) * num_blocks + sel
    rows = rows.reshape(-1)  # [B*K*C]
    k_rows = k.reshape(batch * kv_heads * num_blocks, block_size * head_dim)
    v_rows = v.reshape(batch * kv_heads * num_blocks, block_size * head_dim)
    # [B, K, C*bs, H]
    kb = jnp.take(k_rows, rows, axis=0, mode="clip").reshape(batch, kv_heads, capacity * block_size, head_dim)
    vb = jnp.take(v_rows, rows, axis=0, mode="clip").reshape(batch, kv_heads, capacity * block_size, head_dim)

    live = jnp.arange(capacity) < cnt[..., None]  # [B, K, C]
    vis = jnp.repeat(live, block_size, axis=-1)  # [B, K, C*bs]
    if token_mask is not None:
        # [B, NB, bs] -> gathered per head [B, K, C, bs] -> [B, K, C*bs]
        mask_blocks = token_mask.reshape(batch, num_blocks, block_size)
        gathered = jnp.take_along_axis(mask_blocks[:, None], sel[..., None], axis=2, mode="clip")
        vis = vis & gathered.reshape(batch, kv_heads, capacity * block_size)
    return masked_attention(q, kb, vb, vis, sm_scale=sm_scale, precision=precision)


def block_sparse_decode_xla(
    q,  # [B, K, G, H]
    k,  # [B, K, S, H]
    v,  # [B, K, S, H]
    block_indices,  # int32 [B, K, L], ids already clamped to [0, NB)
    block_counts,  # int32 [B, K], clamped to [0, L]
    token_mask,  # bool [B, S] or None
    *,
    block_size: int,
    sm_scale: float,
    precision,
):
    """Returns f32 [B, K, G, H]; see module docstring."""
    caps = bucket_capacities(block_indices.shape[-1])
    branches = [
        lambda ops, c=c: _gather_attend(
            *ops, capacity=c, block_size=block_size, sm_scale=sm_scale, precision=precision
        )
        for c in caps
    ]
    operands = (q, k, v, block_indices, block_counts, token_mask)
    if len(branches) == 1:
        return branches[0](operands)
    # First capacity that holds the largest live count of the batch.
    need = block_counts.max()
    branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), need, side="left")
    return lax.switch(jnp.minimum(branch, len(caps) - 1), branches, operands)
