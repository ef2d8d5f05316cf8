#!/usr/bin/env python
"""Compile the decode kernels for an H100 (sm_90) on this CPU and report what the GPU would run.

For every config of the matrix in `kernel_tools/sm90.py` (LLaMA-7B MHA,
GQA 4 and 8, SmolLM2's G = 3; head dims 64/128; blocks 16-256; bf16, fp16,
fp32; with and without a token mask; the stacked cache; the token-list
kernel), the Triton module Pallas hands to XLA is captured from an export for
an abstract H100 and compiled by the pinned `triton` package in its own
virtual environment (created on first use from requirements-sm90.txt).
Reported per config: registers, spill bytes and shared memory (ptxas -v), the
number of shared-memory buffers of the K/V tiles and the async_wait depth in
the inner loop (the software pipeline), any blocking global load left in the
loop, and the split-K partial bytes against the K/V bytes at density 1/8.

    python tools/gpu/compile_kernel_sm90.py                 # the whole matrix
    python tools/gpu/compile_kernel_sm90.py --only gqa4 --keep /tmp/sm90   # + TTIR/TTGIR/PTX files

Writes benchmarks/results/kernel/kernel_sm90_compile.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def table(report: dict) -> str:
    from selfspan_jax import reporting

    head = ["config", "warps / stages", "regs", "spill B", "smem KiB", "K/V buffers", "wait depth",
            "blocking load in loop", "partials / KV at 1/8"]
    rows = []
    for k in report["kernels"]:
        if not k.get("ok"):
            rows.append([k["id"], "-", "-", "-", "-", "-", "-", "-", f"FAILS ({k['stage']}): {k['error'][:80]}"])
            continue
        traffic = k.get("traffic_density_1_8")
        rows.append([
            k["id"], f"{k['launch']['num_warps']} / {k['launch']['num_stages']}", k["registers"],
            k["spill_store_bytes"] + k["spill_load_bytes"], f"{k['shared_bytes'] / 1024:.1f}", k["kv_buffers"],
            "-" if k["async_wait_depth"] is None else k["async_wait_depth"],
            "yes" if k["blocking_load_in_loop"] else "no",
            f"{traffic['partials_over_kv']:.2f}" if traffic else "-",
        ])
    return reporting.markdown_table(head, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="compile_kernel_sm90.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[], help="keep configs whose id contains this (repeatable)")
    p.add_argument("--venv", default=None, help="the triton environment (default .venv-sm90, created if missing)")
    p.add_argument("--keep", default=None, help="directory for the TTIR, TTGIR and PTX of every config")
    p.add_argument("--out", default="benchmarks/results/kernel/kernel_sm90_compile.json")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from kernel_tools import sm90
    from selfspan_jax import reporting

    configs = [c for c in sm90.CONFIGS if not args.only or any(s in c.id for s in args.only)]
    if not configs:
        print(f"compile_kernel_sm90.py: error: no config id contains any of {args.only}", file=sys.stderr)
        return 2
    with reporting.reserved_output(args.out, overwrite=args.overwrite, prog="compile_kernel_sm90.py"):
        t0 = time.perf_counter()
        report = sm90.compile_configs(configs, venv=args.venv or sm90.DEFAULT_VENV, keep=args.keep)
        report["wall_s"] = time.perf_counter() - t0
        report["environment"] = reporting.environment()
        report["command"] = "python tools/gpu/compile_kernel_sm90.py " + " ".join(argv if argv is not None
                                                                                else sys.argv[1:])
        path = reporting.write_json(report, args.out)
    print(table(report))
    failed = [k["id"] for k in report["kernels"] if not k.get("ok")]
    print(f"{len(report['kernels']) - len(failed)} of {len(report['kernels'])} configs compiled for sm_90 "
          f"(triton {report['triton_version']}) in {report['wall_s']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
