"""Self-selected spans: the spans the model writes itself, parsed token by token."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels.block_select import blocks_from_token_mask
from selfspan_jax import spans as spans_lib
from selfspan_jax.policies.base import Policy
from selfspan_jax.prefill_mask import span_prefill_mask
from selfspan_jax.selection import Selection


def active_blocks(state: spans_lib.SpanState, block_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(block_indices int32 [NB], block_count int32 [], token_mask bool [S]) for the newest query.

    NB = max_len // block_size; max_len must be a multiple of block_size.
    Entries past `block_count` are 0 (see pallas_kernels.block_select).
    """
    token_mask = spans_lib.visible_tokens(state)
    indices, count = blocks_from_token_mask(token_mask, block_size)
    return indices, count, token_mask


@dataclasses.dataclass(frozen=True)
class SelfSpanPolicy(Policy):
    """The spans the model writes itself (docs/spec.md §2), parsed token by token.

    State: a batched `spans.SpanState` (every field with a leading [B]).
    """

    span_tokens: spans_lib.SpanTokens
    max_segments: int = 64

    name: ClassVar[str] = "self_span"

    @classmethod
    def from_settings(cls, settings, context):
        settings = dict(settings)
        if "span_tokens" not in settings:
            if context.tokenizer is None:
                raise ValueError("policy 'self_span' needs span_tokens (or a tokenizer to derive them from)")
            settings["span_tokens"] = spans_lib.SpanTokens.from_tokenizer(context.tokenizer)
        if "max_segments" not in settings and context.max_segments is not None:
            settings["max_segments"] = context.max_segments
        return cls(**settings)

    def __post_init__(self):
        if not isinstance(self.span_tokens, spans_lib.SpanTokens):
            raise ValueError(f"span_tokens must be a spans.SpanTokens, got {type(self.span_tokens).__name__}")
        spans_lib.check_max_segments(self.max_segments)

    def prefill_rows(self, tokens, lengths):
        return span_prefill_mask(tokens, lengths, self.span_tokens, self.max_segments)

    def init_state(self, tokens, lengths, max_len):
        return jax.vmap(
            lambda t, n: spans_lib.prefill_state(t, n, max_len, self.max_segments, self.span_tokens)
        )(tokens, lengths)

    def update(self, state, tokens, active):
        return jax.vmap(lambda s, t, a: spans_lib.update(s, t, self.span_tokens, a))(state, tokens, active)

    def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
        indices, counts, token_mask = jax.vmap(lambda s: active_blocks(s, block_size))(state)
        return Selection(indices.astype(jnp.int32), counts.astype(jnp.int32), token_mask)

    def fallback(self, state, batch):
        return jnp.asarray(state.fallback_dense, bool).reshape(batch)

    def report(self, state):
        return spans_lib.span_stats(state)

