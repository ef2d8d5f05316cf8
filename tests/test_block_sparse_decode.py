"""block_sparse_decode on every backend against a float64 NumPy oracle.

One base class holds the checks; one subclass per backend runs them
(interpret and xla and reference everywhere, the Triton kernel only on a GPU).
Inputs are fresh random draws; hypothesis picks the structured parts (shapes,
block lists, counts, masks).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import block_sparse_decode, block_sparse_decode_reference
from pallas_kernels.backend import BlockSparseParams, on_gpu, resolve_backend
from pallas_kernels.block_sparse_decode_xla import block_sparse_decode_xla, step_shape

# Bounds on max |out - ref| for outputs of magnitude <= ~3 (v ~ N(0, 1)).
# float32 at full precision: a few ulps of accumulation. bfloat16: the output
# is rounded to bf16 (2^-9 relative) and the probabilities enter the p @ v dot
# as bf16, as they do on the GPU's mma.
# Observed on CPU (8 cases, H=128, 512 tokens): float32 2.3e-6 / 9e-7,
# bfloat16 4.7e-3 / 2.2e-3 (max abs / relative norm); bounds are 2-5x that.
# float16 keeps 3 more mantissa bits than bfloat16: 8x tighter.
ATOL = {jnp.float32: 1e-5, jnp.bfloat16: 1.2e-2, jnp.float16: 1.5e-3}
# Same bound on ||out - ref|| / ||ref||.
RTOL_NORM = {jnp.float32: 5e-6, jnp.bfloat16: 4e-3, jnp.float16: 5e-4}


# ---------------------------------------------------------------------------
# float64 oracle and input builders
# ---------------------------------------------------------------------------
def visible_np(block_indices, block_counts, token_mask, kv_heads, seq_len, block_size):
    """bool [B, K, S]: tokens in the live blocks of each (b, k), AND token_mask."""
    idx = np.asarray(block_indices)
    cnt = np.asarray(block_counts)
    batch = idx.shape[0]
    idx = np.broadcast_to(idx[:, None, :], (batch, kv_heads, idx.shape[-1])) if idx.ndim == 2 else idx
    cnt = np.broadcast_to(cnt[:, None], (batch, kv_heads)) if cnt.ndim == 1 else cnt
    vis = np.zeros((batch, kv_heads, seq_len), bool)
    for b in range(batch):
        for h in range(kv_heads):
            for j in range(cnt[b, h]):
                blk = idx[b, h, j]
                vis[b, h, blk * block_size : (blk + 1) * block_size] = True
    if token_mask is not None:
        vis &= np.asarray(token_mask)[:, None, :]
    return vis


def attention_np(q, k, v, vis, sm_scale=None, weight=None):
    """float64 masked attention: q [B,N,H], k/v [B,K,S,H], vis [B,K,S] -> [B,N,H]; empty rows 0.
    weight: optional [B,K,S] multiplicity of each token (a block listed twice)."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    batch, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    scale = 1 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    qg = q.reshape(batch, kv_heads, num_heads // kv_heads, head_dim)
    s = np.einsum("bkgh,bksh->bkgs", qg, k) * scale
    s = np.where(vis[:, :, None, :], s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m)
    if weight is not None:
        p = p * np.asarray(weight)[:, :, None, :]
    l = p.sum(-1, keepdims=True)
    out = np.einsum("bkgs,bksh->bkgh", p / np.where(l > 0, l, 1.0), v)
    return out.reshape(batch, num_heads, head_dim)


