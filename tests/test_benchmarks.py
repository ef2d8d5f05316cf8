"""The training-step FLOP count of the benchmarks against XLA's own count of the compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_script
from hypothesis import given, settings
from hypothesis import strategies as st
from flax import nnx

from selfspan_jax import reporting
from selfspan_jax.benchmarks import step_flops
from selfspan_jax.config import LlamaConfig
from selfspan_jax.lora import apply_lora, lora_trainable_filter
from selfspan_jax.model import Llama


def _xla_step_flops(model, trainable_filter, batch: int, seq: int) -> float:
    """XLA's flop count of a compiled loss-and-gradient step over what `trainable_filter` selects."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)

    def loss(trainable, frozen, tokens):
        logits = nnx.merge(graphdef, trainable, frozen)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])

    tokens = jnp.zeros((batch, seq), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen, tokens).compile()
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


@pytest.mark.parametrize("lora_rank, lora_mlp", [(0, False), (8, False), (8, True)])
def test_step_flops_match_xla_cost_analysis(lora_rank, lora_mlp):
    """Our count leaves out elementwise work, which XLA counts, and keeps the gradient into the first
    layer's input, which XLA drops when nothing below it trains (measured: 0.98, 1.007, 0.997 of XLA)."""
    config = LlamaConfig.preset("tiny", vocab_size=1024, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2,
                                mlp_dim=768, max_seq_len=128)
    model = Llama(config, rngs=nnx.Rngs(0))
    if lora_rank:
        apply_lora(model, rank=lora_rank, alpha=16.0, include_mlp=lora_mlp, rngs=nnx.Rngs(1))
    flt = lora_trainable_filter if lora_rank else nnx.Param
    batch, seq = 4, 64
    ours = step_flops(config, batch, seq, lora_rank=lora_rank, lora_mlp=lora_mlp, full=not lora_rank)["total"]
    xla = _xla_step_flops(model, flt, batch, seq)
    assert 0.85 * xla <= ours <= 1.03 * xla, (ours, xla, ours / xla)


def test_decode_point_pairs_repeats_and_reads_the_trace():
    """The decode benchmark's timing routine on a tiny model: forced along a real span trace, dense's
    paired ratio with itself is exactly 1 in every repeat, the spread is ordered, and the KV read
    fractions are measured from the selections (self_span reads less than dense)."""
    from selfspan_jax.benchmarks import decode_point, reference_traces, trace_stream
    from selfspan_jax.generation import KernelOptions
    from selfspan_jax.tokenizer import CharTokenizer

    tok = CharTokenizer()
    config = LlamaConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512)
    model = Llama(config, rngs=nnx.Rngs(0))
    traces = reference_traces(8, "harder", seed=1)
    rows = [trace_stream(traces[i:] + traces[:i], tok, 300) for i in range(2)]
    pt = decode_point(model, rows, batch=2, context=256, new_tokens=28, policies={"dense": "dense",
                      "self_span": "self_span"}, repeats=2, tokenizer=tok, block_size=16,
                      kernel=KernelOptions(backend="xla"))
    assert pt["decode_steps"] == 27  # token 0 comes from prefill
    assert all(t > 0 for t in pt["self_span"]["decode_s_per_repeat"] + pt["self_span"]["prefill_s_per_repeat"])
    assert pt["self_span"]["speedup_per_repeat"] == pytest.approx(
        [d / s for d, s in zip(pt["dense"]["decode_s_per_repeat"], pt["self_span"]["decode_s_per_repeat"])])
    assert pt["dense"]["speedup_per_repeat"] == [1.0, 1.0] and pt["dense"]["kv_read_fraction"] == 1.0
    sp = pt["self_span"]["speedup_spread"]
    assert sp["min"] <= sp["median"] <= sp["max"] and pt["self_span"]["speedup"] == sp["median"]
    assert 0 < pt["self_span"]["kv_read_fraction"] < 1
    with pytest.raises(ValueError, match="dense"):
        decode_point(model, rows, batch=2, context=256, new_tokens=28, policies={"self_span": "self_span"},
                     repeats=1, tokenizer=tok)


