"""The Triton module that Pallas hands to XLA for an H100, obtained without a GPU.

`jax.export` against an abstract H100 (docs/spec.md §4) runs the whole Pallas ->
Triton lowering and serialises the module as bytecode into the
`__gpu$xla.gpu.triton` custom call. That proves lowering; what the GPU will
execute is only seen once the module goes through Triton's own pipeline
(TTIR -> TTGIR with the software pipeliner -> LLVM -> PTX -> cubin). This file
keeps the module as text so that a separate process with the `triton` pip
package can compile it for sm_90 (tools/gpu/compile_kernel_sm90.py).

Why by hand: jax offers no API returning the Triton module of a pallas_call;
its lowering rule calls `lowering.lower_jaxpr_to_triton_module` and writes the
result as bytecode, which only the same MLIR version can read back. Wrapping
that one call during an export is the least intrusive hook, and the module's
generic text form is what another MLIR build parses most reliably.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

import jax
from jax import export

TRITON_CALL = "__gpu$xla.gpu.triton"
H100_CORES = 132


def _h100_mesh():
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=H100_CORES, platform="gpu")
    return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


def export_for_h100(fn, *avals):
    """jax.export of jit(fn) for CUDA against an abstract H100: runs the Pallas -> Triton lowering."""
    with jax.sharding.use_abstract_mesh(_h100_mesh()):
        return export.export(
            jax.jit(fn),
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(*avals)


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One pallas_call as Triton will compile it: module text and launch parameters."""

    name: str
    ttir: str  # the Triton-dialect module, MLIR generic form
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@contextlib.contextmanager
def _recording_modules():
    from jax._src.pallas.triton import lowering

    modules = []
    original = lowering.lower_jaxpr_to_triton_module

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        modules.append(result.module.operation.get_asm(print_generic_op_form=True))
        return result

    lowering.lower_jaxpr_to_triton_module = recording
    try:
        yield modules
    finally:
        lowering.lower_jaxpr_to_triton_module = original


_LAUNCH = re.compile(
    r"grid_x = (\d+) : i32, grid_y = (\d+) : i32, grid_z = (\d+) : i32.*?"
    r"name = \"([^\"]+)\", num_stages = (\d+) : i32, num_warps = (\d+) : i32",
    re.DOTALL,
)


def capture_triton_kernels(fn, *avals) -> list[TritonKernel]:
    """Exports fn for an H100 and returns every Triton kernel in it, in call order."""
    with _recording_modules() as modules:
        text = export_for_h100(fn, *avals).mlir_module()
    launches = [m.groups() for m in _LAUNCH.finditer(text)]
    if len(launches) != len(modules) or text.count(TRITON_CALL) != len(modules):
        raise RuntimeError(
            f"captured {len(modules)} Triton modules but the export has {text.count(TRITON_CALL)} "
            f"Triton calls ({len(launches)} with readable launch parameters): jax's lowering changed"
        )
    return [
        TritonKernel(name=name, ttir=ttir, num_warps=int(warps), num_stages=int(stages), grid=(int(x), int(y), int(z)))
        for ttir, (x, y, z, name, stages, warps) in zip(modules, launches)
    ]
