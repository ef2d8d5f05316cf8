"""Block-sparse decode attention: attend one query token to a list of KV blocks.

Four layers, in this order (STYLE.md): the Pallas kernel body, the pallas_call
wrapper that builds the grid, the public function that validates and dispatches
to a backend, and the plain-jnp reference (test oracle and fallback). The XLA
gather path for CPUs lives in block_sparse_decode_xla.py; backend choice and
tile parameters in backend.py.

Shapes use the house letters: B batch, N query heads, K KV heads, G = N/K,
H head dim, S cache length, L length of a block list (entries, padded),
NB = S // block_size blocks in the cache.

Semantics (docs/spec.md §3): the query of (b, n) sees token s iff the block
s // block_size is among the first block_counts[b(, k)] entries of
block_indices[b(, k)], and token_mask[b, s] when a mask is given. The result is
softmax attention over exactly those tokens; a row that sees nothing is zero.
Listed blocks must be distinct: eager calls raise ValueError for a repeat; under
jit a repeated block counts once per listing in every backend (the reference
weights it so). Nothing after block_counts[b(, k)] is read, nor any block that is
not listed, so NaN or inf there never reaches the output; with a token_mask,
masked positions inside listed blocks are zeroed before p @ V, so they cannot
either.

Why one file of ~510 lines: jax's Pallas ops keep one op in one file, in four
layers (kernel body, pallas_call wrapper, validated public function, plain-jnp
reference); the XLA path is its own file.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import MOSAIC_BACKENDS, BlockSparseParams, gpu_core_count, resolve_backend
from pallas_kernels.block_sparse_decode_mosaic import check_shapes as check_mosaic_shapes
from pallas_kernels.block_sparse_decode_mosaic import mosaic_block_sparse
from pallas_kernels.splits import NEG, combine_splits, live_splits, split_range

try:  # the Triton backend of Pallas; absent from some CPU-only jaxlib builds
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover - every jaxlib we support ships it
    plgpu = None

_NEG = NEG  # (splits.py says why it is finite)

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


# --------------------------------------------------------------------------
# 1. Kernel body
# --------------------------------------------------------------------------
def block_sparse_decode_kernel(
    layer_ref,  # int32 [1]: the layer of the stacked cache to read
    idx_ref,  # int32 [B, K, L]: active block ids, the first cnt_ref[b, k] are live
    cnt_ref,  # int32 [B, K]
    q_ref,  # [B, K, block_h, H]: the G query heads of each KV head, zero-padded rows
    k_ref,  # [NL, B, K, S, H]: the whole stacked cache; read only at listed blocks of one layer
    v_ref,  # [NL, B, K, S, H]
    *refs,  # [mask_ref int8 [B, S]], o_ref f32 [k_splits, B, K, block_h, H], m_ref, l_ref f32 [k_splits, B, K, block_h]
    sm_scale: float,
    block_size: int,
    block_k: int,
    group: int,
    has_mask: bool,
    precision,
):
    if has_mask:
        mask_ref, o_ref, m_ref, l_ref = refs
    else:
        mask_ref = None
        o_ref, m_ref, l_ref = refs
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k_splits = pl.num_programs(2)
    layer = layer_ref[0]
    block_h, head_dim = q_ref.shape[-2], q_ref.shape[-1]

    # This split's contiguous share of the live entries (split_range).
    count = cnt_ref[b, h]
    first, last = split_range(count, split, k_splits)
    tiles_per_block = block_size // block_k
    num_tiles = jnp.maximum(last - first, 0) * tiles_per_block

    # [block_h, H]; stays in registers for the whole loop.
    q = q_ref[b, h, :, :]

    def tile_start(t):
        """Cache offset of this split's tile t. Past the split's last tile (the read ahead of the
        last iteration, or an empty split) the entry is clamped to a live one, so the list's
        padding is never read; that value is never used."""
        sub = jnp.int32(tiles_per_block)
        # lax.div/rem, not // and %: t >= 0, and jnp's floor-mod sign fix-up
        # does not lower on Triton.
        entry = jnp.minimum(first + lax.div(t, sub), jnp.maximum(last - 1, 0))
        blk = idx_ref[b, h, entry]
        if tiles_per_block == 1:
            return pl.multiple_of(blk * block_size, block_size)
        return pl.multiple_of(blk * block_size + lax.rem(t, sub) * block_k, block_k)

    def tile_keep(start):
        # int8 mask row of the tile, read as a plain load (too narrow for an async copy)
        return mask_ref[b, pl.ds(start, block_k)]

    def body(t, carry):
        # The block id (and mask row) of tile t were read in iteration t - 1: an address that
        # depends on a load in the same iteration leaves Triton's pipeliner one K/V buffer
        # and a wait for every copy (docs/notes/kernel.md, "sm_90 compile").
        o_prev, m_prev, l_prev, start, *keep = carry  # keep: [] or [the int8 mask row of tile t]
        start_next = tile_start(t + 1)
        # One indexer on the whole-array ref: Triton lowering rejects chained
        # `.at[...][...]` indexers (docs/spec.md §4).
        k = k_ref[layer, b, h, pl.ds(start, block_k), :]  # [block_k, H]
        # [block_h, block_k]
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        s = s * sm_scale
        if has_mask:
            visible = keep[0] != 0  # [block_k]
            s = jnp.where(visible[None, :], s, _NEG)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        correction = jnp.exp(m_prev - m_next)  # [block_h]
        p = jnp.exp(s - m_next[:, None])  # [block_h, block_k]
        if has_mask:
            p = jnp.where(visible[None, :], p, 0.0)
        l_next = correction * l_prev + p.sum(axis=-1)
        v = v_ref[layer, b, h, pl.ds(start, block_k), :]  # [block_k, H]
        if has_mask:
            # p is 0 at masked tokens, but 0 * NaN is NaN: zero their V too (the contract: a
            # masked position never reaches the output; cost in docs/notes/kernel.md)
            v = jnp.where(visible[:, None], v, jnp.zeros_like(v))
        # [block_h, H]; p goes to the cache dtype so bf16 caches use the bf16 mma.
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        ahead = (tile_keep(start_next),) if has_mask else ()
        return (correction[:, None] * o_prev + pv, m_next, l_next, start_next, *ahead)

    o = jnp.zeros((block_h, head_dim), jnp.float32)
    m = jnp.full((block_h,), _NEG, jnp.float32)
    l = jnp.zeros((block_h,), jnp.float32)
    start0 = tile_start(jnp.int32(0))
    ahead = (tile_keep(start0),) if has_mask else ()
    o, m, l, *_ = lax.fori_loop(0, num_tiles, body, (o, m, l, start0, *ahead))

    store_partials(o_ref, m_ref, l_ref, (split, b, h), o, m, l, group=group, live=last > first)


def store_partials(o_ref, m_ref, l_ref, at, o, m, l, *, group: int, live):
    """Writes a split's unnormalised partials, only the `group` real query rows, and only when
    the split read something: padded rows and empty splits cost no bytes (the combine masks
    them with `live_splits` and reads rows :group)."""
    block_h = o.shape[0]
    real = lax.broadcasted_iota(jnp.int32, (block_h,), 0) < group

    @pl.when(live)
    def _():
        plgpu.store(o_ref.at[(*at, slice(None), slice(None))], o, mask=jnp.broadcast_to(real[:, None], o.shape))
        plgpu.store(m_ref.at[(*at, slice(None))], m, mask=real)
        plgpu.store(l_ref.at[(*at, slice(None))], l, mask=real)


# --------------------------------------------------------------------------
# 2. pallas_call wrapper
# --------------------------------------------------------------------------
def _compiler_params(num_warps: int, num_stages: int):
    # jax <= 0.6 named it TritonCompilerParams; 0.11 and 0.12 call it CompilerParams.
    cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    return cls(num_warps=num_warps, num_stages=num_stages)


def _pallas_block_sparse(
    q,  # [B, K, G, H]
    k,  # [NL, B, K, S, H]: stacked cache (NL = 1 for a single layer)
    v,  # [NL, B, K, S, H]
    layer,  # int32 scalar: the layer of k, v to read
    block_indices,  # int32 [B, K, L]
    block_counts,  # int32 [B, K]
    token_mask,  # bool [B, S] or None
    *,
    block_size: int,
    sm_scale: float,
    params: BlockSparseParams,
    precision,
    interpret: bool,
):
    """Runs the kernel over a (B, K, k_splits) grid and combines the splits; returns f32 [B, K, G, H]."""
    group = q.shape[2]
    o, m, l, live = _pallas_partials(q, k, v, layer, block_indices, block_counts, token_mask, block_size=block_size,
                                     sm_scale=sm_scale, params=params, precision=precision, interpret=interpret)
    # Only the G real rows of the splits that read something were written; read only those rows.
    return combine_splits(o[..., :group, :], m[..., :group], l[..., :group], live)


def _pallas_partials(q, k, v, layer, block_indices, block_counts, token_mask, *, block_size, sm_scale, params,
                     precision, interpret):
    """The pallas_call alone: per-split partials o f32 [k_splits, B, K, block_h, H], m, l [k_splits, B, K,
    block_h] (rows past G are padding, never written) and live bool [k_splits, B, K] (which splits
    wrote). Separate from the combine so the GPU bench can time the kernel without the XLA ops around
    it (benchmarks/kernel_fixed_cost.py)."""
    batch, kv_heads, group, head_dim = q.shape
    num_cores = 1 if interpret else gpu_core_count()
    p = params.resolve(
        group_size=group,
        batch=batch,
        kv_heads=kv_heads,
        list_len=block_indices.shape[-1],
        block_size=block_size,
        head_dim=head_dim,
        itemsize=jnp.dtype(k.dtype).itemsize,
        num_cores=num_cores,
    )
    # [B, K, block_h, H]: Triton's mma needs >= 16 rows; padded rows attend
    # with q = 0 and are dropped below.
    q_pad = jnp.pad(q, ((0, 0), (0, 0), (0, p.block_h - group), (0, 0)))
    # The layer is an ordinary input (no scalar prefetch on Triton, docs/spec.md
    # §4) so one compiled kernel serves every layer of the stacked cache.
    inputs = [jnp.reshape(layer, (1,)).astype(jnp.int32), block_indices, block_counts, q_pad, k, v]
    if token_mask is not None:
        # int8 rather than bool: i1 tensors in global memory are awkward in Triton.
        inputs.append(token_mask.astype(jnp.int8))

    kernel = functools.partial(
        block_sparse_decode_kernel,
        sm_scale=sm_scale,
        block_size=block_size,
        block_k=p.block_k,
        group=group,
        has_mask=token_mask is not None,
        precision=precision,
    )
    split_shape = (p.k_splits, batch, kv_heads, p.block_h)
    # No BlockSpecs: every ref is the whole array, so nothing copies the cache
    # per program (and interpret mode does not materialise per-program copies).
    o, m, l = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, p.k_splits),
        out_shape=[
            jax.ShapeDtypeStruct((*split_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(split_shape, jnp.float32),
            jax.ShapeDtypeStruct(split_shape, jnp.float32),
        ],
        compiler_params=None if interpret else _compiler_params(p.num_warps, p.num_stages),
        interpret=interpret,
        name=f"block_sparse_decode_bs{block_size}_bk{p.block_k}_bh{p.block_h}",
    )(*inputs)
    return o, m, l, live_splits(block_counts, p.k_splits)


# --------------------------------------------------------------------------
# 3. Public function
# --------------------------------------------------------------------------
def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _validate_layer(k, v, layer):
    """Checks a stacked cache k, v [NL, B, K, S, H] and its layer; returns per-layer shape stand-ins."""
    if k.ndim != 5:
        raise ValueError(f"k must be the stacked cache [NL, B, K, S, H] when layer is given, got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {v.shape} != k shape {k.shape}")
    layer_arr = jnp.asarray(layer) if not isinstance(layer, (int, np.integer)) else None
    if layer_arr is not None and (layer_arr.shape != () or not jnp.issubdtype(layer_arr.dtype, jnp.integer)):
        raise ValueError(f"layer must be an int or an integer scalar, got {layer!r}")
    if _is_concrete(layer):
        value = int(layer)
        if not 0 <= value < k.shape[0]:
            raise ValueError(f"layer={value} outside [0, NL={k.shape[0]})")
    # _validate reads only shape, ndim and dtype of the per-layer arrays.
    return jax.ShapeDtypeStruct(k.shape[1:], k.dtype), jax.ShapeDtypeStruct(v.shape[1:], v.dtype)


def _validate(q, k, v, block_indices, block_counts, token_mask, block_size, backend):
    """Raises ValueError naming the offending argument; returns (B, N, K, S, H, L)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [B, N, H], got shape {q.shape}")
    if len(k.shape) != 4:
        raise ValueError(f"k must be [B, K, S, H] (or [NL, B, K, S, H] with layer=), got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {v.shape} != k shape {k.shape}")
    batch, num_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k shape {k.shape} does not match q shape {q.shape} (batch and head dim)")
    kv_heads, seq_len = k.shape[1], k.shape[2]
    if num_heads % kv_heads:
        raise ValueError(f"query heads N={num_heads} not a multiple of KV heads K={kv_heads}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} not supported (float32, bfloat16, float16)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if seq_len % block_size:
        raise ValueError(f"cache length S={seq_len} not a multiple of block_size={block_size}")
    if backend in MOSAIC_BACKENDS:
        check_mosaic_shapes(head_dim=head_dim, block_size=block_size, dtype=k.dtype)
    if backend in ("pallas", "interpret"):
        # Triton's mma needs every dot dimension >= 16.
        if block_size < 16:
            raise ValueError(f"block_size={block_size} < 16 is not supported by the Pallas kernel")
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"head dim H={head_dim} is not supported by the Pallas kernel: Triton tiles need a "
                             "power of two >= 16 (use backend='xla' for this shape)")

    if block_indices.ndim == 2:
        expected = (batch,)
    elif block_indices.ndim == 3:
        expected = (batch, kv_heads)
    else:
        raise ValueError(f"block_indices must be [B, L] or [B, K, L], got shape {block_indices.shape}")
    if block_indices.shape[:-1] != expected:
        raise ValueError(f"block_indices shape {block_indices.shape} does not match B={batch}, K={kv_heads}")
    if not jnp.issubdtype(block_indices.dtype, jnp.integer):
        raise ValueError(f"block_indices dtype must be integer, got {block_indices.dtype}")
    if block_counts.shape not in ((batch,), (batch, kv_heads)):
        raise ValueError(f"block_counts shape {block_counts.shape} must be [B]=({batch},) or [B, K]=({batch}, {kv_heads})")
    if block_counts.shape == (batch, kv_heads) and block_indices.ndim == 2 and kv_heads > 1:
        raise ValueError(f"block_counts shape {block_counts.shape} is per KV head but block_indices {block_indices.shape} is shared")
    if not jnp.issubdtype(block_counts.dtype, jnp.integer):
        raise ValueError(f"block_counts dtype must be integer, got {block_counts.dtype}")
    if token_mask is not None:
        if token_mask.shape != (batch, seq_len):
            raise ValueError(f"token_mask shape {token_mask.shape} must be [B, S]=({batch}, {seq_len})")
        if token_mask.dtype != jnp.bool_:
            raise ValueError(f"token_mask dtype must be bool, got {token_mask.dtype}")

    list_len = block_indices.shape[-1]
    num_blocks = seq_len // block_size
    # Value checks only where the values exist (eager calls); under jit the
    # wrapper clamps instead, so a bad list can never read outside the cache.
    if _is_concrete(block_counts):
        counts = np.asarray(block_counts)
        if counts.size and (counts.min() < 0 or counts.max() > min(list_len, num_blocks)):
            raise ValueError(
                f"block_counts must lie in [0, min(L={list_len}, NB={num_blocks})], got range [{counts.min()}, {counts.max()}]"
            )
        if _is_concrete(block_indices) and counts.size:
            idx = np.asarray(block_indices)
            idx = idx if idx.ndim == 3 else idx[:, None, :]  # [B, K or 1, L]
            counts = counts if counts.ndim == 2 else counts[:, None]  # [B, K or 1]
            live = np.arange(list_len) < counts[..., None]
            bad = live & ((idx < 0) | (idx >= num_blocks))
            if bad.any():
                raise ValueError(f"block_indices has live entries outside [0, NB={num_blocks}): {idx[bad][:5].tolist()}")
            for pos in np.ndindex(*counts.shape):
                values, times = np.unique(idx[pos][: counts[pos]], return_counts=True)
                if (times > 1).any():
                    repeated = values[times > 1][:5].tolist()
                    raise ValueError(f"block_indices{list(pos)} lists block(s) {repeated} more than once among its "
                                     "live entries; each block may be listed once")
    return batch, num_heads, kv_heads, seq_len, head_dim, list_len


