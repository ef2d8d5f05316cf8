"""Generation: the consistency property, stopping, sampling, statistics, compile reuse.

The oracle for everything the loop computes is the full-sequence forward
`model(final_tokens, attention_mask=...)` on the final sequences (fp32), and
`spans.attention_mask` for the visibility rows; the sampler is checked against
a float64 NumPy implementation of temperature / top-k / top-p.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import hypothesis.strategies as hst
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import assume, example, given, settings

from selfspan_jax.config import LlamaConfig
from selfspan_jax.data.arithmetic import generate_examples
from selfspan_jax import decode_loop
from selfspan_jax.generation import GenerateOutput, KernelOptions, Outputs, generate
from selfspan_jax.model import Llama
from selfspan_jax.policies import DensePolicy, Policy, Selection, SelfSpanPolicy, make_policy
from selfspan_jax.sampling import Sampling, sample_logits
from selfspan_jax.spans import ANCHOR, REF_CLOSE, REF_OPEN, SpanTokens, attention_mask
from selfspan_jax.tokenizer import CharTokenizer

import test_spans as spans_ref  # the brute-force span rule
from conftest import draws

MAX_SEGMENTS = 8
# Pallas (interpret) needs block_size >= 16 and head dim >= 16.
BLOCK = 16
# Compilation dominates this file's run time, so the tests share shape
# buckets: batch 3, prompts of 65..128 tokens, budgets of 9..16 tokens, masks
# returned; the full-sequence oracle runs at one padded length.
BATCH, MAX_NEW, REF_LEN = 3, 12, 160
COMMON = dict(block_size=BLOCK)
XLA = KernelOptions(backend="xla")
MASKS = Outputs(masks=True)
WITH_LOGPROBS = Outputs(masks=True, logprobs=True)


def P(spec: str):
    """The policy `spec` names, self_span with this file's segment limit."""
    return make_policy(spec, tokenizer=CharTokenizer(), max_segments=MAX_SEGMENTS)


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def span_tokens(tok):
    return SpanTokens.from_tokenizer(tok)


@pytest.fixture(scope="module")
def model(tok):
    cfg = LlamaConfig(
        vocab_size=len(tok), d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_dim=64, max_seq_len=512
    )
    return Llama(cfg, rngs=nnx.Rngs(1234))


def _live_prompts(seed: int, n: int = BATCH) -> list[str]:
    """Prompts ending inside a later step whose header is already closed.

    Step k references only segment k, so with three finished steps before it
    the first generated token already attends to a strict subset of the
    context (the sparse path is live from the first decode step). Different
    numbers of body characters give uneven prompt lengths.
    """
    out = []
    for i, rec in enumerate(generate_examples(n, seed=seed, split="test", min_operands=5, max_operands=5)):
        lines = rec["completion"].split("\n")
        head = f"{ANCHOR}{REF_OPEN}4{REF_CLOSE}"
        out.append(rec["prompt"] + "\n".join(lines[:3]) + "\n" + head + lines[3][len(head) : len(head) + i])
    assert all(64 < len(CharTokenizer().encode(p)) <= 128 for p in out)  # one prompt bucket
    return out


def _final_sequences(out, prompt_ids):
    """Right-padded prompt + generated ids [B, REF_LEN] and their lengths [B]."""
    lengths = out.prompt_lengths + out.num_tokens
    seqs = np.zeros((len(prompt_ids), REF_LEN), np.int32)
    for b, ids in enumerate(prompt_ids):
        seqs[b, : len(ids)] = ids
        seqs[b, len(ids) : lengths[b]] = out.tokens[b, : out.num_tokens[b]]
    return seqs, lengths


@jax.jit
def _forward_jit(graphdef, state, tokens, mask):
    return jax.nn.log_softmax(nnx.merge(graphdef, state)(tokens, attention_mask=mask), axis=-1)


def _log_probs(model, seqs, mask):
    """fp32 full-sequence forward -> log-softmax [B, T, V] (float64 numpy)."""
    if mask is None:  # causal; padding at the end cannot change earlier rows
        T = seqs.shape[1]
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (seqs.shape[0], T, T))
    graphdef, state = nnx.split(model)
    return np.asarray(_forward_jit(graphdef, state, jnp.asarray(seqs), mask), np.float64)


def _teacher_forced(model, out, prompt_ids, mask):
    """log p(generated token m | prefix) from one full forward: float64 [B, M] (0 past the end)."""
    seqs, _ = _final_sequences(out, prompt_ids)
    logp = _log_probs(model, seqs, mask)
    ref = np.zeros(out.tokens.shape)
    for b, ids in enumerate(prompt_ids):
        for m in range(out.num_tokens[b]):
            ref[b, m] = logp[b, len(ids) + m - 1, out.tokens[b, m]]
    return ref


