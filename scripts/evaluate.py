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

    python scripts/evaluate.py runs/default --baseline runs/dense  # the demo's comparison
    python scripts/evaluate.py runs/default                       # one model, both policies
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
    p.add_argument("--policies", default="self_span,dense", help="comma-separated policies of the run")
    p.add_argument("--baseline", default=None, metavar="RUN",
                   help="baseline run directory (same data, trained with --span-policy dense); ratios are "
                        "taken against it decoded with the first of --baseline-policies")
    p.add_argument("--baseline-step", type=int, default=None, help="checkpoint step of the baseline (default: latest)")
    p.add_argument("--baseline-policies", default="dense", help="comma-separated policies of the baseline")
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


def _split_policies(text: str) -> list[str]:
    policies = [p.strip() for p in text.split(",") if p.strip()]
    if not policies:
        raise ValueError(f"no policy in {text!r}")
    return policies


# fields that may differ between a run and its baseline without making the comparison unfair
_NOT_COMPARED = {"span_policy", "out", "progress", "tensorboard", "eval_batch_size", "log_every", "save_every",
                 "keep_checkpoints", "eval_every", "eval_generate", "export_merged"}


def build_rows(loaded, base, policies, baseline_policies):
    """The evaluation rows of a run (and of its baseline), the row ratios are taken against, and notes.

    Raises ValueError when the baseline was trained on another task or data
    than the run (its held-out records would not be the run's).
    """
    from selfspan_jax import evaluate as ev

    def trained(l):
        return (l.train_config or {}).get("span_policy", "pretrained")

    def row(l, policy, prefix=""):
        tw = trained(l)
        return ev.Row(f"{prefix}{'span' if tw == 'self_span' else tw}-trained/{policy}", l.model, l.tokenizer,
                      policy, trained_with=tw, source=l.source if l.step is None else f"{l.source} step {l.step}",
                      note=ev.ood_note(tw, policy))

    rows = [row(loaded, p) for p in policies]
    notes = []
    if base is None:
        dense = [r.name for r in rows if r.policy == "dense"]
        baseline = dense[0] if dense else None
        if baseline and trained(loaded) == "self_span":
            notes.append(f"ratios are against {baseline}: the same span-trained model decoded dense, an "
                         "out-of-distribution ablation; pass --baseline RUN for a dense-trained baseline")
        return rows, baseline, notes
    mine, theirs = loaded.train_config or {}, base.train_config or {}
    if base.task != loaded.task or theirs.get("data") != mine.get("data"):
        raise ValueError(f"baseline {base.source!r} was trained on task {base.task!r} with data "
                         f"{theirs.get('data')}, the run {loaded.source!r} on task {loaded.task!r} with data "
                         f"{mine.get('data')}: not the same held-out distribution")
    names = {r.name for r in rows}
    base_rows = [row(base, p) for p in baseline_policies]
    if names & {r.name for r in base_rows}:
        base_rows = [row(base, p, "baseline ") for p in baseline_policies]
    if trained(base) != "dense":
        notes.append(f"the baseline {base.source} was trained with {trained(base)!r}, not dense")
    differ = sorted(k for k in set(mine) | set(theirs) if k not in _NOT_COMPARED and mine.get(k) != theirs.get(k))
    if differ:
        notes.append("the run and its baseline also differ in: "
                     + ", ".join(f"{k} ({mine.get(k)!r} vs {theirs.get(k)!r})" for k in differ))
    return rows + base_rows, base_rows[0].name, notes


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
        base = None if args.baseline is None else ev.load_for_eval(args.baseline, step=args.baseline_step)
        rows, baseline, notes = build_rows(loaded, base, _split_policies(args.policies),
                                           _split_policies(args.baseline_policies))
        result = ev.evaluate_rows(
            rows, records, task=task, baseline=baseline, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, block_size=args.block_size, backend=args.backend,
            max_segments=max_segments, timing_repeats=args.repeats, timing_batch=args.timing_batch,
        )
    except ValueError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    result["config"].update(source=loaded.source, step=loaded.step, split=split, seed=args.seed, data=data,
                            baseline_source=None if base is None else base.source,
                            baseline_step=None if base is None else base.step)
    result["notes"] = notes
    result["environment"] = ev.environment()
    name = args.name or f"eval_{task}_{split}"
    json_path, md_path = ev.write_results(result, args.out_dir, name)
    print(ev.format_table(result))
    for line in notes:
        print(f"note: {line}")
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