def _normalise_precision(precision):
    if precision is None or isinstance(precision, lax.Precision):
        return precision
    if isinstance(precision, str):
        try:
            return lax.Precision(precision)
        except ValueError:
            pass
    raise ValueError(f"precision must be None, a lax.Precision or its name, got {precision!r}")


def block_sparse_decode(
    q,
    k,
    v,
    block_indices,
    block_counts,
    token_mask=None,
    *,
    block_size: int,
    backend: str = "auto",
    sm_scale: float | None = None,
    k_splits: int | None = None,
    precision=None,
    params: BlockSparseParams | None = None,
    layer=None,
):
    """Decode attention over the listed KV blocks only.

    Args:
      q: [B, N, H] one query token per sequence (not pre-scaled).
      k, v: [B, K, S, H] KV cache, N % K == 0 (grouped-query attention); with
        `layer`, the model's stacked cache [NL, B, K, S, H].
      block_indices: int [B, L] (shared by all KV heads) or [B, K, L]; the
        first block_counts entries are the live, distinct block ids in any order.
      block_counts: int [B] or [B, K] (a [B] count applies to every head).
      token_mask: optional bool [B, S]; False removes single tokens.
      block_size: tokens per block; S % block_size == 0.
      backend: "auto" (pallas on GPU, xla elsewhere), "pallas" (Triton),
        "interpret" (the same kernel in interpret mode), "mosaic" (Mosaic GPU:
        TMA + wgmma, 16-bit caches, one launch per call), "mosaic_interpret"
        (that kernel in the GPU interpreter, on the CPU), "xla" (gather of the
        live blocks), "reference" (masked dense attention over the whole cache).
      sm_scale: softmax scale, default 1/sqrt(H).
      k_splits: programs per (batch, KV head) in the Pallas kernel (auto if None).
      precision: dot precision; None is the backend default (tf32 for float32
        on a GPU), "highest" asks for full float32. The Mosaic kernel takes
        16-bit caches only, whose wgmma has one precision: it ignores this.
      params: tile/split parameters of the Pallas kernels (backend.BlockSparseParams; the
        Mosaic kernel reads block_k, k_splits and num_stages only).
      layer: None, or an int / int32 scalar: attend to layer `layer` of the
        stacked k, v, read in place. Every backend indexes the stack itself
        because a caller's `k[layer]` is a slice that XLA copies whole before
        the kernel, every call (docs/notes/generation.md). Eager calls raise
        ValueError for a layer outside [0, NL); under jit it is clamped.

    Returns:
      [B, N, H] in q's dtype; rows that see no token are 0.

    Under jit the value checks are skipped and out-of-range counts/ids are
    clamped; eager calls raise ValueError for them.
    """
    backend = resolve_backend(backend)
    if layer is None:
        _validate(q, k, v, block_indices, block_counts, token_mask, block_size, backend)
        # A unit stack: one code path below; the reshape is a bitcast, no copy.
        k, v, layer = k[None], v[None], 0
    else:
        k_one, v_one = _validate_layer(k, v, layer)
        _validate(q, k_one, v_one, block_indices, block_counts, token_mask, block_size, backend)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(q.shape[-1])
    params = params or BlockSparseParams()
    if backend not in ("pallas", "interpret", *MOSAIC_BACKENDS):
        params = BlockSparseParams()  # unused there; keeps one jit cache entry
    elif k_splits is not None:
        params = BlockSparseParams(params.block_h, params.block_k, k_splits, params.num_warps, params.num_stages)
    return _block_sparse_decode_jit(
        q,
        k,
        v,
        jnp.asarray(layer, jnp.int32),
        block_indices,
        block_counts,
        token_mask,
        block_size=int(block_size),
        backend=backend,
        sm_scale=float(sm_scale),
        precision=_normalise_precision(precision),
        params=params,
    )


