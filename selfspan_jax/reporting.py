"""What every benchmark and evaluation shares: the environment a number was measured in,
interleaved timing, spreads, markdown tables and JSON files.

One home for these so that `scripts/evaluate.py`, the demo and every
`scripts/bench_*.py` time and record the same way.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np


def load_average() -> list[float] | None:
    """1/5/15-minute load average (the project machines are shared: record what a number ran under)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def environment() -> dict[str, Any]:
    """What ran it: device, jax version, host, date, CPU and its load."""
    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}".strip(),
        "device_count": str(jax.device_count()),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu": f"{cpu_name()} ({os.cpu_count()} logical cores)",
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
    that time themselves (e.g. `generate(return_timing=True)`, which times its
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
