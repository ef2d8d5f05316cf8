"""Microbenchmark of block_sparse_decode (docs/spec.md §5 targets).

    .venv/bin/python benchmarks/bench_kernel.py             # CPU: xla path, small sweep (~minutes)
    python3 benchmarks/bench_kernel.py                      # GPU: Triton kernel, full sweep
    .venv/bin/python benchmarks/bench_kernel.py --quick     # smoke run
    python3 benchmarks/bench_kernel.py --backends pallas mosaic   # GPU: Triton and Mosaic side by side

Sweep: density x block size x context x batch, for LLaMA-7B heads (32 x 128, no
GQA) and GQA (32 query / 8 KV heads x 128). At each (heads, batch, context) it
times, in one run and on the same arrays:

  ours@rho     block_sparse_decode at each density rho (backend "auto", or the
               first of --backends; the others timed right after it, same inputs)
  ours@1       the same op with every block live (rho = 1 point)
  dpa          jax.nn.dot_product_attention over the full cache
  jax_decode   jax's Pallas GPU decode_attention over the full cache (GPU only)
  jax_paged    jax's Pallas GPU paged_attention fed a compacted page table of
               only the live blocks (GPU only)

The two jax columns run where the installed jax still ships those ops (jax 0.12.1
removed both); otherwise they are left out, and the JSON's "peers" and the run's
first lines say why.

plus the device's copy bandwidth, measured in the same run. Per point: median
(and min) time per call, speedup over ours@1 and over the dense baselines, and
achieved GB/s on the bytes actually read. Writes JSON (device, jax version,
date, shapes, medians) and a PNG of speedup vs density per block size with the
ideal 1/rho line.

Timing: each timed executable runs U unrolled calls on distinct inputs (q + j),
each call on its own cache copy (U copies: enough to exceed the last-level cache,
and separate so XLA cannot merge the dpa baseline's dots across calls), and the
per-call time is the executable's time over U; the median is over --reps
executions after a warm-up. The harness alone (q + j, no attention) is timed too:
*_net speedups subtract it from both sides. Blocks are picked uniformly
at random per sequence (shared by all heads) and passed ascending, as
pallas_kernels.block_select builds them.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_sparse_decode
from pallas_kernels.backend import BACKENDS, BlockSparseParams, on_gpu, resolve_backend
from selfspan_jax import reporting
from selfspan_jax.kernel_bench import (HEADS, bytes_read, cache_copies, copy_bandwidth, peer_ops, random_caches,
                                       random_lists, time_executable, unrolled)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository



# ---------------------------------------------------------------------------
# Sweep definition
# ---------------------------------------------------------------------------
def default_sweep(gpu: bool, quick: bool) -> dict:
    if quick:
        return dict(heads=["mha", "gqa"], batches=[1], contexts=[1024, 4096], block_sizes=[64],
                    densities=[1 / 8, 1.0], dtype="bfloat16" if gpu else "float32", max_tokens=1 << 20)
    if gpu:
        # max_tokens bounds B*T so the three cache layouts fit in 80 GB
        # (B=64 x T=8k MHA bf16 is 8.6 GB per layout).
        return dict(heads=["mha", "gqa"], batches=[1, 8, 32, 64], contexts=[1024, 4096, 8192, 16384, 32768],
                    block_sizes=[16, 64, 128, 256], densities=[1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0],
                    dtype="bfloat16", max_tokens=512 * 1024)
    # CPU (2 cores): the XLA gather path, float32 (CPU's native dot type).
    return dict(heads=["mha", "gqa"], batches=[1, 4], contexts=[1024, 2048, 4096, 8192], block_sizes=[16, 64, 256],
                densities=[1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0], dtype="float32", max_tokens=32 * 1024)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------
def jax_decode_fn(decode_attention, interpret: bool = False):
    """jax's decode_attention on our [B, K, S, H] layout.

    Its public gqa() takes [B, S, K, H] and transposes the whole cache inside
    the call; to time only its kernel we vmap its per-head entry point over
    (B, K) exactly as gqa() does after that transpose.
    """
    inner = functools.partial(
        decode_attention.decode_attn_unbatched, sm_scale=None, block_h=16, block_k=128, k_splits=16,
        num_warps=None, num_stages=2, grid=None, interpret=interpret, debug=False, return_residuals=False,
    )
    import inspect

    if "normalize_output" in inspect.signature(decode_attention.decode_attn_unbatched).parameters:
        inner = functools.partial(inner, normalize_output=True)

    def fn(q, k, v):
        batch, num_heads, head_dim = q.shape
        kv_heads = k.shape[1]
        qg = q.reshape(batch, kv_heads, num_heads // kv_heads, head_dim)
        f = functools.partial(inner, sm_scale=1 / math.sqrt(head_dim))
        out = jax.vmap(jax.vmap(lambda a, b, c: f(a, b, c, None, None)))(qg, k, v)
        return out.reshape(batch, num_heads, head_dim)

    return fn


def jax_paged_fn(paged_attention, block_size: int, live: int, interpret: bool = False):
    """jax's paged_attention reading only the live blocks through a compacted page table."""
    # Tokens per inner step ~128 as in its defaults; splits so each has >= 1 step.
    pages_per_compute_block = max(1, min(8, 128 // block_size, live))
    k_splits = max(1, min(16, live // pages_per_compute_block))

    def fn(q, k_pages, v_pages, tables, lengths):
        # paged_attention applies no softmax scale of its own.
        q = q * jnp.asarray(1 / math.sqrt(q.shape[-1]), q.dtype)
        return paged_attention.paged_attention(
            q, k_pages, v_pages, tables, lengths, pages_per_compute_block=pages_per_compute_block, k_splits=k_splits,
            interpret=interpret,
        )

    width = -(-live // (k_splits * pages_per_compute_block)) * k_splits * pages_per_compute_block
    return fn, width


# ---------------------------------------------------------------------------
# One (heads, batch, context) group
# ---------------------------------------------------------------------------
def _time_other(other, op, q, caches, idx, cnt, *, unroll, reps, read, med, harness) -> dict:
    """One more backend at a point, on the first one's inputs: its times and its output against the first's."""
    omed, omn = (t / unroll for t in time_executable(unrolled(other, unroll), (q, caches, (idx, cnt)), reps))
    entry = dict(median_s=omed, min_s=omn, gbps=read / omed / 1e9, speedup_vs_first=med / omed)
    if med > 2 * harness and omed > 2 * harness:
        entry["speedup_vs_first_net"] = (med - harness) / (omed - harness)
    theirs = np.asarray(jnp.asarray(other(q, *caches[0], idx, cnt), jnp.float32))
    entry["max_abs_diff_vs_first"] = float(np.abs(
        theirs - np.asarray(jnp.asarray(op(q, *caches[0], idx, cnt), jnp.float32))).max())
    return entry


def bench_group(rng, heads, batch, seq_len, cfg, *, reps, gpu, rotate_bytes, unroll_min, log, peers=None,
                backends=None, failed=None):
    """peers: `peer_ops`'s result; the columns whose entry is a module are timed. backends: the kernel
    backends to time at every point, the first filling the point's own fields (default: "auto"
    resolved); each other one is timed on the same inputs right after it, under "by_backend". A
    backend that raises is recorded there with its error and added to `failed` (name -> error),
    which the caller shares across groups so it is not tried again."""
    failed = {} if failed is None else failed
    peers = {name: op for name, op in (peers or {}).items() if not isinstance(op, str)}
    num_heads, kv_heads, head_dim = HEADS[heads]
    dtype = jnp.dtype(cfg["dtype"])
    itemsize = dtype.itemsize
    cache_bytes = 2 * batch * kv_heads * seq_len * head_dim * itemsize
    # Three layouts live at once on a GPU (ours, dpa's, the paged view): 24 GB each fits an 80 GB card.
    copies_n = cache_copies(cache_bytes, rotate_bytes=rotate_bytes, unroll_min=unroll_min,
                            budget_bytes=(24 << 30) if gpu else (1 << 30))
    unroll = copies_n
    q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim)), dtype)
    caches = random_caches(rng, (batch, kv_heads, seq_len, head_dim), dtype, copies_n)
    backend, *others = backends or [resolve_backend("auto")]
    group = dict(heads=heads, num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim, batch=batch,
                 context=seq_len, dtype=str(dtype), cache_bytes=cache_bytes, cache_copies=copies_n, unroll=unroll,
                 backend=backend, points=[], baselines={})
    full_bytes = bytes_read(batch, kv_heads, head_dim, seq_len, num_heads, itemsize)

    def record_baseline(name, op, copies, rest=()):
        med, mn = time_executable(unrolled(op, unroll), (q, copies, rest), reps)
        group["baselines"][name] = dict(median_s=med / unroll, min_s=mn / unroll,
                                        gbps=full_bytes / (med / unroll) / 1e9)
        return group["baselines"][name]

    # The harness alone (q + j and the executable's per-output cost): 5-14 µs a call on an H200 at any
    # unroll (visit 2), so it is in every number below; *_net figures subtract it.
    harness = time_executable(unrolled(lambda q_, k_, v_: q_, unroll), (q, caches, ()), reps)[0] / unroll
    group["harness_median_s"] = harness

    # Dense baselines over the full cache, each in its native layout (copied
    # once outside the timing).
    bshd = [(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)) for k, v in caches]  # [B, S, K, H]
    dpa = lambda q_, k_, v_: jax.nn.dot_product_attention(q_[:, None], k_, v_)[:, 0]  # noqa: E731
    record_baseline("dpa", dpa, bshd)
    ref_dense = np.asarray(jnp.asarray(dpa(q, *bshd[0]), jnp.float32))
    del bshd
    if "jax_decode" in peers:
        decode = jax_decode_fn(peers["jax_decode"])
        jd = record_baseline("jax_decode", decode, caches)
        jd_out = np.asarray(jnp.asarray(decode(q, *caches[0]), jnp.float32))
        jd["max_abs_diff_vs_dpa"] = float(np.abs(jd_out - ref_dense).max())
    if "jax_paged" in peers:
        pages = [(jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)) for k, v in caches]  # [K, B, S, H]

    for block_size in cfg["block_sizes"]:
        if seq_len % block_size:
            continue
        num_blocks = seq_len // block_size
        op = functools.partial(block_sparse_decode, block_size=block_size, backend=backend)
        run = unrolled(op, unroll)
        other_ops = {name: functools.partial(block_sparse_decode, block_size=block_size, backend=name) for name in others}
        other_all = {}
        all_time = None
        done = set()
        for rho in sorted(set(cfg["densities"]), reverse=True):  # rho = 1 first: the speedup baseline
            live = max(1, int(round(rho * num_blocks)))
            if live in done:  # short contexts at big blocks: several rho round to one count
                continue
            done.add(live)
            idx, cnt = random_lists(rng, batch, num_blocks, live, block_size)
            t0 = time.perf_counter()
            med, mn = time_executable(run, (q, caches, (idx, cnt)), reps)
            med, mn = med / unroll, mn / unroll
            read = bytes_read(batch, kv_heads, head_dim, live * block_size, num_heads, itemsize)
            point = dict(block_size=block_size, density=live / num_blocks, live_blocks=live, median_s=med, min_s=mn,
                         bytes=read, gbps=read / med / 1e9)
            for stages in cfg.get("num_stages") or ():
                # the same op with the software pipeline depth forced (default: backend.py's choice)
                op_s = functools.partial(block_sparse_decode, block_size=block_size, backend=backend,
                                         params=BlockSparseParams(num_stages=stages))
                smed, _ = time_executable(unrolled(op_s, unroll), (q, caches, (idx, cnt)), reps)
                point.setdefault("by_num_stages", {})[str(stages)] = dict(median_s=smed / unroll,
                                                                         gbps=read / (smed / unroll) / 1e9)
            if live == num_blocks:
                all_time = med
                out = np.asarray(jnp.asarray(op(q, *caches[0], idx, cnt), jnp.float32))
                point["max_abs_diff_vs_dpa"] = float(np.abs(out - ref_dense).max())
            if all_time is not None:
                point["speedup_vs_all_blocks"] = all_time / med
                if med > 2 * harness:  # a net ratio of two numbers near the floor is noise
                    point["speedup_vs_all_blocks_net"] = (all_time - harness) / (med - harness)
            for name, base in group["baselines"].items():
                point[f"speedup_vs_{name}"] = base["median_s"] / med
            for name, other in other_ops.items():
                if name in failed:
                    continue
                try:
                    entry = _time_other(other, op, q, caches, idx, cnt, unroll=unroll, reps=reps, read=read, med=med,
                                        harness=harness)
                except Exception as e:  # noqa: BLE001 - one GPU call must still time the other backends
                    failed[name] = f"{type(e).__name__}: {str(e)[:500]}"
                    point.setdefault("by_backend", {})[name] = dict(error=failed[name])
                    log(f"    {name:<8} failed, left out from here on: {failed[name][:200]}")
                    continue
                if live == num_blocks:
                    other_all[name] = entry["median_s"]
                if name in other_all:
                    entry["speedup_vs_all_blocks"] = other_all[name] / entry["median_s"]
                point.setdefault("by_backend", {})[name] = entry
                log(f"    {name:<8} {entry['median_s'] * 1e3:9.3f} ms {entry['gbps']:8.1f} GB/s  "
                    f"x{entry['speedup_vs_first']:5.2f} vs {backend}"
                    + (f" (net x{entry['speedup_vs_first_net']:.2f})" if "speedup_vs_first_net" in entry else ""))
            if "jax_paged" in peers:
                fn, width = jax_paged_fn(peers["jax_paged"], block_size, live)
                # Page p of sequence b is block (b, p) of a [K, B*NB, bs, H] view.
                tables = np.zeros((batch, width), np.int32)
                idx_np, cnt_np = np.asarray(idx), np.asarray(cnt)
                for b in range(batch):
                    tables[b, : cnt_np[b]] = b * num_blocks + idx_np[b, : cnt_np[b]]
                lengths = jnp.asarray(cnt_np * block_size, jnp.int32)
                paged_copies = [
                    (kp.reshape(kv_heads, batch * num_blocks, block_size, head_dim),
                     vp.reshape(kv_heads, batch * num_blocks, block_size, head_dim))
                    for kp, vp in pages
                ]
                pmed, pmn = time_executable(unrolled(fn, unroll), (q, paged_copies, (jnp.asarray(tables), lengths)), reps)
                point["jax_paged_median_s"] = pmed / unroll
                point["speedup_vs_jax_paged"] = (pmed / unroll) / med
                ours = np.asarray(jnp.asarray(op(q, *caches[0], idx, cnt), jnp.float32))
                theirs = np.asarray(jnp.asarray(fn(q, *paged_copies[0], jnp.asarray(tables), lengths), jnp.float32))
                point["max_abs_diff_vs_jax_paged"] = float(np.abs(ours - theirs).max())
            group["points"].append(point)
            log(f"{heads:>3} B={batch:<3} T={seq_len:<6} bs={block_size:<4} rho={point['density']:<7.4f} "
                f"{med * 1e3:9.3f} ms {point['gbps']:8.1f} GB/s "
                f"x{point.get('speedup_vs_all_blocks', float('nan')):6.2f} vs all  "
                f"x{point['speedup_vs_dpa']:6.2f} vs dpa  ({time.perf_counter() - t0:.1f}s)")
    return group


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def summarise(result: dict, min_context: int) -> list[dict]:
    """Per (heads, block size, density): geometric-mean speedup over all-blocks at T >= min_context."""
    rows = {}
    for g in result["groups"]:
        if g["context"] < min_context:
            continue
        for p in g["points"]:
            if "speedup_vs_all_blocks" in p:
                key = (g["heads"], p["block_size"], round(p["density"], 4))
                rows.setdefault(key, []).append((p["speedup_vs_all_blocks"], p["gbps"],
                                                 p.get("speedup_vs_all_blocks_net", float("nan"))))
    out = []
    for (heads, bs, rho), vals in sorted(rows.items()):
        sp = float(np.exp(np.mean(np.log([v[0] for v in vals]))))
        net = [v[2] for v in vals if np.isfinite(v[2])]
        out.append(dict(heads=heads, block_size=bs, density=rho, geomean_speedup_vs_all=sp,
                        geomean_speedup_vs_all_net=float(np.exp(np.mean(np.log(net)))) if net else None,
                        target=result["target_factor"] / rho, meets_target=sp >= result["target_factor"] / rho,
                        max_gbps=max(v[1] for v in vals), n=len(vals)))
    return out


