"""Quest: query-aware selection of KV pages by per-page key bounds (training-free)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from selfspan_jax.policies.base import DecodeOnlyPolicy, check_positive_int
from selfspan_jax.selection import Selection


@struct.dataclass
class QuestState:
    """Per-block key bounds of every layer: elementwise min and max of the keys written so far.

    kmin, kmax: f32 [L, B, K, NB, H]; a block with no key yet holds +inf / -inf.
    """

    kmin: jax.Array
    kmax: jax.Array


@dataclasses.dataclass(frozen=True)
class QuestPolicy(DecodeOnlyPolicy):
    """Quest (Tang et al., ICML 2024): query-aware selection of KV pages by per-page key bounds.

    Pages are the kernel's blocks (`generate`'s `block_size`). For every block
    and KV head the elementwise min and max of its keys are kept as keys are
    written (`observe_prefill`, `observe_step`: one key per layer per step is
    read). For a query q the block's score is the upper bound
    u = sum_i max(q_i * min_i, q_i * max_i) of q . k over its keys (for GQA
    summed over the query heads of the KV head); the `page_budget` blocks of
    highest u are read, the block holding the query always among them (it
    counts against the budget), with exact attention over their visible
    positions. Prefill is dense causal (Quest sparsifies decoding only).

    Reads per step and KV head: min(page_budget, blocks so far) K/V blocks plus
    the bounds of every block so far (2 H floats each, 2 / block_size of a
    block's K/V bytes). State: `QuestState`.
    """

    page_budget: int = 8

    name: ClassVar[str] = "quest"
    query_aware: ClassVar[bool] = True

    def __post_init__(self):
        check_positive_int("page_budget", self.page_budget)

    def observe_prefill(self, state, cache, lengths, *, block_size):
        L, B, K, S, H = cache.k.shape
        # [L, B, K, NB, bs, H]
        k = cache.k.astype(jnp.float32).reshape(L, B, K, S // block_size, block_size, H)
        # [B, NB, bs]: positions written by prefill
        valid = (jnp.arange(S) < lengths[:, None]).reshape(B, S // block_size, block_size)
        valid = valid[None, :, None, :, :, None]
        return QuestState(jnp.min(jnp.where(valid, k, jnp.inf), axis=4),
                          jnp.max(jnp.where(valid, k, -jnp.inf), axis=4))

    def observe_step(self, state, cache, positions, *, block_size, selections=()):
        b = jnp.arange(positions.shape[0])
        # [B, L, K, H] (numpy's rule for advanced indices split by a slice): the key each
        # layer wrote at positions[b]; the bounds are indexed the same way
        new = cache.k[:, b, :, positions, :].astype(jnp.float32)
        blk = positions // block_size
        return QuestState(state.kmin.at[:, b, :, blk, :].min(new), state.kmax.at[:, b, :, blk, :].max(new))

    def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
        B, N, H = q.shape
        K = k.shape[1]
        NB = cache_len // block_size
        # [B, K, G, H]
        qg = q.astype(jnp.float32).reshape(B, K, N // K, H)
        kmin, kmax = state.kmin[layer_idx], state.kmax[layer_idx]
        # [B, K, NB]: upper bound of q . k over each block, summed over the group
        u = jnp.einsum("bkgh,bknh->bkn", jnp.maximum(qg, 0), kmax) + jnp.einsum(
            "bkgh,bknh->bkn", jnp.minimum(qg, 0), kmin)
        own = (lengths // block_size).astype(jnp.int32)
        blocks = jnp.arange(NB)[None, None, :]
        u = jnp.where(blocks < own[:, None, None], u, -jnp.inf)
        u = jnp.where(blocks == own[:, None, None], jnp.inf, u)
        budget = min(self.page_budget, NB)
        # [B, K, budget]
        _, indices = jax.lax.top_k(u, budget)
        counts = jnp.broadcast_to(jnp.minimum(budget, own + 1)[:, None], (B, K)).astype(jnp.int32)
        token_mask = jnp.arange(cache_len)[None, :] <= lengths[:, None]
        # what Quest reads: the chosen blocks' K and V rows, and the bounds (a min and a max K row) of
        # every earlier block it ranked -- 1/block_size of the KV bytes on top, as in the paper's count
        rows_read = 2.0 * block_size * counts[:, 0] + 2.0 * own
        return Selection(indices.astype(jnp.int32), counts, token_mask, rows_read=rows_read.astype(jnp.float32))

