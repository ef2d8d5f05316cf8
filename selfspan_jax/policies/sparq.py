"""SparQ Attention: top-r query components pick the top-k tokens (training-free, token-granular)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from selfspan_jax.policies.base import DecodeOnlyPolicy, check_positive_int
from selfspan_jax.selection import Selection, dense_selection


@struct.dataclass
class SparQState:
    """vsum: f32 [L, B, K, H]: sum of the V rows written so far (the mean-V reallocation keeps it
    incrementally instead of rereading the cache).
    kt: [L, B, K, H, S] (cache dtype) with `component_major`: the second, component-major copy of K
    whose r rows the approximate scores read contiguously; else None."""

    vsum: jax.Array
    kt: Any = None


@dataclasses.dataclass(frozen=True)
class SparQPolicy(DecodeOnlyPolicy):
    """SparQ Attention (Ribar et al., arXiv 2312.04985): training-free, query-aware, token-granular.

    For the query at position t, per KV head: i_r = the r largest components
    of |q| (summed over the head's query group); approximate scores
    s_hat = softmax_j<=t(q[i_r] . K[j, i_r] / sqrt(H * sum|q[i_r]| / sum|q|));
    k positions are read: the local window t-local_window+1..t and the top of
    s_hat (summed over the group) for the rest, or all of 0..t when t+1 <= k;
    y = exact softmax attention over them. With `reallocate_mean`, output =
    alpha * y + (1 - alpha) * mean(V[0..t]), alpha = sum of s_hat over the
    selected positions (per query head); the V sum is kept incrementally.

    What it reads per KV head and step (the paper's count): r/H of the K rows
    0..t (the r components) plus k rows of K and k of V (`rows_read`). With
    `component_major`, the policy keeps the paper's second copy of K laid out
    [H, S] per head (`SparQState.kt`, written through the observe hooks: the
    prompt's keys once, then one key per layer per step), so the r components
    are r contiguous rows instead of a strided gather from the row-major
    cache; it costs a second K cache of memory, as in the paper. It lives in
    the policy's state rather than in `KVCache` because only SparQ reads it
    and the hooks already see every key as it is written. Prefill is dense
    causal.

    The defaults are the paper's 1/8 setting at head dim 128: r = 16, k = 64, a local window of
    min(16, k).
    """

    r: int = 16
    k: int = 64
    local_window: int | None = None
    reallocate_mean: bool = True
    component_major: bool = False

    name: ClassVar[str] = "sparq"
    query_aware: ClassVar[bool] = True

    def __post_init__(self):
        check_positive_int("r", self.r)
        check_positive_int("k", self.k)
        if self.local_window is None:
            object.__setattr__(self, "local_window", min(16, self.k))
        check_positive_int("local_window", self.local_window, 0)
        if self.local_window > self.k:
            raise ValueError(f"local_window {self.local_window} exceeds k {self.k} (the window is part of the k)")
        for name in ("reallocate_mean", "component_major"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def check_model(self, config):
        if self.r > config.head_dim:
            raise ValueError(f"r={self.r} exceeds the head dim {config.head_dim}")

    def observe_prefill(self, state, cache, lengths, *, block_size):
        S = cache.v.shape[3]
        # [1, B, 1, S, 1]
        valid = (jnp.arange(S)[None, :] < lengths[:, None])[None, :, None, :, None]
        kt = jnp.swapaxes(cache.k, -1, -2) if self.component_major else None
        return SparQState(jnp.sum(jnp.where(valid, cache.v.astype(jnp.float32), 0.0), axis=3), kt)

    def observe_step(self, state, cache, positions, *, block_size, selections=()):
        b = jnp.arange(positions.shape[0])
        # cache.v[:, b, :, positions[b], :] is [B, L, K, H]: advanced indices split by a slice go first
        new = jnp.swapaxes(cache.v[:, b, :, positions, :].astype(jnp.float32), 0, 1)  # -> [L, B, K, H]
        kt = state.kt
        if kt is not None:  # kt[:, b, :, :, positions[b]] is [B, L, K, H] by the same rule
            kt = kt.at[:, b, :, :, positions].set(cache.k[:, b, :, positions, :])
        return SparQState(state.vsum + new, kt)

    def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
        B, N, H = q.shape
        K, S = k.shape[1], cache_len
        G = N // K
        if self.r > H:
            raise ValueError(f"r={self.r} exceeds the head dim {H}")
        pos = lengths.astype(jnp.int32)
        # [B, K, G, H]
        qg = q.astype(jnp.float32).reshape(B, K, G, H)
        # [B, K, r]: the r largest components of |q|, shared by the group
        _, i_r = jax.lax.top_k(jnp.sum(jnp.abs(qg), axis=2), self.r)
        # [B, K, G, r]; k_r [B, K, S, r] from the row-major cache or [B, K, r, S] from the copy
        q_r = jnp.take_along_axis(qg, i_r[:, :, None, :], axis=-1)
        if state.kt is None:  # gather the r columns from the row-major cache (cast below: only them)
            k_r = jnp.take_along_axis(k, i_r[:, :, None, :], axis=-1)
        else:  # r contiguous rows of the component-major copy; the query's own key is not in it yet
            rows = jnp.take_along_axis(state.kt[layer_idx], i_r[..., None], axis=2)  # [B, K, r, S]
            own = jnp.take_along_axis(k[jnp.arange(B), :, pos, :], i_r, axis=-1)  # [B, K, r]
            k_r = jnp.where((jnp.arange(S) == pos[:, None])[:, None, None, :], own[..., None], rows)
        # [B, K, G]: SparQ's scale replaces 1/sqrt(H)
        scale = jnp.sqrt(H * jnp.sum(jnp.abs(q_r), -1) / jnp.maximum(jnp.sum(jnp.abs(qg), -1), 1e-30))
        j = jnp.arange(S)
        causal = (j[None, :] <= pos[:, None])[:, None, None, :]
        spec = "bkgr,bksr->bkgs" if state.kt is None else "bkgr,bkrs->bkgs"
        logits = jnp.einsum(spec, q_r, k_r.astype(jnp.float32)) / jnp.maximum(scale, 1e-30)[..., None]
        # [B, K, G, S]
        s_hat = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
        # [B, K, S]: group ranking; the local window above every score, the query itself first
        rank = jnp.sum(s_hat, axis=2)
        window = (j[None, :] > pos[:, None] - self.local_window) & (j[None, :] <= pos[:, None])
        rank = jnp.where(window[:, None, :], 2.0 * G + 1.0 + (j[None, :] - pos[:, None])[:, None, :] / S, rank)
        rank = jnp.where(causal[:, :, 0], rank, -jnp.inf)
        kk = min(self.k, S)
        _, idx = jax.lax.top_k(rank, kk)
        counts = jnp.broadcast_to(jnp.minimum(kk, pos + 1)[:, None], (B, K)).astype(jnp.int32)
        live = jnp.arange(kk)[None, None, :] < counts[..., None]
        rows_read = (self.r / H) * (pos + 1) + 2.0 * counts[:, 0]
        dense = dense_selection(lengths, cache_len, block_size)
        sel = Selection(dense.block_indices, dense.block_counts, dense.token_mask, token_indices=idx.astype(jnp.int32),
                        token_counts=counts, rows_read=rows_read.astype(jnp.float32))
        if not self.reallocate_mean:
            return sel
        # [B, K, G]: the approximate probability mass the selection covers
        alpha = jnp.sum(jnp.where(live[:, :, None, :],
                                  jnp.take_along_axis(s_hat, jnp.broadcast_to(idx[:, :, None, :], (B, K, G, kk)),
                                                      axis=-1), 0.0), axis=-1)
        return sel.replace(mix_alpha=alpha.reshape(B, N), mix_vsum=state.vsum[layer_idx])

