#!/usr/bin/env python
"""Evaluate a trained run (or a model source) dense vs self-selected spans on held-out data.

Thin wrapper over `selfspan_jax.evaluate`: loads the model(s), draws the held-out
records, runs every (model, policy) row on them in one process, prints a
markdown table and writes <out-dir>/<name>.json and .md.

With `--baseline RUN` (a run trained on the same data with `--span-policy
dense`), the rows are the run under each of --policies and the baseline under
--baseline-policies, and every ratio is taken against the baseline decoded
dense: the paper's comparison. Without it, ratios are against the run itself
decoded dense, which for a model trained only under span masks is an
out-of-distribution ablation, not a baseline.

An evaluation killed part way keeps its finished rows in <out-dir>/.<name>.rows/
(deleted once the results are written); the same command again decodes only
the missing rows and times every row again.

    python scripts/evaluate.py runs/default --baseline runs/dense  # the demo's comparison
    python scripts/evaluate.py runs/default                       # one model, both policies
    python scripts/evaluate.py runs/default --split harder --num 128
    python scripts/evaluate.py runs/smollm2 --backend pallas --block-size 64   # on a GPU
"""

from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--policies", default="self_span,dense",
                   help="comma-separated policies of the run: dense, self_span, quest, sparq, or with settings "
                        "quest(page_budget=3), sparq(r=8,k=16,local_window=4)")
    p.add_argument("--baseline", default=None, metavar="RUN",
                   help="baseline run directory (same data, trained with --span-policy dense); ratios are "
                        "taken against it decoded with the first of --baseline-policies")
    p.add_argument("--baseline-step", type=int, default=None,
                   help="checkpoint step of the baseline (default: latest; only with --baseline)")
    p.add_argument("--baseline-policies", default=None,
                   help="comma-separated policies of the baseline (default: dense; only with --baseline)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: longest reference + 16")
    p.add_argument("--block-size", type=int, default=16, help="KV block size of the kernel (>= 16 for pallas)")
    p.add_argument("--backend", default="auto", help="kernel backend: auto | pallas | interpret | mosaic | mosaic_interpret | xla | reference")
    p.add_argument("--max-segments", type=int, default=None, help="default: the run's")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (median) after one warm-up")
    p.add_argument("--timing-batch", type=int, default=None, help="batch used for timing (default: --batch-size)")
    p.add_argument("--out-dir", default="benchmarks/results/training")
    p.add_argument("--name", default=None, help="file stem of the results (default: eval_<task>_<split>)")
    p.add_argument("--overwrite", action="store_true", help="replace <out-dir>/<name>.{json,md} if they exist")
    p.add_argument("--heatmap", default=None, metavar="PNG", help="also draw the span heat map of the first example")
    p.add_argument("--zero-shot", action="store_true",
                   help="ask the source zero-shot instead: the task's question in words (through the tokenizer's "
                        "chat template), decoded dense and scored on its plain reply (a pretrained model's row; "
                        "not with --policies or --baseline)")
    return p


def _split_policies(text: str) -> list[str]:
    from selfspan_jax.policies import split_policy_specs

    policies = split_policy_specs(text)
    if not policies:
        raise ValueError(f"no policy in {text!r}")
    return policies


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from selfspan_jax import evaluate as ev
    from selfspan_jax import tables
    from selfspan_jax.finished_rows import FinishedRows
    from selfspan_jax.train_config import parse_key_value

    try:
        if args.zero_shot and args.baseline is not None:
            raise ValueError("--zero-shot scores the source alone; it takes no --baseline")
        if args.zero_shot and args.policies != build_parser().get_default("policies"):
            raise ValueError("--zero-shot decodes dense (the model never saw span headers); it takes no --policies")
        policies = [] if args.zero_shot else _split_policies(args.policies)
        baseline_policies = None if args.baseline_policies is None else _split_policies(args.baseline_policies)
        data = dict(parse_key_value(item) for item in args.data)
        loaded = ev.load_for_eval(args.source, step=args.step)  # once: the table and the heat map share it
        name = args.name or "eval_{}_{}".format(*ev.task_and_split(loaded, args.task, args.split))
        with tables.reserved_results(args.out_dir, name, overwrite=args.overwrite) as out_dir:
            finished = FinishedRows(out_dir / f".{name}.rows")  # rows of a killed run of this command
            result = ev.compare(
                loaded, baseline=args.baseline, baseline_step=args.baseline_step, task=args.task,
                split=args.split, data=data, num=args.num, seed=args.seed, policies=policies,
                baseline_policies=baseline_policies, max_segments=args.max_segments, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, block_size=args.block_size, backend=args.backend,
                timing_repeats=args.repeats, timing_batch=args.timing_batch, finished=finished,
                zero_shot=loaded if args.zero_shot else None,
            )
            print(tables.format_table(result))  # before writing: a failed write keeps the table
            for line in result["notes"]:
                print(f"note: {line}")
            try:
                json_path, md_path = tables.write_results(result, args.out_dir, name)
            except OSError as err:
                print(f"evaluate.py: error: could not write the results to {args.out_dir}: {err}", file=sys.stderr)
                return 1
            finished.discard()
    except ValueError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    cfg = result["config"]
    print(f"\nwrote {json_path} and {md_path}")
    if args.heatmap:
        _, _, _, records = ev.held_out_records(loaded, 1, seed=args.seed, task=cfg["task"], split=cfg["split"],
                                               data=cfg["data"])
        path, _ = ev.span_heatmap(loaded, records[0], args.heatmap, block_size=args.block_size, backend=args.backend)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
