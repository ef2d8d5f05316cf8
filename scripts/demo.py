"""The main job: train the tiny model on arithmetic on the CPU with and without spans, then compare them.

`python scripts/demo.py --help` lists the options; the code is `selfspan_jax/cli/demo.py`.
"""

import sys

from selfspan_jax.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