def random_case(rng, *, batch, num_heads, kv_heads, seq_len, head_dim, block_size, dtype,
                per_head=False, with_mask=False, list_len=None, counts=None):
    """Fresh random q, k, v, duplicate-free unsorted block lists (junk after the counts), counts, mask."""
    num_blocks = seq_len // block_size
    list_len = num_blocks if list_len is None else list_len
    q = jnp.asarray(rng.standard_normal((batch, num_heads, head_dim)), dtype)
    # Scores of order 1-3 so the softmax is neither flat nor one-hot.
    k = jnp.asarray(rng.standard_normal((batch, kv_heads, seq_len, head_dim)) * 1.5, dtype)
    v = jnp.asarray(rng.standard_normal((batch, kv_heads, seq_len, head_dim)), dtype)
    lead = (batch, kv_heads) if per_head else (batch,)
    rows = []
    for _ in range(int(np.prod(lead))):
        perm = rng.permutation(num_blocks)[:list_len]
        # Entries past the live count are padding: fill with junk the op must ignore.
        pad = rng.integers(0, num_blocks, max(0, list_len - num_blocks))
        rows.append(np.concatenate([perm, pad]))
    idx = np.asarray(rows, np.int32).reshape(*lead, list_len)
    if counts is None:
        counts = rng.integers(0, min(list_len, num_blocks) + 1, lead)
    counts = np.broadcast_to(np.asarray(counts, np.int32), lead).copy()
    for pos in np.ndindex(*lead):  # junk after the live entries
        idx[pos][counts[pos]:] = rng.integers(0, num_blocks, list_len - counts[pos])
    mask = rng.random((batch, seq_len)) < 0.7 if with_mask else None
    return q, k, v, idx, counts, mask


def assert_close(out, ref, dtype):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    assert np.isfinite(out).all(), "non-finite output"
    err = np.abs(out - ref).max()
    assert err <= ATOL[dtype], f"max abs err {err:.3g} > {ATOL[dtype]}"
    norm = np.linalg.norm(ref)
    if norm > 0:
        rel = np.linalg.norm(out - ref) / norm
        assert rel <= RTOL_NORM[dtype], f"relative norm err {rel:.3g} > {RTOL_NORM[dtype]}"


