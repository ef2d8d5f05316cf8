"""The jitted decode loop: prefill, then one token per step with the policy's attention.

Two compiled programs per shape bucket (`start`, then `loop`, which takes
the state donated) do everything on device:

1. `prefill`: a full forward over the right-padded prompts with the policy's
   mask (the span mask of docs/spec.md §2 for `self_span`), writing the KV cache,
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

Why one file of ~470 lines: it is everything the two compiled programs trace
(their state, inputs and options, prefill, the step and the attention hook),
read top to bottom; what the loop measures is `loop_stats`, what it reads is
`selection`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from pallas_kernels import block_sparse_decode
from pallas_kernels.token_sparse_decode import token_sparse_decode
from selfspan_jax.cache import KVCache
from selfspan_jax.loop_stats import attention_recall, selection_stats
from selfspan_jax.policies import Policy
from selfspan_jax.selection import Selection, dense_selection
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
        (`LoopOptions.stats`, a static flag: without it the loop computes none).
    visible: f32 [B, M]: keys the query that produced out[b, m] attended to
        (from the selection actually passed to the kernel, mean over KV heads
        for per-head lists; 0 for m = 0, which comes from prefill).
    causal: int32 [B, M]: keys causally available to that query (position + 1).
    blocks: f32 [B, M]: KV blocks the kernel read for it (mean over KV heads
        for per-head lists).
    dense_blocks: int32 [B, M]: blocks a dense read would have touched.
    fallback: bool [B, M]: the policy had switched that sequence to dense.
    rebuilt: f32 [B, M]: released tokens the policy re-admitted for that query (ADORE).
    masks: bool [B, M, S] visibility rows (only with `LoopOptions.masks`), else None.
    recall: f32 [B, M, L] (only with `LoopOptions.recall`), else None: per layer, the share of the
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


def attention_fn_for(options: "LoopOptions", pstate, pos, *, cache_len: int, recalls: list | None = None
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

    options.dense_reads: hand the kernel every causal block with the policy's
    own token mask (`read_causal_blocks`): the same attention, no block list
    to build (the "dense path" of `min_sparse_context`).
    """
    policy, block_size, backend, precision = options.policy, options.block_size, options.backend, options.precision
    dense_reads = options.dense_reads
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


@struct.dataclass
class LoopInputs:
    """What a call gives the compiled programs as arrays, so calls that change it reuse them.

    prompt: int32 [B, T] right-padded; lengths: int32 [B].
    max_new: int32 []: the token budget (the bucket `LoopOptions.budget` bounds it).
    temperature f32 [], top_k int32 [] (0 = no limit), top_p f32 [] (1 = no limit), rng: a key
        (`sampling.Sampling.arrays`).
    eos_id: int32 [] (-1 = none); pad_id: int32 [].
    forced: int32 [B, M], emitted instead of sampled tokens when the bool [] `use_forced` is set
        (teacher forcing; both are arrays, so forcing compiles no second program).
    row_offset: int32 []: these rows' place in a batch split over devices (`run_sharded`), for the
        sampler's noise.
    """

    prompt: jax.Array
    lengths: jax.Array
    max_new: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    rng: jax.Array
    eos_id: jax.Array
    pad_id: jax.Array
    forced: jax.Array
    use_forced: jax.Array
    row_offset: Any = 0


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """The static half of a call: one compiled program per distinct value (with the model's graph).

    policy, block_size, cache_len (S), budget (M): what the programs are built for.
    logprobs, masks, stats, recall: what the loop records (`LoopState`; each off = not computed).
    backend, precision: the kernels' (`pallas_kernels.block_sparse_decode`).
    prefill_chunk: prefill this many sequences at a time (None = the whole batch at once).
    dense_reads: the kernel reads every causal block through the policy's token mask
        (`generate`'s `min_sparse_context`).
    batch_total: the whole batch when these rows are one device's part of it (`run_sharded`).
    """

    policy: Policy
    block_size: int
    cache_len: int
    budget: int
    logprobs: bool = False
    masks: bool = False
    stats: bool = True
    recall: bool = False
    backend: str = "xla"
    precision: str | None = None
    prefill_chunk: int | None = None
    dense_reads: bool = False
    batch_total: int | None = None

    def prefill_part(self) -> "LoopOptions":
        """The fields `start` reads, the kernel's at their defaults: one prefill program serves
        every backend, precision and `dense_reads` of the loop."""
        return dataclasses.replace(self, backend="xla", precision=None, dense_reads=False)

    def loop_part(self) -> "LoopOptions":
        """The fields `loop` reads: one loop program serves every prefill chunking."""
        return dataclasses.replace(self, prefill_chunk=None)


