"""The jitted decode loop: prefill, then one token per step with the policy's attention.

Two compiled programs per shape bucket (`start`, then `loop`, which takes
the state donated) do everything on device:

1. `prefill`: a full forward over the right-padded prompts with the policy's
   mask (the span mask of DESIGN.md §2 for `self_span`), writing the KV cache,
   and the policy's initial state; the first token is sampled from the logits
   at each prompt's last position;
2. `decode_step`, the body of a `lax.while_loop`: the emitted token is
   appended to the policy state, the policy turns that state into the
   kernel's block list and token mask for this query (`attention_fn_for`), and
   `model.decode_step` runs with `pallas_kernels.block_sparse_decode` as its
   attention. Each sequence stops at EOS or its token budget; the loop ends
   when all have stopped.

Shape buckets (`shape_buckets`): the prompt length is padded to a power of two
(>= 16), the token budget to a power of two, and the cache length to a
multiple of the block size, so calls with other prompt lengths, budgets,
temperatures or seeds in the same bucket reuse the compiled program.

Shapes use the house letters: B batch, T prompt bucket, S cache length,
M token-budget bucket, N query heads, K KV heads, H head dim, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pallas_kernels import block_sparse_decode
from pallas_kernels.token_sparse_decode import token_sparse_decode
from selfspan_jax.cache import KVCache
from selfspan_jax.policies import Policy, Selection, dense_selection
from selfspan_jax.sampling import chosen_logprob, sample_logits

# Prompt buckets start here so that short prompts share one program.
MIN_PROMPT_BUCKET = 16


def next_pow2(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shape_buckets(max_prompt_len: int, max_new_tokens: int, block_size: int) -> tuple[int, int, int]:
    """(T prompt bucket, M budget bucket, S cache length) of a call."""
    T = next_pow2(max_prompt_len, MIN_PROMPT_BUCKET)
    M = next_pow2(max_new_tokens)
    return T, M, round_up(T + M, block_size)


@struct.dataclass
class LoopState:
    """Everything the while_loop carries.

    step: int32 []: tokens emitted so far; the token at out[:, step-1] is the
        one the next iteration feeds to the model.
    out: int32 [B, M]: emitted tokens; `pad` after a sequence has stopped.
    logprobs: f32 [B, M]: log p(out[b, m]) under the model's own distribution
        (raw logits: no temperature, no top-k/top-p), 0 after a stop; None
        unless asked for (no full-vocabulary log_softmax per step then).
    done: bool [B]: the sequence emitted EOS or used its budget.
    num_tokens: int32 [B]: tokens emitted per sequence (EOS included).
    cache: the KV cache; cache.lengths[b] is the position of the next fed token.
    policy_state: the policy's own pytree (span decode state for self_span).
    visible .. rebuilt: the per-step statistics, each None unless asked for
        (`return_stats`, a static flag: without it the loop computes none).
    visible: f32 [B, M]: keys the query that produced out[b, m] attended to
        (from the selection actually passed to the kernel, mean over KV heads
        for per-head lists; 0 for m = 0, which comes from prefill).
    causal: int32 [B, M]: keys causally available to that query (position + 1).
    blocks: f32 [B, M]: KV blocks the kernel read for it (mean over KV heads
        for per-head lists).
    dense_blocks: int32 [B, M]: blocks a dense read would have touched.
    fallback: bool [B, M]: the policy had switched that sequence to dense.
    rebuilt: f32 [B, M]: released tokens the policy re-admitted for that query (ADORE).
    masks: bool [B, M, S] visibility rows (only with return_masks), else None.
    recall: f32 [B, M, L] (only with return_recall), else None: per layer, the share of the
        layer's dense softmax attention (over every key at or before the query, the model's own
        q and keys at that step) that falls on the keys the selection reads, mean over query
        heads (`attention_recall`); 1 for dense reads.
    """

    step: jax.Array
    out: jax.Array
    logprobs: Any
    done: jax.Array
    num_tokens: jax.Array
    cache: KVCache
    policy_state: Any
    visible: jax.Array
    causal: jax.Array
    blocks: jax.Array
    dense_blocks: jax.Array
    fallback: jax.Array
    rebuilt: jax.Array
    masks: Any
    recall: Any = None


def _prefill_rows(model, prompt, mask, lengths, cache):
    """One prefill through the factored mask -> (cache, logits at each prompt's last position [B, V])."""
    last, cache = model.prefill(prompt, cache, attention_mask=mask, lengths=lengths, logits_at=lengths - 1)
    return cache, last


def _chunked_prefill(model, prompt, mask, lengths, cache_len: int, chunk: int):
    """Prefill `chunk` sequences at a time -> (cache, last-position logits [B, V]).

    Within a sequence prefill is already blocked (no [T, T] mask or scores);
    sub-batches further bound the per-token activations (MLP, q/k/v of every
    layer) to chunk / B of the batch's while writing into one cache.
    """
    B = prompt.shape[0]
    cache = KVCache.init(model.config, B, cache_len)
    last = jnp.zeros((B, model.config.vocab_size), jnp.float32)

    def one(i, carry):
        cache, last = carry
        rows = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=0)  # noqa: E731
        sub, sub_last = _prefill_rows(model, rows(prompt), jax.tree.map(rows, mask), rows(lengths),
                                      KVCache.init(model.config, chunk, cache_len))
        k = jax.lax.dynamic_update_slice_in_dim(cache.k, sub.k, i * chunk, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cache.v, sub.v, i * chunk, axis=1)
        return cache.replace(k=k, v=v), jax.lax.dynamic_update_slice_in_dim(last, sub_last, i * chunk, axis=0)

    cache, last = jax.lax.fori_loop(0, B // chunk, one, (cache, last))
    return cache.replace(lengths=lengths.astype(jnp.int32)), last


def prefill(model, policy: Policy, prompt, lengths, *, cache_len: int, block_size: int, prefill_chunk: int):
    """prompt int32 [B, T] right-padded, lengths int32 [B] ->
    (cache, logits at each prompt's last position [B, V], initial policy state, which has seen the
    prompt's keys through `observe_prefill`).

    The policy's mask stays factored (`Policy.prefill_rows`) and attention runs
    block by block (`attention.blocked_attention`): no [B, T, T] mask, no
    [B, N, T, T] scores, no [B, T, V] logits (docs/notes/generation.md,
    "Prefill at long prompts")."""
    B = prompt.shape[0]
    mask = policy.prefill_rows(prompt, lengths)
    if prefill_chunk >= B:
        cache, last = _prefill_rows(model, prompt, mask, lengths, KVCache.init(model.config, B, cache_len))
    else:
        cache, last = _chunked_prefill(model, prompt, mask, lengths, cache_len, prefill_chunk)
    state = policy.observe_prefill(policy.init_state(prompt, lengths, cache_len), cache, lengths,
                                   block_size=block_size)
    return cache, last, state


def attention_fn_for(policy: Policy, pstate, pos, *, block_size: int, cache_len: int, backend: str,
                     precision, dense_reads: bool = False, recalls: list | None = None
                     ) -> tuple[Callable, Callable[[], list[Selection]]]:
    """(attention_fn for `model.decode_step`, the step's selections once the layers have run: one per
    layer for a query-aware policy, else the one shared selection).
    recalls: a list that receives every layer's `attention_recall` [B], in layer order (a diagnostic:
    it costs a dense attention's scores per layer).

    The kernel always reads the stacked cache in place with `layer=`: a
    `k_all[layer]` slice would be copied whole every step (docs/notes/
    generation.md). A query-aware policy selects inside every layer from that
    layer's q and keys; layers are traced in Python, so the per-layer
    selections can be read back, and the last layer's stands for the step.
    Other policies select once per step.

    dense_reads: hand the kernel every causal block with the policy's own
    token mask (`read_causal_blocks`): the same attention, no block list to
    build (the "dense path" of `min_sparse_context`).
    """
    kw = dict(block_size=block_size, cache_len=cache_len)

    def select(**qk):
        sel = policy.select(pstate, pos, **qk, **kw)
        return read_causal_blocks(sel, pos, cache_len, block_size) if dense_reads else sel

    seen: list[Selection] = [] if policy.query_aware else [select()]

    def attention_fn(q, k_all, v_all, layer_idx):
        if policy.query_aware:
            seen.append(select(q=q, k=k_all[layer_idx], layer_idx=layer_idx))
        sel = seen[-1]
        if recalls is not None:
            recalls.append(attention_recall(q, k_all[layer_idx], sel, pos, block_size))
        if sel.token_indices is None:
            out = block_sparse_decode(q, k_all, v_all, sel.block_indices, sel.block_counts, sel.token_mask,
                                      block_size=block_size, backend=backend, precision=precision,
                                      layer=layer_idx)
        else:  # token lists (SparQ, ADORE): the row-gather kernel on the same backend
            out = token_sparse_decode(q, k_all, v_all, sel.token_indices, sel.token_counts, layer=layer_idx,
                                      backend=backend, precision=precision)
        if sel.mix_alpha is not None:
            out = _mix_mean_v(out, sel, v_all, layer_idx, pos)
        return out

    return attention_fn, lambda: list(seen)


def _listed(indices, counts, size: int) -> jax.Array:
    """bool [B, K, size]: which ids the first counts[b, k] entries of indices [B, K, L] name."""
    B, K, Lst = indices.shape
    live = jnp.arange(Lst)[None, None, :] < counts[..., None]
    return jnp.zeros((B, K, size), bool).at[jnp.arange(B)[:, None, None], jnp.arange(K)[None, :, None],
                                           indices].max(live)


def read_keys(sel: Selection, pos, block_size: int, n_kv_heads: int) -> jax.Array:
    """bool [B, K, S]: the keys each KV head's attention reads under `sel` (causal, listed and unmasked)."""
    B, S = sel.token_mask.shape
    causal = jnp.arange(S)[None, :] <= pos[:, None]  # [B, S]
    if sel.token_indices is not None:  # token lists: the first token_counts rows of each head
        keys = _listed(sel.token_indices, sel.token_counts, S) & causal[:, None, :]
    else:
        idx, counts = sel.block_indices, sel.block_counts
        if idx.ndim == 2:  # one list for every head
            idx, counts = idx[:, None, :], counts[:, None]
        blocks = jnp.repeat(_listed(idx, counts, S // block_size), block_size, axis=-1)  # [B, K or 1, S]
        keys = blocks & (sel.token_mask & causal)[:, None, :]
    return jnp.broadcast_to(keys, (B, n_kv_heads, S))


def attention_recall(q, k, sel: Selection, pos, block_size: int) -> jax.Array:
    """[B]: the share of dense softmax attention (q [B, N, H] against every key k [B, K, S, H] at or
    before `pos`, fp32, 1/sqrt(H)) on the keys `sel` reads, mean over query heads.

    A selection's quality apart from what the kernel does with it: a SparQ or Quest list that
    misses where the dense attention goes shows here before it shows in accuracy."""
    B, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, K, N // K, H)
    logits = jnp.einsum("bkgh,bksh->bkgs", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(H))
    causal = (jnp.arange(S)[None, :] <= pos[:, None])[:, None, None, :]
    p = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    member = read_keys(sel, pos, block_size, K)[:, :, None, :]
    return jnp.mean(jnp.sum(jnp.where(member, p, 0.0), axis=-1), axis=(1, 2))


def read_causal_blocks(sel: Selection, pos, cache_len: int, block_size: int) -> Selection:
    """`sel` reading every block at or before the query instead of its own list, when its token
    mask alone is the attention row (a list shared by all heads: self_span, dense); the attention
    is unchanged. Per-KV-head lists (Quest, SparQ's block form) select through the list itself
    -- one token mask serves all heads -- and token lists name rows: those are returned as they are."""
    if sel.token_indices is not None or sel.block_indices.ndim != 2:
        return sel
    dense = dense_selection(pos, cache_len, block_size)
    # rows_read: the policy's count of its own list's reads no longer describes the kernel's
    return sel.replace(block_indices=dense.block_indices, block_counts=dense.block_counts, rows_read=None)


def _mix_mean_v(y, sel: Selection, v_all, layer_idx, pos):
    """alpha * y + (1 - alpha) * mean(V[0..t]) per query head; the query's own V row completes the
    policy's running sum of the rows before it."""
    B, N, H = y.shape
    K = sel.mix_vsum.shape[1]
    # [B, K, H]
    own = v_all[layer_idx, jnp.arange(B), :, pos, :].astype(jnp.float32)
    mean = (sel.mix_vsum + own) / (pos + 1).astype(jnp.float32)[:, None, None]
    # [B, N, H]
    mean = jnp.repeat(mean, N // K, axis=1)
    alpha = sel.mix_alpha[..., None]
    return (alpha * y.astype(jnp.float32) + (1.0 - alpha) * mean).astype(y.dtype)


def _selection_stats(sel: Selection, pos: jax.Array, block_size: int):
    """Measured from the selection itself: (keys attended f32 [B], blocks read f32 [B], dense blocks [B]).

    Shared lists: the token mask lies inside the listed blocks, so the keys
    attended are its causal entries. Per-KV-head lists [B, K, L]: the causal
    token-mask entries inside each head's listed blocks, averaged over heads
    (as are the blocks read).
    """
    S = sel.token_mask.shape[-1]
    # [B, S]
    row = sel.token_mask & (jnp.arange(S)[None, :] <= pos[:, None])
    counts = sel.block_counts.astype(jnp.float32)
    if sel.token_indices is not None:  # token lists: listed rows per head
        visible = jnp.mean(sel.token_counts.astype(jnp.float32), axis=-1)
    elif counts.ndim == 1:
        visible = jnp.sum(row, axis=-1).astype(jnp.float32)
    else:
        B = sel.block_indices.shape[0]
        # [B, K, NB]: which blocks each head reads (entries past the count are not read)
        member = _listed(sel.block_indices, sel.block_counts, S // block_size)
        # [B, NB] visible keys per block
        per_block = row.reshape(B, S // block_size, block_size).sum(-1).astype(jnp.float32)
        visible = jnp.mean(jnp.sum(member * per_block[:, None, :], axis=-1), axis=-1)
        counts = jnp.mean(counts, axis=-1)
    if sel.rows_read is not None:  # the policy counts its own reads (token lists; blocks plus key bounds)
        counts = sel.rows_read / (2.0 * block_size)
    return visible, counts, (pos // block_size + 1).astype(jnp.int32)


def decode_step(model, policy: Policy, st: LoopState, choose: Callable, *, max_new, eos_id, pad_id,
                block_size: int, backend: str, precision, dense_reads: bool = False) -> LoopState:
    """One loop iteration: feed the last emitted token, attend through the policy, emit the next."""
    B, S = st.out.shape[0], st.cache.k.shape[3]
    # [B] the token emitted last step; it sits at position pos[b]
    fed = jax.lax.dynamic_index_in_dim(st.out, st.step - 1, axis=1, keepdims=False)
    pos = st.cache.lengths
    active = ~st.done
    pstate = policy.update(st.policy_state, fed, active)
    recalls = None if st.recall is None else []
    attention_fn, selection = attention_fn_for(policy, pstate, pos, block_size=block_size, cache_len=S,
                                               backend=backend, precision=precision, dense_reads=dense_reads,
                                               recalls=recalls)
    step_logits, cache = model.decode_step(fed, st.cache, attention_fn=attention_fn)
    selections = selection()
    sel = selections[-1]  # the last layer's stands for the step in the statistics
    pstate = policy.observe_step(pstate, cache, pos, block_size=block_size, selections=selections)
    tok = choose(step_logits, st.step)

    def put(buf, value, empty):
        col = jnp.where(active, value, empty).astype(buf.dtype)
        return jax.lax.dynamic_update_index_in_dim(buf, col, st.step, axis=1)

    stats = {}
    if st.visible is not None:
        visible, blocks, dense_blocks = _selection_stats(sel, pos, block_size)
        stats = dict(
            visible=put(st.visible, visible, 0.0),
            causal=put(st.causal, pos + 1, 0),
            blocks=put(st.blocks, blocks, 0.0),
            dense_blocks=put(st.dense_blocks, dense_blocks, 0),
            fallback=put(st.fallback, policy.fallback(pstate, B), False),
            rebuilt=st.rebuilt if sel.rebuilt is None else put(st.rebuilt, sum(x.rebuilt for x in selections), 0.0),
        )

    masks = st.masks
    if masks is not None:
        row = jnp.where(active[:, None], sel.token_mask & (jnp.arange(S)[None, :] <= pos[:, None]), False)
        masks = jax.lax.dynamic_update_index_in_dim(masks, row, st.step, axis=1)
    logprobs = None if st.logprobs is None else put(st.logprobs, chosen_logprob(step_logits, tok), 0.0)
    if recalls is not None:  # [B, L] for this step
        row = jnp.where(active[:, None], jnp.stack(recalls, axis=-1), 0.0)
        stats["recall"] = jax.lax.dynamic_update_index_in_dim(st.recall, row, st.step, axis=1)
    return st.replace(
        step=st.step + 1,
        out=put(st.out, tok, pad_id),
        logprobs=logprobs,
        done=st.done | (active & (tok == eos_id)) | (st.step + 1 >= max_new),
        num_tokens=st.num_tokens + active.astype(jnp.int32),
        cache=cache,
        policy_state=pstate,
        masks=masks,
        **stats,
    )


def initial_state(cache: KVCache, policy_state, tok0, logprob0, *, budget: int, max_new, eos_id, pad_id,
                  return_masks: bool, return_stats: bool, return_recall: bool = False) -> LoopState:
    """The loop's state after prefill emitted tok0 [B] (logprob0 [B] or None: no log-probs asked)."""
    B, M, S = tok0.shape[0], budget, cache.max_len
    zeros_i = jnp.zeros((B, M), jnp.int32)
    stat = lambda x: x if return_stats else None  # noqa: E731
    return LoopState(
        step=jnp.int32(1),
        out=jnp.full((B, M), pad_id, jnp.int32).at[:, 0].set(tok0),
        logprobs=None if logprob0 is None else jnp.zeros((B, M), jnp.float32).at[:, 0].set(logprob0),
        done=(tok0 == eos_id) | (max_new <= 1),
        num_tokens=jnp.ones((B,), jnp.int32),
        cache=cache,
        policy_state=policy_state,
        visible=stat(jnp.zeros((B, M), jnp.float32)),
        causal=stat(zeros_i),
        blocks=stat(jnp.zeros((B, M), jnp.float32)),
        dense_blocks=stat(zeros_i),
        fallback=stat(jnp.zeros((B, M), bool)),
        rebuilt=stat(jnp.zeros((B, M), jnp.float32)),
        masks=jnp.zeros((B, M, S), bool) if return_masks else None,
        recall=jnp.zeros((B, M, cache.k.shape[0]), jnp.float32) if return_recall else None,
    )


def chooser(rng, temperature, top_k, top_p, forced, use_forced, rows=None) -> Callable:
    """choose(step_logits, step) -> [B] tokens: sampled, or the forced column when `use_forced`.
    rows: (offset, total) of this shard's rows in a batch split over devices (`run_sharded`)."""

    def choose(step_logits, step):
        drawn = sample_logits(step_logits, jax.random.fold_in(rng, step), temperature, top_k, top_p, rows=rows)
        given = jax.lax.dynamic_index_in_dim(forced, step, axis=1, keepdims=False)
        return jnp.where(use_forced, given, drawn)

    return choose


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "policy", "block_size", "cache_len", "budget", "return_masks", "return_logprobs",
                     "return_stats", "prefill_chunk", "batch_total", "return_recall"),
)
def start(params, prompt, lengths, max_new, temperature, top_k, top_p, rng, eos_id, pad_id, forced, use_forced,
          row_offset=0, *, batch_total: int | None = None, graphdef, policy: Policy, block_size: int,
          cache_len: int, budget: int, return_masks: bool, return_logprobs: bool, return_stats: bool,
          prefill_chunk: int, return_recall: bool = False) -> LoopState:
    """Stage 1 of `run`: prefill, the first token, the loop's initial state. row_offset, batch_total:
    these rows' place in a batch split over devices (`run_sharded`), for the sampler's noise."""
    model = nnx.merge(graphdef, params)
    cache, last, policy_state = prefill(model, policy, prompt, lengths, cache_len=cache_len, block_size=block_size,
                                        prefill_chunk=prefill_chunk)
    rows = None if batch_total is None else (row_offset, batch_total)
    tok0 = chooser(rng, temperature, top_k, top_p, forced, use_forced, rows)(last, 0)
    return initial_state(cache, policy_state, tok0, chosen_logprob(last, tok0) if return_logprobs else None,
                         budget=budget, max_new=max_new, eos_id=eos_id, pad_id=pad_id, return_masks=return_masks,
                         return_stats=return_stats, return_recall=return_recall)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "policy", "block_size", "backend", "precision", "dense_reads", "batch_total"),
    donate_argnames=("state",),  # the cache and buffers are updated in place
)
def loop(params, state: LoopState, max_new, temperature, top_k, top_p, rng, eos_id, pad_id, forced, use_forced,
         row_offset=0, *, batch_total: int | None = None, graphdef, policy: Policy, block_size: int, backend: str,
         precision, dense_reads: bool):
    """Stage 2 of `run`: the decode while loop from `start`'s state -> (final state, policy report)."""
    model = nnx.merge(graphdef, params)
    M = state.out.shape[1]
    rows = None if batch_total is None else (row_offset, batch_total)
    body = functools.partial(decode_step, model, policy, choose=chooser(rng, temperature, top_k, top_p, forced,
                                                                         use_forced, rows),
                             max_new=max_new, eos_id=eos_id, pad_id=pad_id, block_size=block_size, backend=backend,
                             precision=precision, dense_reads=dense_reads)
    final = jax.lax.while_loop(lambda st: (st.step < M) & ~jnp.all(st.done), body, state)
    return final, policy.report(final.policy_state)


def run(
    params,
    prompt,
    lengths,
    max_new,
    temperature,
    top_k,
    top_p,
    rng,
    eos_id,
    pad_id,
    forced,
    use_forced,
    *,
    graphdef,
    policy: Policy,
    block_size: int,
    cache_len: int,
    budget: int,
    backend: str,
    precision,
    return_masks: bool,
    return_logprobs: bool,
    return_stats: bool,
    prefill_chunk: int,
    min_sparse_context: int = 0,
    on_prefilled: Callable[[LoopState], Any] | None = None,
    return_recall: bool = False,
):
    """prompt int32 [B, T] right-padded, lengths int32 [B] -> (final `LoopState`, policy report).

    Two compiled programs, `start` (prefill) and `loop` (the decode steps, the
    state donated so the cache is updated in place): the decode loop can be
    timed apart from prefill, and one prefill program serves every
    `min_sparse_context`/backend choice of the loop. Everything that changes
    per call is an array (budget, sampling knobs, seed, EOS/pad ids), so
    such changes reuse the programs. forced: int32 [B, M], emitted instead
    of sampled tokens when the bool `use_forced` is set (teacher forcing
    through the decode loop; tests and benchmarks replay recorded traces);
    both are arrays so forcing compiles no second program.
    min_sparse_context: below this cache length the kernel reads every causal
    block, through the policy's token mask (same results; see
    `generation.generate`). on_prefilled: called with `start`'s state before
    the loop is dispatched (`generate(return_timing=True)` syncs there).
    """
    knobs = (max_new, temperature, top_k, top_p, rng, eos_id, pad_id, forced, use_forced)
    state = start(params, prompt, lengths, *knobs, graphdef=graphdef, policy=policy, block_size=block_size,
                  cache_len=cache_len, budget=budget, return_masks=return_masks, return_logprobs=return_logprobs,
                  return_stats=return_stats, prefill_chunk=prefill_chunk, return_recall=return_recall)
    if on_prefilled is not None:
        on_prefilled(state)
    return loop(params, state, *knobs, graphdef=graphdef, policy=policy, block_size=block_size, backend=backend,
                precision=precision, dense_reads=cache_len < min_sparse_context)


@functools.partial(
    jax.jit,
    static_argnames=("mesh", "graphdef", "policy", "block_size", "cache_len", "budget", "backend", "precision",
                     "return_masks", "return_logprobs", "return_stats", "prefill_chunk", "dense_reads",
                     "return_recall"),
)
def run_sharded(params, prompt, lengths, max_new, temperature, top_k, top_p, rng, eos_id, pad_id, forced,
                use_forced, *, mesh, graphdef, policy: Policy, block_size: int, cache_len: int, budget: int,
                backend: str, precision, return_masks: bool, return_logprobs: bool, return_stats: bool,
                prefill_chunk: int, dense_reads: bool, return_recall: bool = False):
    """`run` with the batch split over the mesh's "data" axis: each device prefills and decodes its
    own rows (its KV cache, policy state and loop stay on it; parameters are replicated) in one
    SPMD program (`jax.shard_map`), and its while loop stops when its own rows are done.
    -> (final `LoopState` without cache, policy state and step, policy report), batch-sharded.
    Sampling draws the whole batch's noise and takes each shard's rows, so tokens equal `run`'s."""
    from jax.sharding import PartitionSpec as P

    def local(params, prompt, lengths, forced, max_new, temperature, top_k, top_p, rng, eos_id, pad_id, use_forced):
        b = prompt.shape[0]
        knobs = (max_new, temperature, top_k, top_p, rng, eos_id, pad_id, forced, use_forced,
                 jax.lax.axis_index("data") * b)
        total = dict(batch_total=b * mesh.shape["data"])
        state = start(params, prompt, lengths, *knobs, **total, graphdef=graphdef, policy=policy, block_size=block_size,
                      cache_len=cache_len, budget=budget, return_masks=return_masks,
                      return_logprobs=return_logprobs, return_stats=return_stats, prefill_chunk=prefill_chunk,
                      return_recall=return_recall)
        final, report = loop(params, state, *knobs, **total, graphdef=graphdef, policy=policy, block_size=block_size,
                             backend=backend, precision=precision, dense_reads=dense_reads)
        # only per-row results leave the shard: every leaf is batch-major, so one spec fits all
        return final.replace(cache=None, policy_state=None, step=None), report

    batch, same = P("data"), P()
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(same, batch, batch, batch, *(same,) * 8),
                            out_specs=batch, check_vma=False)
    return sharded(params, prompt, lengths, forced, max_new, temperature, top_k, top_p, rng, eos_id, pad_id,
                   use_forced)
