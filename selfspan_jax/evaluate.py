"""Held-out evaluation of one model under several attention policies.

For each policy (dense, self_span, or any `policies.Policy`) the same held-out
records are generated greedily and scored, the per-step span statistics of
`generate` are aggregated, and decode speed is timed on one fixed batch:

- accuracy: exact match through `data.arithmetic.check_completion`
  (arithmetic), or ROUGE-1/2/L F1 x 100 with the `rouge-score` package
  (summarization; span headers stripped from both sides);
- mean attended fraction: mean over decode steps of visible keys / keys at or
  before the query (from the masks the kernel was given);
- KV read fraction: KV blocks the kernel read / blocks a dense read touches,
  summed over steps, i.e. the fraction of KV-cache bytes read;
- generated tokens/s: median over repeated timed `generate` calls after a
  warm-up (compile) call, same batch for every policy; the ratio of each
  policy to dense is reported.

`load_for_eval` turns a training run directory (`scripts/train.py --out`) or
a model source (`weights.load_model`) into (model, tokenizer).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from selfspan_jax.generation import generate
from selfspan_jax.tokenizer import ANCHOR, REF_CLOSE, REF_OPEN

TASKS = ("arithmetic", "summarization")


# ---------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
    """A model ready to evaluate and where it came from."""

    model: Any
    tokenizer: Any
    task: str | None  # the training run's task, None for a plain model source
    max_segments: int
    source: str
    step: int | None  # checkpoint step for a run directory
    train_config: dict | None


def load_for_eval(source: str, *, step: int | None = None) -> Loaded:
    """A training run directory (config.yaml + checkpoints/) or a `weights.load_model` source.

    For a run, the model is rebuilt from its saved config (deterministic in
    the seed, so the frozen part of a LoRA run is the same), and the trainable
    parameters of checkpoint `step` (default: the latest) are restored into
    it. Raises ValueError naming the directory when it holds no checkpoint.
    """
    path = Path(source)
    if (path / "config.yaml").is_file():
        return _load_run(path, step)
    if step is not None:
        raise ValueError(f"step={step} only applies to a training run directory; {source!r} is not one")
    from selfspan_jax.weights import load_model

    model, tokenizer = load_model(source)
    if tokenizer is None:
        raise ValueError(f"model source {source!r} carries no tokenizer")
    return Loaded(model, tokenizer, None, 64, str(source), None, None)


def _load_run(run_dir: Path, step: int | None) -> Loaded:
    import yaml
    from flax import nnx

    from selfspan_jax import train as train_lib
    from selfspan_jax.checkpoint import Checkpointer, abstract_tree

    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    # progress/tensorboard only change printing; evaluation never writes the run
    cfg = train_lib.TrainConfig.from_dict({**saved, "out": str(run_dir), "progress": False})
    model, tokenizer = train_lib.build_model(cfg)
    graphdef, trainable, frozen = nnx.split(model, train_lib.trainable_filter(cfg), ...)
    opt_state = jax.jit(train_lib.make_optimizer(cfg).init)(trainable)
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ValueError(f"run directory {str(run_dir)!r} has no checkpoints/ (has it trained yet?)")
    with Checkpointer(ckpt_dir) as ckpt:
        if ckpt.latest_step() is None:
            raise ValueError(f"run directory {str(run_dir)!r} has no finished checkpoint")
        target = {
            "params": abstract_tree(trainable),
            "opt_state": abstract_tree(opt_state),
            "step": jax.ShapeDtypeStruct((), np.int32),
        }
        state, _ = ckpt.restore(target, step)
    model = nnx.merge(graphdef, state["params"], frozen)
    return Loaded(model, tokenizer, cfg.task, cfg.max_segments, str(run_dir), int(state["step"]), cfg.to_dict())


# ---------------------------------------------------------------------------
# records and scoring
# ---------------------------------------------------------------------------


def held_out_records(task: str, n: int, *, seed: int, split: str = "test", data: dict | None = None,
                     tokenizer=None) -> list[dict]:
    """`n` held-out records of `task`.

    arithmetic: a held-out split of the generator ("test" = the training
    distribution, held out by problem hash; "harder", "longer", "deeper");
    `data` overrides Difficulty knobs as in training. summarization:
    `data["source"]` (local JSONL/Parquet or hub name), split "validation"
    (or what the caller names), cut like training's records.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    data = dict(data or {})
    if task == "arithmetic":
        from selfspan_jax.data import arithmetic

        return arithmetic.generate_examples(n, seed=seed, split=split, **data)
    from selfspan_jax.data import summarization

    source = data.pop("source", None)
    if not source:
        raise ValueError("summarization evaluation needs data={'source': PATH or hub name}")
    return summarization.load_records(source, split=split, limit=n, seed=seed, tokenizer=tokenizer, **data)


