"""LoRA: identity at init, W + (alpha/r) A B against the float64 reference, merge, trainable filter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from numpy_llama import llama_forward, params_from_model
from selfspan_jax.lora import (ATTN_TARGETS, MLP_TARGETS, ScaledLoRALinear, apply_lora, is_lora,
                               lora_trainable_filter, merge_lora)
from selfspan_jax.model import NewTokenParam
from test_model import ATOL32, fwd, random_model, rng, small_config  # noqa: F401  (rng is a fixture)


def perturb_lora(model, rng):
    """Random non-zero A and B, so the adapters visibly change the output.

    A [in, r] ~ N(0, 1/in) and B [r, out] ~ N(0, 1/(16 r)) make (alpha/r) A B
    about half the size of a base kernel at alpha/r = 2: a real change that
    keeps activations, and so fp32 rounding, at the scale of the base model.
    """
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam):
            std = 1 / np.sqrt(var.shape[0]) if path[-1] == "lora_a" else 0.25 / np.sqrt(var.shape[0])
            var[...] = jnp.asarray(std * rng.standard_normal(var.shape), var[...].dtype)


def flat(state) -> dict[str, np.ndarray]:
    """'layers/0/attn/q_proj/kernel' -> value, for every Variable in an nnx State."""
    return {"/".join(map(str, path)): np.asarray(var[...]) for path, var in nnx.to_flat_state(state)}


def param_paths(model):
    return sorted(flat(nnx.state(model)))


@pytest.mark.parametrize("include_mlp,tie", [(False, False), (True, True)], ids=["attn_untied", "attn_mlp_tied"])
def test_lora_identity_then_reference_then_merge(rng, include_mlp, tie):
    cfg = small_config(tie_embeddings=tie)
    model = random_model(cfg, rng)
    plain_paths = param_paths(model)
    tokens = rng.integers(0, cfg.vocab_size, (2, 8))
    base = fwd(model, tokens)

    rank, alpha = 4, 8.0
    apply_lora(model, rank=rank, alpha=alpha, include_mlp=include_mlp, rngs=nnx.Rngs(int(rng.integers(2**31))))
    assert is_lora(model)
    wrapped = ATTN_TARGETS + (MLP_TARGETS if include_mlp else ())
    for blk in model.layers:
        for name in ATTN_TARGETS + MLP_TARGETS:
            mod = getattr(blk.attn if name in ATTN_TARGETS else blk.mlp, name)
            assert isinstance(mod, ScaledLoRALinear) == (name in wrapped)
            if name in wrapped:
                assert mod.lora_scale == alpha / rank
                assert mod.lora.lora_a.shape == (mod.in_features, rank)
                np.testing.assert_array_equal(np.asarray(mod.lora.lora_b[...]), 0)
    # B = 0 at init: the adapters add exactly zero.
    np.testing.assert_array_equal(fwd(model, tokens), base)

    perturb_lora(model, rng)
    lora_out = fwd(model, tokens)
    print(f"LoRA output change: max {np.abs(lora_out - base).max():.3f}")
    assert np.abs(lora_out - base).max() > 0.1, "perturbed adapters left the output unchanged"
    # params_from_model folds W + (alpha/r) A B in float64, independently of merge_lora.
    np.testing.assert_allclose(lora_out, llama_forward(params_from_model(model), cfg, tokens), atol=ATOL32, rtol=0)

    merge_lora(model)
    assert not is_lora(model)
    assert param_paths(model) == plain_paths
    assert all(type(getattr(blk.attn, n)) is nnx.Linear for blk in model.layers for n in ATTN_TARGETS)
    np.testing.assert_allclose(fwd(model, tokens), lora_out, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_trainable_filter_selects_exactly_adapters_and_new_rows(rng, tie):
    cfg = small_config(tie_embeddings=tie, n_layers=1)
    model = random_model(cfg, rng)
    model.add_tokens(3)
    apply_lora(model, rank=2, alpha=4.0, targets=("q_proj", "v_proj"), rngs=nnx.Rngs(0))
    names = sorted(flat(nnx.state(model, lora_trainable_filter)))
    want = sorted([f"layers/0/attn/{n}/lora/lora_{ab}" for n in ("q_proj", "v_proj") for ab in "ab"]
                  + ["new_token_embed"] + ([] if tie else ["new_token_head"]))
    assert names == want
    assert isinstance(model.new_token_embed, NewTokenParam)

    # One optimizer step: the selected leaves move, every other leaf is bit-identical.
    perturb_lora(model, rng)  # B = 0 would zero A's gradient and hide a bad filter
    before = flat(nnx.state(model))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=lora_trainable_filter)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 6)))
    tokens = tokens.at[:, 1].set(cfg.vocab_size + 1)  # a new token in the input
    targets = jnp.roll(tokens, -1, axis=1).at[:, 0].set(cfg.vocab_size + 2)  # and in the targets

    def loss_fn(m):
        logits = m(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @nnx.jit  # one compile of forward + backward beats eager per-op dispatch
    def train_step(model, opt):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, lora_trainable_filter))(model)
        opt.update(model, grads)

    train_step(model, opt)
    after = flat(nnx.state(model))
    assert after.keys() == before.keys()
    moved = {k for k in after if not np.array_equal(after[k], before[k])}
    assert moved == set(want)


def test_bfloat16_lora_keeps_dtypes(rng):
    cfg = small_config(dtype="bfloat16", param_dtype="bfloat16", n_layers=1)
    model = random_model(cfg, rng)
    apply_lora(model, rank=2, alpha=2.0, rngs=nnx.Rngs(0))
    perturb_lora(model, rng)
    q = model.layers[0].attn.q_proj
    assert q.kernel[...].dtype == jnp.bfloat16 and q.lora.lora_a[...].dtype == jnp.float32
    # The bf16 LoRA branch must not promote the activations to fp32.
    assert q(jnp.ones((1, cfg.d_model), jnp.bfloat16)).dtype == jnp.bfloat16
    tokens = rng.integers(0, cfg.vocab_size, (1, 5))
    out = fwd(model, tokens)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    merge_lora(model)
    assert model.layers[0].attn.q_proj.kernel[...].dtype == jnp.bfloat16
    merged = fwd(model, tokens)
    # The merge rounds W + dW to bf16 once; the unmerged path rounded x A B instead.
    assert np.sqrt(np.mean((merged - out) ** 2)) < 0.05 * out.std()


def test_bad_lora_arguments_raise(rng):
    model = random_model(small_config(n_layers=1), rng)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, rank=0, alpha=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, rank=10_000, alpha=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(model, rank=2, alpha=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="targets"):
        apply_lora(model, rank=2, alpha=1.0, targets=("lm_head",), rngs=nnx.Rngs(0))
    assert not is_lora(model)
    apply_lora(model, rank=2, alpha=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, rank=2, alpha=1.0, rngs=nnx.Rngs(0))