@functools.partial(jax.jit, static_argnames=("block_size", "backend", "sm_scale", "precision", "params"))
def _block_sparse_decode_jit(q, k, v, layer, block_indices, block_counts, token_mask, *, block_size, backend, sm_scale,
                             precision, params):
    # k, v [NL, B, K, S, H]; layer int32 scalar (a traced value: one program
    # serves every layer).
    from pallas_kernels.block_sparse_decode_xla import block_sparse_decode_xla

    if backend in MOSAIC_BACKENDS:
        # The raw lists, counts and layer go to the kernel, which clamps them itself: no XLA op
        # runs before it (block_sparse_decode_mosaic.py).
        if block_indices.shape[-1] == 0:
            return jnp.zeros_like(q)
        return mosaic_block_sparse(q, k, v, layer, block_indices, block_counts, token_mask, block_size=block_size,
                                   sm_scale=sm_scale, params=params, interpret=backend == "mosaic_interpret")

    batch, num_heads, head_dim = q.shape
    kv_heads, seq_len = k.shape[2], k.shape[3]
    layer = jnp.clip(layer, 0, k.shape[0] - 1)
    num_blocks = seq_len // block_size
    # [B, K, L] and [B, K]: shared lists become per-head views (int32, tiny).
    idx = block_indices.astype(jnp.int32)
    if idx.ndim == 2:
        idx = jnp.broadcast_to(idx[:, None, :], (batch, kv_heads, idx.shape[-1]))
    list_len = idx.shape[-1]
    cnt = block_counts.astype(jnp.int32)
    if cnt.ndim == 1:
        cnt = jnp.broadcast_to(cnt[:, None], (batch, kv_heads))
    cnt = jnp.clip(cnt, 0, min(list_len, num_blocks))
    idx = jnp.clip(idx, 0, num_blocks - 1)
    if list_len == 0:
        return jnp.zeros_like(q)

    # [B, K, G, H]
    qg = q.reshape(batch, kv_heads, num_heads // kv_heads, head_dim)
    if backend in ("pallas", "interpret"):
        out = _pallas_block_sparse(
            qg,
            k,
            v,
            layer,
            idx,
            cnt,
            token_mask,
            block_size=block_size,
            sm_scale=sm_scale,
            params=params,
            precision=precision,
            interpret=backend == "interpret",
        )
    elif backend == "xla":
        out = block_sparse_decode_xla(qg, k, v, idx, cnt, token_mask, block_size=block_size, sm_scale=sm_scale,
                                      precision=precision, layer=layer)
    else:
        # The oracle indexes then computes: clarity over speed.
        k1, v1 = (lax.dynamic_index_in_dim(x, layer, axis=0, keepdims=False) for x in (k, v))
        out = _reference_grouped(qg, k1, v1, idx, cnt, token_mask, block_size=block_size, sm_scale=sm_scale,
                                 precision=precision)
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)


