"""ACLSum (Takeshita et al., NAACL 2024): ACL papers summarized by aspect, with human span labels.

The `aclsum` wheel (MIT; `pip install --no-deps aclsum`) ships the data set as
`aclsum/dataset/{train,val,test}.jsonl`: 100 / 50 / 100 papers, each as the
sentences of its abstract, introduction and conclusion, one summary sentence
per aspect (challenge, approach, outcome) and, per aspect, people's labels of
the sentences that support that summary. Those labels are this project's span
headers, written by people instead of a ROUGE oracle. The files are read
here directly (the package itself is never imported: its `__init__` needs an
I/O helper this project does not use).

One record per paper, in the summarization task's layout
(`data.summarization`):

    prompt:      Summarize the paper's challenge, approach and outcome.\\n
                 <|anchor|>[1] first sentence of the abstract\\n  ...  (abstract, introduction, conclusion)
    completion:  <|anchor|><|ref|>13,14,16<|/ref|>Challenge: ...\\n
                 <|anchor|><|ref|>2,3<|/ref|>Approach: ...\\n
                 <|anchor|><|ref|>5,41<|/ref|>Outcome: ...

Rules, each counted in the record (`label_source`, `n_dropped`, `lost_labels`):
- An aspect nobody highlighted a sentence for gets the ROUGE oracle's
  sentences (`summarization.align`) instead ("oracle: unlabelled").
- A paper longer than `max_prompt_tokens` loses sentences from the END OF
  ITS INTRODUCTION until it fits: the abstract and the conclusion (where most
  outcome labels are) stay whole, and the sentences are numbered as kept.
  Labels on a dropped sentence are dropped; an aspect left with none falls
  back to the oracle over the kept sentences ("oracle: cut").
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from selfspan_jax.data import summarization

INSTRUCTION = "Summarize the paper's challenge, approach and outcome."
ASPECTS = ("challenge", "approach", "outcome")
SECTIONS = ("abstract", "introduction", "conclusion")
# the summarization task's split names -> the wheel's file names
SPLIT_FILES = {"train": "train", "validation": "val", "test": "test"}
SOURCE = "aclsum"  # what `--data source=aclsum` names


def dataset_dir() -> Path:
    """The wheel's dataset folder, found without importing the package."""
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the ACLSum data set needs the 'aclsum' wheel: pip install --no-deps aclsum")
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset"
    if not folder.is_dir():
        raise ValueError(f"the aclsum package at {folder.parent} has no dataset/ folder")
    return folder


