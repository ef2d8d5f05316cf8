"""Shared pieces of the benchmarks: for decode (`benchmarks/bench_decode.py`, `benchmarks/profile_decode.py`)
the model shapes, a random-weight model of a shape, and the recorded span traces they replay; for
training (`benchmarks/bench_train_step.py`) a step's FLOP count and the machine's measured matmul rate
and streaming bandwidth.

Decode speed does not depend on the weights, so the benchmarks use random
ones; what they need from a trained model is only its span structure, which
they take as traces: (prompt, completion) pairs that a trained run generated
(`record_traces`) or the generator's references (`reference_traces`), laid end
to end into long token streams (`trace_stream`).
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfspan_jax import evaluate as ev
from selfspan_jax import reporting
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
    # LLaMA-7B widths with 8 of its 32 layers: the same per-layer KV/weight balance, a quarter of the
    # compile time and memory (a GPU visit has minutes, not hours)
    "llama2-7b-8l": dict(preset="llama2-7b", n_layers=8),
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


def decode_point(model, stream_rows, *, batch: int, context: int, new_tokens: int, policies: dict, repeats: int,
                 **generate_kw) -> dict:
    """Decode speed of every policy at one (batch, context), forced along recorded span traces.

    policies: {label: policy} (a `generate` policy name or `Policy`); "dense" must be one of them,
    every speedup is over it. generate_kw: the rest of `generate`'s arguments (tokenizer,
    block_size, kernel).

    Decode time per repeat = the wall time of `generate`'s decode loop alone
    (`Outputs(timing=True)`: prefill runs as its own program and is finished
    first), so prefill neither dilutes the ratio nor adds its noise. The
    runs of all policies take turns in every repeat
    (`reporting.interleaved_results`), so dense and a policy see the same
    load; speedup = median over repeats of the paired ratio dense / policy,
    with its min and max. Timed runs record no statistics
    (`Outputs(stats=False)`, as a serving loop runs); one more run per policy
    with statistics gives the attended and KV-read fractions.
    """
    from selfspan_jax.generation import Outputs, generate
    from selfspan_jax.sampling import Sampling

    if "dense" not in policies:
        raise ValueError(f"policies must include 'dense' (the baseline of every speedup), got {list(policies)}")
    prompts = np.asarray([row[:context] for row in stream_rows[:batch]], np.int32)
    forced = np.asarray([row[context: context + new_tokens] for row in stream_rows[:batch]], np.int32)
    point = {"batch": batch, "context": context, "new_tokens": new_tokens}
    kw = dict(eos_id=-1, max_new_tokens=new_tokens, sampling=Sampling(forced_tokens=forced), **generate_kw)

    def run(label):
        return lambda: generate(model, prompts, policy=policies[label], outputs=Outputs(stats=False, timing=True),
                                **kw).timing

    point["load_average_before"] = reporting.load_average()
    timings = reporting.interleaved_results({label: run(label) for label in policies}, repeats)
    point["load_average_after"] = reporting.load_average()
    decode = {label: np.array([t["decode_s"] for t in timings[label]]) for label in policies}
    steps = timings["dense"][0]["decode_steps"]
    point["decode_steps"] = steps
    for label in policies:
        out = generate(model, prompts, policy=policies[label], **kw)
        if not np.array_equal(out.tokens, forced):
            raise AssertionError("forced decode did not emit the trace")
        s = out.summary()
        prefill = [t["prefill_s"] for t in timings[label]]
        decode_s = float(np.median(decode[label]))
        ratios = decode["dense"] / decode[label]
        point[label] = {
            "decode_s": decode_s, "prefill_s": float(np.median(prefill)),
            "decode_tokens_per_s": batch * steps / decode_s,
            "decode_ms_per_step": decode_s / steps * 1e3,
            "decode_s_per_repeat": decode[label].tolist(), "prefill_s_per_repeat": prefill,
            "speedup_per_repeat": ratios.tolist(),
            "speedup_spread": reporting.spread(ratios.tolist()),
            "mean_attended_fraction": s["mean_attended_fraction"], "kv_read_fraction": s["kv_read_fraction"],
            "rebuilds_per_step": s.get("rebuilds_per_step"),
        }
    for label in policies:
        m = point[label]
        m["speedup"] = m["speedup_spread"]["median"]
        m["speedup_of_medians"] = m["decode_tokens_per_s"] / point["dense"]["decode_tokens_per_s"]
    if "self_span" in point:  # the top-level fields older readers of the JSON use
        point["speedup"] = point["self_span"]["speedup"]
    return point


def record_traces(run: str, n: int, split: str, seed: int) -> list[tuple[str, str]]:
    """(prompt, generated completion) of `n` held-out problems, greedy, self_span, by a trained run."""
    loaded = ev.load_for_eval(run)
    _, _, _, records = ev.held_out_records(loaded, n, seed=seed, task="arithmetic", split=split)
    policy = ev.make_policy("self_span", tokenizer=loaded.tokenizer, max_segments=loaded.max_segments)
    out = ev.decode(loaded.model, loaded.tokenizer, [r["prompt"] for r in records], policy=policy,
                    batch_size=len(records), max_new_tokens=ev.tasks.generation_budget(
                        records, loaded.tokenizer, loaded.model.config.max_seq_len))
    return [(r["prompt"], t) for r, t in zip(records, out.texts)]


def reference_traces(n: int, split: str, seed: int) -> list[tuple[str, str]]:
    """(prompt, reference completion) of `n` generated arithmetic problems."""
    return [(r["prompt"], r["completion"]) for r in generate_examples(n, seed=seed, split=split)]


def step_flops(model_config, batch: int, seq: int, *, lora_rank: int, lora_mlp: bool, full: bool) -> dict:
    """Matmul FLOPs of one training step (forward + backward) on [batch, seq] tokens.

    Forward: 2 * (weights used per token) per token, plus attention's two
    [T, T] products. Backward: the gradient with respect to activations costs
    the forward again (every frozen weight still passes it back); weight
    gradients cost another forward's worth for what trains (all of it for full
    fine-tuning, only the adapters for LoRA). Elementwise work is left out.
    """
    c = model_config
    D, F, V, H, L = c.d_model, c.mlp_dim, c.vocab_size, c.head_dim, c.n_layers
    attn_w = D * H * (2 * c.n_heads + 2 * c.n_kv_heads)
    mlp_w = 3 * D * F
    tokens = batch * seq
    fwd_weights = 2 * tokens * (L * (attn_w + mlp_w) + V * D)  # the LM head is a [D, V] matmul
    fwd_attn = 2 * 2 * batch * seq * seq * c.n_heads * H * L  # QK^T and PV, causal not exploited
    lora = 0
    if lora_rank:
        per_layer = sum(i + o for i, o in [(D, c.n_heads * H), (D, c.n_kv_heads * H), (D, c.n_kv_heads * H),
                                           (c.n_heads * H, D)])
        if lora_mlp:
            per_layer += (D + F) * 2 + (F + D)
        lora = 2 * tokens * L * lora_rank * per_layer
    forward = fwd_weights + fwd_attn + lora
    weight_grads = (fwd_weights + lora) if full else lora
    return {"forward": forward, "backward": forward + weight_grads, "total": 2 * forward + weight_grads}


def _median_seconds(fn, *args, repeats: int) -> float:
    """Median wall seconds of a jitted call (after one warm-up call that compiles it)."""
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Measured fp32 GFLOP/s of a jitted [m, k] x [k, n] product on this machine (median of repeats)."""
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    return 2 * m * k * n / _median_seconds(jax.jit(lambda x, y: x @ y), a, b, repeats=repeats) / 1e9


def stream_bandwidth(n: int = 1 << 26, repeats: int = 5) -> float:
    """Measured GB/s of a jitted elementwise add of two n-float arrays (3 arrays of traffic)."""
    a, b = jnp.ones((n,), jnp.float32), jnp.ones((n,), jnp.float32)
    return 3 * a.nbytes / _median_seconds(jax.jit(lambda x, y: x + y), a, b, repeats=repeats) / 1e9


def plot_fraction_of_ceiling(series: dict, path, title: str, machine: str = "") -> None:
    """measured speedup / ceiling against batch size: series = {label: [(batch, {min, median, max})]},
    min-max as error bars (profile_loop.py draws its decode-only sweep with it too); `machine` is added
    to the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, pts in series.items():
        pts = sorted(pts, key=lambda p: p[0])
        med = np.array([s["median"] for _, s in pts])
        err = np.array([[m - s["min"] for m, (_, s) in zip(med, pts)], [s["max"] - m for m, (_, s) in zip(med, pts)]])
        ax.errorbar([b for b, _ in pts], med, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.axhline(0.85, color="gray", lw=0.8, ls="--", label="target 85%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over dense / ceiling (1+r)/(1+rho r)")
    ax.set_title(title + (f"; {machine}" if machine else ""), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
