"""Arithmetic data: generator, canonical text, exact evaluation, checker."""

import functools
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from selfspan_jax.data import arithmetic as A
from selfspan_jax.tokenizer import ANCHOR, REF_CLOSE, REF_OPEN, CharTokenizer


# ---- independent references ------------------------------------------------
def python_value(text: str) -> Fraction:
    """Python's own parser and precedence, over Fractions."""
    return eval(re.sub(r"\d+", lambda m: f"Fraction({m.group(0)})", text), {"Fraction": Fraction})


def trees(max_leaves=8, allow_negative=True):
    lo = -30 if allow_negative else 0
    leaf = st.integers(lo, 30).map(A.Num)
    return st.recursive(
        leaf,
        lambda sub: st.builds(A.BinOp, st.sampled_from("+-*/"), sub, sub),
        max_leaves=max_leaves,
    )


def lines_of(completion):
    return completion.split("\n")


# ---- parsing and evaluation ------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(trees())
def test_evaluate_matches_python_fractions_and_round_trips(tree):
    text = A.format_expr(tree)
    assert A.parse(text) == tree
    try:
        expected = python_value(text)
    except ZeroDivisionError:
        with pytest.raises(ZeroDivisionError):
            A.evaluate(text)
        return
    assert A.evaluate(text) == expected


@settings(max_examples=150, deadline=None)
@given(trees(max_leaves=7))
def test_derivation_preserves_value_one_operator_per_step(tree):
    try:
        value = python_value(A.format_expr(tree))
        steps = A.derivation(tree)
    except (ZeroDivisionError, ValueError):
        return  # inexact or zero division: not a valid problem
    ops = A.count_ops(tree)
    assert len(steps) == ops
    for k, s in enumerate(steps, start=1):
        assert python_value(s) == value
        assert A.count_ops(A.parse(s)) == ops - k
    if steps:
        assert Fraction(int(steps[-1])) == value


def test_parse_errors_name_the_problem():
    for bad, what in [("3+", "end"), ("3+*4", "'\\*'"), ("(3+4", "end|'\\)'"), ("3 x 4", "'x'"), ("-(3)", "unary"), ("", "empty")]:
        with pytest.raises(ValueError, match=what):
            A.parse(bad)


def test_negative_notation():
    assert A.format_expr(A.Num(-7)) == "-7"
    tree = A.parse("(-7)*2+3")
    assert A.format_expr(tree) == "(-7)*2+3"
    assert A.derivation("(3-10)*2") == ["(-7)*2", "-14"]


# ---- generator ----------------------------------------------------------------
def test_design_example_is_reproduced():
    rec = A.make_record("((3+4)*5-2)/3")
    assert rec["prompt"] == "Evaluate step by step." + ANCHOR + "((3+4)*5-2)/3\n"
    assert rec["completion"] == (
        f"{ANCHOR}{REF_OPEN}1{REF_CLOSE}(7*5-2)/3\n{ANCHOR}{REF_OPEN}2{REF_CLOSE}(35-2)/3\n"
        f"{ANCHOR}{REF_OPEN}3{REF_CLOSE}33/3\n{ANCHOR}{REF_OPEN}4{REF_CLOSE}11"
    )
    assert rec["answer"] == "11" and rec["n_steps"] == 4 and rec["depth"] == 2


@pytest.mark.parametrize(
    "split,n,seeds", [("train", 300, (0, 1, 2)), ("test", 100, (0, 1)), ("harder", 80, (0,)), ("longer", 40, (0,)), ("deeper", 40, (0,))]
)
def test_checker_accepts_every_generated_record(split, n, seeds):
    strict_tok = CharTokenizer(unknown="error")
    d = A.SPLITS[split]
    for seed in seeds:
        recs = A.generate_examples(n, seed=seed, split=split)
        assert len(recs) == n and len({r["expression"] for r in recs}) == n
        for r in recs:
            assert A.check_completion(r["prompt"], r["completion"], strict_order=True) == (True, "ok")
            strict_tok.encode(r["prompt"] + r["completion"])  # never hits UNK
            # difficulty knobs, checked from the text alone
            leaves = [int(x) for x in re.findall(r"\d+", r["expression"])]
            assert d.min_operands <= len(leaves) <= d.max_operands
            assert all(1 <= x <= d.max_operand for x in leaves)
            assert d.min_depth <= A.paren_depth(r["expression"]) <= d.max_depth
            lines = lines_of(r["completion"])
            assert len(lines) == r["n_steps"] == len(leaves) - 1
            for k, line in enumerate(lines, start=1):
                assert line.startswith(f"{ANCHOR}{REF_OPEN}{k}{REF_CLOSE}")
                body = line.split(REF_CLOSE, 1)[1]
                assert all(0 <= int(x) <= d.max_value for x in re.findall(r"\d+", body))
            assert Fraction(int(r["answer"])) == python_value(r["expression"])


