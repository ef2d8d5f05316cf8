"""CPU forward time of SmolLM2-135M-Instruct: our jitted Llama vs the PyTorch reference.

    .venv/bin/python benchmarks/bench_forward.py [--torch-python /tmp/torchref/bin/python]

Both sides load the same GGUF (ours via `load_model`, PyTorch via transformers'
GGUF loader, both dequantized to fp32), run a full forward with fp32 logits on
the same random tokens for each shape ([1, 256] and [8, 256] by default), and
report the median wall time of --repeats runs after --warmup runs. The PyTorch
side is a long-lived subprocess (this same file with --torch-worker) under the
Python 3.11 + torch venv, since the project itself never imports torch; runs
of the two sides alternate, so both see the same background load on the
shared cores. The last-position logits of both are compared as a
sanity check. Writes benchmarks/results/decode/forward_cpu.json and prints a table.

Only the standard library is imported at module level so the torch worker
does not need jax.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# PyTorch side (runs under the torch venv)
# ---------------------------------------------------------------------------
def torch_worker(args) -> None:
    """Serves timed forwards: reads "KEY" lines on stdin, answers one JSON line each.

    Kept alive for the whole run so that our runs and PyTorch's can alternate
    and see the same background load (the CPU is shared).
    """
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    folder, name = os.path.split(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokens = {
        key: torch.from_numpy(np.load(os.path.join(args.workdir, f"tokens_{key}.npy")).astype(np.int64))
        for key in args.shapes.split(",")
    }
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        key = line.strip()
        with torch.no_grad():
            t0 = time.perf_counter()
            logits = model(tokens[key]).logits
            dt = time.perf_counter() - t0
        np.save(os.path.join(args.workdir, f"torch_last_{key}.npy"), logits[:, -1].float().numpy())
        print(json.dumps({"key": key, "seconds": dt}), flush=True)


# ---------------------------------------------------------------------------
# our side
# ---------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1x256,8x256", help="comma-separated BxT")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads per side; 1 also pins XLA to one thread (XLA otherwise uses every core)")
    parser.add_argument("--torch-python", default="/tmp/torchref/bin/python")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "decode", "forward_cpu.json"))
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args()
    if args.torch_worker:
        torch_worker(args)
        return
    if os.path.exists(args.out) and not args.overwrite:  # before minutes of both models' forwards
        parser.error(f"{args.out} exists: pass --overwrite to replace it, or choose another --out")

    if args.threads == 1:
        # Must be set before jax initialises its CPU client.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from selfspan_jax.weights import load_model, preset_path

    if not os.path.isfile(args.torch_python):
        raise SystemExit(f"--torch-python {args.torch_python!r} not found; create it with: python3.11 -m venv "
                         "/tmp/torchref && /tmp/torchref/bin/pip install torch==2.13.0 transformers gguf "
                         "safetensors numpy accelerate")
    gguf = preset_path("smollm2-135m")
    shapes = {}
    for key in args.shapes.split(","):
        b, t = (int(x) for x in key.split("x"))
        shapes[key] = (b, t)

    with tempfile.TemporaryDirectory() as workdir:
        rng = np.random.default_rng(0)
        for key, (b, t) in shapes.items():
            # Ids below 49152 so both vocabularies (ours has no span rows here) agree.
            np.save(os.path.join(workdir, f"tokens_{key}.npy"), rng.integers(0, 49152, (b, t), dtype=np.int32))

        cmd = [args.torch_python, os.path.abspath(__file__), "--torch-worker", "--gguf", gguf,
               "--workdir", workdir, "--shapes", args.shapes, "--threads", str(args.threads)]
        worker = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)

        def torch_forward(key: str) -> float:
            worker.stdin.write(key + "\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            if not line:
                raise SystemExit(f"torch worker died (exit {worker.wait()}); run it by hand: {' '.join(cmd)}")
            return json.loads(line)["seconds"]

        header = worker.stdout.readline()
        if not header:
            raise SystemExit(f"torch worker failed to start (exit {worker.wait()}): {' '.join(cmd)}")
        torch_info = json.loads(header)

        model, _ = load_model("smollm2-135m", add_span_tokens=False)
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, tokens):
            return nnx.merge(graphdef, state)(tokens)  # fp32 logits [B, T, V]

        def ours_forward(tokens) -> float:
            t0 = time.perf_counter()
            forward(state, tokens).block_until_ready()
            return time.perf_counter() - t0

        rows = []
        try:
            for key, (b, t) in shapes.items():
                tokens = jnp.asarray(np.load(os.path.join(workdir, f"tokens_{key}.npy")))
                compile_s = ours_forward(tokens)
                for _ in range(args.warmup):
                    ours_forward(tokens)
                    torch_forward(key)
                ours, theirs = [], []
                for _ in range(args.repeats):  # alternate, so both sides see the same load
                    ours.append(ours_forward(tokens))
                    theirs.append(torch_forward(key))
                last = np.asarray(forward(state, tokens)[:, -1])
                diff = float(np.abs(last - np.load(os.path.join(workdir, f"torch_last_{key}.npy"))).max())
                rows.append({
                    "shape": [b, t], "tokens": b * t,
                    "ours_median_s": statistics.median(ours), "torch_median_s": statistics.median(theirs),
                    "speedup_vs_torch": statistics.median(theirs) / statistics.median(ours),
                    "ours_times_s": ours, "torch_times_s": theirs, "ours_compile_s": compile_s,
                    "max_abs_last_logit_diff": diff,
                })
        finally:
            worker.stdin.close()
            worker.wait()
        from selfspan_jax import reporting

        load_avg = (reporting.load_average() or [None])[0]

    # One file, one entry per thread count: the shared 2-core CPU makes the
    # multi-threaded numbers depend on background load (see docs/notes/weights.md).
    result = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            result = json.load(f)
    result.update({
        "benchmark": "forward_cpu",
        "model": "SmolLM2-135M-Instruct (" + GGUF_NAME + ", dequantized to fp32)",
        # reporting imports jax: only here, on the JAX side (the torch worker runs without the package)
        "device": f"{jax.devices()[0].device_kind} ({reporting.cpu_name()}, {os.cpu_count()} logical cores)",
        "jax": jax.__version__, "torch": torch_info["torch"], "transformers": torch_info["transformers"],
        "dtype": "float32", "logits": "full [B, T, V] fp32 on both sides",
    })
    result.setdefault("runs", {})[f"threads={args.threads}"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads, "torch_threads": torch_info["threads"],
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "load_average_1min_at_end": load_avg,
        "warmup": args.warmup, "repeats": args.repeats, "results": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"{result['model']} on {result['device']}; jax {result['jax']}, torch {result['torch']}, "
          f"{args.threads} thread(s) per side, load average {load_avg}")
    print(f"{'shape':>10} {'ours (s)':>10} {'torch (s)':>10} {'torch/ours':>11} {'ours tok/s':>11} {'|dlogit|':>9}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>10} {r['ours_median_s']:>10.3f} {r['torch_median_s']:>10.3f} "
              f"{r['speedup_vs_torch']:>11.2f} {r['tokens'] / r['ours_median_s']:>11.0f} "
              f"{r['max_abs_last_logit_diff']:>9.1e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
