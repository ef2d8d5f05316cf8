"""Loss / accuracy curves of one or more runs from their metrics.jsonl.

`python scripts/plot_metrics.py --help` lists the options; the code is `selfspan_jax/cli/plot_metrics.py`.
"""

import sys

from selfspan_jax.cli.plot_metrics import main

if __name__ == "__main__":
    sys.exit(main())