def _reference_mask(policy_name, seqs, lengths, span_tokens, max_segments=MAX_SEGMENTS):
    if policy_name == "dense":
        return None  # the model's default causal mask
    return attention_mask(jnp.asarray(seqs), span_tokens, max_segments, lengths=jnp.asarray(lengths))


def _check_rows_and_stats(out, seqs, lengths, span_tokens, policy_name, max_segments=MAX_SEGMENTS):
    """The rows the kernel was given and the statistics, against the reference mask."""
    T = seqs.shape[1]
    if policy_name == "dense":
        ref = np.tril(np.ones((len(seqs), T, T), bool))
    else:
        ref = np.asarray(attention_mask(jnp.asarray(seqs), span_tokens, max_segments, lengths=jnp.asarray(lengths)))
    stats = out.stats
    for b in range(len(seqs)):
        L = out.prompt_lengths[b]
        assert not stats["step_valid"][b, 0]
        for m in range(1, out.num_tokens[b]):
            pos = L + m - 1  # the fed token's position
            row = ref[b, pos]
            S = out.masks.shape[-1]  # cache length; the reference is padded to REF_LEN
            np.testing.assert_array_equal(out.masks[b, m], row[:S])
            assert not row[S:].any()
            assert stats["step_valid"][b, m]
            assert stats["visible"][b, m] == row.sum()
            assert stats["causal"][b, m] == pos + 1
            blocks = np.unique(np.nonzero(row)[0] // BLOCK)
            assert stats["blocks_read"][b, m] == len(blocks)
            assert stats["dense_blocks"][b, m] == pos // BLOCK + 1
            assert stats["attended_fraction"][b, m] == pytest.approx(row.sum() / (pos + 1))
        assert not stats["step_valid"][b, out.num_tokens[b] :].any()


# interpret first: the first Pallas trace in a process adds a value to jax's
# tracing context, which makes every program compiled before it miss the jit
# cache once more (jax 0.12); running it first keeps the xla programs shared.
@pytest.mark.parametrize("backend", ["interpret", "xla"])
@pytest.mark.parametrize("policy", ["self_span", "dense"])
def test_generation_logprobs_equal_teacher_forced(model, tok, span_tokens, policy, backend):
    prompts = _live_prompts(seed=7)
    prompt_ids = [tok.encode(p) for p in prompts]
    assert len({len(p) for p in prompt_ids}) == BATCH  # uneven lengths
    out = generate(
        model, prompts, policy=P(policy), max_new_tokens=MAX_NEW, tokenizer=tok,
        kernel=KernelOptions(backend=backend), outputs=WITH_LOGPROBS, **COMMON,
    )
    seqs, lengths = _final_sequences(out, prompt_ids)
    mask = _reference_mask(policy, seqs, lengths, span_tokens)
    ref = _teacher_forced(model, out, prompt_ids, mask)
    valid = np.arange(out.tokens.shape[1])[None, :] < out.num_tokens[:, None]
    np.testing.assert_allclose(out.logprobs[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (out.logprobs[~valid] == 0).all()
    # greedy: every chosen token is the argmax of the teacher-forced distribution
    logp = _log_probs(model, seqs, mask)
    for b, ids in enumerate(prompt_ids):
        want = logp[b, len(ids) - 1 : lengths[b] - 1].argmax(-1)
        np.testing.assert_array_equal(out.tokens[b, : out.num_tokens[b]], want)
    _check_rows_and_stats(out, seqs, lengths, span_tokens, policy)
    if policy == "self_span":
        # the sparse path ran from the first decode step on
        assert (out.stats["attended_fraction"][:, 1] < 1).all()
        assert out.summary()["kv_read_fraction"] <= 1.0
    else:
        assert out.summary()["mean_attended_fraction"] == 1.0


@pytest.mark.parametrize("policy", ["dense", "self_span"])
def test_attention_recall_of_one_shared_list_matches_float64(model, tok, span_tokens, policy):
    """Outputs(recall=True): per step and layer, the share of the model's dense attention on the keys read,
    against float64 from the full forward's own queries and keys under the same mask; 1 for dense."""
    from policy_cases import recall64

    prompts = _live_prompts(seed=5)
    prompt_ids = [tok.encode(p) for p in prompts]
    out = generate(model, prompts, policy=P(policy), max_new_tokens=MAX_NEW, tokenizer=tok, kernel=XLA,
                   outputs=Outputs(masks=True, recall=True), **COMMON)
    seqs, lengths = _final_sequences(out, prompt_ids)
    mask = _reference_mask(policy, seqs, lengths, span_tokens)
    qs, ks = (np.asarray(x) for x in model.attention_inputs(jnp.asarray(seqs), attention_mask=mask))
    rows = np.tril(np.ones((BATCH, REF_LEN, REF_LEN), bool)) if mask is None else np.asarray(mask)
    got = out.stats["attention_recall"]
    assert got.shape == (BATCH, MAX_NEW, model.config.n_layers)
    for b, ids in enumerate(prompt_ids):
        for m in range(1, out.num_tokens[b]):
            t = len(ids) + m - 1  # the fed token's position
            for layer in range(model.config.n_layers):
                allowed = np.broadcast_to(rows[b, t], (1, ks.shape[2], REF_LEN))
                want = recall64(qs[layer, b, t][None], ks[layer, b][None], allowed, [t])[0]
                np.testing.assert_allclose(got[b, m, layer], want, atol=2e-5)
        assert (got[b, out.num_tokens[b]:] == 0).all() and (got[b, 0] == 0).all()
    summary = out.summary()
    ok = out.stats["step_valid"]
    np.testing.assert_allclose(summary["attention_recall_by_layer"], got[ok].mean(0), rtol=1e-6)
    if policy == "dense":
        np.testing.assert_allclose(got[ok], 1.0, atol=1e-6)
    else:  # the span leaves out keys the model would attend to (an untrained model attends everywhere)
        assert summary["attention_recall"] < 0.99


def test_forced_span_streams_match_training_mask(model, tok, span_tokens):
    """Random span syntax (anchors, headers, bad refs, overflow) fed through the loop.

    Teacher forcing through the decode loop must give the same rows and
    log-probs as the training mask and the full forward, including the
    fallbacks of docs/spec.md §2 (which this stream provokes on purpose: the
    prompts already hold 5 segments and MAX_SEGMENTS is 8).
    """
    rng = np.random.default_rng(3)
    alphabet = [tok.convert_tokens_to_ids(t) for t in (ANCHOR, REF_OPEN, REF_CLOSE)]
    alphabet += [tok.convert_tokens_to_ids(c) for c in "0123459 ,x("]
    weights = np.array([8, 4, 4] + [2] * 7 + [1, 1, 2, 1], float)
    prompts = _live_prompts(seed=11)
    prompt_ids = [tok.encode(p) for p in prompts]
    M = 16
    forced = rng.choice(alphabet, size=(BATCH, M), p=weights / weights.sum()).astype(np.int32)
    out = generate(
        model, prompts, policy=P("self_span"), max_new_tokens=M, tokenizer=tok, kernel=XLA,
        outputs=WITH_LOGPROBS, sampling=Sampling(forced_tokens=forced), **COMMON,
    )
    np.testing.assert_array_equal(out.tokens, forced)
    seqs, lengths = _final_sequences(out, prompt_ids)
    ref = _teacher_forced(model, out, prompt_ids, _reference_mask("self_span", seqs, lengths, span_tokens))
    np.testing.assert_allclose(out.logprobs, ref, rtol=1e-5, atol=1e-5)
    _check_rows_and_stats(out, seqs, lengths, span_tokens, "self_span")
    # the overflow fallback (more than MAX_SEGMENTS segments) shows in the stats
    anchors = (seqs == span_tokens.anchor).cumsum(axis=1)
    for b in range(BATCH):
        L = out.prompt_lengths[b]
        want = anchors[b, L : L + M - 1] >= MAX_SEGMENTS  # seg of the fed token
        np.testing.assert_array_equal(out.stats["fallback"][b, 1:], want)
        # the report is the state after the last FED token (the last emitted one is never fed)
        assert out.policy_report["fallback_dense"][b] == (anchors[b, L + M - 2] >= MAX_SEGMENTS)
    assert out.stats["fallback"].any() and (out.stats["attended_fraction"][out.stats["step_valid"]] < 1).any()


def test_stops_at_eos_per_sequence_and_at_budget(model, tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    x = tok.convert_tokens_to_ids("x")
    forced = np.full((BATCH, MAX_NEW), x, np.int32)
    forced[0, 2] = eos  # stops after 3 tokens
    forced[1, 0] = eos  # stops at once (from prefill)
    out = generate(
        model, _live_prompts(seed=2), policy="dense", max_new_tokens=MAX_NEW, tokenizer=tok, kernel=XLA,
        outputs=WITH_LOGPROBS, sampling=Sampling(forced_tokens=forced), **COMMON,
    )
    np.testing.assert_array_equal(out.num_tokens, [3, 1, MAX_NEW])
    np.testing.assert_array_equal(out.tokens[0], [x, x, eos] + [pad] * (MAX_NEW - 3))
    np.testing.assert_array_equal(out.tokens[1], [eos] + [pad] * (MAX_NEW - 1))
    np.testing.assert_array_equal(out.tokens[2], [x] * MAX_NEW)
    assert (out.logprobs[0, 3:] == 0).all() and (out.logprobs[0, :3] < 0).all()
    assert out.texts == ["xx", "", "x" * MAX_NEW]
    np.testing.assert_array_equal(out.stats["step_valid"].sum(1), [2, 0, MAX_NEW - 1])
    assert not out.masks[1].any() and not out.masks[0, 3:].any()


def _to_reference_ids(ids, span_tokens) -> list[int]:
    """Our tokenizer's ids in test_spans' vocabulary, so its brute-force `reference_mask` reads them."""
    table = np.asarray(span_tokens.digit_value)
    special = {span_tokens.anchor: spans_ref.A, span_tokens.ref_open: spans_ref.R, span_tokens.ref_close: spans_ref.C}
    return [special.get(t, spans_ref.DIGIT0 + int(table[t]) if table[t] >= 0 else spans_ref.TEXT) for t in ids]


_SPAN_ALPHABET = (ANCHOR, REF_OPEN, REF_CLOSE, *"0123459", ",", "x", "<eos>")


@pytest.mark.parametrize("policy", ["self_span", "quest(page_budget=2)", "sparq(r=4,k=8,local_window=0)"])
@settings(max_examples=draws(6), deadline=None)
@given(streams=hst.lists(hst.lists(hst.sampled_from(_SPAN_ALPHABET), min_size=MAX_NEW, max_size=MAX_NEW),
                         min_size=BATCH, max_size=BATCH),
       prompt_seed=hst.integers(0, 2**16))
@example(  # the case a 4-device run exposed: row 0 stops on EOS inside a header's number (9 >= MAX_SEGMENTS)
    streams=[[ANCHOR, REF_OPEN, "9", "<eos>"] + ["x"] * (MAX_NEW - 4), [ANCHOR, REF_OPEN, "2"] + ["x"] * (MAX_NEW - 3),
             [ANCHOR, REF_OPEN, "1", "0", "<eos>"] + ["x"] * (MAX_NEW - 5)],
    prompt_seed=13)
def test_a_rows_report_and_statistics_do_not_depend_on_the_rest_of_the_batch(model, tok, span_tokens, policy,
                                                                             streams, prompt_seed):
    """Each row of a batch reports what it reports decoded alone (its prompt and forced stream repeated
    BATCH times, so the loop runs exactly as long as that row): every statistic, mask row and
    `policy_report` counter, for the span policy and the query-aware ones (whose selections depend on
    the model's q and keys). The span counters also equal the brute-force rule (test_spans.reference_mask)
    over the prompt and the tokens fed back, i.e. every emitted token but the last. A row that stops
    while the others go on is frozen where it stopped: a sharded call stops each device's shard on its
    own, so anything else makes statistics depend on the device count."""
    ids = {c: tok.eos_token_id if c == "<eos>" else tok.convert_tokens_to_ids(c) for c in _SPAN_ALPHABET}
    forced = np.asarray([[ids[c] for c in row] for row in streams], np.int32)
    prompts = _live_prompts(seed=prompt_seed)
    kw = dict(policy=P(policy), max_new_tokens=MAX_NEW, tokenizer=tok, kernel=XLA, outputs=MASKS, **COMMON)
    batch = generate(model, prompts, sampling=Sampling(forced_tokens=forced), **kw)
    for b in range(BATCH):
        alone = generate(model, [prompts[b]] * BATCH, sampling=Sampling(forced_tokens=np.repeat(forced[b:b + 1],
                                                                                                 BATCH, 0)), **kw)
        assert batch.num_tokens[b] == alone.num_tokens[0]
        np.testing.assert_array_equal(batch.tokens[b], alone.tokens[0])
        for name, values in batch.stats.items():
            np.testing.assert_array_equal(values[b], alone.stats[name][0], err_msg=name)
        np.testing.assert_array_equal(batch.masks[b], alone.masks[0])
        report = {k: int(v[b]) for k, v in batch.policy_report.items()}
        assert report == {k: int(v[0]) for k, v in alone.policy_report.items()}, b
        if policy != "self_span":  # the query-aware policies report no counters
            assert report == {}
            continue
        fed = tok.encode(prompts[b]) + [int(t) for t in batch.tokens[b, : batch.num_tokens[b] - 1]]
        ref_ids = _to_reference_ids(fed, span_tokens)
        _, want = spans_ref.reference_mask(ref_ids, len(ref_ids), MAX_SEGMENTS)
        assert report == {k: int(v) for k, v in want.items()}, (b, report, want)


def test_same_bucket_does_not_recompile(model, tok):
    kw = dict(policy=P("self_span"), tokenizer=tok, kernel=XLA, outputs=MASKS, **COMMON)
    generate(model, _live_prompts(seed=7), max_new_tokens=MAX_NEW, **kw)
    programs = lambda: (decode_loop.start._cache_size(), decode_loop.loop._cache_size())  # noqa: E731
    before = programs()
    # other prompt lengths, budget, sampling knobs and seed, same buckets
    out = generate(model, _live_prompts(seed=8), max_new_tokens=9, sampling=Sampling(temperature=0.8, top_k=5, seed=5),
                   **kw)
    assert programs() == before
    assert out.tokens.shape == (BATCH, 9)


def test_logprobs_only_when_asked_and_same_tokens(model, tok):
    """Outputs.logprobs is a static flag: without it the state carries no log-probs (no log_softmax per
    step) and the emitted tokens and statistics are those of the run that computed them."""
    kw = dict(policy=P("self_span"), tokenizer=tok, kernel=XLA, max_new_tokens=MAX_NEW, **COMMON)
    prompts = _live_prompts(seed=11)
    without = generate(model, prompts, outputs=MASKS, **kw)
    with_lp = generate(model, prompts, outputs=WITH_LOGPROBS, **kw)
    assert without.logprobs is None and with_lp.logprobs.shape == without.tokens.shape
    np.testing.assert_array_equal(without.tokens, with_lp.tokens)
    for key in without.stats:
        np.testing.assert_array_equal(without.stats[key], with_lp.stats[key])


def test_outputs_of_batches_concatenate_to_one_batch(model, tok):
    # parts of BATCH rows reuse the program the other tests compiled; only the whole batch compiles
    prompts = _live_prompts(seed=12, n=2 * BATCH)
    kw = dict(policy=P("self_span"), tokenizer=tok, kernel=XLA, max_new_tokens=MAX_NEW, outputs=MASKS, **COMMON)
    whole = generate(model, prompts, **kw)
    parts = [generate(model, prompts[i:i + BATCH], **kw) for i in (0, BATCH)]
    merged = type(whole).concatenate(parts)
    np.testing.assert_array_equal(merged.tokens, whole.tokens)
    np.testing.assert_array_equal(merged.num_tokens, whole.num_tokens)
    assert merged.texts == whole.texts and merged.logprobs is None
    for key in whole.stats:
        np.testing.assert_array_equal(merged.stats[key], whole.stats[key])
    for key in whole.policy_report:
        np.testing.assert_array_equal(merged.policy_report[key], whole.policy_report[key])
    # rows of different cache lengths are padded with "not visible"
    short = dataclasses.replace(parts[1], masks=parts[1].masks[..., :-BLOCK])
    padded = type(whole).concatenate([parts[0], short])
    assert padded.masks.shape == (2 * BATCH, *parts[0].masks.shape[1:])
    assert not padded.masks[BATCH:, :, -BLOCK:].any()
    s_m, s_w = merged.summary(), whole.summary()
    for key in s_w:
        assert s_m[key] == pytest.approx(s_w[key], rel=1e-12), key
    assert type(whole).concatenate([whole]) is whole
    with pytest.raises(ValueError, match="budgets"):
        type(whole).concatenate([whole, dataclasses.replace(parts[0], tokens=parts[0].tokens[:, :3])])
    with pytest.raises(ValueError, match="nothing"):
        type(whole).concatenate([])


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_arguments_are_named(model, tok, bad, match):
    with pytest.raises(ValueError, match=match):
        generate(model, ["1+2"], tokenizer=tok, max_new_tokens=2, sampling=Sampling(**bad))


@pytest.mark.parametrize("bad, match", [
    (dict(eos_id=10**6), "eos_id=1000000 is outside the model's vocabulary"),
    (dict(pad_id=-5), "pad_id=-5 is outside"),
    (dict(eos_id=2.5), "eos_id must be an int"),
    (dict(sampling=Sampling(forced_tokens=np.full((1, 8), 3.7))), "forced_tokens must be integer"),
    (dict(prompts=np.zeros((1, 0), np.int32)), "token-array prompts are empty"),
    (dict(prompts=np.zeros((0,), np.int32)), "token-array prompts are empty"),
])
def test_bad_special_ids_forced_tokens_and_empty_arrays_are_named(model, tok, bad, match):
    # issue 14, item 5: each was accepted (generation never stopping, or truncated ids) or failed inside numpy
    kw = dict(prompts=["1+2"], tokenizer=tok, max_new_tokens=8)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        generate(model, kw.pop("prompts"), **kw)


def test_sampling_reproducible_and_logprobs_still_exact(model, tok, span_tokens):
    prompts = _live_prompts(seed=5)
    prompt_ids = [tok.encode(p) for p in prompts]
    kw = dict(policy=P("self_span"), max_new_tokens=MAX_NEW, tokenizer=tok, kernel=XLA, outputs=WITH_LOGPROBS,
              **COMMON)
    a, b, c = (generate(model, prompts, sampling=Sampling(temperature=1.5, top_k=20, top_p=0.95, seed=seed), **kw)
               for seed in (1, 1, 2))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    seqs, lengths = _final_sequences(a, prompt_ids)
    ref = _teacher_forced(model, a, prompt_ids, _reference_mask("self_span", seqs, lengths, span_tokens))
    valid = np.arange(MAX_NEW)[None, :] < a.num_tokens[:, None]
    np.testing.assert_allclose(a.logprobs[valid], ref[valid], rtol=1e-5, atol=1e-5)


@dataclasses.dataclass(frozen=True)
class _PerHeadWindow(Policy):
    """Test policy: query-aware, per-KV-head lists [B, K, NB] of a sliding window.

    It exercises the plug-in path that SparQ-style policies use: `select` runs
    inside every layer with that layer's q and k.
    """

    window: int
    name: ClassVar[str] = "window"
    query_aware: ClassVar[bool] = True

    def _mask(self, T, lengths):
        pos = np.arange(T)
        band = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < self.window)
        valid = jnp.arange(T)[None, :] < lengths[:, None]
        return jnp.asarray(band)[None] & valid[:, :, None] & valid[:, None, :]

    def prefill_mask(self, tokens, lengths):
        return self._mask(tokens.shape[-1], lengths)

    def init_state(self, tokens, lengths, max_len):
        return ()

    def update(self, state, tokens, active):
        return state

    def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
        assert q is not None and q.ndim == 3 and k.ndim == 4 and isinstance(layer_idx, int)
        from pallas_kernels.block_select import blocks_from_token_mask

        pos = jnp.arange(cache_len)[None, :]
        token_mask = (pos <= lengths[:, None]) & (lengths[:, None] - pos < self.window)
        idx, cnt = blocks_from_token_mask(token_mask, block_size)
        K = k.shape[1]
        return Selection(
            jnp.broadcast_to(idx[:, None], (idx.shape[0], K, idx.shape[1])),
            jnp.broadcast_to(cnt[:, None], (cnt.shape[0], K)),
            token_mask,
        )


def test_query_aware_per_head_policy_plugs_in(model, tok):
    pol = _PerHeadWindow(window=5)
    prompt_ids = [tok.encode(p) for p in _live_prompts(seed=4)]
    out = generate(model, prompt_ids, policy=pol, max_new_tokens=MAX_NEW, tokenizer=tok, block_size=BLOCK,
                   kernel=XLA, outputs=Outputs(logprobs=True))
    seqs, lengths = _final_sequences(out, prompt_ids)
    ref = _teacher_forced(model, out, prompt_ids, pol._mask(seqs.shape[1], jnp.asarray(lengths)))
    valid = np.arange(MAX_NEW)[None, :] < out.num_tokens[:, None]
    np.testing.assert_allclose(out.logprobs[valid], ref[valid], rtol=1e-5, atol=1e-5)
    ok = out.stats["step_valid"]
    assert (out.stats["visible"][ok] == 5).all()


def test_bad_arguments_raise(model, tok):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ["ab"], max_new_tokens=0, tokenizer=tok)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ["ab"], max_new_tokens=2, tokenizer=tok, sampling=Sampling(top_p=1.5))
    with pytest.raises(ValueError, match="top_k"):
        generate(model, ["ab"], max_new_tokens=2, tokenizer=tok, sampling=Sampling(top_k=0))
    with pytest.raises(ValueError, match="policy"):
        generate(model, ["ab"], max_new_tokens=2, tokenizer=tok, policy="adore")
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ["ab"], max_new_tokens=2, policy="dense")
    with pytest.raises(ValueError, match="prompt ids"):
        generate(model, [[1, 5000]], max_new_tokens=2, policy="dense")
    with pytest.raises(ValueError, match="sampling must be an instance of Sampling"):
        generate(model, [[1, 2]], max_new_tokens=2, policy="dense", sampling=0.5)
    with pytest.raises(ValueError, match="outputs must be an instance of Outputs"):
        generate(model, [[1, 2]], max_new_tokens=2, policy="dense", outputs={"logprobs": True})
    with pytest.raises(ValueError, match="Outputs.masks must be a bool"):
        Outputs(masks="yes")
    with pytest.raises(ValueError, match="seed"):
        Sampling(seed=1.5)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], max_new_tokens=2, policy="dense")
    with pytest.raises(ValueError, match="forced_tokens"):
        generate(model, [[1, 2]], max_new_tokens=4, policy="dense",
                 sampling=Sampling(forced_tokens=np.ones((1, 3), np.int32)))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1, 2]], max_new_tokens=600, policy="dense")
    with pytest.raises(ValueError, match="max_segments"):
        SelfSpanPolicy(SpanTokens.from_tokenizer(tok), 0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate(model, [[1, 2], [1, 3]], max_new_tokens=2, policy="dense", kernel=KernelOptions(prefill_chunk=3))
    with pytest.raises(ValueError, match="backend"):
        generate(model, [[1, 2]], max_new_tokens=2, policy="dense", kernel=KernelOptions(backend="cuda"))


def test_token_array_prompts_equal_list_prompts(model, tok):
    ids = [tok.encode(p) for p in _live_prompts(seed=9)]
    arr = np.zeros((BATCH, max(map(len, ids))), np.int32)
    for b, p in enumerate(ids):
        arr[b, : len(p)] = p
    kw = dict(policy=DensePolicy(), max_new_tokens=MAX_NEW, eos_id=tok.eos_token_id, **COMMON)
    # equal lengths: the array is the batch as it is
    same = [p[:min(map(len, ids))] for p in ids]
    a = generate(model, np.asarray(same, np.int32), kernel=XLA, outputs=MASKS, **kw)
    b = generate(model, same, kernel=XLA, outputs=MASKS, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.prompt_lengths, [len(p) for p in same])
    assert a.texts is None and a.logprobs is None
    # prefilling one sequence at a time writes the same cache
    c = generate(model, ids, kernel=KernelOptions(backend="xla", prefill_chunk=1), outputs=WITH_LOGPROBS, **kw)
    d = generate(model, ids, kernel=XLA, outputs=WITH_LOGPROBS, **kw)
    np.testing.assert_array_equal(c.tokens, d.tokens)
    np.testing.assert_allclose(c.logprobs, d.logprobs, rtol=1e-6, atol=1e-6)


def test_a_flat_id_list_is_one_prompt_as_a_1d_array_is(model, tok):
    """[5, 6, 7] was read as three one-token prompts while np.array([5, 6, 7]) was one."""
    ids = tok.encode(_live_prompts(seed=9)[0])
    kw = dict(policy="dense", max_new_tokens=4, kernel=XLA, block_size=BLOCK)
    outs = [generate(model, p, **kw) for p in (ids, tuple(ids), np.asarray(ids), [ids])]
    for out in outs:
        assert out.prompt_lengths.tolist() == [len(ids)]
        np.testing.assert_array_equal(out.tokens, outs[-1].tokens)


def test_statistics_off_changes_nothing_else(model, tok):
    """Outputs(stats=False): same tokens and log-probs, sampled and greedy; only step_valid is kept,
    and summary() says why it cannot summarise."""
    ids = [tok.encode(p) for p in _live_prompts(seed=11)]
    for temperature in (0.0, 0.8):
        kw = dict(max_new_tokens=MAX_NEW, tokenizer=tok, block_size=BLOCK, kernel=XLA,
                  sampling=Sampling(temperature=temperature, seed=3))
        on = generate(model, ids, outputs=Outputs(logprobs=True), **kw)
        off = generate(model, ids, outputs=Outputs(logprobs=True, stats=False), **kw)
        np.testing.assert_array_equal(off.tokens, on.tokens)
        np.testing.assert_array_equal(off.logprobs, on.logprobs)
        assert set(off.stats) == {"step_valid"}
        np.testing.assert_array_equal(off.stats["step_valid"], on.stats["step_valid"])
        assert on.summary()["decode_steps"] > 0
        with pytest.raises(ValueError, match=r"Outputs\(stats=False\)"):
            off.summary()


@pytest.mark.parametrize("policy", ["self_span", "quest(page_budget=2)"])
def test_dense_path_below_min_sparse_context_keeps_results(model, tok, policy):
    """min_sparse_context above the cache length: self_span reads every causal block through its own
    token mask -- same tokens and log-probs as through its lists, the same attended keys, and the
    statistics count the blocks the kernel read (all of them). Quest's per-head lists are its
    selection (one token mask serves all heads), so the rule leaves them alone."""
    ids = [tok.encode(p) for p in _live_prompts(seed=13)]
    kw = dict(policy=policy, max_new_tokens=MAX_NEW, tokenizer=tok, block_size=BLOCK, outputs=Outputs(logprobs=True))
    own = generate(model, ids, kernel=XLA, **kw)
    dense_path = generate(model, ids, kernel=KernelOptions(backend="xla", min_sparse_context=1 << 20), **kw)
    np.testing.assert_array_equal(dense_path.tokens, own.tokens)
    np.testing.assert_allclose(dense_path.logprobs, own.logprobs, rtol=1e-5, atol=1e-5)
    ok = own.stats["step_valid"]
    np.testing.assert_array_equal(dense_path.stats["visible"][ok], own.stats["visible"][ok])
    assert own.summary()["kv_read_fraction"] < 1.0
    if policy == "self_span":
        np.testing.assert_array_equal(dense_path.stats["blocks_read"][ok], dense_path.stats["dense_blocks"][ok])
    else:
        np.testing.assert_array_equal(dense_path.stats["blocks_read"][ok], own.stats["blocks_read"][ok])
    with pytest.raises(ValueError, match="min_sparse_context"):
        generate(model, ids, kernel=KernelOptions(backend="xla", min_sparse_context=-1), **kw)


# ---------------------------------------------------------------------------
# sampler against a float64 NumPy reference
# ---------------------------------------------------------------------------


def _reference_probs(logits, temperature, top_k, top_p):
    """float64 [V]: temperature, then top-k, then top-p on the renormalised rest."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z)
    k = len(z) if top_k <= 0 else min(top_k, len(z))
    keep = np.zeros(len(z), bool)
    keep[order[:k]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    sorted_p = p[order]
    before = np.cumsum(sorted_p) - sorted_p
    keep_sorted = (before < top_p) & keep[order]
    keep_sorted[0] = True
    final = np.zeros(len(z), bool)
    final[order[keep_sorted]] = True
    q = np.where(final, p, 0.0)
    return q / q.sum(), before, keep[order]


_draw = jax.jit(
    lambda logits, key, t, k, p: sample_logits(jnp.broadcast_to(logits, (20_000, logits.shape[0])), key, t, k, p)
)


@settings(max_examples=12, deadline=None)
@given(
    seed=hst.integers(0, 2**31 - 1),
    temperature=hst.floats(0.3, 2.0),
    top_k=hst.integers(0, 8),
    top_p=hst.floats(0.05, 1.0),
)
def test_sampler_matches_reference_distribution(seed, temperature, top_k, top_p):
    V, N = 8, 20_000
    logits = np.random.default_rng(seed).normal(0, 2, V).astype(np.float32)
    want, before, in_k = _reference_probs(logits, temperature, top_k, top_p)
    # keep float32 rounding away from the top-p cut-off
    assume(np.all(np.abs(before[in_k] - top_p) > 1e-4))
    draws = np.asarray(_draw(jnp.asarray(logits), jax.random.key(seed), jnp.float32(temperature),
                             jnp.int32(top_k), jnp.float32(top_p)))
    freq = np.bincount(draws, minlength=V) / N
    assert (freq[want == 0] == 0).all()
    sigma = np.sqrt(want * (1 - want) / N)
    assert (np.abs(freq - want) <= 5 * sigma + 1e-3).all(), (freq, want)


def test_greedy_and_top1_are_argmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(64, 50)), jnp.float32)
    want = np.asarray(logits).argmax(-1)
    key = jax.random.key(0)
    greedy = sample_logits(logits, key, jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    top1 = sample_logits(logits, key, jnp.float32(1.0), jnp.int32(1), jnp.float32(1.0))
    np.testing.assert_array_equal(greedy, want)
    np.testing.assert_array_equal(top1, want)


def test_public_generate_is_the_function():
    """`selfspan_jax.generate` is callable even after its defining module has been imported."""
    import selfspan_jax
    import selfspan_jax.generation  # noqa: F401  (importing a submodule must not shadow the name)

    assert selfspan_jax.generate is selfspan_jax.generation.generate
    assert callable(selfspan_jax.generate)


def test_timing_splits_prefill_from_the_loop_and_changes_nothing(model, tok):
    """Outputs(timing=True) syncs between the two programs: same tokens and log-probs as without it, both
    times positive, and the loop's iteration count is the last step any sequence ran."""
    kw = dict(policy=P("self_span"), tokenizer=tok, kernel=XLA, max_new_tokens=MAX_NEW, **COMMON)
    prompts = _live_prompts(seed=11)
    plain = generate(model, prompts, outputs=WITH_LOGPROBS, **kw)
    timed = generate(model, prompts, outputs=Outputs(masks=True, logprobs=True, timing=True), **kw)
    assert plain.timing is None
    np.testing.assert_array_equal(timed.tokens, plain.tokens)
    np.testing.assert_array_equal(timed.logprobs, plain.logprobs)
    assert timed.timing["prefill_s"] > 0 and timed.timing["decode_s"] > 0
    assert timed.timing["decode_steps"] == int(timed.num_tokens.max()) - 1
    both = GenerateOutput.concatenate([timed, timed])
    assert both.timing["decode_s"] == pytest.approx(2 * timed.timing["decode_s"])
