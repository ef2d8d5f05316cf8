"""What the decode kernels become on an H100: sm_90 compiles of the Triton modules, on a CPU.

The modules are captured from an export for an abstract H100
(`triton_capture.py`) and compiled by the `triton` pip package in its own
virtual environment (`requirements-sm90.txt`; the project never imports
triton, and its version need not match jaxlib's), by `sm90_worker.py`. XLA
compiles with its own pinned Triton, so counts may differ a little from what
a GPU run reports; the software pipeliner is the same code.

    configs = sm90.CONFIGS                       # the matrix of shapes
    report = sm90.compile_configs(configs, venv=".venv-sm90")

`tools/gpu/compile_kernel_sm90.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

from pallas_kernels.backend import BlockSparseParams
from pallas_kernels.block_sparse_decode import block_sparse_decode
from pallas_kernels.splits import live_splits
from pallas_kernels.token_sparse_decode import token_sparse_decode
from kernel_tools.triton_capture import H100_CORES, capture_triton_kernels

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIREMENTS = os.path.join(os.path.dirname(HERE), "requirements-sm90.txt")
WORKER = os.path.join(HERE, "sm90_worker.py")
DEFAULT_VENV = os.path.join(os.path.dirname(HERE), ".venv-sm90")

_DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One decode-kernel call to compile: a model's head shape, a block size, a dtype."""

    name: str  # the model shape, e.g. "llama7b_mha"
    num_heads: int
    kv_heads: int
    head_dim: int
    block_size: int = 64
    dtype: str = "bf16"
    precision: str | None = None  # None: the backend default (tf32 dots for fp32); "highest": IEEE fp32
    mask: bool = False
    layers: int = 1  # > 1: the generation loop's stacked cache with a traced layer index
    kernel: str = "block"  # "block" (block lists) or "token" (row lists: SparQ/ADORE)
    batch: int = 1
    seq_len: int = 8192
    params: BlockSparseParams | None = None  # None: what backend.py resolves for an H100

    @property
    def id(self) -> str:
        parts = [self.kernel, self.name, f"H{self.head_dim}", f"bs{self.block_size}", self.dtype]
        if self.precision:
            parts.append(self.precision)
        if self.mask:
            parts.append("mask")
        if self.layers > 1:
            parts.append(f"L{self.layers}")
        if self.params is not None:
            parts.append("p" + "_".join(str(v) for v in dataclasses.astuple(self.params)))
        return "-".join(parts)

    def resolved_params(self) -> BlockSparseParams:
        """The tile/split parameters backend.py picks for this call on an H100."""
        return (self.params or BlockSparseParams()).resolve(
            group_size=self.group, batch=self.batch, kv_heads=self.kv_heads,
            list_len=self.seq_len // self.block_size, block_size=self.block_size, head_dim=self.head_dim,
            itemsize=jnp.dtype(_DTYPES[self.dtype]).itemsize, num_cores=H100_CORES)

    def traffic(self, density: float = 1 / 8) -> dict:
        """Bytes one call moves when a fraction `density` of the blocks is listed: the K/V tiles
        read, and the split-K partials (o, m, l in fp32 for the G real query rows), written by
        the splits that hold entries and read back by the combine for every split."""
        p = self.resolved_params()
        itemsize = jnp.dtype(_DTYPES[self.dtype]).itemsize
        count = max(1, round(density * self.seq_len / self.block_size))
        live = int(live_splits(jnp.asarray([count]), p.k_splits).sum())
        kv = 2 * count * self.block_size * self.batch * self.kv_heads * self.head_dim * itemsize
        row_bytes = self.batch * self.kv_heads * self.group * (self.head_dim + 2) * 4
        partials = (live + p.k_splits) * row_bytes
        return {"density": density, "listed_blocks": count, "kv_bytes": kv, "split_partial_bytes": partials,
                "partials_over_kv": partials / kv, "k_splits": p.k_splits, "live_splits": live,
                "block_h": p.block_h, "block_k": p.block_k}

    @property
    def group(self) -> int:
        return self.num_heads // self.kv_heads

    @property
    def production(self) -> bool:
        """A config a user serves with: half precision (fp32 runs exact, "highest" precision)."""
        return self.dtype in ("bf16", "fp16")

    def avals(self):
        dt = _DTYPES[self.dtype]
        b, k, s, h = self.batch, self.kv_heads, self.seq_len, self.head_dim
        cache = (self.layers, b, k, s, h) if self.layers > 1 else (b, k, s, h)
        q = jax.ShapeDtypeStruct((b, self.num_heads, h), dt)
        kv = jax.ShapeDtypeStruct(cache, dt)
        if self.kernel == "token":
            rows = s // 8
            lists = [jax.ShapeDtypeStruct((b, k, rows), jnp.int32), jax.ShapeDtypeStruct((b, k), jnp.int32)]
        else:
            lists = [jax.ShapeDtypeStruct((b, k, s // self.block_size), jnp.int32),
                     jax.ShapeDtypeStruct((b, k), jnp.int32)]
        extra = [jax.ShapeDtypeStruct((b, s), jnp.bool_)] if self.mask else []
        layer = [jax.ShapeDtypeStruct((), jnp.int32)] if self.layers > 1 else []
        return [q, kv, kv, *lists, *extra, *layer]

    def fn(self):
        precision = self.precision
        has_layer, mask = self.layers > 1, self.mask
        if self.kernel == "token":
            def call(q, k, v, idx, cnt, *rest):
                layer = rest[-1] if has_layer else None
                return token_sparse_decode(q, k, v, idx, cnt, layer=layer, backend="pallas", precision=precision)
            return call

        def call(q, k, v, idx, cnt, *rest):
            token_mask = rest[0] if mask else None
            layer = rest[-1] if has_layer else None
            return block_sparse_decode(q, k, v, idx, cnt, token_mask, block_size=self.block_size, backend="pallas",
                                       precision=precision, layer=layer, params=self.params)
        return call


# The shapes users serve: LLaMA-7B (MHA), LLaMA-2/3-style GQA, SmolLM2-135M (G = 3).
SHAPES = {
    "llama7b_mha": (32, 32, 128),
    "gqa4": (32, 8, 128),
    "gqa8_h64": (32, 4, 64),
    "smollm2_g3": (9, 3, 64),
}


def _matrix() -> list[KernelConfig]:
    configs = []
    for name, (n, k, h) in SHAPES.items():
        for block in (16, 64, 128, 256):
            for mask in (False, True):
                configs.append(KernelConfig(name, n, k, h, block_size=block, mask=mask))
    for name in ("llama7b_mha", "gqa4"):
        n, k, h = SHAPES[name]
        configs += [KernelConfig(name, n, k, h, dtype="fp16", mask=True),
                    KernelConfig(name, n, k, h, dtype="fp32"),
                    KernelConfig(name, n, k, h, dtype="fp32", precision="highest"),
                    KernelConfig(name, n, k, h, dtype="fp32", precision="highest", mask=True, block_size=16),
                    KernelConfig(name, n, k, h, mask=True, layers=32, batch=8, seq_len=4096)]
    for name in ("llama7b_mha", "gqa4", "smollm2_g3"):
        n, k, h = SHAPES[name]
        configs.append(KernelConfig(name, n, k, h, kernel="token", block_size=16, layers=4, seq_len=4096))
    # Shapes the validator accepts that are not powers of two: they must lower too.
    configs += [KernelConfig("gqa4", 32, 8, 128, block_size=48, seq_len=48 * 128),
                KernelConfig("gqa4", 32, 8, 128, block_size=192, seq_len=192 * 32),
                KernelConfig("mha_h80", 32, 32, 80),
                KernelConfig("mha_h96", 32, 32, 96),
                KernelConfig("g40", 40, 1, 128)]
    return configs


CONFIGS = _matrix()


def ensure_venv(venv: str = DEFAULT_VENV, *, quiet: bool = True) -> str:
    """The pinned triton environment's python, created (pip, from PyPI) if it is missing."""
    python = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, "requirements-sm90.txt")
    with open(REQUIREMENTS) as f:
        wanted = f.read()
    if os.path.exists(python) and os.path.exists(stamp) and open(stamp).read() == wanted:
        return python
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    cmd = [python, "-m", "pip", "install", *(["-q"] if quiet else []), "-r", REQUIREMENTS]
    proc = subprocess.run(cmd, capture_output=quiet, text=True)
    if proc.returncode:
        raise RuntimeError(f"could not install the triton environment ({' '.join(cmd)}): {proc.stderr[-2000:]}")
    with open(stamp, "w") as f:
        f.write(wanted)
    return python


def capture(config: KernelConfig, directory: str) -> dict:
    """Writes the config's Triton module to directory; returns its kernels.json entry."""
    kernels = capture_triton_kernels(config.fn(), *config.avals())
    if len(kernels) != 1:
        raise RuntimeError(f"{config.id}: expected one Triton kernel, the export has {len(kernels)}")
    kernel = kernels[0]
    ttir = f"{config.id}.ttir"
    with open(os.path.join(directory, ttir), "w") as f:
        f.write(kernel.ttir)
    return {"id": config.id, "ttir": ttir, "num_warps": kernel.num_warps, "num_stages": kernel.num_stages,
            "grid": list(kernel.grid), "kernel_name": kernel.name}


def compile_configs(configs, *, venv: str = DEFAULT_VENV, keep: str | None = None) -> dict:
    """Captures and compiles every config for sm_90; returns {"triton_version", "kernels": [...]}.

    Each kernel entry joins the config (shape, dtype, launch parameters) with
    the worker's report (registers, spills, shared memory, pipelining).
    A config whose lowering or compile fails is reported with ok=False and the
    error, not raised, so one bad shape does not hide the rest.
    """
    python = ensure_venv(venv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = keep or tmp
        os.makedirs(directory, exist_ok=True)
        captured, failed = [], []
        for config in configs:
            try:
                captured.append(capture(config, directory))
            except Exception as err:  # a shape that does not lower is a finding, not a crash
                failed.append({"id": config.id, "ok": False, "stage": "lowering",
                               "error": f"{type(err).__name__}: {err}"[:2000]})
        with open(os.path.join(directory, "kernels.json"), "w") as f:
            json.dump(captured, f, indent=1)
        proc = subprocess.run([python, WORKER, directory], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"sm90 worker failed: {proc.stderr[-3000:]}")
        with open(os.path.join(directory, "report.json")) as f:
            report = json.load(f)
    by_id = {c.id: c for c in configs}
    launch = {e["id"]: e for e in captured}
    kernels = []
    for entry in report["kernels"] + failed:
        config = by_id[entry["id"]]
        row = {"config": {**dataclasses.asdict(config), "params": None}, "production": config.production}
        if entry["id"] in launch:
            row["launch"] = {k: launch[entry["id"]][k] for k in ("num_warps", "num_stages", "grid", "kernel_name")}
        row.update(entry)
        row.setdefault("stage", "compile" if not entry.get("ok", True) else None)
        if entry.get("ok"):
            row.update(_summary(config, entry))
        if config.kernel == "block" and row.get("ok"):
            row["traffic_density_1_8"] = config.traffic(1 / 8)
        kernels.append(row)
    order = {c.id: i for i, c in enumerate(configs)}
    kernels.sort(key=lambda r: order[r["id"]])
    return {"triton_version": report["triton_version"], "target": report["target"], "kernels": kernels}


def _summary(config: KernelConfig, entry: dict) -> dict:
    """The questions the compile answers, per config: is the K/V stream multi-buffered, how deep
    is the wait in the loop, does a blocking global load stay in the loop, does it spill."""
    dtype = {"bf16": "bf16", "fp16": "f16", "fp32": "f32"}[config.dtype]
    kv = [b["buffers"] for b in entry["shared_buffers"]
          if len(b["shape"]) == 3 and b["shape"][-1] == config.head_dim and b["dtype"] == dtype]
    return {
        "kv_buffers": min(kv) if kv else 0,  # 0: K/V not staged through shared memory at all
        "async_wait_depth": min(entry["async_wait_num_in_loop"]) if entry["async_wait_num_in_loop"] else None,
        "blocking_load_in_loop": bool(entry["plain_tensor_loads_in_loop"]),
        "spills": entry["spill_store_bytes"] + entry["spill_load_bytes"] > 0,
    }