_HEADER_RE = re.compile(re.escape(ANCHOR) + r"(?:" + re.escape(REF_OPEN) + r".*?" + re.escape(REF_CLOSE) + r")?")


def strip_spans(text: str) -> str:
    """Summary text without anchors and headers (what ROUGE should compare)."""
    return " ".join(line.strip() for line in _HEADER_RE.sub("\n", text).split("\n") if line.strip())


def score(task: str, records: Sequence[dict], texts: Sequence[str]) -> dict[str, float]:
    """Accuracy metrics of generated completions against their records."""
    if len(records) != len(texts):
        raise ValueError(f"{len(records)} records but {len(texts)} generations")
    if task == "arithmetic":
        from selfspan_jax.data.arithmetic import check_completion

        ok = [check_completion(r["prompt"], t)[0] for r, t in zip(records, texts)]
        return {"exact_match": 100.0 * float(np.mean(ok))}
    if task == "summarization":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        rows = [scorer.score(strip_spans(r["completion"]), strip_spans(t)) for r, t in zip(records, texts)]
        return {k: 100.0 * float(np.mean([row[k].fmeasure for row in rows])) for k in ("rouge1", "rouge2", "rougeL")}
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------


def _budget(records: Sequence[dict], tokenizer, model) -> int:
    """Room for the longest reference completion (+EOS) plus slack for a longer wrong one."""
    from selfspan_jax.tokenizer import encode_with_spans

    longest = max(len(encode_with_spans(tokenizer, r["completion"])) for r in records) + 1
    prompt = max(len(encode_with_spans(tokenizer, r["prompt"])) for r in records) + 1
    return int(max(1, min(longest + 16, model.config.max_seq_len - prompt)))


def time_generation(model, prompts, *, repeats: int = 3, **generate_kwargs) -> dict[str, float]:
    """Median wall time of `generate` on one batch after a warm-up (compile) call.

    Each call ends with the host transfer of the results, so the time covers
    prefill, every decode step and the sync. Returns seconds, generated
    tokens and tokens/s.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = generate(model, prompts, **generate_kwargs)  # warm-up: compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = generate(model, prompts, **generate_kwargs)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    tokens = int(out.num_tokens.sum())
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "repeats": repeats,
            "all_seconds": times}


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of a comparison: a model decoded under one attention policy.

    `trained_with` is the attention the model was trained under ("self_span",
    "dense", or e.g. "pretrained"); a row decoded under another policy than it
    was trained with is an out-of-distribution ablation, and `note` says so.
    """

    name: str
    model: Any
    tokenizer: Any
    policy: Any = "self_span"
    trained_with: str = "?"
    source: str = ""
    note: str = ""


def ood_note(trained_with: str, policy: Any) -> str:
    """The label of a row decoded with another attention than its model was trained under."""
    if trained_with in ("self_span", "dense") and str(policy) != trained_with:
        return "out-of-distribution ablation"
    return ""