def test_profile_loop_pairs_rounds_and_stops_at_max_seconds(tmp_path):
    """The decode-loop profiler (what a GPU visit runs): each variant's speedup is the median of the
    per-round ratios of its own times, the ceiling uses self_span's measured rho, and with
    --max-seconds 0 nothing past the first point is measured but the JSON still says which were not."""
    import json
    import statistics

    profile_loop = load_script("benchmarks/profile_loop.py")

    from selfspan_jax.reporting import memory_ceiling

    out = tmp_path / "loop.json"
    common = ["--batch", "2", "--steps", "3", "--block-size", "16", "--max-segments", "64",
              "--variants", "dense,self_span,self_span +stats", "--out", str(out), "--overwrite"]
    assert profile_loop.main([*common, "--context", "48", "--repeats", "3", "--dtype", "bfloat16"]) == 0
    result = json.loads(out.read_text())
    (pt,) = result["points"]
    assert result["not_measured"] == [] and "bfloat16" in result["label"]
    dense, span = pt["dense"]["all_ms_per_step"], pt["self_span"]["all_ms_per_step"]
    assert len(dense) == len(span) == 3
    assert pt["self_span"]["speedup_vs_dense"]["median"] == pytest.approx(
        statistics.median(d / s for d, s in zip(dense, span)))
    rho = pt["self_span +stats"]["rho"]
    assert 0 < rho <= 1 and pt["ceiling"]["ceiling"] == pytest.approx(memory_ceiling(pt["ceiling"]["r"], rho))

    # --op-profile: one traced call per variant, its XLA ops' CPU time by part of the step
    assert profile_loop.main([*common, "--context", "48", "--repeats", "1", "--variants", "dense,self_span",
                              "--op-profile", str(tmp_path / "trace")]) == 0
    (pt,) = json.loads(out.read_text())["points"]
    for name in ("dense", "self_span"):
        groups = pt[name]["op_group_cpu_ms_per_step"]
        assert groups["kernel loop (reads K/V)"] > 0 and groups["weight matmuls"] > 0
        assert all(v >= 0 for v in groups.values())
        # the kernel's loop body runs once per work-list step, several times per decode step
        loop_ops = [o for o in pt[name]["op_cpu_ms_per_step"].values()
                    if "_block_sparse_decode_jit)/while/body" in o["from"]]
        assert loop_ops and all(o["calls_per_step"] >= 1 for o in loop_ops)
    assert "block list" in pt["self_span"]["op_group_cpu_ms_per_step"]

    assert profile_loop.main([*common, "--context", "48,80", "--repeats", "1", "--max-seconds", "0"]) == 0
    result = json.loads(out.read_text())
    assert result["points"] == [] and result["not_measured"] == [{"batch": 2, "context": 48},
                                                                 {"batch": 2, "context": 80}]


def test_kernel_bench_gives_every_call_its_own_cache_and_counts_launches():
    """bench_kernel's copies rule (XLA merges unrolled dots that share a cache: GPU visit 2) and
    kernel_fixed_cost's helpers: the launch counter reads the optimized HLO, the line fit recovers
    a known intercept and slope and ignores n = 0."""
    import numpy as np

    from selfspan_jax import kernel_bench

    mb = 1 << 20
    # enough copies to pass the cache, at least unroll_min, at most what the budget holds, never 0
    assert kernel_bench.cache_copies(32 * mb, rotate_bytes=256 * mb, unroll_min=8, budget_bytes=24 << 30) == 8
    assert kernel_bench.cache_copies(4 * mb, rotate_bytes=256 * mb, unroll_min=8, budget_bytes=24 << 30) == 64
    assert kernel_bench.cache_copies(1 << 30, rotate_bytes=256 * mb, unroll_min=8, budget_bytes=4 << 30) == 4
    assert kernel_bench.cache_copies(8 << 30, rotate_bytes=256 * mb, unroll_min=8, budget_bytes=4 << 30) == 1

    x = jnp.ones((64, 64), jnp.float32)
    # parameters, constants, tuples and bitcasts are not launches; the identity's output is at most a copy
    assert set(kernel_bench.launched_ops(lambda a: a, x)) <= {"copy"}
    ops = kernel_bench.launched_ops(lambda a: jnp.sin(a @ a).sum(axis=0), x)
    assert sum(ops.values()) >= 1 and not set(ops) & set(kernel_bench.NOT_KERNELS)

    rng = np.random.default_rng()
    t0, slope = rng.uniform(5, 30), rng.uniform(0.1, 3)
    ns = [0, 1, 2, 4, 8, 16]
    ts = [(t0 + n * slope) * 1e-6 if n else 1.0 for n in ns]  # n = 0 is off the line and must be ignored
    fit = kernel_bench.fit_line(ns, ts)
    assert fit["t0_us"] == pytest.approx(t0, rel=1e-6) and fit["slope_us_per_block"] == pytest.approx(slope, rel=1e-6)


