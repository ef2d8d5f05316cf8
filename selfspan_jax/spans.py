"""The span language of docs/spec.md §2: one rule, used by training and decoding.

Three special tokens: `<|anchor|>` (A), `<|ref|>` (R), `<|/ref|>` (/R).
Reference ids are decimal numbers written with the tokenizer's ordinary
single-digit tokens.

The rule is defined ONCE, by the per-token state machine `update` plus the row
function `_visible`. The training mask `attention_mask` is built by scanning
that same `update` over the tokens and applying that same `_visible` to every
query; the decode loop calls `update` once per emitted token and
`visible_tokens` for the row of the newest query. A test steps the decode
state token by token over random streams and compares with every mask row,
and a second, independently written brute-force reference checks both.

Rule (positions are 0-based; t is the query, j the key):

- seg(t) = number of A tokens at positions <= t. Segment 0 (BOS, instruction)
  is always visible.
- A segment's header runs from its first R to the next /R. Inside an open
  header, a maximal run of consecutive digit tokens is one decimal number
  (leading zeros allowed: "01" = 1); any non-digit token ends it (space,
  comma, R, /R, A, or any other token). A number still running when the
  sequence ends is not a reference (its header is not closed anyway).
- A finished number n is a reference of the segment iff n < seg and
  n < max_segments; otherwise it is ignored and counted in `ignored_refs`.
- Visibility of key j <= t for query t:
    * dense (every j <= t) while seg(t)'s header has not closed: prompt
      segments, the A token, R and the header digits;
    * sparse from the /R token on (the /R row itself is sparse): j is visible
      iff seg(j) == 0 or seg(j) == seg(t) or seg(j) in refs(seg(t)).
  Nothing makes a query see a key j > t.
- Malformed input is ignored, never fatal:
    * a second R after the header closed, an R inside an open header, and a
      /R with no open header are ignored (counted in `stray_markers`); an R
      inside an open header still ends a number being parsed;
    * digits outside an open header are ordinary text;
    * a header still open when the next A arrives leaves its segment dense
      for its whole life (counted in `unclosed_headers`); a header still open
      at the end of the sequence is visible as `state.header == HEADER_OPEN`;
    * an A that would open segment number >= max_segments switches the
      sequence to dense for the rest of its life (`fallback_dense`), from
      that A on.
- Padding (training masks only): positions >= lengths, or equal to the pad id
  when `lengths` is None and `span_tokens.pad` is set, see nothing and are
  seen by nothing. Their rows are therefore all False: the attention that
  consumes the mask must return zeros (not NaN) for a row with nothing
  visible, or give padding rows their diagonal (policies.py does the latter).
  Pad tokens are ordinary non-digit tokens for the state machine; they only
  matter through the mask. If the tokenizer's pad id equals its EOS id, pass
  `lengths`, or EOS positions are masked as padding.

Shapes use the house letters: T query length, S key length (= max_len of a
decode state), V vocab; M = max_segments, NB = S // block_size.

Why one file of ~500 lines: one algorithm, the span rule, as a per-token state
machine and the training mask built from that same step; splitting it would
split the one rule that training and decoding must share.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from selfspan_jax.tokenizer import ANCHOR, REF_CLOSE, REF_OPEN  # the strings live with the jax-free tokenizer


# Header states of the current segment.
HEADER_NONE, HEADER_OPEN, HEADER_CLOSED = 0, 1, 2

# The reference bitmask is [max_segments] per sequence, so this is a sanity
# bound, chosen so that number * 10 + 9 never overflows int32 (numbers
# saturate at max_segments).
MAX_SEGMENTS_LIMIT = 1 << 20

_DIGITS = "0123456789"


def _check_index(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def check_max_segments(max_segments: Any) -> int:
    if (
        isinstance(max_segments, bool)
        or not isinstance(max_segments, (int, np.integer))
        or not 1 <= max_segments <= MAX_SEGMENTS_LIMIT
    ):
        raise ValueError(f"max_segments must be an int in [1, {MAX_SEGMENTS_LIMIT}], got {max_segments!r}")
    return int(max_segments)


@dataclasses.dataclass(frozen=True, eq=False)
class SpanTokens:
    """Token ids of the span language for one tokenizer.

    anchor, ref_open, ref_close: ids of A, R, /R.
    digit_value: int32 [V], the decimal value 0..9 of each token that is
        exactly one ASCII digit, -1 for every other token. Stored as a
        read-only numpy array; inside jit it becomes a constant.
    pad: id treated as padding by `attention_mask` when no lengths are given.

    Hashable and comparable (ids + a SHA-1 of the digit table), so it can be a
    jit static argument or a field of a frozen, hashable policy.
    """

    anchor: int
    ref_open: int
    ref_close: int
    digit_value: np.ndarray
    pad: int | None = None

    def __post_init__(self):
        for name in ("anchor", "ref_open", "ref_close"):
            object.__setattr__(self, name, _check_index(name, getattr(self, name)))
        table = np.array(self.digit_value)
        if table.ndim != 1 or table.size == 0 or not np.issubdtype(table.dtype, np.integer):
            raise ValueError(
                f"digit_value must be a non-empty 1-D integer array, got dtype {table.dtype} shape {table.shape}"
            )
        if table.min() < -1 or table.max() > 9:
            raise ValueError(f"digit_value entries must be in [-1, 9], got range [{table.min()}, {table.max()}]")
        table = table.astype(np.int32)
        table.setflags(write=False)
        vocab = table.shape[0]
        ids = {"anchor": self.anchor, "ref_open": self.ref_open, "ref_close": self.ref_close}
        if len(set(ids.values())) != 3:
            raise ValueError(f"span token ids must be distinct, got {ids}")
        if self.pad is not None:
            object.__setattr__(self, "pad", _check_index("pad", self.pad))
            if self.pad in ids.values():
                raise ValueError(f"pad id {self.pad} collides with a span token id {ids}")
            ids["pad"] = self.pad
        for name, i in ids.items():
            if i >= vocab:
                raise ValueError(f"{name} id {i} is outside the digit table of size {vocab}")
            if table[i] >= 0:
                raise ValueError(f"{name} id {i} is marked as the digit {table[i]} in digit_value")
        object.__setattr__(self, "digit_value", table)
        object.__setattr__(self, "_digest", hashlib.sha1(table.tobytes()).hexdigest())

    @property
    def vocab_size(self) -> int:
        return int(self.digit_value.shape[0])

    def _key(self) -> tuple:
        return (self.anchor, self.ref_open, self.ref_close, self.pad, self.vocab_size, self._digest)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SpanTokens) and self._key() == other._key()

    @classmethod
    def from_digit_ids(
        cls,
        anchor: int,
        ref_open: int,
        ref_close: int,
        digit_ids: Sequence[int],
        vocab_size: int,
        pad: int | None = None,
    ) -> "SpanTokens":
        """Build from the ids of the tokens "0".."9" (in that order)."""
        if len(digit_ids) != 10:
            raise ValueError(f"digit_ids must list the ids of '0'..'9' (10 ids), got {len(digit_ids)}")
        vocab_size = _check_index("vocab_size", vocab_size)
        table = np.full(vocab_size, -1, np.int32)
        for value, i in enumerate(digit_ids):
            i = _check_index(f"digit_ids[{value}]", i)
            if i >= vocab_size:
                raise ValueError(f"digit id {i} for '{value}' is >= vocab_size {vocab_size}")
            table[i] = value
        return cls(anchor, ref_open, ref_close, table, pad)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "SpanTokens":
        """Ids and digit table of any tokenizer with the HF-like interface.

        Needs `len(tokenizer)`, `convert_tokens_to_ids`, and the token strings
        from `get_vocab()`, else `convert_ids_to_tokens`, else `decode([i])`.
        A token is a digit iff its string is exactly one of "0".."9": byte-level
        BPE spells a leading space into the token ("Ġ7"), and such a token is
        NOT a digit (spaces end numbers). Tokenizers that merge several digits
        into one token cannot write references and are rejected.
        """
        vocab = len(tokenizer)
        ids = {}
        for name, text in (("anchor", ANCHOR), ("ref_open", REF_OPEN), ("ref_close", REF_CLOSE)):
            i = tokenizer.convert_tokens_to_ids(text)
            unk = getattr(tokenizer, "unk_token_id", None)
            if i is None or (unk is not None and i == unk) or not 0 <= int(i) < vocab:
                raise ValueError(
                    f"tokenizer has no token {text!r} (got id {i!r}); add the span tokens first "
                    "(hf_tokenizer.add_span_tokens)"
                )
            ids[name] = int(i)
        table = np.full(vocab, -1, np.int32)
        for i, text in enumerate(_token_strings(tokenizer, vocab)):
            if text is not None and len(text) == 1 and text in _DIGITS:
                table[i] = int(text)
        missing = [d for d in range(10) if not (table == d).any()]
        if missing:
            raise ValueError(f"tokenizer has no single-digit token for the digits {missing}; references cannot be written")
        pad = getattr(tokenizer, "pad_token_id", None)
        return cls(ids["anchor"], ids["ref_open"], ids["ref_close"], table, None if pad is None else int(pad))


def _token_strings(tokenizer: Any, vocab: int) -> list[str | None]:
    """The string of every id in [0, vocab), by the cheapest method the tokenizer offers."""
    if hasattr(tokenizer, "get_vocab"):
        strings: list[str | None] = [None] * vocab
        for text, i in tokenizer.get_vocab().items():
            if 0 <= int(i) < vocab:
                strings[int(i)] = text
        return strings
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        try:
            out = tokenizer.convert_ids_to_tokens(list(range(vocab)))
            if isinstance(out, (list, tuple)) and len(out) == vocab:
                return list(out)
        except (TypeError, ValueError):
            pass
        return [tokenizer.convert_ids_to_tokens(i) for i in range(vocab)]
    return [tokenizer.decode([i]) for i in range(vocab)]


@struct.dataclass
class SpanState:
    """Decode-time parse state of ONE sequence (vmap over the batch).

    Every field is an array of fixed shape, so the state can live in a
    `lax.while_loop` carry. S = max_len, M = max_segments.
    """

    seg_ids: jax.Array  # int32 [S]: seg(j) of every position j < length; 0 beyond
    segment: jax.Array  # int32 []: seg of the last appended position (A tokens so far)
    header: jax.Array  # int32 []: HEADER_NONE / HEADER_OPEN / HEADER_CLOSED of the current segment
    number: jax.Array  # int32 []: value of the digits being parsed in an open header, -1 if none; saturates at M
    refs: jax.Array  # bool [M]: references of the current segment
    length: jax.Array  # int32 []: number of positions appended
    fallback_dense: jax.Array  # bool []: an A overflowed max_segments; dense from then on
    unclosed_headers: jax.Array  # int32 []: segments that ended with their header still open
    ignored_refs: jax.Array  # int32 []: numbers >= seg or >= M, dropped
    stray_markers: jax.Array  # int32 []: R / /R tokens ignored as malformed

    @property
    def max_len(self) -> int:
        return self.seg_ids.shape[-1]

    @property
    def max_segments(self) -> int:
        return self.refs.shape[-1]


def init_state(max_len: int, max_segments: int, batch: int | None = None) -> SpanState:
    """Empty state (length 0); with `batch`, every field gets a leading [B] axis."""
    max_len = _check_index("max_len", max_len)
    max_segments = check_max_segments(max_segments)
    lead = () if batch is None else (_check_index("batch", batch),)
    zero = jnp.zeros(lead, jnp.int32)
    return SpanState(
        seg_ids=jnp.zeros(lead + (max_len,), jnp.int32),
        segment=zero,
        header=zero,
        number=jnp.full(lead, -1, jnp.int32),
        refs=jnp.zeros(lead + (max_segments,), bool),
        length=zero,
        fallback_dense=jnp.zeros(lead, bool),
        unclosed_headers=zero,
        ignored_refs=zero,
        stray_markers=zero,
    )


def _digit_of(token: jax.Array, span_tokens: SpanTokens) -> jax.Array:
    """int32 []: decimal value of `token`, -1 if it is not a digit (or outside the table)."""
    table = jnp.asarray(span_tokens.digit_value)
    vocab = span_tokens.vocab_size
    # Model vocabularies are often padded beyond len(tokenizer): ids past the
    # table are never digits rather than clamped onto the last entry.
    inside = (token >= 0) & (token < vocab)
    return jnp.where(inside, table[jnp.clip(token, 0, vocab - 1)], -1)


def _step(state: SpanState, token: jax.Array, span_tokens: SpanTokens, active: jax.Array) -> SpanState:
    """Append `token` at position `state.length` when `active` (else no-op). O(M)."""
    token = jnp.asarray(token, jnp.int32)
    max_len, max_segments = state.max_len, state.max_segments
    # A full state cannot take another position; the generation loop stops on
    # cache-full first, this only keeps a stray call from corrupting the state.
    active = jnp.asarray(active, bool) & (state.length < max_len)

    digit = _digit_of(token, span_tokens)
    is_digit = digit >= 0
    is_anchor = token == span_tokens.anchor
    is_open = token == span_tokens.ref_open
    is_close = token == span_tokens.ref_close
    header_open = state.header == HEADER_OPEN

    # Any non-digit token ends a number being parsed; judge it against the
    # segment that owns the header (before an A advances the segment).
    finish = header_open & (state.number >= 0) & ~is_digit
    in_range = (state.number < state.segment) & (state.number < max_segments)
    # [M]
    hit = jnp.arange(max_segments, dtype=jnp.int32) == state.number
    refs = state.refs | (finish & in_range & hit)
    ignored_refs = state.ignored_refs + (finish & ~in_range).astype(jnp.int32)
    # Saturating at M keeps int32 safe and does not change the verdict: every
    # value >= M is ignored alike.
    grown = jnp.minimum(jnp.maximum(state.number, 0) * 10 + digit, max_segments)
    number = jnp.where(header_open & is_digit, grown, -1)

    header = jnp.where(
        is_anchor,
        HEADER_NONE,
        jnp.where(
            is_open & (state.header == HEADER_NONE),
            HEADER_OPEN,
            jnp.where(is_close & header_open, HEADER_CLOSED, state.header),
        ),
    )
    stray = (is_open & (state.header != HEADER_NONE)) | (is_close & ~header_open)
    segment = state.segment + is_anchor.astype(jnp.int32)
    refs = jnp.where(is_anchor, False, refs)

    new = SpanState(
        seg_ids=state.seg_ids,
        segment=segment,
        header=header.astype(jnp.int32),
        number=number,
        refs=refs,
        length=state.length + 1,
        fallback_dense=state.fallback_dense | (is_anchor & (segment >= max_segments)),
        unclosed_headers=state.unclosed_headers + (is_anchor & header_open).astype(jnp.int32),
        ignored_refs=ignored_refs,
        stray_markers=state.stray_markers + stray.astype(jnp.int32),
    )
    new = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state)
    # An inactive step writes out of bounds and is dropped: no O(S) select.
    write_at = jnp.where(active, state.length, max_len)
    return new.replace(seg_ids=state.seg_ids.at[write_at].set(segment, mode="drop"))


def _query_dense(state: SpanState) -> jax.Array:
    """bool []: whether the query at the last appended position attends densely."""
    return state.fallback_dense | (state.header != HEADER_CLOSED)


def _visible(
    q_pos: jax.Array, q_segment: jax.Array, q_refs: jax.Array, q_dense: jax.Array, key_seg: jax.Array,
    key_pos: jax.Array | None = None,
) -> jax.Array:
    """The visibility rule for queries (any leading shape [...]) against keys [S].

    q_pos, q_segment, q_dense: [...]; q_refs: bool [..., M]; key_seg: int32 [S]
    (seg of each key position); key_pos: int32 [S], the keys' positions
    (default 0..S-1; a block of keys further on passes its own). Returns bool
    [..., S]. Used with scalar queries by the decode path, with [T] queries by
    `attention_mask` and with one [C] x [C] block at a time by
    `prefill_mask.SpanPrefillMask`.
    """
    max_segments = q_refs.shape[-1]
    if key_pos is None:
        # [S]
        key_pos = jnp.arange(key_seg.shape[-1], dtype=jnp.int32)
    # [..., S]
    ref_hit = jnp.take(q_refs, jnp.clip(key_seg, 0, max_segments - 1), axis=-1) & (key_seg < max_segments)
    sparse = (key_seg == 0) | (key_seg == q_segment[..., None]) | ref_hit
    causal = key_pos <= q_pos[..., None]
    return causal & (q_dense[..., None] | sparse)


def update(state: SpanState, token: jax.Array, span_tokens: SpanTokens, active=True) -> SpanState:
    """Append one token (it takes position `state.length`) when `active` (bool []), else return the
    state unchanged. Jittable, O(M).

    On a full state (length == max_len) this is a no-op.
    """
    if jnp.ndim(token) != 0:
        raise ValueError(f"update takes one token per sequence (vmap over the batch), got shape {jnp.shape(token)}")
    return _step(state, token, span_tokens, active)


def visible_tokens(state: SpanState) -> jax.Array:
    """bool [S]: the mask row of the query at position `state.length - 1`.

    Convention: call `update` with the token about to be fed to the model
    (it sits at cache position `length` before the step), then this gives the
    row of exactly that query. All False when length == 0.
    """
    return _visible(state.length - 1, state.segment, state.refs, _query_dense(state), state.seg_ids)


def prefill_state(
    tokens: jax.Array, length: jax.Array, max_len: int, max_segments: int, span_tokens: SpanTokens
) -> SpanState:
    """State after appending `tokens[:length]` (tokens int [T], T <= max_len).

    Equal to `length` calls of `update` from `init_state(max_len, max_segments)`;
    `length` may be traced (right-padded prompts), the rest is static.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be a 1-D integer array [T], got dtype {tokens.dtype} shape {tokens.shape}")
    if jnp.ndim(length) != 0:
        raise ValueError(f"length must be a scalar, got shape {jnp.shape(length)}")
    if tokens.shape[0] > max_len:
        raise ValueError(f"prompt length T={tokens.shape[0]} exceeds max_len={max_len}")
    state, _ = _scan(tokens, length, span_tokens, max_len, max_segments)
    return state


