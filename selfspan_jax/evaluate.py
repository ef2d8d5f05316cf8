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
a model source (`weights.load_model`) into (model, tokenizer). How a result
is shown and stored is `tables`.

Why one file of ~520 lines: one job, a comparison's rows from models to
scored and timed metrics (loading, rows, decoding, scoring, timing in turns,
the speed batches); the result's tables and files are `tables`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from pallas_kernels.backend import resolve_backend
from selfspan_jax import reporting, runs, tasks
from selfspan_jax.data.arithmetic import check_completion
from selfspan_jax.generation import GenerateOutput, KernelOptions, Outputs, checked_policy, generate
from selfspan_jax.policies import make_policy
from selfspan_jax.spans import SpanTokens
from selfspan_jax.tokenizer import encode_prompt
from selfspan_jax.finished_rows import FinishedRows
from selfspan_jax.viz import plot_span_heatmap
from selfspan_jax.weights import load_model


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
    """A training run directory (`runs.load_run`) or a `weights.load_model` source.

    For a run, the model is rebuilt from its saved config and the trainable
    parameters of checkpoint `step` (default: the latest) are restored into
    it. Raises ValueError naming the directory when it holds no checkpoint.
    """
    if runs.is_run_dir(source):
        run = runs.load_run(source, step)
        return Loaded(run.model, run.tokenizer, run.config.task, run.config.max_segments, str(source), run.step,
                      run.config.to_dict())
    looks_like_run = os.path.isdir(source) and any(
        os.path.exists(os.path.join(source, name)) for name in (runs.CHECKPOINTS, runs.METRICS))
    if looks_like_run and not os.path.isfile(os.path.join(source, "config.json")):
        raise ValueError(f"{source!r} looks like a training run directory but has no {runs.CONFIG}; "
                         "it cannot be rebuilt without it")
    if step is not None:
        raise ValueError(f"step={step} only applies to a training run directory; {source!r} is not one")
    model, tokenizer = load_model(source)
    if tokenizer is None:
        raise ValueError(f"model source {source!r} carries no tokenizer")
    return Loaded(model, tokenizer, None, 64, str(source), None, None)


