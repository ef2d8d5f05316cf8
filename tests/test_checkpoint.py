"""Checkpointer (orbax) round trips and failure modes; HF / LoRA export.

Export is checked against the float64 NumPy LLaMA (tests/numpy_llama.py):
the exported safetensors, read back as an HF state dict, must give the same
logits as the (LoRA-wrapped) JAX model — so a wrong transpose, a dropped
LoRA scale or a lost span-token row fails.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from numpy_llama import llama_forward, params_from_hf, params_from_model
from selfspan_jax import checkpoint as ck
from selfspan_jax import hf_interop
from selfspan_jax.config import LlamaConfig
from selfspan_jax.lora import apply_lora
from selfspan_jax.model import Llama

CFG = LlamaConfig(vocab_size=37, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=48, max_seq_len=64)


def _seed() -> int:
    seed = secrets.randbelow(2**31)
    print(f"seed={seed}")
    return seed


_TEMPLATE = {}


def _train_state(seed: int):
    """A stand-in training state shaped like the trainer's: nnx params and an
    optax AdamW state, every array filled with fresh random numbers.

    The structure is built once (eager init compiles every op); the values
    come from NumPy so each call is cheap.
    """
    if not _TEMPLATE:
        params = nnx.state(Llama(CFG, rngs=nnx.Rngs(0)), nnx.Param)
        _TEMPLATE["state"] = {"params": params, "opt_state": optax.adamw(1e-2).init(params),
                              "step": jnp.int32(0)}
    rng = np.random.default_rng(seed)

    def fill(x):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.floating):
            return jnp.asarray(rng.normal(size=x.shape).astype(x.dtype))
        return jnp.asarray(rng.integers(0, 1000, x.shape).astype(x.dtype))

    return jax.tree.map(fill, _TEMPLATE["state"])


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_roundtrip_bitwise_and_keep_last(tmp_path):
    seed = _seed()
    states = {s: _train_state(seed + s) for s in (2, 4, 6)}
    with ck.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as mgr:
        for s, state in states.items():
            mgr.save(s, state, {"epoch": s // 4, "index": s * 3, "seed": seed})
        mgr.wait()
        assert mgr.all_steps() == [4, 6]
        assert mgr.latest_step() == 6
    # A fresh manager (a new process in real life) restores into an abstract
    # target built by nnx.eval_shape, never touching the initialiser's values.
    abstract_model = nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0)))
    target_params = nnx.state(abstract_model, nnx.Param)
    target = {
        "params": ck.abstract_tree(target_params),
        "opt_state": ck.abstract_tree(jax.eval_shape(optax.adamw(1e-2).init, target_params)),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    with ck.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as mgr:
        for s in (4, 6):
            state, data = mgr.restore(target, step=s)
            _assert_trees_equal(state, states[s])
            assert data == {"epoch": s // 4, "index": s * 3, "seed": seed}
        state, _ = mgr.restore(target)  # latest
        assert int(state["step"]) == int(states[6]["step"])


def test_leftover_temp_dir_from_killed_save_is_ignored(tmp_path):
    seed = _seed()
    state = _train_state(seed)
    with ck.Checkpointer(tmp_path / "ckpt") as mgr:
        mgr.save(3, state, {"epoch": 0, "index": 1, "seed": seed})
    # What a SIGKILL in the middle of an async save of step 5 leaves behind.
    tmp = tmp_path / "ckpt" / "5.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_bytes(b"\x00" * 10)
    with ck.Checkpointer(tmp_path / "ckpt") as mgr:
        assert mgr.latest_step() == 3
        restored, data = mgr.restore(ck.abstract_tree(state))
        _assert_trees_equal(restored, state)
        assert data["index"] == 1


def _corrupt_arrays(step_dir: Path) -> int:
    n = 0
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # ocdbt data files hold the array bytes
            f.write_bytes(b"not an ocdbt file" * 7)
            n += 1
    return n


@pytest.mark.parametrize("damage", ["array_bytes", "metadata", "data_record"])
def test_corrupt_checkpoint_raises_clear_error(tmp_path, damage):
    seed = _seed()
    state = _train_state(seed)
    with ck.Checkpointer(tmp_path / "ckpt") as mgr:
        mgr.save(7, state, {"epoch": 0, "index": 0, "seed": seed})
    step_dir = tmp_path / "ckpt" / "7"
    if damage == "array_bytes":
        assert _corrupt_arrays(step_dir) > 0
    elif damage == "metadata":
        (step_dir / "state" / "_METADATA").write_text("{ truncated")
    else:
        (step_dir / "data" / "metadata").write_text("[1, 2")
    with ck.Checkpointer(tmp_path / "ckpt") as mgr:
        with pytest.raises(ck.CheckpointError, match=r"ckpt/7.*(corrupt|does not match)") as info:
            mgr.restore(ck.abstract_tree(state))
    # one readable line: the path and what failed, not tensorstore's JSON spec dump (issue 14, item 8)
    message = str(info.value)
    assert "\n" not in message and len(message) < 700, message


def test_shape_mismatch_raises(tmp_path):
    seed = _seed()
    state = _train_state(seed)
    with ck.Checkpointer(tmp_path / "ckpt") as mgr:
        mgr.save(1, state, {"epoch": 0, "index": 0, "seed": seed})
        bigger = nnx.eval_shape(lambda: Llama(CFG.replace(d_model=48), rngs=nnx.Rngs(0)))
        target = dict(ck.abstract_tree(state), params=ck.abstract_tree(nnx.state(bigger, nnx.Param)))
        with pytest.raises(ck.CheckpointError, match="does not match"):
            mgr.restore(target)
        with pytest.raises(ck.CheckpointError, match="no checkpoint for step 9"):
            mgr.restore(ck.abstract_tree(state), step=9)
        with pytest.raises(ValueError, match="non-negative"):
            mgr.save(-1, state, {})


_LORA_TEMPLATES = {}


def _lora_template(untied: bool, rank: int = 4):
    key = (untied, rank)
    if key not in _LORA_TEMPLATES:
        model = Llama(CFG.replace(tie_embeddings=not untied), rngs=nnx.Rngs(0))
        model.add_tokens(2)
        apply_lora(model, rank=rank, alpha=8.0, include_mlp=True, rngs=nnx.Rngs(1))
        _LORA_TEMPLATES[key] = model
    return nnx.clone(_LORA_TEMPLATES[key])  # a deep copy: merge(split(m)) would share Variables


def _lora_model(seed: int, untied: bool):
    """A LoRA-wrapped model (two span-token rows added) with every weight,
    adapters included, drawn fresh from `seed`."""
    model = _lora_template(untied)
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.LoRAParam, nnx.Param))):
        var[...] = jnp.asarray(rng.normal(0, 0.3, var[...].shape), jnp.float32)
    return model


@pytest.mark.parametrize("untied", [False, True])
def test_merged_export_matches_numpy_reference(tmp_path, untied):
    seed = _seed()
    model = _lora_model(seed, untied)
    out = hf_interop.export_merged_safetensors(model, tmp_path / "export")
    sd = load_file(str(out / "model.safetensors"))
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["vocab_size"] == CFG.vocab_size + 2 == sd["model.embed_tokens.weight"].shape[0]
    assert hf_cfg["tie_word_embeddings"] == (not untied)
    assert ("lm_head.weight" in sd) == untied
    # Every tensor equals the float64 effective weight (W + alpha/r A B) of the live model.
    ref = params_from_model(model)
    got = params_from_hf(sd, model.config)
    np.testing.assert_allclose(got["embed"], ref["embed"], rtol=0, atol=1e-6)
    for lg, lr in zip(got["layers"], ref["layers"]):
        for k in lr:
            np.testing.assert_allclose(lg[k], lr[k], rtol=1e-6, atol=1e-6, err_msg=k)
    tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, (2, 9))
    want = llama_forward(ref, model.config, tokens)
    have = llama_forward(got, model.config, tokens)
    np.testing.assert_allclose(have, want, atol=1e-5)
    jax_logits = np.asarray(model(jnp.asarray(tokens)))
    np.testing.assert_allclose(have, jax_logits, atol=1e-4)
    # Exporting must not strip the adapters of the live model.
    assert model.layers[0].attn.q_proj.lora is not None


def test_export_loads_back_through_weights(tmp_path):
    from selfspan_jax.weights import load_model

    seed = _seed()
    model = _lora_model(seed, untied=True)
    out = hf_interop.export_merged_safetensors(model, tmp_path / "export")
    loaded, _ = load_model(str(out), add_span_tokens=False)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, model.config.vocab_size, (2, 7)))
    np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(model(tokens)), atol=1e-4)


def test_lora_adapters_roundtrip(tmp_path):
    seed = _seed()
    model = _lora_model(seed, untied=True)
    out = hf_interop.save_lora_adapters(model, tmp_path / "adapters", rank=4, alpha=8.0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    tensors = load_file(str(out / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    mod = model.layers[1].attn.k_proj
    # PEFT orientation: delta W_hf [out, in] = scale * B A.
    np.testing.assert_allclose((2.0 * b.astype(np.float64) @ a).T,
                               2.0 * np.asarray(mod.lora.lora_a[...], np.float64) @ np.asarray(mod.lora.lora_b[...]),
                               atol=1e-5)
    # Only adapters and new-token rows: no base weight travels with them.
    assert not any(k.endswith("proj.weight") and "lora" not in k for k in tensors)

    # The same base weights, fresh adapters, then the saved ones loaded.
    fresh = _lora_template(untied=True)
    base_only = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam subclasses Param
    base_vars = dict(nnx.to_flat_state(nnx.state(model, base_only)))
    for path, var in nnx.to_flat_state(nnx.state(fresh, base_only)):
        var[...] = base_vars[path][...]
    zeros = jnp.zeros((1, 3), jnp.int32)
    assert not np.allclose(np.asarray(fresh(zeros)), np.asarray(model(zeros)))
    hf_interop.load_lora_adapters(fresh, out)
    tokens = jnp.asarray(np.random.default_rng(seed + 1).integers(0, model.config.vocab_size, (2, 8)))
    np.testing.assert_allclose(np.asarray(fresh(tokens)), np.asarray(model(tokens)), atol=1e-5)

    # adapters written before the span rows took PEFT's trainable-token format still load
    legacy = {k: v for k, v in tensors.items() if "token_adapter" not in k}
    legacy["selfspan.new_token_embed"] = tensors[hf_interop.NEW_EMBED_KEY]
    legacy["selfspan.new_token_head"] = np.ascontiguousarray(tensors[hf_interop.NEW_HEAD_KEY].T)  # [D, n] then
    (tmp_path / "legacy").mkdir()
    save_file(legacy, str(tmp_path / "legacy" / "adapter_model.safetensors"))
    older = _lora_template(untied=True)
    for path, var in nnx.to_flat_state(nnx.state(older, base_only)):
        var[...] = base_vars[path][...]
    hf_interop.load_lora_adapters(older, tmp_path / "legacy")
    np.testing.assert_allclose(np.asarray(older(tokens)), np.asarray(model(tokens)), atol=1e-5)

    def rank2():
        m = Llama(CFG.replace(tie_embeddings=False), rngs=nnx.Rngs(0))
        m.add_tokens(2)
        return apply_lora(m, rank=2, alpha=8.0, include_mlp=True, rngs=nnx.Rngs(0))

    # The shape check comes before any copy, so an abstract model suffices.
    with pytest.raises(ValueError, match="shape"):
        hf_interop.load_lora_adapters(nnx.eval_shape(rank2), out)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        hf_interop.save_lora_adapters(nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0))), tmp_path / "none", rank=4,
                              alpha=8.0)
