"""Training batches from span-annotated records: the one batching path.

A record {"prompt", "completion", ...} becomes BOS + prompt + completion +
EOS (`tokenize_record`); the loss covers the completion (span headers
included, so the model learns to write its own headers) and EOS. Span-token
strings in the text become their single ids and header digits single-digit
tokens (`tokenizer.encode_with_spans`), which is what `spans.attention_mask`
parses.

A split is tokenized once into fixed-shape arrays (`tokenize_set`); batches
are rows of it drawn by a resumable shuffled stream (`next_indices` from a
`DataPosition`). The span attention mask is not built here: the train step
computes it on device from the tokens and lengths (`spans.attention_mask`).

Conventions (numpy, host-side; N records, T = seq_len):
- `loss_mask[n, t]`: token t is a training target, i.e. the logits at t-1
  are scored against it (as `train.completion_loss` reads it);
- positions >= `lengths[n]` are padding: never a target, and the span mask
  lets them see nothing and be seen by nothing.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

import numpy as np

from selfspan_jax import spans
from selfspan_jax.tokenizer import encode_prompt, encode_with_spans

OVERLONG_MODES = ("error", "truncate", "drop")


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
    completion = encode_with_spans(tokenizer, record["completion"], continuation=True)
    ids = prompt + completion + [int(eos)]
    mask = [False] * len(prompt) + [True] * (len(completion) + 1)
    return ids, mask


def pad_id_of(tokenizer) -> int:
    # Padding positions are excluded by `lengths`, so any id works; prefer the
    # tokenizer's own pad, then EOS (LLaMA tokenizers often have no pad).
    for name in ("pad_token_id", "eos_token_id"):
        i = getattr(tokenizer, name, None)
        if i is not None:
            return int(i)
    return 0


@dataclasses.dataclass
class TokenizedSet:
    """Fixed-shape arrays of a whole split: tokens int32 [N, T] (right-padded),
    loss_mask bool [N, T], lengths int32 [N]; `records` are the source dicts
    (over-long ones dropped when `overlong="drop"`)."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    records: list[dict]

    def __len__(self) -> int:
        return len(self.records)

    def rows(self, idx, pad_multiple: int = 0) -> dict[str, np.ndarray]:
        """The batch of rows `idx`: {"tokens", "loss_mask", "lengths"} (what the train step takes).

        With `pad_multiple` N > 0 the batch is only as wide as its longest row rounded up to a multiple
        of N (at most the set's width): the columns cut are padding of every row, so the loss is the
        same, and a step's cost follows the batch's own length instead of the longest example's."""
        width = self.tokens.shape[1]
        if pad_multiple:
            longest = int(self.lengths[idx].max()) if np.size(idx) else 1
            width = min(width, -(-longest // pad_multiple) * pad_multiple)
        return {"tokens": self.tokens[idx, :width], "loss_mask": self.loss_mask[idx, :width],
                "lengths": self.lengths[idx]}


def tokenize_set(records: Sequence[dict], tokenizer, seq_len: int, overlong: str = "error",
                 what: str = "training") -> TokenizedSet:
    """Tokenize records (`tokenize_record`) into fixed [N, seq_len] arrays.

    Examples longer than `seq_len` are refused (ValueError saying how many and
    how long), cut to `seq_len` tokens (the EOS may then be lost), or dropped,
    per `overlong` ("error" | "truncate" | "drop"); a cut or a drop is said
    once on stderr, so a changed distribution never goes unnoticed. `what`
    names the set in those messages.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if overlong not in OVERLONG_MODES:
        raise ValueError(f"overlong must be one of {OVERLONG_MODES}, got {overlong!r}")
    records = list(records)
    pad = pad_id_of(tokenizer)
    encoded = [tokenize_record(tokenizer, r) for r in records]
    lengths = np.array([len(ids) for ids, _ in encoded], np.int64)
    too_long = np.flatnonzero(lengths > seq_len)
    if too_long.size:
        msg = (f"{too_long.size} of {len(records)} {what} examples are longer than seq_len={seq_len} "
               f"(longest: {int(lengths.max())} tokens)")
        if overlong == "error":
            raise ValueError(f"{msg}; raise --seq-len to {int(lengths.max())}, or pass --overlong truncate "
                             "(cut them) or --overlong drop (skip them)")
        if overlong == "drop":
            keep = np.flatnonzero(lengths <= seq_len)
            if keep.size == 0:
                raise ValueError(f"{msg}; --overlong drop would leave no {what} examples")
            encoded = [encoded[i] for i in keep]
            records = [records[i] for i in keep]
        print(f"[train] {msg}: {'dropped' if overlong == 'drop' else 'cut to seq_len'}", file=sys.stderr)
    n = len(encoded)
    tokens = np.full((n, seq_len), pad, np.int32)
    loss_mask = np.zeros((n, seq_len), bool)
    out_len = np.zeros((n,), np.int32)
    for i, (ids, mask) in enumerate(encoded):
        ids, mask = ids[:seq_len], mask[:seq_len]
        tokens[i, : len(ids)] = ids
        loss_mask[i, : len(mask)] = mask
        out_len[i] = len(ids)
    return TokenizedSet(tokens, loss_mask, out_len, records)


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
    records = list(records)
    if not records:
        raise ValueError("oracle_density needs at least one record")
    T = int(max(len(tokenize_record(tokenizer, r)[0]) for r in records))
    data = tokenize_set(records, tokenizer, T, "error", "oracle-density")
    visible_sum, n_queries, finals = 0.0, 0, []
    causal = np.arange(1, T + 1)[None, :]
    for start in range(0, len(data), chunk):
        # the last chunk is padded with empty rows (length 0: they see nothing) to one shape
        idx = np.arange(start, start + chunk)
        real = idx < len(data)
        rows = data.rows(np.minimum(idx, len(data) - 1))
        lengths = np.where(real, rows["lengths"], 0).astype(np.int32)
        # [B, T, T] -> [B, T]: visible keys per query, over keys j <= t per query
        mask = np.asarray(spans.attention_mask(rows["tokens"], span_tokens, max_segments, lengths=lengths))
        frac = mask.sum(-1) / causal
        for b in np.flatnonzero(real):
            q = rows["loss_mask"][b]
            visible_sum += float(frac[b][q].sum())
            n_queries += int(q.sum())
            finals.append(float(frac[b, rows["lengths"][b] - 1]))
    return {
        "density": visible_sum / n_queries,
        "final_density": float(np.mean(finals)),
        "completion_tokens": n_queries,
        "mean_length": float(np.mean(data.lengths)),
        "records": len(data),
    }
