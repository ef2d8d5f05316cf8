"""Shared pieces of the decode benchmarks (`scripts/bench_decode.py`, `scripts/profile_decode.py`):
the model shapes, a random-weight model of a shape, and the recorded span traces they replay.

Decode speed does not depend on the weights, so the benchmarks use random
ones; what they need from a trained model is only its span structure, which
they take as traces: (prompt, completion) pairs that a trained run generated
(`record_traces`) or the generator's references (`reference_traces`), laid end
to end into long token streams (`trace_stream`).
"""

from __future__ import annotations

import re

import jax
from flax import nnx

from selfspan_jax import evaluate as ev
from selfspan_jax.config import LlamaConfig
from selfspan_jax.data.arithmetic import generate_examples
from selfspan_jax.model import Llama
from selfspan_jax.tokenizer import ANCHOR, REF_CLOSE, REF_OPEN, encode_with_spans

# The CPU shape keeps LLaMA-7B's head dim (128, MHA) and cuts depth, width and
# vocabulary so a 2-core CPU finishes in minutes. It is chosen to keep r =
# dense KV bytes / weight bytes per step in the range of LLaMA-7B at batch 32
# and 2k tokens (r ~ 2.5), the regime where skipping KV blocks pays: at batch
# 8 and 2k tokens this shape has r ~ 3.
SHAPES = {
    "llama2-7b": dict(preset="llama2-7b"),
    "cpu-reduced": dict(preset="llama2-7b", d_model=512, n_layers=2, n_heads=4, n_kv_heads=4, mlp_dim=1376,
                        vocab_size=4096),
}


def random_model(shape: str, dtype: str, max_seq_len: int) -> Llama:
    """A model of `SHAPES[shape]` with random weights, created on the device by a jitted
    initialiser (7B parameters are not built op by op on the host)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    overrides = dict(SHAPES[shape])
    config = LlamaConfig.preset(overrides.pop("preset"), dtype=dtype, param_dtype=dtype, max_seq_len=max_seq_len,
                                **overrides)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(Llama(config, rngs=nnx.Rngs(0))))())


def trace_stream(completions: list[tuple[str, str]], tokenizer, length: int) -> list[int]:
    """Token ids of a long multi-problem derivation, >= `length` tokens.

    Layout, as in summarization: the instruction (segment 0), then every
    problem line as its own prompt segment, then the recorded derivations one
    after another. References are renumbered to global segments: a
    derivation's local segment 1 (its problem line) becomes that problem's
    prompt segment, local segment k >= 2 (its step k - 1) the global segment of
    that step. So every decoded step still reads segment 0, itself and the
    one segment the recorded generation named -- the recorded span structure
    at a long context -- and no header-less problem line sits among the
    decoded tokens (those would be dense by the span rule).
    """
    ref = re.compile(re.escape(REF_OPEN) + r"(\d+)" + re.escape(REF_CLOSE))
    instruction = completions[0][0].split(ANCHOR)[0]
    chosen, total = [], len(encode_with_spans(tokenizer, instruction)) + 1
    while total < length:
        prompt, completion = completions[len(chosen) % len(completions)]
        chosen.append((ANCHOR + prompt.split(ANCHOR, 1)[1], completion.rstrip("\n") + "\n"))
        total += sum(len(encode_with_spans(tokenizer, t)) for t in chosen[-1])
    text = instruction + "".join(problem for problem, _ in chosen)
    segment = len(chosen)  # global segment of the last anchor so far
    for i, (_, completion) in enumerate(chosen, start=1):
        start = segment  # step j of this derivation becomes global segment start + j

        def renumber(m, i=i, start=start):
            k = int(m.group(1))
            return f"{REF_OPEN}{i if k == 1 else start + k - 1}{REF_CLOSE}"

        text += ref.sub(renumber, completion)
        segment += completion.count(ANCHOR)
    return [tokenizer.bos_token_id] + encode_with_spans(tokenizer, text)


def record_traces(run: str, n: int, split: str, seed: int) -> list[tuple[str, str]]:
    """(prompt, generated completion) of `n` held-out problems, greedy, self_span, by a trained run."""
    loaded = ev.load_for_eval(run)
    _, _, _, records = ev.held_out_records(loaded, n, seed=seed, task="arithmetic", split=split)
    out = ev.decode(loaded.model, loaded.tokenizer, [r["prompt"] for r in records], policy="self_span",
                    batch_size=len(records), max_new_tokens=ev.tasks.generation_budget(
                        records, loaded.tokenizer, loaded.model.config.max_seq_len),
                    max_segments=loaded.max_segments)
    return [(r["prompt"], t) for r, t in zip(records, out.texts)]


def reference_traces(n: int, split: str, seed: int) -> list[tuple[str, str]]:
    """(prompt, reference completion) of `n` generated arithmetic problems."""
    return [(r["prompt"], r["completion"]) for r in generate_examples(n, seed=seed, split=split)]
