#!/usr/bin/env python
"""What the decode loop's own work costs per step, measured inside the loop, at batch 1/8/64 and
short/long contexts.

The body of `generate`'s while loop (`decode_loop.decode_step`) runs in a
jitted `fori_loop` of `--steps` steps from a state whose cache holds `context`
tokens (random K/V: speed does not depend on them) and whose policy state has
parsed a recorded span trace, the tokens forced along that trace as
`bench_decode.py` does. Variants differ in one thing each, so a difference of
their per-step times is the cost of that thing in situ (fusion and scheduling
included, which a component timed alone would not show):

- `dense` / `self_span`: the lean loop (no statistics, no log-probs);
- `+stats`: the per-step statistics (`Outputs(stats=True)`);
- `+logprobs`: the full-vocabulary log_softmax of the chosen token (`Outputs(logprobs=True)`);
- `dense greedy` / `dense sampled`: the token chosen by `sample_logits` (argmax, or
  temperature 0.8 with a Gumbel draw) instead of forced;
- `no_kv_reads`: lists with no block, so the kernel streams no K/V: the weights' share of a step;
- `span_track`: self_span's state update with dense reads and the causal mask
  (what the span parser alone costs);
- `span_dense_reads`: self_span through `min_sparse_context`'s dense path: its
  update and visibility row, every causal block read (self_span's results;
  what building and following the block list saves or costs is `self_span`
  minus this).

Repeats take turns (every variant once per round, in a fresh random order each
round unless --fixed-order); reported per variant:
median (min, max) ms per step, and the JSON keeps every repeat. With
`--op-profile DIR`, one more traced call per variant says where the step's CPU
time goes, per XLA op and per part of the step (kernel loop, kernel setup,
block list, weight matmuls, other, executor): the kind of question a difference
of two wall times cannot answer (docs/notes/generation.md, session 27).

    python benchmarks/profile_loop.py --batch 1,8,64 --context 100,2048 --out benchmarks/results/decode/decode_loop_cost_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np


def build_variants(span_tokens, max_segments):
    from selfspan_jax.policies import DensePolicy, SelfSpanPolicy, dense_selection

    @dataclasses.dataclass(frozen=True)
    class SpanTrack(SelfSpanPolicy):
        """The span parser's update, dense causal reads (not self_span's results: for costing)."""

        def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
            return dense_selection(lengths, cache_len, block_size)

    @dataclasses.dataclass(frozen=True)
    class DenseMaterialized(DensePolicy):
        """dense with its causal token mask materialised before the kernel (an optimization barrier)."""

        def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
            import jax

            sel = dense_selection(lengths, cache_len, block_size)
            return sel.replace(token_mask=jax.lax.optimization_barrier(sel.token_mask))

    @dataclasses.dataclass(frozen=True)
    class NoKVReads(DensePolicy):
        """Lists with no block: the kernel reads no K/V (everything of a step but the KV stream)."""

        def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
            sel = dense_selection(lengths, cache_len, block_size)
            return sel.replace(block_counts=sel.block_counts * 0)

    span = SelfSpanPolicy(span_tokens, max_segments)
    track = SpanTrack(span_tokens, max_segments)
    forced = dict(forced=True, temperature=0.0)
    lean = dict(stats=False, logprobs=False)
    return {
        "dense": (DensePolicy(), dict(**lean, **forced)),
        "dense +stats": (DensePolicy(), dict(stats=True, logprobs=False, **forced)),
        "dense +logprobs": (DensePolicy(), dict(stats=False, logprobs=True, **forced)),
        "dense greedy": (DensePolicy(), dict(**lean, forced=False, temperature=0.0)),
        "dense sampled": (DensePolicy(), dict(**lean, forced=False, temperature=0.8)),
        "dense materialized mask": (DenseMaterialized(), dict(**lean, **forced)),
        "no_kv_reads": (NoKVReads(), dict(**lean, **forced)),
        "self_span": (span, dict(**lean, **forced)),
        "self_span +stats": (span, dict(stats=True, logprobs=False, **forced)),
        "self_span +logprobs": (span, dict(stats=False, logprobs=True, **forced)),
        "span_track": (track, dict(**lean, **forced)),
        "span_dense_reads": (span, dict(**lean, **forced, dense_reads=True)),
    }


def profile_point(model, rows, variants, *, batch, context, steps, block_size, repeats, backend, shuffle_seed=0,
                  dump_hlo=None, op_profile=None, top_ops=25):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from selfspan_jax import decode_loop, reporting
    from selfspan_jax.cache import KVCache

    cfg = model.config
    T, M, S = decode_loop.shape_buckets(context, steps + 2, block_size)
    prompt = np.zeros((batch, T), np.int32)
    prompt[:, :context] = [r[:context] for r in rows[:batch]]
    forced = np.zeros((batch, M), np.int32)
    forced[:, : steps + 2] = [r[context: context + steps + 2] for r in rows[:batch]]
    lengths = jnp.full((batch,), context, jnp.int32)
    key = jax.random.key(0)
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, S, cfg.head_dim)
    kv = jax.random.normal(key, (2, *shape), cfg.compute_dtype)
    graphdef, params = nnx.split(model)
    rng = jax.random.key(1)

    def make(name, policy, flags):
        fx = jnp.asarray(forced)
        options = decode_loop.LoopOptions(policy=policy, block_size=block_size, cache_len=S, budget=M,
                                          logprobs=flags["logprobs"], stats=flags["stats"], backend=backend,
                                          dense_reads=flags.get("dense_reads", False))

        def inputs(use_forced, temperature):
            return decode_loop.LoopInputs(
                prompt=jnp.asarray(prompt), lengths=lengths, max_new=jnp.int32(M), temperature=temperature,
                top_k=jnp.int32(0), top_p=jnp.float32(1.0), rng=rng, eos_id=jnp.int32(-1), pad_id=jnp.int32(0),
                forced=fx, use_forced=use_forced)

        @jax.jit
        def start(k, v):
            cache = KVCache(k, v, lengths)
            pstate = policy.observe_prefill(policy.init_state(jnp.asarray(prompt), lengths, S), cache, lengths,
                                            block_size=block_size)
            return decode_loop.initial_state(
                cache, pstate, fx[:, 0], jnp.zeros((batch,)) if flags["logprobs"] else None,
                inputs(jnp.bool_(True), jnp.float32(0.0)), options)

        # Sampling knobs and forcing are run-time arrays, as in `decode_loop.run`: constants would let
        # XLA fold the choice and drop the logits (and the last layers) from the loop. The whole
        # state is returned, or XLA drops the dead parts of the loop carry.
        @functools.partial(jax.jit, donate_argnums=1)  # the cache is updated in place, as in the while loop
        def loop(params, st, use_forced, temperature):
            m = nnx.merge(graphdef, params)
            given = inputs(use_forced, temperature)
            choose = decode_loop.chooser(given)
            body = lambda i, s: decode_loop.decode_step(m, s, given, options, choose)  # noqa: E731
            return jax.lax.fori_loop(0, steps, body, st)

        knobs = (jnp.bool_(flags["forced"]), jnp.float32(flags["temperature"]))

        def compiled_text():
            return loop.lower(params, start(kv[0], kv[1]), *knobs).compile().as_text()

        if dump_hlo is not None:  # the compiled loop, to compare what XLA made of each variant
            text = compiled_text()
            Path(dump_hlo).mkdir(parents=True, exist_ok=True)
            (Path(dump_hlo) / f"B{batch}_T{context}_{name.replace(' ', '_')}.txt").write_text(text)

        def call():
            st = jax.block_until_ready(start(kv[0], kv[1]))  # a fresh state, not timed
            t0 = time.perf_counter()
            final = jax.block_until_ready(loop(params, st, *knobs))
            elapsed = time.perf_counter() - t0
            rho = None
            if final.blocks is not None:  # KV blocks read / dense blocks over the steps run
                cols = slice(1, steps + 1)
                rho = float(np.sum(final.blocks[:, cols]) / np.sum(final.dense_blocks[:, cols]))
            return elapsed, rho

        def traced(trace_dir):  # one more call under the profiler: time per XLA op (reporting.op_self_times)
            st = jax.block_until_ready(start(kv[0], kv[1]))
            with jax.profiler.trace(str(trace_dir)):
                jax.block_until_ready(loop(params, st, *knobs))
            return reporting.op_self_times(trace_dir), reporting.hlo_op_names(compiled_text())
        call.traced = traced
        return call

    calls = {name: make(name, policy, flags) for name, (policy, flags) in variants.items()}
    # in turns, a fresh random order every round (a fixed order biased one 12-variant file by ~5%);
    # one compiling call of each is not kept
    results = reporting.interleaved_results(calls, repeats, shuffle_seed=shuffle_seed)
    times = {name: [t for t, _ in res] for name, res in results.items()}
    rhos = {name: res[-1][1] for name, res in results.items() if res[-1][1] is not None}
    point = {"batch": batch, "context": context, "cache_len": S, "steps": steps,
             "load_average": reporting.load_average()}
    for name, ts in times.items():
        per_step = [t / steps * 1e3 for t in ts]
        point[name] = {"ms_per_step": reporting.spread(per_step), "all_ms_per_step": per_step}
        if name in rhos:
            point[name]["rho"] = rhos[name]
    if op_profile is not None:
        for name, call in calls.items():
            ops, origins = call.traced(Path(op_profile) / f"B{batch}_T{context}_{name.replace(' ', '_')}")
            top = sorted(ops.items(), key=lambda kv: -kv[1]["ms"])[:top_ops]
            point[name]["op_cpu_ms_per_step"] = {
                op: {"ms": round(r["ms"] / steps, 4), "calls_per_step": r["count"] / steps,
                     "from": origins.get(op, "")} for op, r in top}
            groups: dict[str, float] = {}
            for op, r in ops.items():
                group = op_group(op, origins.get(op, ""))
                groups[group] = groups.get(group, 0.0) + r["ms"] / steps
            point[name]["op_group_cpu_ms_per_step"] = {g: round(v, 4) for g, v in sorted(groups.items())}
    return point


def op_group(op: str, origin: str) -> str:
    """Which part of a decode step an XLA op belongs to, from the op_name it was lowered from.

    `executor` is XLA:CPU's own dispatch and waiting on the pool threads (ThunkExecutor, the pool's
    Await, loop control); the main thread's wait for the whole loop is kept apart (not work)."""
    if op == "ThunkExecutor::Execute (wait for completion)":
        return "main thread waiting for the loop (not work)"
    if op.startswith(("ThunkExecutor", "SlinkyThreadPool")) or origin.endswith("/while"):
        return "executor"
    if not origin:
        return "no source (copies XLA inserted)"
    if "_block_sparse_decode_jit)/while/body" in origin:
        return "kernel loop (reads K/V)"
    if "_block_sparse_decode_jit" in origin:
        return "kernel setup (work list, output)"
    if "_blocks_from_token_mask" in origin:
        return "block list"
    if origin.endswith("dot_general") or (op.startswith("dot") and origin.endswith("/body")):
        return "weight matmuls"  # at B = 1 the matmuls are plain dots XLA left without metadata
    return "other (norms, RoPE, cache write, policy, token)"


