"""Sampling methods of the decode loop: one token per row from the logits.

`Sampling` is the host-side description of a method (greedy when its
temperature is 0, otherwise temperature with optional top-k / top-p), checked
once; the loop receives it as arrays (`Sampling.arrays()`), so calls that
change the temperature, k or p reuse one compiled program.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each token is chosen.

    temperature 0 = greedy (argmax of the raw logits); top_k / top_p None = no limit; seed: the
    noise of a sampled call (greedy calls ignore it), as vLLM's `SamplingParams.seed`.
    forced_tokens: int [B, >= max_new_tokens]: emit these instead of choosing (teacher forcing
    through the same loop and program; benchmarks and tests replay recorded span traces with it).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    forced_tokens: Any = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        s = self.seed
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or not -2**63 <= s < 2**63:
            raise ValueError(f"seed must be an int in [-2**63, 2**63), got {s!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating, np.integer)) or not t >= 0 \
                or not math.isfinite(t):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool)
                                       or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer))
                              or not 0.0 < p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] or None, got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(temperature f32, top_k int32 (0 = no limit), top_p f32 (1 = no limit)) for `sample_logits`."""
        return (jnp.float32(self.temperature), jnp.int32(0 if self.top_k is None else self.top_k),
                jnp.float32(1.0 if self.top_p is None else self.top_p))


def _filter_top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """scaled logits [B, V] -> the same with everything outside top-k, then top-p, set to -inf."""
    V = scaled.shape[-1]
    # [B, V] descending
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V).astype(jnp.int32)
    # [B, 1]
    kth = jnp.take_along_axis(sorted_desc, jnp.broadcast_to(k - 1, (scaled.shape[0],))[:, None], axis=-1)
    in_k = jnp.arange(V)[None, :] < k
    probs = jax.nn.softmax(jnp.where(in_k, sorted_desc, -jnp.inf), axis=-1)
    # keep rank r while the mass strictly before it is < top_p (rank 0 always)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & (mass_before < top_p)
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    # [B, 1]
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    cutoff = jnp.maximum(kth, pth)
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    rows: tuple[jax.Array, int] | None = None,
) -> jax.Array:
    """Draws one token per row: logits [B, V] -> int32 [B].

    temperature <= 0 means greedy (argmax of the raw logits). Otherwise the
    logits are divided by the temperature, then restricted to the `top_k`
    largest (top_k <= 0: no limit), then to the smallest set of those whose
    renormalised probability reaches `top_p` (top_p >= 1: no limit), and a
    token is drawn from what remains. Ties at a cut-off are kept. All three
    knobs are arrays (traced), so changing them does not recompile; the
    random draw runs only when sampling and the sort behind the limits only
    when one is in use (`lax.cond`: a greedy step pays for an argmax alone,
    not for [B, V] Gumbel noise). rows = (offset, total): these logits are
    rows offset .. offset + B of a batch of `total` split over devices; the
    draw is that of the whole batch (same tokens as one device).
    """
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    offset, total = rows if rows is not None else (0, B)

    def draw(logits):
        scaled = logits / temperature
        limited = (top_k > 0) | (top_p < 1.0)
        scaled = jax.lax.cond(limited, _filter_top_k_top_p, lambda x, *_: x, scaled, top_k, top_p)
        # jax.random.categorical's own rule (argmax of logits + Gumbel noise), with the noise of the
        # whole batch drawn and this shard's rows taken: a batch split over devices samples the
        # same tokens as the whole batch on one device.
        noise = jax.lax.dynamic_slice_in_dim(jax.random.gumbel(rng, (total, V), jnp.float32), offset, B)
        return jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, draw, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), logits)


def chosen_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """logits [B, V], tokens [B] -> log_softmax(logits)[b, tokens[b]] in fp32 (the model's own
    distribution: raw logits, no temperature, no top-k/top-p)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
