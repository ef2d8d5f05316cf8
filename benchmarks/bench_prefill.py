#!/usr/bin/env python
"""Prefill time and peak memory against prompt length: the blocked prefill vs the [B, T, T] one.

Two ways to prefill the same right-padded prompts (long span traces, as
`bench_decode.py` replays them) with the self_span policy, both jitted whole
(mask, forward, cache write, policy state):

- `full_mask` (the prefill before issue 15): `policy.prefill_mask` builds the
  [B, T, T] mask, the forward scores [B, N, T, T] in fp32 per layer and
  projects every position to [B, T, V] logits;
- `blocked` (`decode_loop.prefill` today): the factored mask
  (`Policy.prefill_rows`), `attention.blocked_attention` over [C, C] blocks
  at or below the diagonal, logits at the last positions only.

Each (mode, T, B) runs in a fresh process, so its peak resident memory is its
own: reported are XLA's buffer assignment for the compiled program
(arguments + outputs + temporaries, `Compiled.memory_analysis`) and the
process's peak RSS (`ru_maxrss`, which includes Python, jax and the model).
A full_mask point whose buffers would not fit the machine is compiled, not
run. Times: median (min, max) of `--repeats` runs after a warm-up.

    python benchmarks/bench_prefill.py --context 2048,8192,16384 --batch 1,8 --out benchmarks/results/decode/prefill_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# A full_mask point whose XLA buffers exceed this is compiled but not run (24 GB machine).
RUN_LIMIT_GIB = 12.0


def one_point(mode: str, context: int, batch: int, *, shape: str, traces: str, max_segments: int, repeats: int,
              block_size: int, run_limit_gib: float) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from selfspan_jax import decode_loop
    from selfspan_jax.benchmarks import random_model, reference_traces, trace_stream
    from selfspan_jax.cache import KVCache
    from selfspan_jax.policies import SelfSpanPolicy
    from selfspan_jax.spans import SpanTokens
    from selfspan_jax.tokenizer import CharTokenizer

    tokenizer = CharTokenizer()
    if traces and Path(traces).exists():
        pairs = [tuple(t) for t in json.loads(Path(traces).read_text())["traces"]]
    else:
        pairs = reference_traces(64, "harder", seed=777)
    rows = [trace_stream(pairs[i:] + pairs[:i], tokenizer, context)[:context] for i in range(batch)]
    prompt = jnp.asarray(np.asarray(rows, np.int32))
    lengths = jnp.full((batch,), context, jnp.int32)
    cache_len = context + 2 * block_size
    model = random_model(shape, "float32", cache_len)
    graphdef, params = nnx.split(model)
    policy = SelfSpanPolicy(SpanTokens.from_tokenizer(tokenizer), max_segments)

    def blocked(params, prompt, lengths):
        m = nnx.merge(graphdef, params)
        return decode_loop.prefill(m, policy, prompt, lengths, cache_len=cache_len, block_size=block_size,
                                   prefill_chunk=batch)

    def full_mask(params, prompt, lengths):
        m = nnx.merge(graphdef, params)
        mask = policy.prefill_mask(prompt, lengths)
        logits, cache = m.prefill(prompt, KVCache.init(m.config, batch, cache_len), attention_mask=mask,
                                  lengths=lengths)
        state = policy.observe_prefill(policy.init_state(prompt, lengths, cache_len), cache, lengths,
                                       block_size=block_size)
        return cache, logits[jnp.arange(batch), lengths - 1], state

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    compiled = jax.jit({"blocked": blocked, "full_mask": full_mask}[mode]).lower(params, prompt, lengths).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla = {"argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
           "temp_bytes": int(mem.temp_size_in_bytes)}
    xla["total_bytes"] = xla["argument_bytes"] + xla["output_bytes"] + xla["temp_bytes"]
    point = {"mode": mode, "context": context, "batch": batch, "compile_s": compile_s, "xla": xla,
             "rss_before_compile_bytes": rss_before}
    if mode == "full_mask" and xla["total_bytes"] > run_limit_gib * 2 ** 30:
        point["skipped"] = f"XLA buffers {xla['total_bytes'] / 2**30:.1f} GiB > {run_limit_gib:g} GiB"
        return point
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, prompt, lengths))
        if i:  # the first run is a warm-up
            times.append(time.perf_counter() - t0)
    point["times_s"] = times
    point["median_s"] = float(np.median(times))
    point["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return point


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_prefill.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--context", default="2048,8192,16384")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--modes", default="full_mask,blocked")
    p.add_argument("--shape", default="cpu-reduced")
    p.add_argument("--traces", default="benchmarks/results/decode/decode_traces_long.json")
    p.add_argument("--max-segments", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--run-limit-gib", type=float, default=RUN_LIMIT_GIB,
                   help="compile but do not run a full_mask point whose XLA buffers exceed this")
    p.add_argument("--one", nargs=3, metavar=("MODE", "CONTEXT", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/decode/prefill_cpu.json")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = p.parse_args(argv)
    from selfspan_jax import reporting

    with reporting.reserved_output(args.out, overwrite=args.overwrite, option="--out", prog="bench_prefill.py"):
        kw = dict(shape=args.shape, traces=args.traces, max_segments=args.max_segments, repeats=args.repeats,
                  block_size=args.block_size, run_limit_gib=args.run_limit_gib)
        if args.one:
            mode, context, batch = args.one[0], int(args.one[1]), int(args.one[2])
            print("POINT " + json.dumps(one_point(mode, context, batch, **kw)), flush=True)
            return 0

        from selfspan_jax import reporting

        points = []
        for context in [int(c) for c in args.context.split(",")]:
            for batch in [int(b) for b in args.batch.split(",")]:
                for mode in args.modes.split(","):
                    load = reporting.load_average()
                    cmd = [sys.executable, __file__, "--one", mode, str(context), str(batch), "--shape", args.shape,
                           "--traces", args.traces, "--max-segments", str(args.max_segments), "--block-size",
                           str(args.block_size), "--repeats", str(args.repeats),
                           "--run-limit-gib", str(args.run_limit_gib)]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("POINT ")), None)
                    if proc.returncode or line is None:
                        pt = {"mode": mode, "context": context, "batch": batch,
                              "failed": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}
                    else:
                        pt = json.loads(line[len("POINT "):])
                    pt["load_average_before"] = load
                    points.append(pt)
                    gib = 2 ** 30
                    what = pt.get("failed") or pt.get("skipped") or (
                        f"{pt['median_s']:.2f} s (min {min(pt['times_s']):.2f}, max {max(pt['times_s']):.2f}), "
                        f"peak RSS {pt['peak_rss_bytes'] / gib:.2f} GiB")
                    xla = f"XLA {pt['xla']['total_bytes'] / gib:.2f} GiB" if "xla" in pt else ""
                    print(f"T={context:6d} B={batch:2d} {mode:9s}: {xla}; {what}", flush=True)

        result = {
            "benchmark": "prefill time and peak memory vs prompt length: blocked (factored mask) vs full [B, T, T] "
                         "mask",
            "label": "REDUCED SHAPE on CPU, self_span policy on long span traces",
            "environment": reporting.environment(),
            "settings": {"shape": args.shape, "max_segments": args.max_segments, "block_size": args.block_size,
                         "repeats": args.repeats, "traces": args.traces, "run_limit_gib": args.run_limit_gib,
                         "timing": "each point in a fresh process; median of repeats after one warm-up run",
                         "memory": "XLA buffer assignment (arguments + outputs + temporaries) and process peak RSS "
                                   "(ru_maxrss, includes Python, jax and the model)",
                         "load_average_at_end": reporting.load_average()},
            "points": points,
            "command": "python benchmarks/bench_prefill.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        out = reporting.write_json(result, args.out)
        print(f"wrote {out}")
        return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
