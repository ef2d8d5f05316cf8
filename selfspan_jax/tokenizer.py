"""Character-level tokenizer for the `tiny` model.

One id per character, plus the special tokens BOS/EOS/PAD/UNK and the three
span tokens of docs/spec.md §2, each a single id. The interface copies the parts
of a `transformers` tokenizer that the rest of the package calls, so training,
data and generation code treat both alike.

Unknown characters: `CharTokenizer(unknown="unk")` (the default) maps them to
UNK, as HF tokenizers do, because real news text (CNN/DailyMail) carries
accented letters and typographic quotes; `unknown="error"` raises a
ValueError naming the character. The arithmetic task only uses characters of
the alphabet (a test checks it never produces UNK).
"""

from __future__ import annotations

import re
import string
from typing import Iterable, Sequence

# The span language's three special tokens (docs/spec.md §2). Their one home:
# jax-free, so data generation and tokenizers need no jax.
ANCHOR, REF_OPEN, REF_CLOSE = "<|anchor|>", "<|ref|>", "<|/ref|>"
SPAN_TOKEN_STRINGS = (ANCHOR, REF_OPEN, REF_CLOSE)
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"

# PAD first so that zero-initialised buffers read as padding.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, ANCHOR, REF_OPEN, REF_CLOSE)

# Arithmetic needs digits, operators, parentheses, '=', '.', ',', space and
# newline; letters and the punctuation below cover instructions and English
# news text (the summarization prompt uses '[' ']' for sentence numbers).
ALPHABET: str = (
    string.digits
    + "+-*/()=.,"
    + " \n"
    + string.ascii_lowercase
    + string.ascii_uppercase
    + "!?;:'\"[]%$&#@_<>|`~^{}\\"
)

_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")


class CharTokenizer:
    """Character tokenizer with a transformers-like interface.

    Ids: the special tokens in `SPECIAL_TOKENS` order (PAD=0, BOS=1, EOS=2,
    UNK=3, anchor=4, ref=5, /ref=6), then one id per character of `ALPHABET`.
    Special-token strings inside text (e.g. "<|anchor|>") encode to their
    single id, so a record's text with span tokens written as strings encodes
    directly.
    """

    def __init__(self, unknown: str = "unk"):
        if unknown not in ("unk", "error"):
            raise ValueError(f"unknown must be 'unk' or 'error', got {unknown!r}")
        self.unknown = unknown
        self._id_to_token: list[str] = list(SPECIAL_TOKENS) + list(ALPHABET)
        self._token_to_id: dict[str, int] = {t: i for i, t in enumerate(self._id_to_token)}
        if len(self._token_to_id) != len(self._id_to_token):
            raise AssertionError("duplicate characters in ALPHABET")
        self.pad_token, self.bos_token, self.eos_token, self.unk_token = PAD, BOS, EOS, UNK
        self.pad_token_id = self._token_to_id[PAD]
        self.bos_token_id = self._token_to_id[BOS]
        self.eos_token_id = self._token_to_id[EOS]
        self.unk_token_id = self._token_to_id[UNK]
        self.all_special_tokens: list[str] = list(SPECIAL_TOKENS)
        self.all_special_ids: list[int] = [self._token_to_id[t] for t in SPECIAL_TOKENS]
        # decode(skip_special_tokens=True) drops these; span tokens are kept
        # because they carry the structure of the text (HF treats tokens added
        # with `additional_special_tokens` the same way only if asked).
        self._skippable = frozenset(self._token_to_id[t] for t in (PAD, BOS, EOS, UNK))

    # ---- sizes -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def __len__(self) -> int:
        return len(self._id_to_token)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    # ---- encoding ----------------------------------------------------------
    def _char_id(self, ch: str) -> int:
        i = self._token_to_id.get(ch)
        if i is not None:
            return i
        if self.unknown == "error":
            raise ValueError(f"character {ch!r} (U+{ord(ch):04X}) is not in the CharTokenizer alphabet")
        return self.unk_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; BOS is prepended when `add_special_tokens` (no EOS, like LLaMA tokenizers)."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_special_tokens else []
        for piece in _SPECIAL_RE.split(text):
            if piece in self._token_to_id and len(piece) > 1:
                ids.append(self._token_to_id[piece])
            else:
                ids.extend(self._char_id(ch) for ch in piece)
        return ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict:
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        if isinstance(text, (list, tuple)):
            return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}
        raise ValueError(f"tokenizer input must be a str or a list of str, got {type(text).__name__}")

    # ---- decoding ----------------------------------------------------------
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._id_to_token):
                raise ValueError(f"token id {i} out of range [0, {len(self._id_to_token)})")
            if skip_special_tokens and i in self._skippable:
                continue
            out.append(self._id_to_token[i])
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    # ---- token <-> id ------------------------------------------------------
    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            if tokens not in self._token_to_id:
                if self.unknown == "error":
                    raise ValueError(f"token {tokens!r} is not in the CharTokenizer vocabulary")
                return self.unk_token_id
            return self._token_to_id[tokens]
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, (int,)) or hasattr(ids, "__index__"):
            i = int(ids)
            if not 0 <= i < len(self._id_to_token):
                raise ValueError(f"token id {i} out of range [0, {len(self._id_to_token)})")
            return self._id_to_token[i]
        return [self.convert_ids_to_tokens(i) for i in ids]

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unknown={self.unknown!r})"


