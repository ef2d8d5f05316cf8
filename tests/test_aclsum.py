"""ACLSum records: people's span labels as headers, the truncation rule, the oracle fallback, bad files."""

from __future__ import annotations

import importlib.util
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfspan_jax import tasks
from selfspan_jax.data import aclsum, summarization
from selfspan_jax.tokenizer import ANCHOR, CharTokenizer

from conftest import draws

HAVE_ACLSUM = importlib.util.find_spec("aclsum") is not None
needs_wheel = pytest.mark.skipif(not HAVE_ACLSUM, reason="the aclsum wheel (pip install --no-deps aclsum)")


def _paper(sections: dict[str, list[str]], labels: dict[str, dict[str, list[int]]], pid="P00-0000") -> dict:
    """A paper in the wheel's layout; `labels` maps aspect -> section -> highlighted indices."""
    return {
        "id": pid, "title": "A paper",
        "summary": {a: f"The {a} of paper {pid} is {sections['abstract'][0].lower()}" for a in aclsum.ASPECTS},
        "sentences": sections,
        "highlights": {a: {s: [int(i in labels.get(a, {}).get(s, ())) for i in range(len(sections[s]))]
                           for s in aclsum.SECTIONS} for a in aclsum.ASPECTS},
    }


SECTIONS = {"abstract": ["We study bridges .", "Bridges carry loads ."],
            "introduction": ["Loads vary by day .", "Steel is strong .", "Wood is cheap .", "We test ten bridges ."],
            "conclusion": ["Steel bridges last longest ."]}


def test_record_headers_are_the_human_labels_as_segment_numbers():
    labels = {"challenge": {"introduction": [0]}, "approach": {"abstract": [1], "introduction": [3]},
              "outcome": {"conclusion": [0]}}
    rec = aclsum.make_record(_paper(SECTIONS, labels))
    sentences, summary, alignments = summarization.parse_formatted(rec["prompt"], rec["completion"],
                                                                   aclsum.INSTRUCTION)
    assert sentences == [*SECTIONS["abstract"], *SECTIONS["introduction"], *SECTIONS["conclusion"]]
    # reading order: abstract 1-2, introduction 3-6, conclusion 7
    assert alignments == [[3], [2, 6], [7]] == rec["alignments"]
    assert [s.split(":")[0] for s in summary] == ["Challenge", "Approach", "Outcome"]
    assert rec["label_source"] == dict.fromkeys(aclsum.ASPECTS, "human") and rec["lost_labels"] == 0
    assert rec["completion"].count(ANCHOR) == 3 and rec["n_dropped"] == 0


def test_an_unlabelled_aspect_takes_the_rouge_oracle_and_says_so():
    rec = aclsum.make_record(_paper(SECTIONS, {"challenge": {"introduction": [1]}}))
    assert rec["label_source"] == {"challenge": "human", "approach": "oracle: unlabelled",
                                   "outcome": "oracle: unlabelled"}
    kept = [*SECTIONS["abstract"], *SECTIONS["introduction"], *SECTIONS["conclusion"]]
    summary = _paper(SECTIONS, {})["summary"]["approach"]
    assert rec["alignments"][1] == [i + 1 for i in summarization.align(summary, kept)] == rec["oracle"]["approach"]


def _budget_fits(sentences, tokenizer, budget):
    head, *cost = summarization.prompt_piece_tokens(sentences, tokenizer, aclsum.INSTRUCTION)
    return head + sum(cost) <= budget


_WORDS = st.text("abcdefghij ", min_size=1, max_size=30).map(lambda t: t.strip() or "x")


@settings(max_examples=draws(40), deadline=None)
@given(abstract=st.lists(_WORDS, min_size=1, max_size=3), intro=st.lists(_WORDS, min_size=0, max_size=8),
       conclusion=st.lists(_WORDS, min_size=1, max_size=3), slack=st.integers(0, 400), data=st.data())