def query_fields(tokens: jax.Array, length: jax.Array, span_tokens: SpanTokens, max_segments: int):
    """The factored mask of one sequence: what `_visible` needs of every query and key.

    tokens int [T], length int [] -> (q_segment int32 [T], q_refs bool [T, M], q_dense bool [T],
    key_seg int32 [T]): mask[t, j] = _visible(t, q_segment[t], q_refs[t], q_dense[t], key_seg)[j]
    for t, j < length. [T, T] is never built; `attention_mask` expands all rows at once,
    the chunked prefill one block at a time.
    """
    final, (q_segment, q_refs, q_dense) = _scan(tokens, length, span_tokens, tokens.shape[0], max_segments)
    return q_segment, q_refs, q_dense, final.seg_ids


def _scan(tokens: jax.Array, length: jax.Array, span_tokens: SpanTokens, max_len: int, max_segments: int):
    """Scan `_step` over tokens [T]; also emit each query's (segment, refs [M], dense) for the mask."""

    def body(state, xs):
        token, pos = xs
        state = _step(state, token, span_tokens, pos < length)
        return state, (state.segment, state.refs, _query_dense(state))

    positions = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    return jax.lax.scan(body, init_state(max_len, max_segments), (tokens.astype(jnp.int32), positions))


def attention_mask(
    tokens: jax.Array, span_tokens: SpanTokens, max_segments: int, lengths: jax.Array | None = None
) -> jax.Array:
    """bool [..., T, T]: mask[..., t, j] = query t may attend to key j.

    tokens: int [..., T] (any leading dims); lengths: int [...] or None.
    Built by scanning the decode-state `update` over each sequence, so the
    training mask and the decode rows are the same rule by construction.
    Padding rows are all False (see the module docstring).
    """
    if not isinstance(span_tokens, SpanTokens):
        raise ValueError(f"span_tokens must be a SpanTokens, got {type(span_tokens).__name__}")
    max_segments = check_max_segments(max_segments)
    tokens = jnp.asarray(tokens)
    if tokens.ndim < 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [..., T], got dtype {tokens.dtype} shape {tokens.shape}")
    batch_shape, seq_len = tokens.shape[:-1], tokens.shape[-1]
    use_pad = lengths is None and span_tokens.pad is not None
    if lengths is None:
        lengths = jnp.full(batch_shape, seq_len, jnp.int32)
    else:
        lengths = jnp.asarray(lengths)
        if lengths.shape != batch_shape or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(
                f"lengths must be an integer array of shape {batch_shape} (tokens' leading dims), "
                f"got dtype {lengths.dtype} shape {lengths.shape}"
            )
        if not isinstance(lengths, jax.core.Tracer):
            bad = np.asarray(lengths)
            if bad.size and (bad.min() < 0 or bad.max() > seq_len):
                raise ValueError(f"lengths must lie in [0, T={seq_len}], got range [{bad.min()}, {bad.max()}]")
    if seq_len == 0:
        return jnp.zeros(batch_shape + (0, 0), bool)
    return _attention_mask(tokens, lengths, span_tokens=span_tokens, max_segments=max_segments, use_pad=use_pad)


