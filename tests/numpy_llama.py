"""A float64 NumPy LLaMA forward: the test oracle for selfspan_jax.model.

Written from the HF `modeling_llama` equations, independently of the JAX code
(no shared helpers), so a test comparing the two checks the math, not a copy.
Other tests may import it:

    params = params_from_model(model)            # or params_from_hf(state_dict, config)
    logits = llama_forward(params, config, tokens, mask=None, positions=None)

`params` is a plain dict of float64 arrays with kernels in [in, out] layout:
    embed [V, D]; lm_head [D, V] or None (tied); final_norm [D];
    layers: list of {attn_norm, mlp_norm [D]; q [D, N*H], k, v [D, K*H],
                     o [N*H, D]; gate, up [D, F]; down [F, D]}.

Shapes: B batch, T length, N query heads, K KV heads, H head dim, D model dim,
F MLP hidden, V vocab.
"""

from __future__ import annotations

import math

import numpy as np

_PROJ = {"q": ("attn", "q_proj"), "k": ("attn", "k_proj"), "v": ("attn", "v_proj"), "o": ("attn", "o_proj"),
         "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"), "down": ("mlp", "down_proj")}


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)  # via ml_dtypes this also widens bfloat16 exactly


def _kernel(linear) -> np.ndarray:
    """Effective [in, out] kernel of an nnx.Linear, adding (alpha/r) A B if it carries LoRA."""
    w = _f64(linear.kernel[...])
    lora = getattr(linear, "lora", None)
    if lora is not None:
        scale = getattr(linear, "lora_scale", 1.0)
        w = w + scale * (_f64(lora.lora_a[...]) @ _f64(lora.lora_b[...]))
    return w


def params_from_model(model) -> dict:
    """Read a selfspan_jax Llama (base, LoRA-wrapped or grown) into float64 reference params."""
    embed = _f64(model.embed.embedding[...])
    if model.new_token_embed is not None:
        embed = np.concatenate([embed, _f64(model.new_token_embed[...])], axis=0)
    lm_head = None
    if model.lm_head is not None:
        lm_head = _f64(model.lm_head.kernel[...])
        if model.new_token_head is not None:
            lm_head = np.concatenate([lm_head, _f64(model.new_token_head[...])], axis=1)
    layers = []
    for blk in model.layers:
        p = {"attn_norm": _f64(blk.attn_norm.scale[...]), "mlp_norm": _f64(blk.mlp_norm.scale[...])}
        for short, (sub, name) in _PROJ.items():
            p[short] = _kernel(getattr(getattr(blk, sub), name))
        layers.append(p)
    return {"embed": embed, "lm_head": lm_head, "final_norm": _f64(model.final_norm.scale[...]), "layers": layers}


def params_from_hf(sd: dict, config) -> dict:
    """HF LLaMA state dict (numpy, `model.layers.{i}.self_attn.q_proj.weight` [out, in], ...) -> params."""
    g = lambda name: _f64(sd[name])  # noqa: E731
    layers = []
    for i in range(config.n_layers):
        pre = f"model.layers.{i}."
        layers.append({
            "attn_norm": g(pre + "input_layernorm.weight"),
            "mlp_norm": g(pre + "post_attention_layernorm.weight"),
            **{s: g(pre + f"self_attn.{s}_proj.weight").T for s in ("q", "k", "v", "o")},
            **{s: g(pre + f"mlp.{s}_proj.weight").T for s in ("gate", "up", "down")},
        })
    lm = None if config.tie_embeddings or "lm_head.weight" not in sd else g("lm_head.weight").T
    return {"embed": g("model.embed_tokens.weight"), "lm_head": lm, "final_norm": g("model.norm.weight"),
            "layers": layers}


def inv_freq(config) -> np.ndarray:
    """float64 [H/2]: theta^(-2i/H), then the LLaMA-3.1 piecewise rescale, per frequency."""
    H = config.head_dim
    out = []
    for i in range(H // 2):
        f = config.rope_theta ** (-2.0 * i / H)
        rs = config.rope_scaling
        if rs is not None:
            wavelen = 2 * math.pi / f
            lo_wl = rs.original_max_position_embeddings / rs.low_freq_factor
            hi_wl = rs.original_max_position_embeddings / rs.high_freq_factor
            if wavelen > lo_wl:  # long wavelength: fully interpolated
                f = f / rs.factor
            elif wavelen >= hi_wl:  # middle band: blend of scaled and unscaled
                s = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
                    rs.high_freq_factor - rs.low_freq_factor)
                f = (1 - s) * f / rs.factor + s * f
        out.append(f)
    return np.array(out)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, freqs):
    # x [B, T, heads, H]; pair (i, i + H/2) rotated by angle pos * freqs[i]
    half = x.shape[-1] // 2
    ang = pos[..., None].astype(np.float64) * freqs  # [B, T, H/2]
    c, s = np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def llama_forward(params: dict, config, tokens, mask=None, positions=None) -> np.ndarray:
    """float64 logits [B, T, V]. mask: bool [B, T, T] (default causal); positions: [B, T] (default 0..T-1).

    A query with no visible key gets a zero attention output.
    """
    tokens = np.asarray(tokens)
    B, T = tokens.shape
    N, K, H, eps = config.n_heads, config.n_kv_heads, config.head_dim, config.norm_eps
    G = N // K
    mask = np.broadcast_to(np.tril(np.ones((T, T), bool)) if mask is None else np.asarray(mask, bool), (B, T, T))
    pos = np.broadcast_to(np.arange(T) if positions is None else np.asarray(positions), (B, T))
    freqs = inv_freq(config)
    x = params["embed"][tokens]
    for p in params["layers"]:
        h = _rms(x, p["attn_norm"], eps)
        q = _rope((h @ p["q"]).reshape(B, T, N, H), pos, freqs)
        k = _rope((h @ p["k"]).reshape(B, T, K, H), pos, freqs)
        v = (h @ p["v"]).reshape(B, T, K, H)
        o = np.zeros((B, T, N, H))
        for n in range(N):
            kv = n // G  # HF repeat_kv: query head n reads KV head n // G
            for b in range(B):
                sc = q[b, :, n] @ k[b, :, kv].T / math.sqrt(H)  # [T, T]
                for t in range(T):
                    vis = mask[b, t]
                    if not vis.any():
                        continue
                    e = np.exp(sc[t, vis] - sc[t, vis].max())
                    o[b, t, n] = (e / e.sum()) @ v[b, vis, kv]
        x = x + o.reshape(B, T, N * H) @ p["o"]
        h = _rms(x, p["mlp_norm"], eps)
        g = h @ p["gate"]
        x = x + ((g / (1 + np.exp(-g))) * (h @ p["up"])) @ p["down"]
    h = _rms(x, params["final_norm"], eps)
    head = params["embed"].T if params["lm_head"] is None else params["lm_head"]
    return h @ head
