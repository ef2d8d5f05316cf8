#!/usr/bin/env python
"""Where a decode step's time goes, dense vs self_span, at the bench_decode shape.

Times, side by side in one process, interleaved over rounds (medians):

- `weights`: the jitted `model.decode_step` (cache donated) with an attention
  that reads no KV (returns q): the weight matmuls, norms, RoPE, cache write;
- `step_dense_default`: the same with the model's default masked dense attention;
- `step_dense` / `step_span`: the same with `block_sparse_decode` on the dense
  selection / on recorded self_span selections of the batch (rotating over steps),
  handed the slice `k_all[i]` -- which XLA:CPU copies per layer (the old hook);
- `stacked_dense` / `stacked_span`: `block_sparse_decode(..., layer=i)` on the
  stacked cache `model.decode_step` passes (what the generation loop runs),
  the kernel reading the stacked cache in place;
- `attn_dense` / `attn_span`: `block_sparse_decode` alone on one layer's cache;
- `policy`: `SelfSpanPolicy.update` + `select` alone (batched, jitted);
- `generate_dense` / `generate_span`: the whole loop, per step, from two
  `generate` calls of one program (as bench_decode does).

It also reports, from the recorded selections, rho (blocks read / dense
blocks, summed over the batch) and rho_max (the batch's largest list per step
over the dense count): a batched kernel whose trip count is the batch maximum
reads like rho_max, not rho.

    python benchmarks/profile_decode.py --batch 8 --context 2048 --new-tokens 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="profile_decode.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--max-segments", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=16, help="calls per timed sample (median of per-call means)")
    p.add_argument("--traces", default="benchmarks/results/decode/decode_traces_arithmetic.json")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    args = p.parse_args(argv)
    from selfspan_jax import reporting

    with reporting.reserved_output(args.out, overwrite=args.overwrite, option="--out", prog="profile_decode.py"):

        import jax
        import jax.numpy as jnp
        from flax import nnx

        from pallas_kernels import block_sparse_decode
        from selfspan_jax.benchmarks import random_model, trace_stream
        from selfspan_jax.cache import KVCache
        from selfspan_jax.decode_loop import shape_buckets
        from selfspan_jax.generation import KernelOptions, Outputs, generate
        from selfspan_jax.policies import SelfSpanPolicy, dense_selection, make_policy
        from selfspan_jax.sampling import Sampling
        from selfspan_jax.spans import SpanTokens
        from selfspan_jax.tokenizer import CharTokenizer

        B, T, bs = args.batch, args.context, args.block_size
        model = random_model("cpu-reduced", "float32", T + args.new_tokens + 64)
        config = model.config
        graphdef, _ = nnx.split(model)
        tok = CharTokenizer()
        traces = [tuple(t) for t in json.loads(Path(args.traces).read_text())["traces"]]
        rows = [trace_stream(traces[i:] + traces[:i], tok, T + args.new_tokens) for i in range(B)]
        prompt = np.asarray([r[:T] for r in rows], np.int32)
        forced = np.asarray([r[T:T + args.new_tokens] for r in rows], np.int32)
        S = shape_buckets(T, args.new_tokens, bs)[2]

        # Recorded selections: the policy replayed over the forced tokens, as the loop does.
        pol = SelfSpanPolicy(SpanTokens.from_tokenizer(tok), args.max_segments)
        lengths = jnp.full((B,), T, jnp.int32)
        pstate = jax.jit(pol.init_state, static_argnums=2)(jnp.asarray(prompt), lengths, S)

        @jax.jit
        def policy_step(state, tokens, pos):
            state = pol.update(state, tokens, jnp.ones(tokens.shape, bool))
            return state, pol.select(state, pos, block_size=bs, cache_len=S)

        sels = []
        state = pstate
        for m in range(args.new_tokens - 1):
            # token m is fed at position T + m (token 0 came from prefill)
            state, sel = policy_step(state, jnp.asarray(forced[:, m]), lengths + m)
            sels.append(sel)
        counts = np.stack([np.asarray(s.block_counts) for s in sels])  # [steps, B]
        dense = np.stack([(T + m) // bs + 1 for m in range(len(sels))])  # [steps]
        rho = counts.sum() / (dense.sum() * B)
        rho_max = counts.max(axis=1).sum() / dense.sum()
        all_dense_steps = float(np.mean(counts.max(axis=1) == dense))
        print(f"rho {rho:.3f}  rho_max (batch max per step) {rho_max:.3f}  "
              f"steps where some sequence reads every block: {all_dense_steps:.2f}", flush=True)

        # A cache of random values (never zeros) at length T + new/2, as in mid-decode.
        mid = T + args.new_tokens // 2
        key = jax.random.key(1)
        kk, kv = jax.random.split(key)
        cshape = (config.n_layers, B, config.n_kv_heads, S, config.head_dim)
        cache = KVCache(k=jax.random.normal(kk, cshape, jnp.float32), v=jax.random.normal(kv, cshape, jnp.float32),
                        lengths=jnp.full((B,), mid, jnp.int32))
        mid_sels = sels[args.new_tokens // 2 - 16: args.new_tokens // 2 + 16]
        dsel = dense_selection(cache.lengths, S, bs)
        fed = jnp.asarray(forced[:, args.new_tokens // 2])

        def make_step(kind):
            @jax.jit
            def step(params, cache, tokens, idx, cnt, mask):
                m = nnx.merge(graphdef, params)
                if kind == "weights":
                    fn = lambda q, k, v, i: q  # noqa: E731
                elif kind == "default":
                    fn = None
                elif kind == "stacked":
                    fn = lambda q, k, v, i: block_sparse_decode(q, k, v, idx, cnt, mask, block_size=bs,  # noqa: E731
                                                                backend="xla", layer=i)
                else:  # the per-layer slice the hook used to pass
                    fn = lambda q, k, v, i: block_sparse_decode(q, k[i], v[i], idx, cnt, mask,  # noqa: E731
                                                                block_size=bs, backend="xla")
                logits, c = m.decode_step(tokens, cache, attention_fn=fn)
                return logits, c.replace(lengths=cache.lengths)

            return jax.jit(step, donate_argnums=1)

        params = nnx.state(model)
        steps = {k: make_step(k) for k in ("weights", "default", "bsd", "stacked")}
        # The two paths compute the same function (same cache in, same logits out).
        for s_ in (dsel, mid_sels[0]):
            args_ = (params, cache, fed, s_.block_indices, s_.block_counts, s_.token_mask)
            ref_logits, cache = steps["bsd"](*args_)
            got_logits, cache = steps["stacked"](params, cache, fed, s_.block_indices, s_.block_counts, s_.token_mask)
            err = float(jnp.linalg.norm(got_logits - ref_logits) / jnp.linalg.norm(ref_logits))
            print(f"stacked vs sliced decode_step logits: rel err {err:.2e}", flush=True)
            if not err < 1e-5:
                raise AssertionError(f"stacked (layer=) decode step differs from the sliced one: {err}")
        holder_cache = cache
        attn = jax.jit(lambda q, k, v, idx, cnt, mask: block_sparse_decode(q, k, v, idx, cnt, mask, block_size=bs,
                                                                            backend="xla"))
        q1 = jax.random.normal(jax.random.key(2), (B, config.n_heads, config.head_dim), jnp.float32)
        k0, v0 = cache.k[0], cache.v[0]

        holder = {"cache": holder_cache, "pstate": pstate}

        def run_step(kind, selections):
            def go():
                out = None
                for i in range(args.calls):
                    s = selections[i % len(selections)]
                    out, holder["cache"] = steps[kind](params, holder["cache"], fed, s.block_indices, s.block_counts,
                                                       s.token_mask)
                return out
            return go

        def run_attn(selections):
            def go():
                out = None
                for i in range(args.calls):
                    s = selections[i % len(selections)]
                    out = attn(q1, k0, v0, s.block_indices, s.block_counts, s.token_mask)
                return out
            return go

        def run_policy():
            def go():
                st, out = holder["pstate"], None
                for i in range(args.calls):
                    st, out = policy_step(st, fed, lengths + i)
                return out.token_mask
            return go

        cases = {
            "weights": run_step("weights", [dsel]),
            "step_dense_default": run_step("default", [dsel]),
            "step_dense": run_step("bsd", [dsel]),
            "step_span": run_step("bsd", mid_sels),
            "stacked_dense": run_step("stacked", [dsel]),
            "stacked_span": run_step("stacked", mid_sels),
            "attn_dense": run_attn([dsel]),
            "attn_span": run_attn(mid_sels),
            "policy": run_policy(),
        }
        if not args.skip_generate:
            def run_gen(name):  # generate's decode loop alone, timed by generate (Outputs(timing=True))
                policy = make_policy(name, tokenizer=tok, max_segments=args.max_segments)
                kw = dict(policy=policy, tokenizer=tok, block_size=bs, kernel=KernelOptions(backend="xla"), eos_id=-1,
                          outputs=Outputs(stats=False, timing=True))
                return lambda: generate(model, prompt, max_new_tokens=args.new_tokens,
                                        sampling=Sampling(forced_tokens=forced), **kw).timing

            gen = {pol_name: run_gen(pol_name) for pol_name in ("dense", "self_span")}
        times = {name: [] for name in cases}
        gtimes = {key: [] for key in (gen if not args.skip_generate else {})}
        for fn in list(cases.values()) + list(gtimes and gen.values()):
            jax.block_until_ready(fn())  # compile + warm
        for r in range(args.rounds):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append((time.perf_counter() - t0) / args.calls * 1e3)
            for key, fn in (gen.items() if gtimes else ()):
                timing = fn()
                gtimes[key].append(timing["decode_s"] / timing["decode_steps"] * 1e3)
        med = {name: statistics.median(v) for name, v in times.items()}
        for pol_name, per_step in gtimes.items():
            med[f"generate_{pol_name}"] = float(np.median(per_step))
        print("| component | ms per call (median of %d rounds x %d calls) |\n|---|---|" % (args.rounds, args.calls))
        for name, v in med.items():
            print(f"| {name} | {v:.2f} |")
        if args.out:
            Path(args.out).write_text(json.dumps({"rho": rho, "rho_max": rho_max, "median_ms": med,
                                                  "all_ms": times, "args": vars(args)}, indent=1) + "\n")
        return 0


if __name__ == "__main__":
    sys.exit(main())