def _decode_all(model, tokenizer, prompts, policy, batch_size, kw) -> tuple[list[str], dict[str, Any]]:
    """Greedy generations of every prompt and the span statistics summed over valid decode steps."""
    texts: list[str] = []
    sums = {"visible": 0.0, "causal": 0.0, "blocks": 0.0, "dense_blocks": 0.0, "fraction_sum": 0.0,
            "steps": 0, "fallback": 0, "tokens": 0}
    report: dict[str, int] = {}
    for start in range(0, len(prompts), batch_size):
        out = generate(model, prompts[start : start + batch_size], policy=policy, tokenizer=tokenizer, **kw)
        texts.extend(out.texts)
        st, ok = out.stats, out.stats["step_valid"]
        sums["visible"] += float(st["visible"][ok].sum())
        sums["causal"] += float(st["causal"][ok].sum())
        sums["blocks"] += float(st["blocks_read"][ok].sum())
        sums["dense_blocks"] += float(st["dense_blocks"][ok].sum())
        sums["fraction_sum"] += float(st["attended_fraction"][ok].sum())
        sums["steps"] += int(ok.sum())
        sums["fallback"] += int(st["fallback"][ok].sum())
        sums["tokens"] += int(out.num_tokens.sum())
        for k, v in out.policy_report.items():
            report[k] = report.get(k, 0) + int(np.asarray(v).sum())
    steps = max(sums["steps"], 1)
    stats = dict(
        mean_attended_fraction=sums["fraction_sum"] / steps,
        token_read_fraction=sums["visible"] / max(sums["causal"], 1.0),
        kv_read_fraction=sums["blocks"] / max(sums["dense_blocks"], 1.0),
        fallback_steps=sums["fallback"],
        decode_steps=sums["steps"],
        generated_tokens=sums["tokens"],
        span_report=report,
    )
    return texts, stats


