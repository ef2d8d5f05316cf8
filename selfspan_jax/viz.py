"""Pictures of self-selected spans.

`plot_span_heatmap` draws, for one sequence, which earlier positions each
generated token attends to: one row per generated token, one column per
position, coloured by visible / hidden / not yet written, with the segment
boundaries (anchors), the headers and the prompt/completion boundary marked.
The rows are `spans.attention_mask` of the final sequence, which the
generation tests prove equal to the rows the decode loop gave the kernel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

# colour index -> meaning, in the order of the legend
_FUTURE, _HIDDEN, _VISIBLE, _VISIBLE_SPAN = 0, 1, 2, 3
_COLOURS = ["#ffffff", "#e4e4e4", "#2b6cb0", "#dd6b20"]
_LABELS = ["after the token", "hidden", "visible", "visible anchor / header token"]


def _token_labels(tokens: Sequence[int], tokenizer, span_tokens) -> list[str]:
    names = {span_tokens.anchor: "A", span_tokens.ref_open: "R", span_tokens.ref_close: "/R"}
    out = []
    for t in tokens:
        if t in names:
            out.append(names[t])
        elif tokenizer is None:
            out.append(str(t))
        else:
            text = tokenizer.decode([int(t)])
            out.append({"\n": "\u23ce", " ": "\u2423", "": "\u2205"}.get(text, text.replace("\n", "\u23ce")))
    return out


def span_image(tokens: Sequence[int], prompt_length: int, *, span_tokens, max_segments: int) -> np.ndarray:
    """int [T - prompt_length, T] colour indices: row i = the attention row of token prompt_length + i."""
    import jax.numpy as jnp

    from selfspan_jax.spans import attention_mask

    tokens = np.asarray(tokens, np.int32)
    T = tokens.shape[0]
    if not 1 <= prompt_length < T:
        raise ValueError(f"prompt_length must be in [1, {T - 1}] for a sequence of {T} tokens, got {prompt_length}")
    mask = np.asarray(attention_mask(jnp.asarray(tokens), span_tokens, max_segments))[prompt_length:]
    pos = np.arange(T)
    rows = np.arange(prompt_length, T)
    is_span = np.isin(tokens, [span_tokens.anchor, span_tokens.ref_open, span_tokens.ref_close])
    header = _header_positions(tokens, span_tokens) | is_span
    img = np.where(pos[None, :] > rows[:, None], _FUTURE, _HIDDEN)
    img = np.where(mask, np.where(header[None, :], _VISIBLE_SPAN, _VISIBLE), img)
    return img


def segment_bounds(tokens: Sequence[int], span_tokens) -> list[tuple[int, int]]:
    """[(start, end)] of every segment: segment 0 runs to the first anchor, each later one starts at
    its anchor (docs/spec.md section 2). Empty leading segments are kept, so index = segment id."""
    anchors = [i for i, t in enumerate(tokens) if int(t) == span_tokens.anchor]
    bounds = [0, *anchors, len(tokens)]
    return list(zip(bounds[:-1], bounds[1:]))


def segment_image(tokens: Sequence[int], prompt_length: int, *, span_tokens,
                  max_segments: int) -> tuple[np.ndarray, list[int]]:
    """The span picture of a long sequence at segment scale: (float [Q, S], query segment ids).

    Row i is the i-th segment holding generated tokens, column j segment j;
    the value is the share of (generated query in segment i, key in segment
    j, key at or before the query) pairs the query can see, NaN where there
    are none (segment j lies after segment i). It summarises `span_image`
    exactly: the pairs it counts are that image's non-future cells.
    """
    img = span_image(tokens, prompt_length, span_tokens=span_tokens, max_segments=max_segments)
    return _segment_fractions(img, segment_bounds(tokens, span_tokens), prompt_length)


def _segment_fractions(img: np.ndarray, seg: list[tuple[int, int]],
                       prompt_length: int) -> tuple[np.ndarray, list[int]]:
    """`segment_image` of an already drawn `span_image`."""
    # generated token i sits at position prompt_length + i; group rows by the segment holding it
    rows = [k for k, (lo, hi) in enumerate(seg) if hi > prompt_length and hi > lo]
    out = np.full((len(rows), len(seg)), np.nan)
    for r, k in enumerate(rows):
        lo, hi = max(seg[k][0], prompt_length), seg[k][1]
        block = img[lo - prompt_length: hi - prompt_length]
        for j, (klo, khi) in enumerate(seg):
            cells = block[:, klo:khi]
            pairs = (cells != _FUTURE).sum()
            if pairs:
                out[r, j] = (cells >= _VISIBLE).sum() / pairs
    return out, rows


def _visible_share(img: np.ndarray) -> float:
    """Visible (query, earlier key) pairs over all of them, in a `span_image`."""
    return float((img >= _VISIBLE).sum() / (img != _FUTURE).sum())


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # long tick labels can push the axis label past the canvas
    plt.close(fig)
    return path


def _header_positions(tokens: np.ndarray, span_tokens) -> np.ndarray:
    """bool [T]: tokens from R to /R inclusive (the header text)."""
    inside, out = False, np.zeros(len(tokens), bool)
    for i, t in enumerate(tokens):
        if t == span_tokens.anchor:
            inside = False
        if t == span_tokens.ref_open:
            inside = True
        out[i] = inside
        if t == span_tokens.ref_close:
            inside = False
    return out


def plot_span_heatmap(
    tokens: Sequence[int],
    prompt_length: int,
    path: str | Path,
    *,
    span_tokens,
    max_segments: int,
    tokenizer=None,
    title: str | None = None,
    max_token_columns: int = 64,
) -> Path:
    """Writes a PNG heat map of the spans of one generated sequence; returns its path.

    tokens: the whole sequence (prompt, then generated tokens); the first
    `prompt_length` are the prompt. Axis labels show the characters when a
    tokenizer is given (anchor = A, header markers = R and /R). Sequences
    longer than `max_token_columns` are drawn per segment (`segment_image`):
    a token per column would make an image thousands of pixels wide with
    unreadable labels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    tokens = [int(t) for t in tokens]
    if len(tokens) > max_token_columns:
        return _plot_segment_heatmap(tokens, prompt_length, path, span_tokens=span_tokens,
                                     max_segments=max_segments, tokenizer=tokenizer, title=title)
    img = span_image(tokens, prompt_length, span_tokens=span_tokens, max_segments=max_segments)
    n_rows, T = img.shape
    labels = _token_labels(tokens, tokenizer, span_tokens)
    cell = 0.16
    fig, ax = plt.subplots(figsize=(max(6.0, T * cell + 1.5), max(3.0, n_rows * cell + 2.2)), dpi=110)
    ax.imshow(img, cmap=ListedColormap(_COLOURS), vmin=0, vmax=len(_COLOURS) - 1, aspect="equal",
              interpolation="nearest")
    anchors = [i for i, t in enumerate(tokens) if t == span_tokens.anchor]
    for a in anchors:  # a segment starts at its anchor
        ax.axvline(a - 0.5, color="#718096", lw=0.6)
        if a >= prompt_length:
            ax.axhline(a - prompt_length - 0.5, color="#718096", lw=0.6)
    ax.axvline(prompt_length - 0.5, color="#c53030", lw=1.6)
    # segment numbers above the columns
    bounds = [0] + anchors + [T]
    top = ax.secondary_xaxis("top")
    top.set_xticks([(lo + hi - 1) / 2 for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo])
    top.set_xticklabels([f"s{i}" for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])) if hi > lo], fontsize=7)
    fs = 6 if T <= 160 else 4
    ax.set_xticks(range(T))
    ax.set_xticklabels(labels, fontsize=fs, family="monospace")
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(labels[prompt_length:], fontsize=fs, family="monospace")
    ax.tick_params(length=0)
    ax.set_xlabel("key position (what is read); red line: end of the prompt; grey lines: anchors")
    ax.set_ylabel("generated token (query)")
    ax.set_title((title + "\n" if title else "")
                 + f"self-selected spans: {_visible_share(img):.0%} of (query, earlier key) pairs visible", fontsize=10)
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#a0aec0", label=lab) for c, lab in zip(_COLOURS, _LABELS)],
              loc="upper center", bbox_to_anchor=(0.5, -0.12 - 6.0 / max(n_rows, 1) * 0.0), ncol=4, fontsize=7,
              frameon=False)
    return _save(fig, path)


