"""Training batches from span-annotated records.

A record {"prompt", "completion", ...} becomes BOS + prompt + completion +
EOS; the loss covers the completion (span headers included, so the model
learns to write its own headers) and EOS. Span-token strings in the text
become their single ids and header digits single-digit tokens
(`tokenizer.encode_with_spans`), which is what `spans.attention_mask` parses.

Mask conventions (all arrays numpy, host-side; shapes B batch, T = seq_len):
- `loss_mask[b, t]`: token t is a training target, i.e. the logits at t-1
  are scored against it. Same convention as `tokenize_record` and
  `train.completion_loss`.
- `targets[b, t] = tokens[b, t+1]` and `target_mask[b, t] = loss_mask[b, t+1]`
  (last column: pad / False), for losses written against logits at t.
- `attention_mask[b]` = `spans.attention_mask` of the row with its length:
  positions >= lengths[b] see nothing and are seen by nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from selfspan_jax.tokenizer import encode_prompt, encode_with_spans

OVERFLOW_MODES = ("error", "truncate", "drop")


def tokenize_record(tokenizer, record: dict) -> tuple[list[int], list[bool]]:
    """(ids, loss_mask) of BOS + prompt + completion + EOS.

    loss_mask[t] is True for the completion tokens and EOS. BOS comes from
    `tokenizer.encode_prompt` (skipped when the tokenizer has none or the
    prompt already starts with it).
    """
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"record field {key!r} must be a string, got {type(record.get(key)).__name__}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; records end with EOS")
    prompt = encode_prompt(tokenizer, record["prompt"])
    completion = encode_with_spans(tokenizer, record["completion"])
    ids = prompt + completion + [int(eos)]
    mask = [False] * len(prompt) + [True] * (len(completion) + 1)
    return ids, mask


def record_lengths(records: Sequence[dict], tokenizer) -> np.ndarray:
    """int64 [N]: tokenized length of every record (BOS and EOS included)."""
    return np.array([len(tokenize_record(tokenizer, r)[0]) for r in records], np.int64)


def count_overflow(records: Sequence[dict], tokenizer, seq_len: int) -> int:
    """Number of records longer than `seq_len` tokens."""
    return int((record_lengths(records, tokenizer) > seq_len).sum())


def pad_id_of(tokenizer) -> int:
    # Padding positions are excluded by `lengths`, so any id works; prefer the
    # tokenizer's own pad, then EOS (LLaMA tokenizers often have no pad).
    for name in ("pad_token_id", "eos_token_id"):
        i = getattr(tokenizer, name, None)
        if i is not None:
            return int(i)
    return 0


def _overflow_message(lengths: np.ndarray, seq_len: int) -> str:
    too_long = lengths > seq_len
    return (
        f"{int(too_long.sum())} of {len(lengths)} examples are longer than seq_len={seq_len} "
        f"(longest: {int(lengths.max())} tokens)"
    )


def collate(
    encoded: Sequence[tuple[Sequence[int], Sequence[bool]]],
    seq_len: int,
    span_tokens,
    max_segments: int,
    *,
    pad_id: int = 0,
    on_overflow: str = "error",
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Batch of already tokenized (ids, loss_mask) pairs; see `make_batch`."""
    from selfspan_jax import spans  # jax import deferred: tokenising needs none

    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if on_overflow not in ("error", "truncate"):
        raise ValueError(f"on_overflow must be 'error' or 'truncate' for a batch, got {on_overflow!r}")
    n = len(encoded)
    B = n if batch_size is None else batch_size
    if not isinstance(B, int) or B < max(n, 1):
        raise ValueError(f"batch_size must be an int >= the number of records ({n}) and >= 1, got {batch_size!r}")
    lengths = np.array([len(ids) for ids, _ in encoded], np.int64)
    if n and on_overflow == "error" and (lengths > seq_len).any():
        raise ValueError(_overflow_message(lengths, seq_len) + "; raise seq_len or use on_overflow='truncate'")
    # [B, T]
    tokens = np.full((B, seq_len), pad_id, np.int32)
    loss_mask = np.zeros((B, seq_len), bool)
    out_lengths = np.zeros((B,), np.int32)
    for b, (ids, mask) in enumerate(encoded):
        if len(ids) != len(mask):
            raise ValueError(f"row {b}: {len(ids)} ids but {len(mask)} loss-mask entries")
        L = min(len(ids), seq_len)
        tokens[b, :L] = ids[:L]
        loss_mask[b, :L] = mask[:L]
        out_lengths[b] = L
    targets = np.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    target_mask = np.zeros_like(loss_mask)
    target_mask[:, :-1] = loss_mask[:, 1:]
    # [B, T, T]
    attention_mask = np.asarray(spans.attention_mask(tokens, span_tokens, max_segments, lengths=out_lengths))
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "target_mask": target_mask,
        "lengths": out_lengths,
        "attention_mask": attention_mask,
    }


