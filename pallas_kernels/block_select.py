"""Block-selection metadata for `block_sparse_decode`: which KV blocks a query reads.

Kept apart from the kernel, as jax keeps splash attention's `MaskInfo` apart
from its kernel: the kernel only consumes `(block_indices, block_counts,
token_mask)`, and any policy (self-selected spans, dense, query-aware) can
produce them from a per-token mask.

Layout (docs/interfaces.md): for a token mask [..., S] split into NB = S //
block_size blocks, `block_indices[..., :count]` are the blocks holding at
least one visible token, in ascending order; entries past `count` are 0.
The kernel reads only the first `count` entries, so the padding value is
never used as a block to read; 0 is always a valid block index, which keeps
an accidental read in bounds.

Shapes: S key length, NB = S // block_size; [...] any leading dims.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return int(block_size)


def blocks_from_token_mask(token_mask: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """(block_indices int32 [..., NB], block_counts int32 [...]) from bool [..., S].

    Raises ValueError unless S is a multiple of block_size. Jittable and
    vmappable; O(S) work, no Python loop over blocks.
    """
    block_size = _check_block_size(block_size)
    token_mask = jnp.asarray(token_mask)
    if token_mask.ndim < 1 or token_mask.dtype != jnp.bool_:
        raise ValueError(f"token_mask must be a bool array [..., S], got dtype {token_mask.dtype} shape {token_mask.shape}")
    seq_len = token_mask.shape[-1]
    if seq_len % block_size:
        raise ValueError(f"key length S={seq_len} is not a multiple of block_size={block_size}")
    return _blocks_from_token_mask(token_mask, block_size=block_size)


@functools.partial(jax.jit, static_argnames="block_size")
def _blocks_from_token_mask(token_mask: jax.Array, *, block_size: int) -> tuple[jax.Array, jax.Array]:
    batch_shape, seq_len = token_mask.shape[:-1], token_mask.shape[-1]
    num_blocks = seq_len // block_size
    # [B', NB]
    active = token_mask.reshape(-1, num_blocks, block_size).any(axis=-1)

    def compact(row):
        # [NB]: slot of each active block in the output; inactive ones go to
        # NB, out of bounds, and the scatter drops them. O(NB), unlike a sort.
        slot = jnp.where(row, jnp.cumsum(row, dtype=jnp.int32) - 1, num_blocks)
        blocks = jnp.arange(num_blocks, dtype=jnp.int32)
        return jnp.zeros(num_blocks, jnp.int32).at[slot].set(blocks, mode="drop")

    # [B', NB]
    indices = jax.vmap(compact)(active)
    # [B']
    counts = active.sum(axis=-1, dtype=jnp.int32)
    return indices.reshape(batch_shape + (num_blocks,)), counts.reshape(batch_shape)
