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
    """Visibility of docs/spec.md §2 for well-formed sequences, written out with
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


def _row_mask(data, b, span_tokens=SPAN_TOKENS, max_segments=MAX_SEG):
    """The span mask the train step computes on device for row b of a TokenizedSet."""
    rows = data.rows(np.array([b]))
    return np.asarray(spans.attention_mask(rows["tokens"], span_tokens, max_segments, lengths=rows["lengths"]))[0]


def test_tokenize_set_shapes_padding_and_span_masks(arith, news):
    records = arith[:3] + news[:2]
    T = 512
    data = Bt.tokenize_set(records, TOK, T)
    assert data.tokens.shape == data.loss_mask.shape == (5, T) and data.tokens.dtype == np.int32
    assert len(data) == 5 and data.records == records
    for b, r in enumerate(records):
        ids, mask = Bt.tokenize_record(TOK, r)
        L = len(ids)
        assert data.lengths[b] == L
        np.testing.assert_array_equal(data.tokens[b, :L], ids)
        assert (data.tokens[b, L:] == TOK.pad_token_id).all()
        assert TOK.decode(data.tokens[b][data.loss_mask[b]]) == r["completion"] + "<eos>"
        assert not data.loss_mask[b, L:].any()
        # the mask of the padded row: the unpadded row's mask, and the brute-force rule; padding sees nothing
        am = _row_mask(data, b)
        np.testing.assert_array_equal(am[:L, :L], np.asarray(spans.attention_mask(np.array(ids), SPAN_TOKENS, MAX_SEG)))
        np.testing.assert_array_equal(am[:L, :L], brute_mask(ids, TOK))
        assert not am[L:].any() and not am[:, L:].any()
    picked = data.rows(np.array([4, 0]))
    np.testing.assert_array_equal(picked["tokens"], data.tokens[[4, 0]])
    np.testing.assert_array_equal(picked["lengths"], data.lengths[[4, 0]])


def test_arithmetic_steps_see_only_the_previous_step():
    data = Bt.tokenize_set([A.make_record("((3+4)*5-2)/3")], TOK, 128)
    ids = data.tokens[0, : data.lengths[0]].tolist()
    am = _row_mask(data, 0)
    anchor = TOK.convert_tokens_to_ids(ANCHOR)
    starts = [i for i, x in enumerate(ids) if x == anchor]  # segments 1..5
    eos = len(ids) - 1
    # EOS belongs to the last step (segment 5, refs [4]): sees segment 0, 4, 5 only
    visible_segments = {int(np.searchsorted(starts, j, side="right")) for j in np.flatnonzero(am[eos])}
    assert visible_segments == {0, 4, 5}
    assert am[eos, : starts[0]].all() and not am[eos, starts[0] : starts[3]].any()


def test_overlong_modes_count_cut_and_drop(arith, capsys):
    lengths = np.array([len(Bt.tokenize_record(TOK, r)[0]) for r in arith])
    T = int(np.sort(lengths)[2])  # exactly the records longer than the third-shortest overflow
    n_over = int((lengths > T).sum())
    assert n_over > 0
    with pytest.raises(ValueError, match=f"{n_over} of {len(arith)} training examples are longer than seq_len={T}"):
        Bt.tokenize_set(arith, TOK, T)
    cut = Bt.tokenize_set(arith, TOK, T, "truncate")
    np.testing.assert_array_equal(cut.lengths, np.minimum(lengths, T))
    assert "cut to seq_len" in capsys.readouterr().err
    dropped = Bt.tokenize_set(arith, TOK, T, "drop", "held-out")
    assert len(dropped) == len(arith) - n_over and (dropped.lengths <= T).all()
    assert dropped.records == [r for r, n in zip(arith, lengths) if n <= T]
    assert f"{n_over} of {len(arith)} held-out examples" in capsys.readouterr().err
    with pytest.raises(ValueError, match="leave no"):
        Bt.tokenize_set(arith, TOK, int(lengths.min()) - 1, "drop")
    with pytest.raises(ValueError, match="overlong"):
        Bt.tokenize_set(arith, TOK, T, "skip")
    with pytest.raises(ValueError, match="seq_len"):
        Bt.tokenize_set(arith, TOK, 0)


def test_stream_resumes_exactly_and_covers_each_epoch():
    n, bs = 11, 4
    pos, draws, positions = Bt.DataPosition(seed=5), [], []
    for _ in range(8):
        positions.append(pos)
        idx, pos = Bt.next_indices(n, bs, pos)
        draws.append(idx)
    seen = np.concatenate(draws)
    # 32 draws = two full epochs of 11 plus 10: each epoch is a permutation
    assert sorted(seen[:11]) == list(range(11)) and sorted(seen[11:22]) == list(range(11))
    assert positions[3] == Bt.DataPosition(epoch=1, index=1, seed=5)
    # a position (as a checkpoint stores it) alone determines the rest of the stream
    resumed = Bt.DataPosition.from_dict(positions[5].to_dict())
    for want in draws[5:]:
        got, resumed = Bt.next_indices(n, bs, resumed)
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(Bt.next_indices(n, bs, Bt.DataPosition(seed=6))[0], draws[0])
    with pytest.raises(ValueError, match="index 11"):
        Bt.next_indices(n, bs, Bt.DataPosition(0, 11, 5))


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
    data = Bt.tokenize_set([record], tok, 40)
    L = int(data.lengths[0])
    ids = data.tokens[0, :L].tolist()
    np.testing.assert_array_equal(_row_mask(data, 0, span_tokens, 8)[:L, :L], brute_mask(ids, tok, 8))
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


def test_rows_cut_to_a_multiple_keep_every_token_and_drop_only_padding(arith, news):
    """`rows(idx, pad_multiple)`: as wide as the longest chosen row rounded up to the multiple (never
    wider than the set), and equal to the full-width rows' first columns; the cut columns are padding
    of every row (pad id, no loss target). Every subset and multiple of a mixed set, against the full rows."""
    data = Bt.tokenize_set(arith[:4] + news[:2], TOK, 512)
    rng = np.random.default_rng(int(os.environ.get("SELFSPAN_SEED", "0")) or None)
    for _ in range(60):
        idx = rng.choice(len(data), size=rng.integers(1, len(data) + 1), replace=False)
        multiple = int(rng.choice([1, 7, 16, 64, 100, 1000]))
        full, cut = data.rows(idx), data.rows(idx, multiple)
        width = cut["tokens"].shape[1]
        longest = int(data.lengths[idx].max())
        assert width == min(512, -(-longest // multiple) * multiple), (multiple, longest, width)
        assert width >= longest and cut["loss_mask"].shape == cut["tokens"].shape
        np.testing.assert_array_equal(cut["tokens"], full["tokens"][:, :width])
        np.testing.assert_array_equal(cut["loss_mask"], full["loss_mask"][:, :width])
        np.testing.assert_array_equal(cut["lengths"], full["lengths"])
        assert (full["tokens"][:, width:] == TOK.pad_token_id).all() and not full["loss_mask"][:, width:].any()
    assert data.rows(np.arange(len(data)), 0)["tokens"].shape[1] == 512
