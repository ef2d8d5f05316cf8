"""Llama forward / prefill / decode against the float64 NumPy reference (tests/numpy_llama.py).

Every test draws fresh random weights and inputs; the seed is printed so a
failure can be replayed (pytest shows captured stdout on failure).
"""

from __future__ import annotations

import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from numpy_llama import inv_freq as np_inv_freq, llama_forward, params_from_model
from selfspan_jax.attention import decode_attention, masked_attention
from selfspan_jax.cache import KVCache
from selfspan_jax.config import LlamaConfig, RopeScaling
from selfspan_jax.layers import rope_inv_freq
from selfspan_jax.model import Llama

# fp32 JAX vs float64 NumPy on logits of size ~1: XLA's fp32 reductions over
# D=48 leave ~1e-6 relative error; 2e-5 absolute has margin yet catches any
# real bug (a wrong RoPE pair or GQA grouping is an O(1) difference).
ATOL32 = 2e-5

SCALING = RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)


def small_config(**kw) -> LlamaConfig:
    # GQA with G = 3 and head dim 16 so that, with original length 32, RoPE
    # scaling has frequencies in all three bands (kept, blended, divided).
    base = dict(vocab_size=61, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim_override=16,
                mlp_dim=80, rope_theta=10_000.0, norm_eps=1e-5)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture
def rng():
    seed = secrets.randbits(32)
    print(f"seed={seed}")
    return np.random.default_rng(seed)


def random_model(config: LlamaConfig, rng: np.random.Generator) -> Llama:
    """Llama with random weights, including non-trivial norm scales (init would be all ones)."""
    model = Llama(config, rngs=nnx.Rngs(int(rng.integers(2**31))))
    scales = [model.final_norm] + [n for b in model.layers for n in (b.attn_norm, b.mlp_norm)]
    for norm in scales:
        norm.scale[...] = jnp.asarray(1 + 0.3 * rng.standard_normal(config.d_model), config.weight_dtype)
    return model


@jax.jit
def _forward_jit(graphdef, state, tokens, mask, positions):
    return nnx.merge(graphdef, state)(tokens, attention_mask=mask, positions=positions)


def fwd(model, tokens, mask=None, positions=None) -> np.ndarray:
    """Jitted model(tokens, ...) as float NumPy: one compile per shape beats
    eager op-by-op dispatch several-fold on a 2-core CI box."""
    graphdef, state = nnx.split(model)
    opt = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
    return np.asarray(_forward_jit(graphdef, state, jnp.asarray(tokens), opt(mask), opt(positions)))


def causal(T):
    return np.tril(np.ones((T, T), bool))


@pytest.mark.parametrize("tie,scaling", [(False, None), (True, None), (False, SCALING)],
                         ids=["untied", "tied", "llama3_rope"])
def test_forward_matches_numpy(rng, tie, scaling):
    cfg = small_config(tie_embeddings=tie, rope_scaling=scaling)
    model = random_model(cfg, rng)
    B, T = 2, int(rng.integers(5, 12))
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    # Positions far from 0 exercise the scaled low frequencies and the
    # explicit-positions path.
    positions = np.arange(T)[None] + rng.integers(0, 200, (B, 1))
    got = fwd(model, tokens, positions=positions)
    want = llama_forward(params_from_model(model), cfg, tokens, positions=positions)
    assert got.dtype == np.float32 and got.shape == (B, T, cfg.vocab_size)
    np.testing.assert_allclose(got, want, atol=ATOL32, rtol=0)


def test_rope_frequencies_match_numpy_and_hit_every_band():
    cfg = small_config(rope_scaling=SCALING)
    got = rope_inv_freq(cfg).astype(np.float64)
    want = np_inv_freq(cfg)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain = np_inv_freq(small_config())
    ratio = want / plain
    assert np.isclose(ratio, 1).any(), "no high-frequency band kept"
    assert np.isclose(ratio, 1 / SCALING.factor).any(), "no low-frequency band divided"
    assert ((ratio > 1 / SCALING.factor + 1e-6) & (ratio < 1 - 1e-6)).any(), "no blended band"


def test_explicit_causal_mask_equals_default(rng):
    cfg = small_config()
    model = random_model(cfg, rng)
    B, T = 3, 9
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)))
    mask = jnp.broadcast_to(jnp.asarray(causal(T)), (B, T, T))
    np.testing.assert_array_equal(fwd(model, tokens, mask), fwd(model, tokens))