def compare_backends(result: dict) -> list[dict]:
    """One row per point and extra backend: its time and its speedup over the first backend."""
    rows = []
    for g in result["groups"]:
        for p in g["points"]:
            for name, e in p.get("by_backend", {}).items():
                if "error" in e:
                    continue
                rows.append(dict(backend=name, heads=g["heads"], batch=g["batch"], context=g["context"],
                                 block_size=p["block_size"], density=round(p["density"], 4), median_s=e["median_s"],
                                 speedup_vs_first=e["speedup_vs_first"],
                                 speedup_vs_first_net=e.get("speedup_vs_first_net"),
                                 max_abs_diff_vs_first=e["max_abs_diff_vs_first"]))
    return rows


def _plot_comparison(axes, heads_list, compared: list[dict], result: dict) -> None:
    """Second row: each extra backend's time over the first backend's at the same point, against
    density, one line per (backend, block size, batch, context); above 1 = faster than the first."""
    import matplotlib.ticker

    for ax, heads in zip(axes, heads_list):
        lines = {}
        for r in compared:
            if r["heads"] == heads:
                key = (r["backend"], r["block_size"], r["batch"], r["context"])
                lines.setdefault(key, []).append((r["density"], r["speedup_vs_first"]))
        for (name, bs, batch, context), pts in sorted(lines.items()):
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, "o-", label=f"{name} bs {bs} B {batch} T {context}")
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(f"{heads}: speedup over {result['backends'][0]}, same inputs")
        ax.set_xlabel("density rho")
        ax.set_ylabel(f"time of {result['backends'][0]} / time")
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=6, ncol=2)


