"""Training: config resolution, loss against a float64 NumPy reference, error
paths, kill/resume to identical parameters, and 1-device vs 4-device runs.

The kill/resume and 4-device tests run the trainer in subprocesses (SIGKILL
needs a process to kill; the 4 CPU devices need XLA_FLAGS before jax starts).
They share a persistent compilation cache so each program compiles once.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import draws, fuzz_cli
from numpy_llama import llama_forward, params_from_model
from selfspan_jax import runs, tasks
from selfspan_jax import train as T
from selfspan_jax import train_config as C
from selfspan_jax.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "mlp_dim": 64}
# 3-operand problems: sequences of at most ~60 characters.
SMALL_DATA = {"min_operands": 3, "max_operands": 3}


def _seed() -> int:
    seed = secrets.randbelow(2**20)
    print(f"seed={seed}")
    return seed


def _small(out, **kw) -> T.TrainConfig:
    base = dict(model_overrides=SMALL_MODEL, data=SMALL_DATA, num_train=64, num_eval=8, steps=4, batch_size=8,
                seq_len=64, lr=3e-3, warmup_steps=1, save_every=2, eval_every=100, log_every=1,
                eval_generate=False, progress=False, tensorboard=False, out=str(out))
    base.update(kw)
    return T.TrainConfig(**base)


# ---------------------------------------------------------------------------
# Config and command line
# ---------------------------------------------------------------------------
def test_precedence_defaults_file_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"steps": 7, "lr": 0.01, "model_overrides": {"d_model": 48}}))
    cfg, print_only = C.config_from_args(["--config", str(cfg_file), "--lr", "0.002", "--model-override",
                                          "n_layers=2", "--no-progress"])
    assert not print_only
    assert cfg.steps == 7                      # from the file
    assert cfg.lr == 0.002                     # flag beats file
    assert cfg.model_overrides == {"d_model": 48, "n_layers": 2}  # merged, value typed
    assert cfg.progress is False
    assert cfg.batch_size == C.DEFAULT.batch_size  # untouched default
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"span_policy": "dense", "fsdp": 2}))
    cfg2, _ = C.config_from_args(["--config", str(json_file)])
    assert (cfg2.span_policy, cfg2.fsdp) == ("dense", 2)


def test_help_documents_every_field():
    """Every TrainConfig field has exactly one flag, derived from the field, with its help text."""
    parser = C.build_arg_parser()
    text = parser.format_help()
    flags = dict(C.field_flags())
    assert {f.name for f in flags.values()} == set(T.TrainConfig.__dataclass_fields__)
    dests = {a.dest for a in parser._actions} - {"help", "config", "print_config"}
    assert dests == set(T.TrainConfig.__dataclass_fields__)
    for flag, field in flags.items():
        assert flag in text, flag
        assert field.metadata["help"].split()[0] in text, field.name
    assert {"--model-override", "--no-eval-generate", "--no-progress", "--lora-mlp", "--export-merged",
            "--init-from", "--data"} <= set(flags)
    for flag in ("--config", "--task", "--model", "--lora-rank", "--span-policy", "--steps", "--batch-size",
                 "--seq-len", "--lr", "--schedule", "--save-every", "--out"):
        assert flag in text, flag
    # a flag of each kind parses into its field, typed
    cfg, _ = C.config_from_args(["--no-eval-generate", "--lora-alpha", "8", "--init-from", "runs/x", "--data",
                                 "max_operands=5", "--seed", "3"])
    assert (cfg.eval_generate, cfg.lora_alpha, cfg.init_from, cfg.seed) == (False, 8.0, "runs/x", 3)
    assert cfg.data["max_operands"] == 5 and cfg.data["max_operand"] == 9  # merged into the task's defaults


@pytest.mark.parametrize("argv, match", [
    (["--task", "poetry"], "unknown task 'poetry'"),
    (["--model", "gpt5"], "unknown model 'gpt5'"),
    (["--lora-rank", "8"], "lora_rank=8 on the from-scratch model 'tiny'"),
    (["--span-policy", "sparse"], "unknown span_policy"),
    (["--steps", "0"], "steps must be a positive int"),
    (["--batch-size", "6", "--grad-accum", "4"], "not divisible by grad_accum"),
    (["--dp", "0"], "dp must be"),
])
def test_bad_settings_raise(argv, match):
    with pytest.raises(ValueError, match=match):
        C.config_from_args(argv)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nstepz: 4\n")
    with pytest.raises(ValueError, match=r"unknown fields \['stepz'\]"):
        C.config_from_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="does not exist"):
        C.config_from_args(["--config", str(tmp_path / "missing.yaml")])
    # issue 14, item 8: duplicate keys took the last value silently; a directory "did not exist"
    bad.write_text("steps: 3\nlr: 0.1\nsteps: 5\n")
    with pytest.raises(ValueError, match="duplicate key 'steps'"):
        C.config_from_args(["--config", str(bad)])
    (tmp_path / "dup.json").write_text('{"steps": 3, "steps": 5}')
    with pytest.raises(ValueError, match=r"names \['steps'\] more than once"):
        C.config_from_args(["--config", str(tmp_path / "dup.json")])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("steps: 3\n")
    with pytest.raises(ValueError, match="is a directory.*a run directory: its config is RUN/config.yaml"):
        C.config_from_args(["--config", str(run)])


def test_a_config_extends_another_and_overrides_it(tmp_path):
    """`extends:` starts from another file (relative to the extending one); the extending file's own
    values win; chains resolve in order; cycles, unknown fields of the base and bad values are named."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("steps: 7\nlr: 0.01\nbatch_size: 4\ndata:\n  min_operands: 3\n")
    (tmp_path / "sub" / "twin.yaml").write_text("extends: ../base.yaml\nspan_policy: dense\nlr: 0.02\n")
    (tmp_path / "sub" / "third.yaml").write_text("extends: twin.yaml\nsteps: 9\n")
    twin, _ = C.config_from_args(["--config", str(tmp_path / "sub" / "twin.yaml")])
    assert (twin.steps, twin.lr, twin.batch_size, twin.span_policy) == (7, 0.02, 4, "dense")
    assert twin.data["min_operands"] == 3
    third, _ = C.config_from_args(["--config", str(tmp_path / "sub" / "third.yaml"), "--batch-size", "2"])
    assert (third.steps, third.lr, third.batch_size, third.span_policy) == (9, 0.02, 2, "dense")
    # the committed dense twin is its span config with the mask, the warm start and the folder changed
    root = Path(__file__).resolve().parents[1] / "configs"
    span, dense = C.load_config_file(root / "arith_long.yaml"), C.load_config_file(root / "arith_long_dense.yaml")
    assert {k for k in span.keys() | dense.keys() if span.get(k) != dense.get(k)} == {"span_policy", "init_from", "out"}
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ValueError, match="extends makes a cycle"):
        C.load_config_file(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: [base.yaml]\n")
    with pytest.raises(ValueError, match="extends must name a config file"):
        C.load_config_file(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ValueError, match="missing.yaml.*does not exist"):
        C.load_config_file(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("stepz: 1\n")
    (tmp_path / "f.yaml").write_text("extends: e.yaml\n")
    with pytest.raises(ValueError, match=r"e.yaml.*unknown fields \['stepz'\]"):
        C.load_config_file(tmp_path / "f.yaml")


def test_evaluating_a_run_directory_without_its_config_is_named(tmp_path):
    from selfspan_jax import evaluate as ev

    run = tmp_path / "run"
    T.train(_small(run, steps=2))
    (run / runs.CONFIG).unlink()
    with pytest.raises(ValueError, match="looks like a training run directory but has no config.yaml"):
        ev.load_for_eval(str(run))


def test_script_reports_errors_cleanly(capsys):
    from selfspan_jax.cli import train as script

    assert script.main(["--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert script.main(["--print-config", "--steps", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3


# ---------------------------------------------------------------------------
# Loss, schedule
# ---------------------------------------------------------------------------
def _np_completion_loss(logits, tokens, mask):
    logits = logits.astype(np.float64)[:, :-1]
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    tgt = tokens[:, 1:]
    w = mask[:, 1:]
    nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    correct = logits.argmax(-1) == tgt
    return (nll * w).sum(), w.sum(), (correct * w).sum()


def test_completion_loss_matches_numpy():
    rng = np.random.default_rng(_seed())
    B, Tn, V = 3, 11, 17
    logits = rng.normal(0, 3, (B, Tn, V)).astype(np.float32)
    tokens = rng.integers(0, V, (B, Tn))
    mask = rng.random((B, Tn)) < 0.6
    got = [float(x) for x in T.completion_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))]
    want = _np_completion_loss(logits, tokens, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_eval_step_matches_float64_model_with_span_mask(tmp_path):
    """Teacher-forced loss of the jitted eval step == float64 NumPy LLaMA run
    with the span mask of spans.attention_mask, on real arithmetic rows."""
    from selfspan_jax.spans import attention_mask

    cfg = _small(tmp_path, seed=_seed())
    b = T.build(cfg)
    rows = b.train_set.rows(np.arange(4))
    got = jax.jit(T.make_eval_step(b.graphdef, T._mask_fn(cfg, b.span_tokens)))(
        b.trainable, b.frozen, {k: jnp.asarray(v) for k, v in rows.items()})
    mask = np.asarray(attention_mask(rows["tokens"], b.span_tokens, cfg.max_segments, rows["lengths"]))
    # The span mask must differ from causal somewhere, or this test proves nothing about it.
    causal = np.tril(np.ones((cfg.seq_len,) * 2, bool))
    valid = np.arange(cfg.seq_len)[None, :] < rows["lengths"][:, None]
    assert (mask != (causal[None] & valid[:, :, None] & valid[:, None, :])).any()
    logits = llama_forward(params_from_model(b.model), b.model.config, rows["tokens"], mask=mask)
    want = _np_completion_loss(logits, rows["tokens"], rows["loss_mask"])
    np.testing.assert_allclose([float(x) for x in got], want, rtol=2e-5)
    # bf16 compute (the GPU default): weights stay fp32 masters, the loss moves
    # only by bf16 rounding.
    b16 = T.build(cfg.replace(dtype="bfloat16"))
    assert {x.dtype for x in jax.tree.leaves(b16.trainable)} == {jnp.dtype(jnp.float32)}
    got16 = jax.jit(T.make_eval_step(b16.graphdef, T._mask_fn(cfg, b16.span_tokens)))(
        b16.trainable, b16.frozen, {k: jnp.asarray(v) for k, v in rows.items()})
    assert float(got16[0]) == pytest.approx(want[0], rel=3e-2)
    assert float(got16[0]) != pytest.approx(want[0], rel=1e-6)  # it really ran in bf16


def test_a_batch_cut_to_its_longest_row_gives_the_full_width_step(tmp_path):
    """pad_multiple: one train step on rows cut to their longest example (rounded up) gives the same
    loss, gradient norm and updated parameters as on the full --seq-len rows, under the span mask (whose
    padding rule the cut touches); the width really shrank."""
    # the span mask only: the causal mask has no padding term to get wrong
    for policy in ("self_span",):
        cfg = _small(tmp_path / policy, seed=_seed(), span_policy=policy, seq_len=96, pad_multiple=8)
        b = T.build(cfg)
        idx = np.arange(8)
        full, cut = b.train_set.rows(idx), b.train_set.rows(idx, cfg.pad_multiple)
        assert cut["tokens"].shape[1] < full["tokens"].shape[1]
        step = jax.jit(T.make_train_step(b.graphdef, b.tx, T._mask_fn(cfg, b.span_tokens), cfg.grad_accum))
        outs = []
        for rows in (full, cut):
            opt_state = b.tx.init(b.trainable)
            trainable = jax.tree.map(jnp.copy, b.trainable)
            outs.append(step(trainable, b.frozen, opt_state, {k: jnp.asarray(v) for k, v in rows.items()}))
        (p_full, _, m_full), (p_cut, _, m_cut) = outs
        for key in ("loss", "grad_norm", "n_targets", "token_acc"):
            assert float(m_cut[key]) == pytest.approx(float(m_full[key]), rel=1e-5), (policy, key)
        for a, c in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_cut)):
            np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_a_run_saved_before_a_field_existed_resumes_with_its_default(tmp_path):
    """A saved config.yaml without a field added later (here pad_multiple) reads as that field's
    default: it resumes under the default and is refused under any other value."""
    cfg = _small(tmp_path)
    saved = cfg.to_dict()
    del saved["pad_multiple"]
    assert C.config_differences(saved, cfg) == {}
    assert C.config_differences(saved, cfg.replace(pad_multiple=16)) == {"pad_multiple": (0, 16)}


def test_schedule_warmup_then_cosine():
    cfg = T.TrainConfig(lr=1e-3, steps=100, warmup_steps=10, min_lr_ratio=0.1)
    sched = T.make_schedule(cfg)
    for step in (0, 5, 10, 40, 77, 100):
        if step <= 10:
            want = 1e-3 * step / 10
        else:
            frac = (step - 10) / 90
            want = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * frac))
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step


