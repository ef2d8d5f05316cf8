"""Multi-process training on one machine (issue 17): scripts/train.py as 2 processes on localhost.

JAX's own multi-controller runtime (`jax.distributed`, started by `sharding.maybe_initialize_distributed`
from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, a coordinator on 127.0.0.1), each
process with one CPU device, data parallel across the processes with gloo's CPU collectives. Against a
single-process run of the same global batch. The 2-process job is killed after its step-4 checkpoint
(SIGKILL to one process, then the other, as a launcher tears a job down) and relaunched; it resumes, and
every step's loss is within 2e-5 relative of the one-process run's, and the final checkpoint (written by
both processes through orbax) within float tolerance of its final state. (An uninterrupted 2-process
run measured 2.8e-7 at most; a bad restore would be off by far more.)
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from test_train import _env as _one_device_env
from test_train import _train_cmd

from selfspan_jax import runs
from selfspan_jax.checkpoint import Checkpointer

STEPS = 8

pytestmark = pytest.mark.slow


def _cmd(out: Path, seed: int) -> list[str]:
    # test_train's small run, trained under the span mask
    return [*_train_cmd(out, seed, STEPS), "--span-policy", "self_span"]


def _env(cache: Path, **extra) -> dict:
    """test_train's one-device environment (shared compilation cache), without a coordinator unless given."""
    env = _one_device_env(cache)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(out: Path, seed: int, cache: Path) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(_cmd(out, seed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=_env(cache, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(i)))
            for i in range(2)]


def _finish(procs: list[subprocess.Popen]) -> None:
    errs = [p.communicate(timeout=300)[1] for p in procs]
    for i, (p, err) in enumerate(zip(procs, errs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{err[-3000:]}"


def _losses(run: Path) -> list[float]:
    metrics = [m for m in runs.read_metrics(run) if "loss" in m]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # one line per step, none repeated
    return [m["loss"] for m in metrics]


def _final(run: Path, like=None):
    """The last checkpoint's (state, data). A multi-process checkpoint records its topology: restoring it
    in this one-device process needs a target tree (`like`: a state restored here), as evaluation has."""
    target = None
    if like is not None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
    with Checkpointer(run / "checkpoints") as mgr:
        assert mgr.latest_step() == STEPS
        return mgr.restore(target)


def test_two_processes_train_like_one_and_resume_after_a_kill(tmp_path):
    seed = secrets.randbelow(2**20)
    print(f"seed={seed}")
    cache = tmp_path / "jax_cache"

    one = tmp_path / "one"
    ref = subprocess.run(_cmd(one, seed), env=_env(cache), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    # Kill the job after its step-4 checkpoint: process 1 first, then process 0 (which would otherwise
    # abort by itself at the coordination service heartbeat timeout, 85 s later when measured).
    killed = tmp_path / "killed"
    procs = _launch_two(killed, seed, cache)
    ckpts = killed / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 4 for p in ckpts.iterdir()):
            break
        time.sleep(0.005)
    for p in reversed(procs):
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, "the job ended before it could be killed"
    with Checkpointer(ckpts) as mgr:
        assert 4 <= mgr.latest_step() < STEPS

    _finish(_launch_two(killed, seed, cache))
    # Steps 1-4 ran before the kill, 5-8 after the resume; each equals the one-process run's.
    np.testing.assert_allclose(_losses(killed), _losses(one), rtol=2e-5)
    state_one, data_one = _final(one)
    state_two, data_two = _final(killed, like=state_one)
    assert data_two == data_one  # the same position in the data
    for a, b in zip(jax.tree.leaves(state_two), jax.tree.leaves(state_one), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert runs.load_run(killed).step == STEPS  # what evaluate.py and generate users load, on one device