def make_batch(
    records: Sequence[dict],
    tokenizer,
    seq_len: int,
    span_tokens,
    max_segments: int,
    *,
    on_overflow: str = "error",
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Right-padded batch of records.

    Returns numpy arrays: tokens int32 [B, T], targets int32 [B, T],
    loss_mask bool [B, T], target_mask bool [B, T], lengths int32 [B],
    attention_mask bool [B, T, T] (see the module docstring for the
    conventions). B = len(records), or `batch_size` with empty padding rows
    (length 0, every mask False). Records longer than T raise a ValueError
    saying how many (`on_overflow="error"`) or are cut to T tokens
    (`"truncate"`; the EOS may then be lost).
    """
    encoded = [tokenize_record(tokenizer, r) for r in records]
    return collate(
        encoded, seq_len, span_tokens, max_segments,
        pad_id=pad_id_of(tokenizer), on_overflow=on_overflow, batch_size=batch_size,
    )


# ---------------------------------------------------------------------------
# Resumable shuffled stream
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where a stream stands: the next batch starts at `index` of epoch
    `epoch`'s permutation of the examples, drawn from `seed`. Small and
    JSON-friendly, so a checkpoint can carry it and resume exactly."""

    epoch: int = 0
    index: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(int(d["epoch"]), int(d["index"]), int(d["seed"]))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    # A fresh generator per (seed, epoch): a position alone determines the
    # rest of the stream, no generator state needs saving.
    return np.random.default_rng([seed, epoch]).permutation(n)


def next_indices(n: int, batch_size: int, pos: DataPosition) -> tuple[np.ndarray, DataPosition]:
    """Indices of the next `batch_size` examples and the position after them.
    A batch that crosses an epoch end continues into the next epoch's
    permutation, so every batch is full."""
    if n < 1:
        raise ValueError(f"cannot draw batches from {n} examples")
    if not 0 <= pos.index < n:
        raise ValueError(f"position index {pos.index} outside [0, {n})")
    out: list[int] = []
    epoch, index = pos.epoch, pos.index
    while len(out) < batch_size:
        perm = epoch_permutation(n, pos.seed, epoch)
        take = min(batch_size - len(out), n - index)
        out.extend(perm[index : index + take].tolist())
        index += take
        if index == n:
            epoch, index = epoch + 1, 0
    return np.asarray(out, np.int64), DataPosition(epoch, index, pos.seed)


class BatchIterator:
    """Endless shuffled batches with an explicit, resumable position.

    Records are tokenized once. `it.position` is where the NEXT batch
    starts; `BatchIterator(..., position=saved)` continues a stream exactly.
    `on_overflow="drop"` removes over-long records up front (the count is in
    `it.n_dropped`); "error" refuses them with the count; "truncate" cuts.
    """

    def __init__(
        self,
        records: Sequence[dict],
        tokenizer,
        *,
        batch_size: int,
        seq_len: int,
        span_tokens,
        max_segments: int,
        seed: int = 0,
        position: DataPosition | None = None,
        on_overflow: str = "error",
    ):
        if on_overflow not in OVERFLOW_MODES:
            raise ValueError(f"on_overflow must be one of {OVERFLOW_MODES}, got {on_overflow!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        encoded = [tokenize_record(tokenizer, r) for r in records]
        lengths = np.array([len(ids) for ids, _ in encoded], np.int64)
        self.n_dropped = 0
        if len(encoded) and (lengths > seq_len).any():
            if on_overflow == "error":
                raise ValueError(_overflow_message(lengths, seq_len) + "; raise seq_len or use on_overflow='truncate'/'drop'")
            if on_overflow == "drop":
                keep = lengths <= seq_len
                self.n_dropped = int((~keep).sum())
                encoded = [e for e, k in zip(encoded, keep) if k]
        if not encoded:
            raise ValueError("no records left to batch")
        self._encoded = encoded
        self._kwargs = dict(seq_len=seq_len, span_tokens=span_tokens, max_segments=max_segments,
                            pad_id=pad_id_of(tokenizer), on_overflow="truncate")
        self.batch_size = batch_size
        # a saved position carries its own seed; `seed` starts a new stream
        self.position = position if position is not None else DataPosition(seed=seed)
        next_indices(len(encoded), batch_size, self.position)  # validates the position

    def __len__(self) -> int:
        return len(self._encoded)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        idx, self.position = next_indices(len(self._encoded), self.batch_size, self.position)
        batch = collate([self._encoded[i] for i in idx], **self._kwargs)
        batch["indices"] = idx
        return batch


# ---------------------------------------------------------------------------
# Oracle density
# ---------------------------------------------------------------------------
def oracle_density(
    records: Sequence[dict], tokenizer, span_tokens, max_segments: int, *, chunk: int = 64
) -> dict[str, float]:
    """How sparse the annotated spans make attention, before any training.

    For every completion query t (completion tokens and EOS), the fraction of
    keys j <= t that `spans.attention_mask` lets it see; `density` is the
    token-weighted mean over all records, `final_density` the mean over
    records of that fraction at the last token (what a decoder reads at the
    end of an answer). Records are batched `chunk` at a time, padded to the
    longest record, so the mask function compiles once per chunk shape.
    """
    encoded = [tokenize_record(tokenizer, r) for r in records]
    if not encoded:
        raise ValueError("oracle_density needs at least one record")
    T = max(len(ids) for ids, _ in encoded)
    visible_sum, n_queries, finals = 0.0, 0, []
    for start in range(0, len(encoded), chunk):
        part = encoded[start : start + chunk]
        batch = collate(part, T, span_tokens, max_segments, pad_id=pad_id_of(tokenizer), batch_size=chunk)
        # [B, T]: visible keys per query, and keys j <= t per query
        visible = batch["attention_mask"].sum(-1)
        causal = np.arange(1, T + 1)[None, :]
        frac = visible / causal
        for b, (ids, _) in enumerate(part):
            q = batch["loss_mask"][b]
            visible_sum += float(frac[b][q].sum())
            n_queries += int(q.sum())
            finals.append(float(frac[b, len(ids) - 1]))
    return {
        "density": visible_sum / n_queries,
        "final_density": float(np.mean(finals)),
        "completion_tokens": n_queries,
        "mean_length": float(np.mean([len(ids) for ids, _ in encoded])),
        "records": len(encoded),
    }
