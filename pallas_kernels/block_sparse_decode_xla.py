"""XLA path of block-sparse decode attention (the CPU backend).

Flash-decoding written in plain jnp over one work list for the whole batch:
the live rows of every (batch, KV head) list, one pair after another. A
`lax.fori_loop` whose trip count is ceil(total live rows / rows per step) (a
run-time value, so nothing recompiles as lists grow) takes the next rows a few
MB at a time -- `chunk` per (batch, KV head) on average, each a whole block,
or a `tile`-token slice of one when a block of every pair is already over the
step budget -- whoever owns them, gathers them into a small [P, tile, H]
array, scores them against their owner's queries and folds them into that
owner's fp32 online softmax (segment max / sums over the sorted owners). Only
the live blocks are read, once each, and the gathered array stays in cache
between the gather and the two dots. A loop per (batch, KV head) instead runs
to the batch's longest list: on the recorded span traces some sequence of a
batch of 8 reads every block (its header is dense) at 98% of the steps, so
that loop read like density 0.99 when the batch's mean was 0.49
(docs/notes/generation.md).

With `layer`, k and v are the model's stacked cache [NL, B, K, S, H] and the
loop reads that layer's rows from it directly (a reshape of the whole stack is
a bitcast); a sliced `k[layer]` would be copied whole by XLA:CPU before the
loop, every call.

Two designs measured worse on 2 CPU cores (T = 8k, 32 heads x 128, f32; see
docs/notes/kernel.md): gathering all live blocks at once at a static bucket
size picked with lax.switch (the conditional copied the whole cache into its
operands, ~14 ms per call, and the multi-MB gathered copies made the dots
3-8x slower than the same dots on contiguous data), and a dense masked pass
over the cache (2x slower than this loop even with every block live).

Letters: B batch, K KV heads, G = N/K, H head dim, S cache length, L list
length, C chunk (rows per (b, k) per step on average), P = B*K*C rows per step,
NL layers, NB blocks in the cache.
"""

from __future__ import annotations

