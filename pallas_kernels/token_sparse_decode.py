"""Decode attention over listed cache rows (token-granular reads, for SparQ-style policies).

The block-list kernel reads whole KV blocks; a token-granular policy names
single positions per KV head. This op reads exactly those rows:

    token_sparse_decode(q [B,N,H], k, v [B,K,S,H] (or stacked [L,B,K,S,H] with layer=),
                        token_indices int32 [B,K,T], token_counts int32 [B,K]) -> [B,N,H]

The first `token_counts[b, h]` entries of `token_indices[b, h]` are the
distinct positions KV head h of sequence b attends to (any order); nothing
else reaches the output: list padding is masked on the gathered values
before any arithmetic, so a NaN in an unlisted row cannot leak through
0 * NaN. A head with nothing listed returns zeros.

Backends: "xla" gathers the listed rows (what runs on the CPU and is the
only path that reads only them); "reference" is masked dense attention over
the whole cache (the test oracle's twin). There is no Pallas/Triton variant
yet: "pallas" and "interpret" raise a ValueError that says so, and "auto"
resolves to "xla" on every device (docs/design-notes.md, open items).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOKEN_BACKENDS = ("auto", "xla", "reference")


def _check(q, k, v, token_indices, token_counts, layer, backend) -> str:
    if backend not in TOKEN_BACKENDS:
        raise ValueError(f"token_sparse_decode backend must be one of {TOKEN_BACKENDS} (no Pallas token-list "
                         f"kernel yet), got {backend!r}")
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
    return "xla" if backend == "auto" else backend


def token_sparse_decode(q, k, v, token_indices, token_counts, *, sm_scale: float | None = None, layer=None,
                        backend: str = "auto"):
    """Softmax attention of each query head over the rows its KV head lists (see the module docstring)."""
    backend = _check(q, k, v, token_indices, token_counts, layer, backend)
    if backend == "reference":
        return token_sparse_decode_reference(q, k, v, token_indices, token_counts, sm_scale=sm_scale, layer=layer)
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
