"""Summarization data: loading, sentence splitting, ROUGE oracle, formatting."""

import json
import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from selfspan_jax.data import summarization as S
from selfspan_jax.tokenizer import ANCHOR, REF_CLOSE, REF_OPEN, CharTokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "news_sample.jsonl")
TOK = CharTokenizer()


@pytest.fixture(scope="module")
def articles():
    return S.load_articles(FIXTURE)


@pytest.fixture(scope="module")
def records(articles):
    return S.make_records(articles)


# ---- loading -----------------------------------------------------------------
def test_fixture_loads_whole(articles):
    with open(FIXTURE) as f:
        raw = [json.loads(line) for line in f]
    assert [a["article"] for a in articles] == [r["article"] for r in raw]
    assert [a["id"] for a in articles] == [r["id"] for r in raw]
    subset = S.load_articles(FIXTURE, limit=4, seed=1)
    assert len(subset) == 4 and subset == S.load_articles(FIXTURE, limit=4, seed=1)
    assert [a["id"] for a in subset] == [r["id"] for r in raw if r["id"] in {a["id"] for a in subset}]
    assert S.load_articles(FIXTURE, limit=3) == articles[:3]


def test_malformed_jsonl_reports_file_and_line(tmp_path):
    good = json.dumps({"article": "A b.", "highlights": "A."})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([good, "", good, '{"article": "x", '])+ "\n")
    with pytest.raises(ValueError, match=f"{path}:4: malformed JSON"):
        S.load_articles(str(path))
    path.write_text("\n".join([good, json.dumps({"article": "x"})]))
    with pytest.raises(ValueError, match=f"{path}:2: missing field 'highlights'"):
        S.load_articles(str(path))
    path.write_text(json.dumps({"article": 3, "highlights": "x"}))
    with pytest.raises(ValueError, match=f"{path}:1: field 'article' must be a string"):
        S.load_articles(str(path))
    with pytest.raises(ValueError, match="does not exist"):
        S.load_articles(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="'dev'"):
        S.load_articles(FIXTURE, split="dev")


def test_parquet_and_split_directories(tmp_path, articles):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(articles[:6]), tmp_path / "train.parquet")
    with open(tmp_path / "validation.jsonl", "w") as f:
        for a in articles[6:]:
            f.write(json.dumps(a) + "\n")
    assert S.load_articles(str(tmp_path), split="train") == articles[:6]
    assert S.load_articles(str(tmp_path), split="validation") == articles[6:]
    pq.write_table(pa.Table.from_pylist([{"article": "x"}]), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet: no column 'highlights'"):
        S.load_articles(str(tmp_path / "bad.parquet"))


# ---- sentences ------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,expected",
    [
        ("Mr. Smith went to Washington. He met Dr. Jones at 3 p.m. on Friday. It rained!",
         ["Mr. Smith went to Washington.", "He met Dr. Jones at 3 p.m. on Friday.", "It rained!"]),
        ('He said "Go home." Then he left.  Rates rose to 4.5% in Jan. 2020.',
         ['He said "Go home."', "Then he left.", "Rates rose to 4.5% in Jan. 2020."]),
        ("J. K. Rowling wrote it.\n\nWhy? Nobody (not even the U.S. team) knows.",
         ["J. K. Rowling wrote it.", "Why?", "Nobody (not even the U.S. team) knows."]),
        ("no final stop", ["no final stop"]),
    ],
)
def test_split_sentences(text, expected):
    assert S.split_sentences(text) == expected


def test_span_strings_in_article_are_refused():
    with pytest.raises(ValueError, match="span token"):
        S.split_sentences(f"Text with {ANCHOR} inside.")


# ---- ROUGE oracle -------------------------------------------------------------
WORDS = "the a bridge river storm city council vote free lunch dog home vet power bank rate lava town".split()


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def test_rouge_f_matches_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"], use_stemmer=True)
    rng = random.Random(0)
    for _ in range(100):
        a, b = _sentence(rng, rng.randint(1, 12)), _sentence(rng, rng.randint(1, 12))
        ref = scorer.score(a, b)
        expected = 0.5 * (ref["rouge1"].fmeasure + ref["rouge2"].fmeasure)
        assert S.rouge_f(S.rouge_tokens(a), S.rouge_tokens(b)) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_alignment_picks_the_copied_sentence(seed):
    rng = random.Random(seed)
    sentences = [_sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(2, 9))]
    i = rng.randrange(len(sentences))
    if any(S.rouge_tokens(s) == S.rouge_tokens(sentences[i]) for j, s in enumerate(sentences) if j != i):
        return  # a duplicate sentence: either copy is right
    assert S.align(sentences[i], sentences, max_k=3) == [i]


