"""News summarization with span annotations (CNN/DailyMail style).

Every article sentence is a prompt segment; every summary (highlight)
sentence is a completion segment whose header lists the article segments it
draws on, found by a ROUGE greedy oracle:

    prompt:      Summarize the article.\\n
                 <|anchor|>[1] A new footbridge ... opened on Saturday.\\n
                 <|anchor|>[2] The bridge links ...\\n
                 ...
    completion:  <|anchor|><|ref|>1<|/ref|>The footbridge opened on Saturday.\\n
                 <|anchor|><|ref|>4,5<|/ref|>Costs rose ...

The ids in a header are SEGMENT numbers (docs/spec.md §2: seg counts anchors,
segment 0 is the instruction). Article sentence i sits in segment i, and the
visible "[i]" equals it, so what the model reads and what it must write
agree. Summary sentence j is segment n_sentences + j.

Header digits reach the model as single-digit tokens whatever the tokenizer:
`tokenizer.encode_with_spans` (used by data.batches and by the truncation
here) encodes header contents one character at a time.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

from selfspan_jax.tokenizer import ANCHOR, REF_CLOSE, REF_OPEN, encode_with_spans

INSTRUCTION = "Summarize the article."

# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _check_fields(row: Any, where: str, article_field: str, summary_field: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in (article_field, summary_field):
        if name not in row:
            raise ValueError(f"{where}: missing field {name!r} (has {sorted(row)})")
        if not isinstance(row[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    return {
        "id": str(row.get("id", where)),
        "article": row[article_field],
        "highlights": row[summary_field],
    }


def read_jsonl(path, check) -> list:
    """`check(row, "file:line")` of every non-blank line of a JSONL file; a line that is not JSON is a
    ValueError naming its file and line (`check` names the field it refuses the same way)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            out.append(check(row, where))
    return out


def chosen_rows(rows: list, limit: int | None, seed: int | None) -> list:
    """All `rows`, or at most `limit` of them: the first ones, or with `seed` a seeded random subset
    kept in their order."""
    if limit is None or limit >= len(rows):
        return rows
    if seed is None:
        return rows[:limit]
    return [rows[i] for i in np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))]


def _read_jsonl(path: str, article_field: str, summary_field: str) -> list[dict]:
    return read_jsonl(path, lambda row, where: _check_fields(row, where, article_field, summary_field))