def decode(model, tokenizer, prompts: Sequence, *, policy, batch_size: int, **generate_kwargs) -> GenerateOutput:
    """`generate` over all prompts, `batch_size` at a time, merged into one output (a progress bar
    when there is more than one batch: a real model's evaluation takes minutes per row on a CPU)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, len(prompts), batch_size)
    label = getattr(policy, "name", policy)
    return GenerateOutput.concatenate([
        generate(model, prompts[start: start + batch_size], policy=policy, tokenizer=tokenizer, **generate_kwargs)
        for start in tqdm(starts, desc=f"decode {label}", unit="batch", leave=False, disable=len(starts) < 2)
    ])


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
    policy: Any = "self_span"  # a name or spec (resolved with the row's tokenizer and run) or a `Policy`
    trained_with: str = "?"
    source: str = ""
    note: str = ""
    run_dir: str | None = None  # the training run decoded: policies that need it (ADORE's controller) find it there
    # a pretrained model that never saw the task's format: asked `Task.zero_shot_question` (through the
    # tokenizer's chat template when it has one) and scored by `Task.score_zero_shot`
    zero_shot: bool = False

    def prompts(self, task: tasks.Task, records: Sequence[dict]) -> list:
        """What this row's model is given for `records`: the records' own prompts, or zero-shot ids."""
        if not self.zero_shot:
            return [r["prompt"] for r in records]
        return [zero_shot_prompt(self.tokenizer, task.zero_shot_question(r)) for r in records]


def zero_shot_prompt(tokenizer, question: str) -> list[int]:
    """Ids of one user turn asking `question`, ready for the answer: the tokenizer's chat template
    when it has one (an instruct model's own format), else BOS + the question and a newline."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
        return encode_prompt(tokenizer, text)
    return encode_prompt(tokenizer, question + "\n")


def ood_note(trained_with: str, policy: Any) -> str:
    """The label of a row decoded with the other training-time attention than its model was trained
    under (span-trained decoded dense, or the reverse). Training-free policies (Quest, SparQ) on a
    model are the methods themselves, not ablations."""
    if trained_with in ("self_span", "dense") and str(policy) in ("self_span", "dense") and str(policy) != trained_with:
        return "out-of-distribution ablation"
    return ""


def time_interleaved(calls: dict[str, Any], *, repeats: int = 3) -> dict[str, dict[str, Any]]:
    """Median seconds, generated tokens and tokens/s of several `generate` calls timed in turns
    (`reporting.interleaved_results`). `calls` maps a name to a zero-argument function returning a
    `GenerateOutput`; every call ends with the host transfer of its results, so `seconds` covers
    prefill, every decode step and the sync. A call made with `Outputs(timing=True)` also gives its
    decode loop's own seconds (`decode_seconds`, min/median/max) and `decode_tokens_per_s`: generated
    tokens over the median decode-loop seconds (prefill excluded; each row's first token, which
    prefill makes, is counted in: 1 of every `tokens / batch`)."""

    def measure(fn):
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    result = {}
    for name, runs_ in reporting.interleaved_results(calls, repeats, measure=measure).items():
        ts = [t for t, _ in runs_]
        out = runs_[-1][1]
        tokens = int(out.num_tokens.sum())
        seconds = reporting.spread(ts)["median"]
        result[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "repeats": repeats,
                        "all_seconds": ts}
        if getattr(out, "timing", None) is not None:
            decode_s = reporting.spread([o.timing["decode_s"] for _, o in runs_])
            result[name].update(decode_seconds=decode_s, decode_tokens_per_s=tokens / decode_s["median"],
                                prefill_seconds=reporting.spread([o.timing["prefill_s"] for _, o in runs_]))
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
    speed_batches: Sequence[int] = (),
    recall: bool = False,
    finished: FinishedRows | None = None,
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
    the baseline's is non-zero, ratios. With `recall`, the scored decode also
    records how much of each row's dense attention its policy read
    (attention_recall, attention_recall_by_layer: `Outputs(recall=True)`);
    the timed calls never carry that diagnostic. With `finished`, each row is stored there as soon as it
    is scored, and a row found there (same model parameters, policy, records and settings) is read back
    instead of decoded: an interrupted comparison resumes at its first missing row. The timing is
    always measured again, every row in the same turns.

    `speed_batches`: decode speed at these batch sizes too (the first records, every row timed in
    turns with `Outputs(timing=True)`): per row `speed[batch]` = the timing, and against the baseline
    `vs_baseline[row]["speed"][batch]` = the decode-loop speed-up, the memory-bound ceiling
    (1 + r) / (1 + rho r) at the row's KV-read fraction rho over the baseline's and the KV/weight
    byte ratio r of that batch at its mean context (prompt + half the generated tokens), and
    the speed-up as a fraction of that ceiling.
    """
    task_ = tasks.get(task)
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
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    # the timing runs after every row is generated: its settings are checked now
    if timing_repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {timing_repeats}")
    if timing_batch is not None and timing_batch < 1:
        raise ValueError(f"timing_batch must be >= 1 (or None: the batch size), got {timing_batch}")
    if any(not isinstance(b, int) or b < 1 or b > len(records) for b in speed_batches):
        raise ValueError(f"speed_batches must be ints from 1 to the {len(records)} records, got {list(speed_batches)}")
    if speed_batches and baseline is None:
        raise ValueError("speed_batches compare rows against a baseline row: name one")
    policies = {}
    for row in rows:  # every row's policy against its model before the first row's work
        try:
            policies[row.name] = checked_policy(row.model, row.policy, tokenizer=row.tokenizer,
                                                max_segments=max_segments, run_dir=row.run_dir)
        except ValueError as err:
            raise ValueError(f"row {row.name!r}: {err}") from err
    if max_new_tokens is None:
        # one budget for all rows (the first row's tokenizer and model): the same work for everyone
        max_new_tokens = tasks.generation_budget(records, rows[0].tokenizer, rows[0].model.config.max_seq_len)
    backend = resolve_backend(backend)
    kw = dict(max_new_tokens=max_new_tokens, block_size=block_size, kernel=KernelOptions(backend=backend))
    n_timed = min(timing_batch or batch_size, len(records))
    results: dict[str, Any] = {}
    calls = {}
    for row in rows:
        prompts = row.prompts(task_, records)
        key = None if finished is None else finished.key(
            model=row.model, row=[row.name, str(row.policy), repr(row.policy), row.trained_with, row.source,
                                  row.note, row.zero_shot],
            task=task, records=records, prompts=prompts, batch_size=batch_size, recall=recall,
            max_new_tokens=max_new_tokens, block_size=block_size, backend=backend, max_segments=max_segments)
        metrics = None if key is None else finished.get(key)
        if metrics is not None:
            print(f"[evaluate] {row.name}: scored by an interrupted run of this comparison, read back from "
                  f"{finished.folder}", flush=True)
        else:
            metrics = _score_row(row, policies[row.name], task_, records, prompts, batch_size=batch_size,
                                 recall=recall, **kw)
            if key is not None:
                finished.put(key, metrics, label=row.name)
        results[row.name] = metrics
        calls[row.name] = functools.partial(generate, row.model, prompts[:n_timed], policy=policies[row.name],
                                            tokenizer=row.tokenizer, outputs=Outputs(timing=True), **kw)
    for name, timing in time_interleaved(calls, repeats=timing_repeats).items():
        results[name]["timing"] = timing
    vs_baseline = {name: _ratios(task_, m, results[baseline]) for name, m in results.items()} if baseline else {}
    for b in speed_batches:
        _time_speed_batch(rows, policies, results, vs_baseline, task_, records[:b], baseline, n_timed,
                          timing_repeats, kw)
    return {
        "config": {
            "task": task, "num_records": len(records), "batch_size": batch_size, "timing_batch": n_timed,
            "max_new_tokens": max_new_tokens, "block_size": block_size, "max_segments": max_segments,
            "backend": backend, "timing_repeats": timing_repeats, "timing": "interleaved", "recall": recall,
            "speed_batches": list(speed_batches),
        },
        "rows": results,
        "baseline": baseline,
        "vs_baseline": vs_baseline,
    }


def _time_speed_batch(rows: Sequence[Row], policies: dict, results: dict, vs_baseline: dict, task: tasks.Task,
                      records: Sequence[dict], baseline: str, n_timed: int, repeats: int, kw: dict) -> None:
    """`evaluate_rows`' speed at batch b = len(records): every row timed in turns (the main timing
    reused when it ran at b), then per row against the baseline the decode-loop speed-up, r, rho,
    the memory-bound ceiling and the fraction of it reached (written into `results` and `vs_baseline`)."""
    b = len(records)
    prompts = {row.name: row.prompts(task, records) for row in rows}
    if b == n_timed:
        timings = {name: m["timing"] for name, m in results.items()}
    else:
        timings = time_interleaved({row.name: functools.partial(generate, row.model, prompts[row.name],
                                                                policy=policies[row.name], tokenizer=row.tokenizer,
                                                                outputs=Outputs(timing=True), **kw) for row in rows},
                                   repeats=repeats)
    for name, timing in timings.items():
        results[name].setdefault("speed", {})[str(b)] = timing
    base_row = next(row for row in rows if row.name == baseline)
    prompt_tokens = np.mean([len(p) if not isinstance(p, str) else len(encode_prompt(base_row.tokenizer, p))
                             for p in prompts[baseline]])
    base = timings[baseline]
    context = prompt_tokens + base["tokens"] / (2 * b)
    r = reporting.kv_weight_ratio(base_row.model.config, b, context, jnp.dtype(base_row.model.config.dtype).itemsize)
    for name, m in results.items():
        rho = m["kv_read_fraction"] / results[baseline]["kv_read_fraction"]
        speedup = timings[name]["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        ceiling = reporting.memory_ceiling(r, rho)
        vs_baseline[name].setdefault("speed", {})[str(b)] = {
            "decode_speedup": speedup, "r": r, "mean_context": context, "rho": rho, "ceiling": ceiling,
            "fraction_of_ceiling": speedup / ceiling}


def _score_row(row: Row, policy, task: tasks.Task, records: Sequence[dict], prompts: list, *, batch_size: int,
               recall: bool, **generate_kwargs) -> dict[str, Any]:
    """One row of `evaluate_rows` without its timing: decoded under `policy` (the row's, resolved), scored,
    its span statistics and examples."""
    out = decode(row.model, row.tokenizer, prompts, policy=policy, batch_size=batch_size,
                 outputs=Outputs(recall=recall), **generate_kwargs)
    texts = out.texts
    metrics = (task.score_zero_shot if row.zero_shot else task.score)(records, texts)
    metrics.update(out.summary(), span_report={k: int(v.sum()) for k, v in out.policy_report.items()})
    shown = [row.tokenizer.decode(p) if row.zero_shot else p for p in prompts[:3]]
    metrics.update(policy=str(row.policy), trained_with=row.trained_with, source=row.source, note=row.note,
                   prompting="zero-shot" if row.zero_shot else "task",
                   examples=[{"prompt": p, "generated": t} for p, t in zip(shown, texts[:3])],
                   # every record's text, so that anyone can score the row again
                   generated=list(texts))
    return metrics


def _ratios(task: tasks.Task, m: dict[str, Any], base: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "tokens_per_s": m["timing"]["tokens_per_s"] / base["timing"]["tokens_per_s"],
        "kv_read_fraction": m["kv_read_fraction"] / base["kv_read_fraction"] if base["kv_read_fraction"] else None,
    }
    for k in task.accuracy_keys:
        known = m[k] is not None and base[k] is not None  # None: a metric a zero-shot reply cannot have
        out[f"{k}_delta"] = m[k] - base[k] if known else None
        out[k] = m[k] / base[k] if known and base[k] else None  # a ratio over 0% accuracy means nothing
    return out


def generate_one(model, tokenizer, record: dict, *, policy: str = "self_span", max_segments: int = 64,
                 block_size: int = 16, backend: str = "auto", max_new_tokens: int | None = None) -> dict[str, Any]:
    """Greedy generation of one record: {"tokens": prompt + generated ids, "prompt_length", "text", "title"}."""
    if max_new_tokens is None:
        max_new_tokens = tasks.generation_budget([record], tokenizer, model.config.max_seq_len)
    policy = make_policy(policy, tokenizer=tokenizer, max_segments=max_segments)
    out = generate(model, [record["prompt"]], policy=policy, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                   block_size=block_size, kernel=KernelOptions(backend=backend))
    prompt = encode_prompt(tokenizer, record["prompt"])
    tokens = prompt + [int(t) for t in out.sequences()[0]]
    title = f"{record.get('task', 'example')}: {record.get('expression') or record.get('title') or ''}".strip()
    if record.get("task") == "arithmetic":
        ok, why = check_completion(record["prompt"], out.texts[0])
        title += f" -> {'correct' if ok else why.split(':')[0]}"
    return {"tokens": tokens, "prompt_length": len(prompt), "text": out.texts[0], "title": title,
            "summary": out.summary()}


def task_and_split(loaded: Loaded, task: str | None = None, split: str | None = None) -> tuple[str, str]:
    """The task (default: the run's; arithmetic for a plain model source) and its held-out split."""
    task = task or loaded.task or "arithmetic"
    return task, split or tasks.get(task).held_out_split


def held_out_records(loaded: Loaded, n: int, *, seed: int, task: str | None = None, split: str | None = None,
                     data: dict | None = None) -> tuple[str, str, dict, list[dict]]:
    """(task, split, data options, records): `n` held-out records for `loaded`.

    The task defaults to the run's (arithmetic for a plain model source), the
    split to the task's held-out split, and the data options to the run's
    when it trained on that task, updated by `data`; articles are cut for the
    run's seq_len as in training.
    """
    cfg = loaded.train_config or {}
    task, split = task_and_split(loaded, task, split)
    options = {**(cfg.get("data") or {} if cfg.get("task") == task else {}), **(data or {})}
    task_ = tasks.get(task)
    records = task_.records(split, n, seed=seed, data=options, tokenizer=loaded.tokenizer,
                            seq_len=cfg.get("seq_len"))
    return task, split, options, records


# fields that may differ between a run and its baseline without making the comparison unfair
_NOT_COMPARED = {"span_policy", "out", "progress", "tensorboard", "eval_batch_size", "log_every", "save_every",
                 "keep_checkpoints", "eval_every", "eval_generate", "export_merged"}


def comparison_rows(loaded: Loaded, base: Loaded | None, policies: Sequence[str],
                    baseline_policies: Sequence[str]) -> tuple[list[Row], str | None, list[str]]:
    """The rows of a run under `policies` (and of its baseline under `baseline_policies`), the row
    ratios are taken against, and notes.

    Without a baseline, ratios are against the run itself decoded dense, which
    for a span-trained model is an out-of-distribution ablation (said in a
    note). Raises ValueError when the baseline was trained on another task or
    data than the run (its held-out records would not be the run's).
    """

    def trained(lo):
        return (lo.train_config or {}).get("span_policy", "pretrained")

    def row(lo, policy, prefix=""):
        tw = trained(lo)
        return Row(f"{prefix}{'span' if tw == 'self_span' else tw}-trained/{policy}", lo.model, lo.tokenizer,
                   policy, trained_with=tw, source=lo.source if lo.step is None else f"{lo.source} step {lo.step}",
                   note=ood_note(tw, policy), run_dir=lo.source if lo.step is not None else None)

    rows = [row(loaded, p) for p in policies]
    notes = []
    if base is None:
        dense = [r.name for r in rows if r.policy == "dense"]
        baseline = dense[0] if dense else None
        if baseline and trained(loaded) == "self_span":
            notes.append(f"ratios are against {baseline}: the same span-trained model decoded dense, an "
                         "out-of-distribution ablation; pass --baseline RUN for a dense-trained baseline")
        return rows, baseline, notes
    mine, theirs = loaded.train_config or {}, base.train_config or {}
    if base.task != loaded.task or theirs.get("data") != mine.get("data"):
        raise ValueError(f"baseline {base.source!r} was trained on task {base.task!r} with data "
                         f"{theirs.get('data')}, the run {loaded.source!r} on task {loaded.task!r} with data "
                         f"{mine.get('data')}: not the same held-out distribution")
    base_rows = [row(base, p) for p in baseline_policies]
    if {r.name for r in rows} & {r.name for r in base_rows}:
        base_rows = [row(base, p, "baseline ") for p in baseline_policies]
    if trained(base) != "dense":
        notes.append(f"the baseline {base.source} was trained with {trained(base)!r}, not dense")
    differ = sorted(k for k in set(mine) | set(theirs) if k not in _NOT_COMPARED and mine.get(k) != theirs.get(k))
    if differ:
        notes.append("the run and its baseline also differ in: "
                     + ", ".join(f"{k} ({mine.get(k)!r} vs {theirs.get(k)!r})" for k in differ))
    return rows + base_rows, base_rows[0].name, notes


def compare(source: str | Loaded, *, baseline: str | Loaded | None = None, step: int | None = None,
            baseline_step: int | None = None,
            task: str | None = None, split: str | None = None, data: dict | None = None, num: int = 256,
            seed: int = 12345, policies: Sequence[str] = ("self_span", "dense"),
            baseline_policies: Sequence[str] | None = None, max_segments: int | None = None,
            zero_shot: str | Loaded | None = None, **evaluate_kwargs) -> dict[str, Any]:
    """Load a run (and its baseline), draw the held-out records and evaluate every row on them:
    `evaluate_rows`'s result with the sources, split, seed, data, notes and environment recorded.
    `evaluate_kwargs` go to `evaluate_rows` (batch_size, block_size, backend, timing_repeats, ...).
    A run or baseline already loaded (`Loaded`) is used as it is, not loaded again.
    `zero_shot` (a model source, e.g. the pretrained model the runs fine-tuned) adds the row
    "base/dense": that model asked `Task.zero_shot_question` and decoded dense, for scale.
    `baseline_policies` (default: dense) and `baseline_step` describe the baseline: given without one,
    they are refused rather than ignored."""
    if baseline is None:
        for what, value in (("baseline_policies", baseline_policies), ("baseline_step", baseline_step)):
            if value is not None:
                raise ValueError(f"{what}={value!r} applies to a baseline run, and none is given (--baseline RUN)")
    loaded = source if isinstance(source, Loaded) else load_for_eval(source, step=step)
    task, split, options, records = held_out_records(loaded, num, seed=seed, task=task, split=split, data=data)
    base = baseline if baseline is None or isinstance(baseline, Loaded) else load_for_eval(baseline,
                                                                                            step=baseline_step)
    rows, baseline_row, notes = comparison_rows(loaded, base, policies, baseline_policies or ("dense",))
    if zero_shot is not None:
        pre = zero_shot if isinstance(zero_shot, Loaded) else load_for_eval(zero_shot)
        # last: the generation budget is taken from the first row's tokenizer, which knows the span tokens
        rows.append(Row("base/dense", pre.model, pre.tokenizer, "dense", trained_with="pretrained",
                        source=pre.source, note=tasks.get(task).zero_shot_note,
                        zero_shot=True))
    result = evaluate_rows(rows, records, task=task, baseline=baseline_row,
                           max_segments=loaded.max_segments if max_segments is None else max_segments,
                           **evaluate_kwargs)
    result["config"].update(source=loaded.source, step=loaded.step, split=split, seed=seed, data=options,
                            baseline_source=None if base is None else base.source,
                            baseline_step=None if base is None else base.step)
    result["notes"] = notes
    result["environment"] = reporting.environment()
    return result


def span_heatmap(loaded: Loaded, record: dict, path: str | Path, *, block_size: int = 16,
                 backend: str = "auto") -> tuple[Path, dict[str, Any]]:
    """Generate `record` greedily with self_span and draw which positions every generated token could
    see (`viz.plot_span_heatmap`). Returns the PNG path and `generate_one`'s output."""
    out = generate_one(loaded.model, loaded.tokenizer, record, max_segments=loaded.max_segments,
                       block_size=block_size, backend=backend)
    png = plot_span_heatmap(out["tokens"], out["prompt_length"], path,
                            span_tokens=SpanTokens.from_tokenizer(loaded.tokenizer),
                            max_segments=loaded.max_segments, tokenizer=loaded.tokenizer, title=out["title"])
    return Path(png), out
