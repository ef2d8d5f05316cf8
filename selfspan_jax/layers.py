"""Building blocks of the LLaMA decoder: RMSNorm, rotary embeddings, SwiGLU MLP.

Shapes use the house letters (STYLE.md): B batch, T query length, S key/value
length, N query heads, K KV heads, H head dim, D model dim, F MLP hidden.

Numerics follow HF `modeling_llama` so that a checkpoint behaves the same here:
the norm statistic and the rotary angles are computed in fp32 whatever the
compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfspan_jax.config import LlamaConfig


class RMSNorm(nnx.Module):
    """y = x * rsqrt(mean(x^2) + eps) * scale, the statistic in fp32 (as HF)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init (ones); accepted for a uniform constructor signature
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [..., D]
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before the scale multiply; keeping
        # that order makes bf16 results match HF bit-for-bit more often.
        return normed.astype(self.dtype) * self.scale[...].astype(self.dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse rotary frequencies, float32 [H/2], with LLaMA-3.1 scaling if configured.

    Mirrors HF `_compute_default_rope_parameters` and `_compute_llama3_parameters`:
    wavelengths shorter than original_len / high_freq_factor are kept, longer
    than original_len / low_freq_factor are divided by `factor`, and the band in
    between is interpolated smoothly. Computed once on the host (a constant of
    the config), so it costs nothing inside jit.
    """
    H = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32)
    if not rs.factor > 0:
        raise ValueError(f"RopeScaling.factor must be > 0, got {rs.factor!r}")
    if not rs.original_max_position_embeddings > 0:
        raise ValueError(
            f"RopeScaling.original_max_position_embeddings must be > 0, got {rs.original_max_position_embeddings!r}"
        )
    if not (0 < rs.low_freq_factor < rs.high_freq_factor):
        raise ValueError(
            "RopeScaling needs 0 < low_freq_factor < high_freq_factor, got "
            f"low_freq_factor={rs.low_freq_factor!r}, high_freq_factor={rs.high_freq_factor!r}"
        )
    old_len = rs.original_max_position_embeddings
    low_freq_wavelen = old_len / rs.low_freq_factor
    high_freq_wavelen = old_len / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin fp32 [..., H] for integer positions [...] (HF layout: the H/2 angles twice)."""
    # angles: [..., H/2]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, H] by cos/sin [B, T, H] (HF rotate_half: dims i and i+H/2 pair up)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[..., None, :] + rotated * sin[..., None, :]
    return out.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); kernels [in, out] as nnx.Linear stores them."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        D, F = config.d_model, config.mlp_dim
        kw = dict(use_bias=False, dtype=config.compute_dtype, param_dtype=config.weight_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(D, F, **kw)
        self.up_proj = nnx.Linear(D, F, **kw)
        self.down_proj = nnx.Linear(F, D, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [B, T, D] -> h: [B, T, F] -> [B, T, D]
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h)
