"""`GenerateOutput`: what `generate` returns, as numpy, and the aggregates over its decode steps."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from selfspan_jax.tokenizer import decode_with_spans


@dataclasses.dataclass
class GenerateOutput:
    """Result of `generate`; all arrays are numpy, batch-major.

    tokens: int32 [B, M]: generated ids (EOS included when emitted), `pad`
        after each sequence's end; `num_tokens[b]` of them are real.
    num_tokens: int32 [B].
    prompt_lengths: int32 [B].
    texts: decoded generations (EOS and padding dropped; `decode_with_spans`,
        so a SentencePiece tokenizer's text after span tokens reads as in the
        records) when a tokenizer was given, else None.
    logprobs: f32 [B, M] log-probability of each generated token under the
        model (raw logits) with `Outputs(logprobs=True)`, else None.
    stats: per-step measurements (only `step_valid` with `Outputs(stats=False)`),
        [B, M] each, indexed like `tokens`; entry m describes the decode step
        that produced tokens[:, m] (m >= 1; m = 0 comes from prefill and is
        not a decode step, see `step_valid`):
        attended_fraction (visible keys / keys at or before the query),
        block_fraction (KV blocks read / blocks a dense read touches),
        visible, causal, blocks_read, dense_blocks, fallback (policy had
        switched the sequence to dense), rebuilt (tokens re-admitted, ADORE), step_valid;
        with `Outputs(recall=True)` also attention_recall [B, M, L] (one value per layer).
    masks: bool [B, M, S] visibility rows used for each decode step (only
        with `Outputs(masks=True)`).
    policy: the policy's name.
    policy_report: per-sequence counters from the policy's final state
        ({name: [B]}; for self_span: segments, fallback_dense,
        unclosed_headers, ignored_refs, stray_markers).
    timing: with `Outputs(timing=True)`, wall seconds of prefill and of the decode loop
        and the loop's iterations ({prefill_s, decode_s, decode_steps}); summed
        over the parts by `concatenate`.
    """

    tokens: np.ndarray
    num_tokens: np.ndarray
    prompt_lengths: np.ndarray
    texts: list[str] | None
    logprobs: np.ndarray | None
    stats: dict[str, np.ndarray]
    masks: np.ndarray | None
    policy: str
    policy_report: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    timing: dict[str, float] | None = None

    @classmethod
    def concatenate(cls, outputs: Sequence["GenerateOutput"]) -> "GenerateOutput":
        """One output for several batches of the same call (same policy and token budget), batch-major
        in the given order; `summary()` of the result aggregates over all of them. Mask rows of
        different cache lengths are padded with False (not visible)."""
        outputs = list(outputs)
        if not outputs:
            raise ValueError("nothing to concatenate")
        if len({o.policy for o in outputs}) > 1 or len({o.tokens.shape[1] for o in outputs}) > 1:
            raise ValueError("outputs of different policies or token budgets cannot be concatenated: "
                             f"{[(o.policy, o.tokens.shape[1]) for o in outputs]}")
        if len(outputs) == 1:
            return outputs[0]
        cat = lambda name: np.concatenate([getattr(o, name) for o in outputs])  # noqa: E731
        masks = None
        if all(o.masks is not None for o in outputs):
            S = max(o.masks.shape[-1] for o in outputs)
            masks = np.concatenate([np.pad(o.masks, ((0, 0), (0, 0), (0, S - o.masks.shape[-1])))
                                    for o in outputs])
        return cls(
            tokens=cat("tokens"),
            num_tokens=cat("num_tokens"),
            prompt_lengths=cat("prompt_lengths"),
            texts=None if any(o.texts is None for o in outputs) else [t for o in outputs for t in o.texts],
            logprobs=None if any(o.logprobs is None for o in outputs) else cat("logprobs"),
            stats={k: np.concatenate([o.stats[k] for o in outputs]) for k in outputs[0].stats},
            masks=masks,
            policy=outputs[0].policy,
            policy_report={k: np.concatenate([o.policy_report[k] for o in outputs])
                           for k in outputs[0].policy_report},
            timing=None if any(o.timing is None for o in outputs) else
            {k: sum(o.timing[k] for o in outputs) for k in outputs[0].timing},
        )

    @classmethod
    def from_loop(cls, st, report, pol, lengths, max_new_tokens: int, eos: int, tokenizer,
                   timing: dict | None = None) -> "GenerateOutput":
        """The decode loop's final state (`decode_loop.LoopState`) as numpy, trimmed to the budget (the
        host transfer is the sync point for anyone timing `generate`)."""
        n = max_new_tokens
        out = np.asarray(st.out)[:, :n]
        num = np.asarray(st.num_tokens)
        m = np.arange(n)
        step_valid = (m[None, :] >= 1) & (m[None, :] < num[:, None])
        stats = {"step_valid": step_valid}
        if st.visible is not None:
            stats.update(_step_stats(st, n, step_valid))
        if st.recall is not None:
            stats["attention_recall"] = np.asarray(st.recall)[:, :n]
        texts = None
        if tokenizer is not None:
            texts = [decode_with_spans(tokenizer, [int(t) for t in out[b, : num[b]] if t != eos], continuation=True)
                     for b in range(len(num))]
        return cls(
            tokens=out,
            num_tokens=num,
            prompt_lengths=lengths,
            texts=texts,
            logprobs=None if st.logprobs is None else np.asarray(st.logprobs)[:, :n],
            stats=stats,
            masks=None if st.masks is None else np.asarray(st.masks)[:, :n],
            policy=pol.name,
            policy_report={k: np.asarray(v) for k, v in report.items()},
            timing=timing,
        )

    def sequences(self) -> list[np.ndarray]:
        """Generated ids of each sequence, trimmed to `num_tokens`."""
        return [self.tokens[b, : self.num_tokens[b]] for b in range(len(self.num_tokens))]

    def summary(self) -> dict[str, float]:
        """Aggregates over all real decode steps of the batch.

        mean_attended_fraction: mean over steps of the per-step fraction;
        token_read_fraction: visible keys summed / causal keys summed;
        kv_read_fraction: KV blocks read summed / dense blocks summed (the
            fraction of KV-cache bytes the kernel read);
        fallback_steps: steps taken in a dense fallback;
        rebuilds_per_step: released tokens re-admitted per decode step (ADORE; summed over layers,
            mean over KV heads; 0 for other policies);
        decode_steps, generated_tokens;
        with `Outputs(recall=True)`: attention_recall (mean over steps and layers) and
            attention_recall_by_layer (mean over steps, one per layer).
        """
        if "visible" not in self.stats:
            raise ValueError("this output has no statistics to summarise: it was generated with "
                             "Outputs(stats=False)")
        s, ok = self.stats, self.stats["step_valid"]
        n = int(ok.sum())

        def ratio(a, b):
            den = float(b[ok].sum())
            return float(a[ok].sum()) / den if den else float("nan")

        recall = {}
        if "attention_recall" in s:
            by_layer = s["attention_recall"][ok].mean(axis=0) if n else np.full(s["attention_recall"].shape[-1], np.nan)
            recall = {"attention_recall": float(by_layer.mean()),
                      "attention_recall_by_layer": [float(x) for x in by_layer]}
        return {
            "mean_attended_fraction": float(s["attended_fraction"][ok].mean()) if n else float("nan"),
            "token_read_fraction": ratio(s["visible"], s["causal"]),
            "kv_read_fraction": ratio(s["blocks_read"], s["dense_blocks"]),
            "fallback_steps": int(s["fallback"][ok].sum()),
            "rebuilds_per_step": float(s["rebuilt"][ok].mean()) if n else float("nan"),
            "decode_steps": n,
            "generated_tokens": int(self.num_tokens.sum()),
            **recall,
        }


def _step_stats(st, n: int, step_valid) -> dict[str, np.ndarray]:
    """The loop's per-step statistics as numpy [B, n] (see `GenerateOutput.stats`)."""
    visible, causal = np.asarray(st.visible, np.float64)[:, :n], np.asarray(st.causal)[:, :n]
    blocks, dense_blocks = np.asarray(st.blocks)[:, :n], np.asarray(st.dense_blocks)[:, :n]
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "attended_fraction": np.where(step_valid, visible / np.maximum(causal, 1), np.nan),
            "block_fraction": np.where(step_valid, blocks / np.maximum(dense_blocks, 1), np.nan),
            "visible": visible,
            "causal": causal,
            "blocks_read": blocks,
            "dense_blocks": dense_blocks,
            "fallback": np.asarray(st.fallback)[:, :n],
            "rebuilt": np.asarray(st.rebuilt)[:, :n],
        }

