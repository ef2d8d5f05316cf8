#!/usr/bin/env python
"""Heat map of the self-selected spans of one generated example (PNG).

    python scripts/plot_spans.py runs/default --out benchmarks/results/training/spans_arithmetic.png

Loads a run (or model source), generates one held-out example greedily with the
self_span policy and draws which earlier positions every generated token could
see, with segments (anchors), headers and the end of the prompt marked.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="plot_spans.py", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="training run directory or model source")
    p.add_argument("--out", default="benchmarks/results/training/spans_arithmetic.png")
    p.add_argument("--split", default="test", help="arithmetic held-out split")
    p.add_argument("--index", type=int, default=0, help="which held-out example")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE", help="arithmetic Difficulty knob")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = p.parse_args(argv)
    from selfspan_jax import reporting

    with reporting.reserved_output(args.out, overwrite=args.overwrite, option="--out", prog="plot_spans.py"):

        from selfspan_jax import evaluate as ev
        from selfspan_jax.train_config import parse_key_value

        try:
            loaded = ev.load_for_eval(args.source)
            _, _, _, records = ev.held_out_records(loaded, args.index + 1, seed=args.seed, task="arithmetic",
                                                   split=args.split, data=dict(parse_key_value(d) for d in args.data))
            path, out = ev.span_heatmap(loaded, records[-1], args.out)
        except ValueError as err:
            print(f"plot_spans.py: error: {err}", file=sys.stderr)
            return 2
        print(f"{out['title']}\ngenerated: {out['text']!r}\n"
              f"attended fraction {out['summary']['mean_attended_fraction']:.3f}"
              f"\nwrote {path}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
