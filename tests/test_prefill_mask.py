"""The factored prefill mask and blocked prefill attention (selfspan_jax/prefill_mask.py,
attention.blocked_attention): the same mask and the same logits as the [B, T, T] path they replace.

References: the training mask `spans.attention_mask` (itself checked against a
brute-force reading of the rule in test_spans.py), a float64 numpy attention,
and the full-mask `Llama.prefill`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfspan_jax import attention, decode_loop, spans
from selfspan_jax.attention import blocked_attention, prefill_chunk
from selfspan_jax.cache import KVCache
from selfspan_jax.config import LlamaConfig
from selfspan_jax.model import Llama
from selfspan_jax.policies import DensePolicy, Policy, SelfSpanPolicy
from selfspan_jax.prefill_mask import ArrayPrefillMask, causal_prefill_mask, span_prefill_mask

# ids: 0 pad, 1 BOS, 2 A, 3 R, 4 /R, 5..14 digits, 15 text
A, R, C, DIGIT0, TEXT = 2, 3, 4, 5, 15
SPAN_TOKENS = spans.SpanTokens.from_digit_ids(A, R, C, range(DIGIT0, DIGIT0 + 10), 16)
T = 40
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _span_stream(rng, n):
    """Token ids with real span structure: steps `A R refs /R text...` plus random noise tokens."""
    out = [1] + rng.integers(TEXT, TEXT + 1, size=3).tolist()
    seg = 0
    while len(out) < n:
        seg += 1
        refs = rng.choice(seg, size=min(seg, 2), replace=False) if seg > 1 else [0]
        head = [A, R]
        for i, r in enumerate(refs):
            head += ([TEXT] if i else []) + [DIGIT0 + int(d) for d in str(int(r))]
        out += head + [C] + rng.integers(0, 16, size=int(rng.integers(1, 6))).tolist()
    return np.asarray(out[:n], np.int32)


def _reference_prefill_mask(tokens, lengths, max_segments):
    """The [B, T, T] mask prefill used before blocks: training mask, padding rows see only themselves."""
    mask = np.asarray(spans.attention_mask(jnp.asarray(tokens), SPAN_TOKENS, max_segments,
                                           lengths=jnp.asarray(lengths)))
    pos = np.arange(tokens.shape[1])
    pad_rows = pos[None, :] >= np.asarray(lengths)[:, None]
    return mask | (pad_rows[:, :, None] & np.eye(tokens.shape[1], dtype=bool)[None])


@settings(SETTINGS, max_examples=12)  # ~1 s an example: every block of every chunk size, eagerly
@given(seed=st.integers(0, 2**31 - 1), chunk=st.sampled_from([8, 16, 24]), max_segments=st.sampled_from([3, 64]))
def test_span_blocks_tile_the_prefill_mask(seed, chunk, max_segments):
    rng = np.random.default_rng(seed)
    tokens = np.stack([_span_stream(rng, T) for _ in range(3)])
    lengths = rng.integers(1, T + 1, size=3).astype(np.int32)
    ref = _reference_prefill_mask(tokens, lengths, max_segments)
    mask = span_prefill_mask(jnp.asarray(tokens), jnp.asarray(lengths), SPAN_TOKENS, max_segments)
    np.testing.assert_array_equal(np.asarray(mask.full()), ref)
    # blocks reach past T (the attention pads to a multiple of the chunk): padding there sees only itself
    Tp = -(-T // chunk) * chunk
    padded = np.zeros((3, Tp, Tp), bool)
    padded[:, :T, :T] = ref
    padded[:, np.arange(T, Tp), np.arange(T, Tp)] = True
    for qs in range(0, Tp, chunk):
        for ks in range(0, Tp, chunk):
            got = np.asarray(mask.block(jnp.int32(qs), jnp.int32(ks), chunk, chunk))
            np.testing.assert_array_equal(got, padded[:, qs:qs + chunk, ks:ks + chunk], err_msg=f"block ({qs}, {ks})")
            arr = np.asarray(ArrayPrefillMask(jnp.asarray(ref)).block(jnp.int32(qs), jnp.int32(ks), chunk, chunk))
            np.testing.assert_array_equal(arr, padded[:, qs:qs + chunk, ks:ks + chunk])


def test_causal_prefill_mask_is_causal_with_isolated_padding():
    lengths = np.array([5, 9, 1], np.int32)
    got = np.asarray(causal_prefill_mask(9, jnp.asarray(lengths)).full())
    pos = np.arange(9)
    for b, n in enumerate(lengths):
        want = (pos[:, None] >= pos[None, :]) & (pos[:, None] < n) & (pos[None, :] < n)
        want |= (pos[:, None] >= n) & np.eye(9, dtype=bool)
        np.testing.assert_array_equal(got[b], want)


def _attention_f64(q, k, v, mask):
    """float64 numpy reference; rows with nothing visible are 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, Tq, N, H = q.shape
    G = N // k.shape[1]
    kk, vv = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)  # [B, N, S, H]
    s = np.einsum("btnh,bnsh->bnts", q, kk) / np.sqrt(H)
    s = np.where(mask[:, None], s, -np.inf)
    m = np.max(s, axis=-1, keepdims=True)
    p = np.where(mask[:, None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0.0)
    den = p.sum(-1, keepdims=True)
    out = np.einsum("bnts,bnsh->btnh", p / np.where(den > 0, den, 1), vv)
    return out


@pytest.mark.parametrize("length,chunk", [(37, 8), (32, 16), (20, 32)])
def test_blocked_attention_matches_float64(length, chunk):
    rng = np.random.default_rng(length * 100 + chunk)
    B, N, K, H = 2, 4, 2, 8
    q = rng.standard_normal((B, length, N, H)).astype(np.float32)
    k = rng.standard_normal((B, K, length, H)).astype(np.float32)
    v = rng.standard_normal((B, K, length, H)).astype(np.float32)
    mask = rng.random((B, length, length)) < 0.4
    mask &= np.tril(np.ones((length, length), bool))[None]  # the blocked path skips key chunks after the query's
    mask[0, 3] = False  # a row with nothing visible
    got = blocked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), ArrayPrefillMask(jnp.asarray(mask)), chunk)
    np.testing.assert_allclose(np.asarray(got), _attention_f64(q, k, v, mask), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(got)[0, 3] == 0)


