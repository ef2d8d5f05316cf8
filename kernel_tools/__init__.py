"""Offline views of what the kernels become on a GPU, from a CPU-only machine.

`triton_capture` exports a kernel for an abstract H100 and keeps its Triton
module as text; `sm90` compiles those modules for sm_90 with the `triton` pip
package in its own virtual environment, through `sm90_worker` (which runs in
that environment and imports nothing from this project). None of it is needed
to run the kernels; it is what CI and tools/gpu/ use to check them.
"""
