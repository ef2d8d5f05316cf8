"""Step-by-step arithmetic with span annotations (docs/spec.md §2).

A problem is a nested integer expression over + - * /. Its derivation
rewrites the expression one reduction at a time: every step replaces exactly
one operator whose two operands are already numbers by its value, choosing the
leftmost such operator in the text (precedence and parentheses decide which
operators have two number operands, so this is "innermost-leftmost by
precedence"). Each step is its own segment and references only the previous
one, which is all it needs:

    prompt:      Evaluate step by step.<|anchor|>((3+4)*5-2)/3\\n
    completion:  <|anchor|><|ref|>1<|/ref|>(7*5-2)/3\\n
                 <|anchor|><|ref|>2<|/ref|>(35-2)/3\\n
                 <|anchor|><|ref|>3<|/ref|>33/3\\n
                 <|anchor|><|ref|>4<|/ref|>11

Segment 1 is the problem line; step k lives in segment k+1 and references
segment k. The final line is the answer alone; EOS is added at tokenisation.

Text conventions (the canonical form; `format_expr(parse(s)) == s` for every
expression the generator writes, and the checker demands it of a model):
- minimal parentheses: a left operand is wrapped only if its operator binds
  looser than its parent's, a right operand if it binds looser or equally
  (so `a-(b-c)` and `a+(b+c)` keep their parentheses: the tree is the text);
- negative numbers are written `(-7)` inside an expression and `-7` when the
  whole expression is that number. The default splits never produce negative
  intermediate values (`allow_negative=False`); the notation exists for the
  `allow_negative=True` knob and for parsing model output;
- division only where exact: every intermediate value is an integer.

Held-out splits: an expression belongs to the held-out bucket iff a stable
hash of its text is 0 mod 10. "train" only emits expressions outside the
bucket, every other split only inside it, so held-out problems never occur in
training data whatever the difficulty knobs.

Why one file of ~490 lines: the generator, the step-by-step reducer and the
checker share one expression grammar (parse / format / evaluate) and must agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from fractions import Fraction
from typing import Union

from selfspan_jax.tokenizer import ANCHOR, REF_CLOSE, REF_OPEN

INSTRUCTION = "Evaluate step by step."
OPS = "+-*/"
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


# ---------------------------------------------------------------------------
# Expression trees
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Num:
    value: int


@dataclasses.dataclass(frozen=True)
class BinOp:
    op: str
    left: "Expr"
    right: "Expr"


Expr = Union[Num, BinOp]


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise ZeroDivisionError("division by zero")
    return a / b


def evaluate(expr: Expr | str) -> Fraction:
    """Exact value of an expression (a tree or its text), as a Fraction."""
    if isinstance(expr, str):
        expr = parse(expr)
    if isinstance(expr, Num):
        return Fraction(expr.value)
    return _apply(expr.op, evaluate(expr.left), evaluate(expr.right))


def count_ops(expr: Expr) -> int:
    return 0 if isinstance(expr, Num) else 1 + count_ops(expr.left) + count_ops(expr.right)


def format_expr(expr: Expr, _top: bool = True) -> str:
    """Canonical text of a tree (minimal parentheses; see module docstring)."""
    if isinstance(expr, Num):
        if expr.value < 0:
            return f"-{-expr.value}" if _top else f"(-{-expr.value})"
        return str(expr.value)
    p = _PREC[expr.op]
    left = format_expr(expr.left, False)
    if isinstance(expr.left, BinOp) and _PREC[expr.left.op] < p:
        left = f"({left})"
    right = format_expr(expr.right, False)
    if isinstance(expr.right, BinOp) and _PREC[expr.right.op] <= p:
        right = f"({right})"
    return f"{left}{expr.op}{right}"


_TOKEN_RE = re.compile(r"\s*(\d+|[-+*/()])")


def _lex(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            pos += len(text[pos:]) - len(text[pos:].lstrip())
            raise ValueError(f"unexpected character {text[pos]!r} at offset {pos} in expression {text!r}")
        tokens.append(m.group(1))
        pos = m.end()
    return tokens


def parse(text: str) -> Expr:
    """Expression text -> tree. Accepts any parenthesisation (and `-n` as a
    negative literal); raises ValueError naming the problem on bad input."""
    if not isinstance(text, str):
        raise ValueError(f"parse expects a str, got {type(text).__name__}")
    tokens = _lex(text)
    if not tokens:
        raise ValueError(f"empty expression {text!r}")
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take():
        nonlocal pos
        tok = peek()
        if tok is None:
            raise ValueError(f"unexpected end of expression {text!r}")
        pos += 1
        return tok

    def factor() -> Expr:
        tok = take()
        if tok.isdigit():
            return Num(int(tok))
        if tok == "-":
            nxt = take()
            if not nxt.isdigit():
                raise ValueError(f"unary minus must precede a number in {text!r}, got {nxt!r}")
            return Num(-int(nxt))
        if tok == "(":
            inner = expr()
            if take() != ")":
                raise ValueError(f"missing ')' in {text!r}")
            return inner
        raise ValueError(f"unexpected token {tok!r} in {text!r}")

    def term() -> Expr:
        node = factor()
        while peek() in ("*", "/"):
            op = take()
            node = BinOp(op, node, factor())
        return node

    def expr() -> Expr:
        node = term()
        while peek() in ("+", "-"):
            op = take()
            node = BinOp(op, node, term())
        return node

    tree = expr()
    if pos != len(tokens):
        raise ValueError(f"unexpected token {tokens[pos]!r} at position {pos} in {text!r}")
    return tree


def paren_depth(text: str) -> int:
    depth = best = 0
    for ch in text:
        if ch == "(":
            depth += 1
            best = max(best, depth)
        elif ch == ")":
            depth -= 1
    return best


# ---------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------
def _reducible_paths(expr: Expr, path: tuple = ()) -> list[tuple]:
    """Paths ('l'/'r' steps) of operators whose operands are both numbers, left to right."""
    if isinstance(expr, Num):
        return []
    if isinstance(expr.left, Num) and isinstance(expr.right, Num):
        return [path]
    return _reducible_paths(expr.left, path + ("l",)) + _reducible_paths(expr.right, path + ("r",))


def _get(expr: Expr, path: tuple) -> Expr:
    for step in path:
        expr = expr.left if step == "l" else expr.right
    return expr


def _replace(expr: Expr, path: tuple, new: Expr) -> Expr:
    if not path:
        return new
    if path[0] == "l":
        return BinOp(expr.op, _replace(expr.left, path[1:], new), expr.right)
    return BinOp(expr.op, expr.left, _replace(expr.right, path[1:], new))


def _reduce_at(expr: Expr, path: tuple) -> Expr:
    node = _get(expr, path)
    value = _apply(node.op, Fraction(node.left.value), Fraction(node.right.value))
    if value.denominator != 1:
        raise ValueError(f"inexact division {format_expr(node)} = {value}")
    return _replace(expr, path, Num(int(value)))


def reduce_step(expr: Expr) -> Expr:
    """One canonical reduction: the leftmost operator with two number operands."""
    paths = _reducible_paths(expr)
    if not paths:
        raise ValueError("nothing to reduce: the expression is a number")
    return _reduce_at(expr, paths[0])


def derivation(expr: Expr | str) -> list[str]:
    """Texts of every step after the problem, ending with the answer."""
    if isinstance(expr, str):
        expr = parse(expr)
    steps = []
    while isinstance(expr, BinOp):
        expr = reduce_step(expr)
        steps.append(format_expr(expr))
    return steps


def format_prompt(expression: str) -> str:
    return f"{INSTRUCTION}{ANCHOR}{expression}\n"


def format_completion(steps: list[str]) -> str:
    # step k (1-based) is segment k+1 and references segment k
    return "\n".join(f"{ANCHOR}{REF_OPEN}{k}{REF_CLOSE}{s}" for k, s in enumerate(steps, start=1))


# ---------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Difficulty:
    """Knobs of the generator. Operand counts and depths are inclusive ranges.

    max_depth/min_depth: parenthesis nesting of the canonical problem text.
    max_operand: operands are drawn from 1..max_operand (no zero operands:
    they make degenerate problems such as 0/8/15).
    max_value: bound on |every intermediate value| (keeps numbers short for
    a character model).
    """

    min_operands: int = 3
    max_operands: int = 4
    max_operand: int = 19
    min_depth: int = 0
    max_depth: int = 2
    max_value: int = 999
    allow_negative: bool = False

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(
                f"need 2 <= min_operands <= max_operands, got {self.min_operands}, {self.max_operands}"
            )
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not 0 <= self.min_depth <= self.max_depth:
            raise ValueError(f"need 0 <= min_depth <= max_depth, got {self.min_depth}, {self.max_depth}")
        if self.max_value < self.max_operand:
            raise ValueError(f"max_value ({self.max_value}) must be >= max_operand ({self.max_operand})")


# The training split is sized for a 4-layer character model on CPU; held-out
# splits go longer and deeper. "test" is the training distribution, held out.
SPLITS: dict[str, Difficulty] = {
    "train": Difficulty(),
    "test": Difficulty(),
    "harder": Difficulty(min_operands=5, max_operands=6, max_depth=3),
    "longer": Difficulty(min_operands=7, max_operands=8, max_depth=2),
    "deeper": Difficulty(min_operands=5, max_operands=6, min_depth=3, max_depth=4),
}
HELD_OUT_BUCKETS = 10


def is_held_out(expression: str) -> bool:
    """Stable (process-independent) hash bucket of the problem text."""
    digest = hashlib.blake2b(expression.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_BUCKETS == 0


class _Retry(Exception):
    pass


def _random_tree(rng: random.Random, n: int, d: Difficulty, ops: str = OPS) -> tuple[Expr, int]:
    """A random tree with n leaves whose every intermediate value is a valid
    integer; its root operator is drawn from `ops`. Constraints are enforced
    locally (redrawing a subtree) so that exact division is not vanishingly
    rare."""
    if n == 1:
        v = rng.randint(1, d.max_operand)
        return Num(v), v
    # Deep parenthesis nesting needs chain-shaped trees whose big child is
    # parenthesised: uniform splits reach depth >= 3 in ~3% of draws.
    chain = d.min_depth >= 2 and n > 2 and rng.random() < 0.8
    for _ in range(30):
        op = rng.choice(ops)
        if chain:
            big_left = op in "*/" and rng.random() < 0.5
            k = n - 1 if big_left else 1
            # a left child is wrapped iff it binds looser, a right one iff looser or equal
            left_ops = "+-" if big_left else OPS
            right_ops = OPS if big_left or op in "*/" else "+-"
        else:
            k = rng.randint(1, n - 1)
            left_ops = right_ops = OPS
        right, rv = _random_tree(rng, n - k, d, right_ops)
        if op == "/" and rv == 0:
            continue
        for _ in range(30):
            left, lv = _random_tree(rng, k, d, left_ops)
            if op == "/" and lv % rv:
                continue
            if op == "-" and lv < rv and not d.allow_negative:
                continue
            value = int(_apply(op, Fraction(lv), Fraction(rv)))
            if abs(value) > d.max_value:
                continue
            return BinOp(op, left, right), value
    raise _Retry


def random_expression(rng: random.Random, d: Difficulty) -> Expr:
    """One tree drawn from the difficulty's distribution (depth by rejection)."""
    for _ in range(10_000):
        n = rng.randint(d.min_operands, d.max_operands)
        try:
            tree, _ = _random_tree(rng, n, d)
        except _Retry:
            continue
        depth = paren_depth(format_expr(tree))
        if d.min_depth <= depth <= d.max_depth:
            return tree
    raise ValueError(f"could not draw an expression satisfying {d}; loosen the difficulty knobs")


