"""Rows of a comparison kept on disk as each one finishes, so that a rerun after a crash or a kill
decodes only the rows still missing.

A comparison (`evaluate.evaluate_rows`, `compare_policies.py --smollm2`) spends nearly all its time
generating and scoring one row after another; the timing that follows is taken in turns across
every row and is always measured again (a row's speed only means something next to the others'
measured in the same turns). Each finished row is stored under a key that digests everything its
numbers depend on: the row's model (a digest of its parameters), its policy, the records and the
generation settings. A row whose key is found is read back instead of decoded; anything changed
gives a new key, so a stale row is never reused. The folder belongs to one results file (the
caller holds its lock, `tables.reserved_results`) and is deleted once that file is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np


def _plain(value):
    """JSON for what digests and rows hold: numpy arrays and scalars as lists and numbers."""
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def model_digest(model) -> str:
    """A digest of every parameter and variable of an nnx model (names, shapes, dtypes and bytes): two
    models digest alike only when they compute the same function."""
    from flax import nnx

    h = hashlib.blake2b(digest_size=16)
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(nnx.state(model)), key=lambda kv: str(kv[0])):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class FinishedRows:
    """The finished rows of one comparison, one JSON file per row in `folder`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._model_digests: dict[int, str] = {}

    def key(self, *, model, **parts: Any) -> str:
        """The key of a row: `model`'s parameters and every other part its numbers depend on (policy,
        records, settings; anything JSON can hold, numpy arrays included)."""
        digest = self._model_digests.get(id(model))
        if digest is None:  # a comparison's rows share a few models: each is digested once
            digest = self._model_digests[id(model)] = model_digest(model)
        text = json.dumps({"model": digest, **parts}, sort_keys=True, default=_plain)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def __len__(self) -> int:
        return len(list(self.folder.glob("*.json"))) if self.folder.is_dir() else 0

    def get(self, key: str) -> dict[str, Any] | None:
        """The row stored under `key`, or None. A file that cannot be read back (a write cut short
        before the rename, edited by hand) is treated as missing, with a warning: the row is decoded
        again and the file replaced."""
        path = self.folder / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())["row"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            warnings.warn(f"finished row {path} is unreadable ({err}); that row is computed again", RuntimeWarning,
                          stacklevel=2)
            return None

    def put(self, key: str, row: dict[str, Any], *, label: str = "") -> None:
        """Store `row` under `key` (written to a temporary name, then renamed: a kill leaves either the
        whole row or none of it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"label": label, "row": row}, default=_plain) + "\n")
        os.replace(tmp, path)

    def discard(self) -> None:
        """Delete the folder: the comparison's results file holds every row now."""
        shutil.rmtree(self.folder, ignore_errors=True)