def plot(result: dict, path: str, min_context: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    heads_list = sorted({g["heads"] for g in result["groups"]})
    compared = result.get("backend_comparison") or []
    rows = 2 if compared else 1
    fig, axes = plt.subplots(rows, len(heads_list), figsize=(6 * len(heads_list), 4.5 * rows), squeeze=False)
    if compared:
        _plot_comparison(axes[1], heads_list, compared, result)
    for ax, heads in zip(axes[0], heads_list):
        series = {}
        for g in result["groups"]:
            if g["heads"] != heads or g["context"] < min_context:
                continue
            for p in g["points"]:
                if "speedup_vs_all_blocks" in p:
                    series.setdefault(p["block_size"], {}).setdefault(p["density"], []).append(p["speedup_vs_all_blocks"])
        rhos = sorted({r for s in series.values() for r in s})
        if not rhos:
            continue
        for bs, pts in sorted(series.items()):
            xs = sorted(pts)
            ys = [float(np.exp(np.mean(np.log(pts[x])))) for x in xs]
            ax.plot(xs, ys, "o-", label=f"block {bs}")
        grid = np.geomspace(min(rhos), 1, 50)
        ax.plot(grid, 1 / grid, "k--", label="ideal 1/rho")
        ax.plot(grid, result["target_factor"] / grid, "k:", label=f"target {result['target_factor']}/rho")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        n, k, h = HEADS[heads]
        ax.set_title(f"{heads}: {n}q/{k}kv x {h}, T >= {min_context}, {result['device_kind']}")
        ax.set_xlabel("density rho (live blocks / all blocks)")
        ax.set_ylabel("speedup vs same op, all blocks")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sweep (smoke test)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernel/kernel_{cpu,gpu}.json)")
    parser.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    parser.add_argument("--heads", nargs="+", choices=sorted(HEADS), default=None)
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--contexts", nargs="+", type=int, default=None)
    parser.add_argument("--block-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--densities", nargs="+", type=float, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="skip groups with batch * context above this")
    parser.add_argument("--reps", type=int, default=None, help="timed executions per point (median reported)")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop starting new groups after this long")
    parser.add_argument("--unroll", type=int, default=None,
                        help="calls per timed executable (default 8 on a GPU, 1 on a CPU); the executable's own "
                             "launch cost is spread over them (benchmarks/kernel_fixed_cost.py measures it)")
    parser.add_argument("--num-stages", nargs="+", type=int, default=None,
                        help="also time the kernel at each of these Triton pipeline depths (GPU tuning)")
    parser.add_argument("--backends", nargs="+", choices=[b for b in BACKENDS if b != "auto"], default=None,
                        help="kernel backends timed side by side at every point, the first as the reference "
                             "(default: auto, i.e. pallas on a GPU, xla on a CPU); e.g. --backends pallas mosaic")
    parser.add_argument("--rotate-mb", type=int, default=None,
                        help="cache copies rotated over per executable, in MB (default 256 on a GPU, past its L2; "
                             "64 on a CPU); a small value keeps a dry run short")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = parser.parse_args(argv)

    gpu = on_gpu()
    backends = args.backends or [resolve_backend("auto")]
    cfg = default_sweep(gpu, args.quick)
    for key in ("heads", "batches", "contexts", "block_sizes", "densities", "dtype", "max_tokens", "num_stages"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if 1.0 not in cfg["densities"]:
        cfg["densities"] = list(cfg["densities"]) + [1.0]  # the all-blocks baseline
    reps = args.reps or (20 if gpu else 5)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "kernel", f"kernel_{'gpu' if gpu else 'cpu'}{'_quick' if args.quick else ''}.json")
    png = args.plot or os.path.splitext(out)[0] + ".png"
    with reporting.reserved_output(out, overwrite=args.overwrite, option="--out", prog="bench_kernel.py"):
        os.makedirs(os.path.dirname(out), exist_ok=True)

        device = jax.devices()[0]
        # Rotate over >= this many cache bytes (H100 L2 is 50 MB; CPU L3 tens of MB).
        rotate_bytes = (args.rotate_mb or (256 if gpu else 64)) * 1024 * 1024
        result = dict(
            benchmark="block_sparse_decode", device=str(device), device_kind=device.device_kind, platform=device.platform,
            jax_version=jax.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            environment=reporting.environment(), sweep=cfg, reps=reps, rotate_bytes=rotate_bytes, target_factor=0.8 if gpu else 0.5,
            target_note="docs/spec.md §5: speedup >= 0.8/rho (GPU kernel) or >= 0.5/rho (CPU XLA path) at T >= 8k",
            copy_bandwidth_gbps=copy_bandwidth((1024 if gpu else 256) * 1024 * 1024, reps), groups=[], truncated=False,
            backend_failures={},
        )
        print(f"device {result['device_kind']} ({result['platform']}), jax {jax.__version__}, "
              f"copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s (read + write)", flush=True)
        peers = peer_ops(gpu)
        result["peers"] = {name: "timed" if not isinstance(op, str) else f"left out: {op}" for name, op in peers.items()}
        for name, state in result["peers"].items():
            print(f"  column {name}: {state}", flush=True)

        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for heads in cfg["heads"]:
            for seq_len in cfg["contexts"]:
                for batch in cfg["batches"]:
                    if batch * seq_len > cfg["max_tokens"]:
                        continue
                    if args.max_seconds and time.perf_counter() - start > args.max_seconds:
                        result["truncated"] = True
                        break
                    result["groups"].append(bench_group(
                        rng, heads, batch, seq_len, cfg, reps=reps, gpu=gpu, rotate_bytes=rotate_bytes,
                        unroll_min=args.unroll or (8 if gpu else 1), log=lambda s: print(s, flush=True), peers=peers,
                        backends=backends, failed=result["backend_failures"]))
                    # Written after every group so a run cut short keeps what it measured.
                    reporting.write_json(result, out)
        result["elapsed_s"] = time.perf_counter() - start
        min_context = 8192 if any(g["context"] >= 8192 for g in result["groups"]) else max((g["context"] for g in result["groups"]), default=0)
        result["summary_min_context"] = min_context
        result["summary"] = summarise(result, min_context)
        result["backends"] = backends
        result["backend_comparison"] = compare_backends(result)
        result["environment"]["load_average_at_end"] = reporting.load_average()
        reporting.write_json(result, out)
        plot(result, png, min_context)

        print(f"\nGeo-mean speedup vs all blocks at T >= {min_context} (target {result['target_factor']}/rho):")
        print(f"{'heads':>5} {'bs':>4} {'rho':>7} {'speedup':>8} {'net':>6} {'target':>7} {'ok':>3} {'max GB/s':>9}")
        for r in result["summary"]:
            net = r["geomean_speedup_vs_all_net"]
            print(f"{r['heads']:>5} {r['block_size']:>4} {r['density']:>7.4f} {r['geomean_speedup_vs_all']:>8.2f} "
                  f"{net if net is not None else float('nan'):>6.2f} "
                  f"{r['target']:>7.2f} {'yes' if r['meets_target'] else 'NO':>3} {r['max_gbps']:>9.1f}")
        if result["backend_comparison"]:
            print(f"\nSide by side (speedup of each backend over {backends[0]} at the same point; net = minus the "
                  "harness):")
            print(reporting.markdown_table(
                ["backend", "heads", "B", "T", "bs", "rho", "ms", f"x {backends[0]}", "net"],
                [[r["backend"], r["heads"], r["batch"], r["context"], r["block_size"], f"{r['density']:.4f}",
                  f"{r['median_s'] * 1e3:.3f}", f"{r['speedup_vs_first']:.2f}",
                  "-" if r["speedup_vs_first_net"] is None else f"{r['speedup_vs_first_net']:.2f}"]
                 for r in result["backend_comparison"]]))
        print(f"copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s; wrote {out} and {png} ({result['elapsed_s']:.0f}s)")
        return result


if __name__ == "__main__":
    main()
