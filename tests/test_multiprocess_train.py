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

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from test_train import _env as _one_device_env
from test_train import ROOT, _train_cmd

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


def _launch_two(out: Path, seed: int, cache: Path, logs: Path) -> list[subprocess.Popen]:
    """The 2-process job; each process's stderr goes to logs/process<i>.err (a file, not a pipe: a
    pipe nobody reads while the other process is waited for would block its writer mid-step)."""
    logs.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(_cmd(out, seed), stdout=subprocess.DEVNULL, stderr=open(logs / f"process{i}.err", "w"),
                             env=_env(cache, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                      JAX_PROCESS_ID=str(i)))
            for i in range(2)]


# A step takes well under a second here and a compile a few seconds; this long without a new
# metrics line is a hang (the persistent-cache collective hang of jax 0.12.1 looked like this).
STALL_S = 90


def _finish(procs: list[subprocess.Popen], run: Path, logs: Path, limit_s: float = 300) -> None:
    """Wait for both processes; fail at once, with what each printed, when one fails or the job stops
    making progress (no new step in STALL_S seconds) instead of waiting out the whole limit."""
    start = last_change = time.time()
    seen = -1
    while any(p.poll() is None for p in procs):
        steps = len(runs.read_metrics(run))
        if steps != seen:
            seen, last_change = steps, time.time()
        failed = [p for p in procs if p.poll() not in (None, 0)]
        if failed or time.time() - last_change > STALL_S or time.time() - start > limit_s:
            for p in procs:
                p.kill()
                p.wait()
            errs = "\n".join(f"--- process {i}:\n{(logs / f'process{i}.err').read_text()[-2000:]}"
                              for i in range(len(procs)))
            why = (f"a process exited {[p.returncode for p in failed]}" if failed else
                   f"no new step for {time.time() - last_change:.0f} s after {seen} metrics lines: the job hangs "
                   f"(jax {jax.__version__}; for the persistent-cache hang of jax 0.12.1 see docs/notes/dependencies.md)")
            pytest.fail(f"2-process job in {run}: {why}\n{errs}")
        time.sleep(0.2)
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{(logs / f'process{i}.err').read_text()[-3000:]}"


def _losses(run: Path) -> list[float]:
    metrics = [m for m in runs.read_metrics(run) if "loss" in m]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # one line per step, none repeated
    return [m["loss"] for m in metrics]


def _final(run: Path, like=None):
    """The last checkpoint's (state, data). A multi-process checkpoint records its topology: restoring it
    in this one-device process needs a target tree (`like`: a state restored here), as evaluation has."""
    target = None
    if like is not None:
        device = jax.sharding.make_single_device_sharding(jax.devices()[0])
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
    procs = _launch_two(killed, seed, cache, tmp_path / "logs_first")
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

    _finish(_launch_two(killed, seed, cache, tmp_path / "logs_resumed"), killed, tmp_path / "logs_resumed")
    # Steps 1-4 ran before the kill, 5-8 after the resume; each equals the one-process run's.
    np.testing.assert_allclose(_losses(killed), _losses(one), rtol=2e-5)
    state_one, data_one = _final(one)
    state_two, data_two = _final(killed, like=state_one)
    assert data_two == data_one  # the same position in the data
    for a, b in zip(jax.tree.leaves(state_two), jax.tree.leaves(state_one), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert runs.load_run(killed).step == STEPS  # what evaluate.py and generate users load, on one device


_CACHED_STEP = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from selfspan_jax import sharding

    hits = []
    jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event)
                                           if event == "/jax/compilation_cache/cache_hits" else None)
    sharding.maybe_initialize_distributed()
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rep, row = NamedSharding(mesh, P()), NamedSharding(mesh, P("x"))
    local = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 100 + jax.process_index()
    x = jax.make_array_from_process_local_data(row, local)
    w = jax.device_put(jnp.ones((16, 4), jnp.float32), rep)

    def step(w, x):  # a data-parallel SGD step: the gradient is all-reduced across the processes
        loss, g = jax.value_and_grad(lambda w: jnp.mean((x @ w) ** 2))(w)
        return w - 0.01 * g, loss

    w, loss = jax.jit(step, in_shardings=(rep, row), out_shardings=(rep, rep), donate_argnums=0)(w, x)
    print(json.dumps({"loss": float(loss.addressable_data(0)), "cache_hits": len(hits),
                      "cache_on": bool(jax.config.jax_enable_compilation_cache)}))
""")


def test_a_collective_program_from_the_compilation_cache_runs(tmp_path):
    """Run twice over one persistent cache: the second run's process 0 loads the SGD step from the
    cache (only process 0 writes it; process 1's keys differ, so it compiles). On jax 0.12.1 that
    mixture hung every time (CPU; docs/notes/dependencies.md); `sharding.maybe_initialize_distributed`
    turns the cache off on the versions listed in CACHE_HANG_JAX_VERSIONS. Either way both runs must
    finish, and elsewhere the second run must really have loaded the step from the cache."""
    from selfspan_jax import sharding

    cache = tmp_path / "jax_cache"
    results = []
    for attempt in range(2):
        address = f"127.0.0.1:{_free_port()}"
        procs = [subprocess.Popen([sys.executable, "-c", _CACHED_STEP], stdout=subprocess.PIPE,
                                  stderr=open(tmp_path / f"run{attempt}_{i}.err", "w"), text=True,
                                  env=_env(cache, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                           JAX_PROCESS_ID=str(i), PYTHONPATH=str(ROOT)))
                 for i in range(2)]
        deadline = time.time() + 60
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.1)
        hung = [i for i, p in enumerate(procs) if p.poll() is None]
        for p in procs:
            p.kill()
        errs = {i: (tmp_path / f"run{attempt}_{i}.err").read_text()[-1500:] for i in range(2)}
        assert not hung, (f"run {attempt}: processes {hung} still waiting after 60 s on a 2-process SGD step "
                          f"with the persistent compilation cache (jax {jax.__version__}): the cached-collective "
                          f"hang; add this version to sharding.CACHE_HANG_JAX_VERSIONS\n{errs}")
        assert [p.returncode for p in procs] == [0, 0], errs
        results.append([json.loads(p.stdout.read().strip().splitlines()[-1]) for p in procs])
    losses = {r["loss"] for run in results for r in run}
    assert len(losses) == 1, results  # both processes, both runs: one global loss
    second = results[1]
    if jax.__version__ in sharding.CACHE_HANG_JAX_VERSIONS:
        assert not any(r["cache_on"] for run in results for r in run)
        assert all("persistent compilation cache" in (tmp_path / f"run{a}_{i}.err").read_text()
                   for a in range(2) for i in range(2))
    else:
        assert second[0]["cache_hits"] >= 1 and second[1]["cache_hits"] == 0, second  # the mixture happened
