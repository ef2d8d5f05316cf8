"""Shared pieces of the kernel benchmarks (`benchmarks/bench_kernel.py`, `benchmarks/kernel_fixed_cost.py`):
timing of a compiled call, distinct unrolled calls, the copy bandwidth, random caches and block lists,
the byte floor of a read, how many cache copies a timed call needs, and reading launches off HLO.
"""

from __future__ import annotations

import importlib
import math
import re
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_select import blocks_from_token_mask

HEADS = {"mha": (32, 32, 128), "gqa": (32, 8, 128)}  # (N, K, H): LLaMA-7B's MHA and a GQA-4 variant


def time_executable(fn, args, reps: int) -> tuple[float, float]:
    """(median, min) seconds of fn(*args) after one warm-up run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times))


def unrolled(op, unroll: int):
    """jit of `unroll` calls of op(q + j, *copies[j % n], *rest) returning all outputs.

    q + j makes the calls distinct so XLA cannot CSE them; rotating copies keeps
    repeated calls from being served by the last-level cache.
    """

    @jax.jit
    def run(q, copies, rest):
        outs = []
        for j in range(unroll):
            outs.append(op(q + jnp.asarray(j, q.dtype), *copies[j % len(copies)], *rest))
        return outs

    return run


def copy_bandwidth(nbytes: int, reps: int) -> float:
    """Device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    x = jnp.arange(nbytes // 4, dtype=jnp.float32)
    # + 1 so XLA cannot alias the output to the input.
    fn = jax.jit(lambda a: a + 1)
    med, _ = time_executable(fn, (x,), reps)
    return 2 * x.nbytes / med / 1e9


def random_lists(rng, batch: int, num_blocks: int, count: int, block_size: int):
    """Ascending block lists of `count` random blocks per sequence: (int32 [B, NB], int32 [B])."""
    mask = np.zeros((batch, num_blocks), bool)
    for b in range(batch):
        mask[b, rng.choice(num_blocks, count, replace=False)] = True
    token_mask = jnp.asarray(np.repeat(mask, block_size, axis=1))
    return blocks_from_token_mask(token_mask, block_size)


def random_caches(rng, shape, dtype, copies: int) -> list[tuple[jax.Array, jax.Array]]:
    """`copies` (k, v) pairs of standard-normal [B, K, S, H] caches, drawn on the device (dozens of
    copies of a GB-sized cache would take minutes from numpy); the key comes from `rng`."""
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 2 * copies)
    return [(jax.random.normal(keys[2 * c], shape, dtype), jax.random.normal(keys[2 * c + 1], shape, dtype))
            for c in range(copies)]


def bytes_read(batch, kv_heads, head_dim, tokens, num_heads, itemsize) -> int:
    """The floor: K and V of the visible tokens once, plus q in and out."""
    return batch * kv_heads * tokens * head_dim * 2 * itemsize + 2 * batch * num_heads * head_dim * itemsize


def cache_copies(cache_bytes: int, *, rotate_bytes: int, unroll_min: int, budget_bytes: int) -> int:
    """Calls per timed executable, each on its own cache copy: enough copies to pass the last-level
    cache and at least unroll_min calls, within the memory budget of one layout.

    Every call reads its own copy because XLA merges dots that share an operand: with 8 calls on
    4 copies, the unrolled dot_product_attention baseline read each cache once for two calls and
    looked 1.5-2x faster than the kernel at GQA; with one copy per call it is 2.8x slower
    (docs/notes/kernel.md, "GPU measurements"). A custom call (our kernel, jax's) is never merged."""
    wanted = max(unroll_min, math.ceil(rotate_bytes / cache_bytes))
    return int(max(1, min(wanted, budget_bytes // cache_bytes)))


NOT_KERNELS = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast")


def launched_ops(fn, *args) -> dict[str, int]:
    """Opcode -> count of the ENTRY instructions of fn's optimized HLO that run on the device."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[: entry.index("\n}") if "\n}" in entry else len(entry)]
    counts: dict[str, int] = {}
    for line in entry.splitlines()[1:]:
        # "name = <shape, maybe a tuple with spaces> opcode(operands), ...": the first " word(" after "="
        m = re.search(r"=.*?\s([a-z][\w-]*)\(", line)
        if m and m.group(1) not in NOT_KERNELS:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def fit_line(ns, ts) -> dict:
    """Least-squares t = t0 + n * slope over the points with n >= 1 (n = 0 skips the loop entirely)."""
    pts = [(n, t) for n, t in zip(ns, ts) if n >= 1]
    if len(pts) < 2:
        return {}
    x, y = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    slope, t0 = np.polyfit(x, y, 1)
    return dict(t0_us=float(t0) * 1e6, slope_us_per_block=float(slope) * 1e6)


# The comparison columns and the jax module each needs. Both are Pallas Triton ops that jax 0.11
# deprecated and jax 0.12.1 removed, so a column runs only where the installed jax still has its op.
PEER_MODULES = {"jax_decode": "jax.experimental.pallas.ops.gpu.decode_attention",
                "jax_paged": "jax.experimental.pallas.ops.gpu.paged_attention"}


def peer_ops(gpu: bool) -> dict[str, object]:
    """{column: the jax module it times, or a str saying why the column is left out}."""
    found = {}
    for column, module in PEER_MODULES.items():
        if not gpu:
            found[column] = "no GPU: jax's Pallas GPU ops run on a GPU only"
            continue
        try:
            with warnings.catch_warnings():  # deprecated modules: import quietly
                warnings.simplefilter("ignore", DeprecationWarning)
                found[column] = importlib.import_module(module)
        except ImportError as err:
            found[column] = f"jax {jax.__version__} has no {module} ({type(err).__name__}: {err})"
    return found
