"""The LLaMA decoder in Flax NNX, with a training/prefill path and a one-token decode path.

Shapes use the house letters (STYLE.md): B batch, T query length, S key/value
length, N query heads, K KV heads, H head dim, D model dim, V vocab, L layers.

The parameter tree is fixed (the weight loader maps HF names onto it):
    embed.embedding [V, D]
    layers[i].attn_norm.scale [D], layers[i].mlp_norm.scale [D]
    layers[i].attn.{q,k,v,o}_proj.kernel [in, out]    (HF weight transposed)
    layers[i].mlp.{gate,up,down}_proj.kernel [in, out]
    final_norm.scale [D]
    lm_head.kernel [D, V]                              (only when not tied)
    new_token_embed [V_new, D], new_token_head [D, V_new]  (only after add_tokens)
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfspan_jax.attention import Attention, blocked_attention, decode_attention, masked_attention, prefill_chunk
from selfspan_jax.cache import KVCache
from selfspan_jax.config import LlamaConfig
from selfspan_jax.layers import MLP, RMSNorm, rope_cos_sin, rope_inv_freq

# attention_fn(q [B, N, H], k_all [L, B, K, S, H], v_all [L, B, K, S, H], layer_idx: int) -> [B, N, H]
# The whole stacked cache, not k_all[layer_idx]: a per-layer slice is a copy
# XLA makes before any kernel can read it (docs/notes/generation.md).
AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, int], jax.Array]


class NewTokenParam(nnx.Param):
    """Rows appended to the vocabulary by `Llama.add_tokens` (span tokens).

    A Param subclass so that optimisers over `nnx.Param` still see them, while
    `lora.lora_trainable_filter` can pick out exactly these rows by type.
    """


@functools.lru_cache(maxsize=64)
def _inv_freq(config: LlamaConfig) -> np.ndarray:
    # The config is frozen and hashable, so the host-side frequencies are
    # computed once per config instead of once per trace.
    return rope_inv_freq(config)


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=config.norm_eps, dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        self.attn_norm = RMSNorm(config.d_model, **norm)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, **norm)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, cos, sin, mask, chunk: int | None = None):
        """x [B, T, D], cos/sin [B, T, H], mask bool [B, T, T] ->
        (x [B, T, D], q [B, T, N, H], k, v [B, K, T, H]).

        With `chunk`, mask is a `prefill_mask` object and attention runs block by block
        (`blocked_attention`: no [B, T, T] mask, no [B, N, T, T] scores)."""
        q, k, v = self.attn.qkv(self.attn_norm(x), cos, sin)
        o = masked_attention(q, k, v, mask) if chunk is None else blocked_attention(q, k, v, mask, chunk)
        x = x + self.attn.out(o)
        x = x + self.mlp(self.mlp_norm(x))
        return x, q, k, v


def _write_row(cache, layer: int, b_idx, write_at, in_range, row):
    """cache [L, B, K, S, H] with row [B, K, H] at (layer, b, :, write_at[b], :) where in_range[b]
    (elsewhere the row already there is written back). Indices are in bounds by construction."""
    old = cache[layer, b_idx, :, write_at, :]
    row = jnp.where(in_range[:, None, None], row.astype(cache.dtype), old)
    return cache.at[layer, b_idx, :, write_at, :].set(row, mode="promise_in_bounds")


# Rematerialisation of each decoder layer in training (`Llama.remat`): "layer" keeps only the
# layer inputs and recomputes the rest in the backward pass, "dots" keeps the matmul outputs
# (jax.checkpoint_policies names).
REMAT_POLICIES = {"none": None, "layer": "nothing_saveable", "dots": "dots_with_no_batch_dims_saveable"}


class Llama(nnx.Module):
    """LLaMA-family decoder (GQA, RoPE, RMSNorm, SwiGLU), tied or untied head.

    Parameters are stored in `config.weight_dtype`, activations computed in
    `config.compute_dtype`; logits are always fp32.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        cd, wd = config.compute_dtype, config.weight_dtype
        self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=cd, param_dtype=wd, rngs=rngs)
        self.layers = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=cd, param_dtype=wd)
        if config.tie_embeddings:
            # nnx.data: the attribute holds parameters in other models, so it
            # must not be frozen into the graphdef as a static None.
            self.lm_head = nnx.data(None)
        else:
            self.lm_head = nnx.Linear(config.d_model, config.vocab_size, use_bias=False, dtype=cd,
                                      param_dtype=wd, rngs=rngs)
        # Filled by add_tokens; declared as data so a Param can replace the None.
        self.new_token_embed = nnx.data(None)
        self.new_token_head = nnx.data(None)
        self.remat = "none"  # a REMAT_POLICIES key; static (part of the graph definition)

    # ---- vocabulary -------------------------------------------------------
    @property
    def base_vocab_size(self) -> int:
        """Rows of `embed.embedding`, i.e. the vocabulary before `add_tokens`."""
        return self.embed.embedding.shape[0]

    @property
    def num_new_tokens(self) -> int:
        return 0 if self.new_token_embed is None else self.new_token_embed.shape[0]

    def embedding_matrix(self) -> jax.Array:
        """The full input embedding [V, D] (base rows, then the added rows), weight dtype."""
        E = self.embed.embedding[...]
        if self.new_token_embed is not None:
            E = jnp.concatenate([E, self.new_token_embed[...]], axis=0)
        return E

    def head_matrix(self) -> jax.Array:
        """The full output projection [D, V] (the embedding transposed when tied), weight dtype."""
        if self.lm_head is None:
            return self.embedding_matrix().T
        W = self.lm_head.kernel[...]
        if self.new_token_head is not None:
            W = jnp.concatenate([W, self.new_token_head[...]], axis=1)
        return W

    def add_tokens(self, n_new: int) -> None:
        """Grow the vocabulary by n_new rows, each initialised to the mean of the existing rows.

        The rows live in `new_token_embed` (and `new_token_head` when untied),
        apart from the pretrained matrices, so LoRA fine-tuning can train
        exactly them. Mean init (as HF's resize_token_embeddings does) keeps the
        new tokens' logits at the average level instead of random spikes.
        Updates `self.config.vocab_size`. Call outside jit: it changes shapes.
        """
        if not isinstance(n_new, int) or isinstance(n_new, bool) or n_new <= 0:
            raise ValueError(f"add_tokens: n_new must be a positive int, got {n_new!r}")
        D, wd = self.config.d_model, self.config.weight_dtype
        E = self.embedding_matrix()
        rows = jnp.broadcast_to(jnp.mean(E.astype(jnp.float32), axis=0), (n_new, D)).astype(wd)
        old = [] if self.new_token_embed is None else [self.new_token_embed[...]]
        self.new_token_embed = NewTokenParam(jnp.concatenate(old + [rows], axis=0))
        if self.lm_head is not None:
            W = self.head_matrix()
            cols = jnp.broadcast_to(jnp.mean(W.astype(jnp.float32), axis=1, keepdims=True), (D, n_new)).astype(wd)
            old = [] if self.new_token_head is None else [self.new_token_head[...]]
            self.new_token_head = NewTokenParam(jnp.concatenate(old + [cols], axis=1))
        self.config = self.config.replace(vocab_size=self.config.vocab_size + n_new)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """tokens int [...] -> [..., D] in the compute dtype.

        Two gathers and a select instead of concatenating the matrices: a
        concatenation would copy the whole [V, D] table on every decode step.
        Ids outside [0, V) are clamped (jit cannot raise on data).
        """
        V0 = self.base_vocab_size
        x = jnp.take(self.embed.embedding[...], jnp.clip(tokens, 0, V0 - 1), axis=0)
        if self.new_token_embed is not None:
            n = self.num_new_tokens
            xn = jnp.take(self.new_token_embed[...], jnp.clip(tokens - V0, 0, n - 1), axis=0)
            x = jnp.where((tokens >= V0)[..., None], xn, x)
        return x.astype(self.config.compute_dtype)

    def project_vocab(self, h: jax.Array) -> jax.Array:
        """h [..., D] (compute dtype) -> fp32 logits [..., V] (fp32 accumulation)."""
        cd = self.config.compute_dtype
        if self.lm_head is None:
            parts = [self.embed.embedding[...]] + ([self.new_token_embed[...]] if self.new_token_embed is not None else [])
            # logits: [..., V_part] = h [..., D] . W [V_part, D]
            outs = [jnp.einsum("...d,vd->...v", h, W.astype(cd), preferred_element_type=jnp.float32) for W in parts]
        else:
            parts = [self.lm_head.kernel[...]] + ([self.new_token_head[...]] if self.new_token_head is not None else [])
            outs = [jnp.einsum("...d,dv->...v", h, W.astype(cd), preferred_element_type=jnp.float32) for W in parts]
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)

    # ---- full-sequence path ------------------------------------------------
    def _check_tokens(self, tokens, ndim: int, what: str):
        if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"{what}: tokens must be an int array of rank {ndim}, got {tokens.dtype}{tokens.shape}")

    def _forward(self, tokens, attention_mask, positions):
        """Shared trunk: -> (final hidden [B, T, D], per-layer q [B, T, N, H], k and v [B, K, T, H]).

        attention_mask: None (causal), bool [B, T, T] or [T, T], or a factored
        `prefill_mask` object (attention then runs block by block)."""
        self._check_tokens(tokens, 2, "Llama")
        B, T = tokens.shape
        chunk = None
        if hasattr(attention_mask, "block"):
            if tuple(attention_mask.shape) != (B, T, T):
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must be [B, T, T] = {(B, T, T)}")
            mask = attention_mask
            chunk = prefill_chunk(B, self.config.n_heads, T)
        elif attention_mask is None:
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
        else:
            if attention_mask.shape not in ((B, T, T), (T, T)):
                raise ValueError(f"attention_mask shape {attention_mask.shape} must be [B, T, T] = {(B, T, T)}")
            mask = jnp.broadcast_to(attention_mask.astype(bool), (B, T, T))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        else:
            if positions.shape not in ((B, T), (T,)):
                raise ValueError(f"positions shape {positions.shape} must be [B, T] = {(B, T)}")
            positions = jnp.broadcast_to(positions, (B, T))
        cos, sin = rope_cos_sin(positions, _inv_freq(self.config))  # [B, T, H]
        x = self.embed_tokens(tokens)
        qs, ks, vs = [], [], []
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
        if self.remat == "none":
            def run_layer(layer, *args):
                return layer(*args, chunk=chunk)
        else:
            policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[self.remat])

            def run_layer(layer, *args):
                # plain jax.checkpoint over the layer's state: the training step merges the model
                # inside jax.grad, where nnx.remat would try to write the Params back across traces
                graphdef, state = nnx.split(layer)
                return jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a, chunk=chunk),
                                      policy=policy)(state, *args)
        for layer in self.layers:
            x, q, k, v = run_layer(layer, x, cos, sin, mask)
            qs.append(q)
            ks.append(k)
            vs.append(v)
        return self.final_norm(x), qs, ks, vs

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None) -> jax.Array:
        """tokens int [B, T] -> fp32 logits [B, T, V].

        attention_mask: bool [B, T, T] (query, key), used as given -- it is not
        intersected with the causal mask, so a span mask or a block-diagonal
        packing mask must already be causal. Default: causal.
        positions: int [B, T] RoPE positions; default 0..T-1 (pass them when
        several sequences are packed into one row).
        """
        h, _, _, _ = self._forward(tokens, attention_mask, positions)
        return self.project_vocab(h)

    def attention_inputs(self, tokens: jax.Array, attention_mask: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array]:
        """Every layer's RoPE'd queries and keys of a full forward: (q [L, B, T, N, H], k [L, B, K, T, H]).

        What a distillation target needs (the dense model's own attention, `adore.teacher_top_k`)
        without a second copy of the layer loop; under jit the logits head is never computed.
        """
        _, qs, ks, _ = self._forward(tokens, attention_mask, None)
        return jnp.stack(qs), jnp.stack(ks)

    def prefill(self, tokens: jax.Array, cache: KVCache, attention_mask=None,
                lengths: jax.Array | None = None, logits_at: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Full forward over tokens [B, T] that also writes positions 0..T-1 into the cache.

        Returns (fp32 logits [B, T, V], cache with lengths = `lengths` (default T)).
        attention_mask: as in `__call__`, or a factored `prefill_mask` object, which
        prefills block by block without ever holding a [B, T, T] mask or scores.
        logits_at: int [B] positions; then only the logits there are computed, [B, V]
        (a prompt's last position is all decoding needs: [B, T, V] is 256 MB at T = 16k
        and a 4k vocabulary).
        Prompts are right-padded: K/V written at positions >= lengths[b] are
        garbage that decode_step overwrites before any query can see them.
        """
        self._check_tokens(tokens, 2, "Llama.prefill")
        B, T = tokens.shape
        cache.check(self.config, B)
        if T > cache.max_len:
            raise ValueError(f"Llama.prefill: prompt length T={T} exceeds cache max_len={cache.max_len}")
        if lengths is None:
            lengths = jnp.full((B,), T, jnp.int32)
        elif lengths.shape != (B,):
            raise ValueError(f"Llama.prefill: lengths shape {lengths.shape} must be (B,) = {(B,)}")
        h, _, ks, vs = self._forward(tokens, attention_mask, None)
        # new: [L, B, K, T, H] written at cache positions 0..T-1
        zero = (0, 0, 0, 0, 0)
        k = jax.lax.dynamic_update_slice(cache.k, jnp.stack(ks).astype(cache.k.dtype), zero)
        v = jax.lax.dynamic_update_slice(cache.v, jnp.stack(vs).astype(cache.v.dtype), zero)
        cache = cache.replace(k=k, v=v, lengths=lengths.astype(jnp.int32))
        if logits_at is not None:
            h = h[jnp.arange(B), logits_at]
        return self.project_vocab(h), cache

    # ---- one-token decode path ---------------------------------------------
    def decode_step(self, tokens: jax.Array, cache: KVCache,
                    attention_fn: AttentionFn | None = None) -> tuple[jax.Array, KVCache]:
        """Append one token per sequence: tokens int [B] -> (fp32 logits [B, V], cache).

        The token of sequence b sits at position cache.lengths[b]; its K/V are
        written there before attention, so the query sees itself. attention_fn
        gets q [B, N, H] (RoPE'd, not pre-scaled), the whole stacked cache
        k_all, v_all [L, B, K, S_max, H] (this layer's K/V already written) and
        the layer index (a python int); it reads layer layer_idx itself, so a
        kernel can read it in place instead of XLA copying a slice every step.
        Default = masked dense attention over positions <= lengths[b]. A
        sequence whose cache is full (lengths[b] == S_max) keeps its cache (its
        write is dropped); callers stop before that.
        Jit it with the cache donated: otherwise XLA must copy the whole cache
        to a fresh output buffer every step (measured 10x slower on CPU).
        """
        self._check_tokens(tokens, 1, "Llama.decode_step")
        B = tokens.shape[0]
        cache.check(self.config, B)
        pos = cache.lengths  # [B]
        if attention_fn is None:
            # visible: [B, S_max]
            visible = jnp.arange(cache.max_len)[None, :] <= pos[:, None]

            def attention_fn(q, k_all, v_all, layer_idx):
                return decode_attention(q, k_all[layer_idx], v_all[layer_idx], visible)

        # A full cache keeps its rows (the write goes to the last row, rewriting what is there):
        # an out-of-bounds scatter index instead makes XLA guard the write with a select over
        # the whole cache when B = 1 (the scatter becomes a dynamic-update-slice), and that
        # select copies the cache several times a step (docs/notes/generation.md, issue 15).
        in_range = pos < cache.max_len
        write_at = jnp.minimum(pos, cache.max_len - 1)
        cos, sin = rope_cos_sin(pos[:, None], _inv_freq(self.config))  # [B, 1, H]
        x = self.embed_tokens(tokens[:, None])  # [B, 1, D]
        ck, cv = cache.k, cache.v
        b_idx = jnp.arange(B)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.attn.qkv(layer.attn_norm(x), cos, sin)  # q [B, 1, N, H]; k, v [B, K, 1, H]
            # One scatter per layer at (i, b, :, pos[b], :): indexed dims go
            # first, so the update is [B, K, H]. Inside jit this is in place.
            ck = _write_row(ck, i, b_idx, write_at, in_range, k[:, :, 0])
            cv = _write_row(cv, i, b_idx, write_at, in_range, v[:, :, 0])
            if B == 1:
                # The written cache as one buffer: at B = 1 XLA turns the scatter into a
                # dynamic-update-slice and fuses a copy of it into each consumer (the kernel's
                # row view, the loop carry), each a copy of the whole cache, every layer and step
                # (3.8x the step time at 2k tokens; docs/notes/generation.md, issue 15).
                ck, cv = jax.lax.optimization_barrier((ck, cv))
            o = attention_fn(q[:, 0], ck, cv, i)  # [B, N, H]
            x = x + layer.attn.out(o[:, None].astype(x.dtype))
            x = x + layer.mlp(layer.mlp_norm(x))
        logits = self.project_vocab(self.final_norm(x))[:, 0]
        return logits, cache.replace(k=ck, v=cv, lengths=pos + 1)
