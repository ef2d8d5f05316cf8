#!/usr/bin/env python
"""On a GPU: does what XLA compiled for the decode kernels match the offline sm_90 compile?

Runs a few configs of `kernel_tools.sm90.CONFIGS` with XLA dumping its PTX,
finds each Triton kernel's entry in the dump, runs the GPU image's ptxas
(from its triton package) on it, and puts registers, spills and the
`cp.async.wait_group` depths next to the committed offline numbers
(benchmarks/results/kernel/kernel_sm90_compile.json). Run by
tools/gpu/gpu_session.sh. First run 2026-12-04 (H200, jax 0.11.2): XLA's dump held no top-level
*.ptx; the Pallas calls left only per-module folders (`module_NNNN.jit_call/module.mlir`). The
search now walks the folders too, and a row that finds no PTX lists what the kernel's module
folder holds, so the next visit can see where (or whether) jaxlib writes it.

    python3 tools/gpu/gpu_ptx_check.py --out $OUT/ptx_check.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
CHECKED = ["block-gqa4-H128-bs64-bf16-mask", "block-llama7b_mha-H128-bs64-bf16-mask",
           "block-smollm2_g3-H64-bs16-bf16-mask", "block-gqa4-H128-bs128-bf16", "token-gqa4-H128-bs16-bf16-L4"]


def entry_ptx(ptx: str, name: str) -> str | None:
    """The PTX of one `.entry` function (up to the next one), or None."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\b", ptx)
    if not m:
        return None
    nxt = re.search(r"\.entry\s+", ptx[m.end():])
    return ptx[m.start(): m.end() + nxt.start() if nxt else len(ptx)]


def ptx_files(dump: str) -> list[str]:
    """Files anywhere under the dump that hold PTX: *.ptx, or any text with a `.target sm_` line and an
    `.entry` (where XLA puts the PTX has moved between versions; the first visit found no *.ptx)."""
    found = []
    for path in glob.glob(os.path.join(dump, "**", "*"), recursive=True):
        if not os.path.isfile(path) or os.path.getsize(path) > 64 << 20:
            continue
        if path.endswith(".ptx"):
            found.append(path)
            continue
        with open(path, errors="replace") as f:
            text = f.read()
        if ".target sm_" in text and ".entry" in text:
            found.append(path)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="ptx_check.json")
    args = p.parse_args(argv)
    dump = tempfile.mkdtemp(prefix="xla_dump_")
    # --xla_dump_hlo_as_text makes the GPU compiler's own dumps (HLO, and PTX beside it) certain to be
    # asked for; the first visit's plain --xla_dump_to left only PJRT's per-module MLIR folders.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_dump_to={dump} --xla_dump_hlo_as_text --xla_gpu_dump_llvmir").strip()
    import jax
    import jax.numpy as jnp

    from kernel_tools import sm90
    from kernel_tools.sm90_worker import ptx_report, ptxas_entry, ptxas_report, ptxas_verbose

    with open(os.path.join(ROOT, "benchmarks/results/kernel/kernel_sm90_compile.json")) as f:
        offline = {k["id"]: k for k in json.load(f)["kernels"]}
    configs = {c.id: c for c in sm90.CONFIGS}
    rows = []
    for cid in CHECKED:
        config = configs[cid]
        args_ = [jnp.zeros(a.shape, a.dtype) for a in config.avals()]
        kernel = sm90.capture_triton_kernels(config.fn(), *config.avals())[0]
        before = set(ptx_files(dump))
        jax.block_until_ready(jax.jit(config.fn())(*args_))
        found = None
        for path in sorted(set(ptx_files(dump)) - before) or sorted(before):
            text = open(path).read()
            found = entry_ptx(text, kernel.name)
            if found:
                break
        row = {"id": cid, "kernel_name": kernel.name, "offline": {k: offline.get(cid, {}).get(k) for k in (
            "registers", "spill_store_bytes", "spill_load_bytes", "ptx_wait_groups", "shared_bytes")}}
        if found is None:
            row["error"] = f"no .entry {kernel.name} in the PTX XLA dumped to {dump}"
            holders = [q for q in glob.glob(os.path.join(dump, "**", "*"), recursive=True)
                       if os.path.isfile(q) and kernel.name in open(q, errors="replace").read()]
            row["files_naming_the_kernel"] = sorted(os.path.relpath(q, dump) for q in holders)[:20]
            row["module_folders"] = {os.path.relpath(d, dump): sorted(os.listdir(d))[:20]
                                     for d in {os.path.dirname(q) for q in holders} if d != dump}
            row["ptx_entries_seen"] = sorted({e for q in ptx_files(dump) for e in re.findall(
                r"\.entry\s+(\w+)", open(q, errors="replace").read())})[:60]
        else:
            try:
                used, out = ptxas_verbose(path)  # the whole dumped module; read this kernel's part
                row["xla"] = {**ptxas_report(ptxas_entry(out, kernel.name)), **ptx_report(found), "ptxas": used}
            except RuntimeError as err:
                row["xla"] = {**ptx_report(found), "ptxas_error": str(err)[:500]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"device": str(jax.devices()[0]), "jax_version": jax.__version__, "rows": rows,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "dump_files": sorted(os.path.relpath(q, dump) for q in glob.glob(
                  os.path.join(dump, "**", "*"), recursive=True) if os.path.isfile(q))[:400],
              "note": "XLA's own Triton vs pinned triton offline; equal wait depths mean the same pipeline"}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
