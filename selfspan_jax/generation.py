"""`generate`: the host API of decoding with a pluggable attention policy (self-selected spans, dense, ...).

Organised as gemma's sampler is: this module is the host side (prompts to a
padded batch, argument checks, the options `Outputs` and `KernelOptions`,
frozen and checked when built); the jitted loop with its documented state and
named prefill/step functions is `decode_loop`; the sampling methods are
`sampling`; the result, as numpy, is `generate_output.GenerateOutput`. One
compiled program per shape bucket does all the decoding on device.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.backend import resolve_backend
from selfspan_jax import decode_loop
from selfspan_jax.policies import Policy, make_policy
from selfspan_jax.generate_output import GenerateOutput
from selfspan_jax.sampling import Sampling
from selfspan_jax.tokenizer import encode_prompt


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _prepare_prompts(prompts, tokenizer) -> list[list[int]]:
    """Normalises prompts to a list of id lists. One flat sequence of ids is one prompt, as a 1-D
    array is; each prompt is a string or a 1-D sequence of integer ids (no floats, no deeper nesting)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(_is_int(x) for x in prompts):
        prompts = np.asarray(prompts)
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token-array prompts must be integer [B, T], got dtype {arr.dtype} shape {arr.shape}")
        if arr.size == 0:
            raise ValueError(f"token-array prompts are empty (shape {arr.shape}); each prompt needs >= 1 token")
        return arr.tolist()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("string prompts need a tokenizer")
            # The same ids training saw for this text (one BOS, never doubled)
            out.append(encode_prompt(tokenizer, p))
            continue
        arr = np.asarray(p)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise ValueError(f"prompt {i} must be a string or a 1-D sequence of integer token ids, got "
                             f"{type(p).__name__} of dtype {arr.dtype} and shape {arr.shape}")
        out.append([int(x) for x in arr])
    empty = [i for i, p in enumerate(out) if not p]
    if empty:
        raise ValueError(f"prompts {empty} are empty")
    return out


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What `generate` records besides the tokens. Each is a static flag: what is off is not computed.

    logprobs: the log-probability of every generated token (`GenerateOutput.logprobs`; without it
        the loop computes no log_softmax).
    masks: the visibility row of every decode step (`GenerateOutput.masks`, bool [B, M, S]).
    stats: the per-step statistics (`GenerateOutput.stats`; without them `stats` holds only
        `step_valid`).
    recall: also `stats["attention_recall"]` [B, M, L]: per step and layer, the share of the
        model's dense softmax attention that falls on the keys the policy read
        (`loop_stats.attention_recall`). A diagnostic: it costs every layer a dense attention's
        scores per step, so time nothing with it on.
    timing: wait for prefill to finish before dispatching the decode loop, and record both wall
        times in `GenerateOutput.timing` (prefill_s, decode_s, decode_steps). Off by default: the
        loop is then queued behind prefill with no sync between them. Not with a mesh.
    """

    logprobs: bool = False
    masks: bool = False
    stats: bool = True
    recall: bool = False
    timing: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), (bool, np.bool_)):
                raise ValueError(f"Outputs.{f.name} must be a bool, got {getattr(self, f.name)!r}")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """How the attention runs; none of it changes the attention itself.

    backend: the kernels' backend ("auto" = pallas on a GPU, xla elsewhere; "mosaic" = the Mosaic GPU
        block kernel, 16-bit models, token lists on the Triton kernel; `pallas_kernels.backend.BACKENDS`).
    precision: dot precision of the attention kernel (None = the backend's default, which is tf32
        for float32 on a GPU; "highest" for exact fp32).
    prefill_chunk: prefill this many sequences at a time (must divide the batch, or with a mesh the
        per-device batch); bounds prefill memory at large batch x prompt length.
    min_sparse_context: when the call's cache length (prompt bucket + budget, rounded to the block
        size) is below this many tokens, the kernel reads every block at or before the query,
        through the policy's token mask: the same attention and tokens, no block list to build or
        follow (policies whose one list serves all heads: self_span, dense; others keep their
        lists). A per-call rule, decided at trace time (docs/notes/generation.md, "Never slower
        than dense"). 0 = always the policy's own list.
    """

    backend: str = "auto"
    precision: str | None = None
    prefill_chunk: int | None = None
    min_sparse_context: int = 0

    def __post_init__(self):
        if not isinstance(self.backend, str):
            raise ValueError(f"backend must be a string, got {self.backend!r}")
        if self.prefill_chunk is not None and (not _is_int(self.prefill_chunk) or self.prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be a positive int or None, got {self.prefill_chunk!r}")
        if not _is_int(self.min_sparse_context) or self.min_sparse_context < 0:
            raise ValueError(f"min_sparse_context must be an int >= 0, got {self.min_sparse_context!r}")


def generate(
    model,
    prompts: str | Sequence[str] | Sequence[Sequence[int]] | np.ndarray,
    *,
    policy: str | Policy = "self_span",
    max_new_tokens: int,
    tokenizer=None,
    block_size: int = 64,
    sampling: Sampling = Sampling(),
    outputs: Outputs = Outputs(),
    kernel: KernelOptions = KernelOptions(),
    mesh=None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens per prompt with the given attention policy.

    prompts: strings (`tokenizer.encode_prompt`: BOS once + span-aware ids, what training
        uses for a record's prompt), id lists of different lengths, or an int array [B, T].
    policy: a `policies.Policy`, or its name or spec (`policies.make_policy`): "self_span" (the
        spans the model writes, docs/spec.md §2; span tokens from `tokenizer`), "dense", "quest",
        "sparq", "sparq(r=8,k=16)", "adore(controller=DIR)", ...
    tokenizer: encodes string prompts, decodes `GenerateOutput.texts`, and gives the EOS and pad
        ids unless `eos_id` / `pad_id` are given (without either, generation stops only at the
        budget).
    block_size: KV block size of the kernel and the cache granularity of the policies (Quest's
        pages); the cache length is rounded up to a multiple of it.
    sampling: how tokens are chosen (`sampling.Sampling`: temperature, top-k, top-p, seed, or
        forced tokens).
    outputs: what is recorded besides the tokens (`Outputs`: log-probs, masks, statistics,
        attention recall, timing).
    kernel: how attention runs (`KernelOptions`: backend, precision, prefill chunking, the dense
        path below a context length).
    mesh: a `jax.sharding.Mesh` with a "data" axis (e.g. `sharding.make_mesh()`): the batch is
        split over that axis and every device prefills and decodes its own rows (its KV cache
        and policy state stay on it; the weights are replicated) in one SPMD program. The
        batch must divide evenly. Tokens, log-probs and statistics equal the one-device call's
        (sampling included: the noise is drawn for the whole batch).
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    for name, value, kind in (("sampling", sampling, Sampling), ("outputs", outputs, Outputs),
                              ("kernel", kernel, KernelOptions)):
        if not isinstance(value, kind):
            raise ValueError(f"{name} must be an instance of {kind.__name__}, got {value!r}")
    backend = resolve_backend(kernel.backend)
    pol = checked_policy(model, policy, tokenizer=tokenizer)

    ids = _prepare_prompts(prompts, tokenizer)
    B = len(ids)
    chunk = kernel.prefill_chunk
    if chunk is not None and mesh is None and B % chunk:
        raise ValueError(f"prefill_chunk={chunk} must divide the batch size {B}")
    lengths = np.array([len(p) for p in ids], np.int32)
    T, M, S = decode_loop.shape_buckets(lengths.max(), max_new_tokens, block_size)
    max_seq = getattr(model.config, "max_seq_len", None)
    if max_seq is not None and lengths.max() + max_new_tokens > max_seq:
        raise ValueError(
            f"prompt length {int(lengths.max())} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_seq_len {max_seq}"
        )
    eos, pad_id = _special_ids(tokenizer, eos_id, pad_id)
    vocab = model.config.vocab_size
    for name, value in (("eos_id", eos), ("pad_id", pad_id)):
        if not 0 <= value < vocab and not (name == "eos_id" and value == -1):
            raise ValueError(f"{name}={value} is outside the model's vocabulary [0, {vocab})")
    prompt = np.full((B, T), pad_id, np.int32)
    for b, p in enumerate(ids):
        prompt[b, : len(p)] = p
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise ValueError(f"prompt ids must be in [0, {vocab}), got range [{prompt.min()}, {prompt.max()}]")
    forced = _forced(sampling.forced_tokens, B, M, max_new_tokens, vocab, pad_id)

    graphdef, params = nnx.split(model)
    inputs = decode_loop.LoopInputs(
        prompt=jnp.asarray(prompt), lengths=jnp.asarray(lengths), max_new=jnp.int32(max_new_tokens),
        **dict(zip(("temperature", "top_k", "top_p"), sampling.arrays())), rng=jax.random.key(sampling.seed),
        eos_id=jnp.int32(eos), pad_id=jnp.int32(pad_id), forced=jnp.asarray(forced),
        use_forced=jnp.bool_(sampling.forced_tokens is not None))
    options = decode_loop.LoopOptions(
        policy=pol, block_size=int(block_size), cache_len=S, budget=M, logprobs=bool(outputs.logprobs),
        masks=bool(outputs.masks), stats=bool(outputs.stats), recall=bool(outputs.recall), backend=backend,
        precision=kernel.precision, prefill_chunk=None if chunk is None else int(chunk),
        dense_reads=S < int(kernel.min_sparse_context))
    if mesh is not None:
        _check_mesh(mesh, B, chunk, outputs.timing, backend)
        # Parameters restored from a checkpoint are committed to one device, and jit refuses to mix
        # them with the mesh's arrays: replicate them first (a no-op where they already are).
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        st, report = decode_loop.run_sharded(params, inputs, mesh=mesh, graphdef=graphdef, options=options)
        return GenerateOutput.from_loop(st, report, pol, lengths, max_new_tokens, eos, tokenizer)
    clock: list[float] = []  # start, prefill done, loop done (outputs.timing)

    def prefilled(state):
        jax.block_until_ready(state)
        clock.append(time.perf_counter())

    if outputs.timing:
        clock.append(time.perf_counter())
    st, report = decode_loop.run(params, inputs, graphdef=graphdef, options=options,
                                 on_prefilled=prefilled if outputs.timing else None)
    timing = None
    if outputs.timing:
        jax.block_until_ready((st, report))
        clock.append(time.perf_counter())
        timing = {"prefill_s": clock[1] - clock[0], "decode_s": clock[2] - clock[1],
                  "decode_steps": int(st.step) - 1}  # loop iterations run; token 0 came from prefill
    return GenerateOutput.from_loop(st, report, pol, lengths, max_new_tokens, eos, tokenizer, timing)


def checked_policy(model, policy: str | Policy, *, tokenizer=None, **context) -> Policy:
    """The `Policy` `generate` decodes `model` with: a name or spec resolved (`policies.make_policy`,
    with the context given and the model's config), then checked against the model's shapes
    (`Policy.check_model`). Callers that decode several policies check them all first."""
    pol = make_policy(policy, tokenizer=tokenizer, model_config=model.config, **context)
    pol.check_model(model.config)
    return pol


def _check_mesh(mesh, B: int, prefill_chunk: int | None, timing: bool, backend: str) -> None:
    """The checks a sharded `generate` needs."""
    if "data" not in getattr(mesh, "axis_names", ()):
        raise ValueError(f"mesh must be a jax.sharding.Mesh with a 'data' axis (sharding.make_mesh), got {mesh!r}")
    shards = int(mesh.shape["data"])
    if B % shards:
        raise ValueError(f"a batch of {B} cannot be split evenly over the mesh's {shards} 'data' devices")
    if prefill_chunk is not None and (B // shards) % prefill_chunk:
        raise ValueError(f"prefill_chunk={prefill_chunk} must divide the per-device batch {B // shards}")
    if timing:
        raise ValueError("Outputs(timing=True) is not available with mesh: the sharded call is one program")
    if backend == "mosaic_interpret" and mesh.size > 1:
        # the GPU interpreter keeps one simulated device per process: shards running at once collide
        raise ValueError("backend='mosaic_interpret' runs on one device only (jax's GPU interpreter simulates one "
                         "GPU per process); use backend='interpret' or 'xla' with a mesh of several devices")


def _special_ids(tokenizer, eos_id, pad_id) -> tuple[int, int]:
    """(EOS id or -1 for none, pad id): given, else the tokenizer's, else pad = EOS or 0."""
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise ValueError(f"{name} must be an int token id or None, got {value!r}")
    if eos_id is None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = eos_id if eos_id is not None else 0
    return -1 if eos_id is None else int(eos_id), int(pad_id)


def _forced(forced_tokens, B: int, M: int, max_new_tokens: int, vocab: int, pad_id: int) -> np.ndarray:
    """The teacher-forced tokens as int32 [B, M] (pad where none are given)."""
    forced = np.full((B, M), pad_id, np.int32)
    if forced_tokens is not None:
        f = np.asarray(forced_tokens)
        if f.size and not np.issubdtype(f.dtype, np.integer):
            raise ValueError(f"forced_tokens must be integer token ids, got dtype {f.dtype}")
        f = f.astype(np.int32)
        if f.ndim != 2 or f.shape[0] != B or f.shape[1] < max_new_tokens:
            raise ValueError(f"forced_tokens must be [B={B}, >= {max_new_tokens}], got shape {f.shape}")
        if f.min() < 0 or f.max() >= vocab:
            raise ValueError(f"forced_tokens must be in [0, {vocab}), got range [{f.min()}, {f.max()}]")
        forced[:, :max_new_tokens] = f[:, :max_new_tokens]
    return forced
