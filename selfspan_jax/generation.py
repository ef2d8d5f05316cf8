"""Jitted generation with a pluggable attention policy (self-selected spans, dense).

One compiled program per shape bucket does everything on device:

1. prefill: a full forward over the right-padded prompts with the policy's
   mask (the span mask of DESIGN.md §2 for `self_span`), writing the KV cache;
   the first token is sampled from the logits at each prompt's last position;
2. a `lax.while_loop`, one token per step: the emitted token is appended to the
   policy state, the policy turns that state into the kernel's block list and
   token mask for this query, and `model.decode_step` runs with
   `pallas_kernels.block_sparse_decode` as its attention. Each sequence stops at
   EOS or its token budget; the loop ends when all have stopped.

Shape buckets: the prompt length is padded to a power of two (>= 16), the
token budget to a power of two, and the cache length to a multiple of the
block size, so calls with other prompt lengths, budgets, temperatures or seeds
in the same bucket reuse the compiled program (a test checks the jit cache).

Shapes use the house letters: B batch, T prompt bucket, S cache length,
M token-budget bucket, N query heads, K KV heads, H head dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from pallas_kernels import block_sparse_decode
from pallas_kernels.backend import resolve_backend
from selfspan_jax.cache import KVCache
from selfspan_jax.policies import Policy, Selection, make_policy
from selfspan_jax.tokenizer import encode_prompt

# Prompt buckets start here so that short prompts share one program.
_MIN_PROMPT_BUCKET = 16


def _next_pow2(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------


def _filter_top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """scaled logits [B, V] -> the same with everything outside top-k, then top-p, set to -inf."""
    V = scaled.shape[-1]
    # [B, V] descending
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V).astype(jnp.int32)
    # [B, 1]
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, (scaled.shape[0],))[:, None], axis=-1)
    in_k = jnp.arange(V)[None, :] < k
    probs = jax.nn.softmax(jnp.where(in_k, sorted_desc, -jnp.inf), axis=-1)
    # keep rank r while the mass strictly before it is < top_p (rank 0 always)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & (mass_before < top_p)
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    # [B, 1]
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    cutoff = jnp.maximum(kth, pth)
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """Draws one token per row: logits [B, V] -> int32 [B].

    temperature <= 0 means greedy (argmax of the raw logits). Otherwise the
    logits are divided by the temperature, then restricted to the `top_k`
    largest (top_k <= 0: no limit), then to the smallest set of those whose
    renormalised probability reaches `top_p` (top_p >= 1: no limit), and a
    token is drawn from what remains. Ties at a cut-off are kept. All three
    knobs are arrays (traced), so changing them does not recompile; the sort
    behind the limits runs only when one is in use (`lax.cond`).
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = temperature > 0
    scaled = logits / jnp.where(sampling, temperature, 1.0)
    limited = sampling & ((top_k > 0) | (top_p < 1.0))
    scaled = jax.lax.cond(limited, _filter_top_k_top_p, lambda x, *_: x, scaled, top_k, top_p)
    drawn = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(sampling, drawn, greedy)


# ---------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------


@struct.dataclass
class _LoopState:
    """Everything the while_loop carries.

    step: int32 []: tokens emitted so far; the token at out[:, step-1] is the
        one the next iteration feeds to the model.
    out: int32 [B, M]: emitted tokens; `pad` after a sequence has stopped.
    logprobs: f32 [B, M]: log p(out[b, m]) under the model's own distribution
        (raw logits: no temperature, no top-k/top-p), 0 after a stop.
    done: bool [B]: the sequence emitted EOS or used its budget.
    num_tokens: int32 [B]: tokens emitted per sequence (EOS included).
    cache: the KV cache; cache.lengths[b] is the position of the next fed token.
    policy_state: the policy's own pytree (span decode state for self_span).
    rng: PRNG key, folded with the step for each draw.
    visible: int32 [B, M]: keys the query that produced out[b, m] attended to
        (from the token mask actually passed to the kernel; 0 for m = 0,
        which comes from prefill).
    causal: int32 [B, M]: keys causally available to that query (position + 1).
    blocks: f32 [B, M]: KV blocks the kernel read for it (mean over KV heads
        for per-head lists).
    dense_blocks: int32 [B, M]: blocks a dense read would have touched.
    fallback: bool [B, M]: the policy had switched that sequence to dense.
    masks: bool [B, M, S] visibility rows (only with return_masks), else None.
    """

    step: jax.Array
    out: jax.Array
    logprobs: jax.Array
    done: jax.Array
    num_tokens: jax.Array
    cache: KVCache
    policy_state: Any
    rng: jax.Array
    visible: jax.Array
    causal: jax.Array
    blocks: jax.Array
    dense_blocks: jax.Array
    fallback: jax.Array
    masks: Any