def test_prefill_chunk_fits_the_budget():
    for B, N, Tq in [(1, 4, 16384), (8, 32, 2048), (32, 32, 4096), (1, 4, 20)]:
        c = prefill_chunk(B, N, Tq)
        assert c >= 16 and (c & (c - 1)) == 0
        assert c == 16 or B * N * c * c * 4 <= attention.PREFILL_BLOCK_BYTES
        assert c < 2 * Tq  # never a chunk of mostly padding


@pytest.mark.parametrize("policy_name", ["self_span", "dense"])
def test_blocked_prefill_gives_the_full_mask_logits_and_cache(monkeypatch, policy_name):
    """decode_loop.prefill (factored mask, blocks of 16, last-position logits only) against
    Llama.prefill with the whole [B, T, T] mask: same logits at the last positions, same cache."""
    monkeypatch.setattr(attention, "PREFILL_BLOCK_BYTES", 1)  # chunk 16: several query and key blocks
    cfg = LlamaConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=128)
    model = Llama(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(5)
    Tp, S = 64, 80
    tokens = jnp.asarray(np.stack([_span_stream(rng, Tp) for _ in range(3)]))
    lengths = jnp.asarray([64, 41, 17], jnp.int32)
    policy = SelfSpanPolicy(SPAN_TOKENS, 8) if policy_name == "self_span" else DensePolicy()
    assert prefill_chunk(3, 4, Tp) == 16
    cache, last, _ = jax.jit(lambda t, n: decode_loop.prefill(model, policy, t, n, cache_len=S, block_size=16,
                                                              prefill_chunk=3))(tokens, lengths)
    full = policy.prefill_mask(tokens, lengths)
    logits, ref_cache = model.prefill(tokens, KVCache.init(cfg, 3, S), attention_mask=full, lengths=lengths)
    np.testing.assert_allclose(np.asarray(last), np.asarray(logits)[np.arange(3), np.asarray(lengths) - 1],
                               rtol=1e-5, atol=1e-5)
    for got, want in [(cache.k, ref_cache.k), (cache.v, ref_cache.v)]:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # sub-batches of one sequence: the same again
    _, last1, _ = decode_loop.prefill(model, policy, tokens, lengths, cache_len=S, block_size=16, prefill_chunk=1)
    np.testing.assert_allclose(np.asarray(last1), np.asarray(last), rtol=1e-5, atol=1e-5)


def test_a_policy_must_define_a_prefill_mask():
    class NoMask(Policy):
        def init_state(self, tokens, lengths, max_len):
            return ()

        def update(self, state, tokens, active):
            return state

        def select(self, state, lengths, **kw):
            raise AssertionError

    with pytest.raises(NotImplementedError, match="prefill_rows or prefill_mask"):
        NoMask().prefill_rows(jnp.zeros((1, 4), jnp.int32), jnp.ones((1,), jnp.int32))
