"""The Mosaic GPU kernel as it would run on an H100, lowered on a CPU-only machine.

`jax.export` for cuda runs Pallas's whole Mosaic GPU lowering (layout
inference, TMA descriptors, wgmma) and leaves one `mosaic_gpu_v2` custom call
per kernel holding the serialized module; Mosaic targets sm_90 when no GPU is
attached. What a call launches is read off the exported module: the custom
calls, and every other op of the program (reshapes and constants are not
launches; anything else is XLA work around the kernel).
"""

from __future__ import annotations

import dataclasses
import re

import jax
from jax import export

MOSAIC_CALL = "mosaic_gpu_v2"
# Ops of an exported program that launch nothing: views, constants, the function's plumbing.
# sdy.sharding_constraint comes from exporting under the abstract one-device mesh; func.call only
# enters a private function, whose ops are counted themselves.
_FREE_OPS = {"stablehlo.reshape", "stablehlo.constant", "func.return", "stablehlo.bitcast_convert",
             "stablehlo.optimization_barrier", "sdy.sharding_constraint", "func.call"}
_OP = re.compile(r"=\s*\"?([a-z_]+\.[a-z_0-9]+)\"?[\s(]|^\s*\"?((?:func|stablehlo)\.return)\b", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class LoweredCall:
    """What one exported call runs: its Mosaic custom calls and the other ops around them."""

    text: str  # the exported StableHLO module
    mosaic_calls: int
    other_ops: tuple[str, ...]  # op names, in program order, that are neither the kernel nor free

    @property
    def serialized_bytes(self) -> int:
        """Size of the kernel's serialized module(s) in the custom calls' backend config."""
        return sum(len(m) for m in re.findall(r'module = "((?:[^"\\]|\\.)*)"', self.text))


def _h100_mesh():
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")
    return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


def lower_for_h100(fn, *avals) -> LoweredCall:
    """Exports jit(fn) for cuda against an abstract H100 and lists what the call runs."""
    with jax.sharding.use_abstract_mesh(_h100_mesh()):
        exported = export.export(jax.jit(fn), platforms=["cuda"])(*avals)
    text = exported.mlir_module()
    ops = [a or b for a, b in _OP.findall(text)]
    calls = len(re.findall(rf"stablehlo\.custom_call @{MOSAIC_CALL}\b", text))
    other = tuple(op for op in ops if op not in _FREE_OPS and op != "stablehlo.custom_call")
    return LoweredCall(text=text, mosaic_calls=calls, other_ops=other)
