"""Which way of reading less KV cache: self-selected spans against Quest, SparQ and ADORE, one table.

`python scripts/compare_policies.py --help` lists the options; the code is `selfspan_jax/cli/compare_policies.py`.
"""

import sys

from selfspan_jax.cli.compare_policies import main

if __name__ == "__main__":
    sys.exit(main())
