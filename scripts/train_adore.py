"""Distil an ADORE controller from a trained run's own dense attention (`selfspan_jax.adore_train`).

`python scripts/train_adore.py --help` lists the options; the code is `selfspan_jax/cli/train_adore.py`.
"""

import sys

from selfspan_jax.cli.train_adore import main

if __name__ == "__main__":
    sys.exit(main())
