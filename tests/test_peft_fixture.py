"""Our exported LoRA adapters load in Hugging Face PEFT, our merged export in transformers.

The fixtures (tests/fixtures/peft/<base>/) were made in two steps:
`tests/make_peft_fixture.py` wrote the adapters and merged export of the
models in `peft_fixture_models.py` with this package's exporters, then
`tests/make_reference_outputs.py --peft-only` (Python 3.11, torch, peft,
transformers; versions in reference.json) loaded them with
`PeftModel.from_pretrained` on the resized tiny base and with
`AutoModelForCausalLM.from_pretrained`, and stored their logits. No torch here.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from peft_fixture_models import BASES, FIXTURES, lora_model
from safetensors.numpy import load_file

from selfspan_jax import hf_interop
from selfspan_jax.lora import apply_lora
from selfspan_jax.weights import load_model


@pytest.mark.parametrize("name", BASES)
def test_peft_and_transformers_give_our_logits(name, tmp_path):
    case = FIXTURES / "peft" / name
    ref = np.load(case / "reference.npz")
    ids = np.load(case / "ids.npy")
    model = lora_model(name)
    ours = np.asarray(model(jnp.asarray(ids)), np.float64)
    scale = np.abs(ref["peft_logits"]).max()
    # PEFT on top of the HF base (adapters + span-token rows as trainable tokens)
    np.testing.assert_allclose(ours, ref["peft_logits"], atol=2e-5 * scale, rtol=0)
    # transformers on our merged export, and PEFT's own merge_and_unload of our adapters
    np.testing.assert_allclose(ours, ref["merged_logits"], atol=2e-5 * scale, rtol=0)
    np.testing.assert_allclose(ours, ref["peft_merged_logits"], atol=2e-5 * scale, rtol=0)
    # the span tokens really are in the batch, and their rows matter: without them the logits move
    assert (ids >= model.base_vocab_size).any()
    assert np.abs(ref["peft_logits"][:, :, model.base_vocab_size:]).max() > 0.1

    # the exporters still write what PEFT was given (the fixture is not stale)
    hf_interop.save_lora_adapters(model, tmp_path / "adapters", rank=4, alpha=8.0)
    now, then = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors")), load_file(
        str(case / "adapters" / "adapter_model.safetensors"))
    assert sorted(now) == sorted(then)
    for key in now:
        np.testing.assert_array_equal(now[key], then[key], err_msg=key)
    assert json.loads((tmp_path / "adapters" / "adapter_config.json").read_text()) == json.loads(
        (case / "adapters" / "adapter_config.json").read_text())

    # and our loader reads the fixture's adapters back into a fresh LoRA model
    fresh, _ = load_model(str(FIXTURES / "tiny_llama" / name), add_span_tokens=False)
    fresh.add_tokens(3)
    apply_lora(fresh, rank=4, alpha=8.0, include_mlp=True, rngs=nnx.Rngs(1))
    hf_interop.load_lora_adapters(fresh, case / "adapters")
    np.testing.assert_allclose(np.asarray(fresh(jnp.asarray(ids)), np.float64), ours, atol=1e-6 * scale, rtol=0)


def test_peft_config_holds_only_keys_peft_knows():
    """PEFT warns 'upgrade PEFT' about unknown adapter_config keys; ours writes none."""
    known = {"peft_type", "task_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias",
             "trainable_token_indices"}
    for name in BASES:
        config = json.loads((FIXTURES / "peft" / name / "adapters" / "adapter_config.json").read_text())
        assert set(config) <= known, set(config) - known
