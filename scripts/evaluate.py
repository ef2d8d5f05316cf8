"""Evaluate a trained run (or a model source) dense vs self-selected spans on held-out data.

`python scripts/evaluate.py --help` lists the options; the code is `selfspan_jax/cli/evaluate.py`.
"""

import sys

from selfspan_jax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
