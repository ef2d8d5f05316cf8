"""CharTokenizer: round trips, special tokens, errors, encode_with_spans."""

import pytest
from hypothesis import example, given, settings, strategies as st

from selfspan_jax.tokenizer import (
    ALPHABET,
    ANCHOR,
    REF_CLOSE,
    REF_OPEN,
    SPECIAL_TOKENS,
    CharTokenizer,
    encode_with_spans,
)

TOK = CharTokenizer()
SPAN = (ANCHOR, REF_OPEN, REF_CLOSE)

# text = pieces of alphabet characters interleaved with span-token strings
pieces = st.one_of(st.text(alphabet=ALPHABET, max_size=12), st.sampled_from(SPAN))
texts = st.lists(pieces, max_size=12).map("".join)


@settings(max_examples=200, deadline=None)
@given(texts)
@example("<|ref|><unk>")  # a special-token string inside a header is one token there too (found by CI)
@example("<|ref|>12,3<eos>,4<|/ref|>")
def test_round_trip_and_lengths(text):
    ids = TOK.encode(text, add_special_tokens=False)
    assert TOK.decode(ids) == text
    # Independent count by a left-to-right scan: every special-token string
    # (span tokens, and "<eos>" etc. as in HF tokenizers) is one token, every
    # other character one.
    count, i = 0, 0
    while i < len(text):
        hit = [s for s in SPECIAL_TOKENS if text.startswith(s, i)]
        i += len(hit[0]) if hit else 1
        count += 1
    assert len(ids) == count
    with_bos = TOK.encode(text)
    assert with_bos == [TOK.bos_token_id] + ids
    assert TOK(text)["input_ids"] == with_bos
    # The CharTokenizer path of encode_with_spans is plain encode.
    assert encode_with_spans(TOK, text) == ids


def test_span_tokens_are_single_ids_and_match_spans_module():
    from selfspan_jax import spans

    assert (ANCHOR, REF_OPEN, REF_CLOSE) == (spans.ANCHOR, spans.REF_OPEN, spans.REF_CLOSE)
    ids = TOK.encode(ANCHOR + REF_OPEN + "12" + REF_CLOSE, add_special_tokens=False)
    assert ids[:2] == [TOK.convert_tokens_to_ids(ANCHOR), TOK.convert_tokens_to_ids(REF_OPEN)]
    assert ids[-1] == TOK.convert_tokens_to_ids(REF_CLOSE)
    span_tokens = spans.SpanTokens.from_tokenizer(TOK)
    assert span_tokens.anchor == TOK.convert_tokens_to_ids(ANCHOR)
    for d in "0123456789":
        assert span_tokens.digit_value[TOK.convert_tokens_to_ids(d)] == int(d)
    assert (span_tokens.digit_value >= 0).sum() == 10


def test_vocab_is_consistent():
    vocab = TOK.get_vocab()
    assert len(TOK) == TOK.vocab_size == len(vocab) == len(SPECIAL_TOKENS) + len(ALPHABET)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    ids = [TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id, TOK.unk_token_id]
    assert len(set(ids)) == 4 and TOK.pad_token_id == 0
    for token, i in vocab.items():
        assert TOK.convert_tokens_to_ids(token) == i
        assert TOK.convert_ids_to_tokens(i) == token
    assert TOK.convert_ids_to_tokens([1, 2]) == [TOK.bos_token, TOK.eos_token]


def test_batch_call_and_decode_skip_special():
    out = TOK(["ab", "1+2"], add_special_tokens=False)["input_ids"]
    assert out == [TOK.encode("ab", False), TOK.encode("1+2", False)]
    ids = [TOK.bos_token_id] + TOK.encode(ANCHOR + "7", False) + [TOK.eos_token_id, TOK.pad_token_id]
    assert TOK.decode(ids, skip_special_tokens=True) == ANCHOR + "7"
    assert TOK.decode(ids) == "<bos>" + ANCHOR + "7<eos><pad>"
    assert TOK.batch_decode([ids[:2]]) == ["<bos>" + ANCHOR]


def test_unknown_characters():
    assert TOK.encode("a\u00e9b", add_special_tokens=False)[1] == TOK.unk_token_id
    strict = CharTokenizer(unknown="error")
    with pytest.raises(ValueError, match="'\u00e9'"):
        strict.encode("caf\u00e9")
    with pytest.raises(ValueError, match="unknown"):
        CharTokenizer(unknown="ignore")
    with pytest.raises(ValueError, match="out of range"):
        TOK.decode([len(TOK)])
    with pytest.raises(ValueError, match="str"):
        TOK.encode(123)


def test_encode_prompt_adds_bos_once():
    """Training and generation share encode_prompt: BOS once, never doubled by a chat template."""
    from selfspan_jax.hf_tokenizer import add_span_tokens, tokenizer_from_gguf
    from selfspan_jax.tokenizer import encode_prompt, encode_with_spans
    from selfspan_jax.weights import preset_path

    char = CharTokenizer()
    text = "Evaluate step by step.<|anchor|>(3+4)*5\n"
    assert encode_prompt(char, text) == [char.bos_token_id] + encode_with_spans(char, text)

    tok = tokenizer_from_gguf(preset_path("smollm2-135m"))
    add_span_tokens(tok)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = encode_prompt(tok, chat)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ids == tok.encode(chat, add_special_tokens=False)
    plain = encode_prompt(tok, "2+3=")
    assert plain[0] == tok.bos_token_id and plain[1:] == tok.encode("2+3=", add_special_tokens=False)