def test_random_mask_with_empty_row_matches_numpy(rng):
    """A span-style mask (causal subset) where one query sees nothing: that row's attention output is zero."""
    cfg = small_config()
    model = random_model(cfg, rng)
    B, T = 2, 8
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    mask = causal(T)[None] & (rng.random((B, T, T)) < 0.6)
    mask[0, int(rng.integers(T))] = False
    got = fwd(model, tokens, mask)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, llama_forward(params_from_model(model), cfg, tokens, mask=mask),
                               atol=ATOL32, rtol=0)


def test_block_diagonal_mask_equals_separate_sequences(rng):
    cfg = small_config(tie_embeddings=True)
    model = random_model(cfg, rng)
    lens = [int(x) for x in rng.integers(2, 7, 3)]
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in lens]
    T = sum(lens)
    mask = np.zeros((T, T), bool)
    positions = np.zeros(T, np.int32)
    start = 0
    for n in lens:
        mask[start:start + n, start:start + n] = causal(n)
        positions[start:start + n] = np.arange(n)
        start += n
    packed = fwd(model, np.concatenate(seqs)[None], mask[None], positions[None])[0]
    # The separate runs share one right-padded batch: causal attention keeps
    # the padding after each sequence from reaching it.
    batch = np.zeros((len(seqs), max(lens)), np.int64)
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = s
    alone = fwd(model, batch)
    start = 0
    for i, n in enumerate(lens):
        np.testing.assert_allclose(packed[start:start + n], alone[i, :n], atol=1e-5, rtol=0)
        start += n


@jax.jit
def _prefill(graphdef, state, tokens, cache, lengths):
    return nnx.merge(graphdef, state).prefill(tokens, cache, lengths=lengths)


@jax.jit
def _decode(graphdef, state, tokens, cache):
    return nnx.merge(graphdef, state).decode_step(tokens, cache)


def _prefill_decode_vs_forward(cfg, rng, atol):
    model = random_model(cfg, rng)
    graphdef, state = nnx.split(model)
    B, n_steps, S_max = 3, 4, 16
    lengths = rng.integers(1, 7, B)
    lengths[rng.integers(B)] = 1  # a one-token prompt (just BOS) is the smallest real case
    Tp = int(lengths.max())
    full = rng.integers(0, cfg.vocab_size, (B, Tp + n_steps))
    # Right-padded prompts: garbage after each length, which must never leak.
    prompts = np.where(np.arange(Tp)[None] < lengths[:, None], full[:, :Tp], rng.integers(0, cfg.vocab_size, (B, Tp)))
    want = fwd(model, full)  # causal: logits[t] depend on tokens <= t only
    cache = KVCache.init(cfg, B, S_max)
    logits, cache = _prefill(graphdef, state, jnp.asarray(prompts), cache, jnp.asarray(lengths, jnp.int32))
    for b in range(B):
        np.testing.assert_allclose(np.asarray(logits)[b, :lengths[b]], want[b, :lengths[b]], atol=atol, rtol=0)
    for j in range(n_steps):
        tok = full[np.arange(B), lengths + j]
        step_logits, cache = _decode(graphdef, state, jnp.asarray(tok), cache)
        assert step_logits.shape == (B, cfg.vocab_size) and step_logits.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(step_logits), want[np.arange(B), lengths + j], atol=atol, rtol=0)
        np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + j + 1)
    return model


def test_prefill_then_decode_equals_full_forward(rng):
    _prefill_decode_vs_forward(small_config(rope_scaling=SCALING), rng, atol=1e-5)


def test_decode_attention_fn_contract(rng):
    """A custom attention_fn over a random visible set equals the NumPy model with that mask row.

    Proves what the span policy / Pallas kernel relies on: q is RoPE'd and
    unscaled, k/v are the whole stacked cache [L, B, K, S_max, H] including
    this layer's new token, and layer_idx counts layers.
    """
    cfg = small_config()
    model = random_model(cfg, rng)
    B, S_max = 2, 12
    lengths = np.array([3, 6])
    seqs = rng.integers(0, cfg.vocab_size, (B, 7))
    cache = KVCache.init(cfg, B, S_max)
    graphdef, state = nnx.split(model)
    _, cache = _prefill(graphdef, state, jnp.asarray(seqs[:, :6]), cache, jnp.asarray(lengths, jnp.int32))
    visible = (np.arange(S_max)[None] <= lengths[:, None]) & (rng.random((B, S_max)) < 0.5)
    visible[np.arange(B), lengths] = True
    seen = []

    def attention_fn(q, k_all, v_all, layer_idx):
        assert q.shape == (B, cfg.n_heads, cfg.head_dim)
        # the whole stacked cache, so a kernel can read one layer in place
        assert k_all.shape == v_all.shape == (cfg.n_layers, B, cfg.n_kv_heads, S_max, cfg.head_dim)
        seen.append(layer_idx)
        return decode_attention(q, k_all[layer_idx], v_all[layer_idx], jnp.asarray(visible))

    tok = seqs[np.arange(B), lengths]
    # Traced once, so `seen` records each layer index exactly once.
    step = jax.jit(lambda state, tok, cache: nnx.merge(graphdef, state).decode_step(tok, cache, attention_fn))
    logits, _ = step(state, jnp.asarray(tok), cache)
    assert seen == list(range(cfg.n_layers))
    params = params_from_model(model)
    for b in range(B):
        n = lengths[b] + 1
        mask = causal(n)
        mask[-1] = visible[b, :n]
        want = llama_forward(params, cfg, seqs[b:b + 1, :n], mask=mask[None])[0, -1]
        np.testing.assert_allclose(np.asarray(logits[b]), want, atol=ATOL32, rtol=0)