def _brute_force_self_times(events):
    """Self time of each event: its duration minus those of the events directly inside it (inside it
    and inside no other event that is inside it)."""
    def inside(a, b):  # a within b, a is not b
        return a is not b and b[0] <= a[0] and a[0] + a[1] <= b[0] + b[1] and (a[0], -a[1]) > (b[0], -b[1])

    out = {}
    for e in events:
        kids = [c for c in events if inside(c, e) and not any(inside(c, m) and inside(m, e) for m in events)]
        rec = out.setdefault(e[2], {"ns": 0, "count": 0})
        rec["ns"] += e[1] - sum(c[1] for c in kids)
        rec["count"] += 1
    return out


@given(st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_nested_self_times_match_brute_force(seed):
    """Random nested profiles (a loop containing ops containing ops, gaps between them)."""
    from selfspan_jax.reporting import nested_self_times

    rng = np.random.default_rng(seed)
    events = []

    def fill(start, end, depth):
        t = start
        while depth < 3 and rng.random() < 0.7:
            begin = t + int(rng.integers(0, 5))
            stop = begin + int(rng.integers(1, 30))
            if stop > end or (begin, stop) == (start, end):  # a child as long as its parent is ambiguous
                break
            events.append((begin, stop - begin, f"op{rng.integers(4)}"))
            fill(begin, stop, depth + 1)
            t = stop
    events.append((0, 200, "while"))
    fill(0, 200, 0)
    rng.shuffle(events)
    got = nested_self_times(events)
    want = _brute_force_self_times(events)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name]["count"] == want[name]["count"] and got[name]["ns"] == pytest.approx(want[name]["ns"])


def test_op_self_times_and_hlo_op_names_trace_a_loop_back_to_its_source(tmp_path):
    """A jitted 7-step loop, traced: its body's ops run 7 times each, every traced XLA op is an
    instruction of the compiled text, and ops XLA made without metadata inside the loop body are
    attributed to the loop."""
    from selfspan_jax.reporting import hlo_op_names, op_self_times

    @jax.jit
    def f(x, w):
        return jax.lax.fori_loop(0, 7, lambda i, x: jnp.tanh(x @ w) + i, x)

    x, w = jnp.ones((64, 64)), jnp.eye(64) * 0.5
    jax.block_until_ready(f(x, w))
    # a Python thread busy during the trace (as tqdm's monitor or a test runner's can be): the
    # tracer records its frames ("$file.py:line function") on a line of its own, and they are not ops
    import threading
    import time

    done = threading.Event()

    def busy():
        while not done.is_set():
            with threading.Lock():
                time.sleep(0.001)

    thread = threading.Thread(target=busy, name="busy")
    thread.start()
    try:
        with jax.profiler.trace(str(tmp_path)):
            jax.block_until_ready(f(x, w))
            time.sleep(0.05)
    finally:
        done.set()
        thread.join()
    ops = op_self_times(tmp_path)
    assert not [op for op in ops if op.startswith("$")]
    origins = hlo_op_names(f.lower(x, w).compile().as_text())
    xla_ops = {op: r for op, r in ops.items() if not op.startswith(("ThunkExecutor", "SlinkyThreadPool"))}
    assert xla_ops and set(xla_ops) <= set(origins)
    body = {op: r for op, r in xla_ops.items() if "while/body" in origins[op]}
    assert body and all(r["count"] == 7 for r in body.values())
    assert any(origins[op].endswith("dot_general") or origins[op].endswith("while/body") for op in body)
    assert all(r["ms"] >= 0 for r in ops.values())
    with pytest.raises(FileNotFoundError, match="xplane"):
        op_self_times(tmp_path / "nothing")