def _read_parquet(path: str, article_field: str, summary_field: str) -> list[dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for name in (article_field, summary_field):
        if name not in table.column_names:
            raise ValueError(f"{path}: no column {name!r} (has {table.column_names})")
    return [
        _check_fields(row, f"{path}:row {i}", article_field, summary_field)
        for i, row in enumerate(table.to_pylist())
    ]


def _local_files(source: str, split: str) -> list[str]:
    """A directory with files named after `split` ("validation.jsonl",
    "train-00000.parquet") gives those, otherwise every data file in it."""
    if not os.path.isdir(source):
        return [source]
    files = sorted(f for s in _LOCAL_SUFFIXES for f in glob.glob(os.path.join(source, f"*{s}")))
    if not files:
        raise ValueError(f"directory {source!r} holds no {'/'.join(_LOCAL_SUFFIXES)} files")
    named = [f for f in files if os.path.basename(f).startswith(split)]
    return named or files


SPLITS = ("train", "validation", "test")
DEFAULT_HUB = "abisee/cnn_dailymail"


def load_articles(
    source: str = DEFAULT_HUB,
    *,
    split: str = "train",
    limit: int | None = None,
    seed: int | None = None,
    config: str | None = "3.0.0",
    article_field: str = "article",
    summary_field: str = "highlights",
) -> list[dict]:
    """Articles as [{"id", "article", "highlights"}].

    `source`: a local .jsonl/.json (one object per line) or .parquet file, a
    directory of them, or a `datasets` hub name (default CNN/DailyMail
    "abisee/cnn_dailymail", config "3.0.0") for machines with network.
    `split` picks the hub split, or the files of a directory whose names
    start with it ("validation.jsonl"); a single local file, or a directory
    without such names, is returned whole (the caller chose the file).
    `limit`: at most this many articles: the first ones, or with `seed` a
    seeded random subset (kept in source order).
    Malformed input raises ValueError naming file and line (JSONL) or row.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    if os.path.exists(source):
        rows: list[dict] = []
        for path in _local_files(source, split):
            if path.endswith(".parquet"):
                rows.extend(_read_parquet(path, article_field, summary_field))
            elif path.endswith((".jsonl", ".json")):
                rows.extend(_read_jsonl(path, article_field, summary_field))
            else:
                raise ValueError(f"unsupported file type {path!r}; use {'/'.join(_LOCAL_SUFFIXES)}")
        return chosen_rows(rows, limit, seed)
    if source.endswith(_LOCAL_SUFFIXES) or source.startswith((".", "/", "~")):
        raise ValueError(f"local source {source!r} does not exist")
    import datasets  # heavy; only for hub loading

    ds = datasets.load_dataset(source, config, split=split)
    if limit is not None and limit < len(ds):
        ds = (ds if seed is None else ds.shuffle(seed=seed)).select(range(limit))
    return [
        _check_fields(dict(row), f"{source}[{split}] row {i}", article_field, summary_field)
        for i, row in enumerate(ds)
    ]


# ---------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------
# Words that end in "." without ending a sentence. Lower-case, with the dot.
ABBREVIATIONS = frozenset(
    """mr. mrs. ms. dr. prof. st. sr. jr. gen. gov. sen. rep. lt. col. sgt. capt. cmdr. adm. rev. hon. pres.
    no. nos. vs. v. etc. inc. ltd. co. corp. dept. univ. est. approx. fig. ft. mt. ave. rd. blvd.
    jan. feb. mar. apr. jun. jul. aug. sep. sept. oct. nov. dec. mon. tue. tues. wed. thu. thur. thurs. fri. sat. sun.
    a.m. p.m. e.g. i.e. u.s. u.k. u.n. u.s.a. d.c. no.""".split()
)
# Candidate boundary: terminal punctuation, optional closing quotes/brackets,
# whitespace, then something that can start a sentence.
_BOUNDARY_RE = re.compile(r"([.!?])([\"'\)\]]*)(\s+)(?=[\"'\(\[]?[A-Z0-9])")
_INITIALS_RE = re.compile(r"^(?:[A-Za-z]\.)+$")
_SPAN_STRINGS = (ANCHOR, REF_OPEN, REF_CLOSE)


def _clean(text: str) -> str:
    for s in _SPAN_STRINGS:
        if s in text:
            raise ValueError(f"text contains the span token {s!r}: {text[:80]!r}")
    return " ".join(text.split())


def split_sentences(text: str) -> list[str]:
    """Regex sentence splitter: splits after . ! ? (plus closing quotes) when
    whitespace and a capital/digit/opening quote follow, except after known
    abbreviations ("Mr.", "U.S.", "p.m.") and initials ("J."). Whitespace is
    collapsed, so sentences contain no newlines."""
    text = _clean(text)
    sentences, start = [], 0
    for m in _BOUNDARY_RE.finditer(text):
        if m.group(1) == ".":
            word = text[start : m.start(1) + 1].rsplit(" ", 1)[-1].lstrip("\"'([")
            if word.lower() in ABBREVIATIONS or _INITIALS_RE.match(word):
                continue
        end = m.end(2)
        sentences.append(text[start:end])
        start = m.end(3)
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


def split_highlights(highlights: str) -> list[str]:
    """CNN/DM highlights hold one summary sentence per line; text without
    newlines falls back to the sentence splitter."""
    lines = [_clean(line) for line in highlights.split("\n")]
    lines = [line for line in lines if line]
    if len(lines) <= 1:
        return split_sentences(highlights)
    return lines


# ---------------------------------------------------------------------------
# ROUGE greedy oracle
# ---------------------------------------------------------------------------
_TOKENIZER = None


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's own tokenisation (lower-case, alphanumeric, Porter stems)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from rouge_score import tokenizers

        _TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=True)
    return _TOKENIZER.tokenize(text)


def _ngrams(tokens: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f_measure(target: collections.Counter, pred: collections.Counter) -> float:
    overlap = sum((target & pred).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(pred.values())
    recall = overlap / sum(target.values())
    return 2 * precision * recall / (precision + recall)


def rouge_f(target_tokens: Sequence[str], pred_tokens: Sequence[str]) -> float:
    """Mean of ROUGE-1 and ROUGE-2 F-measure (what rouge-score computes on the
    texts, from pre-tokenised input so the oracle does not re-stem)."""
    return 0.5 * (
        _f_measure(_ngrams(target_tokens, 1), _ngrams(pred_tokens, 1))
        + _f_measure(_ngrams(target_tokens, 2), _ngrams(pred_tokens, 2))
    )


def align(summary_sentence: str, sentences: Sequence[str], max_k: int = 3, *, _tokens=None) -> list[int]:
    """0-based indices (ascending) of the article sentences the summary
    sentence draws on: greedily add the sentence that most raises ROUGE-1/2 F
    of the (article-ordered) selection against it, while the score improves,
    up to `max_k`. Always returns at least the single best sentence, so every
    summary segment sees some of the article."""
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    if not sentences:
        raise ValueError("cannot align against an empty article")
    target = rouge_tokens(summary_sentence)
    toks = _tokens if _tokens is not None else [rouge_tokens(s) for s in sentences]
    chosen: list[int] = []
    best = -1.0
    while len(chosen) < max_k:
        scored = []
        for i in range(len(sentences)):
            if i in chosen:
                continue
            sel = sorted(chosen + [i])
            pred = [t for j in sel for t in toks[j]]
            scored.append((rouge_f(target, pred), -i, i))
        if not scored:
            break
        score, _, i = max(scored)
        if score <= best:
            break
        chosen.append(i)
        best = score
    return sorted(chosen)


# ---------------------------------------------------------------------------
# Formatting and parsing
# ---------------------------------------------------------------------------
def _sentence_piece(number: int, sentence: str) -> str:
    return f"{ANCHOR}[{number}] {sentence}\n"


def format_prompt(sentences: Sequence[str], instruction: str = INSTRUCTION) -> str:
    return f"{instruction}\n" + "".join(_sentence_piece(i, s) for i, s in enumerate(sentences, start=1))


def format_completion(summary: Sequence[str], alignments: Sequence[Sequence[int]]) -> str:
    """`alignments` hold SEGMENT numbers (= 1-based article sentence numbers)."""
    if len(summary) != len(alignments):
        raise ValueError(f"{len(summary)} summary sentences but {len(alignments)} alignments")
    return "\n".join(
        f"{ANCHOR}{REF_OPEN}{','.join(str(r) for r in refs)}{REF_CLOSE}{s}" for s, refs in zip(summary, alignments)
    )


_SENT_RE = re.compile(r"\[(\d+)\] (.*)\n$", re.S)
_SUMMARY_RE = re.compile(re.escape(REF_OPEN) + r"([\d, ]*)" + re.escape(REF_CLOSE) + r"(.*)$", re.S)


def parse_formatted(prompt: str, completion: str,
                    instruction: str = INSTRUCTION) -> tuple[list[str], list[str], list[list[int]]]:
    """Inverse of format_prompt/format_completion:
    (article sentences, summary sentences, alignments as segment numbers)."""
    head, *pieces = prompt.split(ANCHOR)
    if head != f"{instruction}\n":
        raise ValueError(f"prompt does not start with the instruction {instruction!r}: {head[:80]!r}")
    sentences = []
    for k, piece in enumerate(pieces, start=1):
        m = _SENT_RE.match(piece)
        if not m:
            raise ValueError(f"prompt segment {k} is not '[{k}] sentence\\n': {piece[:80]!r}")
        if int(m.group(1)) != k:
            raise ValueError(f"prompt segment {k} is numbered [{m.group(1)}]")
        sentences.append(m.group(2))
    head, *pieces = completion.split(ANCHOR)
    if head:
        raise ValueError(f"completion must start with {ANCHOR!r}, got {completion[:80]!r}")
    summary, alignments = [], []
    for k, piece in enumerate(pieces, start=1):
        if k < len(pieces):
            if not piece.endswith("\n"):
                raise ValueError(f"summary segment {k} does not end with a newline: {piece[:80]!r}")
            piece = piece[:-1]
        m = _SUMMARY_RE.match(piece)
        if not m:
            raise ValueError(f"summary segment {k} has no <|ref|>...<|/ref|> header: {piece[:80]!r}")
        summary.append(m.group(2))
        alignments.append([int(x) for x in re.findall(r"\d+", m.group(1))])
    return sentences, summary, alignments


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------
def prompt_piece_tokens(sentences: Sequence[str], tokenizer, instruction: str = INSTRUCTION) -> list[int]:
    """Tokens of each piece of `format_prompt(sentences, instruction)` as data.batches counts them
    (segment by segment): BOS + the instruction line, then one entry per sentence."""
    return [1 + len(encode_with_spans(tokenizer, f"{instruction}\n"))] + [
        len(encode_with_spans(tokenizer, _sentence_piece(i, s))) for i, s in enumerate(sentences, start=1)]


def truncate_sentences(sentences: Sequence[str], tokenizer, max_prompt_tokens: int) -> list[str]:
    """The longest prefix of whole sentences whose formatted prompt, with BOS,
    fits in `max_prompt_tokens` tokens of `tokenizer`. Counts are exact for
    data.batches.tokenize_record, which encodes segment by segment too."""
    head, *cost = prompt_piece_tokens(sentences, tokenizer)
    used = np.cumsum([head, *cost])[1:]
    return list(sentences[: int(np.searchsorted(used, max_prompt_tokens, side="right"))])


def make_record(
    article: str,
    highlights: str,
    *,
    tokenizer=None,
    max_prompt_tokens: int | None = None,
    max_k: int = 3,
    id: str | None = None,
) -> dict | None:
    """One span-annotated record, or None when not a single article sentence
    fits the token budget. Truncation needs `tokenizer` (token counts are the
    tokenizer's). Record: {"task", "id", "prompt", "completion", "answer"
    (summary sentences joined by newlines), "alignments" (segment numbers),
    "n_sentences" (kept), "n_dropped" (cut by the budget)}."""
    sentences = split_sentences(article)
    summary = split_highlights(highlights)
    if not sentences or not summary:
        raise ValueError(f"article {id!r} has no sentences or no highlights")
    kept = sentences
    if max_prompt_tokens is not None:
        if tokenizer is None:
            raise ValueError("max_prompt_tokens needs a tokenizer to count tokens")
        kept = truncate_sentences(sentences, tokenizer, max_prompt_tokens)
        if not kept:
            return None
    toks = [rouge_tokens(s) for s in kept]
    alignments = [[i + 1 for i in align(h, kept, max_k, _tokens=toks)] for h in summary]
    return {
        "task": "summarization",
        "id": id,
        "prompt": format_prompt(kept),
        "completion": format_completion(summary, alignments),
        "answer": "\n".join(summary),
        "alignments": alignments,
        "n_sentences": len(kept),
        "n_dropped": len(sentences) - len(kept),
    }


def make_records(articles: Iterable[dict], **kwargs) -> list[dict]:
    """make_record over loaded articles; articles that do not fit are skipped."""
    out = []
    for a in articles:
        rec = make_record(a["article"], a["highlights"], id=a.get("id"), **kwargs)
        if rec is not None:
            out.append(rec)
    return out


def load_records(
    source: str = DEFAULT_HUB,
    *,
    tokenizer=None,
    max_prompt_tokens: int | None = None,
    max_k: int = 3,
    **load_kwargs,
) -> list[dict]:
    """load_articles(source, **load_kwargs) + make_records. Articles whose
    first sentence alone exceeds `max_prompt_tokens` are skipped, so fewer
    than `n` records may come back."""
    return make_records(
        load_articles(source, **load_kwargs), tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens, max_k=max_k
    )
