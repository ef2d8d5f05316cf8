"""Show span-annotated examples and their oracle attention density.

`python scripts/inspect_data.py --help` lists the options; the code is `selfspan_jax/cli/inspect_data.py`.
"""

import sys

from selfspan_jax.cli.inspect_data import main

if __name__ == "__main__":
    sys.exit(main())