# --------------------------------------------------------------------------
# 4. Reference
# --------------------------------------------------------------------------
def masked_attention(q, k, v, visible, *, sm_scale, precision, weight=None):
    """Softmax attention of grouped queries over keys with a visibility mask.

    q [B, K, G, H]; k, v [B, K, S, H]; visible bool [B, K, S] -> f32 [B, K, G, H].
    Rows with nothing visible are 0 (unlike jax.nn.dot_product_attention,
    which returns the mean of v for them). Values at invisible positions never
    reach the output, NaN included. weight: optional [B, K, S] multiplicity of
    each position (a block listed twice counts twice, as the kernels do).
    """
    # [B, K, G, S]
    s = jnp.einsum("bkgh,bksh->bkgs", q, k, precision=precision, preferred_element_type=jnp.float32) * sm_scale
    vis = visible[:, :, None, :]
    s = jnp.where(vis, s, _NEG)
    v = jnp.where(visible[..., None], v, 0)
    m = s.max(axis=-1, keepdims=True)
    p = jnp.where(vis, jnp.exp(s - m), 0.0)
    if weight is not None:
        p = p * weight[:, :, None, :]
    l = p.sum(axis=-1)  # [B, K, G]
    # [B, K, G, H]
    o = jnp.einsum("bkgs,bksh->bkgh", p.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32)
    safe = jnp.where(l > 0, l, 1.0)
    return jnp.where((l > 0)[..., None], o / safe[..., None], 0.0)


