"""Block-sparse decode attention on Pallas's Mosaic GPU backend (Hopper: TMA + wgmma).

The same contract as `block_sparse_decode` (docs/spec.md §3), built so that a
call is one kernel launch: the raw block lists, counts, layer and token mask
are read inside the kernel (clamped there, so no XLA clamp or broadcast runs
before it), and with one split per (batch, KV head) the kernel writes the
normalised output in q's dtype, so nothing runs after it either. With several
splits (flash-decoding, for batch x KV heads far below the SM count) it writes
per-split partials and the XLA combine beside it merges them
(`splits.combine_splits`; an in-kernel combine is not built).

One program per (batch b, KV head h, split): one warpgroup that

  1. copies 64 query rows that contain the G heads of (b, h) from q viewed as
     [B*N, H] into SMEM (one TMA). wgmma's M is 64, G is 1-8: the other rows
     are neighbouring heads' queries (or zeros past a short q), computed and
     never written. The copy's start is a multiple of 8 (the SMEM tile's rows)
     and clamped so the 64 rows stay inside q; the G rows sit at `offset`.
  2. walks its share of the live list with `plgpu.emit_pipeline`: the index
     map reads the block id from the list in GMEM, so TMA fetches K and V
     tiles [block_k, H] of exactly the listed blocks, `stages` in flight
     (double buffering at the largest tiles, up to 4 at small ones).
  3. per tile: S = Q K^T with wgmma into a [64, block_k] f32 accumulator,
     the online softmax in registers, P written to SMEM in the cache dtype
     (wgmma's A operand must come from SMEM in the GPU interpreter, and the
     kernel that runs is the kernel that is tested), O += P V with wgmma.
  4. writes the G rows at `offset`: normalised in q's dtype (one split), or
     the unnormalised f32 partial with the whole 64-row m and l vectors
     (several splits; the combine picks the G rows, a static gather).

Why not Q padded to 64 rows outside: that is an XLA op before every call.
A q of fewer than 64 rows (batch 1 at 7B widths) is copied whole into a
zeroed tile instead. q is padded (one XLA op) only when B*N is not a multiple
of 8, the SMEM tile's rows: e.g. SmolLM2's 9 heads at odd batch sizes.

Hopper numbers assumed (H100 SXM): 132 SMs, 228 KiB SMEM per SM (227 usable
by one block), 3.35 TB/s HBM; a [64, 128] x [128, 128] bf16 wgmma takes ~0.1
us per SM, far below the ~1.3 us one SM's share of HBM needs to bring a
128-token bf16 K+V tile at H = 128: the kernel is bound by what it reads.

Letters as in block_sparse_decode.py: B batch, N query heads, K KV heads,
G = N/K, H head dim, S cache length, L list length, NB = S // block_size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

try:  # the Mosaic GPU backend of Pallas (jax >= 0.5)
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - every jaxlib we support ships it
    plgpu = None

from pallas_kernels.backend import BlockSparseParams, default_k_splits, gpu_core_count
from pallas_kernels.splits import NEG, combine_splits, live_splits, split_range

# wgmma's M: query rows per program.
ROWS = 64
# Rows of an SMEM tile (TilingTransform): the query copy starts at a multiple of it.
_TILE_ROWS = 8
# Shared memory one block may allocate on Hopper (227 KiB), and the K/V pipeline's share of it: 128
# KiB in flight per SM is ~5x what Little's law asks at one SM's share of HBM (docs/notes/kernel.md).
SMEM_BYTES = 227 * 1024
_PIPELINE_SMEM_BYTES = 128 * 1024
_MAX_STAGES = 4
MOSAIC_DTYPES = (jnp.bfloat16, jnp.float16)


def _swizzled(inner: int, itemsize: int):
    """SMEM transforms for a tile whose minor dimension holds `inner` elements: the widest swizzle
    (32, 64 or 128 bytes) the row fills, tiled (8, swizzle / itemsize). wgmma needs both operands
    of a product in one swizzle, so Q and K follow H, P and V follow block_k."""
    swizzle = min(128, inner * itemsize)
    return plgpu.TilingTransform((_TILE_ROWS, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def smem_bytes(*, block_k: int, stages: int, head_dim: int, itemsize: int) -> int:
    """Shared memory one program allocates: the K/V pipeline (`stages` K and V tiles), q and p
    tiles, the output tile (counted at fp32, the several-split case), m and l, barriers."""
    pipeline = stages * 2 * block_k * head_dim * itemsize
    fixed = ROWS * head_dim * itemsize + ROWS * block_k * itemsize + ROWS * head_dim * 4 + 2 * ROWS * 4
    return pipeline + fixed + 8 * (stages + 1)


def mosaic_tiles(*, block_size: int, head_dim: int, itemsize: int, params: BlockSparseParams) -> tuple[int, int]:
    """(block_k, stages): tokens per pipeline step and K/V steps in flight.

    block_k: params.block_k, else the largest power of two <= 256 (wgmma's N) dividing the block
    whose two K+V stages fit both the pipeline's share (128 KiB) and, with the other tiles, the
    SMEM of one block (`smem_bytes` <= SMEM_BYTES). stages: params.num_stages (here: K/V steps in
    flight, not Triton's pipeline depth), else as many K+V tiles as fit those, 2 to 4 (2 = double
    buffering at the largest tiles). params.k_splits is read by the caller; block_h and num_warps
    are Triton's and refused.
    """
    if params.block_h not in (None, ROWS) or params.num_warps is not None:
        raise ValueError(f"BlockSparseParams(block_h={params.block_h}, num_warps={params.num_warps}) do not apply to "
                         f"the Mosaic kernel: its programs are one warpgroup over {ROWS} query rows (wgmma's M)")
    tile_bytes = 2 * head_dim * itemsize  # one token of K and V
    fits = lambda bk, st: (st * bk * tile_bytes <= _PIPELINE_SMEM_BYTES  # noqa: E731
                           and smem_bytes(block_k=bk, stages=st, head_dim=head_dim, itemsize=itemsize) <= SMEM_BYTES)
    block_k = params.block_k
    if block_k is None:
        block_k = 256
        while block_k > 16 and (block_size % block_k or not fits(block_k, 2)):
            block_k //= 2
    if block_size % block_k or block_k % 16 or block_k > 256:
        raise ValueError(f"block_k={block_k} must be a multiple of 16, at most 256, dividing block_size={block_size}")
    stages = params.num_stages
    if stages is None:
        stages = _MAX_STAGES
        while stages > 2 and not fits(block_k, stages):
            stages -= 1
    need = smem_bytes(block_k=block_k, stages=stages, head_dim=head_dim, itemsize=itemsize)
    if need > SMEM_BYTES:
        raise ValueError(f"block_k={block_k} with {stages} stages needs {need // 1024} KiB of shared memory at H={head_dim}, "
                         f"more than the {SMEM_BYTES // 1024} KiB of one block: pass a smaller block_k or num_stages")
    return block_k, stages


def check_shapes(*, head_dim: int, block_size: int, dtype) -> None:
    """Raises ValueError for what the Mosaic kernel cannot run."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in MOSAIC_DTYPES]:
        raise ValueError(f"the Mosaic GPU kernel runs 16-bit caches (bfloat16, float16), got {jnp.dtype(dtype)}: "
                         "its wgmma would read float32 as tf32 (use backend='pallas' or 'xla' for float32)")
    if head_dim % 64 or head_dim > 256:
        raise ValueError(f"head dim H={head_dim} is not supported by the Mosaic kernel: 64, 128, 192 or 256 "
                         "(wgmma's N and the masked V tile's 64-row layout; use backend='pallas' or 'xla')")
    if block_size % 16:
        raise ValueError(f"block_size={block_size} is not supported by the Mosaic kernel: a multiple of 16 "
                         "(wgmma's K for P @ V)")


def _query_rows(batch: int, num_heads: int) -> int:
    """Rows of q as the kernel reads it: B*N rounded up to a whole SMEM tile of 8 rows."""
    return -(-batch * num_heads // _TILE_ROWS) * _TILE_ROWS


def _query_tile(row, q_rows: int):
    """(start, offset): the 64-row window of q that holds rows [row, row + G), starting at a multiple
    of 8 and inside q, and where row falls in it (row >= 0; a numpy array or a traced int32). A q of
    fewer than 64 rows is copied whole: start 0."""
    if q_rows <= ROWS:
        return 0, row
    minimum = np.minimum if isinstance(row, np.ndarray) else jnp.minimum
    start = minimum((row // _TILE_ROWS) * _TILE_ROWS, q_rows - ROWS)
    return start, row - start


# --------------------------------------------------------------------------
# 1. Kernel body
# --------------------------------------------------------------------------
def _kernel(layer_ref, idx_ref, cnt_ref, q_ref, k_ref, v_ref, *refs, kv_heads, group, num_layers, num_blocks,
            list_len, block_size, block_k, stages, k_splits, sm_scale, has_mask, shared_list, shared_count,
            q_rows, dtype):
    if has_mask:
        mask_ref, *refs = refs
    if k_splits == 1:
        out_ref, q_smem, p_smem, o_smem, q_barrier = refs
    else:
        o_ref, m_ref, l_ref, q_smem, p_smem, o_smem, ml_smem, q_barrier = refs
    b, h, split = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("split")
    head_dim = q_ref.shape[-1]
    tiles_per_block = block_size // block_k

    # The raw list and count, clamped here (eager calls validated them; under jit a bad value
    # must still never read outside the cache).
    count = cnt_ref[b] if shared_count else cnt_ref[b, h]
    count = jnp.clip(count, 0, min(list_len, num_blocks))
    list_row = idx_ref.at[b] if shared_list else idx_ref.at[b, h]
    first, last = split_range(count, split, k_splits)
    num_entries = jnp.maximum(last - first, 0)
    layer = jnp.clip(layer_ref[0], 0, num_layers - 1)

    row = (b * kv_heads + h) * group  # this (b, h)'s first row of q viewed as [B*N, H]
    start, offset = _query_tile(row, q_rows)
    if q_rows < ROWS:
        # All of q fits below the 64 rows: zero the rest (rows past q would be whatever SMEM held;
        # they feed only rows that are never written, but NaN there is needless), then copy q whole.
        q_smem[...] = plgpu.layout_cast(jnp.zeros((ROWS, q_smem.shape[1]), dtype), plgpu.Layout.WGMMA)
        plgpu.commit_smem()
        plgpu.copy_gmem_to_smem(q_ref, q_smem.at[pl.ds(0, q_rows)], q_barrier)
    else:
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(pl.multiple_of(start, _TILE_ROWS), ROWS)], q_smem, q_barrier)

    def tile_index(t):
        entry = first + lax.div(t, tiles_per_block)
        blk = jnp.clip(list_row[entry], 0, num_blocks - 1)
        return blk * tiles_per_block + lax.rem(t, tiles_per_block)

    q_tx, v_tx = _swizzled(head_dim, dtype.itemsize), _swizzled(block_k, dtype.itemsize)
    in_specs = [plgpu.BlockSpec((block_k, head_dim), lambda t: (tile_index(t), 0), transforms=q_tx),
                plgpu.BlockSpec((block_k, head_dim), lambda t: (tile_index(t), 0), transforms=v_tx)]
    cache = [k_ref.at[layer, b, h], v_ref.at[layer, b, h]]
    if has_mask:
        in_specs.append(plgpu.BlockSpec((block_k,), lambda t: (tile_index(t),)))
        cache.append(mask_ref.at[b])

    plgpu.barrier_wait(q_barrier)
    acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
    m = plgpu.layout_cast(jnp.full((ROWS,), NEG, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))

    def step(_, k_smem, v_smem, *rest):
        *mask_smem, (acc, m_prev, l_prev) = rest

        def scores(s_ref):
            plgpu.wgmma(s_ref, q_smem, k_smem.T)
            return s_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((ROWS, block_k), jnp.float32)) * sm_scale
        if has_mask:
            column = plgpu.load(mask_smem[0], layout=plgpu.Layout.WGMMA.reduce(0))
            visible = lax.broadcast_in_dim(column != 0, s.shape, [1])
            s = jnp.where(visible, s, NEG)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
        if has_mask:
            # zero, not exp(0): a fully masked tile keeps m at NEG
            p = jnp.where(visible, p, 0.0)
            # p is 0 there, but 0 * NaN is NaN: a masked V row must not reach the output
            # (zeroed through the transposed view [H, block_k], the WGMMA layout of the scores' shape)
            keep = lax.broadcast_in_dim(column != 0, (head_dim, block_k), [1])
            v_t = plgpu.load(v_smem.T, layout=plgpu.Layout.WGMMA)
            v_smem.T[...] = jnp.where(keep, v_t, jnp.zeros_like(v_t))
        l_next = correction * l_prev + p.sum(axis=1)
        p_smem[...] = p.astype(dtype)
        plgpu.commit_smem()

        def values(o_ref_):
            plgpu.wgmma(o_ref_, p_smem, v_smem)
            return o_ref_[...]

        pv = pl.run_scoped(values, plgpu.ACC((ROWS, head_dim), jnp.float32))
        return acc * lax.broadcast_in_dim(correction, acc.shape, [0]) + pv, m_next, l_next

    acc, m, l = plgpu.emit_pipeline(step, grid=(num_entries * tiles_per_block,), in_specs=in_specs,
                                    max_concurrent_steps=stages, init_carry=(acc, m, l))(*cache)

    if k_splits == 1:
        # Every (b, h) writes its rows, an empty list included (l = 0: the rows are 0).
        safe = jnp.where(l > 0, l, 1.0)
        o_smem[...] = (acc / lax.broadcast_in_dim(safe, acc.shape, [0])).astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, group)], out_ref.at[pl.ds(row, group)])
        plgpu.wait_smem_to_gmem(0)
    else:
        @pl.when(num_entries > 0)  # an empty split writes nothing (the combine masks it)
        def _():
            o_smem[...] = acc
            ml_smem[0] = m
            ml_smem[1] = l
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(offset, group)], o_ref.at[split, pl.ds(row, group)])
            plgpu.copy_smem_to_gmem(ml_smem.at[0], m_ref.at[split, b * kv_heads + h])
            plgpu.copy_smem_to_gmem(ml_smem.at[1], l_ref.at[split, b * kv_heads + h])
            plgpu.wait_smem_to_gmem(0)


