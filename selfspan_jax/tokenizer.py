"""Character-level tokenizer for the `tiny` model.

One id per character, plus the special tokens BOS/EOS/PAD/UNK and the three
span tokens of DESIGN.md §2, each a single id. The interface copies the parts
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

# The span language's three special tokens (DESIGN.md §2). Their one home:
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
_DIGIT_RUNS_RE = re.compile(r"(\d+)")  # split: the odd pieces are the digit runs


def _single_token_id(tokenizer, token: str) -> int | None:
    """Id of `token` as one vocabulary entry, or None if the tokenizer has none."""
    i = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if i is None or (unk is not None and i == unk and token != getattr(tokenizer, "unk_token", None)):
        return None
    return int(i)


def encode_with_spans(tokenizer, text: str) -> list[int]:
    """Ids of record text with span tokens written as strings (no BOS/EOS).

    Works for CharTokenizer and transformers tokenizers alike:
    - span-token strings become their single ids (ValueError if missing:
      add them first, e.g. hf_tokenizer.add_span_tokens);
    - header contents (between <|ref|> and <|/ref|>) are encoded one
      character at a time, each digit as the vocabulary entry "0".."9", so a
      BPE that would merge "12" into one token still writes a reference as
      single-digit tokens, which is what spans.py parses;
    - other text is encoded chunk by chunk between span tokens with
      `add_special_tokens=False`. Splitting at span tokens also fixes token
      counts per segment, which summarization uses for truncation.

    For CharTokenizer the result equals `tokenizer.encode(text, False)`.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    ids: list[int] = []
    in_header = False
    for piece in _SPAN_RE.split(text):
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
            # digits one token each; anything else (the "," between references) is encoded as outside a
            # header, so a special-token string in a malformed header stays one token, as encode has it
            for k, run in enumerate(_DIGIT_RUNS_RE.split(piece)):
                if k % 2:  # a run of digits
                    for ch in run:
                        i = _single_token_id(tokenizer, ch)
                        if i is None:
                            raise ValueError(f"tokenizer has no single token for the digit {ch!r}")
                        ids.append(i)
                elif run:
                    ids.extend(tokenizer.encode(run, add_special_tokens=False))
        else:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids


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
