#!/usr/bin/env python
"""Distil an ADORE controller from a trained run's own dense attention (`selfspan_jax.adore_train`).

    python scripts/train_adore.py --run runs/long_dense            # -> runs/long_dense/adore
    python scripts/compare_policies.py --run RUN ... --policies "adore(budget=64,rebuild=4)"  # finds it there

Flags are the fields of `adore_train.DistillConfig`. Running the same command again resumes from the
latest checkpoint in --out; metrics.jsonl there can be plotted with scripts/plot_metrics.py.
"""

import argparse
import dataclasses
import json
import sys

from selfspan_jax import adore_train
from selfspan_jax.checkpoint import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_adore.py", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(adore_train.DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} (default: {f.default!r})"
        if f.type in (bool, "bool"):
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=kind, default=f.default, metavar=f.name.upper(), help=text)
    return p


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        cfg = adore_train.DistillConfig(**args)
        metrics = adore_train.distill(cfg)
    except (ValueError, CheckpointError, FloatingPointError) as err:
        print(f"train_adore.py: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(cfg.out_dir), **metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
