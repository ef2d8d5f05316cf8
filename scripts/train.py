"""Train a model on span-annotated data. `python scripts/train.py --help` lists every flag.

`python scripts/train.py --help` lists the options; the code is `selfspan_jax/cli/train.py`.
"""

import sys

from selfspan_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
