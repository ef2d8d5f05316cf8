"""The Mosaic GPU kernel (backend="mosaic"): oracle equality in the GPU interpreter, lowering for an H100.

The interpreter (`mosaic_interpret`) runs the kernel's TMA copies, barriers
and wgmma on the CPU, about a second per call, so the grid here is small: one
case per claim (block sizes 16-256, GQA groups 1/3/4/8, odd and zero counts,
masks, NaN where no query may look, splits with empty shares), plus a few
hypothesis draws. The lowering tests export the real kernel for cuda against
an abstract H100 and count what a call launches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import draws
from kernel_tools.mosaic_capture import lower_for_h100
from pallas_kernels import block_sparse_decode
from pallas_kernels.backend import BlockSparseParams, on_gpu
from pallas_kernels.block_sparse_decode_mosaic import SMEM_BYTES, mosaic_tiles, smem_bytes
from test_block_sparse_decode import assert_close, attention_np, random_case, visible_np

# On a GPU the same tests run the compiled kernel (tools/gpu/gpu_session.sh mosaic).
BACKEND = "mosaic" if on_gpu() else "mosaic_interpret"


def check(case, seed, **kw):
    rng = np.random.default_rng(seed)
    q, k, v, idx, cnt, mask = random_case(rng, **case)
    out = block_sparse_decode(q, k, v, jnp.asarray(idx), jnp.asarray(cnt), None if mask is None else jnp.asarray(mask),
                              block_size=case["block_size"], backend=BACKEND, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = attention_np(q, k, v, visible_np(idx, cnt, mask, k.shape[1], k.shape[2], case["block_size"]),
                       kw.get("sm_scale"))
    assert_close(out, ref, case["dtype"])
    return out


@pytest.mark.parametrize(
    "block_size, num_heads, kv_heads, head_dim, batch, dtype, per_head, with_mask, k_splits",
    [
        (16, 9, 3, 64, 2, jnp.bfloat16, True, True, 1),  # SmolLM2's G = 3, the smallest block, masked
        (64, 8, 8, 128, 1, jnp.float16, False, True, 1),  # G = 1 (MHA), shared list
        (128, 16, 4, 64, 1, jnp.bfloat16, True, False, 2),  # G = 4, two splits
        (256, 8, 1, 64, 1, jnp.bfloat16, True, True, 1),  # G = 8, 256-token blocks (one wgmma N of 256)
        (32, 32, 4, 64, 3, jnp.bfloat16, True, True, 3),  # B*N = 96: q windows clamped at q's end
        (64, 16, 2, 128, 2, jnp.bfloat16, True, False, 1),  # B*N = 32 < 64: q copied whole
    ],
)
def test_oracle_grid(block_size, num_heads, kv_heads, head_dim, batch, dtype, per_head, with_mask, k_splits):
    case = dict(batch=batch, num_heads=num_heads, kv_heads=kv_heads, seq_len=6 * block_size, head_dim=head_dim,
                block_size=block_size, dtype=dtype, per_head=per_head, with_mask=with_mask)
    check(case, seed=block_size + num_heads, k_splits=k_splits)


def test_sub_tiles_and_odd_counts():
    # block_k < block_size: a 128-token block walked as 2 tiles of 64; counts 0, 1, 3, 5 (odd, empty).
    case = dict(batch=2, num_heads=8, kv_heads=2, seq_len=6 * 128, head_dim=64, block_size=128,
                dtype=jnp.bfloat16, per_head=True, with_mask=True, counts=[[0, 3], [5, 1]])
    check(case, seed=3, params=BlockSparseParams(block_k=64, num_stages=3))


def test_empty_rows_and_splits_are_zero():
    # (0, *): nothing listed; (1, 1): listed blocks all masked. Four splits of lists of <= 4 entries
    # leave splits empty; their partials are never written and must not count.
    rng = np.random.default_rng(5)
    case = dict(batch=2, num_heads=8, kv_heads=2, seq_len=4 * 64, head_dim=64, block_size=64,
                dtype=jnp.bfloat16, per_head=True, with_mask=True)
    q, k, v, idx, _, mask = random_case(rng, **case)
    cnt = np.array([[0, 0], [2, 2]], np.int32)
    idx[1, 0, :2] = [0, 3]
    idx[1, 1, :2] = [1, 2]
    mask[1, 64:192] = False
    for k_splits in (1, 4):
        out = np.asarray(block_sparse_decode(q, k, v, idx, cnt, jnp.asarray(mask), block_size=64, backend=BACKEND,
                                             k_splits=k_splits), np.float32)
        assert np.isfinite(out).all()
        assert (out[0] == 0).all() and (out[1, 4:] == 0).all()
        assert_close(out, attention_np(q, k, v, visible_np(idx, cnt, mask, 2, 256, 64)), jnp.bfloat16)


# NaN keys at masked tokens of listed blocks give NaN scores before the mask replaces them.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_nothing_unselected_reaches_the_output():
    """NaN and ±inf wherever no query may look (unlisted blocks, the blocks padding entries name,
    masked tokens of listed blocks), a stacked cache read at a traced layer, traced lists, a count
    past the list (clamped in the kernel): finite, and equal to the oracle on the visible tokens."""
    rng = np.random.default_rng(8)
    case = dict(batch=2, num_heads=8, kv_heads=2, seq_len=8 * 16, head_dim=64, block_size=16,
                dtype=jnp.bfloat16, per_head=True, with_mask=True, list_len=6)
    q, k, v, idx, cnt, mask = random_case(rng, **case)
    idx = np.stack([[rng.permutation(8)[:6] for _ in range(2)] for _ in range(2)]).astype(np.int32)  # distinct
    cnt[1, 1] = 6
    vis = visible_np(idx, cnt, mask, 2, 128, 16)
    want = attention_np(q, k, v, vis)
    poison = rng.choice([np.nan, np.inf, -np.inf], size=k.shape)
    layers = [jnp.asarray(rng.standard_normal(k.shape), jnp.bfloat16) for _ in range(3)]
    k_all = jnp.stack([layers[0], jnp.asarray(np.where(vis[..., None], np.asarray(k, np.float32), poison), jnp.bfloat16),
                       layers[1]])
    v_all = jnp.stack([layers[2], jnp.asarray(np.where(vis[..., None], np.asarray(v, np.float32), poison), jnp.bfloat16),
                       layers[0]])
    call = jax.jit(lambda layer, c: block_sparse_decode(q, k_all, v_all, jnp.asarray(idx), c, jnp.asarray(mask),
                                                        block_size=16, backend=BACKEND, layer=layer, k_splits=2))
    out = np.asarray(call(jnp.int32(1), jnp.asarray(cnt)), np.float32)
    assert np.isfinite(out).all(), "non-finite output from poisoned invisible positions"
    assert_close(out, want, jnp.bfloat16)
    # Under jit a count past the list is clamped to the list (every entry live), never read past it.
    over = cnt.copy()
    over[0, 0] = 99
    clamped = cnt.copy()
    clamped[0, 0] = 6
    k_clean = jnp.stack([layers[0], k, layers[1]])
    v_clean = jnp.stack([layers[2], v, layers[0]])
    out = jax.jit(lambda c: block_sparse_decode(q, k_clean, v_clean, jnp.asarray(idx), c, jnp.asarray(mask),
                                                 block_size=16, backend=BACKEND, layer=1))(jnp.asarray(over))
    assert_close(out, attention_np(q, k, v, visible_np(idx, clamped, mask, 2, 128, 16)), jnp.bfloat16)


def test_structured():
    # about a second a draw in the interpreter: 6 in CI, SELFSPAN_DRAWS=N for a longer run
    @settings(max_examples=draws(6), deadline=None)
    @given(st.data())
    def run(data):
        kv_heads = data.draw(st.sampled_from([1, 2, 3]), "kv_heads")
        group = data.draw(st.sampled_from([1, 2, 3, 4, 8]), "group")
        block_size = data.draw(st.sampled_from([16, 32, 48, 64]), "block_size")
        num_blocks = data.draw(st.integers(1, 6), "num_blocks")
        case = dict(batch=data.draw(st.integers(1, 3), "batch"), num_heads=kv_heads * group, kv_heads=kv_heads,
                    seq_len=num_blocks * block_size, head_dim=data.draw(st.sampled_from([64, 128]), "head_dim"),
                    block_size=block_size, per_head=data.draw(st.booleans(), "per_head"),
                    with_mask=data.draw(st.booleans(), "mask"), list_len=data.draw(st.integers(1, num_blocks + 2)),
                    dtype=data.draw(st.sampled_from([jnp.bfloat16, jnp.float16]), "dtype"))
        check(case, seed=data.draw(st.integers(0, 2**31 - 1), "seed"), k_splits=data.draw(st.integers(1, 3)))

    run()


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(dtype=jnp.float32), "16-bit"),
        (dict(head_dim=32), "head dim H=32"),
        (dict(block_size=8, seq_len=64), "block_size=8"),
    ],
)
def test_refuses_what_it_cannot_run(over, match):
    case = dict(batch=1, num_heads=2, kv_heads=1, seq_len=128, head_dim=64, block_size=16, dtype=jnp.bfloat16)
    case.update(over)
    q, k, v, idx, cnt, _ = random_case(np.random.default_rng(0), **case)
    with pytest.raises(ValueError, match=match):
        block_sparse_decode(q, k, v, idx, cnt, block_size=case["block_size"], backend="mosaic")


def test_tiles():
    # Two K+V stages of the largest power-of-two tile that divides the block fit 128 KiB; small
    # tiles get up to 4 stages; at H = 256 the other tiles leave less room (bk 32, 3 stages).
    assert mosaic_tiles(block_size=256, head_dim=128, itemsize=2, params=BlockSparseParams()) == (128, 2)
    assert mosaic_tiles(block_size=256, head_dim=64, itemsize=2, params=BlockSparseParams()) == (256, 2)
    assert mosaic_tiles(block_size=16, head_dim=64, itemsize=2, params=BlockSparseParams()) == (16, 4)
    assert mosaic_tiles(block_size=48, head_dim=128, itemsize=2, params=BlockSparseParams()) == (16, 4)
    assert mosaic_tiles(block_size=256, head_dim=256, itemsize=2, params=BlockSparseParams()) == (32, 3)
    # every shape the kernel accepts fits one block's shared memory
    for head_dim in (64, 128, 192, 256):
        for block_size in range(16, 513, 16):
            bk, st = mosaic_tiles(block_size=block_size, head_dim=head_dim, itemsize=2, params=BlockSparseParams())
            assert smem_bytes(block_k=bk, stages=st, head_dim=head_dim, itemsize=2) <= SMEM_BYTES
    with pytest.raises(ValueError, match="KiB of shared memory at H=256"):
        mosaic_tiles(block_size=256, head_dim=256, itemsize=2, params=BlockSparseParams(block_k=128, num_stages=3))
    with pytest.raises(ValueError, match="block_k=32"):
        mosaic_tiles(block_size=48, head_dim=64, itemsize=2, params=BlockSparseParams(block_k=32))
    with pytest.raises(ValueError, match="do not apply to the Mosaic kernel"):
        mosaic_tiles(block_size=64, head_dim=64, itemsize=2, params=BlockSparseParams(block_h=16))


# ---------------------------------------------------------------------------
# Lowering for an H100 (no GPU needed)
# ---------------------------------------------------------------------------
def _avals(batch, num_heads, kv_heads, seq_len, head_dim, block_size, *, layers=4, per_head=True, mask=False,
           dtype=jnp.bfloat16):
    lead = (batch, kv_heads) if per_head else (batch,)
    avals = [jax.ShapeDtypeStruct((batch, num_heads, head_dim), dtype),
             jax.ShapeDtypeStruct((layers, batch, kv_heads, seq_len, head_dim), dtype),
             jax.ShapeDtypeStruct((layers, batch, kv_heads, seq_len, head_dim), dtype),
             jax.ShapeDtypeStruct((*lead, seq_len // block_size), jnp.int32),
             jax.ShapeDtypeStruct(lead, jnp.int32),
             jax.ShapeDtypeStruct((), jnp.int32)]
    if mask:
        avals.append(jax.ShapeDtypeStruct((batch, seq_len), jnp.bool_))
    return avals


def _lower(block_size, k_splits, *avals):
    def fn(q, k, v, idx, cnt, layer, *mask):
        return block_sparse_decode(q, k, v, idx, cnt, *mask, block_size=block_size, backend="mosaic",
                                   k_splits=k_splits, layer=layer)

    return lower_for_h100(fn, *avals)


@pytest.mark.parametrize(
    "batch, num_heads, kv_heads, head_dim, block_size, seq_len, per_head, mask, other",
    [
        # One split (B*K fills the SMs), q at least 64 rows: the kernel alone, nothing around it.
        (8, 32, 32, 128, 64, 8192, False, False, ()),  # LLaMA-7B MHA, shared list
        (8, 32, 8, 128, 256, 32768, True, False, ()),  # GQA 32q/8kv, 256-token blocks
        (8, 16, 4, 256, 256, 4096, True, False, ()),  # H = 256: block_k 32, 3 stages (SMEM)
        # A token mask: its bool -> int8 conversion is the one op beside the kernel.
        (8, 32, 8, 128, 64, 8192, True, True, ("stablehlo.convert",)),
        # Batch 1 at 7B widths: 32 query rows, copied whole into a zeroed 64-row tile, no pad.
        (1, 32, 8, 128, 64, 8192, True, False, ()),
        # SmolLM2 at batch 1: 9 query rows, padded to 16 (whole SMEM tiles of 8 rows).
        (1, 9, 3, 64, 16, 4096, True, False, ("stablehlo.convert", "stablehlo.pad")),
    ],
)
def test_one_launch_per_call(batch, num_heads, kv_heads, head_dim, block_size, seq_len, per_head, mask, other):
    lowered = _lower(block_size, 1, *_avals(batch, num_heads, kv_heads, seq_len, head_dim, block_size,
                                            per_head=per_head, mask=mask))
    assert lowered.mosaic_calls == 1
    assert lowered.serialized_bytes > 10_000  # the serialized Mosaic module is in the call
    assert lowered.other_ops == other


def test_splits_add_only_the_combine():
    # GQA at batch 1 over 32k tokens: 16 splits per (b, h); after the kernel only the combine (no
    # clamp, broadcast or pad before it).
    lowered = _lower(64, 16, *_avals(1, 32, 8, 32768, 128, 64))
    assert lowered.mosaic_calls == 1
    text = lowered.text
    before = text[:text.index("@mosaic_gpu_v2")]
    assert not any(op in before for op in ("stablehlo.clamp", "stablehlo.broadcast", "stablehlo.pad", "stablehlo.maximum"))
    assert "stablehlo.exponential" in lowered.other_ops and "stablehlo.divide" in lowered.other_ops


def test_decode_loop_runs_the_kernel():
    """generate(kernel=KernelOptions(backend="mosaic_interpret")): a bf16 model under Quest (per-KV-head
    block lists and a causal token mask every step), teacher-forced on the XLA path's tokens (a random
    bf16 model has near-ties that either path may break), gives the XLA path's log-probs."""
    from flax import nnx

    from selfspan_jax.config import LlamaConfig
    from selfspan_jax.generation import KernelOptions, Outputs, generate
    from selfspan_jax.model import Llama
    from selfspan_jax.sampling import Sampling

    seed = int(np.random.default_rng().integers(1 << 30))
    cfg = LlamaConfig(vocab_size=40, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64, max_seq_len=128,
                      dtype="bfloat16", param_dtype="bfloat16")
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 40, n).tolist() for n in (37, 20)]
    kw = dict(policy="quest(page_budget=2)", max_new_tokens=5, block_size=16, outputs=Outputs(logprobs=True),
              eos_id=-1, pad_id=0)
    xla = generate(model, prompts, kernel=KernelOptions(backend="xla"), **kw)
    mosaic = generate(model, prompts, kernel=KernelOptions(backend=BACKEND),
                      sampling=Sampling(forced_tokens=np.asarray(xla.tokens)), **kw)
    np.testing.assert_array_equal(mosaic.tokens, xla.tokens)
    # bf16 activations: the two paths round differently (observed max 0.015)
    np.testing.assert_allclose(mosaic.logprobs, xla.logprobs, atol=0.06)


def test_interpreter_refuses_a_mesh_of_several_devices():
    # jax's GPU interpreter simulates one GPU per process: two shards interpreting at once collide
    # (observed: "Barrier remains allocated"), so generate refuses the pair by name.
    from selfspan_jax.generation import _check_mesh

    mesh = jax.sharding.AbstractMesh((2,), ("data",))
    with pytest.raises(ValueError, match="mosaic_interpret.*one device only"):
        _check_mesh(mesh, 4, None, False, "mosaic_interpret")
    _check_mesh(mesh, 4, None, False, "mosaic")
    _check_mesh(jax.sharding.AbstractMesh((1,), ("data",)), 4, None, False, "mosaic_interpret")
