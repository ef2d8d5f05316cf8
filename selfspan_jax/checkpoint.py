"""Training checkpoints (orbax). Weight export for other tools (HF layout, PEFT adapters) is `hf_interop`.

A checkpoint is one orbax step directory holding two items:

- ``state``: the array pytree ``{"params", "opt_state", "step"}`` — the
  trainable parameters (all weights for full fine-tuning or from scratch, the
  LoRA adapters only for LoRA; the frozen base is reloaded from its source),
  the optax state, and the step counter;
- ``data``: JSON with the data-iterator position (epoch, index within the
  epoch's permutation, seed) and anything else small the loop needs to resume.

Orbax writes each step into a temporary directory and renames it when
complete, so a process killed at any moment (SIGKILL included) leaves either a
whole checkpoint or a temporary directory that the next start ignores and
deletes. Restores go into an abstract target (`jax.ShapeDtypeStruct` leaves
with shardings, e.g. from `nnx.eval_shape`), so arrays land directly on their
devices in their FSDP layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read back (corrupt, truncated, or
    written by a run with different shapes)."""


def abstract_tree(tree, shardings=None):
    """`jax.ShapeDtypeStruct` leaves (with shardings) mirroring `tree`.

    `tree` may hold arrays or ShapeDtypeStructs (an `nnx.eval_shape` state);
    `shardings`, when given, is a matching pytree of `jax.sharding.Sharding`.
    """
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
        )
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _restore_args(target, partial: bool):
    if target is None:
        return ocp.args.StandardRestore()
    if not partial:
        return ocp.args.StandardRestore(target)
    # PyTreeRestore is what can skip saved entries; leaves without a sharding
    # land on the default device as jax arrays (not numpy).
    device = jax.sharding.make_single_device_sharding(jax.devices()[0])
    target = jax.tree.map(lambda x: x if getattr(x, "sharding", None) is not None
                          else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
    return ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)


class Checkpointer:
    """`orbax.checkpoint.CheckpointManager` over a run's ``checkpoints/`` dir.

    Keeps the newest `max_to_keep` steps. Saves are asynchronous (training
    continues while arrays are written); `wait()` blocks until the last one
    is committed.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            # A SIGKILL during an async save leaves "<step>.orbax-checkpoint-tmp-*"
            # behind; remove it on the next start so it cannot shadow a step.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ---- queries -------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # ---- save / restore ------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], data: dict[str, Any]) -> bool:
        """Queue `state` (array pytree) and `data` (JSON-able dict) as `step`."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
        json.dumps(data)  # fail here, not in the background thread
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
            force=True,
        )

    def restore(self, target, step: int | None = None, *, partial: bool = False) -> tuple[Any, dict[str, Any]]:
        """Restore (state, data) of `step` (default: the latest) into `target`.

        `target` is an abstract pytree shaped like the saved ``state`` (see
        `abstract_tree`); None restores the saved structure as nested dicts
        of arrays on the default device (for inspection). With `partial`,
        `target` may name a subset of the saved entries (e.g. only
        ``{"params": ...}``) and only those are read: loading a run for
        inference needs no optimizer state to restore into. Raises
        `CheckpointError` naming the step directory when it cannot be read or
        does not match the target.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}")
        path = self.directory / str(step)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=_restore_args(target, partial),
                    data=ocp.args.JsonRestore(),
                ),
            )
            state, data = restored["state"], restored["data"]
        except Exception as err:  # orbax raises a zoo of types (ValueError, KeyError, tensorstore errors)
            # The first line says what failed; tensorstore appends a long JSON spec dump after it.
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(
                f"checkpoint {path} is corrupt or does not match this run "
                f"({type(err).__name__}: {first}); delete that directory to fall back "
                "to the previous checkpoint"
            ) from err
        if not isinstance(data, dict):
            raise CheckpointError(f"checkpoint {path} has no data-position record")
        return state, data

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
