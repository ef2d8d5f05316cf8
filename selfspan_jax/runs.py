"""The run directory: the only code that knows its layout.

    RUN/config.yaml           the resolved TrainConfig (written once, atomically)
    RUN/metrics.jsonl         one JSON line per log: train lines have `loss`,
                              eval lines `eval_loss`, `eval_token_acc`[, `eval_exact_match`]
    RUN/checkpoints/<step>/   orbax: `state` = {params (trainable part only), opt_state, step},
                              `data` = data position (see checkpoint.py)
    RUN/adapters/             LoRA runs: the adapters in PEFT's layout
    RUN/export/               with --export-merged: merged weights, HF layout
    RUN/tb/                   TensorBoard events, when a writer is installed
    RUN/.lock                 held (flock) by the one process training the run

Training prepares it and writes to it; evaluation, the demo and benchmarks
read runs through `load_run` / `restore_params`, which restore only the
parameters (an `nnx.eval_shape` target, no optimizer state built to be thrown
away).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import yaml
from flax import nnx

from selfspan_jax import checkpoint as ck
from selfspan_jax import hf_interop
from selfspan_jax.models import build_model, trainable_filter
from selfspan_jax.train_config import TrainConfig, config_differences

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
ADAPTERS = "adapters"
EXPORT = "export"
TENSORBOARD = "tb"
LOCK = ".lock"


class RunDirLocked(ValueError):
    """Another process is training into the same run directory (a ValueError: the --out given
    names a directory in use, and every command line reports ValueErrors by name)."""


class RunLock:
    """One writer per run directory: an exclusive flock on RUN/.lock, which records who holds it.

    The kernel drops a flock when its process dies, SIGKILL included, so a lock
    left by a crashed run is never stale: the next start takes it. A second
    writer is refused with the holder's pid, host and start time. (flock is
    per host on most network file systems: two hosts sharing an NFS run
    directory are not protected.)
    """

    def __init__(self, run_dir: str | os.PathLike, *, name: str = LOCK, what: str = "run directory",
                 doing: str = "is training into it", option: str = "--out"):
        """name: the lock file in `run_dir`; what, doing, option: how the refusal names the directory,
        what its holder does there and the option to change (the defaults: a training run)."""
        self.path = Path(run_dir) / name
        self._what, self._doing, self._option = what, doing, option
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # a file in the way, no permission, a name too long, ...
            raise ValueError(f"cannot use {str(self.path.parent)!r} as a {self._what} ({self._option}): "
                             f"{err.strerror}: {err.filename!r}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise RunDirLocked(
                f"{self._what} {str(self.path.parent)!r} is in use: {holder} {self._doing}. "
                f"Wait for it to finish, or use another {self._option}."
            ) from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since {started})\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays, unlocked
            self._fd = None


def seed_dir(run_dir: str | os.PathLike, i: int) -> str:
    """Where seed index i of a run lives when an experiment trains each arm several times
    (`demo.py --seeds`): the run itself for i = 0, `<run_dir>_seed<i>` after."""
    return str(run_dir) if i == 0 else f"{run_dir}_seed{i}"


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG).is_file()


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The saved config of a run, with `out` set to where the run is now."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ValueError(f"{str(run_dir)!r} is not a run directory (no {CONFIG})")
    saved = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
    return TrainConfig.from_dict({**saved, "out": str(run_dir)})


def check_resumable(cfg: TrainConfig) -> bool:
    """Whether the run dir already holds this config's run (it is then resumed); raises ValueError
    when it holds another config's, or checkpoints without a config."""
    run_dir = cfg.run_dir
    saved_path = run_dir / CONFIG
    if saved_path.exists():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        diff = config_differences(saved, cfg)
        if diff:
            lines = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"run directory {str(run_dir)!r} holds a run with a different config ({lines}); "
                "use another --out, or repeat the original settings to resume it"
            )
        return True
    if (run_dir / CHECKPOINTS).exists():
        raise ValueError(f"run directory {str(run_dir)!r} has checkpoints but no {CONFIG}; refusing to guess")
    return False


def prepare(cfg: TrainConfig) -> None:
    """Write config.yaml for a new run, or check that an existing run dir was made by the same
    config. Training calls it once the model and data are built, so a start that fails on bad
    input leaves no config behind to block the corrected command."""
    if check_resumable(cfg):
        return
    saved_path = cfg.run_dir / CONFIG
    if jax.process_index() == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved_path.with_suffix(".yaml.tmp")
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        os.replace(tmp, saved_path)  # atomic: a killed start never leaves half a config


def checkpointer(cfg: TrainConfig) -> ck.Checkpointer:
    return ck.Checkpointer(cfg.run_dir / CHECKPOINTS, max_to_keep=cfg.keep_checkpoints)


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """Step of the newest complete checkpoint, None when there is none."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return None
    with ck.Checkpointer(directory) as mgr:
        return mgr.latest_step()


def is_finished(cfg: TrainConfig) -> bool:
    """The run holds the checkpoint of its last step and that step's evaluation."""
    return (cfg.run_dir / CHECKPOINTS / str(cfg.steps)).is_dir() and cfg.steps in evaluated_steps(cfg.run_dir)