def test_truncation_cuts_the_end_of_the_introduction_only_and_as_little_as_it_can(abstract, intro, conclusion,
                                                                                   slack, data):
    """Against brute force: the kept prompt is the abstract, the LONGEST introduction prefix that fits and
    the conclusion; labels on dropped sentences are counted as lost and the rest renumbered."""
    tok = CharTokenizer()
    sections = {"abstract": abstract, "introduction": intro, "conclusion": conclusion}
    flat = [*abstract, *intro, *conclusion]
    labelled = data.draw(st.lists(st.integers(0, len(flat) - 1), max_size=4, unique=True))
    bounds = {"abstract": (0, len(abstract)), "introduction": (len(abstract), len(abstract) + len(intro)),
              "conclusion": (len(abstract) + len(intro), len(flat))}
    labels = {"challenge": {s: [i - lo for i in labelled if lo <= i < hi] for s, (lo, hi) in bounds.items()}}
    paper = _paper(sections, labels)
    floor = summarization.prompt_piece_tokens([*abstract, *conclusion], tok, aclsum.INSTRUCTION)
    budget = sum(floor) + slack
    rec = aclsum.make_record(paper, tokenizer=tok, max_prompt_tokens=budget)
    k = max(j for j in range(len(intro) + 1) if _budget_fits([*abstract, *intro[:j], *conclusion], tok, budget))
    kept = [*abstract, *intro[:k], *conclusion]
    assert summarization.parse_formatted(rec["prompt"], rec["completion"], aclsum.INSTRUCTION)[0] == kept
    assert rec["n_dropped"] == len(intro) - k
    dropped = set(range(len(abstract) + k, len(abstract) + len(intro)))
    assert rec["lost_labels"] == len(set(labelled) & dropped)
    survivors = sorted(set(labelled) - dropped)
    number = {i: n + 1 for n, i in enumerate(i for i in range(len(flat)) if i not in dropped)}
    if survivors:
        assert rec["alignments"][0] == [number[i] for i in survivors] and rec["label_source"]["challenge"] == "human"
    else:
        assert rec["label_source"]["challenge"] == ("oracle: cut" if labelled else "oracle: unlabelled")


def test_a_paper_whose_abstract_and_conclusion_alone_do_not_fit_is_refused():
    with pytest.raises(ValueError, match="abstract and conclusion alone exceed max_prompt_tokens=20"):
        aclsum.make_record(_paper(SECTIONS, {}), tokenizer=CharTokenizer(), max_prompt_tokens=20)


def test_oracle_agreement_counts_against_hand_sets():
    recs = [{"aspects": ["a", "b", "c"], "human": {"a": [1, 2], "b": [5], "c": []},
             "oracle": {"a": [2, 3], "b": [5], "c": [1]}}]
    got = aclsum.oracle_agreement(recs)  # c has no human label: not counted
    assert got["pairs"] == 2 and got["precision"] == pytest.approx(2 / 3) and got["recall"] == pytest.approx(2 / 3)
    assert got["any_overlap"] == 1.0 and got["same_set"] == 0.5