def _check_paper(row, where: str) -> dict:
    """The fields a record needs, each checked (ValueError naming file:line and the field)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("id", "summary", "sentences", "highlights"):
        if key not in row:
            raise ValueError(f"{where}: missing field {key!r} (has {sorted(row)})")
    for section in SECTIONS:
        sents = row["sentences"].get(section) if isinstance(row["sentences"], dict) else None
        if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
            raise ValueError(f"{where}: sentences.{section} must be a list of strings")
    for aspect in ASPECTS:
        if not isinstance(row["summary"], dict) or not isinstance(row["summary"].get(aspect), str):
            raise ValueError(f"{where}: summary.{aspect} must be a string")
        labels = row["highlights"].get(aspect) if isinstance(row["highlights"], dict) else None
        if not isinstance(labels, dict):
            raise ValueError(f"{where}: highlights.{aspect} must be an object of per-section labels")
        for section in SECTIONS:
            got = labels.get(section)
            if not isinstance(got, list) or len(got) != len(row["sentences"][section]) or \
                    any(v not in (0, 1) for v in got):
                raise ValueError(f"{where}: highlights.{aspect}.{section} must hold one 0/1 label per sentence "
                                 f"({len(row['sentences'][section])})")
    return row


def load_papers(split: str = "train", *, folder: str | Path | None = None) -> list[dict]:
    """The papers of `split` ("train", "validation" or "test") as the wheel stores them, checked."""
    if split not in SPLIT_FILES:
        raise ValueError(f"ACLSum split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    path = Path(folder or dataset_dir()) / f"{SPLIT_FILES[split]}.jsonl"
    if not path.is_file():
        raise ValueError(f"ACLSum {split} split: {path} is missing (the aclsum wheel's dataset/ holds "
                         f"{', '.join(f + '.jsonl' for f in SPLIT_FILES.values())}; reinstall it with "
                         "pip install --no-deps aclsum)")
    return summarization.read_jsonl(path, _check_paper)


def paper_sentences(paper: dict) -> tuple[list[str], list[str]]:
    """(sentences in reading order, the section of each)."""
    sents, sections = [], []
    for section in SECTIONS:
        sents += paper["sentences"][section]
        sections += [section] * len(paper["sentences"][section])
    return sents, sections


def human_labels(paper: dict, aspect: str) -> list[int]:
    """0-based indices (reading order) of the sentences people highlighted for `aspect`."""
    flat = [v for section in SECTIONS for v in paper["highlights"][aspect][section]]
    return [i for i, v in enumerate(flat) if v]


def kept_sentences(sentences: Sequence[str], sections: Sequence[str], tokenizer,
                   max_prompt_tokens: int | None) -> list[int]:
    """0-based indices of the sentences the prompt keeps: all when they fit (or no budget), else the
    introduction cut from its end until they do (numbers shift as sentences go, so this repeats
    until stable). None of the abstract or conclusion is dropped; a paper whose abstract and
    conclusion alone do not fit raises ValueError."""
    keep = list(range(len(sentences)))
    if max_prompt_tokens is None:
        return keep

    def fits(indices) -> bool:
        return sum(summarization.prompt_piece_tokens([sentences[i] for i in indices], tokenizer,
                                                     INSTRUCTION)) <= max_prompt_tokens

    dropped: list[int] = []
    while True:  # one exact count per round; a round drops what the count says is too much
        head, *cost = summarization.prompt_piece_tokens([sentences[i] for i in keep], tokenizer, INSTRUCTION)
        over = head + sum(cost) - max_prompt_tokens
        if over <= 0:
            # the count before a drop overstates what follows it by the digits it renumbers: give
            # back the last dropped sentences while the exact count allows
            while dropped and fits(sorted([*keep, dropped[-1]])):
                keep = sorted([*keep, dropped.pop()])
            return keep
        by_index = dict(zip(keep, cost))
        intro = [i for i in keep if sections[i] == "introduction"]
        if not intro:
            raise ValueError(f"abstract and conclusion alone exceed max_prompt_tokens={max_prompt_tokens}")
        while over > 0 and intro:  # (later numbers may shrink by a digit: the next round counts again)
            last = intro.pop()
            keep.remove(last)
            dropped.append(last)
            over -= by_index[last]


def make_record(paper: dict, *, tokenizer=None, max_prompt_tokens: int | None = None, max_k: int = 3) -> dict:
    """The span-annotated record of one paper (module docstring). Extra keys beside the
    summarization record's: "aspects", "label_source" (per aspect: "human", "oracle: unlabelled"
    or "oracle: cut"), "oracle" (per aspect: the oracle's segment numbers, for agreement counts),
    "human" (per aspect: people's segment numbers among the kept sentences), "lost_labels"."""
    if max_prompt_tokens is not None and tokenizer is None:
        raise ValueError("max_prompt_tokens needs a tokenizer to count tokens")
    sentences, sections = paper_sentences(paper)
    keep = kept_sentences(sentences, sections, tokenizer, max_prompt_tokens)
    kept = [sentences[i] for i in keep]
    segment = {i: k + 1 for k, i in enumerate(keep)}  # paper index -> prompt segment number
    toks = [summarization.rouge_tokens(s) for s in kept]
    summary, alignments, source, oracle, human, lost = [], [], {}, {}, {}, 0
    for aspect in ASPECTS:
        text = paper["summary"][aspect].strip()
        labels = human_labels(paper, aspect)
        visible = [segment[i] for i in labels if i in segment]
        lost += len(labels) - len(visible)
        oracle[aspect] = [i + 1 for i in summarization.align(text, kept, max_k, _tokens=toks)]
        human[aspect] = visible
        if visible:
            source[aspect], refs = "human", visible
        else:
            source[aspect], refs = ("oracle: cut" if labels else "oracle: unlabelled"), oracle[aspect]
        summary.append(f"{aspect.capitalize()}: {text}")
        alignments.append(refs)
    return {
        "task": "summarization",
        "id": paper["id"],
        "title": paper.get("title"),
        "prompt": summarization.format_prompt(kept, INSTRUCTION),
        "completion": summarization.format_completion(summary, alignments),
        "answer": "\n".join(summary),
        "aspects": list(ASPECTS),
        "alignments": alignments,
        "label_source": source,
        "oracle": oracle,
        "human": human,
        "n_sentences": len(kept),
        "n_dropped": len(sentences) - len(kept),
        "lost_labels": lost,
    }


def load_records(split: str = "train", *, limit: int | None = None, seed: int | None = None, tokenizer=None,
                 max_prompt_tokens: int | None = None, max_k: int = 3, folder: str | Path | None = None) -> list[dict]:
    """`make_record` over the papers of `split`: all of them, or at most `limit` (the first ones, or
    with `seed` a seeded random subset kept in file order), as `summarization.load_records` does."""
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    papers = summarization.chosen_rows(load_papers(split, folder=folder), limit, seed)
    return [make_record(p, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens, max_k=max_k) for p in papers]


def oracle_agreement(records: Sequence[dict]) -> dict[str, float | int]:
    """How far the ROUGE oracle (`summarization.align`) agrees with people, over every (paper, aspect)
    that kept a human label: sentence-set precision, recall and F1 of the oracle against the human
    set (micro-averaged), the share where the two sets share at least one sentence, and the share
    where they are equal."""
    tp = n_oracle = n_human = overlap = equal = pairs = 0
    for r in records:
        for aspect in r["aspects"]:
            people, oracle = set(r["human"][aspect]), set(r["oracle"][aspect])
            if not people:
                continue
            pairs += 1
            tp += len(people & oracle)
            n_oracle += len(oracle)
            n_human += len(people)
            overlap += bool(people & oracle)
            equal += people == oracle
    precision = tp / n_oracle if n_oracle else 0.0
    recall = tp / n_human if n_human else 0.0
    return {"pairs": pairs, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "any_overlap": overlap / pairs if pairs else 0.0, "same_set": equal / pairs if pairs else 0.0}


# ---------------------------------------------------------------------------
# Zero-shot prompting and per-aspect scoring
# ---------------------------------------------------------------------------
ZERO_SHOT_ASK = ("Summarize the paper above in three sentences, one per line: the challenge it addresses "
                 "(start the line with 'Challenge:'), its approach ('Approach:') and its outcome ('Outcome:').")
# "Challenge:" / "**Approach:**" / "Outcome :" where an aspect's text starts (a reply's first one counts)
_ASPECT_RE = re.compile(r"\*{0,2}\b(" + "|".join(a.capitalize() for a in ASPECTS) + r")\b\*{0,2}\s*:\*{0,2}")


def zero_shot_question(record: dict) -> str:
    """What a pretrained model never fine-tuned on the layout is asked: the paper's kept sentences as
    plain text (no anchors, no numbers), then `ZERO_SHOT_ASK`."""
    sentences, _, _ = summarization.parse_formatted(record["prompt"], record["completion"], INSTRUCTION)
    return "Paper:\n" + " ".join(sentences) + "\n\n" + ZERO_SHOT_ASK


def aspect_texts(text: str) -> dict[str, str]:
    """Each aspect's sentence in `text` (span headers already stripped): what follows its label up
    to the next label; "" for an aspect the text never labels."""
    found: dict[str, tuple[int, int]] = {}
    for m in _ASPECT_RE.finditer(text):
        found.setdefault(m.group(1).lower(), (m.start(), m.end()))
    starts = sorted(found.values())
    out = {}
    for aspect in ASPECTS:
        if aspect not in found:
            out[aspect] = ""
            continue
        start, end = found[aspect]
        following = [b for b, _ in starts if b > start]
        out[aspect] = text[end:min(following) if following else len(text)].strip()
    return out


def score_aspects(references: Sequence[str], texts: Sequence[str], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """ROUGE F1 x 100 (rouge-score, stemmed) per aspect: each reference's aspect sentence against the
    generated one (`aspect_texts` of both; an aspect the generation never labels scores 0)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    pairs = [(aspect_texts(r), aspect_texts(t)) for r, t in zip(references, texts)]
    return {aspect: {k: 100.0 * float(np.mean([scorer.score(ref[aspect], gen[aspect])[k].fmeasure
                                               for ref, gen in pairs])) for k in keys}
            for aspect in ASPECTS}
