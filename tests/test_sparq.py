"""Token-list decode attention against float64 NumPy, and SparQPolicy: the selection against a float64
oracle of the paper's algorithm, full k == dense, and the decode loop against an eager reference."""

from __future__ import annotations

import dataclasses
import secrets
from typing import ClassVar

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.token_sparse_decode import token_sparse_decode
from policy_cases import (
    VOCAB,
    assert_policy_equals_dense,
    eager_decode,
    eager_prefill,
    random_prompts,
    recall64,
    small_gqa_model,
)
from selfspan_jax.cache import KVCache
from selfspan_jax.generation import KernelOptions, Outputs, generate
from selfspan_jax.sampling import Sampling
from selfspan_jax.policies import SparQPolicy


def _attention64(q, k, v, lists):
    """q [B,N,H], k/v [B,K,S,H], lists[b][h] = positions -> float64 [B,N,H] (0 for an empty list)."""
    B, N, H = q.shape
    K = k.shape[1]
    out = np.zeros((B, N, H))
    for b in range(B):
        for n in range(N):
            rows = lists[b][n // (N // K)]
            if not rows:
                continue
            s = k[b, n // (N // K), rows].astype(np.float64) @ q[b, n].astype(np.float64) / np.sqrt(H)
            p = np.exp(s - s.max())
            out[b, n] = (p / p.sum()) @ v[b, n // (N // K), rows].astype(np.float64)
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), group=st.sampled_from([1, 2, 4]),
       backend=st.sampled_from(["xla", "reference", "interpret"]), stacked=st.booleans(), T=st.sampled_from([6, 21]))
def test_token_lists_match_float64_and_nothing_unlisted_leaks(seed, group, backend, stacked, T):
    """Every backend, the Pallas kernel (interpret mode) included: lists shorter and longer than its
    16-row tile, NaN/inf in every unlisted row and in the list padding's rows."""
    rng = np.random.default_rng(seed)
    B, K, S, H = 3, 2, 24, 16
    q = rng.normal(size=(B, K * group, H)).astype(np.float32)
    k = rng.normal(size=(B, K, S, H)).astype(np.float32)
    v = rng.normal(size=(B, K, S, H)).astype(np.float32)
    idx = np.zeros((B, K, T), np.int32)
    counts = rng.integers(0, T + 1, size=(B, K)).astype(np.int32)
    lists = []
    for b in range(B):
        lists.append([])
        for h in range(K):
            rows = rng.choice(S, size=min(counts[b, h], S), replace=False).tolist()
            counts[b, h] = len(rows)
            lists[b].append(rows)
            idx[b, h, : len(rows)] = rows
            idx[b, h, len(rows):] = rng.integers(0, S, size=T - len(rows))  # padding: any id, never read
            unlisted = np.setdiff1d(np.arange(S), rows)
            k[b, h, unlisted] = np.nan  # NaN everywhere the lists do not name
            v[b, h, unlisted] = np.inf
    want = _attention64(q, k, v, lists)
    kk, vv, layer = (np.stack([np.full_like(k, np.nan), k]), np.stack([np.full_like(v, np.nan), v]), 1) if stacked \
        else (k, v, None)
    got = np.asarray(token_sparse_decode(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(vv), jnp.asarray(idx),
                                         jnp.asarray(counts), layer=layer, backend=backend))
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def test_token_lists_reject_bad_shapes_and_backends():
    q, k = jnp.zeros((1, 2, 4)), jnp.zeros((1, 1, 8, 4))
    with pytest.raises(ValueError, match="head dim H=4 is not supported"):
        token_sparse_decode(q, k, k, jnp.zeros((1, 1, 2), jnp.int32), jnp.zeros((1, 1), jnp.int32), backend="pallas")
    with pytest.raises(ValueError, match="backend"):
        token_sparse_decode(q, k, k, jnp.zeros((1, 1, 2), jnp.int32), jnp.zeros((1, 1), jnp.int32), backend="triton")
    with pytest.raises(ValueError, match="token_indices"):
        token_sparse_decode(q, k, k, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 1), jnp.int32))


