#!/usr/bin/env python
"""Writes what PEFT and transformers are asked to load: tests/fixtures/peft/<base>/{adapters,merged,ids.npy}.

Step 1 of 2 (this environment, JAX):

    .venv/bin/python tests/make_peft_fixture.py

builds the LoRA models of `tests/peft_fixture_models.py` (tiny HF checkpoints +
three span tokens + seeded random rank-4 adapters on every projection), and
writes each one's adapters (`hf_interop.save_lora_adapters`: PEFT layout) and
merged export (`hf_interop.export_merged_safetensors`: HF LlamaForCausalLM),
plus a token batch that uses the span tokens.

Step 2 (the Python 3.11 + torch reference environment, see
tests/make_reference_outputs.py): `make_reference_outputs.py --peft` loads
the adapters with `peft.PeftModel.from_pretrained` on top of the base
checkpoint and the merged export with `AutoModelForCausalLM`, and records both
sets of logits. tests/test_peft_fixture.py then checks our model against them
(no torch in CI) and that this step still writes the same adapters.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# run as `python tests/make_peft_fixture.py`: tests/ is the script's own folder, first on sys.path
from peft_fixture_models import BASES, FIXTURES, RANK, ALPHA, lora_model, token_ids  # noqa: E402

from selfspan_jax import hf_interop  # noqa: E402


def main() -> int:
    for name in BASES:
        model = lora_model(name)
        out = FIXTURES / "peft" / name
        shutil.rmtree(out, ignore_errors=True)
        hf_interop.save_lora_adapters(model, out / "adapters", rank=RANK, alpha=ALPHA)
        hf_interop.export_merged_safetensors(model, out / "merged")
        ids = token_ids(name, model.config.vocab_size)
        np.save(out / "ids.npy", ids)
        print(f"{name}: vocab {model.base_vocab_size} + {model.num_new_tokens}, wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
