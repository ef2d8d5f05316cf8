"""Decode-time attention policies: which KV blocks and tokens each query reads.

A policy is the pluggable piece between the generation loop and the
block-sparse kernel. The loop owns the KV cache and the sampled tokens; the
policy owns whatever it needs to decide what the next query may see, and turns
that into the kernel's inputs:

    prefill_rows(tokens [B,T], lengths [B])            -> factored mask (`prefill_mask` module)
    prefill_mask(tokens [B,T], lengths [B])            -> bool [B,T,T]  (define one of the two)
    init_state(tokens [B,T], lengths [B], max_len)     -> policy state (pytree)
    observe_prefill(state, cache, lengths, *, block_size) -> policy state   (default: unchanged)
    update(state, tokens [B])                          -> policy state
    select(state, lengths [B], *, block_size, q, k, layer_idx) -> Selection
    observe_step(state, cache, positions [B], *, block_size, selections) -> policy state (default: unchanged)

`update` appends the token that is about to be fed to the model (it sits at
position `lengths[b]` of the cache); `select` then describes the attention row
of exactly that query. `lengths` is the cache length *before* the step, i.e.
the position of the current query. The two `observe_*` hooks let a policy keep
metadata of the keys as they are written (Quest's per-block key bounds): once
after prefill wrote the prompt's K/V, and after every decode step wrote the
K/V of position `positions[b]` in every layer. Reading one key per layer per
step is the point: a policy that rescanned the cache would read it all.
`observe_step` also gets the step's selections, so that what a query-aware
policy decided in `select` (ADORE's retained tokens, `Selection.policy_carry`)
becomes its state.

Two kinds of policy fit the same loop and kernel:

- query-independent (`query_aware = False`): the selection depends only on the
  emitted tokens (self-selected spans, dense). The loop calls `select` once per
  step with `q = k = None` and shares the result across layers.
- query-aware (`query_aware = True`): the selection depends on the current
  queries and keys of each layer (SparQ's top-r query components against the
  keys, per KV head -> `block_indices [B,K,NB]`). The loop calls `select`
  inside every layer's attention with that layer's `q [B,N,H]` and
  `k [B,K,S,H]`. A policy that also keeps its own history (ADORE's eviction
  controller) carries it in its state and advances it in `update`.

Shapes use the house letters: B batch, T prompt length, S cache length,
N query heads, K KV heads, H head dim; NB = S // block_size.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import re
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import yaml
from flax import struct

from pallas_kernels.block_select import blocks_from_token_mask
from selfspan_jax import spans as spans_lib
from selfspan_jax.prefill_mask import ArrayPrefillMask, causal_prefill_mask, span_prefill_mask


@struct.dataclass
class Selection:
    """What one query row may read, in the kernel's vocabulary.

    block_indices: int32 [B, NB] (shared by all heads) or [B, K, NB] (per KV
        head); the first `block_counts` entries are the active blocks.
    block_counts: int32 [B] or [B, K].
    token_mask: bool [B, S]; True = this cache position is visible. It is the
        exact row of the attention mask, so statistics computed from it are
        measurements of what the kernel attended to.

    Token-granular policies (SparQ) set instead of reading blocks:
    token_indices: int32 [B, K, T], token_counts int32 [B, K]: the rows each KV
        head reads (`pallas_kernels.token_sparse_decode`); the block fields
        then only describe the causal extent.
    rows_read: f32 [B]: K+V rows read per KV head (row equivalents, mean over
        heads), the policy's own count of its reads, for the statistics; a
        block-list policy sets it when it reads more than its blocks (Quest's
        per-block key bounds).
    mix_alpha: f32 [B, N] and mix_vsum f32 [B, K, H]: output = alpha * y +
        (1 - alpha) * mean(V[0..t]), where the loop completes the mean with the
        query's own V row: mean = (mix_vsum + v[t]) / (t + 1).
    rebuilt: f32 [B]: released tokens re-admitted for this query in this
        layer (ADORE's rebuilds, mean over KV heads; the loop sums the layers).
    policy_carry: what a query-aware policy decided in `select` and keeps
        (ADORE's retained tokens); the loop hands the step's selections back
        to `observe_step`.
    """

    block_indices: jax.Array
    block_counts: jax.Array
    token_mask: jax.Array
    token_indices: Any = None
    token_counts: Any = None
    rows_read: Any = None
    mix_alpha: Any = None
    mix_vsum: Any = None
    rebuilt: Any = None
    policy_carry: Any = None


def dense_selection(lengths: jax.Array, cache_len: int, block_size: int) -> Selection:
    """Causal row for the query at position `lengths[b]`: every j <= lengths[b]."""
    # [S]
    pos = jnp.arange(cache_len, dtype=jnp.int32)
    # [B, S]
    token_mask = pos[None, :] <= lengths[:, None]
    num_blocks = cache_len // block_size
    # [B]
    counts = (lengths // block_size + 1).astype(jnp.int32)
    # [NB]
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    # [B, NB]; padding entries 0 as block_select does
    indices = jnp.where(blocks[None, :] < counts[:, None], blocks[None, :], 0)
    return Selection(indices, counts, token_mask)


def causal_mask(T: int, lengths: jax.Array) -> jax.Array:
    """bool [B, T, T]: causal over the first `lengths[b]` tokens, padding rows see only themselves."""
    return causal_prefill_mask(T, lengths).full()


@dataclasses.dataclass(frozen=True)
class Policy(abc.ABC):
    """Base class; subclasses are frozen (hashable) so they can be jit statics."""

    name: ClassVar[str] = "policy"
    query_aware: ClassVar[bool] = False

    def prefill_rows(self, tokens: jax.Array, lengths: jax.Array):
        """The prompt's attention mask in factored form (`prefill_mask.SpanPrefillMask` or
        `ArrayPrefillMask`): prefill expands it one block at a time, never [B, T, T] at once.
        Default: the rows of `prefill_mask`, for plug-in policies that define only that."""
        if type(self).prefill_mask is Policy.prefill_mask:
            raise NotImplementedError(f"{type(self).__name__} must define prefill_rows or prefill_mask")
        return ArrayPrefillMask(self.prefill_mask(tokens, lengths))

    def prefill_mask(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """bool [B, T, T], the whole prompt mask (default: `prefill_rows` expanded)."""
        if type(self).prefill_rows is Policy.prefill_rows:
            raise NotImplementedError(f"{type(self).__name__} must define prefill_rows or prefill_mask")
        return self.prefill_rows(tokens, lengths).full()

    @abc.abstractmethod
    def init_state(self, tokens: jax.Array, lengths: jax.Array, max_len: int) -> Any:
        ...

    @abc.abstractmethod
    def update(self, state: Any, tokens: jax.Array, active: jax.Array) -> Any:
        """State after appending tokens [B] to the sequences where active [B] is True; a sequence
        that has stopped keeps its state, so what `report` says of it does not depend on how long
        the rest of the batch (or of its device's shard) goes on decoding."""

    @abc.abstractmethod
    def select(self, state: Any, lengths: jax.Array, *, block_size: int, cache_len: int,
               q: jax.Array | None = None, k: jax.Array | None = None,
               layer_idx: int | None = None) -> Selection:
        ...

    def observe_prefill(self, state: Any, cache, lengths: jax.Array, *, block_size: int) -> Any:
        """State after prefill wrote the K/V of positions < lengths[b] (cache: `KVCache`)."""
        return state

    def observe_step(self, state: Any, cache, positions: jax.Array, *, block_size: int,
                     selections: Sequence[Selection] = ()) -> Any:
        """State after a decode step wrote the K/V of position positions[b] in every layer;
        `selections` are the step's selections (one per layer for a query-aware policy)."""
        return state

    def check_model(self, config) -> None:
        """Raise ValueError when this policy cannot decode a model of `config` (a `LlamaConfig`): called
        before any work, so a setting that does not fit the model fails before the rows that fit run."""

    def fallback(self, state: Any, batch: int) -> jax.Array:
        """bool [B]: sequences the policy has switched to dense for good."""
        return jnp.zeros((batch,), bool)

    def report(self, state: Any) -> dict[str, jax.Array]:
        """Per-sequence counters at the end of generation ({name: [B]}), e.g. malformed spans."""
        return {}


@dataclasses.dataclass(frozen=True)
class DecodeOnlyPolicy(Policy):
    """A policy that sparsifies decoding only: dense causal prefill, no state driven by the emitted
    tokens (what it keeps comes through the `observe_*` hooks). Dense, Quest and SparQ are such."""

    def prefill_rows(self, tokens, lengths):
        return causal_prefill_mask(tokens.shape[-1], lengths)

    def init_state(self, tokens, lengths, max_len):
        return ()

    def update(self, state, tokens, active):
        return state


@dataclasses.dataclass(frozen=True)
class DensePolicy(DecodeOnlyPolicy):
    """Every earlier token; the baseline that reads all blocks up to the query."""

    name: ClassVar[str] = "dense"

    def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
        return dense_selection(lengths, cache_len, block_size)


def active_blocks(state: spans_lib.SpanState, block_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(block_indices int32 [NB], block_count int32 [], token_mask bool [S]) for the newest query.

    NB = max_len // block_size; max_len must be a multiple of block_size.
    Entries past `block_count` are 0 (see pallas_kernels.block_select).
    """
    token_mask = spans_lib.visible_tokens(state)
    indices, count = blocks_from_token_mask(token_mask, block_size)
    return indices, count, token_mask


@dataclasses.dataclass(frozen=True)
class SelfSpanPolicy(Policy):
    """The spans the model writes itself (DESIGN.md §2), parsed token by token.

    State: a batched `spans.SpanState` (every field with a leading [B]).
    """

    span_tokens: spans_lib.SpanTokens
    max_segments: int

    name: ClassVar[str] = "self_span"

    def __post_init__(self):
        if not isinstance(self.span_tokens, spans_lib.SpanTokens):
            raise ValueError(f"span_tokens must be a spans.SpanTokens, got {type(self.span_tokens).__name__}")
        spans_lib.check_max_segments(self.max_segments)

    def prefill_rows(self, tokens, lengths):
        return span_prefill_mask(tokens, lengths, self.span_tokens, self.max_segments)

    def init_state(self, tokens, lengths, max_len):
        return jax.vmap(
            lambda t, n: spans_lib.prefill_state(t, n, max_len, self.max_segments, self.span_tokens)
        )(tokens, lengths)

    def update(self, state, tokens, active):
        return jax.vmap(lambda s, t, a: spans_lib.update(s, t, self.span_tokens, a))(state, tokens, active)

    def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
        indices, counts, token_mask = jax.vmap(lambda s: active_blocks(s, block_size))(state)
        return Selection(indices.astype(jnp.int32), counts.astype(jnp.int32), token_mask)

    def fallback(self, state, batch):
        return jnp.asarray(state.fallback_dense, bool).reshape(batch)

    def report(self, state):
        return spans_lib.span_stats(state)


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


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
        _positive_int("page_budget", self.page_budget)

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
    """

    r: int
    k: int
    local_window: int = 0
    reallocate_mean: bool = True
    component_major: bool = False

    name: ClassVar[str] = "sparq"
    query_aware: ClassVar[bool] = True

    def __post_init__(self):
        _positive_int("r", self.r)
        _positive_int("k", self.k)
        _positive_int("local_window", self.local_window, 0)
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


@struct.dataclass
class AdoreState:
    """What `AdorePolicy` keeps per layer and sequence.

    feats: [L, B, K, S, C] the controller's feature of every written key (cache dtype);
    carry: f32 [L, B, K, C] its GRU state after the keys written so far;
    kept: int32 [L, B, K, m] the tokens in the cache, m = budget - rebuild - 1 (the first kept_count
        are live);
    kept_count: int32 [L, B, K].
    """

    feats: jax.Array
    carry: jax.Array
    kept: jax.Array
    kept_count: jax.Array


@dataclasses.dataclass(frozen=True)
class AdorePolicy(DecodeOnlyPolicy):
    """ADORE-style adaptive token release (Zhang et al., arXiv 2407.02328) with a trained controller.

    Per layer and KV head the cache holds m = budget - rebuild - 1 tokens.
    For the query at t the controller (`adore.Controller`: a GRU over the keys,
    a feature per token, the query's projection, a distance bias) scores every
    earlier token "for the current token"; the query reads the m cached
    tokens, the `rebuild` released tokens of highest score (they are
    "rebuilt"), and itself: at most `budget` rows. Then the cache keeps the m
    highest-scoring of what was read and releases the rest. Prefill is dense
    causal; the prompt's m tokens are then chosen by the controller's history
    and recency alone (no query yet). Released tokens stay in this project's
    cache (a rebuild re-reads them instead of recomputing their K/V): only
    bandwidth is saved, not memory.

    Reads per step and KV head (row equivalents of K+V, `rows_read`):
    2 * min(budget, t + 1) plus the features of the t earlier tokens,
    dim / head_dim of a K row each. `controller` is an `adore.TrainedController`
    or the directory `scripts/train_adore.py` wrote. State: `AdoreState`.
    """

    budget: int
    rebuild: int = 4
    controller: Any = None

    name: ClassVar[str] = "adore"
    query_aware: ClassVar[bool] = True

    def __post_init__(self):
        from selfspan_jax import adore  # the policy table must not need flax's RNN modules to import

        _positive_int("rebuild", self.rebuild, 0)
        _positive_int("budget", self.budget, 2)
        if self.budget < self.rebuild + 2:
            raise ValueError(f"budget {self.budget} must be at least rebuild + 2 = {self.rebuild + 2}: the query, "
                             f"the {self.rebuild} rebuilt tokens and at least one cached token")
        if isinstance(self.controller, (str, os.PathLike)):
            object.__setattr__(self, "controller", adore.load_controller(self.controller))
        if not isinstance(self.controller, adore.TrainedController):
            raise ValueError("controller must be an adore.TrainedController or the directory of one "
                             f"(scripts/train_adore.py), got {self.controller!r}")

    @property
    def cached(self) -> int:
        """m: tokens the cache holds besides the query and the rebuilt ones."""
        return self.budget - self.rebuild - 1

    def check_model(self, config):
        self._check_shapes(config.n_layers, config.head_dim)

    def _check_cache(self, cache) -> None:
        self._check_shapes(cache.k.shape[0], cache.k.shape[-1])

    def _check_shapes(self, L: int, H: int) -> None:
        ctl = self.controller
        if (L, H) != (ctl.n_layers, ctl.head_dim):
            raise ValueError(f"the ADORE controller {ctl} was trained for {ctl.n_layers} layers of head dim "
                             f"{ctl.head_dim}; this model has {L} layers of head dim {H}")

    @staticmethod
    def _mask(idx, count, S):
        """[B, K, n] ids with the first count[b, k] live -> bool [B, K, S]."""
        B, K, n = idx.shape
        live = jnp.arange(n)[None, None, :] < count[..., None]
        return jnp.zeros((B, K, S), bool).at[jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None],
                                             idx].max(live)

    @staticmethod
    def _top(scores, allowed, n):
        """The n highest `scores` where `allowed` ([B, K, S]): (ids [B, K, n], live count [B, K])."""
        vals, idx = jax.lax.top_k(jnp.where(allowed, scores, -jnp.inf), n)
        return idx.astype(jnp.int32), jnp.sum(jnp.isfinite(vals), -1).astype(jnp.int32)

    def observe_prefill(self, state, cache, lengths, *, block_size):
        self._check_cache(cache)
        ctl = self.controller.module()
        L, B, K, S, H = cache.k.shape
        feats = jnp.stack([ctl.features(i, cache.k[i]) for i in range(L)]).astype(cache.k.dtype)

        def read(t, carry):
            valid = (t < lengths)[None, :, None, None]
            new = jnp.stack([ctl.advance(i, carry[i], cache.k[i, :, :, t]) for i in range(L)])
            return jnp.where(valid, new, carry)

        carry = jax.lax.fori_loop(0, jnp.max(lengths), read, jnp.zeros((L, B, K, ctl.dim), jnp.float32))
        j = jnp.arange(S)
        # [B, 1, S]: the prompt, as seen from the first decode query at lengths[b]
        prompt = (j[None, :] < lengths[:, None])[:, None, :]
        distance = (lengths[:, None] - j[None, :])[:, None, :]
        kept, counts = [], []
        for i in range(L):
            s = ctl.score(i, feats[i], carry[i], distance)  # history and recency only: no query yet
            idx, count = self._top(s, prompt, min(self.cached, S))
            kept.append(idx)
            counts.append(count)
        return AdoreState(feats, carry, jnp.stack(kept), jnp.stack(counts))

    def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
        ctl = self.controller.module()
        B, N, H = q.shape
        K, S = k.shape[1], cache_len
        pos = lengths.astype(jnp.int32)
        j = jnp.arange(S)
        probe = ctl.probe(layer_idx, q.reshape(B, K, N // K, H), state.carry[layer_idx])
        # [B, K, S]: importance of every cached token for this query
        s = ctl.score(layer_idx, state.feats[layer_idx], probe, (pos[:, None] - j[None, :])[:, None, :])
        # the query's own feature is written after the step: score it from its key, already in the cache
        own_key = k[jnp.arange(B), :, pos, :]
        own_score = ctl.score(layer_idx, ctl.features(layer_idx, own_key)[:, :, None, :], probe,
                              jnp.zeros((B, K, 1), jnp.int32))
        s = jnp.where((j[None, :] == pos[:, None])[:, None, :], own_score, s)
        earlier = (j[None, :] < pos[:, None])[:, None, :]
        in_cache = self._mask(state.kept[layer_idx], state.kept_count[layer_idx], S) & earlier
        read = in_cache
        if self.rebuild:
            back, n_back = self._top(s, earlier & ~in_cache, min(self.rebuild, S))
            rebuilt = self._mask(back, n_back, S)
            read = read | rebuilt
            n_rebuilt = jnp.mean(n_back.astype(jnp.float32), axis=-1)
        else:
            n_rebuilt = jnp.zeros((B,), jnp.float32)
        n_read = min(self.budget - 1, S)
        idx, count = self._top(s, read, n_read)
        # entries past the count repeat the query's own position (never read: the count stops before them)
        idx = jnp.where(jnp.arange(n_read)[None, None, :] < count[..., None], idx, pos[:, None, None])
        indices = jnp.concatenate([idx, jnp.broadcast_to(pos[:, None, None], (B, K, 1))], axis=-1)
        counts = count + 1
        # what the cache keeps for the next query: the m best of what this one read, itself included
        own = (j[None, :] == pos[:, None])[:, None, :]
        kept = self._top(s, read | own, min(self.cached, S))
        rows_read = 2.0 * jnp.mean(counts.astype(jnp.float32), axis=-1) + (ctl.dim / H) * pos
        dense = dense_selection(lengths, cache_len, block_size)
        return Selection(dense.block_indices, dense.block_counts, dense.token_mask, token_indices=indices,
                         token_counts=counts, rows_read=rows_read.astype(jnp.float32), rebuilt=n_rebuilt,
                         policy_carry=kept)

    def observe_step(self, state, cache, positions, *, block_size, selections=()):
        if len(selections) != state.kept.shape[0]:
            raise ValueError(f"AdorePolicy.observe_step needs the step's {state.kept.shape[0]} per-layer selections")
        ctl = self.controller.module()
        B = positions.shape[0]
        b = jnp.arange(B)
        feats, carry = [], []
        for i in range(state.kept.shape[0]):
            # [B, K, H]: the key this step wrote in layer i
            k_new = cache.k[i, b, :, positions, :]
            feats.append(state.feats[i].at[b, :, positions, :].set(ctl.features(i, k_new).astype(state.feats.dtype)))
            carry.append(ctl.advance(i, state.carry[i], k_new))
        kept = jnp.stack([sel.policy_carry[0] for sel in selections])
        counts = jnp.stack([sel.policy_carry[1] for sel in selections])
        return AdoreState(jnp.stack(feats), jnp.stack(carry), kept, counts)


_SETTABLE = {"quest": lambda **kw: QuestPolicy(**kw), "sparq": lambda **kw: SparQPolicy(**kw),
             "adore": lambda **kw: AdorePolicy(**kw)}


def _from_spec(spec: str, defaults: dict[str, dict[str, Any]]) -> Policy:
    """"name(key=value, ...)" -> that policy with those settings (values are YAML scalars), on top of
    `defaults[name]`."""
    name, _, rest = spec.strip().partition("(")
    name = name.strip()
    if name not in _SETTABLE or not rest.endswith(")"):
        raise ValueError(f"policy spec {spec!r}: expected one of {sorted(_SETTABLE)} followed by (key=value, ...)")
    given: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest[:-1].split(","))):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq:
            raise ValueError(f"policy spec {spec!r}: {item!r} is not key=value")
        if key in given:
            raise ValueError(f"policy spec {spec!r}: {key!r} is given twice")
        if not value:
            raise ValueError(f"policy spec {spec!r}: {key!r} has no value")
        try:
            given[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"policy spec {spec!r}: the value of {key!r}, {value!r}, is not a plain number, "
                             "bool or string") from None
    kwargs = {**defaults.get(name, {}), **given}
    try:
        return _SETTABLE[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"policy spec {spec!r}: {err}") from err


def split_policy_specs(text: str) -> list[str]:
    """"dense,quest(page_budget=2),sparq(r=8,k=16)" -> its specs (commas inside parentheses kept)."""
    return [p.strip() for p in re.split(r",(?![^()]*\))", text) if p.strip()]


def make_policy(policy: str | Policy, *, span_tokens=None, max_segments: int = 64,
                adore_controller=None) -> Policy:
    """Resolve a policy name or spec, or pass a Policy through.

    "quest" is `QuestPolicy()` (8 pages); "sparq" is `SparQPolicy(r=16, k=64, local_window=16)`, the
    paper's 1/8 setting at head dim 128; "adore" is `AdorePolicy(budget=64, rebuild=4)` with the
    controller `adore_controller` (a `TrainedController` or its directory; a run's is `<run>/adore`).
    "quest(page_budget=3)", "sparq(r=8,k=16,local_window=4)" and "adore(budget=32,rebuild=2)" set
    them (what `scripts/evaluate.py --policies` and the comparison script take).
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        policy = policy.strip()
    adore_defaults = {} if adore_controller is None else {"controller": adore_controller}
    if policy == "adore" or (isinstance(policy, str) and policy.startswith("adore(")):
        if adore_controller is None and "controller" not in policy:
            raise ValueError(f"policy {policy!r} needs a trained controller: pass adore_controller= (the directory "
                             "scripts/train_adore.py wrote, <run>/adore by default) or adore(controller=DIR, ...)")
        if policy == "adore":
            return AdorePolicy(budget=64, rebuild=4, controller=adore_controller)
    if isinstance(policy, str) and "(" in policy:
        return _from_spec(policy, {"adore": adore_defaults})
    if policy == "dense":
        return DensePolicy()
    if policy == "quest":
        return QuestPolicy()
    if policy == "sparq":
        return SparQPolicy(r=16, k=64, local_window=16)
    if policy == "self_span":
        if span_tokens is None:
            raise ValueError("policy='self_span' needs span_tokens (or a tokenizer to derive them from)")
        return SelfSpanPolicy(span_tokens, max_segments)
    raise ValueError(f"unknown policy {policy!r}; choose 'dense', 'self_span', 'quest', 'sparq', 'adore' or pass "
                     "a Policy")