def test_bfloat16_close_to_float32(rng):
    cfg32 = small_config(tie_embeddings=False)
    cfg16 = cfg32.replace(dtype="bfloat16", param_dtype="bfloat16")
    m32 = random_model(cfg32, rng)
    m16 = Llama(cfg16, rngs=nnx.Rngs(0))
    nnx.update(m16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(m32)))
    assert m16.layers[0].attn.q_proj.kernel[...].dtype == jnp.bfloat16
    tokens = jnp.asarray(rng.integers(0, cfg32.vocab_size, (2, 10)))
    l32, l16 = fwd(m32, tokens), fwd(m16, tokens)
    assert l16.dtype == np.float32
    # bf16 keeps 8 mantissa bits: ~0.4% per rounding, a few dozen roundings
    # deep; 5% of the logit spread is loose yet far below an O(1) bug.
    rms_err = np.sqrt(np.mean((l16 - l32) ** 2)) / l32.std()
    max_err = np.abs(l16 - l32).max() / l32.std()
    print(f"bf16 vs fp32 logits: rms err / std = {rms_err:.4f}, max err / std = {max_err:.4f}")
    assert rms_err < 0.03 and max_err < 0.15
    # The cached path runs in bf16 too (cache in the compute dtype).
    cache = KVCache.init(cfg16, 2, 12)
    assert cache.k.dtype == jnp.bfloat16
    graphdef, state = nnx.split(m16)
    _, cache = _prefill(graphdef, state, tokens[:, :9], cache, jnp.full((2,), 9, jnp.int32))
    dl, cache = _decode(graphdef, state, tokens[:, 9], cache)
    np.testing.assert_allclose(np.asarray(dl), l16[:, 9], atol=0.15 * l32.std(), rtol=0)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_add_tokens(rng, tie):
    cfg = small_config(tie_embeddings=tie)
    model = random_model(cfg, rng)
    V0 = cfg.vocab_size
    tokens = rng.integers(0, V0, (2, 7))
    before = fwd(model, tokens)
    E0 = np.asarray(model.embedding_matrix(), np.float64)
    W0 = np.asarray(model.head_matrix(), np.float64)
    model.add_tokens(3)
    model.add_tokens(2)  # a second growth averages over the first new rows too
    assert model.config.vocab_size == V0 + 5
    E = np.asarray(model.embedding_matrix(), np.float64)
    assert E.shape == (V0 + 5, cfg.d_model)
    np.testing.assert_array_equal(E[:V0], E0)
    np.testing.assert_allclose(E[V0:V0 + 3], np.broadcast_to(E0.mean(0), (3, cfg.d_model)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(E[V0 + 3:], np.broadcast_to(E[:V0 + 3].mean(0), (2, cfg.d_model)),
                               rtol=1e-6, atol=1e-7)
    if not tie:
        W = np.asarray(model.head_matrix(), np.float64)
        np.testing.assert_allclose(W[:, V0:V0 + 3], np.broadcast_to(W0.mean(1, keepdims=True), (cfg.d_model, 3)),
                                   rtol=1e-6, atol=1e-7)
    after = fwd(model, tokens)
    assert after.shape == (2, 7, V0 + 5)
    np.testing.assert_allclose(after[..., :V0], before, atol=1e-6, rtol=0)
    # New ids in the input go through the appended rows.
    tokens[:, ::2] = rng.integers(V0, V0 + 5, tokens[:, ::2].shape)
    np.testing.assert_allclose(fwd(model, tokens),
                               llama_forward(params_from_model(model), model.config, tokens), atol=ATOL32, rtol=0)


_masked_attention_jit = jax.jit(masked_attention)


# Each example is a new shape, hence a compile: few examples, small shapes.
@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 5), S=st.integers(1, 9), K=st.sampled_from([1, 2]),
       G=st.sampled_from([1, 3]), H=st.sampled_from([2, 8]), seed=st.integers(0, 2**31 - 1))