def test_generation_is_deterministic_and_seeded():
    a = A.generate_examples(50, seed=3)
    assert a == A.generate_examples(50, seed=3)
    assert a != A.generate_examples(50, seed=4)


def test_held_out_splits_are_disjoint_from_train():
    train = {r["expression"] for s in range(3) for r in A.generate_examples(1000, seed=s)}
    for split in ("test", "harder", "longer", "deeper"):
        held = {r["expression"] for r in A.generate_examples(60, seed=0, split=split)}
        assert not held & train
        assert all(A.is_held_out(e) for e in held)
    assert not any(A.is_held_out(e) for e in train)
    # the same knobs as train, only the bucket differs
    test = {r["expression"] for r in A.generate_examples(300, seed=0, split="test")}
    assert not test & train


def test_allow_negative_records_are_valid():
    recs = A.generate_examples(200, seed=0, allow_negative=True)
    assert any("(-" in r["completion"] or r["answer"].startswith("-") for r in recs)
    for r in recs:
        assert A.check_completion(r["prompt"], r["completion"], strict_order=True) == (True, "ok")


def test_bad_knobs_raise_naming_the_value():
    with pytest.raises(ValueError, match="'nope'"):
        A.generate_examples(1, seed=0, split="nope")
    with pytest.raises(ValueError, match="max_operands"):
        A.generate_examples(1, seed=0, min_operands=5, max_operands=3)
    with pytest.raises(ValueError, match="-1"):
        A.generate_examples(-1, seed=0)
    with pytest.raises(ValueError, match="too small"):
        A.generate_examples(50, seed=0, min_operands=2, max_operands=2, max_operand=2)


# ---- checker rejections ------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _harder_records():
    return tuple(A.generate_examples(150, seed=7, split="harder"))


def _records_with_steps(k, n=20):
    recs = [r for r in _harder_records() if r["n_steps"] >= k]
    assert len(recs) >= n
    return recs[:n]


def _replace_line(completion, k, new):
    lines = lines_of(completion)
    lines[k - 1] = new
    return "\n".join(lines)


def test_rejects_wrong_step():
    for r in _records_with_steps(3):
        lines = lines_of(r["completion"])
        body = lines[0].split(REF_CLOSE, 1)[1]
        # bump the first number of step 1 (a wrong reduction or a changed operand)
        bad_body = re.sub(r"\d+", lambda m: str(int(m.group(0)) + 1), body, count=1)
        bad = _replace_line(r["completion"], 1, f"{ANCHOR}{REF_OPEN}1{REF_CLOSE}{bad_body}")
        ok, reason = A.check_completion(r["prompt"], bad)
        assert not ok and reason.startswith("wrong step"), reason


def test_rejects_skipped_reduction_as_wrong_step():
    for r in _records_with_steps(3):
        lines = lines_of(r["completion"])
        # step 1 writes what step 2 should: two reductions at once
        bad = _replace_line(r["completion"], 1, f"{ANCHOR}{REF_OPEN}1{REF_CLOSE}" + lines[1].split(REF_CLOSE, 1)[1])
        ok, reason = A.check_completion(r["prompt"], bad)
        assert not ok and reason.startswith("wrong step"), reason


def test_rejects_wrong_reference():
    for r in _records_with_steps(3):
        k = r["n_steps"] - 1
        line = lines_of(r["completion"])[k - 1]
        for wrong in (k - 1, k + 1, 0):
            bad = _replace_line(r["completion"], k, line.replace(f"{REF_OPEN}{k}{REF_CLOSE}", f"{REF_OPEN}{wrong}{REF_CLOSE}"))
            ok, reason = A.check_completion(r["prompt"], bad)
            assert not ok and reason.startswith("wrong reference") and f"[{wrong}]" in reason, reason
        bad = _replace_line(r["completion"], k, line.replace(f"{REF_OPEN}{k}{REF_CLOSE}", f"{REF_OPEN}{k},{k - 1}{REF_CLOSE}"))
        assert A.check_completion(r["prompt"], bad)[1].startswith("wrong reference")


