"""A comparison's result shown and stored: its markdown tables, its aggregate over training seeds and
its result files.

`evaluate.evaluate_rows` (and `evaluate.compare`) produce a result dict; `scripts/evaluate.py`,
`scripts/demo.py` and `scripts/compare_policies.py` hold its files before any work
(`reserved_results`), print its tables and write it (`write_results`). Runs of one comparison
per training seed become one result with `with_seeds`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from selfspan_jax import reporting, tasks


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of `evaluate_rows`: one line per row, ratios against the baseline."""
    acc = tasks.get(result["config"]["task"]).accuracy_keys
    recall = any("attention_recall" in m for m in result["rows"].values())
    head = ["row", "trained with", "decoded with", *acc, "attended frac", "KV read frac",
            *(["attention recall"] if recall else []), "tokens/s",
            *(f"{k} vs baseline" for k in acc), "KV read vs baseline", "tokens/s vs baseline", "fallback steps"]
    lines = []
    for name, m in result["rows"].items():
        r = result["vs_baseline"].get(name)
        label = name + (" (baseline)" if name == result["baseline"] else "") + (f" ({m['note']})" if m["note"] else "")
        if r is None:
            vs = ["-"] * (len(acc) + 2)
        else:
            vs = ["-" if r[f"{k}_delta"] is None else f"{r[f'{k}_delta']:+.1f} pt" for k in acc]
            vs += ["-" if r["kv_read_fraction"] is None else f"{r['kv_read_fraction']:.3f}x",
                   f"{r['tokens_per_s']:.2f}x"]
        lines.append([label, m["trained_with"], m["policy"], *("-" if m[k] is None else f"{m[k]:.1f}" for k in acc),
                      f"{m['mean_attended_fraction']:.3f}", f"{m['kv_read_fraction']:.3f}",
                      *([f"{m['attention_recall']:.3f}" if "attention_recall" in m else "-"] if recall else []),
                      f"{m['timing']['tokens_per_s']:.1f}", *vs, str(m["fallback_steps"])])
    return reporting.markdown_table(head, lines)


def _mean_spread(values: Sequence[float], fmt: str) -> str:
    """A table cell: the mean, and [min to max] when there are several values (seeds)."""
    spread = f" [{format(min(values), fmt)} to {format(max(values), fmt)}]" if len(values) > 1 else ""
    return f"{format(float(np.mean(values)), fmt)}{spread}"


def format_aspect_table(result: dict[str, Any]) -> str | None:
    """Markdown table of the per-aspect scores (`Task.score`'s "per_aspect", ACLSum): one line per row
    and aspect, mean [min to max] over seeds when `result` has several; None when no row has them."""
    acc = tasks.get(result["config"]["task"]).accuracy_keys
    per_seed = [p["rows"] for p in result.get("per_seed", [])] or [result["rows"]]
    names = [n for n in result["rows"] if all("per_aspect" in rows[n] for rows in per_seed)]
    if not names:
        return None
    lines = []
    for name in names:
        for aspect in result["rows"][name]["per_aspect"]:
            cells = [_mean_spread([rows[name]["per_aspect"][aspect][k] for rows in per_seed], ".1f") for k in acc]
            lines.append([name, aspect, *cells])
    return reporting.markdown_table(["row", "aspect", *acc], lines)