def listed_times(block_indices, block_counts, *, block_size, seq_len):
    """How many live entries list each token's block: int [B, K, L], [B, K] -> int32 [B, K, S]."""
    num_blocks = seq_len // block_size
    live = jnp.arange(block_indices.shape[-1]) < block_counts[..., None]  # [B, K, L]
    # [B, K, NB]: scatter-add of the live ids (O(L), no [L, NB] one-hot).
    scatter = lambda ids, on: jnp.zeros((num_blocks,), jnp.int32).at[ids].add(on.astype(jnp.int32), mode="drop")
    return jnp.repeat(jax.vmap(jax.vmap(scatter))(block_indices, live), block_size, axis=-1)


def _reference_grouped(q, k, v, idx, cnt, token_mask, *, block_size, sm_scale, precision):
    times = listed_times(idx, cnt, block_size=block_size, seq_len=k.shape[2])
    vis = times > 0
    if token_mask is not None:
        vis = vis & token_mask[:, None, :]
    # The oracle always runs its dots at full float32 precision. A block listed twice counts
    # twice, as in the kernels (eager calls refuse repeats; under jit they are not checked).
    return masked_attention(q, k, v, vis, sm_scale=sm_scale, precision=precision or lax.Precision.HIGHEST,
                            weight=times.astype(jnp.float32))


def block_sparse_decode_reference(
    q, k, v, block_indices, block_counts, token_mask=None, *, block_size: int, sm_scale: float | None = None, layer=None
):
    """Masked dense attention over the whole cache; same contract as block_sparse_decode."""
    return block_sparse_decode(
        q, k, v, block_indices, block_counts, token_mask, block_size=block_size, backend="reference", sm_scale=sm_scale,
        layer=layer,
    )
