"""Decode-time attention policies: which KV blocks and tokens each query reads.

A policy is the pluggable piece between the generation loop and the
block-sparse kernel. The loop owns the KV cache and the sampled tokens; the
policy owns whatever it needs to decide what the next query may see, and turns
that into the kernel's inputs:

    prefill_rows(tokens [B,T], lengths [B])            -> factored mask (`prefill_mask` module)
    prefill_mask(tokens [B,T], lengths [B])            -> bool [B,T,T]  (define one of the two)
    init_state(tokens [B,T], lengths [B], max_len)     -> policy state (pytree)
    observe_prefill(state, cache, lengths, *, block_size) -> policy state   (default: unchanged)
    update(state, tokens [B])                          -> policy state
    select(state, lengths [B], *, block_size, q, k, layer_idx) -> Selection
    observe_step(state, cache, positions [B], *, block_size, selections) -> policy state (default: unchanged)

`update` appends the token that is about to be fed to the model (it sits at
position `lengths[b]` of the cache); `select` then describes the attention row
of exactly that query. `lengths` is the cache length *before* the step, i.e.
the position of the current query. The two `observe_*` hooks let a policy keep
metadata of the keys as they are written (Quest's per-block key bounds): once
after prefill wrote the prompt's K/V, and after every decode step wrote the
K/V of position `positions[b]` in every layer. Reading one key per layer per
step is the point: a policy that rescanned the cache would read it all.
`observe_step` also gets the step's selections, so that what a query-aware
policy decided in `select` (ADORE's retained tokens, `Selection.policy_carry`)
becomes its state.

Two kinds of policy fit the same loop and kernel:

- query-independent (`query_aware = False`): the selection depends only on the
  emitted tokens (self-selected spans, dense). The loop calls `select` once per
  step with `q = k = None` and shares the result across layers.
- query-aware (`query_aware = True`): the selection depends on the current
  queries and keys of each layer (SparQ's top-r query components against the
  keys, per KV head -> `block_indices [B,K,NB]`). The loop calls `select`
  inside every layer's attention with that layer's `q [B,N,H]` and
  `k [B,K,S,H]`. A policy that also keeps its own history (ADORE's eviction
  controller) carries it in its state and advances it in `update`.

Modules: `base` (the protocol, the dense baseline, `PolicyContext`), one module per
policy (`self_span`, `quest`, `sparq`, `adore`) and `registry` (names and specs ->
policies). `Selection`, what a policy hands the kernel, lives in `selfspan_jax.selection`.

Shapes use the house letters: B batch, T prompt length, S cache length,
N query heads, K KV heads, H head dim; NB = S // block_size.
"""

from selfspan_jax.policies.adore import AdorePolicy, AdoreState
from selfspan_jax.policies.base import (DecodeOnlyPolicy, DensePolicy, Policy, PolicyContext, causal_mask,
                                        check_positive_int)
from selfspan_jax.policies.quest import QuestPolicy, QuestState
from selfspan_jax.policies.registry import (POLICIES, make_policy, parse_policy_spec, register_policy,
                                            split_policy_specs)
from selfspan_jax.policies.self_span import SelfSpanPolicy, active_blocks
from selfspan_jax.policies.sparq import SparQPolicy, SparQState
from selfspan_jax.selection import Selection, dense_selection, listed

__all__ = [
    "POLICIES", "AdorePolicy", "AdoreState", "DecodeOnlyPolicy", "DensePolicy", "Policy", "PolicyContext",
    "QuestPolicy", "QuestState", "Selection", "SelfSpanPolicy", "SparQPolicy", "SparQState", "active_blocks",
    "causal_mask", "check_positive_int", "dense_selection", "listed", "make_policy", "parse_policy_spec",
    "register_policy", "split_policy_specs",
]