@st.composite
def structured_cases(draw, max_seq_len=256):
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([1, 2, 4, 8]))
    block_size = draw(st.sampled_from([16, 32, 64]))
    num_blocks = draw(st.integers(1, max_seq_len // block_size))
    return dict(
        batch=draw(st.integers(1, 3)),
        num_heads=kv_heads * group,
        kv_heads=kv_heads,
        seq_len=num_blocks * block_size,
        head_dim=draw(st.sampled_from([16, 32, 64, 128])),
        block_size=block_size,
        per_head=draw(st.booleans()),
        with_mask=draw(st.booleans()),
        # Lists may be shorter than the cache (a truncated list) or padded past it.
        list_len=draw(st.integers(1, num_blocks + 2)),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# ---------------------------------------------------------------------------
# One base class, one subclass per backend
# ---------------------------------------------------------------------------
class _BackendTests:
    backend: str
    hypothesis_examples = 10

    def call(self, q, k, v, idx, cnt, mask=None, *, block_size, **kw):
        if q.dtype == jnp.float32:
            kw.setdefault("precision", "highest")  # else a GPU runs float32 dots as tf32
        return block_sparse_decode(q, k, v, idx, cnt, mask, block_size=block_size, backend=self.backend, **kw)

    def check(self, rng_case_kwargs, seed, **call_kw):
        rng = np.random.default_rng(seed)
        dtype = rng_case_kwargs["dtype"]
        q, k, v, idx, cnt, mask = random_case(rng, **rng_case_kwargs)
        out = self.call(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), None if mask is None else jnp.asarray(mask),
                        block_size=rng_case_kwargs["block_size"], **call_kw)
        assert out.shape == q.shape and out.dtype == q.dtype
        vis = visible_np(idx, cnt, mask, k.shape[1], k.shape[2], rng_case_kwargs["block_size"])
        ref = attention_np(q, k, v, vis, call_kw.get("sm_scale"))
        assert_close(out, ref, dtype)
        return out, vis

    # The other (per_head, with_mask) pairs come up in test_structured.
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    @pytest.mark.parametrize("per_head, with_mask", [(False, False), (True, True)])
    def test_random_lists(self, dtype, per_head, with_mask):
        case = dict(batch=2, num_heads=8, kv_heads=2, seq_len=256, head_dim=64, block_size=32,
                    dtype=dtype, per_head=per_head, with_mask=with_mask)
        for seed in range(3):
            self.check(case, seed=seed + 100 * per_head + 10 * with_mask)

    def test_structured(self):
        @settings(max_examples=self.hypothesis_examples, deadline=None)
        @given(structured_cases())
        def run(case):
            seed = case.pop("seed")
            self.check(case, seed=seed)

        run()

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_all_blocks_equals_dense(self, dtype):
        # Every block live, in shuffled order: must equal dense attention.
        rng = np.random.default_rng(7)
        case = dict(batch=2, num_heads=8, kv_heads=4, seq_len=192, head_dim=64, block_size=64, dtype=dtype, counts=3)
        q, k, v, idx, cnt, _ = random_case(rng, **case)
        out = self.call(q, k, v, idx, cnt, block_size=64)
        ref = attention_np(q, k, v, np.ones((2, 4, 192), bool))
        assert_close(out, ref, dtype)

    @pytest.mark.parametrize("counts", [[0, 3], [1, 1]])
    def test_one_block_to_all(self, counts):
        # Densities from a single block to all blocks, on a per-head list.
        case = dict(batch=1, num_heads=4, kv_heads=2, seq_len=96, head_dim=32, block_size=32,
                    dtype=jnp.float32, per_head=True, counts=[counts])
        self.check(case, seed=sum(counts))

    def test_empty_rows_are_zero(self):
        # Row 0: no live blocks. Row 1 head 1: live blocks whose tokens are all
        # masked out. Neither may produce NaN or the mean of v.
        rng = np.random.default_rng(3)
        case = dict(batch=2, num_heads=4, kv_heads=2, seq_len=128, head_dim=32, block_size=32,
                    dtype=jnp.float32, per_head=True, with_mask=True)
        q, k, v, idx, _, mask = random_case(rng, **case)
        cnt = np.array([[0, 0], [2, 2]], np.int32)
        idx[1, 0, :2] = [0, 3]
        idx[1, 1, :2] = [1, 2]
        mask[1, 32:96] = False
        out = np.asarray(self.call(q, k, v, idx, cnt, mask, block_size=32))
        assert np.isfinite(out).all()
        assert (out[0] == 0).all()
        assert (out[1, 2:] == 0).all()  # query heads 2, 3 belong to KV head 1
        ref = attention_np(q, k, v, visible_np(idx, cnt, mask, 2, 128, 32))
        assert np.abs(ref[1, :2]).max() > 0.05
        assert_close(out, ref, jnp.float32)

    def test_mask_cuts_inside_blocks(self):
        # A mask keeping one token per block: the result is a softmax over those tokens.
        rng = np.random.default_rng(11)
        case = dict(batch=1, num_heads=2, kv_heads=1, seq_len=128, head_dim=32, block_size=32,
                    dtype=jnp.float32, counts=[3])
        q, k, v, idx, cnt, _ = random_case(rng, **case)
        mask = np.zeros((1, 128), bool)
        mask[0, 5::32] = True
        out = self.call(q, k, v, idx, cnt, mask, block_size=32)
        assert_close(out, attention_np(q, k, v, visible_np(idx, cnt, mask, 1, 128, 32)), jnp.float32)

    def test_custom_scale_and_jit(self):
        # Traced lists inside jit (the decode loop's situation), custom sm_scale.
        rng = np.random.default_rng(5)
        case = dict(batch=3, num_heads=4, kv_heads=1, seq_len=128, head_dim=64, block_size=16,
                    dtype=jnp.bfloat16, with_mask=True)
        q, k, v, idx, cnt, mask = random_case(rng, **case)
        fn = jax.jit(lambda *a: self.call(*a, block_size=16, sm_scale=0.3))
        out = fn(q, k, v, idx, cnt, mask)
        assert_close(out, attention_np(q, k, v, visible_np(idx, cnt, mask, 1, 128, 16), 0.3), jnp.bfloat16)

    def test_nothing_unselected_reaches_the_output(self):
        """The contract, fuzzed on every backend (issue 14): random lists with junk padding, a live
        block listed twice (under jit: counted once per listing), NaN and ±inf planted in K and V
        wherever no query may look (blocks not listed, the blocks padding entries name, masked
        tokens of listed blocks). The output is finite and equals the float64 oracle computed on
        the visible entries only."""

        @settings(max_examples=5, deadline=None)
        @given(st.integers(0, 2**31 - 1), st.booleans(), st.booleans(), st.booleans())
        def run(seed, per_head, with_mask, repeat):
            rng = np.random.default_rng(seed)
            case = dict(batch=2, num_heads=4, kv_heads=2, seq_len=8 * 16, head_dim=16, block_size=16,
                        dtype=jnp.float32, per_head=per_head, with_mask=with_mask)
            q, k, v, idx, cnt, mask = random_case(rng, **case)
            if repeat:  # list a live block a second time, in the first padding slot
                for pos in np.ndindex(*cnt.shape):
                    if 0 < cnt[pos] < idx.shape[-1]:
                        idx[pos][cnt[pos]] = idx[pos][rng.integers(cnt[pos])]
                        cnt[pos] += 1
            times = np.zeros((2, 2, 128))
            full_idx = idx if idx.ndim == 3 else np.broadcast_to(idx[:, None], (2, 2, idx.shape[-1]))
            full_cnt = cnt if cnt.ndim == 2 else np.broadcast_to(cnt[:, None], (2, 2))
            for b, h in np.ndindex(2, 2):
                for blk in full_idx[b, h, : full_cnt[b, h]]:
                    times[b, h, blk * 16:(blk + 1) * 16] += 1
            vis = (times > 0) & (np.asarray(mask)[:, None, :] if mask is not None else True)
            want = attention_np(q, k, v, vis, weight=times)
            poison = rng.choice([np.nan, np.inf, -np.inf], size=k.shape)
            k_bad = jnp.asarray(np.where(vis[..., None], np.asarray(k), poison).astype(np.float32))
            v_bad = jnp.asarray(np.where(vis[..., None], np.asarray(v), poison).astype(np.float32))
            call = jax.jit(lambda *a: self.call(*a, block_size=16))  # jit: repeats are not refused
            out = np.asarray(call(q, k_bad, v_bad, idx, cnt, mask) if mask is not None else
                             call(q, k_bad, v_bad, idx, cnt))
            assert np.isfinite(out).all(), f"non-finite output from poisoned invisible positions ({self.backend})"
            assert_close(out, want, jnp.float32)

        run()

    def test_repeated_blocks(self):
        # Eager calls refuse a block listed twice among the live entries (padding may repeat)...
        rng = np.random.default_rng(12)
        case = dict(batch=1, num_heads=2, kv_heads=1, seq_len=64, head_dim=16, block_size=16, dtype=jnp.float32)
        q, k, v, _, _, _ = random_case(rng, **case)
        idx = np.array([[2, 0, 2, 1]], np.int32)
        with pytest.raises(ValueError, match=r"block\(s\) \[2\] more than once"):
            self.call(q, k, v, idx, np.array([3], np.int32), block_size=16)
        self.call(q, k, v, idx, np.array([2], np.int32), block_size=16)  # the repeat is padding: fine
        # ...and under jit every backend counts it once per listing: block 2 weighs twice.
        out = jax.jit(lambda i, c: self.call(q, k, v, i, c, block_size=16))(idx, np.array([3], np.int32))
        weight = np.zeros((1, 1, 64))
        weight[..., 0:16] = 1
        weight[..., 32:48] = 2
        assert_close(out, attention_np(q, k, v, weight > 0, weight=weight), jnp.float32)

    def test_traced_bad_counts_are_clamped(self):
        # Under jit no value check can run: a count past the list must not read
        # outside the cache; it behaves as "all entries live".
        rng = np.random.default_rng(9)
        case = dict(batch=1, num_heads=2, kv_heads=2, seq_len=64, head_dim=32, block_size=32, dtype=jnp.float32,
                    counts=2)
        q, k, v, idx, _, _ = random_case(rng, **case)
        out = jax.jit(lambda c: self.call(q, k, v, idx, c, block_size=32))(jnp.array([7], jnp.int32))
        assert_close(out, attention_np(q, k, v, np.ones((1, 2, 64), bool)), jnp.float32)


    @pytest.mark.parametrize("per_head, with_mask, dtype", [(False, True, jnp.float32), (True, False, jnp.bfloat16)])
    def test_stacked_layer_equals_slice(self, per_head, with_mask, dtype):
        # layer= reads one layer of a stacked cache in place; it must equal the
        # op on that layer's slice, for an eager int layer and a traced one.
        rng = np.random.default_rng()
        num_layers = int(rng.integers(2, 5))
        layer = int(rng.integers(0, num_layers))
        case = dict(batch=2, num_heads=4, kv_heads=2, seq_len=128, head_dim=32, block_size=32, dtype=dtype,
                    per_head=per_head, with_mask=with_mask)
        q, k, v, idx, cnt, mask = random_case(rng, **case)
        # [NL, B, K, S, H]: fresh random layers around the one under test
        k_all = jnp.asarray(rng.standard_normal((num_layers, *k.shape)) * 1.5, dtype).at[layer].set(k)
        v_all = jnp.asarray(rng.standard_normal((num_layers, *v.shape)), dtype).at[layer].set(v)
        mask = None if mask is None else jnp.asarray(mask)
        sliced = self.call(q, k, v, idx, cnt, mask, block_size=32)
        stacked = self.call(q, k_all, v_all, idx, cnt, mask, block_size=32, layer=layer)
        traced = jax.jit(lambda i: self.call(q, k_all, v_all, idx, cnt, mask, block_size=32, layer=i))(
            jnp.int32(layer))
        ref = attention_np(q, k, v, visible_np(idx, cnt, None if mask is None else np.asarray(mask), 2, 128, 32))
        for out in (stacked, traced):
            assert out.shape == q.shape and out.dtype == q.dtype
            assert_close(out, ref, dtype)
            # same blocks read in the same order: equal to the slice up to reassociation
            np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(sliced, np.float32),
                                       atol=ATOL[dtype] / 4, rtol=0)


class TestReference(_BackendTests):
    backend = "reference"

    def test_reference_function(self):
        rng = np.random.default_rng(21)
        case = dict(batch=2, num_heads=4, kv_heads=2, seq_len=64, head_dim=16, block_size=16,
                    dtype=jnp.float32, with_mask=True)
        q, k, v, idx, cnt, mask = random_case(rng, **case)
        out = block_sparse_decode_reference(q, k, v, idx, cnt, mask, block_size=16)
        assert_close(out, attention_np(q, k, v, visible_np(idx, cnt, mask, 2, 64, 16)), jnp.float32)


class TestXla(_BackendTests):
    backend = "xla"

    @pytest.mark.parametrize("tile, chunk", [(16, 1), (16, 3), (16, 4), (8, 1), (4, 3)])
    def test_step_shapes(self, tile, chunk):
        # Whole blocks several per step, and blocks cut into sub-block rows;
        # lists whose row count is not a multiple of the chunk, ragged
        # per-head counts, a token mask: padding rows must never count.
        rng = np.random.default_rng(tile + chunk)
        case = dict(batch=2, num_heads=4, kv_heads=2, seq_len=11 * 16, head_dim=16, block_size=16,
                    dtype=jnp.float32, per_head=True, with_mask=True, list_len=10, counts=[[10, 4], [7, 0]])
        q, k, v, idx, cnt, mask = random_case(rng, **case)
        out = block_sparse_decode_xla(q.reshape(2, 2, 2, 16), k, v, jnp.asarray(idx), jnp.asarray(cnt),
                                      jnp.asarray(mask), block_size=16, sm_scale=0.25, precision="highest",
                                      tile=tile, chunk=chunk)
        ref = attention_np(q, k, v, visible_np(idx, cnt, mask, 2, 176, 16), 0.25)
        assert_close(np.asarray(out).reshape(2, 4, 16), ref, jnp.float32)

    def test_step_shape(self):
        # 4 MiB of K+V per step: several whole blocks when they are small,
        # sub-block tiles (a divisor of the block) when one block is too big.
        kw = dict(kv_heads=32, head_dim=128, itemsize=4, step_bytes=4 << 20)  # 32 KiB per token of all heads
        assert step_shape(batch=1, block_size=64, **kw) == (64, 2)
        assert step_shape(batch=1, block_size=16, **kw) == (16, 8)
        assert step_shape(batch=4, block_size=256, **kw) == (32, 1)
        assert step_shape(batch=64, block_size=48, **kw) == (2, 1)
        assert step_shape(batch=1, block_size=48, **kw) == (48, 2)


class TestInterpret(_BackendTests):
    backend = "interpret"

    @pytest.mark.parametrize("k_splits", [1, 3, 8])
    def test_k_splits(self, k_splits):
        # More splits than live entries leaves some splits empty; the combine must ignore them.
        case = dict(batch=2, num_heads=4, kv_heads=2, seq_len=160, head_dim=32, block_size=32,
                    dtype=jnp.float32, per_head=True, with_mask=True)
        self.check(case, seed=k_splits, k_splits=k_splits)

    def test_sub_tiles(self):
        # block_k < block_size: each 64-token block walked as 4 tiles of 16.
        case = dict(batch=1, num_heads=16, kv_heads=2, seq_len=256, head_dim=32, block_size=64,
                    dtype=jnp.bfloat16, per_head=True, with_mask=True)
        self.check(case, seed=4, params=BlockSparseParams(block_k=16, k_splits=2))

    def test_gpu_params_and_odd_blocks(self):
        """The kernel as a GPU resolves it (k_splits, block_k and sub-tiles for 132 SMs), or with
        drawn k_splits and block_k; blocks that are not powers of two (48, 192: walked in
        power-of-two sub-tiles); G = 3 as in SmolLM2; float16."""

        @settings(max_examples=8, deadline=None)
        @given(st.data())
        def run(data):
            group = data.draw(st.sampled_from([1, 3, 4, 8]), "group")
            kv_heads = data.draw(st.sampled_from([1, 2]), "kv_heads")
            block_size = data.draw(st.sampled_from([16, 48, 64, 192]), "block_size")
            dtype = data.draw(st.sampled_from([jnp.float16, jnp.bfloat16, jnp.float32]), "dtype")
            num_blocks = data.draw(st.integers(1, 6), "num_blocks")
            case = dict(batch=data.draw(st.integers(1, 2), "batch"), num_heads=kv_heads * group, kv_heads=kv_heads,
                        seq_len=num_blocks * block_size, head_dim=32, block_size=block_size, dtype=dtype,
                        per_head=data.draw(st.booleans(), "per_head"), with_mask=data.draw(st.booleans(), "mask"))
            if data.draw(st.booleans(), "as on an H100"):
                params = BlockSparseParams().resolve(
                    group_size=group, batch=case["batch"], kv_heads=kv_heads, list_len=num_blocks,
                    block_size=block_size, head_dim=32, itemsize=jnp.dtype(dtype).itemsize, num_cores=132)
            else:
                divisors = [t for t in (16, 32, 64, 128) if block_size % t == 0]
                params = BlockSparseParams(block_k=data.draw(st.sampled_from(divisors), "block_k"),
                                           k_splits=data.draw(st.integers(1, 8), "k_splits"))
            self.check(case, seed=data.draw(st.integers(0, 2**31 - 1), "seed"), params=params)

        run()

    def test_wide_block_h(self):
        # G = 20 query heads per KV head: two rows-of-16 worth of padding to 32.
        case = dict(batch=1, num_heads=40, kv_heads=2, seq_len=64, head_dim=16, block_size=16, dtype=jnp.float32)
        self.check(case, seed=8)


@pytest.mark.skipif(not on_gpu(), reason="the Triton backend needs a GPU; CI proves lowering and the sm_90 compile (test_kernel_lowering.py, test_kernel_sm90.py)")
class TestPallas(TestInterpret):
    backend = "pallas"
    hypothesis_examples = 40

    @pytest.mark.parametrize("block_size", [16, 64, 128, 256])
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_block_sizes_head_dims(self, block_size, dtype):
        for head_dim in (64, 128):
            case = dict(batch=2, num_heads=32, kv_heads=8, seq_len=8 * block_size, head_dim=head_dim,
                        block_size=block_size, dtype=dtype, per_head=True, with_mask=True)
            self.check(case, seed=block_size + head_dim)

    def test_default_precision_is_tf32_close(self):
        # Without precision="highest" float32 dots run as tf32: ~1e-3 relative. (conftest.py sets the
        # suite to "highest" on a GPU; the user's default is restored here.)
        rng = np.random.default_rng(31)
        case = dict(batch=2, num_heads=8, kv_heads=2, seq_len=256, head_dim=64, block_size=32, dtype=jnp.float32)
        q, k, v, idx, cnt, _ = random_case(rng, **case)
        with jax.default_matmul_precision("default"):
            out = np.asarray(block_sparse_decode(q, k, v, idx, cnt, block_size=32, backend="pallas"), np.float64)
        ref = attention_np(q, k, v, visible_np(idx, cnt, None, 2, 256, 32))
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 3e-3


# ---------------------------------------------------------------------------
# Argument validation (backend independent)
# ---------------------------------------------------------------------------
class TestValidation:
    def setup_method(self):
        self.q = jnp.zeros((2, 4, 16), jnp.float32)
        self.k = jnp.zeros((2, 2, 64, 16), jnp.float32)
        self.idx = np.zeros((2, 4), np.int32)
        self.cnt = np.ones((2,), np.int32)

    def call(self, **over):
        a = dict(q=self.q, k=self.k, v=self.k, block_indices=self.idx, block_counts=self.cnt, token_mask=None,
                 block_size=16, backend="reference")
        a.update(over)
        return block_sparse_decode(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("block_indices"), a.pop("block_counts"),
                                   a.pop("token_mask"), **a)

    @pytest.mark.parametrize(
        "over, match",
        [
            (dict(q=jnp.zeros((2, 3, 16))), "N=3"),
            (dict(block_size=24), "block_size=24"),
            (dict(block_size=8, backend="interpret"), "block_size=8"),
            (dict(block_indices=np.zeros((3, 4), np.int32)), "block_indices shape"),
            (dict(block_indices=np.zeros((2, 3, 4), np.int32)), "block_indices shape"),
            (dict(block_indices=np.zeros((2, 4), np.float32)), "block_indices dtype"),
            (dict(block_counts=np.ones((2, 3), np.int32)), "block_counts shape"),
            (dict(block_counts=np.array([1, 5], np.int32)), "block_counts"),
            (dict(block_counts=np.array([-1, 1], np.int32)), "block_counts"),
            (dict(block_indices=np.array([[4, 0, 0, 0], [0, 0, 0, 0]], np.int32)), "outside"),
            (dict(token_mask=np.ones((2, 64), np.int32)), "token_mask dtype"),
            (dict(token_mask=np.ones((2, 32), bool)), "token_mask shape"),
            (dict(v=jnp.zeros((2, 2, 64, 16), jnp.bfloat16)), "dtypes differ"),
            (dict(q=jnp.zeros((2, 4, 8))), "k shape"),
            (dict(backend="cuda"), "backend"),
            (dict(precision="fast"), "precision"),
            (dict(layer=0), "stacked cache"),
            (dict(k=jnp.zeros((3, 2, 2, 64, 16)), v=jnp.zeros((3, 2, 2, 64, 16)), layer=3), "layer=3"),
            (dict(k=jnp.zeros((3, 2, 2, 64, 16)), v=jnp.zeros((3, 2, 2, 64, 16)), layer=-1), "layer=-1"),
            (dict(k=jnp.zeros((3, 2, 2, 64, 16)), v=jnp.zeros((3, 2, 2, 64, 16)), layer=1.5), "layer must be"),
            (dict(k=jnp.zeros((3, 2, 2, 64, 16)), v=jnp.zeros((2, 2, 2, 64, 16)), layer=1), "v shape"),
            (dict(k=jnp.zeros((3, 2, 2, 64, 16)), v=jnp.zeros((3, 2, 2, 64, 16)), layer=1,
                  q=jnp.zeros((2, 4, 8))), "k shape"),
        ],
    )
    def test_raises(self, over, match):
        with pytest.raises(ValueError, match=match):
            self.call(**over)

    def test_padding_after_count_is_not_checked(self):
        # Junk past the live count is legal (padding).
        idx = np.array([[1, 99, -5, 7], [0, 1, 2, 3]], np.int32)
        out = self.call(block_indices=idx, block_counts=np.array([1, 4], np.int32))
        assert out.shape == (2, 4, 16)

    def test_auto_backend(self):
        assert resolve_backend("auto") == ("pallas" if on_gpu() else "xla")

    def test_params_validation(self):
        with pytest.raises(ValueError, match="block_h"):
            BlockSparseParams(block_h=24)
        with pytest.raises(ValueError, match="power of two"):
            BlockSparseParams(block_h=48)  # a multiple of 16, but not a Triton tile
        with pytest.raises(ValueError, match="k_splits"):
            BlockSparseParams(k_splits=0)
        with pytest.raises(ValueError, match="block_k"):
            BlockSparseParams(block_k=48).resolve(group_size=1, batch=1, kv_heads=1, list_len=4, block_size=64,
                                                   head_dim=64, itemsize=2, num_cores=132)
