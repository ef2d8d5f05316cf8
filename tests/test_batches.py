"""Training batches: loss masks, span attention masks, overflow, resumable stream."""

import os

import numpy as np
import pytest

from selfspan_jax import spans
from selfspan_jax.data import arithmetic as A
from selfspan_jax.data import batches as Bt
from selfspan_jax.data import summarization as S
from selfspan_jax.tokenizer import ANCHOR, REF_CLOSE, REF_OPEN, CharTokenizer, encode_with_spans

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "news_sample.jsonl")
TOK = CharTokenizer()
SPAN_TOKENS = spans.SpanTokens.from_tokenizer(TOK)
MAX_SEG = 32


def brute_mask(ids, tok, max_segments=MAX_SEG):
    """Visibility of DESIGN.md §2 for well-formed sequences, written out with
    plain loops over the token list (no state machine)."""
    A_, R_, RC_ = (tok.convert_tokens_to_ids(s) for s in (ANCHOR, REF_OPEN, REF_CLOSE))
    T = len(ids)
    seg = np.cumsum([i == A_ for i in ids])
    mask = np.zeros((T, T), bool)
    for t in range(T):
        s = seg[t]
        start = int(np.argmax(seg == s)) if s else 0
        own = ids[start : t + 1]
        closed = s > 0 and s < max_segments and R_ in own and RC_ in own[own.index(R_):]
        if not closed:
            mask[t, : t + 1] = True
            continue
        header = tok.decode(own[own.index(R_) + 1 : own.index(RC_)])
        refs = {int(x) for x in header.replace(",", " ").split() if int(x) < s}
        for j in range(t + 1):
            mask[t, j] = seg[j] == 0 or seg[j] == s or seg[j] in refs
    return mask


@pytest.fixture(scope="module")
def arith():
    return A.generate_examples(6, seed=0, split="harder")


@pytest.fixture(scope="module")
def news():
    return S.make_records(S.load_articles(FIXTURE, limit=3), tokenizer=TOK, max_prompt_tokens=300)


def test_tokenize_record_loss_mask_is_completion_and_eos(arith, news):
    for r in arith + news:
        ids, mask = Bt.tokenize_record(TOK, r)
        prompt = TOK.encode(r["prompt"])  # with BOS
        completion = TOK.encode(r["completion"], add_special_tokens=False) + [TOK.eos_token_id]
        assert ids == prompt + completion
        assert mask == [False] * len(prompt) + [True] * len(completion)


def test_make_batch_shapes_masks_and_padding_rows(arith, news):
    records = arith[:3] + news[:2]
    T = 512
    batch = Bt.make_batch(records, TOK, T, SPAN_TOKENS, MAX_SEG, batch_size=7)
    assert batch["tokens"].shape == batch["targets"].shape == batch["loss_mask"].shape == (7, T)
    assert batch["tokens"].dtype == np.int32 and batch["attention_mask"].shape == (7, T, T)
    for b, r in enumerate(records):
        ids, mask = Bt.tokenize_record(TOK, r)
        L = len(ids)
        assert batch["lengths"][b] == L
        np.testing.assert_array_equal(batch["tokens"][b, :L], ids)
        assert (batch["tokens"][b, L:] == TOK.pad_token_id).all()
        sel = batch["tokens"][b][batch["loss_mask"][b]]
        assert TOK.decode(sel) == r["completion"] + "<eos>"
        np.testing.assert_array_equal(batch["targets"][b, : L - 1], ids[1:])
        np.testing.assert_array_equal(batch["target_mask"][b, : L - 1], mask[1:])
        assert not batch["target_mask"][b, L - 1 :].any() and not batch["loss_mask"][b, L:].any()
        # per row: spans.attention_mask of the unpadded row, and the brute-force rule
        am = batch["attention_mask"][b]
        np.testing.assert_array_equal(am[:L, :L], np.asarray(spans.attention_mask(np.array(ids), SPAN_TOKENS, MAX_SEG)))
        np.testing.assert_array_equal(am[:L, :L], brute_mask(ids, TOK))
        assert not am[L:].any() and not am[:, L:].any()
    for b in range(len(records), 7):  # padding rows
        assert batch["lengths"][b] == 0
        assert not batch["loss_mask"][b].any() and not batch["target_mask"][b].any()
        assert not batch["attention_mask"][b].any()


def test_arithmetic_steps_see_only_the_previous_step():
    r = A.make_record("((3+4)*5-2)/3")
    batch = Bt.make_batch([r], TOK, 128, SPAN_TOKENS, MAX_SEG)
    ids = batch["tokens"][0, : batch["lengths"][0]].tolist()
    am = batch["attention_mask"][0]
    anchor = TOK.convert_tokens_to_ids(ANCHOR)
    starts = [i for i, x in enumerate(ids) if x == anchor]  # segments 1..5
    eos = len(ids) - 1
    # EOS belongs to the last step (segment 5, refs [4]): sees segment 0, 4, 5 only
    visible_segments = {int(np.searchsorted(starts, j, side="right")) for j in np.flatnonzero(am[eos])}
    assert visible_segments == {0, 4, 5}
    assert am[eos, : starts[0]].all() and not am[eos, starts[0] : starts[3]].any()


