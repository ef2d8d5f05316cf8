"""CPU forward time of SmolLM2-135M-Instruct: our jitted Llama vs the PyTorch reference.

    .venv/bin/python scripts/bench_forward.py [--torch-python /tmp/torchref/bin/python]

Both sides load the same GGUF (ours via `load_model`, PyTorch via transformers'
GGUF loader, both dequantized to fp32), run a full forward with fp32 logits on
the same random tokens for each shape ([1, 256] and [8, 256] by default), and
report the median wall time of --repeats runs after --warmup runs. The PyTorch
side runs in a subprocess (this same file with --torch-worker) under the
Python 3.11 + torch venv, since the project itself never imports torch; the
two sides run one after the other in one invocation, on the same cores, with
the same thread count. The last-position logits of both are compared as a
sanity check. Writes benchmarks/results/forward_cpu.json and prints a table.

Only the standard library is imported at module level so the torch worker
does not need jax.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------
# PyTorch side (runs under the torch venv)
# ---------------------------------------------------------------------------
def torch_worker(args) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    folder, name = os.path.split(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    result = {"torch": torch.__version__, "transformers": transformers.__version__,
              "threads": torch.get_num_threads(), "shapes": {}}
    for key in args.shapes.split(","):
        tokens = torch.from_numpy(np.load(os.path.join(args.workdir, f"tokens_{key}.npy")).astype(np.int64))

        @torch.no_grad()
        def run():
            return model(tokens).logits

        times = _timed(run, args.warmup, args.repeats)
        np.save(os.path.join(args.workdir, f"torch_last_{key}.npy"), run()[:, -1].float().numpy())
        result["shapes"][key] = times
    with open(os.path.join(args.workdir, "torch.json"), "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------
# our side
# ---------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1x256,8x256", help="comma-separated BxT")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--torch-python", default="/tmp/torchref/bin/python")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "forward_cpu.json"))
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        torch_worker(args)
        return

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

        # PyTorch first: it is a separate process, so its memory is gone before ours is timed.
        cmd = [args.torch_python, os.path.abspath(__file__), "--torch-worker", "--gguf", gguf,
               "--workdir", workdir, "--shapes", args.shapes, "--warmup", str(args.warmup),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"torch worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(os.path.join(workdir, "torch.json")) as f:
            torch_result = json.load(f)

        model, _ = load_model("smollm2-135m", add_span_tokens=False)
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, tokens):
            return nnx.merge(graphdef, state)(tokens)  # fp32 logits [B, T, V]

        rows = []
        for key, (b, t) in shapes.items():
            tokens = jnp.asarray(np.load(os.path.join(workdir, f"tokens_{key}.npy")))
            t0 = time.perf_counter()
            forward(state, tokens).block_until_ready()
            compile_s = time.perf_counter() - t0
            ours = _timed(lambda: forward(state, tokens).block_until_ready(), args.warmup, args.repeats)
            last = np.asarray(forward(state, tokens)[:, -1])
            diff = float(np.abs(last - np.load(os.path.join(workdir, f"torch_last_{key}.npy"))).max())
            theirs = torch_result["shapes"][key]
            rows.append({
                "shape": [b, t], "tokens": b * t,
                "ours_median_s": statistics.median(ours), "torch_median_s": statistics.median(theirs),
                "speedup_vs_torch": statistics.median(theirs) / statistics.median(ours),
                "ours_times_s": ours, "torch_times_s": theirs, "ours_compile_s": compile_s,
                "max_abs_last_logit_diff": diff,
            })

    result = {
        "benchmark": "forward_cpu",
        "model": "SmolLM2-135M-Instruct (" + GGUF_NAME + ", dequantized to fp32)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].device_kind} ({_cpu_name()}, {os.cpu_count()} logical cores)",
        "jax": jax.__version__, "torch": torch_result["torch"], "transformers": torch_result["transformers"],
        "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
        "dtype": "float32", "logits": "full [B, T, V] fp32 on both sides",
        "results": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"{result['model']} on {result['device']}; jax {result['jax']}, torch {result['torch']}")
    print(f"{'shape':>10} {'ours (s)':>10} {'torch (s)':>10} {'torch/ours':>11} {'ours tok/s':>11} {'|dlogit|':>9}")
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>10} {r['ours_median_s']:>10.3f} {r['torch_median_s']:>10.3f} "
              f"{r['speedup_vs_torch']:>11.2f} {r['tokens'] / r['ours_median_s']:>11.0f} "
              f"{r['max_abs_last_logit_diff']:>9.1e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
