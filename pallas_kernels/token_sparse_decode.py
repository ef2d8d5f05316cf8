"""Decode attention over listed cache rows (token-granular reads, for SparQ- and ADORE-style policies).

The block-list kernel reads whole KV blocks; a token-granular policy names
single positions per KV head. This op reads exactly those rows:

    token_sparse_decode(q [B,N,H], k, v [B,K,S,H] (or stacked [L,B,K,S,H] with layer=),
                        token_indices int32 [B,K,T], token_counts int32 [B,K]) -> [B,N,H]

The first `token_counts[b, h]` entries of `token_indices[b, h]` are the
distinct positions KV head h of sequence b attends to (any order); nothing
else reaches the output, and list padding is never read: the Pallas kernel
loads rows under a mask of the live entries (`plgpu.load(..., mask=)`), the
XLA path masks the gathered values before any arithmetic, so a NaN in an
unlisted row cannot leak through 0 * NaN. A head with nothing listed returns
zeros.

Layers, as in block_sparse_decode.py: the Pallas kernel body (one program per
(sequence, KV head, split); each loop step gathers `block_t` listed rows of K
and V by index -- a row gather, which Triton lowers to a pointer-tensor load
rather than the block kernel's contiguous, pipelined tile copy -- and runs the
online softmax over them), the pallas_call wrapper, the validated public
function, the XLA gather path and the masked-dense reference.

Backends: "pallas" (Triton on a GPU), "interpret" (the same kernel in Pallas
interpret mode: tests on the CPU), "xla" (gathers the listed rows; what runs
on the CPU), "reference" (masked dense attention over the whole cache, the
test oracle's twin); "auto" is pallas on a GPU, xla elsewhere; "mosaic" and
"mosaic_interpret" run the Triton kernel and its interpret mode (see
_TOKEN_KERNEL_OF).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import default_k_splits, gpu_core_count, on_gpu, query_rows
from pallas_kernels.block_sparse_decode import _NEG, _compiler_params, _normalise_precision, plgpu, store_partials
from pallas_kernels.splits import combine_splits, live_splits, split_range

TOKEN_BACKENDS = ("auto", "pallas", "interpret", "mosaic", "mosaic_interpret", "xla", "reference")
# The row-gather kernel has no Mosaic GPU version (not built: its rows are single tokens, one TMA
# box each on Hopper): a loop run with backend="mosaic" reads its token lists with the Triton kernel.
_TOKEN_KERNEL_OF = {"mosaic": "pallas", "mosaic_interpret": "interpret"}

# Rows gathered per loop step: Triton's mma needs every dot dimension >= 16.
BLOCK_T = 16


# --------------------------------------------------------------------------
# 1. Kernel body
# --------------------------------------------------------------------------
def token_sparse_decode_kernel(
    layer_ref,  # int32 [1]
    idx_ref,  # int32 [B, K, T]: listed rows, T a multiple of block_t; the first cnt_ref[b, k] are live
    cnt_ref,  # int32 [B, K]
    q_ref,  # [B, K, block_h, H]: the G query heads of each KV head, zero-padded rows
    k_ref,  # [NL, B, K, S, H]
    v_ref,  # [NL, B, K, S, H]
    o_ref,  # f32 [k_splits, B, K, block_h, H]
    m_ref,  # f32 [k_splits, B, K, block_h]
    l_ref,  # f32 [k_splits, B, K, block_h]
    *,
    sm_scale: float,
    block_t: int,
    group: int,
    precision,
):
    b, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k_splits = pl.num_programs(2)
    layer = layer_ref[0]
    block_h, head_dim = q_ref.shape[-2], q_ref.shape[-1]
    count = cnt_ref[b, h]
    # This split's share of the live entries, in whole tiles of block_t rows.
    first, last = split_range((count + block_t - 1) // block_t, split, k_splits)
    num_tiles = jnp.maximum(last - first, 0)
    q = q_ref[b, h, :, :]

    last_tile = idx_ref.shape[-1] // block_t - 1

    def tile_rows(t):
        """[block_t, 1] row ids of this split's tile t; past the array's last tile (the read
        ahead of the last iteration) the tile index is clamped, and those ids are never used."""
        start = pl.multiple_of(jnp.minimum(first + t, last_tile) * block_t, block_t)
        return idx_ref[b, h, pl.ds(start, block_t)][:, None]

    def body(t, carry):
        # The row ids of tile t were read in iteration t - 1, so the gather's addresses do not wait
        # on a load of the same iteration and Triton's pipeliner can double-buffer K and V
        # (docs/notes/kernel.md, "sm_90 compile").
        o_prev, m_prev, l_prev, rows = carry
        rows_next = tile_rows(t + 1)
        start = (first + t) * block_t
        live = start + lax.broadcasted_iota(jnp.int32, (block_t,), 0) < count  # [block_t]
        # A masked gather: padding entries are never loaded (their rows come back 0). Every index is an
        # array (rows x columns), the form both the Triton lowering and interpret mode take.
        cols = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
        load_mask = jnp.broadcast_to(live[:, None], (block_t, head_dim))
        k = plgpu.load(k_ref.at[layer, b, h, rows, cols], mask=load_mask, other=0.0)  # [block_t, H]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * sm_scale
        s = jnp.where(live[None, :], s, _NEG)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.where(live[None, :], jnp.exp(s - m_next[:, None]), 0.0)
        l_next = correction * l_prev + p.sum(axis=-1)
        v = plgpu.load(v_ref.at[layer, b, h, rows, cols], mask=load_mask, other=0.0)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                             preferred_element_type=jnp.float32)
        return correction[:, None] * o_prev + pv, m_next, l_next, rows_next

    o = jnp.zeros((block_h, head_dim), jnp.float32)
    m = jnp.full((block_h,), _NEG, jnp.float32)
    l = jnp.zeros((block_h,), jnp.float32)
    o, m, l, _ = lax.fori_loop(0, num_tiles, body, (o, m, l, tile_rows(jnp.int32(0))))
    store_partials(o_ref, m_ref, l_ref, (split, b, h), o, m, l, group=group, live=last > first)


# --------------------------------------------------------------------------
# 2. pallas_call wrapper
# --------------------------------------------------------------------------
def _pallas_token_sparse(q, k, v, layer, token_indices, token_counts, *, sm_scale: float, precision,
                         interpret: bool, k_splits: int | None = None, num_warps: int = 4, num_stages: int = 3):
    """q [B, K, G, H]; k, v [NL, B, K, S, H] -> f32 [B, K, G, H] over a (B, K, k_splits) grid."""
    batch, kv_heads, group, head_dim = q.shape
    block_h = query_rows(group)
    T = token_indices.shape[-1]
    T_pad = -(-T // BLOCK_T) * BLOCK_T
    # the list padded to whole tiles with row 0; the counts keep the padding from being loaded
    idx = jnp.pad(token_indices.astype(jnp.int32), ((0, 0), (0, 0), (0, T_pad - T)))
    counts = jnp.clip(token_counts.astype(jnp.int32), 0, T)
    if k_splits is None:
        k_splits = default_k_splits(batch=batch, kv_heads=kv_heads, entries=T_pad // BLOCK_T,
                                    num_cores=1 if interpret else gpu_core_count())
    q_pad = jnp.pad(q, ((0, 0), (0, 0), (0, block_h - group), (0, 0)))
    kernel = functools.partial(token_sparse_decode_kernel, sm_scale=sm_scale, block_t=BLOCK_T, group=group,
                               precision=precision)
    split_shape = (k_splits, batch, kv_heads, block_h)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, k_splits),
        out_shape=[
            jax.ShapeDtypeStruct((*split_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(split_shape, jnp.float32),
            jax.ShapeDtypeStruct(split_shape, jnp.float32),
        ],
        compiler_params=None if interpret else _compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"token_sparse_decode_bt{BLOCK_T}_bh{block_h}",
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), idx, counts, q_pad, k, v)
    live = live_splits((counts + BLOCK_T - 1) // BLOCK_T, k_splits)
    return combine_splits(o[..., :group, :], m[..., :group], l[..., :group], live)


# --------------------------------------------------------------------------
# 3. Public function
# --------------------------------------------------------------------------
def _check(q, k, v, token_indices, token_counts, layer, backend) -> str:
    if backend not in TOKEN_BACKENDS:
        raise ValueError(f"token_sparse_decode backend must be one of {TOKEN_BACKENDS}, got {backend!r}")
    backend = _TOKEN_KERNEL_OF.get(backend, backend)
    stacked = layer is not None
    if q.ndim != 3 or k.ndim != 4 + stacked or v.shape != k.shape:
        raise ValueError(f"q must be [B,N,H] and k, v [{'L,' if stacked else ''}B,K,S,H] alike; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    B, N, H = q.shape
    K = k.shape[-3]
    if k.shape[-4] != B or k.shape[-1] != H or N % K:
        raise ValueError(f"q {q.shape} does not fit k {k.shape} (batch, head dim, or N % K)")
    if token_indices.ndim != 3 or token_indices.shape[:2] != (B, K) or token_counts.shape != (B, K):
        raise ValueError(f"token_indices must be [B={B}, K={K}, T] and token_counts [B, K]; got "
                         f"{token_indices.shape} and {token_counts.shape}")
    if backend in ("pallas", "interpret") and (H < 16 or H & (H - 1)):
        raise ValueError(f"head dim H={H} is not supported by the Pallas kernel: Triton tiles need a power of "
                         "two >= 16 (use backend='xla' for this shape)")
    if backend == "auto":
        return "pallas" if on_gpu() else "xla"
    return backend


def token_sparse_decode(q, k, v, token_indices, token_counts, *, sm_scale: float | None = None, layer=None,
                        backend: str = "auto", precision=None):
    """Softmax attention of each query head over the rows its KV head lists (see the module docstring)."""
    backend = _check(q, k, v, token_indices, token_counts, layer, backend)
    if backend == "reference":
        return token_sparse_decode_reference(q, k, v, token_indices, token_counts, sm_scale=sm_scale, layer=layer)
    if backend in ("pallas", "interpret"):
        B, N, H = q.shape
        K = k.shape[-3]
        stacked = k if layer is not None else k[None]
        out = _pallas_token_sparse(q.reshape(B, K, N // K, H), stacked, v if layer is not None else v[None],
                                   jnp.int32(0) if layer is None else layer, token_indices, token_counts,
                                   sm_scale=H ** -0.5 if sm_scale is None else sm_scale,
                                   precision=_normalise_precision(precision),
                                   interpret=backend == "interpret")
        return out.reshape(B, N, H).astype(q.dtype)
    return _token_sparse_decode_xla(q, k, v, token_indices, token_counts, sm_scale=sm_scale, layer=layer)


def _rows(x, layer, b, h, idx):
    """x [.., B, K, S, H] -> the listed rows [B, K, T, H], gathered in place (no per-layer slice copy)."""
    if layer is None:
        return x[b, h, idx]
    return x[layer, b, h, idx]


@jax.jit
def _attend(q, k_rows, v_rows, live, sm_scale):
    B, N, H = q.shape
    K = k_rows.shape[1]
    # [B, K, G, H]
    qg = q.reshape(B, K, N // K, H).astype(jnp.float32)
    k_rows = jnp.where(live[..., None], k_rows.astype(jnp.float32), 0.0)
    v_rows = jnp.where(live[..., None], v_rows.astype(jnp.float32), 0.0)
    # [B, K, G, T]
    s = jnp.einsum("bkgh,bkth->bkgt", qg, k_rows) * sm_scale
    s = jnp.where(live[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(live[:, :, None, :], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgt,bkth->bkgh", p, v_rows) / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(B, N, H).astype(q.dtype)


# --------------------------------------------------------------------------
# 4. XLA gather path and reference
# --------------------------------------------------------------------------
def _token_sparse_decode_xla(q, k, v, token_indices, token_counts, *, sm_scale, layer):
    B, N, H = q.shape
    K, S = k.shape[-3], k.shape[-2]
    T = token_indices.shape[-1]
    scale = H ** -0.5 if sm_scale is None else sm_scale
    live = jnp.arange(T)[None, None, :] < token_counts[..., None]
    # padding entries point at row 0 (and are masked); listed ids are clamped into the cache
    idx = jnp.where(live, jnp.clip(token_indices, 0, S - 1), 0)
    b = jnp.arange(B)[:, None, None]
    h = jnp.arange(K)[None, :, None]
    return _attend(q, _rows(k, layer, b, h, idx), _rows(v, layer, b, h, idx), live, scale)


def token_sparse_decode_reference(q, k, v, token_indices, token_counts, *, sm_scale=None, layer=None):
    """Masked dense attention over the whole cache, the mask scattered from the lists (float32)."""
    if layer is not None:
        k, v = k[layer], v[layer]
    B, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    T = token_indices.shape[-1]
    scale = H ** -0.5 if sm_scale is None else sm_scale
    live = jnp.arange(T)[None, None, :] < token_counts[..., None]
    # [B, K, S]
    mask = jnp.zeros((B, K, S), bool).at[jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None],
                                         jnp.clip(token_indices, 0, S - 1)].max(live)
    qg = q.reshape(B, K, N // K, H).astype(jnp.float32)
    kf = jnp.where(mask[..., None], k.astype(jnp.float32), 0.0)
    vf = jnp.where(mask[..., None], v.astype(jnp.float32), 0.0)
    s = jnp.where(mask[:, :, None, :], jnp.einsum("bkgh,bksh->bkgs", qg, kf) * scale, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask[:, :, None, :], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgs,bksh->bkgh", p, vf) / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(B, N, H).astype(q.dtype)
