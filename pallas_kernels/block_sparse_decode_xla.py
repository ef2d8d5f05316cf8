"""XLA path of block-sparse decode attention (the CPU backend).

Flash-decoding written in plain jnp: a `lax.fori_loop` whose trip count is the
largest live count in the batch (a run-time value, so nothing recompiles as
lists grow) walks the block lists a few MB at a time: each step gathers
`chunk` blocks (or, when one block of every (batch, KV head) is already over
the step budget, a `tile`-token slice of one block) of every (batch, KV head)
into a small [B, K, chunk*tile, H] array, scores it and folds it into an fp32
online softmax. Only the live blocks are read, once each, and the gathered
array stays in cache between the gather and the two dots.

Two designs measured worse on 2 CPU cores (T = 8k, 32 heads x 128, f32; see
docs/notes/kernel.md): gathering all live blocks at once at a static bucket
size picked with lax.switch (the conditional copied the whole cache into its
operands, ~14 ms per call, and the multi-MB gathered copies made the dots
3-8x slower than the same dots on contiguous data), and a dense masked pass
over the cache (2x slower than this loop even with every block live).

Letters: B batch, K KV heads, G = N/K, H head dim, S cache length, L list
length, C chunk (rows per step), NB blocks in the cache.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

# Bytes of K+V gathered per loop step. Small enough to stay in cache between
# the gather and the dots, large enough to amortise a step's fixed cost (loop
# and op dispatch, tens of us on CPU). Measured on 2 shared cores at T = 8k
# (docs/notes/kernel.md): 0.5-2 MiB per step ran fastest, >= 8 MiB 2-3x slower.
STEP_BYTES = 2 * 1024 * 1024
_MAX_CHUNK = 8

_NEG = -0.7 * float(np.finfo(np.float32).max)


def step_shape(*, batch: int, kv_heads: int, block_size: int, head_dim: int, itemsize: int,
               step_bytes: int = STEP_BYTES) -> tuple[int, int]:
    """(tile, chunk): tokens per gathered row and rows per (batch, KV head) per step.

    A row is a whole block when one block of every (b, k) fits the step budget
    (then `chunk` blocks go per step); otherwise blocks are cut into `tile`-token
    rows (a divisor of block_size), one per step, so the working set stays
    bounded at any batch size and block size.
    """
    per_token = batch * kv_heads * head_dim * itemsize * 2  # K and V of one token of every (b, k)
    tokens = max(1, step_bytes // per_token)
    if tokens >= block_size:
        return block_size, int(min(_MAX_CHUNK, tokens // block_size))
    tile = max(d for d in range(1, block_size + 1) if block_size % d == 0 and (d <= tokens or d == 1))
    return tile, 1


def block_sparse_decode_xla(
    q,  # [B, K, G, H]
    k,  # [B, K, S, H], or the stacked cache [NL, B, K, S, H] with `layer`
    v,  # same shape as k
    block_indices,  # int32 [B, K, L], ids already clamped to [0, NB)
    block_counts,  # int32 [B, K], clamped to [0, min(L, NB)]
    token_mask,  # bool [B, S] or None
    *,
    block_size: int,
    sm_scale: float,
    precision,
    tile: int | None = None,
    chunk: int | None = None,
    layer: int | None = None,
):
    """Returns f32 [B, K, G, H]; rows with nothing visible are 0.

    tile, chunk: override step_shape (tests); tile must divide block_size.
    layer: with a stacked cache k, v [NL, B, K, S, H], attend to layer
        `layer` of it. The loop then reads that layer's rows straight out of
        the stacked buffer: handing the kernel `k[layer]` instead makes XLA:CPU
        materialise the slice (a copy of the layer's whole K and V, every call,
        whatever the density) because a slice cannot fuse into a while loop's
        operand (docs/notes/generation.md, "Why the CPU decode number...").
    """
    if layer is None:
        if k.ndim != 4:
            raise ValueError(f"k must be [B, K, S, H] without layer, got shape {k.shape}")
        num_layers, layer = 1, 0
        k, v = k[None], v[None]
    else:
        if k.ndim != 5:
            raise ValueError(f"k must be the stacked cache [NL, B, K, S, H] with layer, got shape {k.shape}")
        num_layers = k.shape[0]
        if not 0 <= int(layer) < num_layers:
            raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
    _, batch, kv_heads, seq_len, head_dim = k.shape
    num_blocks = seq_len // block_size
    auto_tile, auto_chunk = step_shape(batch=batch, kv_heads=kv_heads, block_size=block_size, head_dim=head_dim,
                                       itemsize=jnp.dtype(k.dtype).itemsize)
    tile = tile or auto_tile
    chunk = chunk or (auto_chunk if tile == block_size else 1)
    rows_per_block = block_size // tile
    num_rows = num_blocks * rows_per_block  # rows per (b, k)
    # Tile t of the list (t-th row in list order) is row `sub` of entry e:
    # t = e * rows_per_block + sub. [B, K, L*rpb], padded to a multiple of chunk
    # (the padding is never live).
    row_ids = (block_indices[..., None] * rows_per_block + jnp.arange(rows_per_block)).reshape(batch, kv_heads, -1)
    list_rows = row_ids.shape[-1]
    row_ids = jnp.pad(row_ids, ((0, 0), (0, 0), (0, -list_rows % chunk)))
    live_rows = block_counts * rows_per_block  # [B, K]

    # Row views: one row = `tile` contiguous tokens, so each gathered row is a
    # memcpy-sized slice. [B*K*rows, tile*H] and [B*rows, tile].
    k_rows = k.reshape(num_layers * batch * kv_heads * num_rows, tile * head_dim)
    v_rows = v.reshape(num_layers * batch * kv_heads * num_rows, tile * head_dim)
    head_base = ((int(layer) * batch + jnp.arange(batch)[:, None, None]) * kv_heads
                 + jnp.arange(kv_heads)[None, :, None]) * num_rows
    if token_mask is not None:
        mask_rows = token_mask.reshape(batch * num_rows, tile)
        batch_base = jnp.arange(batch)[:, None, None] * num_rows

    def step(i, carry):
        o_prev, m_prev, l_prev = carry  # [B, K, G, H], [B, K, G], [B, K, G] (f32)
        sel = lax.dynamic_slice_in_dim(row_ids, i * chunk, chunk, axis=2)  # [B, K, C]
        rows = (head_base + sel).reshape(-1)
        # Ids were clamped by the caller: promise_in_bounds drops a per-element
        # clamp that measured several times slower than the copy itself.
        kb = k_rows.at[rows].get(mode="promise_in_bounds").reshape(batch, kv_heads, chunk * tile, head_dim)
        vb = v_rows.at[rows].get(mode="promise_in_bounds").reshape(batch, kv_heads, chunk * tile, head_dim)
        live = i * chunk + jnp.arange(chunk) < live_rows[..., None]  # [B, K, C]
        vis = jnp.repeat(live, tile, axis=-1)  # [B, K, C*tile]
        if token_mask is not None:
            tok = mask_rows.at[(batch_base + sel).reshape(-1)].get(mode="promise_in_bounds")
            vis = vis & tok.reshape(batch, kv_heads, chunk * tile)
        vis = vis[:, :, None, :]  # [B, K, 1, C*tile]
        # [B, K, G, C*tile]
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
    num_steps = (live_rows.max() + chunk - 1) // chunk
    o, _, l = lax.fori_loop(0, num_steps, step, init)
    safe = jnp.where(l > 0, l, 1.0)
    return jnp.where((l > 0)[..., None], o / safe[..., None], 0.0)


def block_sparse_decode_xla_stacked(
    q,  # [B, N, H]
    k,  # [NL, B, K, S, H]: the model's stacked KV cache
    v,  # [NL, B, K, S, H]
    layer: int,
    block_indices,  # int [B, L] or [B, K, L]
    block_counts,  # int [B] or [B, K]
    token_mask=None,  # bool [B, S] or None
    *,
    block_size: int,
    sm_scale: float | None = None,
    precision=None,
):
    """`block_sparse_decode(q, k[layer], v[layer], ...)` on the xla path, without slicing the cache.

    Same contract and result as the public function with backend="xla"
    (counts and ids clamped as under jit, output in q's dtype); it exists for
    callers that hold the stacked cache, such as the generation loop, so that
    a decode step reads only the listed blocks instead of copying every
    layer's K and V first.
    """
    from pallas_kernels.block_sparse_decode import _normalise_precision

    if q.ndim != 3 or k.ndim != 5 or v.shape != k.shape:
        raise ValueError(f"q must be [B, N, H] and k, v [NL, B, K, S, H], got {q.shape}, {k.shape}, {v.shape}")
    num_layers, batch, kv_heads, seq_len, head_dim = k.shape
    num_heads = q.shape[1]
    if q.shape[0] != batch or q.shape[2] != head_dim or num_heads % kv_heads:
        raise ValueError(f"q shape {q.shape} does not match the cache {k.shape} (N must be a multiple of K)")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1 or seq_len % block_size:
        raise ValueError(f"block_size must be a positive divisor of S={seq_len}, got {block_size!r}")
    if token_mask is not None and token_mask.shape != (batch, seq_len):
        raise ValueError(f"token_mask must be [B, S] = {(batch, seq_len)}, got {token_mask.shape}")
    num_blocks = seq_len // block_size
    idx = jnp.asarray(block_indices).astype(jnp.int32)
    if idx.ndim == 2:
        idx = jnp.broadcast_to(idx[:, None, :], (batch, kv_heads, idx.shape[-1]))
    cnt = jnp.asarray(block_counts).astype(jnp.int32)
    if cnt.ndim == 1:
        cnt = jnp.broadcast_to(cnt[:, None], (batch, kv_heads))
    if idx.shape[:2] != (batch, kv_heads) or cnt.shape != (batch, kv_heads):
        raise ValueError(f"block_indices {jnp.shape(block_indices)} / block_counts {jnp.shape(block_counts)} do not "
                         f"match batch {batch} and {kv_heads} KV heads")
    if idx.shape[-1] == 0:
        return jnp.zeros_like(q)
    # The same clamps as the public function under jit: no list can read outside the cache.
    cnt = jnp.clip(cnt, 0, min(idx.shape[-1], num_blocks))
    idx = jnp.clip(idx, 0, num_blocks - 1)
    qg = q.reshape(batch, kv_heads, num_heads // kv_heads, head_dim)
    out = block_sparse_decode_xla(
        qg, k, v, idx, cnt, token_mask, block_size=int(block_size),
        sm_scale=float(sm_scale if sm_scale is not None else 1.0 / np.sqrt(head_dim)),
        precision=_normalise_precision(precision), layer=int(layer),
    )
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)