def decode_step(model, st: LoopState, inputs: LoopInputs, options: LoopOptions, choose: Callable) -> LoopState:
    """One loop iteration: feed the last emitted token, attend through the policy, emit the next."""
    policy, block_size = options.policy, options.block_size
    B, S = st.out.shape[0], st.cache.k.shape[3]
    # [B] the token emitted last step; it sits at position pos[b]
    fed = jax.lax.dynamic_index_in_dim(st.out, st.step - 1, axis=1, keepdims=False)
    pos = st.cache.lengths
    active = ~st.done
    pstate = policy.update(st.policy_state, fed, active)
    recalls = None if st.recall is None else []
    attention_fn, selection = attention_fn_for(options, pstate, pos, cache_len=S, recalls=recalls)
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
        visible, blocks, dense_blocks = selection_stats(sel, pos, block_size)
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
        out=put(st.out, tok, inputs.pad_id),
        logprobs=logprobs,
        done=st.done | (active & (tok == inputs.eos_id)) | (st.step + 1 >= inputs.max_new),
        num_tokens=st.num_tokens + active.astype(jnp.int32),
        cache=cache,
        policy_state=pstate,
        masks=masks,
        **stats,
    )


def initial_state(cache: KVCache, policy_state, tok0, logprob0, inputs: LoopInputs, options: LoopOptions
                  ) -> LoopState:
    """The loop's state after prefill emitted tok0 [B] (logprob0 [B] or None: no log-probs asked)."""
    B, M, S = tok0.shape[0], options.budget, cache.max_len
    zeros_i = jnp.zeros((B, M), jnp.int32)
    stat = lambda x: x if options.stats else None  # noqa: E731
    return LoopState(
        step=jnp.int32(1),
        out=jnp.full((B, M), inputs.pad_id, jnp.int32).at[:, 0].set(tok0),
        logprobs=None if logprob0 is None else jnp.zeros((B, M), jnp.float32).at[:, 0].set(logprob0),
        done=(tok0 == inputs.eos_id) | (inputs.max_new <= 1),
        num_tokens=jnp.ones((B,), jnp.int32),
        cache=cache,
        policy_state=policy_state,
        visible=stat(jnp.zeros((B, M), jnp.float32)),
        causal=stat(zeros_i),
        blocks=stat(jnp.zeros((B, M), jnp.float32)),
        dense_blocks=stat(zeros_i),
        fallback=stat(jnp.zeros((B, M), bool)),
        rebuilt=stat(jnp.zeros((B, M), jnp.float32)),
        masks=jnp.zeros((B, M, S), bool) if options.masks else None,
        recall=jnp.zeros((B, M, cache.k.shape[0]), jnp.float32) if options.recall else None,
    )


def chooser(inputs: LoopInputs, batch_total: int | None = None) -> Callable:
    """choose(step_logits, step) -> [B] tokens: sampled, or the forced column when `use_forced`.
    batch_total: the whole batch when these rows are one device's part of it (their place in it is
    `inputs.row_offset`), so each shard draws its rows of the whole batch's noise."""
    rows = None if batch_total is None else (inputs.row_offset, batch_total)

    def choose(step_logits, step):
        drawn = sample_logits(step_logits, jax.random.fold_in(inputs.rng, step), inputs.temperature, inputs.top_k,
                              inputs.top_p, rows=rows)
        given = jax.lax.dynamic_index_in_dim(inputs.forced, step, axis=1, keepdims=False)
        return jnp.where(inputs.use_forced, given, drawn)

    return choose


