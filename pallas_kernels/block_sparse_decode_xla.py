"""XLA path of block-sparse decode attention (the CPU backend).

Flash-decoding written in plain jnp: a `lax.fori_loop` whose trip count is the
largest live count in the batch (a run-time value, so nothing recompiles as
lists grow) walks the block lists `chunk` entries at a time; each step gathers
those blocks of every (batch, KV head) into a small [B, K, chunk*bs, H] tile,
scores it and folds it into an fp32 online softmax. Only the live blocks are
read, once each, and the gathered tile stays in cache between the gather and
the two dots.

Two designs measured worse on 2 CPU cores (T = 8k, 32 heads x 128, f32; see
docs/notes/kernel.md): gathering all live blocks at once at a static bucket
size picked with lax.switch (the conditional copied the whole cache into its
operands, ~14 ms per call, and the multi-MB gathered copies made the dots
3-8x slower than the same dots on contiguous data), and a dense masked pass
over the cache (2x slower than this loop even with every block live).

Letters: B batch, K KV heads, G = N/K, H head dim, S cache length, L list
length, C chunk (blocks per step), NB blocks in the cache.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

# Bytes of K+V gathered per loop step. Small enough to stay in L2/L3 between
# the gather and the dots, large enough to amortise a step's fixed cost
# (~50-100 us of loop and op dispatch on CPU).
_STEP_BYTES = 4 * 1024 * 1024
_MAX_CHUNK = 8

_NEG = -0.7 * float(np.finfo(np.float32).max)


def chunk_blocks(*, batch: int, kv_heads: int, block_size: int, head_dim: int, itemsize: int, list_len: int) -> int:
    """Blocks per (batch, KV head) gathered in one loop step."""
    per_block = batch * kv_heads * block_size * head_dim * itemsize * 2
    return int(max(1, min(_MAX_CHUNK, list_len, _STEP_BYTES // per_block)))


def block_sparse_decode_xla(
    q,  # [B, K, G, H]
    k,  # [B, K, S, H]
    v,  # [B, K, S, H]
    block_indices,  # int32 [B, K, L], ids already clamped to [0, NB)
    block_counts,  # int32 [B, K], clamped to [0, min(L, NB)]
    token_mask,  # bool [B, S] or None
    *,
    block_size: int,
    sm_scale: float,
    precision,
    chunk: int | None = None,
):
    """Returns f32 [B, K, G, H]; rows with nothing visible are 0."""
    batch, kv_heads, seq_len, head_dim = k.shape
    num_blocks = seq_len // block_size
    list_len = block_indices.shape[-1]
    if chunk is None:
        chunk = chunk_blocks(batch=batch, kv_heads=kv_heads, block_size=block_size, head_dim=head_dim,
                             itemsize=jnp.dtype(k.dtype).itemsize, list_len=list_len)
    # [B, K, L'] with L' a multiple of chunk; the padding entries are never live.
    idx = jnp.pad(block_indices, ((0, 0), (0, 0), (0, -list_len % chunk)))

    # Row views: one row = one contiguous block, so each gathered row is a
    # memcpy-sized slice. [B*K*NB, bs*H] and [B*NB, bs].
    k_rows = k.reshape(batch * kv_heads * num_blocks, block_size * head_dim)
    v_rows = v.reshape(batch * kv_heads * num_blocks, block_size * head_dim)
    head_base = (jnp.arange(batch)[:, None, None] * kv_heads + jnp.arange(kv_heads)[None, :, None]) * num_blocks
    if token_mask is not None:
        mask_rows = token_mask.reshape(batch * num_blocks, block_size)
        batch_base = jnp.arange(batch)[:, None, None] * num_blocks

    def step(i, carry):
        o_prev, m_prev, l_prev = carry  # [B, K, G, H], [B, K, G], [B, K, G] (f32)
        sel = lax.dynamic_slice_in_dim(idx, i * chunk, chunk, axis=2)  # [B, K, C]
        rows = (head_base + sel).reshape(-1)
        # Ids were clamped by the caller: promise_in_bounds drops a per-element
        # clamp that measured several times slower than the copy itself.
        kb = k_rows.at[rows].get(mode="promise_in_bounds").reshape(batch, kv_heads, chunk * block_size, head_dim)
        vb = v_rows.at[rows].get(mode="promise_in_bounds").reshape(batch, kv_heads, chunk * block_size, head_dim)
        live = i * chunk + jnp.arange(chunk) < block_counts[..., None]  # [B, K, C]
        vis = jnp.repeat(live, block_size, axis=-1)  # [B, K, C*bs]
        if token_mask is not None:
            tok = mask_rows.at[(batch_base + sel).reshape(-1)].get(mode="promise_in_bounds")
            vis = vis & tok.reshape(batch, kv_heads, chunk * block_size)
        vis = vis[:, :, None, :]  # [B, K, 1, C*bs]
        # [B, K, G, C*bs]
        s = jnp.einsum("bkgh,bksh->bkgs", q, kb, precision=precision, preferred_element_type=jnp.float32) * sm_scale
        s = jnp.where(vis, s, _NEG)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.where(vis, jnp.exp(s - m_next[..., None]), 0.0)
        l_next = correction * l_prev + p.sum(axis=-1)
        pv = jnp.einsum("bkgs,bksh->bkgh", p.astype(vb.dtype), vb, precision=precision, preferred_element_type=jnp.float32)
        return correction[..., None] * o_prev + pv, m_next, l_next

    lead = q.shape[:-1]
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full(lead, _NEG, jnp.float32), jnp.zeros(lead, jnp.float32))
    num_steps = (block_counts.max() + chunk - 1) // chunk
    o, _, l = lax.fori_loop(0, num_steps, step, init)
    safe = jnp.where(l > 0, l, 1.0)
    return jnp.where((l > 0)[..., None], o / safe[..., None], 0.0)