def _sparq64(q, k, pos, r, kk, window):
    """The paper's selection in float64 for one sequence and KV head group: q [G,H], k [S,H] ->
    (chosen set, alpha [G], scores rank [S])."""
    G, H = q.shape
    q = q.astype(np.float64)
    i_r = np.argsort(-np.abs(q).sum(0), kind="stable")[:r]
    scale = np.sqrt(H * np.abs(q[:, i_r]).sum(-1) / np.abs(q).sum(-1))
    logits = (q[:, i_r] @ k[: pos + 1, i_r].astype(np.float64).T) / scale[:, None]
    s_hat = np.exp(logits - logits.max(-1, keepdims=True))
    s_hat /= s_hat.sum(-1, keepdims=True)
    if pos + 1 <= kk:
        chosen = set(range(pos + 1))
    else:
        win = set(range(pos - window + 1, pos + 1))
        rest = [j for j in np.argsort(-s_hat.sum(0), kind="stable") if j not in win][: kk - len(win)]
        chosen = win | set(int(j) for j in rest)
    alpha = s_hat[:, sorted(chosen)].sum(-1)
    return chosen, alpha, s_hat.sum(0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 8), kk=st.integers(1, 12), window=st.integers(0, 4),
       group=st.sampled_from([1, 3]))
