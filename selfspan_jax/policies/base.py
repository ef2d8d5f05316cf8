"""The policy protocol (`Policy`), its decode-only form and the dense baseline."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp

from selfspan_jax.prefill_mask import ArrayPrefillMask, causal_prefill_mask
from selfspan_jax.selection import Selection, dense_selection


def causal_mask(T: int, lengths: jax.Array) -> jax.Array:
    """bool [B, T, T]: causal over the first `lengths[b]` tokens, padding rows see only themselves."""
    return causal_prefill_mask(T, lengths).full()


@dataclasses.dataclass(frozen=True)
class Policy(abc.ABC):
    """Base class; subclasses are frozen (hashable) so they can be jit statics."""

    name: ClassVar[str] = "policy"
    query_aware: ClassVar[bool] = False

    def prefill_rows(self, tokens: jax.Array, lengths: jax.Array):
        """The prompt's attention mask in factored form (`prefill_mask.SpanPrefillMask` or
        `ArrayPrefillMask`): prefill expands it one block at a time, never [B, T, T] at once.
        Default: the rows of `prefill_mask`, for plug-in policies that define only that."""
        if type(self).prefill_mask is Policy.prefill_mask:
            raise NotImplementedError(f"{type(self).__name__} must define prefill_rows or prefill_mask")
        return ArrayPrefillMask(self.prefill_mask(tokens, lengths))

    def prefill_mask(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """bool [B, T, T], the whole prompt mask (default: `prefill_rows` expanded)."""
        if type(self).prefill_rows is Policy.prefill_rows:
            raise NotImplementedError(f"{type(self).__name__} must define prefill_rows or prefill_mask")
        return self.prefill_rows(tokens, lengths).full()

    @abc.abstractmethod
    def init_state(self, tokens: jax.Array, lengths: jax.Array, max_len: int) -> Any:
        ...

    @abc.abstractmethod
    def update(self, state: Any, tokens: jax.Array, active: jax.Array) -> Any:
        """State after appending tokens [B] to the sequences where active [B] is True; a sequence
        that has stopped keeps its state, so what `report` says of it does not depend on how long
        the rest of the batch (or of its device's shard) goes on decoding."""

    @abc.abstractmethod
    def select(self, state: Any, lengths: jax.Array, *, block_size: int, cache_len: int,
               q: jax.Array | None = None, k: jax.Array | None = None,
               layer_idx: int | None = None) -> Selection:
        ...

    def observe_prefill(self, state: Any, cache, lengths: jax.Array, *, block_size: int) -> Any:
        """State after prefill wrote the K/V of positions < lengths[b] (cache: `KVCache`)."""
        return state

    def observe_step(self, state: Any, cache, positions: jax.Array, *, block_size: int,
                     selections: Sequence[Selection] = ()) -> Any:
        """State after a decode step wrote the K/V of position positions[b] in every layer;
        `selections` are the step's selections (one per layer for a query-aware policy)."""
        return state

    @classmethod
    def from_settings(cls, settings: dict[str, Any], context: "PolicyContext") -> "Policy":
        """This policy from a spec's settings ("name(key=value, ...)") and what the caller has at hand
        (`context`); the dataclass's defaults fill the rest. A policy that needs more than its settings
        (span tokens, a trained controller) takes it from the context here."""
        return cls(**settings)

    def check_model(self, config) -> None:
        """Raise ValueError when this policy cannot decode a model of `config` (a `LlamaConfig`): called
        before any work, so a setting that does not fit the model fails before the rows that fit run."""

    def fallback(self, state: Any, batch: int) -> jax.Array:
        """bool [B]: sequences the policy has switched to dense for good."""
        return jnp.zeros((batch,), bool)

    def report(self, state: Any) -> dict[str, jax.Array]:
        """Per-sequence counters at the end of generation ({name: [B]}), e.g. malformed spans."""
        return {}


@dataclasses.dataclass(frozen=True)
class DecodeOnlyPolicy(Policy):
    """A policy that sparsifies decoding only: dense causal prefill, no state driven by the emitted
    tokens (what it keeps comes through the `observe_*` hooks). Dense, Quest and SparQ are such."""

    def prefill_rows(self, tokens, lengths):
        return causal_prefill_mask(tokens.shape[-1], lengths)

    def init_state(self, tokens, lengths, max_len):
        return ()

    def update(self, state, tokens, active):
        return state


@dataclasses.dataclass(frozen=True)
class DensePolicy(DecodeOnlyPolicy):
    """Every earlier token; the baseline that reads all blocks up to the query."""

    name: ClassVar[str] = "dense"

    def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
        return dense_selection(lengths, cache_len, block_size)


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")



@dataclasses.dataclass(frozen=True)
class PolicyContext:
    """What a caller has at hand that a policy may build itself from (`Policy.from_settings`).

    tokenizer: the span tokens of `self_span` come from it.
    max_segments: the span language's segment limit a run was trained with (`self_span`; None = the
        policy's default).
    adore_controller: the trained controller of `adore` (`adore.TrainedController`, the directory
        `scripts/train_adore.py` wrote, or "random": an untrained one of `model_config`'s shape, which
        reads and computes what a trained one does: for speed only).
    run_dir: the training run being decoded: `adore` takes its controller from `<run_dir>/adore` when
        none is given, and refuses one distilled from another run.
    model_config: the `LlamaConfig` of the model being decoded.
    """

    tokenizer: Any = None
    max_segments: int | None = None
    adore_controller: Any = None
    run_dir: Any = None
    model_config: Any = None