@functools.partial(jax.jit, static_argnames=("graphdef", "options"))
def start(params, inputs: LoopInputs, *, graphdef, options: LoopOptions) -> LoopState:
    """Stage 1 of `run`: prefill, the first token, the loop's initial state."""
    model = nnx.merge(graphdef, params)
    B = inputs.prompt.shape[0]
    cache, last, policy_state = prefill(model, options.policy, inputs.prompt, inputs.lengths,
                                        cache_len=options.cache_len, block_size=options.block_size,
                                        prefill_chunk=B if options.prefill_chunk is None else options.prefill_chunk)
    tok0 = chooser(inputs, options.batch_total)(last, 0)
    return initial_state(cache, policy_state, tok0, chosen_logprob(last, tok0) if options.logprobs else None,
                         inputs, options)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "options"),
    donate_argnames=("state",),  # the cache and buffers are updated in place
)
def loop(params, state: LoopState, inputs: LoopInputs, *, graphdef, options: LoopOptions):
    """Stage 2 of `run`: the decode while loop from `start`'s state -> (final state, policy report)."""
    model = nnx.merge(graphdef, params)
    M = state.out.shape[1]
    body = functools.partial(decode_step, model, inputs=inputs, options=options,
                             choose=chooser(inputs, options.batch_total))
    final = jax.lax.while_loop(lambda st: (st.step < M) & ~jnp.all(st.done), body, state)
    return final, options.policy.report(final.policy_state)


def run(params, inputs: LoopInputs, *, graphdef, options: LoopOptions,
        on_prefilled: Callable[[LoopState], Any] | None = None):
    """`inputs` -> (final `LoopState`, policy report).

    Two compiled programs, `start` (prefill) and `loop` (the decode steps, the
    state donated so the cache is updated in place): the decode loop can be
    timed apart from prefill, and one prefill program serves every kernel
    choice of the loop (`LoopOptions.prefill_part`). Everything that changes
    per call is an array (`LoopInputs`: budget, sampling knobs, seed, EOS/pad
    ids, forcing), so such changes reuse the programs. on_prefilled: called
    with `start`'s state before the loop is dispatched
    (`generate(outputs=Outputs(timing=True))` syncs there).
    """
    state = start(params, inputs, graphdef=graphdef, options=options.prefill_part())
    if on_prefilled is not None:
        on_prefilled(state)
    return loop(params, state, inputs, graphdef=graphdef, options=options.loop_part())


@functools.partial(jax.jit, static_argnames=("mesh", "graphdef", "options"))
def run_sharded(params, inputs: LoopInputs, *, mesh, graphdef, options: LoopOptions):
    """`run` with the batch split over the mesh's "data" axis: each device prefills and decodes its
    own rows (its KV cache, policy state and loop stay on it; parameters are replicated) in one
    SPMD program (`jax.shard_map`), and its while loop stops when its own rows are done.
    `options.prefill_chunk` counts a device's rows.
    -> (final `LoopState` without cache, policy state and step, policy report), batch-sharded.
    Sampling draws the whole batch's noise and takes each shard's rows, so tokens equal `run`'s."""
    from jax.sharding import PartitionSpec as P

    def local(params, inputs):
        b = inputs.prompt.shape[0]
        inputs = inputs.replace(row_offset=jax.lax.axis_index("data") * b)
        opts = dataclasses.replace(options, batch_total=b * mesh.shape["data"])
        state = start(params, inputs, graphdef=graphdef, options=opts.prefill_part())
        final, report = loop(params, state, inputs, graphdef=graphdef, options=opts.loop_part())
        # only per-row results leave the shard: every leaf is batch-major, so one spec fits all
        return final.replace(cache=None, policy_state=None, step=None), report

    batch, same = P("data"), P()
    specs = jax.tree.map(lambda _: same, inputs).replace(prompt=batch, lengths=batch, forced=batch)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(same, specs), out_specs=batch, check_vma=False)
    return sharded(params, inputs)
