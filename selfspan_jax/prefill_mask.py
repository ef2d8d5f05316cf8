"""The prefill attention mask kept factored, expanded one [C, C] block at a time.

The span mask of a prompt is a [B, T, T] boolean: 256 MB at T = 16k for one
sequence, and the dense attention that consumes it scores [B, N, T, T] in
fp32 (4 GB per layer at 4 heads). Prefill never needs all of it at once:
`blocked_attention` (selfspan_jax.attention) walks query chunks and, inside
each, the key chunks at or before it, asking the mask for one block. What the
mask keeps is per query and per key (docs/spec.md section 2's rule needs no more):

- `SpanPrefillMask`: each query's (segment, refs [M], dense) and each key's
  segment, as `spans.query_fields` scans them; a block is `spans._visible` on
  a slice of those, the same function the training mask and the decode rows
  use, so the three cannot drift;
- `causal_prefill_mask`: the same class with every query dense (the rule then
  reduces to causal);
- `ArrayPrefillMask`: an explicit [B, T, T] mask, for plug-in policies that
  only define `prefill_mask` (a block is a slice of it).

Padding (`_with_padding`): positions >= lengths[b]
see only themselves and are seen by nothing. Blocks may reach past T (the
attention pads T to a multiple of the chunk); such positions are padding too.

Letters: B batch, T prompt length, C chunk, M max_segments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from selfspan_jax import spans as spans_lib


def _with_padding(vis, q_pos, k_pos, lengths):
    """vis bool [B, C, C'] of real rows -> the prefill convention: padding rows see only themselves.

    Padding positions are written into the KV cache by prefill and sit inside
    later active blocks until decode overwrites them. A row with nothing
    visible can produce NaN activations, and a masked NaN value still poisons
    `p @ v` (0 * NaN = NaN); letting a padding row see itself keeps its K/V
    finite. Real rows are untouched.
    """
    valid_q = q_pos[None, :] < lengths[:, None]  # [B, C]
    valid_k = k_pos[None, :] < lengths[:, None]  # [B, C']
    diag = (q_pos[:, None] == k_pos[None, :])[None]
    return (vis & valid_q[:, :, None] & valid_k[:, None, :]) | (~valid_q[:, :, None] & diag)


@struct.dataclass
class SpanPrefillMask:
    """q_segment int32 [B, T], q_refs bool [B, T, M], q_dense bool [B, T], key_seg int32 [B, T], lengths [B]."""

    q_segment: jax.Array
    q_refs: jax.Array
    q_dense: jax.Array
    key_seg: jax.Array
    lengths: jax.Array

    @property
    def shape(self) -> tuple[int, int, int]:
        B, T = self.q_segment.shape
        return B, T, T

    def block(self, q_start, k_start, q_size: int, k_size: int) -> jax.Array:
        """bool [B, q_size, k_size]: rows q_start.., columns k_start.. (traced starts are fine)."""
        T = self.q_segment.shape[1]
        q_pos = q_start + jnp.arange(q_size, dtype=jnp.int32)
        k_pos = k_start + jnp.arange(k_size, dtype=jnp.int32)
        qi, ki = jnp.clip(q_pos, 0, T - 1), jnp.clip(k_pos, 0, T - 1)

        def one(q_segment, q_refs, q_dense, key_seg):
            return spans_lib._visible(q_pos, q_segment[qi], q_refs[qi], q_dense[qi], key_seg[ki], key_pos=k_pos)

        vis = jax.vmap(one)(self.q_segment, self.q_refs, self.q_dense, self.key_seg)
        return _with_padding(vis, q_pos, k_pos, self.lengths)

    def full(self) -> jax.Array:
        """bool [B, T, T], the whole mask (training-size prompts, tests)."""
        T = self.q_segment.shape[1]
        return self.block(0, 0, T, T)


@struct.dataclass
class ArrayPrefillMask:
    """An explicit mask bool [B, T, T] behind the same `block` interface."""

    mask: jax.Array

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.mask.shape

    def block(self, q_start, k_start, q_size: int, k_size: int) -> jax.Array:
        T = self.mask.shape[1]
        q_pos = q_start + jnp.arange(q_size, dtype=jnp.int32)
        k_pos = k_start + jnp.arange(k_size, dtype=jnp.int32)
        # only the block is gathered: a padded copy of the whole mask per block would be [B, T, T] work
        # inside the attention's loop
        m = self.mask[:, jnp.clip(q_pos, 0, T - 1)[:, None], jnp.clip(k_pos, 0, T - 1)[None, :]]
        inside = (q_pos < T)[:, None] & (k_pos < T)[None, :]
        # positions past T (the attention's chunk padding) see only themselves
        past = (q_pos >= T)[:, None] & (q_pos[:, None] == k_pos[None, :])
        return jnp.where(inside[None], m, past[None])

    def full(self) -> jax.Array:
        return self.mask


def span_prefill_mask(tokens, lengths, span_tokens: spans_lib.SpanTokens, max_segments: int) -> SpanPrefillMask:
    """tokens int [B, T] right-padded, lengths int [B] -> the factored span mask of the prompts."""
    q_segment, q_refs, q_dense, key_seg = jax.vmap(
        lambda t, n: spans_lib.query_fields(t, n, span_tokens, max_segments))(tokens, lengths)
    return SpanPrefillMask(q_segment, q_refs, q_dense, key_seg, jnp.asarray(lengths, jnp.int32))


def causal_prefill_mask(T: int, lengths) -> SpanPrefillMask:
    """Causal over the first lengths[b] tokens: every query dense, one segment."""
    B = lengths.shape[0]
    zeros = jnp.zeros((B, T), jnp.int32)
    return SpanPrefillMask(zeros, jnp.zeros((B, T, 1), bool), jnp.ones((B, T), bool), zeros,
                           jnp.asarray(lengths, jnp.int32))
