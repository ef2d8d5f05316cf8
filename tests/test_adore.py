"""AdorePolicy and its controller: retention against a brute-force replay with Python sets, the
loop against an eager float64 reference, distillation targets against float64 numpy, training
that resumes where it stopped, and bad arguments."""

from __future__ import annotations

import secrets

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from policy_cases import assert_policy_equals_dense, eager_prefill, random_prompts, small_gqa_model
from conftest import draws, fuzz_cli
from selfspan_jax import adore, adore_train
from selfspan_jax import train as T
from selfspan_jax.cache import KVCache
from selfspan_jax.generation import KernelOptions, Outputs, generate
from selfspan_jax.sampling import Sampling
from selfspan_jax.policies import AdorePolicy, make_policy


def _seed() -> int:
    seed = secrets.randbelow(2**20)
    print(f"seed={seed}")
    return seed


def _controller(L: int, H: int, dim: int, seed: int) -> adore.TrainedController:
    ctl = adore.new_controller(L, H, dim=dim, seed=seed)
    # a random distance bias, so that recency matters as it does after training
    ctl.distance_bias[...] = jnp.asarray(np.random.default_rng(seed).normal(size=ctl.distance_bias.shape),
                                         jnp.float32)
    return adore.TrainedController(ctl)


def test_distance_buckets_match_their_definition():
    def want(d, buckets):
        d = max(d, 1)
        if d <= 8:
            return d - 1
        return min(8 + int(np.floor(2 * np.log2(d / 8))), buckets - 1)

    d = np.arange(0, 5000)
    got = np.asarray(adore.distance_bucket(jnp.asarray(d), 16))
    np.testing.assert_array_equal(got, [want(int(x), 16) for x in d])


# ---------------------------------------------------------------------------
# Retention: the policy's incremental state against a replay with sets
# ---------------------------------------------------------------------------
def _replay(history, scores, length, steps, budget, rebuild):
    """Brute force of the release/rebuild rule for one (layer, sequence, KV head), with sets.

    history[t, j]: the controller's score of key j from its GRU and recency alone (the prompt's
    choice, before any query); scores[t, j]: for the query at t. Returns per decode query (at
    length, length + 1, ...): (rows read, tokens rebuilt).
    """
    m = budget - rebuild - 1

    def top(cands, row, n):
        return set(sorted(cands, key=lambda j: -row[j])[:n])

    cache = top(range(length), history[length], m)
    out = []
    for t in range(length, length + steps + 1):
        back = top(set(range(t)) - cache, scores[t], rebuild)
        read = cache | back
        out.append((read | {t}, len(back)))
        cache = top(read | {t}, scores[t], m)
    return out


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rebuild=st.integers(0, 4), extra=st.integers(1, 6),
       steps=st.integers(0, 6), group=st.sampled_from([1, 2]))