def test_alignment_combines_two_sources():
    sentences = [
        "The storm cut power to twenty thousand homes on Thursday.",
        "Trains between the cities were cancelled.",
        "Crews restored power to most homes by Friday afternoon.",
    ]
    summary = "The storm cut power to twenty thousand homes and crews restored power by Friday afternoon."
    assert S.align(summary, sentences, max_k=3) == [0, 2]
    assert S.align(summary, sentences, max_k=1) in ([0], [2])
    with pytest.raises(ValueError, match="max_k"):
        S.align(summary, sentences, max_k=0)


# ---- formatting ------------------------------------------------------------------
def test_records_round_trip_on_fixture(articles, records):
    assert len(records) == len(articles)
    for a, r in zip(articles, records):
        sentences, summary, alignments = S.parse_formatted(r["prompt"], r["completion"])
        assert sentences == S.split_sentences(a["article"])
        assert summary == [line.strip() for line in a["highlights"].split("\n")]
        assert alignments == r["alignments"] and r["answer"] == "\n".join(summary)
        assert S.format_prompt(sentences) == r["prompt"]
        assert S.format_completion(summary, alignments) == r["completion"]
        # the visible number after the k-th anchor is k, the segment number
        pieces = r["prompt"].split(ANCHOR)
        assert all(p.startswith(f"[{k}] ") for k, p in enumerate(pieces[1:], start=1))
        # references are earlier segments, i.e. article sentences
        assert all(1 <= ref <= len(sentences) for refs in alignments for ref in refs)
        assert all(len(refs) >= 1 and refs == sorted(set(refs)) for refs in alignments)
        assert r["completion"].count(ANCHOR) == len(summary) and not r["completion"].endswith("\n")
        TOK.encode(r["prompt"] + r["completion"])


def test_summary_copied_from_article_references_its_sentence(articles, records):
    # fixture highlight 1 of "lost-dog" repeats article sentence 1 with one word changed
    r = next(r for r in records if r["id"] == "lost-dog")
    assert r["alignments"][0] == [1]
    assert r["completion"].startswith(f"{ANCHOR}{REF_OPEN}1{REF_CLOSE}A terrier missing")


def test_parse_rejects_bad_numbering(records):
    r = records[0]
    with pytest.raises(ValueError, match=r"numbered \[3\]"):
        S.parse_formatted(r["prompt"].replace("[2] ", "[3] ", 1), r["completion"])
    with pytest.raises(ValueError, match="instruction"):
        S.parse_formatted("Hi\n" + r["prompt"], r["completion"])
    with pytest.raises(ValueError, match="header"):
        S.parse_formatted(r["prompt"], r["completion"].replace(REF_CLOSE, "", 1))


# ---- truncation ---------------------------------------------------------------
def test_truncation_keeps_whole_sentences(articles):
    for a in articles[:5]:
        sentences = S.split_sentences(a["article"])
        for budget in range(40, 700, 37):
            r = S.make_record(a["article"], a["highlights"], tokenizer=TOK, max_prompt_tokens=budget)
            if r is None:
                first = TOK.encode(S.format_prompt(sentences[:1]))
                assert len(first) > budget
                continue
            kept, _, alignments = S.parse_formatted(r["prompt"], r["completion"])
            assert kept == sentences[: len(kept)] and r["n_dropped"] == len(sentences) - len(kept)
            assert len(TOK.encode(r["prompt"])) <= budget  # BOS included
            if len(kept) < len(sentences):
                assert len(TOK.encode(S.format_prompt(sentences[: len(kept) + 1]))) > budget
            assert all(1 <= ref <= len(kept) for refs in alignments for ref in refs)
    with pytest.raises(ValueError, match="tokenizer"):
        S.make_record("A b.", "A.", max_prompt_tokens=10)