_SPAN_RE = re.compile("(" + "|".join(re.escape(s) for s in (ANCHOR, REF_OPEN, REF_CLOSE)) + ")")
# split: the odd pieces are the single digits and commas of a header, each written as its own token
_HEADER_CHARS_RE = re.compile(r"([0-9,])")


def _single_token_id(tokenizer, token: str) -> int | None:
    """Id of `token` as one vocabulary entry, or None if the tokenizer has none."""
    i = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if i is None or (unk is not None and i == unk and token != getattr(tokenizer, "unk_token", None)):
        return None
    return int(i)


def encode_with_spans(tokenizer, text: str, *, continuation: bool = False) -> list[int]:
    """Ids of record text with span tokens written as strings (no BOS/EOS).

    Works for CharTokenizer and transformers tokenizers alike:
    - span-token strings become their single ids (ValueError if missing:
      add them first, e.g. hf_tokenizer.add_span_tokens);
    - header contents (between <|ref|> and <|/ref|>) are encoded one
      character at a time, each digit as the vocabulary entry "0".."9" and
      each comma as "," (where the vocabulary has one), so a BPE that would
      merge "12" into one token still writes a reference as single-digit
      tokens, which is what spans.py parses, and every tokenizer writes a
      header the same way;
    - other text is encoded chunk by chunk between span tokens with
      `add_special_tokens=False`. Splitting at span tokens also fixes token
      counts per segment, which summarization uses for truncation.
    - a chunk that does not start the text is encoded as the tokenizer encodes
      it after a special token (`_encode_mid_text`), not as a text of its own:
      SentencePiece tokenizers (LLaMA-2, Mistral, TinyLlama GGUFs) prepend a
      dummy "▁" to the start of a text only, and encoding each chunk alone
      would put one after every span token (" 3*13", "1 ,2" when decoded).
      `continuation=True` says the text continues an earlier one (a
      completion after its prompt), so its first chunk is mid-text too.

    So, whatever the tokenizer, the result equals
    `tokenizer.encode(text, add_special_tokens=False)` except inside headers
    (tested on SentencePiece and byte-level BPE vocabularies); for
    CharTokenizer it equals it exactly. `decode_with_spans` inverts it.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    ids: list[int] = []
    in_header = False
    for k, piece in enumerate(_SPAN_RE.split(text)):
        if not piece:
            continue
        if piece in (ANCHOR, REF_OPEN, REF_CLOSE):
            i = _single_token_id(tokenizer, piece)
            if i is None:
                raise ValueError(f"tokenizer has no token {piece!r}; add the span tokens first")
            ids.append(i)
            if piece == REF_OPEN:
                in_header = True
            elif piece in (REF_CLOSE, ANCHOR):
                in_header = False
        elif in_header:
            # digits and commas one token each, whatever the tokenizer would merge or prefix (a SentencePiece
            # vocabulary writes "," after a special token as "▁,"); anything else is encoded as mid-text, so a
            # special-token string in a malformed header stays one token, as encode has it
            for j, run in enumerate(_HEADER_CHARS_RE.split(piece)):
                if j % 2:
                    i = _single_token_id(tokenizer, run)
                    if i is not None:
                        ids.append(i)
                    elif run == ",":
                        ids.extend(_encode_mid_text(tokenizer, run))
                    else:
                        raise ValueError(f"tokenizer has no single token for the digit {run!r}")
                elif run:
                    ids.extend(_encode_mid_text(tokenizer, run))
        else:  # the text's first chunk is encoded as a text of its own, unless it continues another
            ids.extend((_encode_mid_text if k > 0 or continuation else _encode_alone)(tokenizer, piece))
    return ids


def _encode_alone(tokenizer, chunk: str) -> list[int]:
    return list(tokenizer.encode(chunk, add_special_tokens=False))


def _encode_mid_text(tokenizer, chunk: str) -> list[int]:
    """Ids of `chunk` as the tokenizer writes it right after a span token.

    Encodes "<|anchor|>" + chunk and drops the anchor's id, so the tokenizer's own rule for text after a
    special token applies: no dummy "▁" prefix for SentencePiece vocabularies converted with
    prepend_scheme "first" (transformers' GGUF and current LLaMA conversions), the prefix for legacy
    ones whose normaliser prepends it to every piece, and no change for byte-level BPE or characters.
    """
    anchor = _single_token_id(tokenizer, ANCHOR)
    if anchor is None:
        raise ValueError(f"tokenizer has no token {ANCHOR!r}; add the span tokens first")
    ids = list(tokenizer.encode(ANCHOR + chunk, add_special_tokens=False))
    if not ids or ids[0] != anchor:
        raise ValueError(f"tokenizer does not encode {ANCHOR!r} as its own first token; got ids {ids[:3]}")
    return ids[1:]


def _decode_mid_text(tokenizer, ids: Sequence[int], anchor: int) -> str:
    """Text of `ids` as the tokenizer decodes them right after a span token: the mirror of `_encode_mid_text`
    (a SentencePiece decoder strips a leading space only at the start of the whole text)."""
    head = tokenizer.decode([anchor], skip_special_tokens=False)
    text = tokenizer.decode([anchor, *ids], skip_special_tokens=False)
    if not text.startswith(head):
        raise ValueError(f"tokenizer decodes {ANCHOR!r} followed by ids {list(ids)[:3]} to {text[:40]!r}")
    return text[len(head):]


def decode_with_spans(tokenizer, ids: Sequence[int], *, continuation: bool = False) -> str:
    """Text of ids written by `encode_with_spans` (or generated by a model trained on them): its inverse.

    Chunks between span tokens are decoded as mid-text, as they were encoded. A tokenizer whose normaliser
    puts a dummy "▁" before every chunk (legacy SentencePiece, e.g. LLaMA-2's tokenizer.json) decodes
    "<|/ref|>▁3*13" as "<|/ref|> 3*13" even from its own encode; that one space per chunk is removed here, so
    the checker sees the record's text. Byte-level BPE and CharTokenizer decode exactly as `decode`.
    `continuation=True` for ids that continue a prompt (generated completions). A tokenizer without the
    span tokens decodes as `decode`.
    """
    ids = [int(i) for i in ids]
    span = {_single_token_id(tokenizer, s): s for s in (ANCHOR, REF_OPEN, REF_CLOSE)}
    if None in span:  # a tokenizer without the span tokens (a base model's) has no chunks to mend
        return tokenizer.decode(ids, skip_special_tokens=False)
    anchor = next(i for i, s in span.items() if s == ANCHOR)
    probe = _decode_mid_text(tokenizer, _encode_mid_text(tokenizer, "1"), anchor)
    dummy = probe[: -1] if probe.endswith("1") else ""  # " " for legacy SentencePiece, else ""
    out: list[str] = []
    chunk: list[int] = []
    at_start = not continuation

    def flush():
        if chunk:
            if at_start and not out:
                out.append(tokenizer.decode(chunk, skip_special_tokens=False))
            else:
                text = _decode_mid_text(tokenizer, chunk, anchor)
                out.append(text[len(dummy):] if dummy and text.startswith(dummy) else text)
            chunk.clear()

    for i in ids:
        if i in span:
            flush()
            out.append(span[i])
        else:
            chunk.append(i)
    flush()
    return "".join(out)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """BOS + `encode_with_spans(text)`: the ids a sequence starts with, in training and generation alike.

    BOS is left out when the tokenizer has none, and when the text already
    starts with it: chat templates write their own (SmolLM2's BOS is
    `<|im_start|>`, the first token of every templated turn), and a doubled
    BOS derails the model.
    """
    ids = encode_with_spans(tokenizer, text)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or (ids and ids[0] == int(bos)):
        return ids
    return [int(bos)] + ids