# ---------------------------------------------------------------------------
# Error paths
# ---------------------------------------------------------------------------
def test_run_dir_with_other_config_is_refused(tmp_path):
    cfg = _small(tmp_path / "run")
    runs.prepare(cfg)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved == cfg.to_dict()
    runs.prepare(cfg.replace(progress=True))  # cosmetic fields may change
    with pytest.raises(ValueError, match=r"different config \(lr: saved 0.003 vs now 0.1"):
        runs.prepare(cfg.replace(lr=0.1))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    # An absurd learning rate overflows the weights after the first update,
    # so the loss of step 2 is NaN/inf.
    cfg = _small(tmp_path / "run", lr=1e30, warmup_steps=0, grad_clip=0.0, save_every=1, steps=6,
                 span_policy="dense")
    with pytest.raises(T.TrainingDiverged, match=r"at step 2; stopped; the last good checkpoint is step 1"):
        T.train(cfg)
    with Checkpointer(tmp_path / "run" / "checkpoints") as mgr:
        assert mgr.all_steps() == [1]
    logged = [m["step"] for m in runs.read_metrics(tmp_path / "run")]
    assert logged == [1]


def test_init_from_starts_from_another_runs_parameters(tmp_path):
    seed = _seed()
    source = T.train(_small(tmp_path / "short", seed=seed, steps=3))
    # A warm start on other data: with a vanishing learning rate its first
    # checkpoint must hold the source's final parameters, not its own init.
    warm_cfg = _small(tmp_path / "long", seed=seed + 1, steps=1, lr=1e-30, warmup_steps=0,
                      data={"min_operands": 4, "max_operands": 4}, seq_len=96, init_from=str(tmp_path / "short"))
    warm = T.train(warm_cfg)
    cold = T.train(warm_cfg.replace(init_from=None, out=str(tmp_path / "cold")))
    src_leaves = jax.tree.leaves(jax.device_get(source.trainable))
    warm_leaves = jax.tree.leaves(jax.device_get(warm.trainable))
    cold_leaves = jax.tree.leaves(jax.device_get(cold.trainable))
    assert len(src_leaves) == len(warm_leaves)
    for a, b in zip(src_leaves, warm_leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(np.asarray(a), np.asarray(c)) for a, c in zip(src_leaves, cold_leaves))

    with pytest.raises(ValueError, match=r"trained model_overrides=.*the parameter trees differ"):
        T.train(warm_cfg.replace(out=str(tmp_path / "other"), model_overrides={**SMALL_MODEL, "d_model": 48}))
    with pytest.raises(ValueError, match=r"is not a run directory"):
        T.train(warm_cfg.replace(out=str(tmp_path / "none"), init_from=str(tmp_path / "missing")))


