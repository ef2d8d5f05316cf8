"""The LoRA models behind tests/fixtures/peft/: built the same way by the fixture script and the test.

A tiny HF checkpoint of tests/fixtures/tiny_llama (tied GQA, and untied MQA)
grows three span tokens, gets LoRA adapters of rank 4 on every projection, and
every new parameter (A, B, the new rows) is drawn from numpy with a fixed seed,
so it is bit-identical on every machine. B is non-zero: at init (B = 0) the
adapters would change nothing and prove nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from selfspan_jax.lora import apply_lora
from selfspan_jax.weights import load_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"
BASES = ("gqa_tied", "mqa_untied_sharded")  # directories under fixtures/tiny_llama
RANK, ALPHA, NEW_TOKENS = 4, 8.0, 3
IDS_SHAPE = (2, 20)


def lora_model(name: str):
    """Our LoRA model on the tiny checkpoint `name`, with seeded random adapters and span-token rows."""
    model, _ = load_model(str(FIXTURES / "tiny_llama" / name), add_span_tokens=False)
    model.add_tokens(NEW_TOKENS)
    apply_lora(model, rank=RANK, alpha=ALPHA, include_mlp=True, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(sum(map(ord, name)))
    for _, var in sorted(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)), key=lambda kv: str(kv[0])):
        var[...] = (0.1 * rng.standard_normal(var.shape)).astype(np.float32)
    for attr in ("new_token_embed", "new_token_head"):
        var = getattr(model, attr)
        if var is not None:
            var[...] = (0.15 * rng.standard_normal(var.shape)).astype(np.float32)
    return model


def token_ids(name: str, vocab_size: int) -> np.ndarray:
    """A random batch in which every span token occurs (the rows PEFT must restore)."""
    rng = np.random.default_rng(1 + sum(map(ord, name)))
    ids = rng.integers(0, vocab_size, IDS_SHAPE)
    ids[:, 3:3 + NEW_TOKENS] = np.arange(vocab_size - NEW_TOKENS, vocab_size)
    return ids.astype(np.int32)