# --------------------------------------------------------------------------
# 2. plgpu.kernel wrapper
# --------------------------------------------------------------------------
def mosaic_block_sparse(
    q,  # [B, N, H]
    k,  # [NL, B, K, S, H]
    v,  # [NL, B, K, S, H]
    layer,  # int scalar: the layer to read (clamped in the kernel)
    block_indices,  # int32 [B, L] or [B, K, L], raw
    block_counts,  # int32 [B] or [B, K], raw
    token_mask,  # bool [B, S] or None
    *,
    block_size: int,
    sm_scale: float,
    params: BlockSparseParams,
    interpret: bool,
):
    """The Mosaic GPU kernel plus, with several splits, the combine; returns [B, N, H] in q's dtype."""
    num_layers, batch, kv_heads, seq_len, head_dim = k.shape
    num_heads = q.shape[1]
    group = num_heads // kv_heads
    list_len = block_indices.shape[-1]
    dtype = jnp.dtype(k.dtype)
    check_shapes(head_dim=head_dim, block_size=block_size, dtype=dtype)
    block_k, stages = mosaic_tiles(block_size=block_size, head_dim=head_dim, itemsize=dtype.itemsize, params=params)
    k_splits = params.k_splits or default_k_splits(batch=batch, kv_heads=kv_heads, entries=list_len,
                                                   num_cores=1 if interpret else gpu_core_count())
    q_rows = _query_rows(batch, num_heads)
    q2 = q.reshape(batch * num_heads, head_dim)
    if q_rows > q2.shape[0]:  # B*N not a multiple of 8 (see the module docstring)
        q2 = jnp.pad(q2, ((0, q_rows - q2.shape[0]), (0, 0)))

    rows_out = batch * num_heads
    if k_splits == 1:
        out_type = jax.ShapeDtypeStruct((rows_out, head_dim), q.dtype)
        extra_scratch = ()
    else:
        out_type = (jax.ShapeDtypeStruct((k_splits, rows_out, head_dim), jnp.float32),
                    jax.ShapeDtypeStruct((k_splits, batch * kv_heads, ROWS), jnp.float32),
                    jax.ShapeDtypeStruct((k_splits, batch * kv_heads, ROWS), jnp.float32))
        extra_scratch = (plgpu.SMEM((2, ROWS), jnp.float32),)
    scratch = (
        plgpu.SMEM((ROWS, head_dim), dtype, transforms=_swizzled(head_dim, dtype.itemsize)),  # q
        plgpu.SMEM((ROWS, block_k), dtype, transforms=_swizzled(block_k, dtype.itemsize)),  # p
        plgpu.SMEM((ROWS, head_dim), q.dtype if k_splits == 1 else jnp.float32),  # the output tile
        *extra_scratch,
        plgpu.Barrier(num_barriers=1),
    )
    body = functools.partial(
        _kernel, kv_heads=kv_heads, group=group, num_layers=num_layers, num_blocks=seq_len // block_size,
        list_len=list_len, block_size=block_size, block_k=block_k, stages=stages, k_splits=k_splits,
        sm_scale=sm_scale, has_mask=token_mask is not None, shared_list=block_indices.ndim == 2,
        shared_count=block_counts.ndim == 1, q_rows=q_rows, dtype=dtype)
    kernel = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(batch, kv_heads, k_splits),
        grid_names=("b", "h", "split"),
    )
    inputs = [jnp.reshape(layer, (1,)).astype(jnp.int32), block_indices.astype(jnp.int32),
              block_counts.astype(jnp.int32), q2, k, v]
    if token_mask is not None:
        inputs.append(token_mask.astype(jnp.int8))
    if interpret:
        with plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams()):
            outs = kernel(*inputs)
    else:
        outs = kernel(*inputs)
    if k_splits == 1:
        return outs.reshape(batch, num_heads, head_dim)

    o, m, l = outs
    # Row g of (b, h) sits at offset + g of its 64-row m and l: a gather by a constant index.
    pairs = np.arange(batch * kv_heads)
    offsets = _query_tile(pairs * group, q_rows)[1]
    pick = (pairs[:, None] * ROWS + offsets[:, None] + np.arange(group)[None, :]).reshape(-1)
    m = m.reshape(k_splits, -1)[:, pick].reshape(k_splits, batch, kv_heads, group)
    l = l.reshape(k_splits, -1)[:, pick].reshape(k_splits, batch, kv_heads, group)
    o = o.reshape(k_splits, batch, kv_heads, group, head_dim)
    counts = block_counts.astype(jnp.int32)
    counts = jnp.clip(counts if counts.ndim == 2 else counts[:, None] + jnp.zeros((1, kv_heads), jnp.int32),
                      0, min(list_len, seq_len // block_size))
    out = combine_splits(o, m, l, live_splits(counts, k_splits))
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)

