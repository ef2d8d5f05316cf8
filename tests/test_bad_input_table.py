"""docs/notes/bad_input.md, kept true: every row's call raises ValueError with the documented text.

The table is parsed from the file; each row id maps to one case below. A row
without a case, or a case without a row, fails, so the documentation and the
behaviour cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import BlockSparseParams, block_sparse_decode
from selfspan_jax import evaluate as ev
from selfspan_jax import tables
from selfspan_jax import runs
from selfspan_jax.config import LlamaConfig
from selfspan_jax.generation import generate
from selfspan_jax.model import Llama
from selfspan_jax.policies import make_policy
from selfspan_jax.sampling import Sampling
from selfspan_jax.tokenizer import CharTokenizer
from selfspan_jax.train_config import config_from_args, load_config_file
from selfspan_jax.weights import load_model

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "notes" / "bad_input.md"
HF_TINY = ROOT / "tests" / "fixtures" / "tiny_llama" / "llama3_rope_bf16"


def _rows() -> dict[str, str]:
    rows = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("id", "---"):
            rows[cells[0]] = re.fullmatch(r"`(.*)`", cells[2]).group(1)
    return rows


_TOK = CharTokenizer()


def _model():
    cfg = LlamaConfig(vocab_size=len(_TOK), d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64,
                      max_seq_len=64)
    return Llama(cfg, rngs=nnx.Rngs(0))


def _kernel(idx, cnt, head_dim=16, backend="xla"):
    q = np.zeros((1, 2, head_dim), np.float32)
    k = np.zeros((1, 1, 64, head_dim), np.float32)
    return block_sparse_decode(q, k, k, np.asarray(idx, np.int32), np.asarray(cnt, np.int32), block_size=16,
                               backend=backend)


def _config_with(**changes):
    """A damage for `_hf_copy`: config.json with these fields changed."""
    def damage(path: Path):
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **changes}))
    return damage


def _hf_copy(tmp: Path, damage) -> str:
    path = tmp / "ckpt"
    shutil.copytree(HF_TINY, path)
    damage(path)
    return str(path)


def _train_args(tmp: Path, *extra) -> None:
    cfg, _ = config_from_args(["--out", str(tmp / "run"), *extra])
    from selfspan_jax import train as T

    T.train(cfg)


def _second_writer(tmp: Path) -> None:
    with runs.RunLock(tmp / "run"):
        _train_args(tmp, "--steps", "1")


def _eval_without_config(tmp: Path) -> None:
    from selfspan_jax import evaluate as ev

    run = tmp / "run"
    (run / runs.CHECKPOINTS).mkdir(parents=True)
    ev.load_for_eval(str(run))


def _results(tmp: Path, setup=None, *, out: str = "res", name: str = "x", holder: bool = False) -> None:
    """scripts/evaluate.py's output check, as it runs before any work (`tables.reserved_results`)."""
    if setup:
        setup(tmp)
    if holder:  # another evaluation writing the same name holds it
        with tables.reserved_results(tmp / out, name):
            with tables.reserved_results(tmp / out, name):
                pass
    with tables.reserved_results(tmp / out, name):
        pass


def _script(name: str):
    """The module behind scripts/<name>.py (selfspan_jax.cli.<name>)."""
    import importlib

    return importlib.import_module(f"selfspan_jax.cli.{name}")


def _adore_out(tmp: Path, out) -> None:
    """scripts/train_adore.py --run RUN --out OUT on a run directory (its config written as training does)."""
    from selfspan_jax import adore_train
    from selfspan_jax.train_config import TrainConfig

    run = tmp / "run"
    runs.prepare(TrainConfig(out=str(run)))
    adore_train.distill(adore_train.DistillConfig(run=str(run), out=str(out(run))))


def _aclsum_file(tmp: Path, damage=None) -> None:
    """aclsum.load_papers("train") from a folder whose train.jsonl holds one good paper and, at line
    2, the paper changed by `damage` (a str: the line's text); no file at all without `damage`."""
    import json

    from selfspan_jax.data import aclsum

    if damage is not None:
        good = {"id": "P1", "summary": dict.fromkeys(aclsum.ASPECTS, "A summary ."),
                "sentences": {s: ["One .", "Two ."] for s in aclsum.SECTIONS},
                "highlights": {a: {s: [1, 0] for s in aclsum.SECTIONS} for a in aclsum.ASPECTS}}
        bad = damage if isinstance(damage, str) else json.dumps(damage(json.loads(json.dumps(good))))
        (tmp / "train.jsonl").write_text(json.dumps(good) + "\n" + bad + "\n")
    aclsum.load_papers("train", folder=tmp)


def _short_labels(paper):
    paper["highlights"]["outcome"]["conclusion"] = [1]
    return paper


def _dup_config(tmp: Path) -> None:
    (tmp / "c.yaml").write_text("steps: 3\nsteps: 4\n")
    load_config_file(tmp / "c.yaml")


def _out_is_file(tmp: Path) -> None:
    (tmp / "afile").write_text("x")
    cfg, _ = config_from_args(["--out", str(tmp / "afile")])
    with runs.RunLock(cfg.run_dir):
        pass


