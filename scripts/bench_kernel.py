"""The kernel microbenchmark, under the name docs/spec.md §3 gives it: runs benchmarks/bench_kernel.py
with the same arguments (`python scripts/bench_kernel.py --help`)."""

import runpy
from pathlib import Path

if __name__ == "__main__":
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernel.py"), run_name="__main__")
