#!/usr/bin/env python
"""Evaluate a trained run (or a model source) dense vs self-selected spans on held-out data.

Thin wrapper over `selfspan_jax.evaluate`: loads the model, draws the held-out
records, runs every policy on them in one process, prints a markdown table and
writes <out-dir>/<name>.json and .md.

    python scripts/evaluate.py runs/default                       # the demo's run
    python scripts/evaluate.py runs/default --split harder --num 128
    python scripts/evaluate.py runs/smollm2 --backend pallas --block-size 64   # on a GPU
"""

from __future__ import annotations

import argparse
import sys

import yaml


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="training run directory (config.yaml + checkpoints/), or a model source for "
                                  "weights.load_model (smollm2-135m, a .gguf file, an HF checkpoint directory)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: latest)")
    p.add_argument("--task", choices=("arithmetic", "summarization"), default=None,
                   help="task (default: the run's task; arithmetic for a plain model source)")
    p.add_argument("--split", default=None, help="held-out split (arithmetic: test|harder|longer|deeper, "
                                                 "default test; summarization: default validation)")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="data option (arithmetic Difficulty knob, or summarization source=PATH); default: the run's")
    p.add_argument("--num", type=int, default=256, help="held-out records")
    p.add_argument("--seed", type=int, default=12345, help="seed of the held-out sample")
    p.add_argument("--policies", default="dense,self_span", help="comma-separated policies")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 16")
    p.add_argument("--block-size", type=int, default=16, help="KV block size of the kernel (>= 16 for pallas)")
    p.add_argument("--backend", default="auto", help="kernel backend: auto | pallas | interpret | xla | reference")
    p.add_argument("--max-segments", type=int, default=None, help="default: the run's")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median) after one warm-up")
    p.add_argument("--timing-batch", type=int, default=None, help="batch used for timing (default: --batch-size)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default=None, help="file stem of the results (default: eval_<task>_<split>)")
    p.add_argument("--heatmap", default=None, metavar="PNG", help="also draw the span heat map of the first example")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from selfspan_jax import evaluate as ev

    try:
        loaded = ev.load_for_eval(args.source, step=args.step)
        cfg = loaded.train_config or {}
        task = args.task or loaded.task or "arithmetic"
        data = dict(cfg.get("data", {})) if cfg.get("task") == task else {}
        for item in args.data:
            if "=" not in item:
                raise ValueError(f"--data expects KEY=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            data[key.strip()] = yaml.safe_load(value)
        split = args.split or ("test" if task == "arithmetic" else "validation")
        records = ev.held_out_records(task, args.num, seed=args.seed, split=split, data=data,
                                      tokenizer=loaded.tokenizer)
        max_segments = args.max_segments or loaded.max_segments
        result = ev.evaluate_policies(
            loaded.model, loaded.tokenizer, records, task=task, policies=args.policies.split(","),
            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, block_size=args.block_size,
            backend=args.backend, max_segments=max_segments, timing_repeats=args.repeats,
            timing_batch=args.timing_batch,
        )
    except ValueError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    result["config"].update(source=loaded.source, step=loaded.step, split=split, seed=args.seed, data=data)
    result["environment"] = ev.environment()
    name = args.name or f"eval_{task}_{split}"
    json_path, md_path = ev.write_results(result, args.out_dir, name)
    print(ev.format_table(result))
    print(f"\nwrote {json_path} and {md_path}")
    if args.heatmap:
        from selfspan_jax.spans import SpanTokens
        from selfspan_jax.viz import plot_span_heatmap

        out = ev.generate_one(loaded.model, loaded.tokenizer, records[0], max_segments=max_segments,
                              block_size=args.block_size, backend=args.backend)
        path = plot_span_heatmap(out["tokens"], out["prompt_length"], args.heatmap,
                                 span_tokens=SpanTokens.from_tokenizer(loaded.tokenizer), max_segments=max_segments,
                                 tokenizer=loaded.tokenizer, title=out["title"])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