def _chosen_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """logits [B, V], tokens [B] -> log_softmax(logits)[b, tokens[b]] in fp32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def _selection_stats(sel: Selection, pos: jax.Array, block_size: int):
    """Measured from the selection itself: (visible [B], blocks read f32 [B], dense blocks [B])."""
    S = sel.token_mask.shape[-1]
    causal = jnp.arange(S)[None, :] <= pos[:, None]
    visible = jnp.sum(sel.token_mask & causal, axis=-1).astype(jnp.int32)
    counts = sel.block_counts.astype(jnp.float32)
    if counts.ndim == 2:  # per-KV-head lists [B, K]
        counts = jnp.mean(counts, axis=-1)
    return visible, counts, (pos // block_size + 1).astype(jnp.int32)


def _chunked_prefill(model, prompt, mask, lengths, cache_len: int, chunk: int):
    """Prefill `chunk` sequences at a time -> (cache, last-position logits [B, V]).

    The full-sequence forward materialises [B, K, G, T, T] scores and
    [B, T, V] logits; at LLaMA-7B shapes, batch 32 and 2k-token prompts that is
    tens of GB. Sub-batches bound the transient memory to chunk / B of it
    while writing into one cache.
    """
    B = prompt.shape[0]
    cache = KVCache.init(model.config, B, cache_len)
    last = jnp.zeros((B, model.config.vocab_size), jnp.float32)

    def one(i, carry):
        cache, last = carry
        rows = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=0)  # noqa: E731
        sub_len = rows(lengths)
        logits, sub = model.prefill(rows(prompt), KVCache.init(model.config, chunk, cache_len),
                                    attention_mask=rows(mask), lengths=sub_len)
        k = jax.lax.dynamic_update_slice_in_dim(cache.k, sub.k, i * chunk, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cache.v, sub.v, i * chunk, axis=1)
        sub_last = logits[jnp.arange(chunk), sub_len - 1]
        return cache.replace(k=k, v=v), jax.lax.dynamic_update_slice_in_dim(last, sub_last, i * chunk, axis=0)

    cache, last = jax.lax.fori_loop(0, B // chunk, one, (cache, last))
    return cache.replace(lengths=lengths.astype(jnp.int32)), last


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef", "policy", "block_size", "cache_len", "budget", "backend", "precision", "return_masks",
        "prefill_chunk",
    ),
)
def _generate_jit(
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
    prefill_chunk: int,
):
    """prompt int32 [B, T] right-padded, lengths int32 [B] -> (final loop state, policy report).

    forced: int32 [B, M], emitted instead of sampled tokens when the bool
    `use_forced` is set (teacher forcing through the decode loop; tests and
    benchmarks replay recorded traces). Both are arrays so that forcing does
    not compile a second program.
    """
    model = nnx.merge(graphdef, params)
    B, T = prompt.shape
    M, S = budget, cache_len
    batch_idx = jnp.arange(B)

    # [B, T, T]
    mask = policy.prefill_mask(prompt, lengths)
    if prefill_chunk >= B:
        # logits [B, T, V]
        logits, cache = model.prefill(prompt, KVCache.init(model.config, B, S), attention_mask=mask, lengths=lengths)
        # [B, V]
        last = logits[batch_idx, lengths - 1]
    else:
        cache, last = _chunked_prefill(model, prompt, mask, lengths, S, prefill_chunk)
    policy_state = policy.init_state(prompt, lengths, S)

    def choose(step_logits, step):
        drawn = sample_logits(step_logits, jax.random.fold_in(rng, step), temperature, top_k, top_p)
        given = jax.lax.dynamic_index_in_dim(forced, step, axis=1, keepdims=False)
        return jnp.where(use_forced, given, drawn)

    tok0 = choose(last, 0)
    zeros_i = jnp.zeros((B, M), jnp.int32)
    state = _LoopState(
        step=jnp.int32(1),
        out=jnp.full((B, M), pad_id, jnp.int32).at[:, 0].set(tok0),
        logprobs=jnp.zeros((B, M), jnp.float32).at[:, 0].set(_chosen_logprob(last, tok0)),
        done=(tok0 == eos_id) | (max_new <= 1),
        num_tokens=jnp.ones((B,), jnp.int32),
        cache=cache,
        policy_state=policy_state,
        rng=rng,
        visible=zeros_i,
        causal=zeros_i,
        blocks=jnp.zeros((B, M), jnp.float32),
        dense_blocks=zeros_i,
        fallback=jnp.zeros((B, M), bool),
        masks=jnp.zeros((B, M, S), bool) if return_masks else None,
    )

    def cond(st: _LoopState):
        return (st.step < M) & ~jnp.all(st.done)

    def body(st: _LoopState):
        # [B] the token emitted last step; it sits at position pos[b]
        fed = jax.lax.dynamic_index_in_dim(st.out, st.step - 1, axis=1, keepdims=False)
        pos = st.cache.lengths
        pstate = policy.update(st.policy_state, fed)
        kw = dict(block_size=block_size, cache_len=S)
        if policy.query_aware:
            # Layers are traced in Python, so the per-layer selections can be
            # read back for statistics; the last layer's stands for the step.
            seen: list[Selection] = []

            def attention_fn(q, k_all, v_all, layer_idx):
                # The policy scores this layer's keys; the attention itself
                # reads the stacked cache in place.
                s = policy.select(pstate, pos, q=q, k=k_all[layer_idx], layer_idx=layer_idx, **kw)
                seen.append(s)
                return block_sparse_decode(
                    q, k_all, v_all, s.block_indices, s.block_counts, s.token_mask, block_size=block_size,
                    backend=backend, precision=precision, layer=layer_idx,
                )

            step_logits, cache = model.decode_step(fed, st.cache, attention_fn=attention_fn)
            sel = seen[-1]
        else:
            sel = policy.select(pstate, pos, **kw)

            def attention_fn(q, k_all, v_all, layer_idx):
                # layer=: the kernel reads the listed blocks straight out of the
                # stacked cache; a k_all[layer_idx] slice would be copied whole
                # every step (docs/notes/generation.md).
                return block_sparse_decode(
                    q, k_all, v_all, sel.block_indices, sel.block_counts, sel.token_mask, block_size=block_size,
                    backend=backend, precision=precision, layer=layer_idx,
                )

            step_logits, cache = model.decode_step(fed, st.cache, attention_fn=attention_fn)

        tok = choose(step_logits, st.step)
        active = ~st.done
        visible, blocks, dense_blocks = _selection_stats(sel, pos, block_size)
        fallback = policy.fallback(pstate, B)

        def put(buf, value, empty):
            col = jnp.where(active, value, empty).astype(buf.dtype)
            return jax.lax.dynamic_update_index_in_dim(buf, col, st.step, axis=1)

        masks = st.masks
        if return_masks:
            row = jnp.where(active[:, None], sel.token_mask & (jnp.arange(S)[None, :] <= pos[:, None]), False)
            masks = jax.lax.dynamic_update_index_in_dim(masks, row, st.step, axis=1)
        done = st.done | (active & (tok == eos_id)) | (st.step + 1 >= max_new)
        return _LoopState(
            step=st.step + 1,
            out=put(st.out, tok, pad_id),
            logprobs=put(st.logprobs, _chosen_logprob(step_logits, tok), 0.0),
            done=done,
            num_tokens=st.num_tokens + active.astype(jnp.int32),
            cache=cache,
            policy_state=pstate,
            rng=st.rng,
            visible=put(st.visible, visible, 0),
            causal=put(st.causal, pos + 1, 0),
            blocks=put(st.blocks, blocks, 0.0),
            dense_blocks=put(st.dense_blocks, dense_blocks, 0),
            fallback=put(st.fallback, fallback, False),
            masks=masks,
        )

    final = jax.lax.while_loop(cond, body, state)
    return final, policy.report(final.policy_state)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class GenerateOutput:
    """Result of `generate`; all arrays are numpy, batch-major.

    tokens: int32 [B, M]: generated ids (EOS included when emitted), `pad`
        after each sequence's end; `num_tokens[b]` of them are real.
    num_tokens: int32 [B].
    prompt_lengths: int32 [B].
    texts: decoded generations (EOS and padding dropped) when a tokenizer was
        given, else None.
    logprobs: f32 [B, M] log-probability of each generated token under the
        model (raw logits) when return_logprobs, else None.
    stats: per-step measurements, [B, M] each, indexed like `tokens`; entry m
        describes the decode step that produced tokens[:, m] (m >= 1; m = 0
        comes from prefill and is not a decode step, see `step_valid`):
        attended_fraction (visible keys / keys at or before the query),
        block_fraction (KV blocks read / blocks a dense read touches),
        visible, causal, blocks_read, dense_blocks, fallback (policy had
        switched the sequence to dense), step_valid.
    masks: bool [B, M, S] visibility rows used for each decode step (only
        with return_masks).
    policy: the policy's name.
    policy_report: per-sequence counters from the policy's final state
        ({name: [B]}; for self_span: segments, fallback_dense,
        unclosed_headers, ignored_refs, stray_markers).
    """

    tokens: np.ndarray
    num_tokens: np.ndarray
    prompt_lengths: np.ndarray
    texts: list[str] | None
    logprobs: np.ndarray | None
    stats: dict[str, np.ndarray]
    masks: np.ndarray | None
    policy: str
    policy_report: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def concatenate(cls, outputs: Sequence["GenerateOutput"]) -> "GenerateOutput":
        """One output for several batches of the same call (same policy and token budget), batch-major
        in the given order; `summary()` of the result aggregates over all of them. Mask rows of
        different cache lengths are padded with False (not visible)."""
        outputs = list(outputs)
        if not outputs:
            raise ValueError("nothing to concatenate")
        if len({o.policy for o in outputs}) > 1 or len({o.tokens.shape[1] for o in outputs}) > 1:
            raise ValueError("outputs of different policies or token budgets cannot be concatenated: "
                             f"{[(o.policy, o.tokens.shape[1]) for o in outputs]}")
        if len(outputs) == 1:
            return outputs[0]
        cat = lambda name: np.concatenate([getattr(o, name) for o in outputs])  # noqa: E731
        masks = None
        if all(o.masks is not None for o in outputs):
            S = max(o.masks.shape[-1] for o in outputs)
            masks = np.concatenate([np.pad(o.masks, ((0, 0), (0, 0), (0, S - o.masks.shape[-1])))
                                    for o in outputs])
        return cls(
            tokens=cat("tokens"),
            num_tokens=cat("num_tokens"),
            prompt_lengths=cat("prompt_lengths"),
            texts=None if any(o.texts is None for o in outputs) else [t for o in outputs for t in o.texts],
            logprobs=None if any(o.logprobs is None for o in outputs) else cat("logprobs"),
            stats={k: np.concatenate([o.stats[k] for o in outputs]) for k in outputs[0].stats},
            masks=masks,
            policy=outputs[0].policy,
            policy_report={k: np.concatenate([o.policy_report[k] for o in outputs])
                           for k in outputs[0].policy_report},
        )

    def sequences(self) -> list[np.ndarray]:
        """Generated ids of each sequence, trimmed to `num_tokens`."""
        return [self.tokens[b, : self.num_tokens[b]] for b in range(len(self.num_tokens))]

    def summary(self) -> dict[str, float]:
        """Aggregates over all real decode steps of the batch.

        mean_attended_fraction: mean over steps of the per-step fraction;
        token_read_fraction: visible keys summed / causal keys summed;
        kv_read_fraction: KV blocks read summed / dense blocks summed (the
            fraction of KV-cache bytes the kernel read);
        fallback_steps: steps taken in a dense fallback;
        decode_steps, generated_tokens.
        """
        s, ok = self.stats, self.stats["step_valid"]
        n = int(ok.sum())

        def ratio(a, b):
            den = float(b[ok].sum())
            return float(a[ok].sum()) / den if den else float("nan")

        return {
            "mean_attended_fraction": float(s["attended_fraction"][ok].mean()) if n else float("nan"),
            "token_read_fraction": ratio(s["visible"], s["causal"]),
            "kv_read_fraction": ratio(s["blocks_read"], s["dense_blocks"]),
            "fallback_steps": int(s["fallback"][ok].sum()),
            "decode_steps": n,
            "generated_tokens": int(self.num_tokens.sum()),
        }


def _prepare_prompts(prompts, tokenizer, prompt_lengths) -> tuple[list[list[int]], None]:
    """Normalises prompts to a list of id lists."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token-array prompts must be integer [B, T], got dtype {arr.dtype} shape {arr.shape}")
        if prompt_lengths is None:
            lens = [arr.shape[1]] * arr.shape[0]
        else:
            lens = [int(x) for x in np.asarray(prompt_lengths).reshape(-1)]
            if len(lens) != arr.shape[0]:
                raise ValueError(f"prompt_lengths has {len(lens)} entries for {arr.shape[0]} prompts")
            bad = [n for n in lens if not 1 <= n <= arr.shape[1]]
            if bad:
                raise ValueError(f"prompt_lengths must be in [1, {arr.shape[1]}], got {bad}")
        return [arr[b, :n].tolist() for b, n in enumerate(lens)]
    if prompt_lengths is not None:
        raise ValueError("prompt_lengths is only for a padded token array")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer")
            # The same ids training saw for this text (one BOS, never doubled)
            out.append(encode_prompt(tokenizer, p))
        else:
            out.append([int(x) for x in np.asarray(p).reshape(-1)])
    empty = [i for i, p in enumerate(out) if not p]
    if empty:
        raise ValueError(f"prompts {empty} are empty")
    return out


