"""Backend choice and tile/split parameters for the block-sparse decode kernel.

Everything that depends on "which device are we on" lives here, so the kernel
file and its callers never test `jax.default_backend()` themselves.
"""

from __future__ import annotations

import dataclasses

import jax

BACKENDS = ("auto", "pallas", "interpret", "mosaic", "mosaic_interpret", "xla", "reference")
# The Pallas kernels and the backend each runs on: Triton, or Mosaic GPU (TMA + wgmma); the
# *interpret names run the same kernel on the CPU.
PALLAS_BACKENDS = ("pallas", "interpret")
MOSAIC_BACKENDS = ("mosaic", "mosaic_interpret")

# H100 SXM has 132 SMs. Used when the kernel is lowered for a GPU that is not
# attached (export against an abstract H100 in CI) or the device does not say.
DEFAULT_GPU_CORES = 132

# Shared memory the software pipeline may spend on K/V tiles. H100 has 228 KiB
# per SM; leave room for q, the score tile and Triton's own scratch.
_SMEM_BUDGET_BYTES = 160 * 1024

# A split of a block list reads at least this many entries (blocks; tiles of rows in the token
# kernel): below it, a split's fixed cost (its partials, written by the kernel and read by the
# combine) outweighs what it reads. splits.split_range applies it.
MIN_ENTRIES_PER_SPLIT = 4


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (Triton tile sizes)."""
    return 1 << max(0, n - 1).bit_length()


def query_rows(group_size: int) -> int:
    """Query rows per program for a group of G query heads: Triton tiles are powers of two, and its
    mma wants >= 16 rows."""
    return max(16, next_power_of_two(group_size))


def default_k_splits(*, batch: int, kv_heads: int, entries: int, num_cores: int) -> int:
    """About one wave of programs; never more splits than a full list of `entries` can fill with
    MIN_ENTRIES_PER_SPLIT each (an extra split would only ever be empty). Every split costs the
    combine a read of its partials, written or not."""
    fillable = -(-entries // MIN_ENTRIES_PER_SPLIT)
    return max(1, min(-(-num_cores // (batch * kv_heads)), fillable))


def on_gpu() -> bool:
    """True when the default JAX backend is a CUDA/ROCm GPU."""
    return jax.default_backend() in ("gpu", "cuda", "rocm")


def resolve_backend(backend: str) -> str:
    """Maps "auto" to the concrete backend for this process; validates the name.

    auto -> "pallas" on GPU (the Triton kernel), "xla" elsewhere (gather path;
    interpret mode is a correctness tool, orders of magnitude too slow to serve).
    "auto" moves to "mosaic" once a GPU run (`tools/gpu/gpu_session.sh mosaic`)
    shows the Mosaic kernel at least as fast as Triton at every point of the
    side-by-side sweep; none has run yet (docs/notes/kernel.md).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "pallas" if on_gpu() else "xla"
    return backend


def gpu_core_count() -> int:
    """Streaming multiprocessors of the attached GPU (132 if none is attached)."""
    if on_gpu():
        count = getattr(jax.devices()[0], "core_count", None)
        if isinstance(count, int) and count > 0:
            return count
    return DEFAULT_GPU_CORES


@dataclasses.dataclass(frozen=True)
class BlockSparseParams:
    """Tile and split parameters of the Pallas kernel (jax's names).

    Any field left None is chosen by `resolve`. Frozen and hashable, so it can
    be a static argument of a jitted function.

    block_h:    query rows per program: the G = N/K heads of one KV head, padded
                up to a power of two >= 16 because Triton's mma needs every dot
                dimension >= 16.
    block_k:    tokens per inner-loop step; a cache block larger than this is
                walked in block_size // block_k sub-tiles (bounds the K/V tile
                held in shared memory at block sizes of 256).
    k_splits:   programs per (batch, KV head) that share one active-block list
                (flash-decoding): at batch 1 the B*K programs alone leave most
                of the 132 SMs idle.
    num_warps:  Triton warps per program.
    num_stages: Triton software-pipeline depth of the inner loop; the kernel's
                K/V stream gets num_stages - 1 shared-memory buffers.
    """

    block_h: int | None = None
    block_k: int | None = None
    k_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        for name in ("block_h", "block_k", "k_splits", "num_warps", "num_stages"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"BlockSparseParams.{name} must be a positive int or None, got {value!r}")
        for name in ("block_h", "block_k"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"BlockSparseParams.{name} must be a power of two >= 16 (Triton tile), got {value}")

    def resolve(
        self,
        *,
        group_size: int,
        batch: int,
        kv_heads: int,
        list_len: int,
        block_size: int,
        head_dim: int,
        itemsize: int,
        num_cores: int,
    ) -> "BlockSparseParams":
        """Fills every None field for one call's static shapes."""
        block_h = self.block_h if self.block_h is not None else query_rows(group_size)
        if block_h < group_size:
            raise ValueError(f"block_h={block_h} is smaller than the query group G={group_size}")

        if self.block_k is not None:
            block_k = self.block_k
        else:
            # The largest power of two <= 128 that divides the block (a block of 48 or 192 is
            # walked in tiles of 16 or 64), halved while two K+V stages would not fit the budget.
            block_k = 128
            while block_k > 16 and (block_size % block_k or 4 * block_k * head_dim * itemsize > _SMEM_BUDGET_BYTES):
                block_k //= 2
        if block_size % block_k or block_k < 16 or block_k & (block_k - 1):
            raise ValueError(f"block_k={block_k} must be a power of two >= 16 that divides block_size={block_size}")

        k_splits = self.k_splits if self.k_splits is not None else default_k_splits(
            batch=batch, kv_heads=kv_heads, entries=list_len, num_cores=num_cores)

        num_warps = self.num_warps if self.num_warps is not None else (8 if block_k * head_dim >= 128 * 128 else 4)

        if self.num_stages is not None:
            num_stages = self.num_stages
        else:
            # The K/V address comes from a block id read one iteration earlier (through the loop
            # carry), which costs the pipeliner one stage: it keeps num_stages - 1 K+V buffers
            # (sm_90 compile, docs/notes/kernel.md). Aim for as many buffers as fit the budget,
            # at most three; block_k above is chosen so that two fit.
            stage_bytes = 2 * block_k * head_dim * itemsize  # one K tile + one V tile
            buffers = max(1, min(3, _SMEM_BUDGET_BYTES // stage_bytes))
            num_stages = buffers + 1
        return BlockSparseParams(block_h, block_k, k_splits, num_warps, num_stages)