def test_masked_attention_brute_force(B, T, S, K, G, H, seed):
    r = np.random.default_rng(seed)
    N = K * G
    q, k, v = r.standard_normal((B, T, N, H)), r.standard_normal((B, K, S, H)), r.standard_normal((B, K, S, H))
    mask = r.random((B, T, S)) < 0.5
    got = np.asarray(_masked_attention_jit(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), jnp.asarray(mask)))
    want = np.zeros((B, T, N, H))
    for b, t, n in np.ndindex(B, T, N):
        vis = mask[b, t]
        if vis.any():
            s = k[b, n // G, vis] @ q[b, t, n] / np.sqrt(H)
            p = np.exp(s - s.max())
            want[b, t, n] = (p / p.sum()) @ v[b, n // G, vis]
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_empty_decode_row_is_zero_not_nan(rng):
    for dtype in (jnp.float32, jnp.bfloat16):
        q = jnp.asarray(rng.standard_normal((2, 4, 8)), dtype)
        k = jnp.asarray(rng.standard_normal((2, 2, 5, 8)), dtype)
        visible = jnp.asarray([[False] * 5, [True, False, True, False, False]])
        out = np.asarray(decode_attention(q, k, k, visible).astype(jnp.float32))
        np.testing.assert_array_equal(out[0], 0.0)
        assert np.isfinite(out).all() and np.abs(out[1]).sum() > 0


@pytest.mark.parametrize("kw,field", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_heads=6, n_kv_heads=4), "n_heads"),
    (dict(dtype="int8"), "dtype"),
    (dict(param_dtype="float64"), "param_dtype"),
    (dict(mlp_dim=-3), "mlp_dim"),
])
def test_config_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=field):
        small_config(**kw)


def test_bad_inputs_raise_value_error(rng):
    cfg = small_config()
    model = random_model(cfg, rng)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 5)))
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_inv_freq(small_config(rope_scaling=RopeScaling(low_freq_factor=4.0, high_freq_factor=4.0)))
    with pytest.raises(ValueError, match="batch"):
        KVCache.init(cfg, 0, 8)
    with pytest.raises(ValueError, match="max_len"):
        KVCache.init(cfg, 2, 0)
    with pytest.raises(ValueError, match="n_new"):
        model.add_tokens(0)
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens, attention_mask=jnp.ones((2, 5, 4), bool))
    with pytest.raises(ValueError, match="positions"):
        model(tokens, positions=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="tokens"):
        model(tokens[0])
    with pytest.raises(ValueError, match="max_len"):
        model.prefill(tokens, KVCache.init(cfg, 2, 4))
    with pytest.raises(ValueError, match="KVCache"):
        model.prefill(tokens, KVCache.init(cfg, 3, 8))
    with pytest.raises(ValueError, match="lengths"):
        model.prefill(tokens, KVCache.init(cfg, 2, 8), lengths=jnp.ones((3,), jnp.int32))


@pytest.mark.parametrize("remat", ["layer", "dots"])
def test_remat_recomputes_layers_without_changing_gradients(remat):
    """`Llama.remat` (TrainConfig.remat) wraps each layer in jax.checkpoint: the jaxpr gains one
    checkpoint per layer, the gradients stay those of the plain model."""
    from selfspan_jax.model import Llama as Model

    config = LlamaConfig.preset("tiny", vocab_size=48, n_layers=3)
    model = Model(config, rngs=nnx.Rngs(int(np.random.default_rng().integers(1 << 30))))
    tokens = jnp.asarray(np.random.default_rng().integers(0, 48, (2, 12)))

    def loss(m):
        return jnp.mean(jax.nn.log_softmax(m(tokens))[..., 0])

    plain = nnx.grad(loss)(model)
    model.remat = remat
    again = nnx.grad(loss)(model)
    # as the training step does it: the model merged from its state inside a plain jax.grad
    graphdef, state = nnx.split(model)
    functional = jax.jit(jax.grad(lambda s: loss(nnx.merge(graphdef, s))))(state)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(functional)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * float(jnp.abs(a).max()))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(again)):
        # fp32: the recomputed forward rounds differently; compare at the gradient's own scale
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * float(jnp.abs(a).max()))
    jaxpr = str(jax.make_jaxpr(lambda s: loss(nnx.merge(graphdef, s)))(state))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") >= config.n_layers
    model.remat = "everything"
    with pytest.raises(ValueError, match="remat"):
        model(tokens)
