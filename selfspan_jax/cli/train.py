#!/usr/bin/env python
"""Train a model on span-annotated data. `python scripts/train.py --help` lists every flag.

Thin wrapper: flags -> `selfspan_jax.train_config.TrainConfig` -> `selfspan_jax.train.train`.
Running the same command again resumes the run in --out from its latest checkpoint.
"""

import json
import sys

from selfspan_jax import train as train_lib
from selfspan_jax.train_config import config_from_args


def main(argv=None) -> int:
    try:
        cfg, print_only = config_from_args(argv)
    except ValueError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    if print_only:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        result = train_lib.train(cfg)
    except (ValueError, train_lib.TrainingDiverged) as err:  # runs.RunDirLocked is a ValueError
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"run_dir": str(result.run_dir), "step": result.step, "wall_s": round(result.wall_s, 1),
                      **result.final_eval}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
