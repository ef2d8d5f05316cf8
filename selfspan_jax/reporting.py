"""What every benchmark and evaluation shares: the environment a number was measured in,
interleaved timing, spreads, markdown tables and JSON files.

One home for these so that `scripts/evaluate.py`, the demo and every
`benchmarks/bench_*.py` time and record the same way.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np


def load_average() -> list[float] | None:
    """1/5/15-minute load average (the project machines are shared: record what a number ran under)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _proc_cpuinfo() -> str:
    """/proc/cpuinfo's text; empty where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo_field(cpuinfo: str, name: str) -> str | None:
    """The value of the first `name : value` line of a /proc/cpuinfo text, or None."""
    for line in cpuinfo.splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return None


def cpu_name() -> str:
    return _cpuinfo_field(_proc_cpuinfo(), "model name") or platform.processor() or "?"


# The vector instruction sets XLA's CPU backend compiles for. Two CPUs with different ones run other
# kernels and get float-level different results, which 1500 training steps grow into other models
# (README, "What your run will show": the same seed on an AMD EPYC and an Intel Xeon).
CPU_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile")


def cpu_isa(cpuinfo: str | None = None) -> list[str] | None:
    """Which of `CPU_ISA_FLAGS` the CPU has (from /proc/cpuinfo's first `flags` line); None where unknown."""
    flags = _cpuinfo_field(_proc_cpuinfo() if cpuinfo is None else cpuinfo, "flags")
    if flags is None:
        return None
    have = set(flags.split())
    return [flag for flag in CPU_ISA_FLAGS if flag in have]


def environment() -> dict[str, Any]:
    """What ran it: device, jax version, host, date, CPU (name, vector instruction sets) and its load."""
    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}".strip(),
        "device_count": str(jax.device_count()),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": f"{cpu_name()} ({os.cpu_count()} logical cores)",
        "cpu_isa": cpu_isa(),
        "load_average": load_average(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def interleaved_results(calls: dict[Any, Callable[[], Any]], repeats: int,
                        measure: Callable[[Callable[[], Any]], Any] = lambda fn: fn(),
                        shuffle_seed: int | None = None) -> dict[Any, list[Any]]:
    """{name: [measure(call), per repeat]} after one warm-up (compile) call of each, not measured.

    The calls take turns (1, 2, ..., 1, 2, ...): a slow spell of the shared
    machine hits every call in the same repeat instead of whichever ran last,
    so medians and paired ratios stay comparable. With `shuffle_seed`, each
    repeat takes the turns in a fresh random order: a call's position within a
    round can cost a few percent by itself (decode_loop_cost_cpu.json: 0.95x
    for a variant whose twin ran first gives 1.01x), and a fixed order turns
    that into a bias. The default measure is what the call returns: for calls
    that time themselves (e.g. `generate(outputs=Outputs(timing=True))`, which times its
    decode loop apart from prefill)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in calls.values():
        fn()
    results: dict[Any, list[Any]] = {name: [] for name in calls}
    names = list(calls)
    rng = None if shuffle_seed is None else np.random.default_rng(shuffle_seed)
    for _ in range(repeats):
        for i in (range(len(names)) if rng is None else rng.permutation(len(names))):
            results[names[i]].append(measure(calls[names[i]]))
    return results


def _wall_seconds(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_times(calls: dict[Any, Callable[[], Any]], repeats: int) -> dict[Any, list[float]]:
    """{name: [wall seconds per repeat]}, the calls taking turns as in `interleaved_results`.
    Each call must end with a host transfer (a sync), or the time is only dispatch."""
    return interleaved_results(calls, repeats, measure=_wall_seconds)


def kv_weight_ratio(config, batch: int, mean_context: float, itemsize: int) -> float:
    """r of the spec's section 5: dense KV bytes read per decode step / weight bytes per step."""
    kv_bytes = batch * config.n_layers * 2 * config.n_kv_heads * mean_context * config.head_dim * itemsize
    return kv_bytes / (config.num_params() * itemsize)


def memory_ceiling(r: float, rho: float) -> float:
    """The memory-bound speedup ceiling (1 + r) / (1 + rho r) of reading a fraction rho of the KV."""
    return (1 + r) / (1 + rho * r)


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of repeated measurements."""
    if not values:
        raise ValueError("spread of no values")
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """`result` as indented JSON (numpy scalars as floats), parent directories created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return path


def op_self_times(trace_dir: str | os.PathLike) -> dict[str, dict[str, float]]:
    """{XLA op name: {"ms": self time, "count": calls}} from a `jax.profiler` trace of one run.

    XLA:CPU records each thunk it executes (fusions, dots, gathers, the while
    loop itself) as an event on the thread that ran it, nested per thread: a
    `while` contains its body's ops. Its executor runs independent thunks on
    both pool threads at once, so the self times (an event's duration minus its
    children's on the same thread) add up to CPU time, up to twice the wall
    time on 2 cores. `ThunkExecutor::Execute*` entries are the executor's own
    dispatch and waits. Thread-pool markers are skipped (instants). Where a
    step's time goes op by op is what a wall-clock difference of two variants
    cannot say. Names are the compiled HLO's (`compile().as_text()`).
    """
    from jax.profiler import ProfileData  # the reader jax ships for its own xplane files

    files = sorted(Path(trace_dir).glob("**/*.xplane.pb"))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}: was the run traced?")
    out: dict[str, dict[str, float]] = {}
    for plane in ProfileData.from_file(str(files[-1])).planes:
        for line in plane.lines:
            if line.name == "python":  # the Python tracer's frames, not XLA's
                continue
            # "$file.py:line function": Python frames of other threads (a tqdm monitor, a test
            # runner's), which the tracer puts on lines named after their thread
            events = [(e.start_ns, e.duration_ns, e.name) for e in line.events
                      if not e.name.startswith(("ThreadpoolListener", "end: ", "$"))]
            for name, rec in nested_self_times(events).items():
                total = out.setdefault(name, {"ms": 0.0, "count": 0})
                total["ms"] += rec["ns"] / 1e6
                total["count"] += rec["count"]
    return out


