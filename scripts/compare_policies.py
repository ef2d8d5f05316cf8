#!/usr/bin/env python
"""Which way of reading less KV cache: self-selected spans against training-free Quest and SparQ, one table.

    python scripts/compare_policies.py                       # the default demo pair (runs/default, runs/dense)
    python scripts/compare_policies.py --run runs/long --baseline runs/long_dense \\
        --data min_operands=16 --data max_operands=18 --name policies_compare_long

Rows, all on the same held-out problems, loop and kernels: the span-trained
run decoded with its own spans (self_span), and the dense-trained baseline
decoded dense, with Quest at several page budgets and with SparQ at several
(r, k). Every row reports exact match, the attended fraction, the fraction of
KV bytes read, tokens/s and its ratio to the dense baseline (timed in turns).
Writes <out-dir>/<name>.{json,md} (rows keyed `<model>/<policy>`, each with
its policy, settings and numbers) and <name>.png (accuracy against the
fraction of KV bytes read, one curve per method).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from selfspan_jax import evaluate as ev
from selfspan_jax.policies import make_policy, split_policy_specs
from selfspan_jax.train_config import parse_key_value


def default_sweep(head_dim: int) -> list[str]:
    """Quest at 2-4 pages; SparQ at r = H/4 with k = 8, 16, 32 and at r = H/8 with k = 16."""
    quest = [f"quest(page_budget={p})" for p in (2, 3, 4)]
    r4, r8 = max(1, head_dim // 4), max(1, head_dim // 8)
    sparq = [f"sparq(r={r4},k={k},local_window=4)" for k in (8, 16, 32)] + [f"sparq(r={r8},k=16,local_window=4)"]
    return quest + sparq


def settings(spec: str) -> dict:
    pol = make_policy(spec) if spec not in ("dense", "self_span") else None
    return {} if pol is None else dataclasses.asdict(pol)


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[float, float]]] = {}
    for m in result["rows"].values():
        method = m["policy"].split("(")[0] + (f" r={m['settings']['r']}" if "r" in m.get("settings", {}) else "")
        curves.setdefault(method, []).append((m["kv_read_fraction"], m["exact_match"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, pts in sorted(curves.items()):
        pts.sort()
        style = "o-" if len(pts) > 1 else {"dense": "s", "self_span": "*"}.get(method, "D")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method, markersize=8 if len(pts) == 1 else 5)
    ax.set_xlabel("fraction of KV bytes read")
    ax.set_ylabel("exact match (%)")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"{result['config']['num_records']} held-out {result['config']['task']} problems "
                 f"({result['config']['split']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="compare_policies.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/default", help="span-trained run (decoded with self_span)")
    p.add_argument("--baseline", default="runs/dense", help="dense-trained run (dense, Quest, SparQ)")
    p.add_argument("--policies", default=None,
                   help="baseline policies after dense, e.g. 'quest(page_budget=2),sparq(r=8,k=16)' "
                        "(default: Quest at 2-4 pages, SparQ at r=H/4 with k=8/16/32 and r=H/8 with k=16)")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE", help="held-out data option")
    p.add_argument("--split", default=None)
    p.add_argument("--num", type=int, default=256)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed turns per row (median)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--name", default="policies_compare")
    args = p.parse_args(argv)
    try:
        head_dim = ev.load_for_eval(args.baseline).model.config.head_dim
        policies = split_policy_specs(args.policies) if args.policies else default_sweep(head_dim)
        result = ev.compare(args.run, baseline=args.baseline, policies=["self_span"],
                            baseline_policies=["dense", *policies], split=args.split,
                            data=dict(parse_key_value(d) for d in args.data), num=args.num, seed=args.seed,
                            block_size=args.block_size, batch_size=args.batch_size, timing_repeats=args.repeats)
    except ValueError as err:
        print(f"compare_policies.py: error: {err}", file=sys.stderr)
        return 2
    for name, m in result["rows"].items():
        m["settings"] = settings(m["policy"])
        m["tokens_per_s"] = m["timing"]["tokens_per_s"]
        m["tokens_per_s_vs_dense"] = result["vs_baseline"][name]["tokens_per_s"]
    result["command"] = "python scripts/compare_policies.py " + " ".join(argv if argv is not None else sys.argv[1:])
    json_path, md_path = ev.write_results(result, args.out_dir, args.name)
    png = plot(result, Path(args.out_dir) / f"{args.name}.png")
    print(ev.format_table(result))
    print(f"\nwrote {json_path}, {md_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
