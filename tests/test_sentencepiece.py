"""SentencePiece vocabularies (LLaMA-2, Mistral, TinyLlama): span text encodes as the tokenizer does and
decodes back to the record, so training data, generated text and the checker agree.

Two tokenizers on one small vocabulary, built the way users get them (no network):
- `gguf`: a GGUF file's `tokenizer.*` metadata (tokenizer model "llama") read by
  `hf_tokenizer.tokenizer_from_gguf`: transformers' converter gives a Metaspace pre-tokenizer
  that puts the dummy "▁" at the start of the text only (prepend_scheme "first");
- `legacy`: a tokenizer.json laid out as LLaMA-2's (normaliser Prepend("▁") + Replace(" ", "▁"),
  decoder Replace / ByteFallback / Fuse / Strip) read by `hf_interop.load_tokenizer`: it puts a
  "▁" before every piece between special tokens, in its own `encode` too.

References: the tokenizer's own whole-text `encode` (for `gguf`), the record text itself, and
the arithmetic checker.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from selfspan_jax.data import arithmetic as A
from selfspan_jax.data.batches import tokenize_record
from selfspan_jax.hf_tokenizer import add_span_tokens, tokenizer_from_gguf
from selfspan_jax.tokenizer import ANCHOR, REF_CLOSE, REF_OPEN, decode_with_spans, encode_with_spans

BODY_CHARS = "0123456789+-*/()=., \nabcdefghijklmnopqrstuvwxyzE"
# single characters, the dummy-prefixed pieces a SentencePiece model learns, and merges across them
PIECES = ["▁"] + [c for c in BODY_CHARS if c != " "] + ["▁E", "▁s", "▁b", "▁,", "▁1", "ep", "te", "▁st"]


def _vocab():
    tokens = ["<unk>", "<s>", "</s>"] + PIECES
    scores = [0.0] * 3 + [-float(i) for i in range(len(PIECES))]
    return tokens, scores


def _gguf_tokenizer(tmp_path_factory):
    tokens, scores = _vocab()
    path = tmp_path_factory.mktemp("sp") / "vocab.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.NORMAL] * len(PIECES))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokenizer_from_gguf(str(path))


def _legacy_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from selfspan_jax.hf_interop import load_tokenizer

    tokens, _ = _vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [(a, b) for t in tokens[3:] if len(t) == 2 for a, b in [(t[0], t[1])] if a in vocab and b in vocab]
    merges += [("▁s", "t")]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    path = tmp_path_factory.mktemp("legacy")
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(path))
    return load_tokenizer(str(path))


@pytest.fixture(scope="module", params=["gguf", "legacy"])
def tok(request, tmp_path_factory):
    t = (_gguf_tokenizer if request.param == "gguf" else _legacy_tokenizer)(tmp_path_factory)
    add_span_tokens(t)
    t.scheme = request.param
    return t


def test_the_two_tokenizers_are_what_they_claim(tok):
    """The property that needs handling: after a span token, `gguf` writes no dummy "▁", `legacy` does."""
    anchor = tok.convert_tokens_to_ids(ANCHOR)
    whole = tok.convert_ids_to_tokens(tok.encode(f"1{ANCHOR}2", add_special_tokens=False))
    assert whole[0] == "▁1"
    assert whole[1:] == ([ANCHOR, "2"] if tok.scheme == "gguf" else [ANCHOR, "▁", "2"])
    # encoding each chunk alone (what encode_with_spans did before) would give every chunk a "▁"
    assert tok.convert_ids_to_tokens(tok.encode("2", add_special_tokens=False)) == ["▁", "2"]
    assert anchor == len(_vocab()[0])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), split=st.sampled_from(["train", "harder", "longer"]))
def test_arithmetic_records_round_trip_and_pass_the_checker(tok, seed, split):
    record = A.generate_examples(1, seed=seed, split=split)[0]
    ids, loss_mask = tokenize_record(tok, record)
    n_prompt = loss_mask.index(True)
    prompt, completion = ids[1:n_prompt], ids[n_prompt:-1]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert decode_with_spans(tok, prompt) == record["prompt"]
    text = decode_with_spans(tok, completion, continuation=True)
    assert text == record["completion"]
    assert A.check_completion(record["prompt"], text) == (True, "ok")
    # headers hold bare digits and commas, never "▁"-prefixed ones (spans.py parses digit tokens)
    names = tok.convert_ids_to_tokens(completion)
    for k, name in enumerate(names):
        if k and names[k - 1] == REF_OPEN:
            assert name in "0123456789", names
    if tok.scheme == "gguf":
        # the tokenizer's own encoding of the whole sequence (its vocabulary never merges digits)
        whole = tok.encode(record["prompt"] + record["completion"], add_special_tokens=False)
        assert prompt + completion == whole
    else:
        # legacy: one "▁" before every chunk that follows a span token outside headers, as its own encode has
        after = [names[k] for k in range(1, len(names)) if names[k - 1] in (ANCHOR, REF_CLOSE)]
        assert all(a in (REF_OPEN, "▁") or a.startswith("▁") for a in after), after


# texts built of body text and well-formed headers (digits and commas), in any order
body = st.text(alphabet=BODY_CHARS, min_size=1, max_size=10)
header = st.lists(st.integers(0, 120), min_size=1, max_size=3).map(
    lambda refs: REF_OPEN + ",".join(map(str, refs)) + REF_CLOSE)
texts = st.lists(st.one_of(body, header, st.just(ANCHOR)), min_size=1, max_size=8).map("".join)


@settings(max_examples=60, deadline=None)
@given(text=texts)
def test_decode_inverts_encode(tok, text):
    ids = encode_with_spans(tok, text, continuation=True)
    assert decode_with_spans(tok, ids, continuation=True) == text
    if not text.startswith(" "):  # at the start of a text SentencePiece drops a leading space itself
        assert decode_with_spans(tok, encode_with_spans(tok, text)) == text


def test_generated_text_is_decoded_with_spans(tok):
    """`generate`'s texts: a completion forced through the loop reads as the record (the checker passes)."""
    from flax import nnx

    from selfspan_jax.config import LlamaConfig
    from selfspan_jax.generation import KernelOptions, generate
    from selfspan_jax.sampling import Sampling
    from selfspan_jax.model import Llama

    record = A.generate_examples(1, seed=7)[0]
    completion = encode_with_spans(tok, record["completion"], continuation=True) + [tok.eos_token_id]
    cfg = LlamaConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64,
                      max_seq_len=256)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    out = generate(model, [record["prompt"]], policy="self_span", tokenizer=tok, kernel=KernelOptions(backend="xla"),
                   block_size=16, max_new_tokens=len(completion),
                   sampling=Sampling(forced_tokens=np.asarray([completion], np.int32)))
    assert out.tokens[0].tolist() == completion
    assert out.texts == [record["completion"]]
    assert A.check_completion(record["prompt"], out.texts[0]) == (True, "ok")
    # plain decode does not give the record back for the legacy layout (the reason for decode_with_spans)
    plain = tok.decode(completion[:-1], skip_special_tokens=False)
    assert (plain == record["completion"]) == (tok.scheme == "gguf")