def time_interleaved(calls: dict[str, Any], *, repeats: int = 3) -> dict[str, dict[str, float]]:
    """`time_generation` for several `generate` calls, taking turns.

    Every call runs once to compile, then the timed runs go round-robin
    (call 1, call 2, ..., call 1, ...) so that a change in machine load
    during the measurement (the CPU is shared) hits every call alike instead
    of whichever ran last. `calls` maps a name to a zero-argument function
    returning a `GenerateOutput`. Returns the median seconds, generated
    tokens and tokens/s of each.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    tokens = {name: int(fn().num_tokens.sum()) for name, fn in calls.items()}  # warm-up: compile
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            tokens[name] = int(out.num_tokens.sum())
    result = {}
    for name, ts in times.items():
        seconds = statistics.median(ts)
        result[name] = {"seconds": seconds, "tokens": tokens[name], "tokens_per_s": tokens[name] / seconds,
                        "repeats": repeats, "all_seconds": ts}
    return result


def evaluate_rows(
    rows: Sequence[Row],
    records: Sequence[dict],
    *,
    task: str,
    baseline: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    block_size: int = 16,
    backend: str = "auto",
    max_segments: int = 64,
    timing_repeats: int = 3,
    timing_batch: int | None = None,
) -> dict[str, Any]:
    """Generate, score and time every row (a model under a policy) on the same records.

    Returns {"config", "rows": {name: metrics}, "baseline": name | None,
    "vs_baseline": {name: ratios}}. Row metrics hold the accuracy metrics of
    `score`, the span statistics (mean_attended_fraction, token_read_fraction,
    kv_read_fraction, fallback_steps, decode_steps, generated_tokens,
    span_report), `timing` (of `time_interleaved`: every row on the same
    timing batch, timed in turns), `examples`, and the row's policy,
    trained_with, source and note. vs_baseline (when `baseline` names a row)
    gives per row: tokens_per_s and kv_read_fraction over the baseline's, and
    the accuracy metrics as differences in points (`<metric>_delta`) and, where
    the baseline's is non-zero, ratios.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not records:
        raise ValueError("no records to evaluate")
    if not rows:
        raise ValueError("no rows to evaluate")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be unique, got {names}")
    if baseline is not None and baseline not in names:
        raise ValueError(f"baseline={baseline!r} is not one of the rows {names}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens is None:
        # one budget for all rows (the first row's tokenizer and model): the same work for everyone
        max_new_tokens = _budget(records, rows[0].tokenizer, rows[0].model)
    from pallas_kernels.backend import resolve_backend

    backend = resolve_backend(backend)
    kw = dict(max_new_tokens=max_new_tokens, block_size=block_size, backend=backend, max_segments=max_segments)
    prompts = [r["prompt"] for r in records]
    timing_prompts = prompts[: timing_batch or batch_size]
    results: dict[str, Any] = {}
    for row in rows:
        texts, stats = _decode_all(row.model, row.tokenizer, prompts, row.policy, batch_size, kw)
        metrics = score(task, records, texts)
        metrics.update(stats)
        metrics.update(policy=str(row.policy), trained_with=row.trained_with, source=row.source, note=row.note,
                       examples=[{"prompt": r["prompt"], "generated": t} for r, t in zip(records[:3], texts[:3])])
        results[row.name] = metrics
    calls = {row.name: functools.partial(generate, row.model, timing_prompts, policy=row.policy,
                                         tokenizer=row.tokenizer, **kw) for row in rows}
    for name, timing in time_interleaved(calls, repeats=timing_repeats).items():
        results[name]["timing"] = timing
    vs_baseline = {name: _ratios(task, m, results[baseline]) for name, m in results.items()} if baseline else {}
    return {
        "config": {
            "task": task, "num_records": len(records), "batch_size": batch_size, "timing_batch": len(timing_prompts),
            "max_new_tokens": max_new_tokens, "block_size": block_size, "max_segments": max_segments,
            "backend": backend, "timing_repeats": timing_repeats, "timing": "interleaved",
        },
        "rows": results,
        "baseline": baseline,
        "vs_baseline": vs_baseline,
    }


def _accuracy_keys(task: str) -> list[str]:
    return ["exact_match"] if task == "arithmetic" else ["rouge1", "rouge2", "rougeL"]


def _ratios(task: str, m: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "tokens_per_s": m["timing"]["tokens_per_s"] / base["timing"]["tokens_per_s"],
        "kv_read_fraction": m["kv_read_fraction"] / base["kv_read_fraction"] if base["kv_read_fraction"] else None,
    }
    for k in _accuracy_keys(task):
        out[f"{k}_delta"] = m[k] - base[k]
        out[k] = m[k] / base[k] if base[k] else None  # a ratio over 0% accuracy means nothing
    return out


def evaluate_policies(
    model,
    tokenizer,
    records: Sequence[dict],
    *,
    task: str,
    policies: Sequence[str] = ("dense", "self_span"),
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    block_size: int = 16,
    backend: str = "auto",
    max_segments: int = 64,
    timing_repeats: int = 3,
    timing_batch: int | None = None,
) -> dict[str, Any]:
    """Generate, score and time every policy on one model and the same records.

    Returns {"config": ..., "policies": {name: {metrics}}, "ratios": {name:
    tokens/s over dense}}; per-policy metrics are those of `evaluate_rows`
    (without the row labels). For several models, use `evaluate_rows`.
    """
    rows = [Row(str(p), model, tokenizer, p) for p in policies]
    result = evaluate_rows(rows, records, task=task, baseline="dense" if "dense" in map(str, policies) else None,
                           batch_size=batch_size, max_new_tokens=max_new_tokens, block_size=block_size,
                           backend=backend, max_segments=max_segments, timing_repeats=timing_repeats,
                           timing_batch=timing_batch)
    labels = ("policy", "trained_with", "source", "note")
    return {
        "config": result["config"],
        "policies": {name: {k: v for k, v in m.items() if k not in labels} for name, m in result["rows"].items()},
        "ratios": {name: r["tokens_per_s"] for name, r in result["vs_baseline"].items()},
    }


def generate_one(model, tokenizer, record: dict, *, policy: str = "self_span", max_segments: int = 64,
                 block_size: int = 16, backend: str = "auto", max_new_tokens: int | None = None) -> dict[str, Any]:
    """Greedy generation of one record: {"tokens": prompt + generated ids, "prompt_length", "text", "title"}."""
    if max_new_tokens is None:
        max_new_tokens = _budget([record], tokenizer, model)
    out = generate(model, [record["prompt"]], policy=policy, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                   max_segments=max_segments, block_size=block_size, backend=backend, return_masks=False)
    from selfspan_jax.tokenizer import encode_with_spans

    bos = getattr(tokenizer, "bos_token_id", None)
    prompt = ([] if bos is None else [int(bos)]) + encode_with_spans(tokenizer, record["prompt"])
    tokens = prompt + [int(t) for t in out.sequences()[0]]
    title = f"{record.get('task', 'example')}: {record.get('expression', '')}".strip()
    if record.get("task") == "arithmetic":
        from selfspan_jax.data.arithmetic import check_completion

        ok, why = check_completion(record["prompt"], out.texts[0])
        title += f" -> {'correct' if ok else why.split(':')[0]}"
    return {"tokens": tokens, "prompt_length": len(prompt), "text": out.texts[0], "title": title,
            "summary": out.summary()}


def environment() -> dict[str, str]:
    """What ran it: device, jax version, date."""
    import datetime
    import platform

    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}".strip(),
        "device_count": str(jax.device_count()),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: one row per policy (`evaluate_policies`) or per row (`evaluate_rows`)."""
    if "rows" in result:
        return _format_rows(result)
    acc = _accuracy_keys(result["config"]["task"])
    head = ["policy", *acc, "attended frac", "KV read frac", "tokens/s", "vs dense", "fallback steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in result["policies"].items():
        ratio = result["ratios"].get(name)
        row = [name, *(f"{m[k]:.1f}" for k in acc), f"{m['mean_attended_fraction']:.3f}",
               f"{m['kv_read_fraction']:.3f}", f"{m['timing']['tokens_per_s']:.1f}",
               "-" if ratio is None else f"{ratio:.2f}x", str(m["fallback_steps"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _format_rows(result: dict[str, Any]) -> str:
    acc = _accuracy_keys(result["config"]["task"])
    head = ["row", "trained with", "decoded with", *acc, "attended frac", "KV read frac", "tokens/s",
            *(f"{k} vs baseline" for k in acc), "KV read vs baseline", "tokens/s vs baseline", "fallback steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in result["rows"].items():
        r = result["vs_baseline"].get(name)
        label = name + (" (baseline)" if name == result["baseline"] else "") + (f" ({m['note']})" if m["note"] else "")
        if r is None:
            vs = ["-"] * (len(acc) + 2)
        else:
            vs = [f"{r[f'{k}_delta']:+.1f} pt" for k in acc]
            vs += ["-" if r["kv_read_fraction"] is None else f"{r['kv_read_fraction']:.3f}x",
                   f"{r['tokens_per_s']:.2f}x"]
        row = [label, m["trained_with"], m["policy"], *(f"{m[k]:.1f}" for k in acc),
               f"{m['mean_attended_fraction']:.3f}", f"{m['kv_read_fraction']:.3f}",
               f"{m['timing']['tokens_per_s']:.1f}", *vs, str(m["fallback_steps"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_results(result: dict[str, Any], out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """<out_dir>/<name>.json and <name>.md (the table plus what ran it).

    Optional keys of `result` that reach the markdown: "environment",
    "notes" (list of lines), "wall_s" ({phase: seconds}, e.g. from the demo).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    env = result.get("environment", {})
    cfg = result["config"]
    timing = "in turns across rows, " if cfg.get("timing") == "interleaved" else ""
    md = [f"# Evaluation: {name}", "", format_table(result), "",
          f"{cfg['num_records']} held-out {cfg['task']} records; timing: batch {cfg['timing_batch']}, "
          f"median of {cfg['timing_repeats']} runs {timing}after warm-up; block size {cfg['block_size']}, "
          f"backend {cfg['backend']}.",
          f"Ran on {env.get('device', '?')}, jax {env.get('jax_version', '?')}, {env.get('date', '?')}."]
    if "rows" in result:
        md += ["", "Rows:"]
        md += [f"- {n}: model `{m['source'] or '?'}` (trained with {m['trained_with']}), decoded with {m['policy']}"
               for n, m in result["rows"].items()]
    if result.get("notes"):
        md += ["", *(f"- {line}" for line in result["notes"])]
    if result.get("wall_s"):
        md += ["", "| phase | wall s |", "|---|---|", *(f"| {k} | {v:.0f} |" for k, v in result["wall_s"].items())]
    md_path.write_text("\n".join(md) + "\n")
    return json_path, md_path
