"""selfspan-jax: self-selected attention spans for faster LLaMA decoding.

Public names are re-exported lazily so that `import selfspan_jax` stays cheap
and a notebook that only needs the data generators does not build a model.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it. (`generate` lives in `generation`:
# a submodule named `generate` would replace this function with the module as
# soon as anything imported it.)
_EXPORTS = {
    "LlamaConfig": "config",
    "RopeScaling": "config",
    "Llama": "model",
    "KVCache": "cache",
    "apply_lora": "lora",
    "lora_trainable_filter": "lora",
    "merge_lora": "lora",
    "load_model": "weights",
    "CharTokenizer": "tokenizer",
    "generate": "generation",
    "GenerateOutput": "generate_output",
    "Outputs": "generation",
    "KernelOptions": "generation",
    "Sampling": "sampling",
    "make_policy": "policies",
}

# submodules reachable as attributes (`selfspan_jax.runs.load_run(...)`)
_SUBMODULES = ("spans", "data", "runs", "tasks", "policies")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
