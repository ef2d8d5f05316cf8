"""Suite-wide settings.

On a GPU, XLA runs float32 matmuls as TF32 unless told otherwise (about 1e-3 relative), while the
suite's references are float64 or full-float32 CPU runs with tolerances near 1e-5. Seen on the first
GPU visit (H200, jax 0.11.2, 2026-12-04): five test_sparq checks off by ~2e-3 under the default,
all passing with JAX_DEFAULT_MATMUL_PRECISION=highest. The suite states what it checks (the
function, at float32), so it runs at full precision; the kernel's own TF32 behaviour is checked
where it is named (TestPallas.test_default_precision_is_tf32_close). On the CPU this changes nothing.
"""

from __future__ import annotations

import jax

from pallas_kernels.backend import on_gpu

if on_gpu():
    jax.config.update("jax_default_matmul_precision", "highest")


def draws(default: int) -> int:
    """How many random inputs a randomized check draws: `default` in CI, SELFSPAN_DRAWS when set (the
    longer runs README names, e.g. SELFSPAN_DRAWS=200)."""
    import os

    value = os.environ.get("SELFSPAN_DRAWS")
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"SELFSPAN_DRAWS must be a positive int, got {value!r}")
    return int(value)