def evaluated_steps(run_dir: str | os.PathLike) -> set[int]:
    """Steps whose held-out evaluation is in metrics.jsonl."""
    return {m["step"] for m in read_metrics(run_dir) if "eval_loss" in m and "step" in m}


def evaluation_owed(cfg: TrainConfig, step: int) -> bool:
    """A run restored at `step` owes that step's evaluation when the step is an evaluation step
    and metrics.jsonl lacks it: the process died after the checkpoint, before the evaluation."""
    return step > 0 and (step % cfg.eval_every == 0 or step == cfg.steps) and step not in evaluated_steps(cfg.run_dir)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl in the run dir (and TensorBoard when a writer is installed).

    On resume, lines after the restored step are dropped: they describe steps
    that the resumed run will redo.
    """

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool, tensorboard: bool):
        self.path = Path(run_dir) / METRICS
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
            self._tb = _tensorboard_writer(Path(run_dir) / TENSORBOARD)

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
    # optional: TensorBoard events only where the user installed a writer
    for mod in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            module = __import__(mod, fromlist=["SummaryWriter"])
        except ImportError:
            continue
        return module.SummaryWriter(str(path))
    return None


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """metrics.jsonl's records ([] before the first); a line torn by a kill is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def recorded_train_seconds(run_dir: str | os.PathLike) -> float | None:
    """Wall seconds the run's own metrics say training took (last train line; a resumed run counts its last leg)."""
    if not (Path(run_dir) / METRICS).is_file():
        return None
    elapsed = [m["elapsed_s"] for m in read_metrics(run_dir) if m.get("elapsed_s") is not None]
    return elapsed[-1] if elapsed else None


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------
def restore_params(run_dir: str | os.PathLike, trainable, shardings=None, step: int | None = None):
    """(trainable parameters, step) of a run's checkpoint (default: the latest), restored into
    `trainable`'s shapes (arrays or an `nnx.eval_shape` state). Only the parameters are read.
    Raises CheckpointError (a ValueError) naming the directory when there is no checkpoint."""
    target = {"params": ck.abstract_tree(trainable, shardings), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        raise ck.CheckpointError(f"run directory {str(run_dir)!r} has no {CHECKPOINTS}/ (has it trained yet?)")
    with ck.Checkpointer(directory) as mgr:
        state, _ = mgr.restore(target, step, partial=True)
    return state["params"], int(state["step"])


class LoadedRun(NamedTuple):
    model: Any
    tokenizer: Any
    config: TrainConfig
    step: int


def load_run(run_dir: str | os.PathLike, step: int | None = None) -> LoadedRun:
    """The model of a training run's checkpoint (default: the latest), its tokenizer, config and step.

    A from-scratch model is restored into an `nnx.eval_shape` target (nothing
    initialised only to be overwritten); a LoRA run reloads its base from
    `cfg.model` and restores the adapters and span-token rows.
    """
    cfg = load_config(run_dir)
    if cfg.trains_from_scratch:
        tokenizer = None

        def shapes():
            nonlocal tokenizer
            model, tokenizer = build_model(cfg)
            return model

        model = nnx.eval_shape(shapes)
    else:
        model, tokenizer = build_model(cfg)
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg), ...)
    params, restored_step = restore_params(run_dir, trainable, step=step)
    return LoadedRun(nnx.merge(graphdef, params, frozen), tokenizer, cfg, restored_step)


def warm_start_params(cfg: TrainConfig, trainable, shardings):
    """Trainable parameters of `cfg.init_from`'s latest checkpoint, placed like
    `trainable` (a warm start, e.g. long derivations from a short-problem
    run). The source run must train the same parameter tree: same model and
    shape, same LoRA setting; anything else is refused with the reason."""
    src = Path(cfg.init_from)
    if not is_run_dir(src):
        raise ValueError(f"init_from {str(src)!r} is not a run directory (no {CONFIG})")
    src_cfg = load_config(src)
    for field in ("model", "model_overrides", "lora_rank", "lora_mlp"):
        if getattr(src_cfg, field) != getattr(cfg, field):
            raise ValueError(
                f"init_from {str(src)!r} trained {field}={getattr(src_cfg, field)!r}, this run has "
                f"{getattr(cfg, field)!r}: the parameter trees differ"
            )
    return restore_params(src, trainable, shardings)[0]


def export(cfg: TrainConfig, model, tokenizer) -> None:
    """What a finished run leaves for other tools: LoRA adapters (PEFT layout), merged weights on request."""
    if cfg.lora_rank:
        hf_interop.save_lora_adapters(model, cfg.run_dir / ADAPTERS, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    if cfg.export_merged:
        hf_interop.export_merged_safetensors(model, cfg.run_dir / EXPORT, tokenizer=tokenizer)
