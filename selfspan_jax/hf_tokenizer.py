"""Hugging Face tokenizers from GGUF files, built without torch, and the span tokens.

(A checkpoint directory's tokenizer is `hf_interop.load_tokenizer`, i.e.
`PreTrainedTokenizerFast.from_pretrained`.)

- a GGUF file: llama.cpp stores the vocabulary, merges, special ids and chat
  template as `tokenizer.*` metadata. We read those with `gguf.GGUFReader`,
  rename them with transformers' own `GGUF_TOKENIZER_MAPPING` and let
  transformers' `convert_gguf_tokenizer` build the `tokenizers` backend, so the
  result matches `AutoTokenizer.from_pretrained(..., gguf_file=...)` token for
  token. transformers' own entry point (`get_gguf_tokenizer`) goes through a
  reader that imports torch, which this package must not need.

`add_span_tokens` appends the three span special tokens of docs/spec.md section 2.
"""

from __future__ import annotations

from typing import Any

from selfspan_jax.tokenizer import SPAN_TOKEN_STRINGS

# llama.cpp special-id keys -> HF special-token attribute names
_SPECIAL_IDS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unk_token_id",
    "pad_token": "pad_token_id",
}


def _transformers_gguf():
    """(GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer) wherever this transformers keeps them.

    transformers 5 moved them from `integrations.ggml` to
    `integrations.gguf.gguf_tokenizer_mapping`; neither module imports torch.
    """
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    return GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer


def _field_value(field) -> Any:
    """The Python value of one GGUF metadata field (str, number, bool or list)."""
    return field.contents()


def read_gguf_tokenizer_metadata(reader) -> tuple[str, dict, dict]:
    """`(architecture, tokenizer_dict, tokenizer_config)` from an open `gguf.GGUFReader`.

    Same contract as transformers' `get_gguf_tokenizer`: `tokenizer_dict` uses the
    names `convert_gguf_tokenizer` expects ("tokens", "merges", "bos_token_id", ...),
    `tokenizer_config` carries the chat template, the add-BOS/EOS flags and the
    special tokens as strings.
    """
    GGUF_TOKENIZER_MAPPING, _ = _transformers_gguf()
    fields = reader.fields
    if "general.architecture" not in fields:
        raise ValueError(f"{reader.data.filename!r}: GGUF metadata has no 'general.architecture'")
    architecture = _field_value(fields["general.architecture"])
    grouped: dict[str, dict] = {}
    for group, renames in GGUF_TOKENIZER_MAPPING.items():
        grouped[group] = {
            name: _field_value(fields[f"tokenizer.{key}"])
            for key, name in renames.items()
            if f"tokenizer.{key}" in fields
        }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in tokenizer_dict:
        raise ValueError("GGUF metadata has no 'tokenizer.ggml.tokens': the file carries no tokenizer")
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # transformers' rule (llama.cpp adds BOS to a sentencepiece vocab that does not say otherwise).
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in _SPECIAL_IDS.items():
        token_id = tokenizer_dict.get(key)
        if token_id is not None and not 0 <= int(token_id) < len(tokens):
            raise ValueError(f"GGUF tokenizer.ggml.{key}={token_id} is outside the vocabulary of {len(tokens)}")
        tokenizer_config[name] = tokens[int(token_id)] if token_id is not None else None
    return architecture, tokenizer_dict, tokenizer_config


def tokenizer_from_gguf(path_or_reader):
    """A `PreTrainedTokenizerFast` built from a GGUF file's `tokenizer.*` metadata."""
    import gguf
    from transformers import PreTrainedTokenizerFast

    _, convert_gguf_tokenizer = _transformers_gguf()
    reader = path_or_reader if isinstance(path_or_reader, gguf.GGUFReader) else gguf.GGUFReader(path_or_reader)
    architecture, tokenizer_dict, tokenizer_config = read_gguf_tokenizer_metadata(reader)
    backend, extra_kwargs = convert_gguf_tokenizer(architecture, tokenizer_dict)
    kwargs = {k: v for k, v in tokenizer_config.items() if v is not None}
    kwargs.update(extra_kwargs)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def add_span_tokens(tokenizer) -> tuple[int, int, int]:
    """Adds `<|anchor|>`, `<|ref|>`, `<|/ref|>` as special tokens; returns their ids.

    Idempotent: tokens already present keep their ids. Added as *special* so that
    the tokenizer never splits them and `decode(skip_special_tokens=True)` drops them.
    """
    from tokenizers import AddedToken

    missing = [s for s in SPAN_TOKEN_STRINGS if s not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [AddedToken(s, normalized=False, special=True) for s in missing]},
            replace_extra_special_tokens=False,
        )
    ids = tuple(int(tokenizer.convert_tokens_to_ids(s)) for s in SPAN_TOKEN_STRINGS)
    for s, i in zip(SPAN_TOKEN_STRINGS, ids):
        # A span token must stay one id whatever surrounds it, or the jitted decode
        # loop could not recognise it.
        if tokenizer.encode(f"x{s}1", add_special_tokens=False).count(i) != 1:
            raise ValueError(f"span token {s!r} (id {i}) is not encoded as a single token")
    return ids