def test_one_seed_is_bit_identical_and_another_changes_init_data_and_order(tmp_path):
    """Two runs with one seed on one machine: bit-identical parameters and the same loss at every
    step. Another seed: another initialisation, other training problems, another order (the seed
    reaches all three; the spread over seeds in demo.py --seeds is not the spread of one seed)."""
    from selfspan_jax.data.batches import epoch_permutation

    seed = _seed()
    a, b = (T.train(_small(tmp_path / name, seed=seed, steps=5)) for name in ("a", "b"))
    for x, y in zip(jax.tree.leaves(a.trainable), jax.tree.leaves(b.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    losses = [[m["loss"] for m in runs.read_metrics(tmp_path / name) if "loss" in m] for name in ("a", "b")]
    assert len(losses[0]) == 5 and losses[0] == losses[1]

    one, other = (T.build(_small(tmp_path / "unused", seed=s)) for s in (seed, seed + 1))
    matrices = [(x, y) for x, y in zip(jax.tree.leaves(one.trainable), jax.tree.leaves(other.trainable))
                if x.ndim == 2]
    assert matrices and not any(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in matrices)
    assert [r["expression"] for r in one.train_set.records] != [r["expression"] for r in other.train_set.records]
    n = len(one.train_set)
    assert not np.array_equal(epoch_permutation(n, seed, 0), epoch_permutation(n, seed + 1, 0))


# ---------------------------------------------------------------------------
# Kill / resume and multi-device (subprocesses)
# ---------------------------------------------------------------------------
def _env(cache: Path, devices: int = 1) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # Each program compiles once across the test's processes.
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    return env


def _train_cmd(out: Path, seed: int, steps: int, eval_every: int = 1000) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--out", str(out), "--seed", str(seed),
            "--steps", str(steps), "--save-every", "2", "--keep-checkpoints", "2", "--log-every", "1",
            "--num-train", "40", "--num-eval", "8", "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3",
            "--warmup-steps", "2", "--eval-every", str(eval_every), "--no-eval-generate", "--no-progress",
            "--no-tensorboard", "--span-policy", "dense",
            *[a for k, v in SMALL_MODEL.items() for a in ("--model-override", f"{k}={v}")],
            *[a for k, v in SMALL_DATA.items() for a in ("--data", f"{k}={v}")]]


def _final_state(run: Path, step: int):
    with Checkpointer(run / "checkpoints") as mgr:
        assert mgr.latest_step() == step
        return mgr.restore(None)


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    seed, steps = _seed(), 30
    cache = tmp_path / "jax_cache"
    ref = subprocess.run(_train_cmd(tmp_path / "ref", seed, steps), env=_env(cache), capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(run, seed, steps), env=_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    ckpts = run / "checkpoints"
    # Kill as soon as a mid-run checkpoint is committed (the step directory
    # appears atomically when orbax renames its temporary directory).
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 4 for p in ckpts.iterdir()):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    with Checkpointer(ckpts) as mgr:
        killed_at = mgr.latest_step()
    assert killed_at is not None and killed_at < steps

    resumed = subprocess.run(_train_cmd(run, seed, steps), env=_env(cache), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (s_ref, d_ref), (s_run, d_run) = _final_state(tmp_path / "ref", steps), _final_state(run, steps)
    assert d_ref == d_run  # same data position
    assert jax.tree.structure(s_ref) == jax.tree.structure(s_run)
    # embedding, final norm, 2 layer norms, 7 projections (the head is tied)
    assert len(jax.tree.leaves(s_ref["params"])) == 11
    for x, y in zip(jax.tree.leaves(s_ref), jax.tree.leaves(s_run), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # metrics.jsonl: one line per step, the redone steps not duplicated, same losses.
    ref_m = [m for m in runs.read_metrics(tmp_path / "ref") if "loss" in m]
    run_m = [m for m in runs.read_metrics(run) if "loss" in m]
    assert [m["step"] for m in run_m] == list(range(1, steps + 1)) == [m["step"] for m in ref_m]
    assert [m["loss"] for m in run_m] == [m["loss"] for m in ref_m]


@pytest.mark.parametrize("args, message", [
    (["--model-override", "foo=3"], "not a LlamaConfig field"),
    (["--print-config", "--model-override", "foo=3"], "not a LlamaConfig field"),
    (["--model-override", "d_model=abc"], "d_model must be a positive int"),
    (["--print-config", "--model-override", "n_heads=4.5"], "n_heads must be a positive int, got 4.5"),
    (["--model-override", "norm_eps=tiny"], "norm_eps='tiny': expected int or float"),
    (["--data", "bogus=1"], "unknown arithmetic data option 'bogus'"),
    (["--print-config", "--data", "max_operands=many"], "max_operands must be int"),
    (["--data", "min_operands=5", "--data", "max_operands=3"], "min_operands <= max_operands"),
])
def test_bad_overrides_are_named_before_anything_runs(tmp_path, capsys, args, message):
    # issue 14, item 6: these were raw TypeErrors at build time, or accepted by --print-config
    from selfspan_jax.cli import train as script

    assert script.main(["--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make_out", [lambda d: d / "afile", lambda d: d / "afile" / "sub"])
def test_out_that_is_a_file_is_named(tmp_path, capsys, make_out):
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(ValueError, match="cannot use .* as a run directory"):
        T.train(_small(make_out(tmp_path)))


def test_a_failed_start_leaves_no_config_behind(tmp_path):
    # issue 14, item 6: a start that failed on its data wrote config.yaml, and the corrected command
    # was then refused as "a different config"
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="needs --data source"):
        T.train(_small(run, task="summarization", data={}))
    assert not (run / runs.CONFIG).exists()
    assert T.train(_small(run, steps=2)).step == 2


def test_second_writer_is_refused_and_a_dead_holder_is_not(tmp_path, capsys):
    """Issue 14: two trainers on one run directory. The second is refused with a message naming the
    holder; a holder killed with SIGKILL leaves no stale lock (the kernel drops its flock)."""
    run = tmp_path / "run"
    cfg = _small(run, steps=2)
    with runs.RunLock(run):
        with pytest.raises(runs.RunDirLocked, match=f"pid {os.getpid()} on host"):
            T.train(cfg)
        from selfspan_jax.cli import train as script

        assert script.main(["--out", str(run), "--steps", "2"]) == 1
        assert "is in use" in capsys.readouterr().err
    assert not (run / "checkpoints").exists()  # the refused start wrote nothing

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from selfspan_jax import runs; "
                               "runs.RunLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(120)",
                               str(run)], stdout=subprocess.PIPE, text=True, env=_env(tmp_path / "cache"))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(runs.RunDirLocked, match=f"pid {holder.pid} "):
        T.train(cfg)
    holder.kill()
    holder.wait()
    assert T.train(cfg).step == 2  # the dead holder's lock file is no obstacle


def test_evaluation_owed_by_a_killed_run_is_made_on_resume(tmp_path):
    """Issue 14: a run killed after its final checkpoint and before its final evaluation must
    produce that evaluation when restarted (and is not 'finished' until it has)."""
    run = tmp_path / "run"
    cfg = _small(run, steps=4, eval_every=2)
    T.train(cfg)
    full = runs.read_metrics(run)
    assert sorted(runs.evaluated_steps(run)) == [2, 4] and runs.is_finished(cfg)
    # what the killed run leaves: everything but the last evaluation line
    last_eval = max(i for i, m in enumerate(full) if "eval_loss" in m)
    (run / runs.METRICS).write_text("".join(json.dumps(m) + "\n" for i, m in enumerate(full) if i != last_eval))
    assert runs.evaluation_owed(cfg, 4) and not runs.is_finished(cfg)
    result = T.train(cfg)
    assert result.step == 4 and runs.is_finished(cfg)
    again = runs.read_metrics(run)
    assert [m for m in again if "eval_loss" in m] == [m for m in full if "eval_loss" in m]  # same numbers
    assert [m["step"] for m in again if "loss" in m] == [1, 2, 3, 4]  # no training step redone


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted_run(tmp_path):
    """Fault injection (issue 14): SIGKILL at random moments of a run that checkpoints every 2 steps
    and evaluates every 4 (so a kill can land inside an async save, between a save and its
    evaluation, or mid-step), up to three times, resuming after each. The final parameters and
    optimizer state equal an uninterrupted run's, metrics.jsonl has every step's train line once
    with the same loss, and every evaluation the uninterrupted run made, with the same numbers."""
    seed, steps = _seed(), 16
    rng = np.random.default_rng(seed)
    cache = tmp_path / "jax_cache"
    ref = subprocess.run(_train_cmd(tmp_path / "ref", seed, steps, eval_every=4), env=_env(cache),
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_lines = [m["elapsed_s"] for m in runs.read_metrics(tmp_path / "ref") if "elapsed_s" in m]
    span = ref_lines[-1] - ref_lines[0]  # wall time from the first train line to the end
    run = tmp_path / "run"
    kills = 0
    for attempt in range(4):
        start_at = runs.latest_step(run) or 0
        proc = subprocess.Popen(_train_cmd(run, seed, steps, eval_every=4), env=_env(cache),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt < 3:
            # once this start is stepping (a train line past its checkpoint), kill at a random moment
            # of the rest of the run: mid-step, inside an async save, or between a save and its eval
            while proc.poll() is None and not any(m.get("step", 0) > start_at and "loss" in m
                                                  for m in runs.read_metrics(run)):
                time.sleep(0.005)
            time.sleep(float(rng.uniform(0, span)))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                print(f"killed at checkpoint {runs.latest_step(run)}, "
                      f"evaluated {sorted(runs.evaluated_steps(run))}")
                continue
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
        break
    print(f"{kills} kills")
    (s_ref, d_ref), (s_run, d_run) = _final_state(tmp_path / "ref", steps), _final_state(run, steps)
    assert d_ref == d_run
    for x, y in zip(jax.tree.leaves(s_ref), jax.tree.leaves(s_run), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ref_m, run_m = runs.read_metrics(tmp_path / "ref"), runs.read_metrics(run)
    train = lambda ms: [(m["step"], m["loss"]) for m in ms if "loss" in m]  # noqa: E731
    evals = lambda ms: {m["step"]: (m["eval_loss"], m["eval_token_acc"]) for m in ms if "eval_loss" in m}  # noqa: E731
    assert train(run_m) == train(ref_m) and [s for s, _ in train(run_m)] == list(range(1, steps + 1))
    assert evals(run_m) == evals(ref_m) and sorted(evals(run_m)) == [4, 8, 12, 16]
    assert len([m for m in run_m if "eval_loss" in m]) == 4  # no evaluation written twice


_MULTI = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from selfspan_jax import train as T
    cfg = T.TrainConfig(**json.loads(sys.argv[1]))
    res = T.train(cfg)
    spec = {jax.tree_util.keystr(k): str(v.sharding.spec) for k, v in
            jax.tree_util.tree_flatten_with_path(res.trainable)[0]}
    np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(res.trainable)])
    print(json.dumps({"devices": jax.device_count(), "spec": spec}))
""")


def test_four_devices_dp_fsdp_match_one_device(tmp_path):
    """Same run on 1 device and on a 2 x 2 (data x fsdp) mesh of 4 CPU
    devices. The 4-device run also accumulates gradients over 2 interleaved
    micro-batches, so the comparison covers accumulation under sharding too."""
    seed = _seed()
    # d_model 64 so that the embedding and MLP kernels pass the FSDP size threshold.
    model = dict(SMALL_MODEL, d_model=64, mlp_dim=128)
    cfg = _small(tmp_path / "one", model_overrides=model, seed=seed, steps=4, save_every=100)
    multi = cfg.replace(out=str(tmp_path / "four"), dp=2, fsdp=2, grad_accum=2)
    proc = subprocess.run([sys.executable, "-c", _MULTI, json.dumps(multi.to_dict()), str(tmp_path / "four.npz")],
                          env=_env(tmp_path / "cache", devices=4), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["devices"] == 4
    assert "fsdp" in info["spec"]["['embed']['embedding'].value"]
    assert "fsdp" in info["spec"]["['layers'][0]['mlp']['up_proj']['kernel'].value"]
    assert "fsdp" not in info["spec"]["['final_norm']['scale'].value"]  # below the size threshold

    one = T.train(cfg)
    assert jax.device_count() == 1
    l1 = [m["loss"] for m in runs.read_metrics(tmp_path / "one") if "loss" in m]
    l4 = [m["loss"] for m in runs.read_metrics(tmp_path / "four") if "loss" in m]
    assert len(l1) == len(l4) == 4
    np.testing.assert_allclose(l4, l1, rtol=2e-5)
    n1 = [m for m in runs.read_metrics(tmp_path / "one") if "loss" in m]
    n4 = [m for m in runs.read_metrics(tmp_path / "four") if "loss" in m]
    assert [m["token_acc"] for m in n1] == pytest.approx([m["token_acc"] for m in n4], abs=1e-6)
    e1 = [m["eval_loss"] for m in runs.read_metrics(tmp_path / "one") if "eval_loss" in m]
    e4 = [m["eval_loss"] for m in runs.read_metrics(tmp_path / "four") if "eval_loss" in m]
    np.testing.assert_allclose(e4, e1, rtol=2e-5)
    four = np.load(tmp_path / "four.npz")
    for i, x in enumerate(jax.tree.leaves(one.trainable)):
        np.testing.assert_allclose(four[f"arr_{i}"], np.asarray(x), atol=5e-5)
    # load_run restores the final checkpoint into an nnx.eval_shape model.
    run = runs.load_run(tmp_path / "one")
    assert run.config == cfg and run.step == cfg.steps
    for x, y in zip(jax.tree.leaves(nnx.state(run.model)), jax.tree.leaves(one.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_summarization_task_from_local_file(tmp_path):
    fixture = ROOT / "tests" / "fixtures" / "news_sample.jsonl"
    cfg = _small(tmp_path, task="summarization", data={"source": str(fixture)}, seq_len=1024, overlong="drop",
                 num_train=10, num_eval=3, batch_size=2)
    from selfspan_jax.tokenizer import CharTokenizer

    def task_records(cfg, tok):
        return tasks.get(cfg.task).training_records(cfg.data, num_train=cfg.num_train, num_eval=cfg.num_eval,
                                                   seed=cfg.seed, tokenizer=tok, seq_len=cfg.seq_len)

    train, held = task_records(cfg, CharTokenizer())
    assert len(held) == 3 and len(train) == 7  # the fixture is one file of 10 articles, no splits
    assert not {r["id"] for r in train} & {r["id"] for r in held}  # held-out articles never trained on
    assert all(r["task"] == "summarization" for r in train + held)
    with pytest.raises(ValueError, match="needs --data source=PATH"):
        task_records(cfg.replace(data={}), CharTokenizer())


def test_lora_trains_only_adapters_and_span_rows(tmp_path):
    """LoRA on a pretrained checkpoint: base weights stay bit-identical, the
    adapters and the span-token rows move, and the adapters are saved."""
    from selfspan_jax import hf_interop
    from selfspan_jax.lora import apply_lora
    from selfspan_jax.weights import load_model

    fixture = str(ROOT / "tests" / "fixtures" / "tiny_llama" / "mqa_untied_sharded")
    cfg = _small(tmp_path / "run", model=fixture, model_overrides={}, lora_rank=4, lora_alpha=8.0, steps=2,
                 batch_size=4, seq_len=128, overlong="drop", span_policy="dense", lr=1e-2, seed=_seed())
    res = T.train(cfg)
    trained = res.model
    base, _ = load_model(fixture)
    flat_trained = dict(nnx.to_flat_state(nnx.state(trained)))
    flat_base = dict(nnx.to_flat_state(nnx.state(base)))
    moved = []
    for path, var in flat_trained.items():
        if path in flat_base:
            same = np.array_equal(np.asarray(var[...]), np.asarray(flat_base[path][...]))
            if "new_token_embed" in path or "new_token_head" in path:
                moved.append(not same)
            else:
                assert same, f"frozen base weight {path} changed"
        elif "lora_b" in path:  # zero at init; must have learned something
            moved.append(bool(np.abs(np.asarray(var[...])).max() > 0))
    assert moved and all(moved)
    # The saved adapters reproduce the trained model on the original base.
    apply_lora(base, rank=4, alpha=8.0, rngs=nnx.Rngs(0))
    hf_interop.load_lora_adapters(base, tmp_path / "run" / "adapters")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, base.config.vocab_size, (2, 12)))
    np.testing.assert_allclose(np.asarray(base(tokens)), np.asarray(trained(tokens)), atol=1e-5)
    loaded = runs.load_run(tmp_path / "run").model  # base reloaded from cfg.model, adapters from the checkpoint
    np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(trained(tokens)), atol=1e-6)


_TRAIN_FLAGS = ["--task", "--model", "--model-override", "--data", "--num-train", "--num-eval", "--lora-rank",
                "--lora-alpha", "--span-policy", "--max-segments", "--init-from", "--steps", "--batch-size",
                "--grad-accum", "--seq-len", "--lr", "--schedule", "--warmup-steps", "--min-lr-ratio",
                "--weight-decay", "--grad-clip", "--b1", "--b2", "--remat", "--dtype", "--overlong", "--seed",
                "--save-every", "--keep-checkpoints", "--eval-every", "--eval-batch-size", "--log-every", "--dp",
                "--fsdp", "--config"]
# no huge sizes: a 10**10-example data set is honoured (slow, not wrong), as in evaluate.py's fuzz
_TRAIN_VALUES = st.one_of(
    st.integers(-3, 3).map(str),
    st.sampled_from(["0", "-1", "1.5", "1e-3", "nan", "inf", "", " ", "abc", "nosuch", "tiny", "dense", "self_span",
                     "arithmetic", "summarization", "cosine", "linear", "bfloat16", "float16", "int8", "truncate",
                     "drop", "error", "min_operands=2", "min_operands=x", "=", "bogus=1", "d_model=0",
                     "n_heads=3", "configs/arith_long.yaml", "nosuch.yaml", "2"]))


@settings(max_examples=draws(30), deadline=None)
@given(flags=st.dictionaries(st.sampled_from(_TRAIN_FLAGS), _TRAIN_VALUES, min_size=1, max_size=4))
def test_train_script_answers_any_flag_values_with_a_message(flags):
    """Fuzz: random values for train.py's flags (on a small base run) end in argparse's usage error, the
    script's own "error:" line (2: the settings, 1: what training found), or the first train step's
    construction (every check passed) -- never a traceback."""
    import tempfile

    from selfspan_jax.cli import train as script

    tmp = Path(tempfile.mkdtemp())
    base = ["--num-train", "64", "--num-eval", "8", "--steps", "2", "--no-progress", "--no-tensorboard",
            "--out", str(tmp / "run")]
    argv = [*base, *[a for k, v in flags.items() for a in (k, str(ROOT / v) if k == "--config" and "yaml" in v
                                                           else v)]]
    fuzz_cli(script.main, argv, stub=(T, "make_train_step"), error_code=(1, 2), prog="train.py", cwd=tmp)
