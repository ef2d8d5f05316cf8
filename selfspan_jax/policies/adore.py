"""ADORE: a small learned controller releases tokens from the cache and rebuilds them."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from selfspan_jax.policies.base import DecodeOnlyPolicy, check_positive_int
from selfspan_jax.selection import Selection, dense_selection, listed


@struct.dataclass
class AdoreState:
    """What `AdorePolicy` keeps per layer and sequence.

    feats: [L, B, K, S, C] the controller's feature of every written key (cache dtype);
    carry: f32 [L, B, K, C] its GRU state after the keys written so far;
    kept: int32 [L, B, K, m] the tokens in the cache, m = budget - rebuild - 1 (the first kept_count
        are live);
    kept_count: int32 [L, B, K].
    """

    feats: jax.Array
    carry: jax.Array
    kept: jax.Array
    kept_count: jax.Array


@dataclasses.dataclass(frozen=True)
class AdorePolicy(DecodeOnlyPolicy):
    """ADORE-style adaptive token release (Zhang et al., arXiv 2407.02328) with a trained controller.

    Per layer and KV head the cache holds m = budget - rebuild - 1 tokens.
    For the query at t the controller (`adore.Controller`: a GRU over the keys,
    a feature per token, the query's projection, a distance bias) scores every
    earlier token "for the current token"; the query reads the m cached
    tokens, the `rebuild` released tokens of highest score (they are
    "rebuilt"), and itself: at most `budget` rows. Then the cache keeps the m
    highest-scoring of what was read and releases the rest. Prefill is dense
    causal; the prompt's m tokens are then chosen by the controller's history
    and recency alone (no query yet). Released tokens stay in this project's
    cache (a rebuild re-reads them instead of recomputing their K/V): only
    bandwidth is saved, not memory.

    Reads per step and KV head (row equivalents of K+V, `rows_read`):
    2 * min(budget, t + 1) plus the features of the t earlier tokens,
    dim / head_dim of a K row each. `controller` is an `adore.TrainedController`
    or the directory `scripts/train_adore.py` wrote. State: `AdoreState`.
    """

    budget: int = 64
    rebuild: int = 4
    controller: Any = None

    name: ClassVar[str] = "adore"
    query_aware: ClassVar[bool] = True

    @classmethod
    def from_settings(cls, settings, context):
        from selfspan_jax import adore  # the policy table must not need flax's RNN modules to import

        settings = dict(settings)
        controller = settings.get("controller")
        if controller is None:
            controller = context.adore_controller
        if controller is None and context.run_dir is not None:
            controller = adore.controller_of_run(context.run_dir)
        if controller is None:
            raise ValueError("policy 'adore' needs a trained controller: pass adore_controller= (the directory "
                             "scripts/train_adore.py wrote, <run>/adore by default) or adore(controller=DIR, ...)")
        if isinstance(controller, str) and controller == "random":
            if context.model_config is None:
                raise ValueError("adore(controller=random) needs the model's config (its layers and head dim)")
            controller = adore.TrainedController(
                adore.new_controller(context.model_config.n_layers, context.model_config.head_dim),
                source="random, untrained (speed only)")
        pol = cls(**{**settings, "controller": controller})
        if context.run_dir is not None:
            adore.check_controller_source(pol.controller, context.run_dir)
        return pol

    def __post_init__(self):
        from selfspan_jax import adore  # the policy table must not need flax's RNN modules to import

        check_positive_int("rebuild", self.rebuild, 0)
        check_positive_int("budget", self.budget, 2)
        if self.budget < self.rebuild + 2:
            raise ValueError(f"budget {self.budget} must be at least rebuild + 2 = {self.rebuild + 2}: the query, "
                             f"the {self.rebuild} rebuilt tokens and at least one cached token")
        if isinstance(self.controller, (str, os.PathLike)):
            object.__setattr__(self, "controller", adore.load_controller(self.controller))
        if not isinstance(self.controller, adore.TrainedController):
            raise ValueError("controller must be an adore.TrainedController or the directory of one "
                             f"(scripts/train_adore.py), got {self.controller!r}")

    @property
    def cached(self) -> int:
        """m: tokens the cache holds besides the query and the rebuilt ones."""
        return self.budget - self.rebuild - 1

    def check_model(self, config):
        self._check_shapes(config.n_layers, config.head_dim)

    def _check_cache(self, cache) -> None:
        self._check_shapes(cache.k.shape[0], cache.k.shape[-1])

    def _check_shapes(self, L: int, H: int) -> None:
        ctl = self.controller
        if (L, H) != (ctl.n_layers, ctl.head_dim):
            raise ValueError(f"the ADORE controller {ctl} was trained for {ctl.n_layers} layers of head dim "
                             f"{ctl.head_dim}; this model has {L} layers of head dim {H}")

    @staticmethod
    def _top(scores, allowed, n):
        """The n highest `scores` where `allowed` ([B, K, S]): (ids [B, K, n], live count [B, K])."""
        vals, idx = jax.lax.top_k(jnp.where(allowed, scores, -jnp.inf), n)
        return idx.astype(jnp.int32), jnp.sum(jnp.isfinite(vals), -1).astype(jnp.int32)

    def observe_prefill(self, state, cache, lengths, *, block_size):
        self._check_cache(cache)
        ctl = self.controller.module()
        L, B, K, S, H = cache.k.shape
        feats = jnp.stack([ctl.features(i, cache.k[i]) for i in range(L)]).astype(cache.k.dtype)

        def read(t, carry):
            valid = (t < lengths)[None, :, None, None]
            new = jnp.stack([ctl.advance(i, carry[i], cache.k[i, :, :, t]) for i in range(L)])
            return jnp.where(valid, new, carry)

        carry = jax.lax.fori_loop(0, jnp.max(lengths), read, jnp.zeros((L, B, K, ctl.dim), jnp.float32))
        j = jnp.arange(S)
        # [B, 1, S]: the prompt, as seen from the first decode query at lengths[b]
        prompt = (j[None, :] < lengths[:, None])[:, None, :]
        distance = (lengths[:, None] - j[None, :])[:, None, :]
        kept, counts = [], []
        for i in range(L):
            s = ctl.score(i, feats[i], carry[i], distance)  # history and recency only: no query yet
            idx, count = self._top(s, prompt, min(self.cached, S))
            kept.append(idx)
            counts.append(count)
        return AdoreState(feats, carry, jnp.stack(kept), jnp.stack(counts))

    def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
        ctl = self.controller.module()
        B, N, H = q.shape
        K, S = k.shape[1], cache_len
        pos = lengths.astype(jnp.int32)
        j = jnp.arange(S)
        probe = ctl.probe(layer_idx, q.reshape(B, K, N // K, H), state.carry[layer_idx])
        # [B, K, S]: importance of every cached token for this query
        s = ctl.score(layer_idx, state.feats[layer_idx], probe, (pos[:, None] - j[None, :])[:, None, :])
        # the query's own feature is written after the step: score it from its key, already in the cache
        own_key = k[jnp.arange(B), :, pos, :]
        own_score = ctl.score(layer_idx, ctl.features(layer_idx, own_key)[:, :, None, :], probe,
                              jnp.zeros((B, K, 1), jnp.int32))
        s = jnp.where((j[None, :] == pos[:, None])[:, None, :], own_score, s)
        earlier = (j[None, :] < pos[:, None])[:, None, :]
        in_cache = listed(state.kept[layer_idx], state.kept_count[layer_idx], S) & earlier
        read = in_cache
        if self.rebuild:
            back, n_back = self._top(s, earlier & ~in_cache, min(self.rebuild, S))
            rebuilt = listed(back, n_back, S)
            read = read | rebuilt
            n_rebuilt = jnp.mean(n_back.astype(jnp.float32), axis=-1)
        else:
            n_rebuilt = jnp.zeros((B,), jnp.float32)
        n_read = min(self.budget - 1, S)
        idx, count = self._top(s, read, n_read)
        # entries past the count repeat the query's own position (never read: the count stops before them)
        idx = jnp.where(jnp.arange(n_read)[None, None, :] < count[..., None], idx, pos[:, None, None])
        indices = jnp.concatenate([idx, jnp.broadcast_to(pos[:, None, None], (B, K, 1))], axis=-1)
        counts = count + 1
        # what the cache keeps for the next query: the m best of what this one read, itself included
        own = (j[None, :] == pos[:, None])[:, None, :]
        kept = self._top(s, read | own, min(self.cached, S))
        rows_read = 2.0 * jnp.mean(counts.astype(jnp.float32), axis=-1) + (ctl.dim / H) * pos
        dense = dense_selection(lengths, cache_len, block_size)
        return Selection(dense.block_indices, dense.block_counts, dense.token_mask, token_indices=indices,
                         token_counts=counts, rows_read=rows_read.astype(jnp.float32), rebuilt=n_rebuilt,
                         policy_carry=kept)

    def observe_step(self, state, cache, positions, *, block_size, selections=()):
        if len(selections) != state.kept.shape[0]:
            raise ValueError(f"AdorePolicy.observe_step needs the step's {state.kept.shape[0]} per-layer selections")
        ctl = self.controller.module()
        B = positions.shape[0]
        b = jnp.arange(B)
        feats, carry = [], []
        for i in range(state.kept.shape[0]):
            # [B, K, H]: the key this step wrote in layer i
            k_new = cache.k[i, b, :, positions, :]
            feats.append(state.feats[i].at[b, :, positions, :].set(ctl.features(i, k_new).astype(state.feats.dtype)))
            carry.append(ctl.advance(i, state.carry[i], k_new))
        kept = jnp.stack([sel.policy_carry[0] for sel in selections])
        counts = jnp.stack([sel.policy_carry[1] for sel in selections])
        return AdoreState(jnp.stack(feats), jnp.stack(carry), kept, counts)
