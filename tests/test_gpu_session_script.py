"""tools/gpu/gpu_session.sh's `mosaic` stage, dry-run on the CPU: the same steps (the Mosaic tests, the
fixed cost, the side-by-side sweep) with the interpreted kernel against the XLA path at toy sizes, so
that the GPU call that decides `backend="auto"` cannot fail on a script error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mosaic_stage_runs_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "DRY_RUN": "1",
           "MOSAIC_BACKEND": "mosaic_interpret", "TRITON_BACKEND": "xla"}
    proc = subprocess.run(["bash", "tools/gpu/gpu_session.sh", "mosaic"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    for step in ("== tests exit 0", "== fixed cost exit 0", "== bench exit 0"):
        assert step in log, log[-3000:]
    assert (out / "pytest.xml").exists()
    fixed = json.loads((out / "kernel_fixed_cost_gpu_mosaic.json").read_text())
    assert fixed["backend"] == "mosaic_interpret" and fixed["groups"][0]["points"][0]["live_blocks"] == 0
    sweep = json.loads((out / "kernel_gpu_mosaic.json").read_text())
    assert sweep["backends"] == ["xla", "mosaic_interpret"] and not sweep["backend_failures"]
    assert {r["backend"] for r in sweep["backend_comparison"]} == {"mosaic_interpret"}
    assert (out / "kernel_gpu_mosaic.png").exists()