CASES = {
    "kernel-repeat": lambda tmp: _kernel([[2, 0, 2, 1]], [3]),
    "kernel-count": lambda tmp: _kernel([[0, 1, 2, 3]], [9]),
    "kernel-head-dim": lambda tmp: _kernel([[0]], [1], head_dim=80, backend="pallas"),
    "kernel-params": lambda tmp: BlockSparseParams(block_h=48),
    "generate-eos": lambda tmp: generate(_model(), ["1+2"], tokenizer=_TOK, max_new_tokens=4, eos_id=10**6),
    "generate-pad": lambda tmp: generate(_model(), ["1+2"], tokenizer=_TOK, max_new_tokens=4, pad_id=-5),
    "generate-forced": lambda tmp: generate(_model(), ["1+2"], tokenizer=_TOK, max_new_tokens=4,
                                            sampling=Sampling(forced_tokens=np.full((1, 8), 3.7))),
    "generate-empty": lambda tmp: generate(_model(), np.zeros((1, 0), np.int32), tokenizer=_TOK, max_new_tokens=4),
    "generate-top-p-str": lambda tmp: Sampling(temperature=1.0, top_p="0.5"),
    "generate-top-p-bool": lambda tmp: Sampling(temperature=1.0, top_p=True),
    "generate-budget-bool": lambda tmp: generate(_model(), ["1+2"], tokenizer=_TOK, max_new_tokens=True),
    "generate-seed-float": lambda tmp: Sampling(seed=1.5),
    "generate-seed-big": lambda tmp: Sampling(seed=2**64),
    "policy-spec-twice": lambda tmp: make_policy("sparq(r=4,k=16,r=2)"),
    "policy-spec-no-value": lambda tmp: make_policy("sparq(r=)"),
    "policy-spec-yaml-tag": lambda tmp: make_policy("sparq(r=!!python/object:os.system 1,k=3)"),
    "generate-float-ids": lambda tmp: generate(_model(), [[5.9, 6.2]], tokenizer=_TOK, max_new_tokens=4),
    "generate-nested-ids": lambda tmp: generate(_model(), [[[5, 6]]], tokenizer=_TOK, max_new_tokens=4),
    "generate-temperature": lambda tmp: Sampling(temperature=float("nan")),
    "generate-too-long": lambda tmp: generate(_model(), ["1+2" * 20], tokenizer=_TOK, max_new_tokens=16),
    "config-override-key": lambda tmp: config_from_args(["--model-override", "foo=3"]),
    "config-override-type": lambda tmp: config_from_args(["--model-override", "d_model=abc"]),
    "config-data-key": lambda tmp: config_from_args(["--data", "bogus=1"]),
    "config-file-duplicate": _dup_config,
    "config-file-dir": lambda tmp: load_config_file(tmp),
    "out-is-file": _out_is_file,
    "run-in-use": _second_writer,
    "hf-config-json": lambda tmp: load_model(_hf_copy(tmp, lambda p: (p / "config.json").write_text("{x")),
                                             add_span_tokens=False),
    "hf-config-heads": lambda tmp: load_model(_hf_copy(tmp, _config_with(num_attention_heads=3)), add_span_tokens=False),
    "hf-config-type": lambda tmp: load_model(_hf_copy(tmp, _config_with(hidden_size="64")), add_span_tokens=False),
    "hf-index-list": lambda tmp: load_model(
        _hf_copy(tmp, lambda p: (p / "model.safetensors.index.json").write_text("[]")), add_span_tokens=False),
    "dtype": lambda tmp: load_model(str(HF_TINY), dtype=jnp.int32, add_span_tokens=False),
    "eval-run-no-config": _eval_without_config,
    "adore-out-is-run": lambda tmp: _adore_out(tmp, lambda run: run),
    "adore-out-in-checkpoints": lambda tmp: _adore_out(tmp, lambda run: run / runs.CHECKPOINTS / "ctl"),
    "results-dir-is-file": lambda tmp: _results(tmp, lambda t: (t / "res").write_text("x")),
    "results-exist": lambda tmp: _results(tmp, lambda t: ((t / "res").mkdir(), (t / "res" / "x.json").write_text("{}"))),
    "results-in-use": lambda tmp: _results(tmp, holder=True),
    "results-name": lambda tmp: _results(tmp, name=""),
    "smollm2-cut-too-short": lambda tmp: _script("compare_policies").smollm2_comparison(
        ["dense"], continuation=32, block_size=8, repeats=1, source=str(HF_TINY), max_article_tokens=40),
    # checked before the run is loaded: no run is needed to see the refusal
    "eval-baseline-policies-alone": lambda tmp: ev.compare(str(tmp / "run"),
                                                                    baseline_policies=["quest(page_budget=2)"]),
    "eval-baseline-step-alone": lambda tmp: ev.compare(str(tmp / "run"), baseline_step=40),
    "aclsum-missing-file": lambda tmp: _aclsum_file(tmp),
    "aclsum-malformed-line": lambda tmp: _aclsum_file(tmp, '{"id": "P2", "summary": '),
    "aclsum-label-length": lambda tmp: _aclsum_file(tmp, _short_labels),
}


def test_every_row_has_a_case_and_every_case_a_row():
    assert set(_rows()) == set(CASES)


@pytest.mark.parametrize("row_id", sorted(CASES))
def test_the_documented_error(row_id, tmp_path):
    message = _rows()[row_id]
    with pytest.raises(ValueError) as info:
        CASES[row_id](tmp_path)
    assert message in str(info.value), f"{row_id}: {info.value}"
