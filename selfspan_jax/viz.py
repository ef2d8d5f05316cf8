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
) -> Path:
    """Writes a PNG heat map of the spans of one generated sequence; returns its path.

    tokens: the whole sequence (prompt, then generated tokens); the first
    `prompt_length` are the prompt. Axis labels show the characters when a
    tokenizer is given (anchor = A, header markers = R and /R).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    tokens = [int(t) for t in tokens]
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
    frac = (img == _VISIBLE).sum() + (img == _VISIBLE_SPAN).sum()
    causal = (img != _FUTURE).sum()
    ax.set_title((title + "\n" if title else "") + f"self-selected spans: {frac / causal:.0%} of (query, earlier key) pairs visible",
                 fontsize=10)
    ax.legend(handles=[Patch(facecolor=c, edgecolor="#a0aec0", label=lab) for c, lab in zip(_COLOURS, _LABELS)],
              loc="upper center", bbox_to_anchor=(0.5, -0.12 - 6.0 / max(n_rows, 1) * 0.0), ncol=4, fontsize=7,
              frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
