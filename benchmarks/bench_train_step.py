#!/usr/bin/env python
"""Training-step time of a run's config, variants side by side, with the prediction next to it.

Before a long CPU fine-tune, measure what a step costs: every variant (the
config with a few fields changed, e.g. LoRA on attention only, another
batch or length) is built as `scripts/train.py` would build it, its jitted
step compiled, and then timed in turns (one step of each variant per turn, so
all see the same load). Reported per variant: compile seconds, seconds per
step (min / median / max over turns), tokens/s (real tokens, and tokens with
padding), the step's matmul FLOPs (`step_flops`) next to XLA's own count of
the compiled step and its bytes accessed; and two predictions printed before
the steps run: FLOPs / the machine's measured fp32 matmul rate (a [B*T, D] x
[D, F] product timed in the same process), and that plus XLA's bytes accessed
at the measured streaming bandwidth (no overlap assumed).

    python benchmarks/bench_train_step.py --config configs/smollm2_lora_arithmetic.yaml \\
        --set batch_size=8 --set seq_len=128 \\
        --variant attn_mlp: --variant attn_only:lora_mlp=false

Writes benchmarks/results/training/<--name>.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_train_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="TrainConfig file (YAML/JSON) the variants start from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="a variant: a name and its overrides (none: the config as it is)")
    p.add_argument("--turns", type=int, default=5, help="timed steps per variant, taken in turns")
    p.add_argument("--num-train", type=int, default=256, help="examples to draw batches from (timing only)")
    p.add_argument("--name", default="train_step_cpu")
    p.add_argument("--out-dir", default="benchmarks/results/training")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = p.parse_args(argv)
    from selfspan_jax import reporting

    out = os.path.join(args.out_dir, f"{args.name}.json")
    with reporting.reserved_output(out, overwrite=args.overwrite, option="--name", prog="bench_train_step.py"):

        import jax

        from selfspan_jax import reporting
        from selfspan_jax import sharding as shd
        from selfspan_jax.benchmarks import matmul_rate, step_flops, stream_bandwidth
        from selfspan_jax.data.batches import DataPosition, next_indices
        from selfspan_jax.train import _mask_fn, build, make_train_step
        from selfspan_jax.train_config import load_config_file, parse_key_value, resolve_config

        load_start = list(os.getloadavg())
        base = load_config_file(args.config) if args.config else {}
        common = dict(parse_key_value(s) for s in args.set)
        variants = {}
        for spec in args.variant or ["config:"]:
            name, _, rest = spec.partition(":")
            if not name:
                print(f"bench_train_step.py: error: variant {spec!r} has no name (NAME:KEY=VALUE,...)", file=sys.stderr)
                return 2
            variants[name] = dict(parse_key_value(kv) for kv in rest.split(",") if kv.strip())
        built, steps, states, batches, flops = {}, {}, {}, {}, {}
        compile_s = {}
        for name, over in variants.items():
            try:
                cfg = resolve_config(base, {**common, **over, "num_train": args.num_train, "num_eval": 8})
            except ValueError as err:
                print(f"bench_train_step.py: error: variant {name!r}: {err}", file=sys.stderr)
                return 2
            b = build(cfg)
            step = jax.jit(make_train_step(b.graphdef, b.tx, _mask_fn(cfg, b.span_tokens), cfg.grad_accum),
                           donate_argnums=(0, 2))
            opt_state = b.tx.init(b.trainable)
            idx, _ = next_indices(len(b.train_set), cfg.batch_size, DataPosition(seed=cfg.seed))
            host = b.train_set.rows(idx)
            batch = shd.put_batch(host, b.mesh)
            t = time.perf_counter()
            step = step.lower(b.trainable, b.frozen, opt_state, batch).compile()
            compile_s[name] = time.perf_counter() - t
            cost = step.cost_analysis()
            cost = (cost[0] if isinstance(cost, list) else cost) or {}
            trainable, opt_state, m = step(b.trainable, b.frozen, opt_state, batch)
            jax.block_until_ready(m)
            built[name], steps[name], batches[name] = b, step, batch
            states[name] = (trainable, opt_state)
            flops[name] = step_flops(b.model.config, cfg.batch_size, cfg.seq_len, lora_rank=cfg.lora_rank,
                                     lora_mlp=cfg.lora_mlp, full=not cfg.lora_rank)
            flops[name]["real_tokens"] = int(host["lengths"].sum())
            # XLA's own count of the compiled step: an independent check of the formula, and the bytes
            flops[name]["xla_flops"] = float(cost.get("flops", float("nan")))
            flops[name]["xla_bytes"] = float(cost.get("bytes accessed", float("nan")))
            # the step's scratch (activations kept for the backward, temporaries): what remat trades
            memory = step.memory_analysis()
            flops[name]["xla_temp_bytes"] = float(getattr(memory, "temp_size_in_bytes", float("nan")))
            print(f"{name}: built and compiled in {compile_s[name]:.1f} s", flush=True)

        first = built[next(iter(built))]
        c = first.model.config
        rate = matmul_rate(first.cfg.batch_size * first.cfg.seq_len, c.d_model, c.mlp_dim)
        bandwidth = stream_bandwidth()
        # two predictions: matmul FLOPs at the matmul rate, and (no overlap) XLA's FLOPs at that rate
        # plus XLA's bytes accessed at the streaming bandwidth
        prediction = {n: flops[n]["total"] / (rate * 1e9) for n in variants}
        prediction_bytes = {n: flops[n]["xla_flops"] / (rate * 1e9) + flops[n]["xla_bytes"] / (bandwidth * 1e9)
                            for n in variants}
        print(f"measured fp32 matmul rate {rate:.1f} GFLOP/s, streaming {bandwidth:.1f} GB/s; predicted s/step "
              "(FLOPs only | FLOPs + bytes): "
              + ", ".join(f"{n} {prediction[n]:.2f} | {prediction_bytes[n]:.2f}" for n in variants), flush=True)

        faults = {n: [] for n in variants}

        def run(name):
            def go():
                before = resource.getrusage(resource.RUSAGE_SELF)
                trainable, opt_state = states[name]
                trainable, opt_state, m = steps[name](trainable, built[name].frozen, opt_state, batches[name])
                jax.block_until_ready(m)
                states[name] = (trainable, opt_state)
                # minor page faults: fresh pages the allocator hands the step (first touch zeroes them)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before.ru_minflt)
            return go

        times = reporting.interleaved_times({n: run(n) for n in variants}, args.turns)
        rows = {}
        for n in variants:
            b, ts = built[n], np.asarray(times[n])
            med = float(np.median(ts))
            rows[n] = {
                "overrides": variants[n], "batch_size": b.cfg.batch_size, "seq_len": b.cfg.seq_len,
                "lora_rank": b.cfg.lora_rank, "lora_mlp": b.cfg.lora_mlp, "span_policy": b.cfg.span_policy,
                "compile_s": compile_s[n], "step_s": reporting.spread(ts.tolist()), "all_step_s": ts.tolist(),
                "tokens_per_s_real": flops[n]["real_tokens"] / med,
                "tokens_per_s_padded": b.cfg.batch_size * b.cfg.seq_len / med,
                "padding_fraction": 1 - flops[n]["real_tokens"] / (b.cfg.batch_size * b.cfg.seq_len),
                "gflop_per_step": flops[n]["total"] / 1e9, "achieved_gflop_s": flops[n]["total"] / med / 1e9,
                "predicted_step_s": prediction[n], "measured_over_predicted": med / prediction[n],
                "xla_gflop_per_step": flops[n]["xla_flops"] / 1e9,
                "xla_gb_accessed_per_step": flops[n]["xla_bytes"] / 1e9,
                "predicted_step_s_flops_and_bytes": prediction_bytes[n],
                "measured_over_predicted_flops_and_bytes": med / prediction_bytes[n],
                "xla_temp_gb": flops[n]["xla_temp_bytes"] / 1e9,
                "minor_page_faults_per_step": reporting.spread(faults[n][-len(ts):]),
            }
        result = {
            "benchmark": "training step time, variants in turns",
            "model": first.cfg.model, "config_file": args.config, "common_overrides": common,
            "matmul_gflop_s": rate, "stream_gb_s": bandwidth, "rows": rows, "turns": args.turns,
            "load_average_1_5_15_at_start": load_start, "load_average_1_5_15_at_end": list(os.getloadavg()),
            "environment": reporting.environment(),
            "command": "python benchmarks/bench_train_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        path = reporting.write_json(result, os.path.join(args.out_dir, f"{args.name}.json"))
        head = ["variant", "batch x seq", "padding", "s/step (min / med / max)", "real tok/s", "GFLOP/step (XLA)",
                "GB accessed (XLA)", "scratch GB (XLA)", "page faults/step (median)", "predicted s/step: FLOPs; +bytes",
                "measured / predicted: FLOPs; +bytes"]
        print(reporting.markdown_table(head, [
            [n, f"{r['batch_size']} x {r['seq_len']}", f"{r['padding_fraction']:.0%}",
             f"{r['step_s']['min']:.2f} / {r['step_s']['median']:.2f} / {r['step_s']['max']:.2f}",
             f"{r['tokens_per_s_real']:.0f}", f"{r['gflop_per_step']:.0f} ({r['xla_gflop_per_step']:.0f})",
             f"{r['xla_gb_accessed_per_step']:.1f}", f"{r['xla_temp_gb']:.2f}",
             f"{r['minor_page_faults_per_step']['median']:.0f}",
             f"{r['predicted_step_s']:.2f}; {r['predicted_step_s_flops_and_bytes']:.2f}",
             f"{r['measured_over_predicted']:.2f}; {r['measured_over_predicted_flops_and_bytes']:.2f}"]
            for n, r in rows.items()]))
        print(f"wrote {path}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