def test_overflow_error_counts_examples_and_truncate(arith):
    lengths = Bt.record_lengths(arith, TOK)
    T = int(np.sort(lengths)[2])  # exactly the records longer than the third-shortest overflow
    n_over = int((lengths > T).sum())
    assert Bt.count_overflow(arith, TOK, T) == n_over > 0
    with pytest.raises(ValueError, match=f"{n_over} of {len(arith)} examples are longer than seq_len={T}"):
        Bt.make_batch(arith, TOK, T, SPAN_TOKENS, MAX_SEG)
    batch = Bt.make_batch(arith, TOK, T, SPAN_TOKENS, MAX_SEG, on_overflow="truncate")
    np.testing.assert_array_equal(batch["lengths"], np.minimum(lengths, T))
    with pytest.raises(ValueError, match="on_overflow"):
        Bt.make_batch(arith, TOK, T, SPAN_TOKENS, MAX_SEG, on_overflow="drop")
    with pytest.raises(ValueError, match="batch_size"):
        Bt.make_batch(arith, TOK, 512, SPAN_TOKENS, MAX_SEG, batch_size=2)


def test_iterator_resumes_exactly_and_covers_each_epoch():
    records = A.generate_examples(11, seed=1)
    kw = dict(batch_size=4, seq_len=96, span_tokens=SPAN_TOKENS, max_segments=MAX_SEG)
    it = Bt.BatchIterator(records, TOK, seed=5, **kw)
    stream, positions = [], []
    for _ in range(8):
        positions.append(it.position)
        stream.append(next(it))
    seen = np.concatenate([b["indices"] for b in stream])
    # 32 draws = two full epochs of 11 plus 10: each epoch is a permutation
    assert sorted(seen[:11]) == list(range(11)) and sorted(seen[11:22]) == list(range(11))
    assert positions[3] == Bt.DataPosition(epoch=1, index=1, seed=5)
    resumed = Bt.BatchIterator(records, TOK, position=Bt.DataPosition.from_dict(positions[5].to_dict()), **kw)
    for want in stream[5:]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other = Bt.BatchIterator(records, TOK, seed=6, **kw)
    assert not np.array_equal(next(other)["indices"], stream[0]["indices"])
    with pytest.raises(ValueError, match="index 11"):
        Bt.BatchIterator(records, TOK, position=Bt.DataPosition(0, 11, 5), **kw)


def test_iterator_overflow_modes():
    records = A.generate_examples(10, seed=2)
    lengths = Bt.record_lengths(records, TOK)
    T = int(np.median(lengths))
    n_over = int((lengths > T).sum())
    kw = dict(batch_size=2, seq_len=T, span_tokens=SPAN_TOKENS, max_segments=MAX_SEG)
    with pytest.raises(ValueError, match=f"{n_over} of 10 examples"):
        Bt.BatchIterator(records, TOK, **kw)
    it = Bt.BatchIterator(records, TOK, on_overflow="drop", **kw)
    assert it.n_dropped == n_over and len(it) == 10 - n_over
    assert (next(it)["lengths"] <= T).all()


def _bpe_tokenizer():
    """A transformers tokenizer whose BPE merges "12" and "23" into one token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = list("0123456789abcdefghijklmnopqrstuvwxyzEST ,.[]\n+-*/()")
    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + chars + ["12", "23"])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("1", "2"), ("2", "3")], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": [ANCHOR, REF_OPEN, REF_CLOSE]})
    return tok


def test_hf_tokenizer_header_digits_are_single_tokens():
    tok = _bpe_tokenizer()
    merged = tok.convert_tokens_to_ids("12")
    text = f"x 12{ANCHOR}[1] a{ANCHOR}{REF_OPEN}12, 1{REF_CLOSE}123"
    ids = encode_with_spans(tok, text)
    header = ids[ids.index(tok.convert_tokens_to_ids(REF_OPEN)) + 1 : ids.index(tok.convert_tokens_to_ids(REF_CLOSE))]
    assert tok.convert_ids_to_tokens(header) == ["1", "2", ",", " ", "1"]
    assert merged in ids[:3] and merged not in header  # ordinary text still merges
    assert "".join(tok.convert_ids_to_tokens(ids)) == text  # the toy BPE has no decoder
    # the mask parses the forced digits: a header "1" makes segment 1 visible
    span_tokens = spans.SpanTokens.from_tokenizer(tok)
    record = {"prompt": f"S\n{ANCHOR}[1] ab\n{ANCHOR}[2] cd\n", "completion": f"{ANCHOR}{REF_OPEN}1{REF_CLOSE}ab"}
    batch = Bt.make_batch([record], tok, 40, span_tokens, 8)
    L = int(batch["lengths"][0])
    ids = batch["tokens"][0, :L].tolist()
    np.testing.assert_array_equal(batch["attention_mask"][0, :L, :L], brute_mask(ids, tok, 8))
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_oracle_density_matches_a_hand_count():
    recs = [A.make_record("((3+4)*5-2)/3"), A.make_record("2*3+4*5")]
    out = Bt.oracle_density(recs, TOK, SPAN_TOKENS, MAX_SEG, chunk=1)
    fracs, finals = [], []
    for r in recs:
        ids, mask = Bt.tokenize_record(TOK, r)
        m = brute_mask(ids, TOK)
        fracs += [m[t, : t + 1].mean() for t in range(len(ids)) if mask[t]]
        finals.append(m[-1].sum() / len(ids))
    assert out["density"] == pytest.approx(np.mean(fracs), abs=1e-12)
    assert out["final_density"] == pytest.approx(np.mean(finals), abs=1e-12)
    assert out["completion_tokens"] == len(fracs) and 0 < out["density"] < 1