def add_paired_ratios(point: dict, baseline: str = "dense") -> None:
    """Per variant, the paired ratio baseline / variant of each round's times (both ran in the same
    round), as min / median / max: `speedup_vs_<baseline>`."""
    from selfspan_jax import reporting

    base = point[baseline]["all_ms_per_step"]
    for name, m in point.items():
        if isinstance(m, dict) and "all_ms_per_step" in m and name != baseline:
            m[f"speedup_vs_{baseline}"] = reporting.spread([b / t for b, t in zip(base, m["all_ms_per_step"])])


def main(argv=None) -> int:
    from pallas_kernels.backend import BACKENDS

    p = argparse.ArgumentParser(prog="profile_loop.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="cpu-reduced")
    p.add_argument("--batch", default="1,8,64")
    p.add_argument("--context", default="100,2048")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--max-segments", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fixed-order", action="store_true",
                   help="take the variants in the same order every round (default: a fresh random order per "
                        "round, seeded; a fixed order lets a variant's place in the round bias it)")
    p.add_argument("--backend", default="xla", choices=BACKENDS)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new (batch, context) point after this many seconds; the JSON is rewritten "
                        "after every point, so a run stopped early keeps what it measured")
    p.add_argument("--traces", default="benchmarks/results/decode/decode_traces_long.json")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants (default: all)")
    p.add_argument("--plot", default=None, help="PNG of self_span's measured/ceiling against batch size (needs "
                   "the variants dense, self_span and 'self_span +stats')")
    p.add_argument("--out", default="benchmarks/results/decode/decode_loop_cost_cpu.json")
    p.add_argument("--op-profile", default=None, metavar="DIR",
                   help="after the timed rounds, trace one more call of each variant (jax.profiler, to DIR) and "
                        "record CPU ms per step of self time: its most expensive XLA ops (names as in --dump-hlo) and "
                        "by part of the step (op_group)")
    p.add_argument("--dump-hlo", default=None, metavar="DIR",
                   help="also write each variant's compiled loop (optimised HLO text) to DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = p.parse_args(argv)
    from selfspan_jax import reporting

    with reporting.reserved_output(args.out, overwrite=args.overwrite, option="--out", prog="profile_loop.py"):

        from selfspan_jax import reporting
        from selfspan_jax.benchmarks import random_model, trace_stream
        from selfspan_jax.reporting import kv_weight_ratio, memory_ceiling
        from selfspan_jax.spans import SpanTokens
        from selfspan_jax.tokenizer import CharTokenizer

        tokenizer = CharTokenizer()
        traces = [tuple(t) for t in json.loads(Path(args.traces).read_text())["traces"]]
        batches = [int(b) for b in args.batch.split(",")]
        contexts = [int(c) for c in args.context.split(",")]
        need = max(contexts) + args.steps + 2
        rows = [trace_stream(traces[i:] + traces[:i], tokenizer, need) for i in range(max(batches))]
        model = random_model(args.shape, args.dtype, need + 2 * args.block_size + 64)
        itemsize = 2 if args.dtype == "bfloat16" else 4
        started = time.perf_counter()
        variants = build_variants(SpanTokens.from_tokenizer(tokenizer), args.max_segments)
        if args.variants:
            unknown = set(args.variants.split(",")) - set(variants)
            if unknown:
                raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {list(variants)}")
            variants = {n: variants[n] for n in args.variants.split(",")}
        on_cpu = reporting.environment()["device"].startswith("cpu")
        label = (f"{'REDUCED SHAPE ' if args.shape == 'cpu-reduced' else ''}{args.shape}, {args.dtype}, "
                 f"{'CPU (XLA path)' if on_cpu else 'GPU'}, backend {args.backend}, forced along recorded span traces")

        def write(points, skipped):
            result = {
                "benchmark": "per-step cost of the decode loop's own work, in situ (fori_loop over decode_step)",
                "label": label,
                "environment": reporting.environment(),
                "settings": {**{k: v for k, v in vars(args).items() if k not in ("out",)},
                             "timing": "ms per step = wall time of a jitted fori_loop of `steps` decode steps (state "
                                       "donated, set up untimed) / steps; median (min, max) of repeats taken in turns "
                                       f"({'the same order' if args.fixed_order else 'a fresh random order'} every "
                                       "round), after one compiling call of each"},
                "variants": {n: {"policy": type(pol).__name__, **flags} for n, (pol, flags) in variants.items()},
                "points": points,
                "not_measured": skipped,  # points --max-seconds left out
                "command": "python benchmarks/profile_loop.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            }
            return reporting.write_json(result, args.out)

        points, skipped = [], []
        for context in contexts:
            for batch in batches:
                if args.max_seconds is not None and time.perf_counter() - started > args.max_seconds:
                    skipped.append({"batch": batch, "context": context})
                    continue
                pt = profile_point(model, rows, variants, batch=batch, context=context, steps=args.steps,
                                   block_size=args.block_size, repeats=args.repeats, backend=args.backend,
                                   shuffle_seed=None if args.fixed_order else len(points) + 1000 * len(skipped),
                                   dump_hlo=args.dump_hlo, op_profile=args.op_profile)
                if "dense" in variants:
                    add_paired_ratios(pt)
                    if "self_span" in pt and "self_span +stats" in pt:  # the ceiling at self_span's measured rho
                        r = kv_weight_ratio(model.config, batch, context + args.steps / 2, itemsize)
                        rho = pt["self_span +stats"]["rho"]
                        sp = pt["self_span"]["speedup_vs_dense"]
                        pt["ceiling"] = {"r": r, "rho": rho, "ceiling": memory_ceiling(r, rho),
                                         "fraction_of_ceiling": {k: v / memory_ceiling(r, rho) for k, v in sp.items()}}
                points.append(pt)
                write(points, skipped)
                print(f"B={batch} context={context} (load {pt['load_average'][0]:.2f}): " + ", ".join(
                    f"{n} {pt[n]['ms_per_step']['median']:.3f}" for n in variants)
                    + (f"; self_span {pt['self_span']['speedup_vs_dense']['median']:.2f}x of ceiling "
                       f"{pt['ceiling']['ceiling']:.2f}x (rho {pt['ceiling']['rho']:.3f})" if "ceiling" in pt else ""),
                    flush=True)

        names = list(variants)
        print("\n| batch | context | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
        for pt in points:
            cells = [pt[n]["ms_per_step"] for n in names]
            print(f"| {pt['batch']} | {pt['context']} | " + " | ".join(
                f"{c['median']:.3f} [{c['min']:.3f}-{c['max']:.3f}]" for c in cells) + " |")
        if skipped:
            print(f"not measured (--max-seconds {args.max_seconds}): {skipped}")
        print(f"wrote {write(points, skipped)}")
        if args.plot:
            from selfspan_jax.benchmarks import plot_fraction_of_ceiling
            from selfspan_jax.reporting import machine_of

            series = {f"self_span, {c} tokens": [(pt["batch"], pt["ceiling"]["fraction_of_ceiling"]) for pt in points
                                                 if pt["context"] == c and "ceiling" in pt] for c in contexts}
            plot_fraction_of_ceiling(series, args.plot, "Decode steps in the loop (no prefill) against the "
                                     f"memory-bound ceiling\n{label.split(', forced')[0]}, paired rounds",
                                     machine=machine_of({"environment": reporting.environment()}))
            print(f"wrote {args.plot}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