def _plot_segment_heatmap(tokens, prompt_length, path, *, span_tokens, max_segments, tokenizer, title) -> Path:
    """`plot_span_heatmap` at segment scale: one cell per (generated segment, segment), a few hundred
    pixels per axis whatever the length; rows are labelled with the segment's text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = span_image(tokens, prompt_length, span_tokens=span_tokens, max_segments=max_segments)
    seg = segment_bounds(tokens, span_tokens)
    frac, rows = _segment_fractions(img, seg, prompt_length)

    in_header = _header_positions(np.asarray(tokens), span_tokens)

    def text_of(k, width=22):
        """The segment's text without its anchor and header."""
        lo, hi = seg[k]
        ids = [t for i, t in enumerate(tokens[lo:hi], lo) if not in_header[i] and t != span_tokens.anchor]
        if tokenizer is None:
            return f"{hi - lo} tokens"
        body = tokenizer.decode(ids).replace("\n", " ").strip()
        return body if len(body) <= width else body[: width - 1] + "\u2026"

    n_rows, n_cols = frac.shape
    cell = 0.32
    fig, ax = plt.subplots(figsize=(max(4.5, n_cols * cell + 3.2), max(3.0, n_rows * cell + 2.2)), dpi=110)
    shown = np.ma.masked_invalid(frac)
    cmap = plt.get_cmap("Blues").with_extremes(bad="#ffffff")
    im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, aspect="equal", interpolation="nearest")
    for r in range(n_rows):
        for j in range(n_cols):
            if not np.isnan(frac[r, j]) and 0 < frac[r, j] < 1:
                ax.text(j, r, f"{frac[r, j]:.1f}", ha="center", va="center", fontsize=6,
                        color="white" if frac[r, j] > 0.5 else "#1a202c")
    first_generated = next((j for j, (lo, hi) in enumerate(seg) if hi > prompt_length), n_cols)
    ax.axvline(first_generated - 0.5, color="#c53030", lw=1.4)
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([f"s{j}" for j in range(n_cols)], fontsize=7)
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([f"s{k}  {text_of(k)}" for k in rows], fontsize=7, family="monospace")
    ax.tick_params(length=0)
    ax.set_xlabel("segment read; red line: first generated segment", fontsize=8)
    ax.set_ylabel("generated segment", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02).set_label("share of earlier keys visible", fontsize=7)
    ax.set_title((title + "\n" if title else "") + f"self-selected spans: {_visible_share(img):.0%} of "
                 f"(query, earlier key) pairs visible; {len(tokens)} tokens", fontsize=9)
    return _save(fig, path)