def format_speed_table(result: dict[str, Any]) -> str | None:
    """Markdown table of `evaluate_rows(speed_batches=...)`: per batch and row, decode-loop tokens/s,
    the speed-up over the baseline, its memory-bound ceiling and the fraction of it reached (mean
    [min to max] over seeds when `result` has several); None without speed batches."""
    batches = result["config"].get("speed_batches") or []
    if not batches:
        return None
    seeds = result.get("per_seed") or [result]
    lines = []
    for b in map(str, batches):
        for name in result["rows"]:
            vs = [sd["vs_baseline"][name]["speed"][b] for sd in seeds]
            lines.append([b, name, _mean_spread([sd["rows"][name]["speed"][b]["decode_tokens_per_s"] for sd in seeds],
                                                ".1f"),
                          *(_mean_spread([v[k] for v in vs], fmt) + unit for k, fmt, unit in (
                              ("decode_speedup", ".2f", "x"), ("r", ".2f", ""), ("rho", ".3f", ""),
                              ("ceiling", ".2f", "x"), ("fraction_of_ceiling", ".2f", "")))])
    return reporting.markdown_table(["batch", "row", "decode tokens/s", "vs baseline", "r (KV/weights)",
                                     "rho (KV read vs baseline)", "ceiling", "fraction of ceiling"], lines)


