"""Device mesh and shardings for training: data parallelism plus FSDP-style
parameter sharding, the same code on 1 or N devices and on N hosts.

The mesh has two axes, ``("data", "fsdp")``. The batch dimension is split over
both (every device sees a different slice of the batch, as in ZeRO-3 / FSDP);
parameters and optimizer moments are split over ``"fsdp"`` only, along one
dimension each, and XLA inserts the all-gathers and reduce-scatters. With
``fsdp=1`` this is plain data parallelism with replicated parameters; on one
device every sharding is trivial and the program is the single-device one.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)

# Parameters smaller than this stay replicated: sharding a norm scale of a few
# hundred floats saves nothing and costs an all-gather per use.
MIN_SHARD_SIZE = 2**12


def maybe_initialize_distributed() -> bool:
    """Start multi-host JAX when the launcher's environment asks for it.

    Returns True when `jax.distributed.initialize` was called. The trigger is
    ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
    when the cluster is not one jax auto-detects, e.g. SLURM or Open MPI);
    single-process runs leave the environment unset and skip this.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address:
        return False
    kwargs: dict[str, Any] = {"coordinator_address": address}
    if "JAX_NUM_PROCESSES" in os.environ:
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in os.environ:
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    avoid_persistent_cache_hang()
    return True


# jax versions whose CPU collectives hang when process 0 loads a program from the persistent
# compilation cache while the other processes compile it (docs/notes/dependencies.md has the
# reproduction): only process 0 writes the cache and the others compute other keys, so that mixture
# is what every run after the first one gets.
CACHE_HANG_JAX_VERSIONS = ("0.12.1",)


def avoid_persistent_cache_hang() -> bool:
    """Turn the persistent compilation cache off in a multi-process CPU run on a jax version listed in
    `CACHE_HANG_JAX_VERSIONS` (a warning says so); True when it did. Call it after
    `jax.distributed.initialize` and before the first compile."""
    if (jax.__version__ not in CACHE_HANG_JAX_VERSIONS or jax.process_count() < 2
            or jax.default_backend() != "cpu" or not jax.config.jax_enable_compilation_cache
            or not jax.config.jax_compilation_cache_dir):
        return False
    jax.config.update("jax_enable_compilation_cache", False)
    warnings.warn(f"jax {jax.__version__}: the persistent compilation cache "
                  f"({jax.config.jax_compilation_cache_dir}) is off in this {jax.process_count()}-process CPU "
                  "run: with it on, a run whose process 0 loads a collective program from the cache hangs "
                  "(docs/notes/dependencies.md)", RuntimeWarning, stacklevel=2)
    return True


def resolve_mesh_shape(dp: int, fsdp: int, n_devices: int) -> tuple[int, int]:
    """Fill in one ``-1`` entry so that ``dp * fsdp == n_devices``."""
    if n_devices <= 0:
        raise ValueError(f"n_devices must be positive, got {n_devices}")
    for name, value in (("dp", dp), ("fsdp", fsdp)):
        if value == 0 or value < -1:
            raise ValueError(f"mesh {name} must be a positive int or -1 (= all remaining devices), got {value}")
    if dp == -1 and fsdp == -1:
        raise ValueError("at most one of mesh dp / fsdp may be -1")
    if dp == -1:
        if n_devices % fsdp:
            raise ValueError(f"fsdp={fsdp} does not divide the {n_devices} devices")
        dp = n_devices // fsdp
    elif fsdp == -1:
        if n_devices % dp:
            raise ValueError(f"dp={dp} does not divide the {n_devices} devices")
        fsdp = n_devices // dp
    if dp * fsdp != n_devices:
        raise ValueError(f"mesh dp={dp} x fsdp={fsdp} = {dp * fsdp} does not match the {n_devices} devices")
    return dp, fsdp


def make_mesh(dp: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over `devices` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    dp, fsdp = resolve_mesh_shape(dp, fsdp, len(devices))
    grid = np.asarray(devices, dtype=object).reshape(dp, fsdp)
    return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over every device, the rest whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def param_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = MIN_SHARD_SIZE) -> P:
    """FSDP partition of one array: its largest dimension that `fsdp_size`
    divides is split over ``"fsdp"``; small or indivisible arrays replicate."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    # Largest dimension first, ties to the later one (the output dim of a
    # [in, out] kernel), so the all-gather moves contiguous rows.
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
    for axis in order:
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP_AXIS
            return P(*spec)
    return P()


def tree_shardings(mesh: Mesh, tree, min_size: int = MIN_SHARD_SIZE):
    """NamedSharding for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
    fsdp_size = mesh.shape[FSDP_AXIS]

    def one(leaf):
        return NamedSharding(mesh, param_spec(tuple(leaf.shape), fsdp_size, min_size))

    return jax.tree.map(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_tree(tree, shardings):
    """Place every leaf of `tree` with the matching sharding."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def global_batch_size_ok(batch_size: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the mesh {dict(mesh.shape)}")


def local_batch_slice(global_batch: int) -> slice:
    """Rows of the global batch this process feeds (all of them on one host)."""
    n_proc, pid = jax.process_count(), jax.process_index()
    if global_batch % n_proc:
        raise ValueError(f"batch size {global_batch} is not divisible by the {n_proc} processes")
    per = global_batch // n_proc
    return slice(pid * per, (pid + 1) * per)


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays of this process's rows -> global arrays split over the mesh.

    Each array's leading dimension is the batch; on one process the local rows
    are the whole batch.
    """
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        out[name] = jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
    return out