import jax
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
    layer=None,
):
    """Returns f32 [B, K, G, H]; rows with nothing visible are 0.

    tile, chunk: override step_shape (tests); tile must divide block_size.
    layer: with a stacked cache k, v [NL, B, K, S, H], attend to layer
        `layer` of it (an int or int32 scalar, traced is fine; the caller
        keeps it in [0, NL)). The loop then reads that layer's rows straight out of
        the stacked buffer: handing the kernel `k[layer]` instead makes XLA:CPU
        materialise the slice (a copy of the layer's whole K and V, every call,
        whatever the density) because a slice cannot fuse into a while loop's
        operand (docs/notes/generation.md, "Why the attention reads the stacked cache...").
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
    _, batch, kv_heads, seq_len, head_dim = k.shape
    num_blocks = seq_len // block_size
    auto_tile, auto_chunk = step_shape(batch=batch, kv_heads=kv_heads, block_size=block_size, head_dim=head_dim,
                                       itemsize=jnp.dtype(k.dtype).itemsize)
    tile = tile or auto_tile
    chunk = chunk or (auto_chunk if tile == block_size else 1)
    rows_per_block = block_size // tile
    num_rows = num_blocks * rows_per_block  # rows per (b, k)
    # Tile t of a (b, k) list (t-th row in list order) is row `sub` of entry e:
    # t = e * rows_per_block + sub. [B*K, LR], LR = L * rows_per_block.
    pairs = batch * kv_heads
    row_ids = (block_indices[..., None] * rows_per_block + jnp.arange(rows_per_block)).reshape(pairs, -1)
    list_rows = row_ids.shape[-1]
    live_rows = (block_counts * rows_per_block).reshape(pairs)  # [B*K]

    # One work list for the whole batch: the live rows of every (b, k), one
    # pair after another, so a loop step takes the next `per_step` rows
    # whoever owns them and the trip count is ceil(total live / per_step).
    # A per-(b, k) loop runs to the batch's *longest* list instead: with span
    # headers read densely, some sequence of a batch of 8 reads every block at
    # 98% of the steps of the recorded traces, so that loop gathered (padding)
    # rows for the dense count while the batch's mean density was 0.49.
    per_step = pairs * chunk
    slots = pairs * list_rows + (-(pairs * list_rows) % per_step)
    ends = jnp.cumsum(live_rows)
    starts = ends - live_rows
    total = ends[-1]
    # owner of slot j = the last pair whose list starts at or before j (empty
    # lists share their start with the next pair, so the later one wins)
    owner = jnp.cumsum(jnp.zeros((slots,), jnp.int32).at[starts].add(1, mode="drop")) - 1
    owner = jnp.clip(owner, 0, pairs - 1)
    slot = jnp.arange(slots, dtype=jnp.int32)
    valid = slot < total  # [slots]; padding slots sit at the end, owned by the last pair
    within = jnp.clip(slot - starts[owner], 0, list_rows - 1)
    slot_rows = row_ids.reshape(-1)[owner * list_rows + within]  # [slots] row within its (b, k)
    # Padding slots re-read slot 0's row (the first live row: a step runs only when total > 0)
    # and are masked out: the list's padding, and blocks nobody listed, are never read, so a
    # NaN there cannot reach the output (the kernel contract, docs/spec.md §3).
    owner = jnp.where(valid, owner, owner[0])
    slot_rows = jnp.where(valid, slot_rows, slot_rows[0])

    # Row views: one row = `tile` contiguous tokens, so each gathered row is a
    # memcpy-sized slice. [NL*B*K*rows, tile*H] (a bitcast of the stacked
    # cache, no copy) and [B*rows, tile].
    k_rows = k.reshape(num_layers * pairs * num_rows, tile * head_dim)
    v_rows = v.reshape(num_layers * pairs * num_rows, tile * head_dim)
    q_pairs = q.reshape(pairs, *q.shape[2:])  # [B*K, G, H]
    if token_mask is not None:
        mask_rows = token_mask.reshape(batch * num_rows, tile)

    def step(i, carry):
        o_prev, m_prev, l_prev = carry  # [B*K, G, H], [B*K, G], [B*K, G] (f32)
        own = lax.dynamic_slice_in_dim(owner, i * per_step, per_step)  # [P], ascending
        rid = lax.dynamic_slice_in_dim(slot_rows, i * per_step, per_step)
        ok = lax.dynamic_slice_in_dim(valid, i * per_step, per_step)
        rows = (layer * pairs + own) * num_rows + rid
        # Ids were clamped by the caller: promise_in_bounds drops a per-element
        # clamp that measured several times slower than the copy itself.
        kb = k_rows.at[rows].get(mode="promise_in_bounds").reshape(per_step, tile, head_dim)
        vb = v_rows.at[rows].get(mode="promise_in_bounds").reshape(per_step, tile, head_dim)
        vis = jnp.broadcast_to(ok[:, None], (per_step, tile))  # [P, tile]
        if token_mask is not None:
            vis = vis & mask_rows.at[(own // kv_heads) * num_rows + rid].get(mode="promise_in_bounds")
            # masked tokens inside a listed block: zero their V so 0 * (NaN or inf) cannot reach p @ v,
            # and their K too (their scores are replaced below anyway). XLA:CPU fuses each gather into
            # its select and then does not load masked rows: decode steps over mostly masked blocks ran
            # 1.3x faster (docs/notes/generation.md, "Explained (session 27)").
            vb = jnp.where(vis[..., None], vb, 0)
            kb = jnp.where(vis[..., None], kb, 0)
        vis = vis[:, None, :]  # [P, 1, tile]
        # [P, G, tile]
        s = jnp.einsum("pgh,psh->pgs", q_pairs[own], kb, precision=precision,
                       preferred_element_type=jnp.float32) * sm_scale
        s = jnp.where(vis, s, _NEG)
        seg = dict(num_segments=pairs, indices_are_sorted=True)
        # empty segments give -inf, which the running max absorbs
        m_next = jnp.maximum(m_prev, jax.ops.segment_max(s.max(axis=-1), own, **seg))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.where(vis, jnp.exp(s - m_next[own][..., None]), 0.0)
        l_next = correction * l_prev + jax.ops.segment_sum(p.sum(axis=-1), own, **seg)
        # [P, G, H]
        pv = jnp.einsum("pgs,psh->pgh", p.astype(vb.dtype), vb, precision=precision, preferred_element_type=jnp.float32)
        return correction[..., None] * o_prev + jax.ops.segment_sum(pv, own, **seg), m_next, l_next

    lead = (pairs, q.shape[2])
    init = (jnp.zeros((pairs, *q.shape[2:]), jnp.float32), jnp.full(lead, _NEG, jnp.float32),
            jnp.zeros(lead, jnp.float32))
    num_steps = (total + per_step - 1) // per_step
    o, _, denom = lax.fori_loop(0, num_steps, step, init)
    safe = jnp.where(denom > 0, denom, 1.0)
    return jnp.where((denom > 0)[..., None], o / safe[..., None], 0.0).reshape(q.shape)

