"""The kernel microbenchmark: density x block size x context x batch against all blocks and
`jax.nn.dot_product_attention` (`--help`; the code is `selfspan_jax/cli/bench_kernel.py`, which the
notebook calls too)."""

import sys

from selfspan_jax.cli.bench_kernel import main

if __name__ == "__main__":
    main()
    sys.exit(0)