def generate(
    model,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | np.ndarray,
    *,
    policy: str | Policy = "self_span",
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    block_size: int = 64,
    backend: str = "auto",
    max_segments: int = 64,
    tokenizer=None,
    span_tokens=None,
    return_logprobs: bool = False,
    return_masks: bool = False,
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    forced_tokens: np.ndarray | None = None,
    precision: str | None = None,
    prefill_chunk: int | None = None,
) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens per prompt with the given attention policy.

    prompts: strings (`tokenizer.encode_prompt`: BOS once + span-aware ids, what training
        uses for a record's prompt), id lists of
        different lengths, or an int array [B, T] (with `prompt_lengths` when
        it is right-padded).
    policy: "self_span" (spans the model writes, DESIGN.md §2), "dense", or a
        `policies.Policy` instance (SparQ/ADORE-style policies plug in here).
    temperature 0 is greedy; top_k / top_p filter the sampling distribution.
    block_size: KV block size of the kernel; the cache length is rounded up
        to a multiple of it.
    backend: the kernel backend ("auto" = pallas on GPU, xla elsewhere).
    max_segments: segment limit of the span language.
    span_tokens: `spans.SpanTokens`; derived from `tokenizer` when omitted.
    eos_id / pad_id: default to the tokenizer's; without either, generation
        only stops at the budget.
    forced_tokens: int [B, >= max_new_tokens]: emit these instead of sampling
        (teacher forcing through the same loop; used to replay recorded span
        traces in benchmarks).
    precision: dot precision of the attention kernel (None = backend default,
        which is tf32 for float32 on a GPU; "highest" for exact fp32).
    prefill_chunk: prefill this many sequences at a time (must divide the
        batch); bounds prefill memory at large batch x prompt length.
    """
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    backend = resolve_backend(backend)
    if prefill_chunk is not None and (not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive int or None, got {prefill_chunk!r}")
    if span_tokens is None and tokenizer is not None and not isinstance(policy, Policy) and policy == "self_span":
        from selfspan_jax.spans import SpanTokens

        span_tokens = SpanTokens.from_tokenizer(tokenizer)
    pol = make_policy(policy, span_tokens=span_tokens, max_segments=max_segments)

    ids = _prepare_prompts(prompts, tokenizer, prompt_lengths)
    B = len(ids)
    if prefill_chunk is not None and B % prefill_chunk:
        raise ValueError(f"prefill_chunk={prefill_chunk} must divide the batch size {B}")
    lengths = np.array([len(p) for p in ids], np.int32)
    T = _next_pow2(lengths.max(), _MIN_PROMPT_BUCKET)
    M = _next_pow2(max_new_tokens)
    S = _round_up(T + M, block_size)
    max_seq = getattr(model.config, "max_seq_len", None)
    if max_seq is not None and lengths.max() + max_new_tokens > max_seq:
        raise ValueError(
            f"prompt length {int(lengths.max())} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_seq_len {max_seq}"
        )

    if eos_id is None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    eos = -1 if eos_id is None else int(eos_id)
    prompt = np.full((B, T), pad_id, np.int32)
    for b, p in enumerate(ids):
        prompt[b, : len(p)] = p
    vocab = model.config.vocab_size
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise ValueError(f"prompt ids must be in [0, {vocab}), got range [{prompt.min()}, {prompt.max()}]")

    forced = np.full((B, M), pad_id, np.int32)
    if forced_tokens is not None:
        f = np.asarray(forced_tokens, np.int32)
        if f.ndim != 2 or f.shape[0] != B or f.shape[1] < max_new_tokens:
            raise ValueError(f"forced_tokens must be [B={B}, >= {max_new_tokens}], got shape {f.shape}")
        if f.min() < 0 or f.max() >= vocab:
            raise ValueError(f"forced_tokens must be in [0, {vocab}), got range [{f.min()}, {f.max()}]")
        forced[:, :max_new_tokens] = f[:, :max_new_tokens]

    graphdef, params = nnx.split(model)
    st, report = _generate_jit(
        params,
        jnp.asarray(prompt),
        jnp.asarray(lengths),
        jnp.int32(max_new_tokens),
        jnp.float32(temperature),
        jnp.int32(0 if top_k is None else top_k),
        jnp.float32(1.0 if top_p is None else top_p),
        jax.random.key(seed),
        jnp.int32(eos),
        jnp.int32(pad_id),
        jnp.asarray(forced),
        jnp.bool_(forced_tokens is not None),
        graphdef=graphdef,
        policy=pol,
        block_size=int(block_size),
        cache_len=S,
        budget=M,
        backend=backend,
        precision=precision,
        return_masks=return_masks,
        prefill_chunk=B if prefill_chunk is None else int(prefill_chunk),
    )
    # host transfer = the sync point for anyone timing generate()
    out = np.asarray(st.out)[:, :max_new_tokens]
    num = np.asarray(st.num_tokens)
    m = np.arange(max_new_tokens)
    step_valid = (m[None, :] >= 1) & (m[None, :] < num[:, None])
    visible = np.asarray(st.visible)[:, :max_new_tokens]
    causal = np.asarray(st.causal)[:, :max_new_tokens]
    blocks = np.asarray(st.blocks)[:, :max_new_tokens]
    dense_blocks = np.asarray(st.dense_blocks)[:, :max_new_tokens]
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = {
            "attended_fraction": np.where(step_valid, visible / np.maximum(causal, 1), np.nan),
            "block_fraction": np.where(step_valid, blocks / np.maximum(dense_blocks, 1), np.nan),
            "visible": visible,
            "causal": causal,
            "blocks_read": blocks,
            "dense_blocks": dense_blocks,
            "fallback": np.asarray(st.fallback)[:, :max_new_tokens],
            "step_valid": step_valid,
        }
    texts = None
    if tokenizer is not None:
        texts = []
        for b in range(B):
            seq = [int(t) for t in out[b, : num[b]] if t != eos]
            texts.append(tokenizer.decode(seq, skip_special_tokens=False))
    return GenerateOutput(
        tokens=out,
        num_tokens=num,
        prompt_lengths=lengths,
        texts=texts,
        logprobs=np.asarray(st.logprobs)[:, :max_new_tokens] if return_logprobs else None,
        stats=stats,
        masks=np.asarray(st.masks)[:, :max_new_tokens] if return_masks else None,
        policy=pol.name,
        policy_report={k: np.asarray(v) for k, v in report.items()},
    )