def test_selection_matches_the_papers_algorithm_in_float64(seed, r, kk, window, group):
    window = min(window, kk)
    rng = np.random.default_rng(seed)
    B, K, S, H, L = 2, 2, 20, 8, 2
    pos = rng.integers(0, S, size=B).astype(np.int32)
    k = rng.normal(size=(L, B, K, S, H)).astype(np.float32)
    v = rng.normal(size=(L, B, K, S, H)).astype(np.float32)
    q = rng.normal(size=(B, K * group, H)).astype(np.float32)
    pol = SparQPolicy(r=r, k=kk, local_window=window)
    cache = KVCache(k=jnp.asarray(k), v=jnp.asarray(v), lengths=jnp.asarray(pos))
    state = pol.observe_prefill((), cache, jnp.asarray(pos), block_size=4)
    np.testing.assert_allclose(np.asarray(state.vsum),
                               np.stack([[[v[li, b, h, : pos[b]].astype(np.float64).sum(0) for h in range(K)]
                                           for b in range(B)] for li in range(L)]), atol=1e-5)
    layer = 1
    sel = pol.select(state, jnp.asarray(pos), block_size=4, cache_len=S, q=jnp.asarray(q), k=jnp.asarray(k[layer]),
                     layer_idx=layer)
    idx, cnt = np.asarray(sel.token_indices), np.asarray(sel.token_counts)
    alpha = np.asarray(sel.mix_alpha).reshape(B, K, group)
    for b in range(B):
        np.testing.assert_allclose(float(sel.rows_read[b]), r / H * (pos[b] + 1) + 2 * min(kk, pos[b] + 1),
                                   rtol=1e-6)
        for h in range(K):
            chosen, want_alpha, rank = _sparq64(q[b, h * group:(h + 1) * group], k[layer, b, h], int(pos[b]), r, kk,
                                                window)
            got = set(idx[b, h, : cnt[b, h]].tolist())
            assert cnt[b, h] == len(chosen) and max(got) <= pos[b]  # never the future
            if got != chosen:  # only a near-tie at the cut may differ between float32 and float64
                differ = sorted(got ^ chosen)
                assert np.ptp(rank[differ]) < 1e-5, (b, h, got, chosen)
                continue
            np.testing.assert_allclose(alpha[b, h], want_alpha, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return small_gqa_model(11)



def test_k_covering_the_context_is_dense(model):
    # alpha = 1 when everything is selected: no mean-V mixing
    assert_policy_equals_dense(model, SparQPolicy(r=4, k=256, local_window=4), secrets.randbelow(2**20), atol=2e-5)

def test_component_major_copy_decodes_as_the_row_major_gather(model):
    """The second, component-major K copy (kept by the policy through the observe hooks) is a layout
    change only: same tokens, log-probs within float32 noise, same reads counted."""
    seed = secrets.randbelow(2**20)
    prompts = random_prompts(seed)
    kw = dict(max_new_tokens=12, block_size=8, kernel=KernelOptions(backend="xla"), outputs=Outputs(logprobs=True),
              eos_id=-1, pad_id=0)
    row = generate(model, prompts, policy=SparQPolicy(r=3, k=10, local_window=2), **kw)
    col = generate(model, prompts, policy="sparq(r=3, k=10, local_window=2, component_major=true)", **kw)
    np.testing.assert_array_equal(col.tokens, row.tokens)
    np.testing.assert_allclose(col.logprobs, row.logprobs, atol=1e-5)
    assert col.summary()["kv_read_fraction"] == row.summary()["kv_read_fraction"]


@pytest.mark.parametrize("reallocate", [True, False])
def test_loop_equals_eager_reference(model, reallocate):
    """Forced tokens through the loop under SparQ give the log-probs of an eager decode that keeps
    no state between steps (the V sum recomputed from the cache) and attends in plain jnp."""
    seed = secrets.randbelow(2**20)
    print(f"seed={seed}")
    bs, M = 8, 8
    prompts = random_prompts(seed)
    forced = np.random.default_rng(seed + 1).integers(1, VOCAB, size=(len(prompts), M)).astype(np.int32)
    pol = SparQPolicy(r=3, k=12, local_window=4, reallocate_mean=reallocate)
    out = generate(model, prompts, policy=pol, max_new_tokens=M, block_size=bs, kernel=KernelOptions(backend="xla"),
                   eos_id=-1, pad_id=0, sampling=Sampling(forced_tokens=forced),
                   outputs=Outputs(logprobs=True, recall=True))
    cache, lengths, S, ref = eager_prefill(model, prompts, M, bs, forced)
    B = len(prompts)
    recalls = []  # per step, per layer: [B]

    def attend(q, k, v, sel, pos):
        idx, cnt = np.asarray(sel.token_indices), np.asarray(sel.token_counts)
        kk, vv, qq = (np.asarray(x) for x in (k, v, q))
        lists = [[idx[b, h, : cnt[b, h]].tolist() for h in range(kk.shape[1])] for b in range(B)]
        allowed = np.zeros((B, kk.shape[1], S), bool)
        for b in range(B):
            for h in range(kk.shape[1]):
                allowed[b, h, lists[b][h]] = True
        recalls.append(recall64(qq, kk, allowed, pos))
        y = _attention64(qq, kk, vv, lists)
        if reallocate:
            alpha = np.asarray(sel.mix_alpha)[..., None]
            G = qq.shape[1] // kk.shape[1]
            mean = np.stack([vv[b, :, : pos[b] + 1].astype(np.float64).mean(1) for b in range(B)])
            y = alpha * y + (1 - alpha) * np.repeat(mean, G, axis=1)
        return jnp.asarray(y, jnp.float32)

    ref = eager_decode(model, pol, cache, forced, ref, bs, S, attend)
    np.testing.assert_allclose(out.logprobs, ref, atol=3e-5)
    # the share of dense attention on the chosen tokens, per step and layer, against float64
    L = model.config.n_layers
    want = np.stack(recalls).reshape(M - 1, L, B).transpose(2, 0, 1)
    np.testing.assert_allclose(out.stats["attention_recall"][:, 1:], want, atol=2e-5)
    assert (want < 1 - 1e-3).any()  # the lists missed some attention: the check is not trivially 1
    ok = out.stats["step_valid"]
    q_pos = lengths[:, None] + np.arange(M)[None, :] - 1
    np.testing.assert_allclose(out.stats["visible"][ok], np.minimum(12, q_pos + 1)[ok])
    # the fraction of KV bytes read is the paper's count: r/H of K plus k rows of K and of V
    want = (3 / 8 * (q_pos + 1) + 2 * np.minimum(12, q_pos + 1)) / (2 * bs)
    np.testing.assert_allclose(out.stats["blocks_read"][ok], want[ok], rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0, k=4), "r"), (dict(r=2, k=0), "k"), (dict(r=2, k=4, local_window=-1), "local_window"),
    (dict(r=2, k=4, local_window=5), "local_window"), (dict(r=2.0, k=4), "r"),
    (dict(r=2, k=4, reallocate_mean=1), "reallocate_mean"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparQPolicy(**kwargs)


def test_by_name_and_spec():
    from selfspan_jax.policies import QuestPolicy, make_policy, split_policy_specs

    assert make_policy("sparq") == SparQPolicy(r=16, k=64, local_window=16)
    assert make_policy("sparq(r=8, k=16, local_window=4, reallocate_mean=false)") == SparQPolicy(8, 16, 4, False)
    assert make_policy("quest(page_budget=3)") == QuestPolicy(3)
    # spaces around a spec or a name, as around its items, are not part of it
    assert make_policy("  quest(page_budget=3) ") == QuestPolicy(3) and make_policy(" sparq ") == make_policy("sparq")
    assert split_policy_specs("dense, quest(page_budget=2),sparq(r=8,k=16),self_span") == [
        "dense", "quest(page_budget=2)", "sparq(r=8,k=16)", "self_span"]
    # defaults live in the dataclass: a spec sets what it names, the rest as the bare name has it
    assert make_policy("sparq(r=8)") == SparQPolicy(r=8) == SparQPolicy(8, 64, 16)
    assert SparQPolicy(r=4, k=8).local_window == 8  # the default window never exceeds k
    for bad, match in (("sparq(r=8,k=8,local_window=9)", "local_window"), ("sparq(k=4,q=2)", "'q'"), ("quest(budget=2)", "budget"), ("quest(2)", "key=value"),
                       ("adore(budget=2)", "controller"), ("h2o(budget=2)", "expected one of"),
                       ("quest(page_budget=0)", "page_budget")):
        with pytest.raises(ValueError, match=match):
            make_policy(bad)


def test_a_registered_policy_is_reachable_by_name_and_spec(monkeypatch):
    """`register_policy` makes a new policy class a name every --policies takes, with its dataclass
    defaults; a second class under a taken name, or something that is not a Policy, is refused."""
    from selfspan_jax import policies as P

    monkeypatch.setattr(P.registry, "POLICIES", dict(P.POLICIES))

    @P.register_policy
    @dataclasses.dataclass(frozen=True)
    class Window(P.DecodeOnlyPolicy):
        width: int = 4
        name: ClassVar[str] = "window"

        def select(self, state, lengths, *, block_size, cache_len, q=None, k=None, layer_idx=None):
            return P.dense_selection(lengths, cache_len, block_size)

    assert P.make_policy("window") == Window() and P.make_policy("window(width=7)") == Window(7)
    with pytest.raises(ValueError, match="'width2'"):
        P.make_policy("window(width2=7)")

    @dataclasses.dataclass(frozen=True)
    class Other(Window):
        pass

    with pytest.raises(ValueError, match="registered already"):
        P.register_policy(Other)
    with pytest.raises(ValueError, match="Policy subclass"):
        P.register_policy(dict)


def test_r_above_the_head_dim_is_refused(model):
    with pytest.raises(ValueError, match="r=99"):
        generate(model, random_prompts(0), policy=SparQPolicy(r=99, k=4), max_new_tokens=2, eos_id=-1, pad_id=0)
