"""Heat map of the self-selected spans of one generated example (PNG).

`python scripts/plot_spans.py --help` lists the options; the code is `selfspan_jax/cli/plot_spans.py`.
"""

import sys

from selfspan_jax.cli.plot_spans import main

if __name__ == "__main__":
    sys.exit(main())