def over_seeds(results: Sequence[dict[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """Per row, each number of the table as {mean, min, max, values} over the results of one comparison
    run once per training seed (same rows, same held-out records; `seeds[i]` trained `results[i]`)."""
    if len(results) != len(seeds) or not results:
        raise ValueError(f"one result per seed: {len(results)} results for seeds {list(seeds)}")
    names = list(results[0]["rows"])
    if any(list(r["rows"]) != names for r in results):
        raise ValueError(f"every seed's comparison must have the same rows, got {[list(r['rows']) for r in results]}")
    acc = tasks.get(results[0]["config"]["task"]).accuracy_keys

    def stats(values):
        known = [v for v in values if v is not None]
        return {**reporting.spread(known), "mean": float(np.mean(known)), "values": values} if known else None

    rows = {}
    for name in names:
        per = [r["rows"][name] for r in results]
        vs = [r["vs_baseline"].get(name) for r in results]
        row = {k: stats([m[k] for m in per]) for k in (*acc, "mean_attended_fraction", "kv_read_fraction")}
        row["tokens_per_s"] = stats([m["timing"]["tokens_per_s"] for m in per])
        if all(v is not None for v in vs):
            row.update({f"{k}_delta": stats([v[f"{k}_delta"] for v in vs]) for k in acc})
            row["tokens_per_s_vs_baseline"] = stats([v["tokens_per_s"] for v in vs])
        rows[name] = row
    return {"seeds": list(seeds), "rows": rows}


def with_seeds(results: Sequence[dict[str, Any]], seeds: Sequence[int],
               runs_per_seed: Sequence[Sequence[str]]) -> dict[str, Any]:
    """One comparison run once per training seed, as one result: the first seed's comparison (the
    shape of a one-seed result, so its readers keep working) plus "over_seeds" (mean, min, max per
    number; `over_seeds`) and "per_seed" (each seed's runs, rows, ratios and config;
    `runs_per_seed[i]` are the runs seed i compared)."""
    result = dict(results[0])
    result["over_seeds"] = over_seeds(results, seeds)
    result["per_seed"] = [{"seed": sd, "runs": list(rs), "rows": r["rows"], "vs_baseline": r["vs_baseline"],
                           "config": r["config"]} for sd, rs, r in zip(seeds, runs_per_seed, results)]
    return result


def format_seed_table(result: dict[str, Any]) -> str:
    """Markdown table of `over_seeds` (in `result["over_seeds"]`): mean [min-max] per number."""
    agg, acc = result["over_seeds"], tasks.get(result["config"]["task"]).accuracy_keys

    def cell(st, fmt, unit=""):
        if st is None:
            return "-"
        return f"{format(st['mean'], fmt)}{unit} [{format(st['min'], fmt)} to {format(st['max'], fmt)}]"

    head = ["row", *acc, "attended frac", "KV read frac", "tokens/s", *(f"{k} vs baseline" for k in acc),
            "tokens/s vs baseline"]
    lines = []
    for name, m in agg["rows"].items():
        label = name + (" (baseline)" if name == result["baseline"] else "")
        vs = [cell(m.get(f"{k}_delta"), "+.1f", " pt") for k in acc] + [cell(m.get("tokens_per_s_vs_baseline"),
                                                                               ".2f", "x")]
        lines.append([label, *(cell(m[k], ".1f") for k in acc), cell(m["mean_attended_fraction"], ".3f"),
                      cell(m["kv_read_fraction"], ".3f"), cell(m["tokens_per_s"], ".0f"), *vs])
    return (f"Mean [min to max] over {len(agg['seeds'])} training seeds ({', '.join(map(str, agg['seeds']))}):\n\n"
            + reporting.markdown_table(head, lines))


@contextlib.contextmanager
def reserved_results(out_dir: str | Path, name: str, *, overwrite: bool = False, option: str = "--name",
                     dir_option: str = "--out-dir"):
    """Hold <out_dir>/<name>.{json,md} for this process before any work is done for them: the folder
    must be (or become) a directory, an existing result is refused unless `overwrite`, and a second
    process writing the same name is refused while this one holds it (`runs.RunLock` on
    <out_dir>/.<name>.lock). Errors name the caller's flags: `dir_option` for the folder, `option`
    for the one that picks another output.
    Yields the folder."""
    if not name.strip() or name != name.strip() or "/" in name or name.startswith("."):
        raise ValueError(f"results name {name!r} must be a plain file stem: not empty, no '/', no leading '.' "
                         "or surrounding spaces")
    with reporting.reserved_outputs(out_dir, [f"{name}.json", f"{name}.md"], overwrite=overwrite,
                                    lock=f".{name}.lock", option=option, dir_option=dir_option) as folder:
        yield folder


def write_results(result: dict[str, Any], out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """<out_dir>/<name>.json and <name>.md (the table plus what ran it).

    Optional keys of `result` that reach the markdown: "environment",
    "notes" (list of lines), "wall_s" ({phase: seconds}, e.g. from the demo).
    """
    out_dir = Path(out_dir)
    json_path = reporting.write_json(result, out_dir / f"{name}.json")
    md_path = out_dir / f"{name}.md"
    env = result.get("environment", {})
    cfg = result["config"]
    timing = "in turns across rows, " if cfg.get("timing") == "interleaved" else ""
    tables = [format_seed_table(result), "", "Seed " + str(result["over_seeds"]["seeds"][0]) + " alone:", ""] \
        if "over_seeds" in result else []
    aspects = format_aspect_table(result)
    aspect_lines = ["", "Per aspect" + (" (mean [min to max] over seeds)" if "over_seeds" in result else "") + ":",
                    "", aspects] if aspects else []
    speed = format_speed_table(result)
    speed_lines = ["", "Decode speed (the decode loop alone, prefill excluded; ceiling = (1 + r) / (1 + rho r)):",
                   "", speed] if speed else []
    md = [f"# Evaluation: {name}", "", *tables, format_table(result), *aspect_lines, *speed_lines, "",
          f"{cfg['num_records']} held-out {cfg['task']} records; timing: batch {cfg['timing_batch']}, "
          f"median of {cfg['timing_repeats']} runs {timing}after warm-up; block size {cfg['block_size']}, "
          f"backend {cfg['backend']}.",
          f"Ran on {reporting.machine_of(result) or '?'}, jax {env.get('jax_version', '?')}, "
          f"{env.get('date', '?')}."]
    md += ["", "Rows:"]
    md += [f"- {n}: model `{m['source'] or '?'}` (trained with {m['trained_with']}), decoded with {m['policy']}"
           + (f"; {m['note']}" if m.get("prompting") == "zero-shot" else "")
           for n, m in result["rows"].items()]
    if result.get("notes"):
        md += ["", *(f"- {line}" for line in result["notes"])]
    if result.get("wall_s"):
        md += ["", "| phase | wall s |", "|---|---|", *(f"| {k} | {v:.0f} |" for k, v in result["wall_s"].items())]
    md_path.write_text("\n".join(md) + "\n")
    return json_path, md_path