def test_release_and_rebuild_match_a_replay_with_sets(seed, rebuild, extra, steps, group):
    rng = np.random.default_rng(seed)
    L, B, K, H, S = 2, 3, 2, 4, 32
    budget = rebuild + 1 + extra
    N = K * group
    lengths = rng.integers(1, S - steps - 1, size=B).astype(np.int32)
    # keys past lengths are padding garbage until decode writes them: the policy must ignore them
    k = rng.normal(size=(L, B, K, S, H)).astype(np.float32)
    trained = _controller(L, H, dim=4, seed=seed)
    pol = AdorePolicy(budget=budget, rebuild=rebuild, controller=trained)
    cache = KVCache(k=jnp.asarray(k), v=jnp.zeros_like(jnp.asarray(k)), lengths=jnp.asarray(lengths))
    state = pol.observe_prefill((), cache, jnp.asarray(lengths), block_size=8)
    pos = lengths.copy()
    q_seq = np.zeros((L, B, S, N, H), np.float32)
    seen = []
    for m in range(steps + 1):
        q = rng.normal(size=(L, B, N, H)).astype(np.float32)
        q_seq[:, np.arange(B), pos] = q
        # as in the model's decode step: the query's key is written, then each layer selects
        k[:, np.arange(B), :, pos] = rng.normal(size=(B, L, K, H)).astype(np.float32)
        cache = cache.replace(k=jnp.asarray(k))
        sels = [pol.select(state, jnp.asarray(pos), block_size=8, cache_len=S, q=jnp.asarray(q[i]), k=cache.k[i],
                           layer_idx=i) for i in range(L)]
        seen.append(sels)
        state = pol.observe_step(state, cache, jnp.asarray(pos), block_size=8, selections=sels)
        pos = pos + 1
    ctl = trained.module()
    final = jnp.asarray(pos)
    for i in range(L):
        history = np.asarray(ctl.sequence_scores(i, jnp.zeros_like(jnp.asarray(q_seq[i])), jnp.asarray(k[i]), final))
        scores = np.asarray(ctl.sequence_scores(i, jnp.asarray(q_seq[i]), jnp.asarray(k[i]), final))
        want_rebuilt = np.zeros((steps + 1, B))
        for b in range(B):
            for h in range(K):
                replay = _replay(history[b, h], scores[b, h], int(lengths[b]), steps, budget, rebuild)
                for m, (want, n_back) in enumerate(replay):
                    sel = seen[m][i]
                    n = int(sel.token_counts[b, h])
                    got = np.asarray(sel.token_indices[b, h, :n]).tolist()
                    assert len(set(got)) == n <= budget, "a listed row is repeated or over budget"
                    assert max(got) == lengths[b] + m, "a query reads the future, or misses itself"
                    assert set(got) == want, (i, b, h, m)
                    want_rebuilt[m, b] += n_back / K
        got_rebuilt = np.stack([np.asarray(sels[i].rebuilt) for sels in seen])
        np.testing.assert_allclose(got_rebuilt, want_rebuilt, atol=1e-6)


def test_budget_over_the_context_decodes_as_dense():
    seed = _seed()
    model = small_gqa_model(seed)
    pol = AdorePolicy(budget=4096, rebuild=2, controller=_controller(2, 8, 4, seed))
    out = assert_policy_equals_dense(model, pol, seed, atol=1e-5)
    assert out.summary()["rebuilds_per_step"] == 0.0


