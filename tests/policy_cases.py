"""Shared cases of the decode-policy tests (Quest, SparQ): a small GQA model and random id prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfspan_jax.cache import KVCache
from selfspan_jax.config import LlamaConfig
from selfspan_jax.decode_loop import shape_buckets
from selfspan_jax.generation import KernelOptions, Outputs, generate
from selfspan_jax.model import Llama
from selfspan_jax.policies import causal_mask

VOCAB = 40


def small_gqa_model(seed: int) -> Llama:
    """2 layers, 4 query heads over 2 KV heads (G = 2), head dim 8."""
    cfg = LlamaConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=256)
    return Llama(cfg, rngs=nnx.Rngs(seed))


def random_prompts(seed: int, batch: int = 3) -> list[list[int]]:
    """`batch` prompts of 40-59 random ids (one prompt bucket, 5-8 blocks of 8)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=n).tolist() for n in rng.integers(40, 60, size=batch)]


def assert_policy_equals_dense(model, policy, seed: int, atol: float):
    """A policy whose budget covers the whole context decodes exactly as dense (same tokens, log-probs)."""
    prompts = random_prompts(seed)
    kw = dict(max_new_tokens=10, block_size=8, kernel=KernelOptions(backend="xla"), outputs=Outputs(logprobs=True),
              eos_id=-1, pad_id=0)
    dense = generate(model, prompts, policy="dense", **kw)
    other = generate(model, prompts, policy=policy, **kw)
    np.testing.assert_array_equal(other.tokens, dense.tokens)
    np.testing.assert_allclose(other.logprobs, dense.logprobs, atol=atol)
    return other


def eager_prefill(model, prompts, max_new: int, block_size: int, forced):
    """What the loop's prefill does, eagerly: (cache of the loop's length, lengths, S, reference
    log-probs [B, max_new] with column 0 filled from the prefill logits)."""
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    T, _, S = shape_buckets(lengths.max(), max_new, block_size)
    prompt = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        prompt[b, : len(p)] = p
    logits, cache = model.prefill(jnp.asarray(prompt), KVCache.init(model.config, B, S),
                                  attention_mask=causal_mask(T, jnp.asarray(lengths)), lengths=jnp.asarray(lengths))
    ref = np.zeros((B, max_new))
    ref[:, 0] = jax.nn.log_softmax(np.asarray(logits)[np.arange(B), lengths - 1])[np.arange(B), forced[:, 0]]
    return cache, lengths, S, ref


def eager_decode(model, policy, cache, forced, ref, block_size: int, S: int, attend):
    """Fill ref[:, 1:] with the log-probs of the forced tokens decoded eagerly, the policy's state
    rebuilt from the whole cache at every step (`observe_prefill` over every position written so far):
    a reference that keeps nothing incrementally. attend(q, k [B,K,S,H], v, selection, pos) -> [B,N,H]
    is the test's own attention over what the selection names."""
    B, M = forced.shape
    for m in range(1, M):
        pos = np.asarray(cache.lengths)
        state = policy.observe_prefill((), cache, jnp.asarray(pos), block_size=block_size)

        def attention_fn(q, k_all, v_all, layer, state=state, pos=pos):
            sel = policy.select(state, jnp.asarray(pos), block_size=block_size, cache_len=S, q=q, k=k_all[layer],
                                layer_idx=layer)
            return attend(q, k_all[layer], v_all[layer], sel, pos)

        step_logits, cache = model.decode_step(jnp.asarray(forced[:, m - 1]), cache, attention_fn=attention_fn)
        ref[:, m] = jax.nn.log_softmax(step_logits)[np.arange(B), forced[:, m]]
    return ref


def recall64(q, k, allowed, pos) -> np.ndarray:
    """float64 [B]: the share of dense softmax attention (q [B, N, H] against every key k [B, K, S, H]
    at or before pos[b], 1/sqrt(H)) that falls where allowed [B, K, S], mean over query heads."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, N, H = q.shape
    K = k.shape[1]
    out = np.zeros(B)
    for b in range(B):
        for n in range(N):
            h = n // (N // K)
            s = k[b, h, : pos[b] + 1] @ q[b, n] / np.sqrt(H)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[b] += p[np.asarray(allowed[b, h, : pos[b] + 1], bool)].sum() / N
    return out
