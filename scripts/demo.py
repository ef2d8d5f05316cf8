#!/usr/bin/env python
"""The main job: train the tiny model on arithmetic on the CPU, then evaluate it dense vs self-span.

    python scripts/demo.py                 # train runs/default (training's defaults), evaluate, print the table
    python scripts/demo.py --skip-train    # evaluate an existing runs/default only

Step 1 is exactly `scripts/train.py` with its defaults (tiny model, step-by-step
arithmetic with span headers, about ten minutes on an idle 2-core CPU; running
it again resumes or reuses the finished run). Step 2 is `scripts/evaluate.py`
on that run: held-out problems generated greedily with dense attention and
with the self-selected spans, the accuracy of both, the fraction of the
context each generated token attended to, the fraction of KV-cache bytes read,
and tokens/s; results go to benchmarks/results/demo.{json,md}. Step 3 draws the
span heat map of one example (benchmarks/results/demo_spans.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/default", help="training run directory")
    p.add_argument("--skip-train", action="store_true", help="evaluate the existing run only")
    p.add_argument("--num", type=int, default=256, help="held-out problems to evaluate")
    p.add_argument("--results", default="benchmarks/results", help="where the table and picture go")
    args = p.parse_args(argv)

    import evaluate as evaluate_script
    import plot_spans
    import train as train_script

    from selfspan_jax import train as train_lib

    if not args.skip_train:
        cfg = train_lib.DEFAULT.replace(out=args.out)
        done = (Path(args.out) / "checkpoints" / str(cfg.steps)).is_dir()
        if done:
            print(f"[demo] {args.out} already holds the finished run (step {cfg.steps}); skipping training")
        else:
            print(f"[demo] training the tiny model on arithmetic -> {args.out} (resumes if interrupted)")
            rc = train_script.main(["--out", args.out])
            if rc:
                return rc
    print("[demo] evaluating dense vs self_span on held-out problems")
    rc = evaluate_script.main([args.out, "--num", str(args.num), "--out-dir", args.results, "--name", "demo"])
    if rc:
        return rc
    return plot_spans.main([args.out, "--out", str(Path(args.results) / "demo_spans.png")])


if __name__ == "__main__":
    sys.exit(main())