def test_loop_matches_an_eager_float64_reference():
    """generate with ADORE (jitted while_loop, incremental state) against an eager decode that attends in
    float64 over the rows the policy names, state carried step by step by the policy's own hooks."""
    seed = _seed()
    model = small_gqa_model(seed)
    pol = AdorePolicy(budget=7, rebuild=2, controller=_controller(2, 8, 4, seed))
    prompts = random_prompts(seed)
    M, bs = 8, 8
    forced = np.random.default_rng(seed).integers(1, 40, size=(len(prompts), M)).astype(np.int32)
    out = generate(model, prompts, policy=pol, max_new_tokens=M, block_size=bs, kernel=KernelOptions(backend="xla"),
                   outputs=Outputs(logprobs=True), eos_id=-1, pad_id=0, sampling=Sampling(forced_tokens=forced))
    cache, lengths, S, ref = eager_prefill(model, prompts, M, bs, forced)
    state = pol.observe_prefill((), cache, jnp.asarray(lengths), block_size=bs)
    B = len(prompts)
    for m in range(1, M):
        pos = np.asarray(cache.lengths)
        sels = []

        def attention_fn(q, k_all, v_all, layer, pos=pos, state=state, sels=sels):
            sel = pol.select(state, jnp.asarray(pos), block_size=bs, cache_len=S, q=q, k=k_all[layer],
                             layer_idx=layer)
            sels.append(sel)
            q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k_all[layer], v_all[layer]))
            N, K, H = q64.shape[1], k64.shape[1], q64.shape[2]
            o = np.zeros_like(q64)
            for b in range(B):
                for n in range(N):
                    rows = np.asarray(sel.token_indices[b, n // (N // K), : int(sel.token_counts[b, n // (N // K)])])
                    assert rows.max() <= pos[b]
                    s = k64[b, n // (N // K), rows] @ q64[b, n] / np.sqrt(H)
                    p = np.exp(s - s.max())
                    o[b, n] = p @ v64[b, n // (N // K), rows] / p.sum()
            return jnp.asarray(o, q.dtype)

        step_logits, cache = model.decode_step(jnp.asarray(forced[:, m - 1]), cache, attention_fn=attention_fn)
        state = pol.observe_step(state, cache, jnp.asarray(pos), block_size=bs, selections=sels)
        ref[:, m] = jax.nn.log_softmax(step_logits)[np.arange(B), forced[:, m]]
    np.testing.assert_allclose(out.logprobs, ref, atol=1e-4)
    s = out.summary()
    assert s["kv_read_fraction"] < 1.0 and np.isfinite(s["rebuilds_per_step"])
    # the analytic count of its reads: every prompt is longer than the budget, so each step reads
    # `budget` K and V rows, plus dim/H of a K row per earlier token for the controller's features
    ok = out.stats["step_valid"]
    q_pos = lengths[:, None] + np.arange(M)[None, :] - 1
    ctl = pol.controller.module()
    want = (2 * pol.budget + ctl.dim / ctl.head_dim * q_pos) / (2 * bs)
    np.testing.assert_allclose(out.stats["blocks_read"][ok], want[ok], rtol=1e-6)


def test_bad_arguments_name_the_argument(tmp_path):
    trained = _controller(2, 8, 4, 0)
    for kw, word in (({"budget": 0}, "budget"), ({"budget": 1}, "budget"), ({"budget": 5, "rebuild": 4}, "budget"),
                     ({"budget": 4, "rebuild": -1}, "rebuild"), ({"budget": 4, "rebuild": 1.5}, "rebuild")):
        with pytest.raises(ValueError, match=word):
            AdorePolicy(controller=trained, **kw)
    with pytest.raises(ValueError, match="controller"):
        AdorePolicy(budget=8, controller=None)
    with pytest.raises(ValueError, match="controller"):
        make_policy("adore")
    with pytest.raises(ValueError, match="no controller.json"):
        make_policy(f"adore(budget=8, controller={tmp_path})")
    wrong = AdorePolicy(budget=8, controller=_controller(3, 8, 4, 0))
    with pytest.raises(ValueError, match="3 layers"):
        generate(small_gqa_model(0), [[1, 2, 3]], policy=wrong, max_new_tokens=2, eos_id=-1, pad_id=0)
    assert make_policy("adore(budget=8,rebuild=0)", adore_controller=trained) == AdorePolicy(8, 0, trained)
    assert make_policy("adore", adore_controller=trained) == AdorePolicy(64, 4, trained)
    # equal weights are one jit key; other weights are another
    assert hash(_controller(2, 8, 4, 0)) == hash(trained) and _controller(2, 8, 4, 1) != trained


# ---------------------------------------------------------------------------
# Distillation
# ---------------------------------------------------------------------------
def test_teacher_targets_loss_and_recall_match_float64():
    rng = np.random.default_rng(_seed())
    B, T, N, K, H, top_k = 2, 12, 4, 2, 8, 3
    q = rng.normal(size=(B, T, N, H)).astype(np.float32)
    k = rng.normal(size=(B, K, T, H)).astype(np.float32)
    query_mask = rng.random((B, T)) < 0.7
    positives, weights, rows = adore_train.teacher_top_k(jnp.asarray(q), jnp.asarray(k), jnp.asarray(query_mask),
                                                         top_k)
    scores = rng.normal(size=(B, K, T, T)).astype(np.float32)
    want_pos = np.zeros((B, K, T, T), bool)
    loss = n = hits = 0.0
    G = N // K
    for b in range(B):
        for h in range(K):
            for t in range(1, T):
                att = np.zeros(t)
                for g in range(G):
                    s = k[b, h, : t + 1].astype(np.float64) @ q[b, t, h * G + g] / np.sqrt(H)
                    p = np.exp(s - s.max())
                    att += (p / p.sum())[:t]  # the query's own key is not a target
                best = sorted(np.argsort(-att)[:top_k].tolist())
                want_pos[b, h, t, best] = True
                w = att[best] / att[best].sum()
                np.testing.assert_allclose(np.asarray(weights[b, h, t, best]), w, rtol=1e-5)
                best = set(best)
                if query_mask[b, t]:
                    sc = scores[b, h, t, :t].astype(np.float64)
                    logz = np.log(np.exp(sc - sc.max()).sum()) + sc.max()
                    loss += logz - w @ sc[sorted(best)]
                    hits += len(best & set(np.argsort(-sc)[:4].tolist())) / len(best)
                    n += 1
    np.testing.assert_array_equal(np.asarray(positives), want_pos)
    np.testing.assert_array_equal(np.asarray(rows), query_mask & (np.arange(T) >= 1))
    assert float(jnp.sum(jnp.where(positives, 0.0, weights))) == 0.0
    l_sum, l_n = adore_train.listwise_loss(jnp.asarray(scores), weights, rows)
    r_sum, _ = adore_train.recall(jnp.asarray(scores), positives, rows, 4)
    assert float(l_n) == n  # one row per (sequence, KV head, decode query)
    np.testing.assert_allclose(float(l_sum), loss, rtol=1e-4)
    np.testing.assert_allclose(float(r_sum), hits, rtol=1e-5)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adore") / "dense"
    cfg = T.TrainConfig(model_overrides={"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_dim": 64},
                        data={"min_operands": 3, "max_operands": 3}, num_train=32, num_eval=4, steps=2,
                        batch_size=8, seq_len=64, warmup_steps=1, save_every=2, eval_every=100, log_every=1,
                        span_policy="dense", eval_generate=False, progress=False, tensorboard=False, out=str(out))
    T.train(cfg)
    return out


def test_distill_learns_resumes_and_plugs_into_generate(dense_run, tmp_path):
    import json
    import shutil

    from selfspan_jax import runs

    kw = dict(run=str(dense_run), dim=8, top_k=4, recall_at=7, batch_size=8, num_train=64, num_eval=8, lr=1e-2,
              steps=12, save_every=6, eval_every=6, progress=False)
    straight = adore_train.distill(adore_train.DistillConfig(out=str(tmp_path / "a"), **kw))
    # a crash after the step-6 save: the last checkpoint and the later log lines are what survives
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / adore.CHECKPOINTS / "12")
    resumed = adore_train.distill(adore_train.DistillConfig(out=str(tmp_path / "b"), **kw))
    assert resumed["step"] == straight["step"] == 12
    np.testing.assert_allclose(resumed["eval_loss"], straight["eval_loss"], rtol=1e-6)
    assert adore.load_controller(tmp_path / "a") == adore.load_controller(tmp_path / "b")
    recs = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))  # no step logged twice
    assert recs[-1]["loss"] < recs[0]["loss"]  # the listwise loss falls from its start
    with pytest.raises(ValueError, match="other settings"):
        adore_train.distill(adore_train.DistillConfig(out=str(tmp_path / "a"), **{**kw, "dim": 4}))
    # the same run named another way resumes (here: finds the controller finished) instead of being refused
    again = adore_train.distill(adore_train.DistillConfig(out=str(tmp_path / "a"), **{**kw, "run": f"{dense_run}/"}))
    assert again["step"] == 12
    # --out the run itself, or inside its checkpoints: refused before anything is written, nothing to delete
    before = sorted(p.name for p in dense_run.iterdir())
    for bad in (dense_run, dense_run / runs.CHECKPOINTS / "x"):
        with pytest.raises(ValueError, match="needs a folder of its own") as err:
            adore_train.distill(adore_train.DistillConfig(out=str(bad), **kw))
        assert "delete" not in str(err.value)
    assert sorted(p.name for p in dense_run.iterdir()) == before
    # a controller is refused for a row decoding another run than the one it learned (a copy elsewhere here)
    shutil.copytree(dense_run, tmp_path / "other", ignore=shutil.ignore_patterns("adore", ".lock"))
    spec = f"adore(budget=6,rebuild=1,controller={tmp_path / 'a'})"
    assert make_policy(spec, run_dir=str(dense_run)).controller == adore.load_controller(tmp_path / "a")
    with pytest.raises(ValueError, match="was distilled from the run .*, not from .*other"):
        make_policy(spec, run_dir=str(tmp_path / "other"))
    # a run's own controller is found in <run>/adore when the spec names none
    (dense_run / "adore").symlink_to(tmp_path / "a")
    try:
        assert make_policy("adore(budget=6,rebuild=1)", run_dir=str(dense_run)).controller.source == str(
            dense_run / "adore")
    finally:
        (dense_run / "adore").unlink()
    # one writer per output folder, as for training runs
    with runs.RunLock(tmp_path / "a"):
        with pytest.raises(runs.RunDirLocked, match="controller directory .* is in use: pid"):
            adore_train.distill(adore_train.DistillConfig(out=str(tmp_path / "a"), **kw))
    loaded = runs.load_run(dense_run)
    out = generate(loaded.model, ["3+4-2="], tokenizer=loaded.tokenizer,
                   policy=f"adore(budget=6, rebuild=1, controller={tmp_path / 'a'})", max_new_tokens=12, block_size=16)
    assert out.policy == "adore" and out.summary()["decode_steps"] > 0


def test_pallas_token_kernel_in_the_loop_matches_the_xla_path():
    """The loop's token lists through the Pallas row-gather kernel (interpret mode) decode as the XLA
    gather path does: same tokens, log-probs within float32 noise."""
    from selfspan_jax.config import LlamaConfig
    from selfspan_jax.model import Llama

    seed = _seed()
    cfg = LlamaConfig(vocab_size=40, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=256)
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    pol = AdorePolicy(budget=9, rebuild=3, controller=_controller(2, 16, 4, seed))
    prompts = random_prompts(seed, batch=2)
    kw = dict(policy=pol, max_new_tokens=6, block_size=16, outputs=Outputs(logprobs=True), eos_id=-1, pad_id=0)
    xla = generate(model, prompts, kernel=KernelOptions(backend="xla"), **kw)
    pallas = generate(model, prompts, kernel=KernelOptions(backend="interpret", precision="highest"), **kw)
    np.testing.assert_array_equal(pallas.tokens, xla.tokens)
    np.testing.assert_allclose(pallas.logprobs, xla.logprobs, atol=1e-5)


_ADORE_FLAGS = ["--dim", "--buckets", "--top-k", "--recall-at", "--steps", "--batch-size", "--lr", "--num-train",
                "--num-eval", "--seed", "--save-every", "--eval-every", "--out", "--run"]
_ADORE_VALUES = st.one_of(st.integers(-3, 40).map(str), st.sampled_from(
    ["0", "-1", "1.5", "nan", "inf", "1e-3", "", "abc", "checkpoints", ".", "RUN", "RUN/checkpoints/x", "RUN/adore2"]))


@settings(max_examples=draws(30), deadline=None)
@given(flags=st.dictionaries(st.sampled_from(_ADORE_FLAGS), _ADORE_VALUES, min_size=1, max_size=4))
def test_train_adore_answers_any_flag_values_with_a_message(dense_run, flags, tmp_path_factory):
    """Fuzz: random values for train_adore.py's flags (RUN standing for the trained run) end in argparse's
    usage error, the script's own "error:" line (exit 1), or the start of the distillation -- never a
    traceback, and never a file written into the run's own folders."""
    from selfspan_jax.cli import train_adore

    work = tmp_path_factory.mktemp("fuzz")
    values = {k: v.replace("RUN", str(dense_run)) for k, v in flags.items()}
    values.setdefault("--run", str(dense_run))
    values.setdefault("--out", str(work / "ctl"))
    argv = [a for k, v in values.items() for a in (k, v)]
    before = sorted(str(p) for p in dense_run.rglob("*"))
    # relative --out values land in the scratch folder
    fuzz_cli(train_adore.main, argv, stub=(adore_train, "_distill"), error_code=1, prog="train_adore.py", cwd=work)
    after = sorted(str(p) for p in dense_run.rglob("*") if "adore2" not in str(p) and p.name != ".lock")
    assert [p for p in after if p not in before] == [], argv
