"""Grouped-query attention: the projection module and masked dense attention.

Shapes use the house letters (STYLE.md): B batch, T query length, S key/value
length, N query heads, K KV heads, G = N/K, H head dim, D model dim.

Keys and values are kept in the KV-cache layout [B, K, S, H] on every path
(training forward, prefill and decode), so one attention function serves all
three and a decode attention fn (span policy, Pallas kernel) sees exactly the
layout it reads from the cache.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from selfspan_jax.config import LlamaConfig
from selfspan_jax.layers import apply_rope


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax(q k^T / sqrt(H)) v over the keys where `mask` is True.

    q [B, T, N, H]; k, v [B, K, S, H]; mask bool [B, T, S] (True = visible).
    Returns [B, T, N, H] in q's dtype. A query row with no visible key returns
    zeros, never NaN and never the mean of v (which `jax.nn.dot_product_attention`
    gives): a sequence whose span policy hides everything must not invent context.
    Scores, softmax and the normaliser are fp32 whatever the input dtype.
    """
    B, T, N, H = q.shape
    K = k.shape[1]
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of KV heads K={K}")
    G = N // K
    # qg: [B, T, K, G, H] -- query head n = k * G + g, as HF's repeat_kv orders them
    qg = q.reshape(B, T, K, G, H)
    # scores: [B, K, G, T, S]
    scores = jnp.einsum("btkgh,bksh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(H))
    m = mask[:, None, None, :, :]
    # A finite fill keeps the max finite for empty rows; the where() on p below
    # is what actually removes masked keys (a large negative fill alone leaks
    # weight when a whole row is masked).
    scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    p = jnp.where(m, p, 0.0)
    denom = jnp.sum(p, axis=-1)  # [B, K, G, T]
    # out: [B, K, G, T, H] -- dot_general's own output order: XLA:CPU's DotThunk
    # rejects BF16 x BF16 -> F32 when the einsum output is permuted ("btkgh").
    out = jnp.einsum("bkgts,bksh->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    inv = jnp.where(denom > 0, 1.0 / jnp.where(denom > 0, denom, 1.0), 0.0)
    out = out * inv[..., None]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, N, H).astype(q.dtype)


# fp32 scores of one (query chunk, key chunk) block in `blocked_attention`: small enough to
# stay in cache with its probabilities, large enough that a block's fixed cost is amortised.
PREFILL_BLOCK_BYTES = 16 * 1024 * 1024
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def prefill_chunk(batch: int, heads: int, length: int, block_bytes: int | None = None) -> int:
    """Query/key chunk C of `blocked_attention`: the largest power of two whose [B, N, C, C] fp32
    scores fit `block_bytes` (default PREFILL_BLOCK_BYTES), at least 16, at most the prompt
    rounded up to a power of two."""
    block_bytes = PREFILL_BLOCK_BYTES if block_bytes is None else block_bytes
    chunk = 16
    while chunk < length and batch * heads * (2 * chunk) ** 2 * 4 <= block_bytes:
        chunk *= 2
    return chunk


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask, chunk: int) -> jax.Array:
    """`masked_attention` without the [B, T, S] mask or the [B, N, T, S] scores (prefill, S = T).

    q [B, T, N, H]; k, v [B, K, T, H]; mask: a `prefill_mask` object whose
    `block(q_start, k_start, C, C)` gives bool [B, C, C]. Queries go `chunk` at
    a time (`lax.map`); each reads the key chunks at or before its own
    (`fori_loop`, so causally invisible chunks cost nothing) with an fp32
    online softmax. Same contract as `masked_attention`: a row with nothing
    visible returns zeros. Peak transient memory is one [B, N, C, C] block.
    """
    B, T, N, H = q.shape
    K = k.shape[1]
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of KV heads K={K}")
    G = N // K
    pad = -T % chunk
    num_chunks = (T + pad) // chunk
    # [nc, B, C, K, G, H] and [nc, B, K, C, H]: chunk-major so a loop step indexes the leading axis
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, num_chunks, chunk, K, G, H)
    qc = jnp.moveaxis(qc, 1, 0)
    kc = jnp.moveaxis(jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B, K, num_chunks, chunk, H), 2, 0)
    vc = jnp.moveaxis(jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(B, K, num_chunks, chunk, H), 2, 0)
    scale = 1.0 / math.sqrt(H)

    def query_chunk(c):
        qb = qc[c]

        def key_chunk(j, carry):
            o, m, den = carry  # [B, K, G, C, H], [B, K, G, C], [B, K, G, C]
            vis = mask.block(c * chunk, j * chunk, chunk, chunk)[:, None, None]  # [B, 1, 1, C, C]
            s = jnp.einsum("bckgh,bksh->bkgcs", qb, kc[j], preferred_element_type=jnp.float32) * scale
            s = jnp.where(vis, s, _NEG)
            m_next = jnp.maximum(m, s.max(axis=-1))
            corr = jnp.exp(m - m_next)
            p = jnp.where(vis, jnp.exp(s - m_next[..., None]), 0.0)
            pv = jnp.einsum("bkgcs,bksh->bkgch", p.astype(vc.dtype), vc[j], preferred_element_type=jnp.float32)
            return corr[..., None] * o + pv, m_next, corr * den + p.sum(axis=-1)

        lead = (B, K, G, chunk)
        init = (jnp.zeros(lead + (H,), jnp.float32), jnp.full(lead, _NEG, jnp.float32), jnp.zeros(lead, jnp.float32))
        o, _, den = jax.lax.fori_loop(0, c + 1, key_chunk, init)
        o = jnp.where((den > 0)[..., None], o / jnp.where(den > 0, den, 1.0)[..., None], 0.0)
        # [B, C, N, H]
        return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(B, chunk, N, H).astype(q.dtype)

    # [nc, B, C, N, H] -> [B, T, N, H]
    out = jax.lax.map(query_chunk, jnp.arange(num_chunks, dtype=jnp.int32))
    return jnp.moveaxis(out, 0, 1).reshape(B, num_chunks * chunk, N, H)[:, :T]


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
    """One query per sequence: q [B, N, H]; k, v [B, K, S, H]; visible bool [B, S] -> [B, N, H]."""
    return masked_attention(q[:, None], k, v, visible[:, None, :])[:, 0]


class Attention(nnx.Module):
    """q/k/v/o projections (nnx.Linear, no bias, kernels [in, out]) with RoPE on q and k."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        D, N, K, H = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = N, K, H
        kw = dict(use_bias=False, dtype=config.compute_dtype, param_dtype=config.weight_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(D, N * H, **kw)
        self.k_proj = nnx.Linear(D, K * H, **kw)
        self.v_proj = nnx.Linear(D, K * H, **kw)
        self.o_proj = nnx.Linear(N * H, D, **kw)

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D], cos/sin [B, T, H] -> q [B, T, N, H] (RoPE'd, unscaled), k, v [B, K, T, H]."""
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        return q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    def out(self, o: jax.Array) -> jax.Array:
        """o [B, T, N, H] -> [B, T, D]."""
        B, T = o.shape[:2]
        return self.o_proj(o.reshape(B, T, self.n_heads * self.head_dim))