@functools.partial(jax.jit, static_argnames=("span_tokens", "max_segments", "use_pad"))
def _attention_mask(tokens, lengths, *, span_tokens: SpanTokens, max_segments: int, use_pad: bool):
    batch_shape, seq_len = tokens.shape[:-1], tokens.shape[-1]
    # [B', T], [B']
    flat_tokens = tokens.reshape(-1, seq_len)
    flat_lengths = lengths.reshape(-1).astype(jnp.int32)

    def one(seq, length):
        q_segment, q_refs, q_dense, key_seg = query_fields(seq, length, span_tokens, max_segments)
        positions = jnp.arange(seq_len, dtype=jnp.int32)
        # [T, T]
        mask = _visible(positions, q_segment, q_refs, q_dense, key_seg)
        # [T]
        valid = positions < length
        if use_pad:
            valid = valid & (seq != span_tokens.pad)
        return mask & valid[:, None] & valid[None, :]

    # [B', T, T]
    masks = jax.vmap(one)(flat_tokens, flat_lengths)
    return masks.reshape(batch_shape + (seq_len, seq_len))


def span_stats(state: SpanState) -> dict[str, jax.Array]:
    """Fallback statistics of a (possibly batched) state, for the generation report.

    `unclosed_headers` includes the current segment when its header is still open.
    """
    return {
        "segments": state.segment,
        "fallback_dense": state.fallback_dense,
        "unclosed_headers": state.unclosed_headers + (state.header == HEADER_OPEN).astype(jnp.int32),
        "ignored_refs": state.ignored_refs,
        "stray_markers": state.stray_markers,
    }