def test_rejects_wrong_answer():
    for r in _records_with_steps(2):
        k = r["n_steps"]
        wrong = int(r["answer"]) + 1
        bad = _replace_line(r["completion"], k, f"{ANCHOR}{REF_OPEN}{k}{REF_CLOSE}{wrong}")
        ok, reason = A.check_completion(r["prompt"], bad)
        assert not ok and reason.startswith("wrong answer") and str(wrong) in reason, reason


def test_rejects_malformed_headers_and_steps():
    r = _records_with_steps(2, n=1)[0]
    line = lines_of(r["completion"])[0]
    for bad_line in (line.replace(REF_CLOSE, ""), line.replace(ANCHOR, ""), line.replace(f"{REF_OPEN}1", f"{REF_OPEN}x")):
        ok, reason = A.check_completion(r["prompt"], _replace_line(r["completion"], 1, bad_line))
        assert not ok and reason.startswith("malformed header"), reason
    body = line.split(REF_CLOSE, 1)[1]
    for bad_body, why in ((body + "+", "does not parse"), (f"({body})", "not canonical")):
        bad = _replace_line(r["completion"], 1, f"{ANCHOR}{REF_OPEN}1{REF_CLOSE}{bad_body}")
        ok, reason = A.check_completion(r["prompt"], bad)
        assert not ok and reason.startswith("malformed step") and why in reason, reason


def test_rejects_incomplete_extra_and_empty():
    r = _records_with_steps(2, n=1)[0]
    lines = lines_of(r["completion"])
    assert A.check_completion(r["prompt"], "\n".join(lines[:-1]))[1].startswith("incomplete")
    extra = r["completion"] + f"\n{ANCHOR}{REF_OPEN}{len(lines) + 1}{REF_CLOSE}{r['answer']}"
    assert A.check_completion(r["prompt"], extra)[1].startswith("extra steps")
    assert A.check_completion(r["prompt"], "")[1].startswith("empty")
    assert A.check_completion(r["prompt"], r["completion"] + "\n") == (True, "ok")
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        A.check_completion("hello", r["completion"])


def test_strict_order_only_accepts_the_canonical_reduction():
    prompt = A.format_prompt("2*3+4*5")
    other = A.format_completion(["2*3+20", "6+20", "26"])
    assert A.check_completion(prompt, other) == (True, "ok")
    ok, reason = A.check_completion(prompt, other, strict_order=True)
    assert not ok and reason.startswith("wrong step")
    assert A.check_completion(prompt, A.format_completion(A.derivation("2*3+4*5")), strict_order=True) == (True, "ok")


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_step_progress_counts_correct_steps_before_the_first_error(data):
    """A reference derivation broken at step e (wrong number, garbage, or cut off) is credited with
    exactly e-1 of its n steps; the intact one with all n, and with extra lines after the answer still n."""
    r = data.draw(st.sampled_from(_records_with_steps(2)))
    lines, n = lines_of(r["completion"]), r["n_steps"]
    assert n == len(lines)
    assert A.step_progress(r["prompt"], r["completion"]) == 1.0
    extra = r["completion"] + f"\n{ANCHOR}{REF_OPEN}{n + 1}{REF_CLOSE}{r['answer']}"
    assert A.step_progress(r["prompt"], extra) == 1.0 and not A.check_completion(r["prompt"], extra)[0]
    e = data.draw(st.integers(1, n))
    how = data.draw(st.sampled_from(["bump", "garbage", "cut"]))
    if how == "cut":
        broken = "\n".join(lines[: e - 1])
    else:
        body = lines[e - 1].split(REF_CLOSE, 1)[1]
        new = (re.sub(r"\d+", lambda m: str(int(m.group(0)) + 1), body, count=1) if how == "bump" else body + "+(")
        broken = "\n".join([*lines[: e - 1], f"{ANCHOR}{REF_OPEN}{e}{REF_CLOSE}{new}", *lines[e:]])
    assert A.step_progress(r["prompt"], broken) == pytest.approx((e - 1) / n)