def test_ceiling_plots_name_the_machine(tmp_path):
    """Decode ratios differ between CPUs (docs/notes/generation.md), so the ceiling plots say which ran them."""
    from selfspan_jax import benchmarks as bench

    cpu = {"environment": {"device": "cpu: cpu", "cpu": "AMD EPYC (2 logical cores)"}}
    gpu = {"environment": {"device": "gpu: NVIDIA H200", "cpu": "Intel(R) Xeon(R)"}}
    assert reporting.machine_of(cpu) == "AMD EPYC (2 logical cores)"
    assert reporting.machine_of(gpu) == "gpu: NVIDIA H200"
    assert reporting.machine_of({}) == ""
    png = tmp_path / "c.png"
    bench.plot_fraction_of_ceiling({"s": [(1, {"min": 0.9, "median": 1.0, "max": 1.1})]}, png, "t",
                                   machine=reporting.machine_of(cpu))
    assert png.stat().st_size > 0


def test_kernel_bench_sweeps_without_jax_peer_ops(tmp_path, monkeypatch):
    """jax's Pallas GPU decode ops are comparison columns, not requirements: jax 0.12.1 removed both.
    Each column is timed when its module imports and left out with the reason otherwise; the sweep
    never stops on a missing peer. Here: decode_attention present (a float64-checked stand-in with its
    signature), paged_attention missing."""
    import importlib
    import json
    import types

    from selfspan_jax import kernel_bench
    from selfspan_jax.cli import bench_kernel

    assert all("no GPU" in why for why in bench_kernel.peer_ops(gpu=False).values())
    real_import = importlib.import_module

    def only_decode(name, *a, **kw):
        if name == kernel_bench.PEER_MODULES["jax_paged"]:
            raise ModuleNotFoundError(f"No module named {name!r}")
        if name == kernel_bench.PEER_MODULES["jax_decode"]:
            return types.SimpleNamespace(decode_attn_unbatched=_reference_decode)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", only_decode)
    peers = bench_kernel.peer_ops(gpu=True)
    assert peers["jax_decode"].decode_attn_unbatched is _reference_decode
    assert f"jax {jax.__version__} has no {kernel_bench.PEER_MODULES['jax_paged']}" in peers["jax_paged"]

    monkeypatch.setattr(bench_kernel, "peer_ops", lambda gpu: peers)
    out = tmp_path / "k.json"
    result = bench_kernel.main(["--quick", "--heads", "gqa", "--batches", "1", "--contexts", "256", "--block-sizes",
                                "64", "--densities", "0.5", "--reps", "1", "--out", str(out)])
    assert result["peers"]["jax_decode"] == "timed" and result["peers"]["jax_paged"].startswith("left out: jax ")
    (group,) = result["groups"]
    assert group["baselines"]["jax_decode"]["max_abs_diff_vs_dpa"] < 1e-5
    assert len(group["points"]) == 2 and all("speedup_vs_jax_decode" in p for p in group["points"])
    assert not any("jax_paged_median_s" in p for p in group["points"])
    assert json.loads(out.read_text())["peers"] == result["peers"]


def _reference_decode(q, k, v, start_idx, kv_seq_len, *, sm_scale, **_):
    """jax's decode_attn_unbatched contract for one (batch, KV head): q [G, H], k and v [S, H]."""
    logits = jnp.einsum("gh,sh->gs", q.astype(jnp.float32), k.astype(jnp.float32)) * sm_scale
    return (jax.nn.softmax(logits, axis=-1) @ v.astype(jnp.float32)).astype(q.dtype)


