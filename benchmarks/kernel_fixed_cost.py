#!/usr/bin/env python
"""Where the block-sparse kernel's fixed cost per call goes (docs/notes/kernel.md).

The first GPU visit found ~20-45 µs per call that does not scale with the bytes read: GQA at B = 1,
T = 8k took 48 µs at density 1/8 and 52 µs with every block, where 4 MB at the copy bandwidth is
~1.5 µs. This script measures time against the number of live blocks per sequence, n = 0, 1, 2, 4,
... NB, and fits t(n) = t0 + n * slope for each of:

  harness     the timing harness alone (q + j per call, nothing else): subtracted from the rest
  op          block_sparse_decode as users call it (list clamps, q pad, pallas_call, split combine)
  op_ks1      the same with k_splits = 1 (no split-K: B * K programs)
  kernel      the pallas_call alone on prepared inputs (q pad fused into the harness's add):
              op - kernel is what the XLA ops around the kernel cost (Triton backends; the
              Mosaic op at k_splits = 1 is its kernel alone, so it has no such row)
  dpa         jax.nn.dot_product_attention over the whole cache (one point, for scale)

and reports how many device kernels each executable launches per call (the optimized HLO's
ENTRY instructions that are not parameters, constants, tuples or bitcasts). Timing is
bench_kernel's: U unrolled calls in one executable on distinct q, rotating over cache copies
bigger than the L2.

    python3 benchmarks/kernel_fixed_cost.py --out $OUT/kernel_fixed_cost.json          # GPU (Triton)
    python3 benchmarks/kernel_fixed_cost.py --backend mosaic --out $OUT/k.json        # GPU (Mosaic: op, op_ks1)
    .venv/bin/python benchmarks/kernel_fixed_cost.py --backend interpret --quick       # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_sparse_decode
from pallas_kernels.backend import MOSAIC_BACKENDS, BlockSparseParams, on_gpu, resolve_backend
from pallas_kernels.block_sparse_decode import _pallas_partials
from selfspan_jax import reporting
from selfspan_jax.kernel_bench import (HEADS, bytes_read, copy_bandwidth, fit_line, launched_ops, random_caches,
                                       random_lists, time_executable, unrolled)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def run_group(rng, heads, batch, context, block_size, counts, dtype, backend, reps, unroll_min, rotate_bytes, log,
              copies=None):
    num_heads, kv_heads, head_dim = heads
    group_size = num_heads // kv_heads
    num_blocks = context // block_size
    itemsize = jnp.dtype(dtype).itemsize
    cache_bytes = 2 * batch * kv_heads * context * head_dim * itemsize
    copies_n = copies or int(min(4, max(1, math.ceil(rotate_bytes / cache_bytes))))
    unroll = max(unroll_min, copies_n)
    q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim)), dtype)
    caches = random_caches(rng, (batch, kv_heads, context, head_dim), dtype, copies_n)
    interpret = backend == "interpret"
    mosaic = backend in MOSAIC_BACKENDS
    sm_scale = 1 / math.sqrt(head_dim)

    def per_call(run, copies, rest):
        """(median, min) seconds per call of `run`, an `unrolled` executable of `unroll` calls."""
        med, mn = time_executable(run, (q, copies, rest), reps)
        return med / unroll, mn / unroll

    def kernel_only(q_, k_, v_, idx, cnt):
        # The public op's prelude done outside: [B, K, L] / [B, K] lists, a unit layer stack.
        qg = q_.reshape(batch, kv_heads, group_size, head_dim)
        return _pallas_partials(qg, k_[None], v_[None], jnp.int32(0), idx, cnt, None, block_size=block_size,
                                sm_scale=sm_scale, params=BlockSparseParams(), precision=None, interpret=interpret)[:3]

    result = dict(num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim, batch=batch, context=context,
                  block_size=block_size, num_blocks=num_blocks, dtype=str(jnp.dtype(dtype)), unroll=unroll,
                  cache_copies=copies_n, points=[])
    med, mn = per_call(unrolled(lambda q_, k_, v_: q_, unroll), caches, ())
    result["harness"] = dict(median_us=med * 1e6, min_us=mn * 1e6)
    dpa = lambda q_, k_, v_: jax.nn.dot_product_attention(q_[:, None], k_, v_)[:, 0]  # noqa: E731
    bshd = [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)) for k, v in caches]
    med, mn = per_call(unrolled(dpa, unroll), bshd, ())
    result["dpa_all_blocks"] = dict(median_us=med * 1e6, min_us=mn * 1e6)
    del bshd
    variants = {
        "op": functools.partial(block_sparse_decode, block_size=block_size, backend=backend),
        "op_ks1": functools.partial(block_sparse_decode, block_size=block_size, backend=backend, k_splits=1),
    }
    if not mosaic:  # the Mosaic op at k_splits = 1 is its kernel alone (launched_ops shows it)
        variants["kernel"] = kernel_only
    runs = {name: unrolled(op, unroll) for name, op in variants.items()}  # one compile each, reused at every n
    for n in counts:
        if n > num_blocks:
            continue
        if n == 0:
            idx = jnp.zeros((batch, num_blocks), jnp.int32)
            cnt = jnp.zeros((batch,), jnp.int32)
        else:
            idx, cnt = random_lists(rng, batch, num_blocks, n, block_size)
        idx3 = jnp.broadcast_to(idx[:, None, :], (batch, kv_heads, idx.shape[-1])).astype(jnp.int32)
        cnt2 = jnp.broadcast_to(cnt[:, None], (batch, kv_heads)).astype(jnp.int32)
        point = dict(live_blocks=n, density=n / num_blocks,
                     bytes=bytes_read(batch, kv_heads, head_dim, n * block_size, num_heads, itemsize))
        t0 = time.perf_counter()
        for name in variants:
            rest = (idx3, cnt2) if name == "kernel" else (idx, cnt)
            med, mn = per_call(runs[name], caches, rest)
            point[name] = dict(median_us=med * 1e6, min_us=mn * 1e6)
        result["points"].append(point)
        log(f"N{num_heads}/K{kv_heads} B={batch:<2} n={n:<4} " + "  ".join(
            f"{name} {point[name]['median_us']:8.1f}" for name in variants) + f" µs  ({time.perf_counter() - t0:.1f}s)")
    ns = [p["live_blocks"] for p in result["points"]]
    result["fits"] = {name: fit_line(ns, [p[name]["median_us"] * 1e-6 for p in result["points"]]) for name in variants}
    idx, cnt = random_lists(rng, batch, num_blocks, max(1, num_blocks // 8), block_size)
    k0, v0 = caches[0]
    idx3 = jnp.broadcast_to(idx[:, None, :], (batch, kv_heads, idx.shape[-1]))
    cnt2 = jnp.broadcast_to(cnt[:, None], (batch, kv_heads))
    result["launched_ops"] = {
        # XLA may merge dots that share an operand (DotMerger): with fewer cache copies than calls the
        # unrolled dpa baseline can read each cache once for several calls. Count what it launches.
        "dpa_unrolled": launched_ops(unrolled(dpa, unroll), q, [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
                                                                  for k, v in caches], ()),
        "op": launched_ops(variants["op"], q, k0, v0, idx, cnt),
        "op_ks1": launched_ops(variants["op_ks1"], q, k0, v0, idx, cnt),
    }
    if "kernel" in variants:
        result["launched_ops"]["kernel"] = launched_ops(kernel_only, q, k0, v0, idx3, cnt2)
    log(f"  fits {json.dumps(result['fits'])}\n  launched ops {json.dumps(result['launched_ops'])}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--heads", nargs="+", default=["gqa", "mha"],
                        help="mha, gqa, or N,K,H (query heads, KV heads, head dim)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--counts", nargs="+", type=int, default=[0, 1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=None, help="stop starting new groups after this long")
    parser.add_argument("--unroll", type=int, default=None, help="calls per timed executable (default 8 on a GPU)")
    parser.add_argument("--copies", type=int, default=None,
                        help="cache copies rotated over (default: enough to pass 256 MB, at most 4); "
                             "--copies equal to --unroll gives every call its own cache")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = parser.parse_args(argv)
    backend = resolve_backend(args.backend)
    if backend not in ("pallas", "interpret", *MOSAIC_BACKENDS):
        raise SystemExit(f"the fixed cost is measured on a Pallas kernel: --backend pallas, interpret, mosaic or "
                         f"mosaic_interpret, not {backend!r}")
    if backend in MOSAIC_BACKENDS and args.dtype == "float32":
        raise SystemExit("the Mosaic kernel runs 16-bit caches: --dtype bfloat16")
    gpu = on_gpu()
    if args.quick:
        head_dim = 64 if backend in MOSAIC_BACKENDS else 16  # the Mosaic kernel's smallest head dim
        args.heads, args.batches, args.context, args.block_size, args.counts = [f"4,2,{head_dim}"], [1], 64, 16, [0, 1, 2, 4]
    reps = args.reps or (20 if gpu else 2)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "kernel", f"kernel_fixed_cost_{'gpu' if gpu else 'cpu'}.json")
    with reporting.reserved_output(out, overwrite=args.overwrite, option="--out", prog="kernel_fixed_cost.py"):
        device = jax.devices()[0]
        result = dict(
            benchmark="kernel_fixed_cost", device=str(device), device_kind=device.device_kind, jax_version=jax.__version__,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), backend=backend,
            environment=reporting.environment(), reps=reps, args=vars(args),
            copy_bandwidth_gbps=copy_bandwidth((1024 if gpu else 16) * 1024 * 1024, reps), groups=[])
        print(f"{result['device_kind']}, jax {jax.__version__}, backend {backend}, "
              f"copy {result['copy_bandwidth_gbps']:.0f} GB/s", flush=True)
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for heads in args.heads:
            shape = HEADS[heads] if heads in HEADS else tuple(int(x) for x in heads.split(","))
            for batch in args.batches:
                if args.max_seconds and time.perf_counter() - start > args.max_seconds:
                    result["truncated"] = True
                    break
                result["groups"].append(run_group(
                    rng, shape, batch, args.context, args.block_size, args.counts, jnp.dtype(args.dtype), backend, reps,
                    unroll_min=args.unroll or (8 if gpu else 1), copies=args.copies,
                    rotate_bytes=(256 if gpu else 1) * 1024 * 1024, log=print))
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
                with open(out, "w") as f:  # after every group: a cut-off visit keeps what it measured
                    json.dump(result, f, indent=1)
        result["elapsed_s"] = time.perf_counter() - start
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
        return result


if __name__ == "__main__":
    main()