def nested_self_times(events) -> dict[str, dict[str, float]]:
    """{name: {"ns": self time, "count": events}} of (start, duration, name) events on one thread,
    nested (an event that starts inside another ends inside it): self time = duration minus the
    durations of the events directly inside it."""
    out: dict[str, dict[str, float]] = {}
    stack: list[list] = []  # [end, name, time of direct children, duration]

    def close(entry):
        _, name, children, duration = entry
        rec = out.setdefault(name, {"ns": 0.0, "count": 0})
        rec["ns"] += duration - children
        rec["count"] += 1
        if stack:
            stack[-1][2] += duration

    for start, duration, name in sorted(events, key=lambda t: (t[0], -t[1])):
        while stack and stack[-1][0] <= start:
            close(stack.pop())
        stack.append([start + duration, name, 0.0, duration])
    while stack:
        close(stack.pop())
    return out


_HLO_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%([\w.\-]+) = ')
_HLO_OP_NAME = re.compile(r'metadata=\{op_name="([^"]*)"')
_HLO_BODY = re.compile(r'body=%([\w.\-]+)')
_HLO_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%([\w.\-]+) ')


def hlo_op_names(compiled_text: str) -> dict[str, str]:
    """{instruction name: the jax op_name it was lowered from} of a compiled module's text, so the ops
    of `op_self_times` can be traced back to the code that made them (a kernel's loop, a policy).

    Instructions XLA made without metadata (a dot it split off a fusion, a copy) get their while
    loop's op_name + "/body" when they sit in a loop body, else ""."""
    names: dict[str, str] = {}
    computation_of: dict[str, str] = {}
    body_origin: dict[str, str] = {}
    computation = ""
    for line in compiled_text.splitlines():
        instr = _HLO_INSTR.match(line)
        if instr is None:
            comp = _HLO_COMPUTATION.match(line)
            if comp is not None and line.rstrip().endswith("{"):
                computation = comp.group(1)
            continue
        op_name = _HLO_OP_NAME.search(line)
        names[instr.group(1)] = op_name.group(1) if op_name else ""
        computation_of[instr.group(1)] = computation
        body = _HLO_BODY.search(line)
        if body is not None and op_name is not None:
            body_origin[body.group(1)] = op_name.group(1) + "/body"
    return {name: origin or body_origin.get(computation_of[name], "") for name, origin in names.items()}


@contextlib.contextmanager
def reserved_outputs(folder: str | os.PathLike, files: Sequence[str], *, overwrite: bool = False,
                     lock: str | None = None, option: str = "--out", dir_option: str = "--out") -> Iterator[Path]:
    """Hold the output `files` (names in `folder`) for this process before any work is done for them:
    the folder must be (or become) a writable directory, an existing file is refused unless
    `overwrite`, and a second process writing the same outputs is refused while this one holds them
    (`runs.RunLock` on <folder>/`lock`, default `.<first file>.lock`). Errors name the caller's
    flags: `dir_option` for the folder, `option` for the one that picks other outputs. Yields the folder."""
    from selfspan_jax.runs import RunLock

    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{dir_option} {str(folder)!r} is a file, not a directory")
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # no permission, a name too long, ...
        raise ValueError(f"cannot create {dir_option} {str(folder)!r}: {err.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{dir_option} {str(folder)!r} is not writable")
    with RunLock(folder, name=lock or f".{files[0]}.lock", what="results folder", doing=f"is writing {files[0]} there",
                 option=option):
        existing = [str(folder / f) for f in files if (folder / f).exists()]
        if existing and not overwrite:
            raise ValueError(f"{existing[0]} exists: pass --overwrite to replace it, or choose another {option}")
        yield folder


@contextlib.contextmanager
def reserved_output(path: str | os.PathLike | None, *, overwrite: bool = False, option: str = "--out",
                    prog: str | None = None):
    """`reserved_outputs` for the one file a benchmark writes (`--out PATH`; None: nothing to hold).
    With `prog`, a refusal ends the script with "<prog>: error: ..." (exit status 2) instead of raising."""
    if path is None:
        yield None
        return
    path = Path(path)
    held = reserved_outputs(path.parent, [path.name], overwrite=overwrite, option=option, dir_option=option)
    try:
        held.__enter__()
    except ValueError as err:
        if prog is None:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    with contextlib.ExitStack() as stack:
        stack.push(held)  # released however the work ends
        yield path


def machine_of(result: dict) -> str:
    """The CPU or device a result JSON ran on, for a plot's title (the CPU changes these numbers)."""
    env = result.get("environment", {})
    return env.get("cpu") if str(env.get("device", "")).startswith("cpu") and env.get("cpu") else env.get("device", "")