@pytest.mark.parametrize("script, extra", [
    ("bench_decode", []), ("bench_prefill", []), ("profile_loop", []), ("profile_decode", []),
    ("plot_spans", ["nosuch-run"]), ("bench_kernel", ["--quick"]),
    ("kernel_fixed_cost", ["--quick", "--backend", "interpret"]), ("compile_kernel_sm90", []),
    ("bench_train_step", None),
])
def test_benchmarks_refuse_to_replace_a_result_before_measuring(script, extra, tmp_path, capsys):
    """Every benchmark holds its output before any work: an existing file is replaced only with
    --overwrite, and a second process writing it is refused (reporting.reserved_output)."""
    folder = {"plot_spans": "scripts", "compile_kernel_sm90": "tools/gpu"}.get(script, "benchmarks")
    module = load_script(f"{folder}/{script}.py")
    out = tmp_path / "result.json"
    out.write_text("{}")
    argv = ["--out-dir", str(tmp_path), "--name", "result"] if extra is None else [*extra, "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    assert stop.value.code == 2 and out.read_text() == "{}"
    assert f"{script}.py: error: {out} exists: pass --overwrite to replace it" in capsys.readouterr().err
    out.unlink()
    with reporting.reserved_output(out):  # another run of the benchmark is writing it
        with pytest.raises(SystemExit):
            module.main(argv)
    assert "is in use: pid" in capsys.readouterr().err and not out.exists()


def test_bench_kernel_times_backends_side_by_side(tmp_path):
    """--backends: the first backend fills each point, every other one is timed on the same inputs
    right after it, with its output compared to the first's (bf16: the Mosaic kernel in the GPU
    interpreter against the XLA path)."""
    from selfspan_jax.cli import bench_kernel

    result = bench_kernel.main(["--quick", "--heads", "gqa", "--batches", "1", "--contexts", "256", "--block-sizes",
                                "64", "--densities", "0.5", "--reps", "1", "--dtype", "bfloat16",
                                "--backends", "xla", "mosaic_interpret", "--out", str(tmp_path / "k.json")])
    (group,) = result["groups"]
    assert group["backend"] == "xla" and result["backends"] == ["xla", "mosaic_interpret"]
    for point in group["points"]:
        entry = point["by_backend"]["mosaic_interpret"]
        assert entry["median_s"] > 0 and entry["speedup_vs_first"] == pytest.approx(point["median_s"] / entry["median_s"])
        assert entry["max_abs_diff_vs_first"] < 0.03  # the same attention, bf16 output
    assert "speedup_vs_all_blocks" in group["points"][1]["by_backend"]["mosaic_interpret"]
    assert {(r["backend"], r["density"]) for r in result["backend_comparison"]} == {("mosaic_interpret", 1.0),
                                                                                    ("mosaic_interpret", 0.5)}


def test_bench_kernel_keeps_going_when_a_backend_fails(tmp_path, monkeypatch):
    """A backend that raises (e.g. a kernel the GPU's compiler refuses) is recorded with its error and not
    tried again; the first backend's points are all there."""
    from selfspan_jax.cli import bench_kernel

    real = bench_kernel.block_sparse_decode

    def failing(*a, backend, **kw):
        if backend == "reference":
            raise RuntimeError("ptxas refused the module")
        return real(*a, backend=backend, **kw)

    monkeypatch.setattr(bench_kernel, "block_sparse_decode", failing)
    result = bench_kernel.main(["--quick", "--heads", "gqa", "--batches", "1", "--contexts", "256", "512",
                                "--block-sizes", "64", "--densities", "0.5", "--reps", "1",
                                "--backends", "xla", "reference", "--out", str(tmp_path / "k.json")])
    assert result["backend_failures"] == {"reference": "RuntimeError: ptxas refused the module"}
    first, second = result["groups"]
    assert first["points"][0]["by_backend"]["reference"]["error"].startswith("RuntimeError")
    assert all("by_backend" not in p for p in first["points"][1:] + second["points"])
    assert len(first["points"]) == len(second["points"]) == 2 and result["backend_comparison"] == []


def test_kernel_fixed_cost_on_the_mosaic_kernel(tmp_path):
    """--backend mosaic_interpret: op and op_ks1 against live blocks (the Mosaic op at one split is its
    kernel alone, so there is no separate kernel row); a float32 cache is refused before any work."""
    module = load_script("benchmarks/kernel_fixed_cost.py")
    with pytest.raises(SystemExit, match="16-bit"):
        module.main(["--backend", "mosaic_interpret", "--quick", "--dtype", "float32", "--out", str(tmp_path / "a.json")])
    result = module.main(["--backend", "mosaic_interpret", "--quick", "--out", str(tmp_path / "k.json")])
    (group,) = result["groups"]
    assert group["head_dim"] == 64 and [p["live_blocks"] for p in group["points"]] == [0, 1, 2, 4]
    assert all(set(p) >= {"op", "op_ks1"} and "kernel" not in p for p in group["points"])
    assert set(group["fits"]) == {"op", "op_ks1"} and set(group["launched_ops"]) == {"dpa_unrolled", "op", "op_ks1"}
