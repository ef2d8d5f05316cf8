"""The task registry: per task, its records for a split, how generations are scored, and the generation budget.

Training (`train.py`: its training and held-out sets, the exact match it logs)
and evaluation (`evaluate.py`, `scripts/evaluate.py`, the demo) both go through
here, so the number logged during training and the one `scripts/evaluate.py`
prints are computed by the same code.

Records are the dicts of `selfspan_jax.data` (`prompt`, `completion`, ...).
Jax-free: generating data does not import jax.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import Sequence

import numpy as np

from selfspan_jax.tokenizer import ANCHOR, REF_CLOSE, REF_OPEN, encode_with_spans

TASKS = ("arithmetic", "summarization")


def data_fields(instance) -> dict:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


class Task(abc.ABC):
    """One task. Subclasses set the class attributes and implement `records` and `score`."""

    name: str
    # data options a config gets when it names none
    data_defaults: dict = {}
    # the split held-out evaluation draws from by default
    held_out_split: str
    # keys of `score`'s result, headline first
    accuracy_keys: tuple[str, ...]
    # how a zero-shot row was asked and scored (the comparison table's note)
    zero_shot_note: str = "zero-shot: asked in words"

    @abc.abstractmethod
    def records(self, split: str, n: int, *, seed: int, data: dict | None = None, tokenizer=None,
                seq_len: int | None = None) -> list[dict]:
        """`n` records of `split`; `data` holds the task's options (as in a run's config)."""

    def training_records(self, data: dict, *, num_train: int, num_eval: int, seed: int, tokenizer,
                         seq_len: int) -> tuple[list[dict], list[dict]]:
        """(training records, held-out records) of a run: the held-out ones from `held_out_split`
        with seed + 1, disjoint from training."""
        train = self.records("train", num_train, seed=seed, data=data, tokenizer=tokenizer, seq_len=seq_len)
        held = self.records(self.held_out_split, num_eval, seed=seed + 1, data=data, tokenizer=tokenizer,
                            seq_len=seq_len)
        return train, held

    def exact(self, records: Sequence[dict], texts: Sequence[str]) -> list[bool] | None:
        """Per-record verdict of a checker, for tasks that have one (else None)."""
        return None

    def check_data(self, data: dict) -> None:
        """Raises ValueError naming a data option this task does not know or a value of the wrong
        type, when a config is made (so `--print-config` and a training start agree)."""

    @abc.abstractmethod
    def score(self, records: Sequence[dict], texts: Sequence[str]) -> dict[str, float]:
        """Accuracy metrics (percent) of generated completions against their records."""

    def zero_shot_question(self, record: dict) -> str:
        """What a pretrained model is asked for `record` when it was never fine-tuned on the task."""
        raise ValueError(f"task {self.name!r} has no zero-shot question")

    def score_zero_shot(self, records: Sequence[dict], texts: Sequence[str]) -> dict[str, float | None]:
        """`score`'s keys for free-form replies to `zero_shot_question` (None where a metric needs the
        task's own format)."""
        raise ValueError(f"task {self.name!r} has no zero-shot scoring")

    def _check_lengths(self, records, texts) -> None:
        if len(records) != len(texts):
            raise ValueError(f"{len(records)} records but {len(texts)} generations")


class Arithmetic(Task):
    """Step-by-step expression evaluation (`data.arithmetic`): generated, exact match by the checker."""

    name = "arithmetic"
    # Single-digit operands and intermediate values <= 20, so the few hundred
    # arithmetic facts are learnable by the from-scratch tiny model within the
    # ~10-minute CPU default (docs/notes/training.md has the tuning runs).
    data_defaults = {"max_operand": 9, "max_value": 20}
    zero_shot_note = "zero-shot: asked in words, scored by its final answer"

    def check_data(self, data):
        from selfspan_jax.data import arithmetic

        fields = {f.name: f for f in dataclasses.fields(arithmetic.Difficulty)}
        for key, value in data.items():
            if key not in fields:
                raise ValueError(f"unknown arithmetic data option {key!r} (in --data {key}={value!r}); "
                                 f"known: {sorted(fields)}")
            want = bool if isinstance(fields[key].default, bool) else int
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ValueError(f"arithmetic data option {key} must be {want.__name__}, got {value!r}")
        arithmetic.Difficulty(**{**data_fields(arithmetic.SPLITS["train"]), **data})  # its range checks
    held_out_split = "test"
    # step_progress: partial credit (data.arithmetic.step_progress), which still ranks decoders where
    # long derivations take exact match to ~0 for everyone
    accuracy_keys = ("exact_match", "step_progress")

    def records(self, split, n, *, seed, data=None, tokenizer=None, seq_len=None):
        """Splits: "train", and the held-out "test" (the training distribution, held out by problem
        hash), "harder", "longer", "deeper"; `data` overrides the generator's Difficulty knobs."""
        from selfspan_jax.data import arithmetic

        try:
            return arithmetic.generate_examples(n, seed=seed, split=split, **(data or {}))
        except TypeError as err:  # an unknown Difficulty knob
            raise ValueError(f"bad arithmetic data option in {data}: {err}") from err

    def exact(self, records, texts):
        from selfspan_jax.data.arithmetic import check_completion

        self._check_lengths(records, texts)
        return [bool(check_completion(r["prompt"], t)[0]) for r, t in zip(records, texts)]

    def score(self, records, texts):
        from selfspan_jax.data.arithmetic import score_derivation

        self._check_lengths(records, texts)
        # one check per record gives both metrics
        checks = [score_derivation(r["prompt"], t) for r, t in zip(records, texts)]
        return {"exact_match": 100.0 * float(np.mean([ok for ok, _ in checks])),
                "step_progress": 100.0 * float(np.mean([p for _, p in checks]))}


    def zero_shot_question(self, record):
        from selfspan_jax.data.arithmetic import zero_shot_question

        return zero_shot_question(record["expression"])

    def score_zero_shot(self, records, texts):
        """exact_match = the reply's last integer is the answer (a pretrained model does not write the
        span format, so the derivation checker would reject every reply); step_progress is None."""
        from selfspan_jax.data.arithmetic import final_answer

        self._check_lengths(records, texts)
        right = [final_answer(t) == int(r["answer"]) for r, t in zip(records, texts)]
        return {"exact_match": 100.0 * float(np.mean(right)), "step_progress": None}


