"""Tests for pallas_kernels/block_select.py against brute-force NumPy loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.block_select import blocks_from_token_mask

# (S, block_size) pairs: a few fixed shapes so the jit cache is reused.
SHAPES = [(8, 1), (16, 4), (48, 16), (64, 8), (64, 64), (96, 32)]
BATCH = (2, 3)


def reference_blocks(token_mask: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Loop over rows and blocks: active ones first, ascending, rest 0."""
    *batch, seq_len = token_mask.shape
    num_blocks = seq_len // block_size
    rows = token_mask.reshape(-1, seq_len)
    indices = np.zeros((rows.shape[0], num_blocks), np.int64)
    counts = np.zeros(rows.shape[0], np.int64)
    for r, row in enumerate(rows):
        active = [b for b in range(num_blocks) if any(row[b * block_size : (b + 1) * block_size])]
        indices[r, : len(active)] = active
        counts[r] = len(active)
    return indices.reshape(*batch, num_blocks), counts.reshape(batch)


@st.composite
def masks(draw):
    seq_len, block_size = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # Per-row densities from empty to full, and sparse runs like span masks.
    density_per_row = rng.choice([0.0, 0.02, 0.1, 0.5, 1.0], size=BATCH + (1,))
    token_mask = rng.random(BATCH + (seq_len,)) < density_per_row
    return token_mask, block_size


@settings(max_examples=40, deadline=None)
@given(masks())
def test_blocks_match_bruteforce(case):
    token_mask, block_size = case
    indices, counts = blocks_from_token_mask(jnp.asarray(token_mask), block_size)
    assert indices.dtype == jnp.int32 and counts.dtype == jnp.int32
    ref_indices, ref_counts = reference_blocks(token_mask, block_size)
    np.testing.assert_array_equal(np.asarray(indices), ref_indices)
    np.testing.assert_array_equal(np.asarray(counts), ref_counts)


def test_vmap_and_jit_agree_with_batched_call():
    rng = np.random.default_rng(0)
    token_mask = jnp.asarray(rng.random((4, 64)) < 0.05)
    indices, counts = blocks_from_token_mask(token_mask, 8)
    v_indices, v_counts = jax.jit(jax.vmap(lambda m: blocks_from_token_mask(m, 8)))(token_mask)
    np.testing.assert_array_equal(np.asarray(v_indices), np.asarray(indices))
    np.testing.assert_array_equal(np.asarray(v_counts), np.asarray(counts))


def test_dense_and_empty_rows():
    token_mask = jnp.asarray([[True] * 32, [False] * 32, [False] * 31 + [True]])
    indices, counts = blocks_from_token_mask(token_mask, 8)
    assert np.asarray(counts).tolist() == [4, 0, 1]
    assert np.asarray(indices).tolist() == [[0, 1, 2, 3], [0, 0, 0, 0], [3, 0, 0, 0]]


@pytest.mark.parametrize(
    "token_mask, block_size, match",
    [
        (np.zeros((2, 30), bool), 8, "multiple"),
        (np.zeros((2, 32), np.int32), 8, "bool"),
        (np.zeros((), bool), 1, "bool"),
        (np.zeros((2, 32), bool), 0, "block_size"),
        (np.zeros((2, 32), bool), 8.0, "block_size"),
    ],
)
def test_bad_inputs_raise_value_error(token_mask, block_size, match):
    with pytest.raises(ValueError, match=match):
        blocks_from_token_mask(token_mask, block_size)