def test_a_malformed_file_names_its_line_and_field(tmp_path):
    good = _paper(SECTIONS, {"challenge": {"abstract": [0]}})
    bad = json.loads(json.dumps(good))
    bad["highlights"]["approach"]["introduction"] = [0, 1]  # 2 labels for 4 sentences
    (tmp_path / "train.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl:3: highlights.approach.introduction must hold one 0/1 label "
                                         r"per sentence \(4\)"):
        aclsum.load_papers("train", folder=tmp_path)
    (tmp_path / "val.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"val.jsonl:2: malformed JSON"):
        aclsum.load_papers("validation", folder=tmp_path)
    del good["summary"]["outcome"]
    (tmp_path / "test.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:1: summary.outcome must be a string"):
        aclsum.load_papers("test", folder=tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        aclsum.load_papers("dev", folder=tmp_path)


@needs_wheel
def test_the_real_data_set_every_paper_every_split():
    """The wheel's 100 / 50 / 100 papers all load; every header names prompt segments; people labelled
    every aspect of every paper (so no oracle fallback without truncation)."""
    for split, n in (("train", 100), ("validation", 50), ("test", 100)):
        recs = aclsum.load_records(split)
        assert len(recs) == n and len({r["id"] for r in recs}) == n
        for r in recs:
            sentences, summary, alignments = summarization.parse_formatted(r["prompt"], r["completion"],
                                                                           aclsum.INSTRUCTION)
            assert len(summary) == 3 and all(1 <= i <= len(sentences) for refs in alignments for i in refs)
            assert set(r["label_source"].values()) == {"human"}


@needs_wheel
def test_the_summarization_task_reads_aclsum_as_a_source():
    task = tasks.get("summarization")
    tok = CharTokenizer()
    train, held = task.training_records({"source": "aclsum"}, num_train=3, num_eval=2, seed=0, tokenizer=tok,
                                        seq_len=20000)
    assert len(train) == 3 and len(held) == 2
    val_ids = {p["id"] for p in aclsum.load_papers("validation")}
    assert {r["id"] for r in held} <= val_ids and not {r["id"] for r in train} & val_ids
    perfect = task.score(held, [r["completion"] for r in held])
    assert perfect.pop("per_aspect") == {a: pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
                                         for a in aclsum.ASPECTS}
    assert perfect == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    # seq_len's default prompt budget (3/4 of it) cuts the character-level prompts
    cut = task.records("test", 2, seed=0, data={"source": "aclsum"}, tokenizer=tok, seq_len=8000)
    assert all(r["n_dropped"] > 0 for r in cut)


_WORDS = st.sampled_from(["model", "data", "we", "parse", "trees", "improves", "by", "3", "points", "the", "a"])
_SENTENCE = st.lists(_WORDS, min_size=1, max_size=8).map(lambda w: " ".join(w) + " .")


@settings(max_examples=draws(200), deadline=None)
@given(st.permutations(aclsum.ASPECTS), st.lists(st.booleans(), min_size=3, max_size=3),
       st.lists(_SENTENCE, min_size=3, max_size=3), st.sampled_from(["{}:", "**{}:**", "{} :", "**{}**:"]),
       st.sampled_from(["\n", " ", "\n\n"]))
def test_aspect_texts_finds_each_labelled_sentence_in_any_order_and_style(order, present, texts, style, sep):
    """A reply that labels some aspects, in any order, bold or not: each labelled aspect's own sentence,
    "" for the others."""
    parts = [f"{style.format(a.capitalize())} {texts[i]}" for i, a in enumerate(order) if present[i]]
    got = aclsum.aspect_texts(sep.join(parts))
    want = {a: (texts[i] if present[i] else "") for i, a in enumerate(order)}
    assert got == want


def test_per_aspect_rouge_scores_each_sentence_against_its_own_reference():
    """score_aspects against rouge-score called on the hand-split sentences: a reply that writes the
    aspects in another order scores as the ordered one; an aspect it never labels scores 0."""
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL")
    ref = {"challenge": "parsing long sentences is slow .", "approach": "we prune the chart with spans .",
           "outcome": "parsing gets three times faster ."}
    gen = {"challenge": "long sentences parse slowly .", "approach": "we prune charts .",
           "outcome": "three times faster parsing ."}
    reference = "\n".join(f"{a.capitalize()}: {ref[a]}" for a in aclsum.ASPECTS)
    ordered = "\n".join(f"{a.capitalize()}: {gen[a]}" for a in aclsum.ASPECTS)
    shuffled = "\n".join(f"{a.capitalize()}: {gen[a]}" for a in reversed(aclsum.ASPECTS))
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    want = {a: {k: 100 * scorer.score(ref[a], gen[a])[k].fmeasure for k in keys} for a in aclsum.ASPECTS}
    for text in (ordered, shuffled):
        got = aclsum.score_aspects([reference], [text], keys)
        assert got.keys() == want.keys() and all(got[a] == pytest.approx(want[a]) for a in want)
    no_outcome = "\n".join(f"{a.capitalize()}: {gen[a]}" for a in aclsum.ASPECTS[:2])
    got = aclsum.score_aspects([reference, reference], [no_outcome, ordered], keys)
    assert got["outcome"] == pytest.approx({k: want["outcome"][k] / 2 for k in keys})
    assert got["challenge"] == pytest.approx(want["challenge"])


def test_the_zero_shot_question_is_the_plain_paper_and_the_request():
    rec = aclsum.make_record(_paper(SECTIONS, {"challenge": {"introduction": [0]}}))
    q = tasks.get("summarization").zero_shot_question(rec)
    plain = " ".join([*SECTIONS["abstract"], *SECTIONS["introduction"], *SECTIONS["conclusion"]])
    assert q == "Paper:\n" + plain + "\n\n" + aclsum.ZERO_SHOT_ASK
    assert ANCHOR not in q and "[1]" not in q
    news = {"prompt": "x", "completion": "y"}
    with pytest.raises(ValueError, match="ACLSum papers"):
        tasks.get("summarization").zero_shot_question(news)