class Summarization(Task):
    """Summarization with span headers: news (`data.summarization`: a local JSONL/Parquet source or a
    hub name; ROUGE-oracle headers) or `source=aclsum`, ACL papers with people's span labels
    (`data.aclsum`, the `aclsum` wheel); ROUGE."""

    name = "summarization"
    data_defaults = {}
    held_out_split = "validation"
    accuracy_keys = ("rouge1", "rouge2", "rougeL")
    zero_shot_note = "zero-shot: the plain paper and a request for the three aspect sentences, scored by ROUGE"

    def records(self, split, n, *, seed, data=None, tokenizer=None, seq_len=None):
        """`data["source"]` is required; `max_prompt_tokens` (default 3/4 of `seq_len` when given) cuts
        articles at sentence boundaries; other keys (`max_k`, `config`, field names) go to the loader."""
        from selfspan_jax.data import aclsum, summarization

        opts = dict(data or {})
        source = opts.pop("source", None)
        if not source:
            raise ValueError("task 'summarization' needs --data source=PATH (local .jsonl/.parquet file or "
                             "directory, a datasets hub name such as abisee/cnn_dailymail, or aclsum)")
        default_cut = None if seq_len is None else seq_len * 3 // 4
        opts["max_prompt_tokens"] = opts.get("max_prompt_tokens", default_cut)
        try:
            if source == aclsum.SOURCE:
                return aclsum.load_records(split, limit=n, seed=seed, tokenizer=tokenizer, **opts)
            return summarization.load_records(source, split=split, limit=n, seed=seed, tokenizer=tokenizer, **opts)
        except TypeError as err:  # an unknown loader option
            raise ValueError(f"bad summarization data option in {data}: {err}") from err

    def training_records(self, data, *, num_train, num_eval, seed, tokenizer, seq_len):
        held = self.records(self.held_out_split, num_eval, seed=seed + 1, data=data, tokenizer=tokenizer,
                            seq_len=seq_len)
        # A source without splits (one local file) returns the same articles
        # for every split: drop the held-out ones from training by content.
        held_prompts = {r["prompt"] for r in held}
        train = self.records("train", num_train + len(held), seed=seed, data=data, tokenizer=tokenizer,
                             seq_len=seq_len)
        train = [r for r in train if r["prompt"] not in held_prompts][:num_train]
        if not train or not held:
            raise ValueError(f"summarization source {data.get('source')!r} gave {len(train)} training and "
                             f"{len(held)} held-out records (after removing held-out articles from training); "
                             "need at least one of each")
        return train, held

    def score(self, records, texts):
        """ROUGE F1 x 100 of the summaries without their headers; for ACLSum records also per aspect
        (`per_aspect`: challenge / approach / outcome, each sentence against its reference)."""
        from rouge_score import rouge_scorer

        from selfspan_jax.data import aclsum

        self._check_lengths(records, texts)
        scorer = rouge_scorer.RougeScorer(list(self.accuracy_keys), use_stemmer=True)
        refs, gens = [strip_spans(r["completion"]) for r in records], [strip_spans(t) for t in texts]
        rows = [scorer.score(r, t) for r, t in zip(refs, gens)]
        out = {k: 100.0 * float(np.mean([row[k].fmeasure for row in rows])) for k in self.accuracy_keys}
        if records and all("aspects" in r for r in records):
            out["per_aspect"] = aclsum.score_aspects(refs, gens, self.accuracy_keys)
        return out

    def zero_shot_question(self, record):
        """ACLSum papers only: the paper as plain text and a request for the three aspect sentences."""
        from selfspan_jax.data import aclsum

        if "aspects" not in record:
            raise ValueError("task 'summarization' has a zero-shot question for ACLSum papers (source=aclsum) only")
        return aclsum.zero_shot_question(record)

    def score_zero_shot(self, records, texts):
        """The reply is scored as a generated summary is (it has no headers to strip)."""
        return self.score(records, texts)


_REGISTRY: dict[str, Task] = {t.name: t for t in (Arithmetic(), Summarization())}
assert tuple(_REGISTRY) == TASKS


def get(name: str) -> Task:
    """The registered task `name` (ValueError naming the choices otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose from {list(TASKS)}")
    return _REGISTRY[name]


def generation_budget(records: Sequence[dict], tokenizer, max_seq_len: int) -> int:
    """New tokens to allow: the longest reference completion (+ EOS) plus 16 of slack for a
    longer wrong one, capped so that the longest prompt (+ BOS) still fits `max_seq_len`."""
    longest = max(len(encode_with_spans(tokenizer, r["completion"], continuation=True)) for r in records) + 1
    prompt = max(len(encode_with_spans(tokenizer, r["prompt"])) for r in records) + 1
    return int(max(1, min(longest + 16, max_seq_len - prompt)))


_HEADER_RE = re.compile(re.escape(ANCHOR) + r"(?:" + re.escape(REF_OPEN) + r".*?" + re.escape(REF_CLOSE) + r")?")


def strip_spans(text: str) -> str:
    """Text without anchors and headers (what ROUGE should compare)."""
    return " ".join(line.strip() for line in _HEADER_RE.sub("\n", text).split("\n") if line.strip())
