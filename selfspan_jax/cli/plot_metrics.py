#!/usr/bin/env python
"""Loss / accuracy curves of one or more runs from their metrics.jsonl.

    python scripts/plot_metrics.py runs/default                   # -> runs/default/curves.png
    python scripts/plot_metrics.py runs/a runs/b --out cmp.png    # overlay several runs

Left panel: training loss (per logged step) and held-out teacher-forced loss.
Right panel: held-out token accuracy and exact-match accuracy (when logged).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def plot(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on CI or the GPU machine
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run in enumerate(run_dirs):
        train, evals = load(run)
        name, color = run.name, f"C{i}"  # one colour per run, line style per metric
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, lw=1, alpha=0.6,
                         label=f"{name} train")
        if evals:
            steps = [r["step"] for r in evals]
            ax_loss.plot(steps, [r["eval_loss"] for r in evals], "o-", color=color, label=f"{name} held-out")
            ax_acc.plot(steps, [r["eval_token_acc"] for r in evals], "s--", color=color, label=f"{name} token acc")
            em = [(r["step"], r["eval_exact_match"]) for r in evals if "eval_exact_match" in r]
            if em:
                ax_acc.plot(*zip(*em), "o-", color=color, lw=2, label=f"{name} exact match")
    ax_loss.set(xlabel="step", ylabel="loss (nats / completion token)", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", ylim=(0, 1.02), title="held-out accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
    parser.add_argument("--out", type=Path, help="PNG path (default: RUN/curves.png of the first run)")
    args = parser.parse_args(argv)
    try:
        out = plot(args.runs, args.out or args.runs[0] / "curves.png")
    except ValueError as err:
        print(f"plot_metrics.py: error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
