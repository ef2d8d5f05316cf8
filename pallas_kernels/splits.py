"""Flash-decoding split-K shared by the decode kernels (Triton, Mosaic GPU, token lists).

A (batch, KV head)'s live list is cut into `k_splits` contiguous shares, one
program each, when batch x KV heads alone would leave most SMs idle; each
program writes an unnormalised partial (o, running max m, running sum l) and
`combine_splits` merges them. Splits that hold no entries write nothing, and
`live_splits` tells the combine which did.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.backend import MIN_ENTRIES_PER_SPLIT

# Masked scores are set to this finite value before the running max, so a fully
# masked tile gives m_new - m_prev == 0 instead of inf - inf = NaN. Their
# probabilities are then zeroed explicitly: the large negative value alone
# would still leak exp(0) = 1 per masked token when a whole tile is masked.
# One constant for every kernel and the combine.
NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def split_range(count, split, k_splits):
    """[first, last) of the live entries that split `split` of `k_splits` reads.

    Contiguous shares of the live count (not of the padded list), so splits stay
    balanced at any density, and at least MIN_ENTRIES_PER_SPLIT each, so a short
    list leaves the later splits empty: they read nothing and write nothing
    (`live_splits` tells the combine). Works on scalars in the kernel and on
    arrays outside it.
    """
    per_split = jnp.maximum((count + k_splits - 1) // k_splits, MIN_ENTRIES_PER_SPLIT)
    first = split * per_split
    return first, jnp.minimum(count, first + per_split)


def live_splits(counts, k_splits: int):
    """bool [k_splits, *counts.shape]: which splits hold entries (and so wrote partials)."""
    split = jnp.arange(k_splits).reshape((k_splits,) + (1,) * counts.ndim)
    first, last = split_range(counts[None], split, k_splits)
    return last > first


def combine_splits(o, m, l, live):
    """Flash-decoding combine of per-split partials.

    o f32 [k_splits, ..., H], m, l f32 [k_splits, ...], live bool [k_splits, ...]
    (a prefix of m's dims: the splits that wrote; the others hold whatever the
    buffer held) -> f32 [..., H]; rows whose total weight is 0 (nothing
    visible) come out exactly 0.
    """
    live = live.reshape(live.shape + (1,) * (m.ndim - live.ndim))
    m = jnp.where(live, m, NEG)
    l = jnp.where(live, l, 0.0)
    o = jnp.where(live[..., None], o, 0.0)
    m_max = m.max(axis=0)
    # jax's own Pallas decode_attention needs this barrier to keep XLA:GPU from
    # fusing the max into the exp below and producing NaNs (b/389925439).
    m_max = lax.optimization_barrier(m_max)
    weight = jnp.exp(m - m_max[None])  # [k_splits, ...]
    l_total = (l * weight).sum(axis=0)
    o_total = (o * weight[..., None]).sum(axis=0)
    safe = jnp.where(l_total > 0, l_total, 1.0)
    return jnp.where((l_total > 0)[..., None], o_total / safe[..., None], 0.0)