def make_record(expression: str | Expr, split: str = "custom") -> dict:
    tree = parse(expression) if isinstance(expression, str) else expression
    text = format_expr(tree)
    steps = derivation(tree)
    if not steps:
        raise ValueError(f"expression {text!r} has no operator to reduce")
    return {
        "task": "arithmetic",
        "split": split,
        "prompt": format_prompt(text),
        "completion": format_completion(steps),
        "answer": steps[-1],
        "expression": text,
        "n_steps": len(steps),
        "n_operands": count_ops(tree) + 1,
        "depth": paren_depth(text),
    }


def generate_examples(n: int, *, seed: int, split: str = "train", unique: bool = True, **difficulty) -> list[dict]:
    """`n` records of `split` ("train", "test", "harder", "longer", "deeper"),
    with any Difficulty field overridden by keyword. Deterministic in `seed`.

    Records: {"task", "split", "prompt", "completion", "answer",
    "expression", "n_steps", "n_operands", "depth"}.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLITS)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    d = dataclasses.replace(SPLITS[split], **difficulty)
    want_held_out = split != "train"
    # string seeds hash deterministically in random.Random (unlike tuples)
    rng = random.Random(f"arithmetic/{split}/{seed}")
    records, seen = [], set()
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise ValueError(
                f"only {len(records)} of {n} distinct {split!r} expressions found under {d}; "
                "the space is too small (raise max_operand or the operand counts)"
            )
        text = format_expr(random_expression(rng, d))
        if is_held_out(text) != want_held_out or (unique and text in seen):
            continue
        seen.add(text)
        records.append(make_record(text, split))
    return records


# ---------------------------------------------------------------------------
# Checking a model's derivation
# ---------------------------------------------------------------------------
_PROMPT_RE = re.compile(re.escape(INSTRUCTION) + re.escape(ANCHOR) + r"(.+)\n?$", re.S)
_STEP_RE = re.compile(re.escape(ANCHOR) + re.escape(REF_OPEN) + r"(.*?)" + re.escape(REF_CLOSE) + r"(.*)$", re.S)
_REFS_RE = re.compile(r"^\s*\d+(\s*[, ]\s*\d+)*\s*$")


def problem_of(prompt: str) -> str:
    m = _PROMPT_RE.match(prompt)
    if not m:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    return m.group(1).strip()


def check_completion(prompt: str, completion: str, *, strict_order: bool = False) -> tuple[bool, str]:
    """Is `completion` a valid derivation of the problem in `prompt`? (ok, reason) of `check_steps`."""
    ok, reason, _ = check_steps(prompt, completion, strict_order=strict_order)
    return ok, reason


def step_progress(prompt: str, completion: str) -> float:
    """Partial credit: the fraction of the derivation's steps (one per operator of the problem) that
    `completion` gets right before its first error (1.0 for a valid derivation; a valid one followed
    by extra lines still scores 1.0, though exact match fails it). Long derivations fail exact match
    on any one slip; this says how far a decode got."""
    return score_derivation(prompt, completion)[1]


def score_derivation(prompt: str, completion: str) -> tuple[bool, float]:
    """(valid, step_progress) of `completion` from one `check_steps` pass."""
    ok, _, valid = check_steps(prompt, completion)
    needed = count_ops(parse(problem_of(prompt)))
    return ok, 1.0 if ok or needed == 0 else min(valid, needed) / needed


def check_steps(prompt: str, completion: str, *, strict_order: bool = False) -> tuple[bool, str, int]:
    """Is `completion` a valid derivation of the problem in `prompt`, and how many of its steps are
    correct before the first error?

    Valid: every line is `<|anchor|><|ref|>k<|/ref|>EXPR`, step k references
    exactly segment k (the previous step), every EXPR is in canonical form
    and is exactly one correct reduction of the previous expression (the
    canonical leftmost one if `strict_order`), and the last line is the right
    number. Returns (ok, reason); reasons start with one of "malformed header",
    "wrong reference", "malformed step", "wrong step", "wrong answer",
    "incomplete", "extra steps", "empty". Returns (ok, reason, the number of
    leading steps that are correct reductions).
    """
    problem = problem_of(prompt)
    expected = evaluate(problem)
    prev = parse(problem)
    text = completion.rstrip("\n")
    if not text.strip():
        return False, "empty: no steps", 0
    lines = text.split("\n")
    for k, line in enumerate(lines, start=1):
        if isinstance(prev, Num):
            return False, f"extra steps: step {k} follows the answer {format_expr(prev)}", k - 1
        m = _STEP_RE.match(line)
        if not m:
            return False, f"malformed header: step {k} {line!r} does not start with anchor, ref ... /ref", k - 1
        header, body = m.group(1), m.group(2)
        if not _REFS_RE.match(header):
            return False, f"malformed header: step {k} header {header!r} is not a list of segment ids", k - 1
        refs = [int(r) for r in re.findall(r"\d+", header)]
        if refs != [k]:
            return False, f"wrong reference: step {k} references {refs}, expected [{k}]", k - 1
        try:
            cur = parse(body)
        except ValueError as e:
            return False, f"malformed step: step {k} {body!r} does not parse ({e})", k - 1
        if format_expr(cur) != body:
            return False, f"malformed step: step {k} {body!r} is not canonical (expected {format_expr(cur)!r})", k - 1
        paths = _reducible_paths(prev)
        if strict_order:
            paths = paths[:1]
        candidates = []
        for p in paths:
            try:
                candidates.append(_reduce_at(prev, p))
            except (ValueError, ZeroDivisionError):
                continue
        if cur not in candidates:
            if isinstance(cur, Num) and count_ops(prev) == 1:
                want = format_expr(candidates[0]) if candidates else "?"
                return False, f"wrong answer: step {k} gives {body}, expected {want}", k - 1
            return False, (
                f"wrong step: step {k} {body!r} is not one {'canonical ' if strict_order else ''}"
                f"reduction of {format_expr(prev)!r}"
            ), k - 1
        prev = cur
    if not isinstance(prev, Num):
        return False, f"incomplete: derivation stops at {format_expr(prev)!r}", len(lines)
    if Fraction(prev.value) != expected:
        # unreachable when every step is a correct reduction; kept as a guard
        return False, f"wrong answer: {prev.value}, expected {expected}", len(lines)
    return True, "ok", len(lines)


# ---------------------------------------------------------------------------
# A pretrained model's zero-shot answer (no span format)
# ---------------------------------------------------------------------------
def zero_shot_question(expression: str) -> str:
    """The instruction a pretrained chat model gets for one problem (no span tokens: it never saw
    them). It asks for the same step-by-step reduction the fine-tuned models write."""
    return (f"Evaluate {expression} step by step: rewrite the expression once per line, computing one "
            "operation each time, until only the final integer is left on the last line.")


_INT_RE = re.compile(r"-?\d+")


def final_answer(text: str) -> int | None:
    """The last integer written in `text` (a free-form reply's answer), or None when there is none."""
    found = _INT_RE.findall(text)
    return int(found[-1]) if found else None
