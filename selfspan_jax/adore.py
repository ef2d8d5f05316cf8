"""ADORE's controller: which cached tokens the next query will need (Zhang et al., ACL 2024 Findings,
arXiv 2407.02328, "Efficient Sparse Attention needs Adaptive Token Release").

ADORE keeps a fixed budget of KV tokens per sequence. A lightweight GRU-based
controller scores every input and generated token's importance for the
current token; the cache keeps the highest-scoring tokens, releases the rest,
and re-admits ("rebuilds") released tokens whose importance rises back into
the top R. The controller is trained to approximate the model's own ideal
top-K attention. This module is the controller and its weights; the policy
that uses them is `policies.AdorePolicy`, and the distillation that trains
them is `adore_train`.

Only the abstract was at hand, so the architecture is ours (docs/design-notes.md):

- per layer, an `nnx.GRUCell` reads the keys as they are written (the KV
  cache's RoPE'd keys, per KV head, weights shared by the heads of a layer):
  after keys 0..t-1 its state c summarises what the sequence has done;
- every cached token j keeps a `dim`-sized feature e_j = W_e k_j
  (`nnx.Linear`, no bias), written once with its key;
- the importance of token j for the current query at t ("for the current
  token", as ADORE computes it) is e_j . (W_q qbar_t + c) / sqrt(dim) +
  b[bucket(t - j)]: qbar_t is the mean of the KV head's query group, W_q a
  `nnx.Linear`, and b a learned bias per distance bucket (exact for distances
  1..8, then two buckets per octave) through which the controller knows
  recency.

Reading the scores costs `dim / head_dim` of a K row per cached token and
step (the features), as SparQ's r components do; `policies.AdorePolicy`
counts it.

Shapes use the house letters: L layers, B batch, K KV heads, T sequence,
S cache length, H head dim, C controller dim (`dim`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from selfspan_jax import checkpoint as ck

# Distances 1..EXACT_DISTANCES get a bucket each; beyond, two buckets per octave.
EXACT_DISTANCES = 8
DEFAULT_BUCKETS = 16
SETTINGS = "controller.json"
CHECKPOINTS = "checkpoints"


def distance_bucket(distance: jax.Array, buckets: int) -> jax.Array:
    """int32 bucket of a query-key distance (>= 1; smaller values count as 1)."""
    d = jnp.maximum(distance, 1)
    far = EXACT_DISTANCES + jnp.floor(2.0 * jnp.log2(d.astype(jnp.float32) / EXACT_DISTANCES)).astype(jnp.int32)
    return jnp.clip(jnp.where(d <= EXACT_DISTANCES, d - 1, far), 0, buckets - 1).astype(jnp.int32)


class Controller(nnx.Module):
    """Per layer: a GRU over the keys as written, a feature per cached token, a query projection, a
    distance bias."""

    def __init__(self, n_layers: int, head_dim: int, *, dim: int = 8, buckets: int = DEFAULT_BUCKETS,
                 rngs: nnx.Rngs):
        for name, value, low in (("n_layers", n_layers, 1), ("head_dim", head_dim, 1), ("dim", dim, 1),
                                 ("buckets", buckets, EXACT_DISTANCES + 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"controller {name} must be an int >= {low}, got {value!r}")
        self.n_layers, self.head_dim, self.dim, self.buckets = n_layers, head_dim, dim, buckets
        self.embed = nnx.List([nnx.Linear(head_dim, dim, use_bias=False, rngs=rngs) for _ in range(n_layers)])
        self.query = nnx.List([nnx.Linear(head_dim, dim, use_bias=False, rngs=rngs) for _ in range(n_layers)])
        self.gru = nnx.List([nnx.GRUCell(head_dim, dim, rngs=rngs) for _ in range(n_layers)])
        self.distance_bias = nnx.Param(jnp.zeros((n_layers, buckets), jnp.float32))

    def features(self, layer: int, k: jax.Array) -> jax.Array:
        """k [..., H] -> the tokens' features [..., C] (f32)."""
        return self.embed[layer](k.astype(jnp.float32))

    def advance(self, layer: int, carry: jax.Array, k: jax.Array) -> jax.Array:
        """The GRU state after reading key(s) k [..., H]: carry [..., C] -> [..., C]."""
        new, _ = self.gru[layer](carry, k.astype(jnp.float32))
        return new

    def probe(self, layer: int, q: jax.Array, carry: jax.Array) -> jax.Array:
        """What the features are scored against: q [..., G, H] (a KV head's query group), carry [..., C]
        -> [..., C]."""
        return self.query[layer](jnp.mean(q.astype(jnp.float32), axis=-2)) + carry

    def score(self, layer: int, feats: jax.Array, probe: jax.Array, distance: jax.Array) -> jax.Array:
        """Importance logits: feats [..., S, C], probe [..., C], distance int [..., S] -> [..., S]."""
        dot = jnp.einsum("...sc,...c->...s", feats.astype(jnp.float32), probe) / math.sqrt(self.dim)
        return dot + self.distance_bias[...][layer][distance_bucket(distance, self.buckets)]

    def sequence_scores(self, layer: int, q: jax.Array, k: jax.Array, lengths: jax.Array) -> jax.Array:
        """Teacher-forced scores of one layer: q [B, T, N, H], k [B, K, T, H] -> f32 [B, K, T, T].

        Row t scores the keys j < t for the query at t, with the GRU state after
        keys 0..t-1 (what the policy has when that query arrives); entries
        j >= t are meaningless. Positions >= lengths[b] leave the GRU state
        unchanged.
        """
        B, K, T, _ = k.shape
        feats = self.features(layer, k)

        def body(carry, xs):
            k_t, valid_t = xs
            new = self.advance(layer, carry, k_t)
            new = jnp.where(valid_t[:, None, None], new, carry)
            return new, carry  # emit the state before key t: what the query at t sees

        valid = jnp.arange(T)[:, None] < lengths[None, :]
        _, before = jax.lax.scan(body, jnp.zeros((B, K, self.dim), jnp.float32), (jnp.moveaxis(k, 2, 0), valid))
        # [B, K, T, C]
        before = jnp.moveaxis(before, 0, 2)
        qg = jnp.moveaxis(q.reshape(B, T, K, -1, q.shape[-1]), 1, 2)  # [B, K, T, G, H]
        probe = self.probe(layer, qg, before)
        t = jnp.arange(T)
        dot = jnp.einsum("bktc,bkjc->bktj", probe, feats) / math.sqrt(self.dim)
        return dot + self.distance_bias[...][layer][distance_bucket(t[:, None] - t[None, :], self.buckets)]


def new_controller(n_layers: int, head_dim: int, *, dim: int = 8, buckets: int = DEFAULT_BUCKETS,
                   seed: int = 0) -> Controller:
    return Controller(n_layers, head_dim, dim=dim, buckets=buckets, rngs=nnx.Rngs(seed))


class TrainedController:
    """A controller's weights as host constants, hashable by their content (what a jit-static
    policy needs: two policies with the same weights share a compiled program, different weights
    never do). `module()` rebuilds the nnx module; inside a trace its weights are constants."""

    def __init__(self, controller: Controller, source: str = ""):
        self.graphdef, state = nnx.split(controller)
        self.state = jax.tree.map(np.asarray, state)
        self.n_layers, self.head_dim, self.dim = controller.n_layers, controller.head_dim, controller.dim
        self.source = source
        h = hashlib.sha1()
        for leaf in jax.tree.leaves(self.state):
            h.update(np.ascontiguousarray(leaf).tobytes())
        self.digest = h.hexdigest()

    def module(self) -> Controller:
        return nnx.merge(self.graphdef, jax.tree.map(jnp.asarray, self.state))

    def __eq__(self, other):
        return isinstance(other, TrainedController) and other.digest == self.digest

    def __hash__(self):
        return hash(self.digest)

    def __repr__(self):
        where = f" from {self.source}" if self.source else ""
        return f"TrainedController(L={self.n_layers}, H={self.head_dim}, dim={self.dim}{where}, {self.digest[:10]})"


# ---------------------------------------------------------------------------
# Persistence: <dir>/controller.json (settings) + <dir>/checkpoints/ (orbax)
# ---------------------------------------------------------------------------
def save_settings(directory: str | Path, settings: dict[str, Any]) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / SETTINGS).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")


def read_settings(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / SETTINGS
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} is not an ADORE controller directory (no {SETTINGS}); train one with "
                         "scripts/train_adore.py --run RUN")
    try:
        settings = json.loads(path.read_text())
        for key in ("n_layers", "head_dim", "dim", "buckets"):
            int(settings[key])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is corrupt or incomplete ({type(err).__name__}: {err})") from err
    return settings


def controller_from_settings(settings: dict[str, Any], seed: int = 0) -> Controller:
    return new_controller(int(settings["n_layers"]), int(settings["head_dim"]), dim=int(settings["dim"]),
                          buckets=int(settings["buckets"]), seed=seed)


def load_controller(directory: str | Path, step: int | None = None) -> TrainedController:
    """The trained controller of `scripts/train_adore.py`'s output directory (default: latest step)."""
    settings = read_settings(directory)
    abstract = nnx.eval_shape(lambda: controller_from_settings(settings))
    graphdef, params = nnx.split(abstract)
    target = {"params": ck.abstract_tree(params), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    folder = Path(directory) / CHECKPOINTS
    if not folder.is_dir():
        raise ck.CheckpointError(f"ADORE controller {str(directory)!r} has no {CHECKPOINTS}/ (has it trained?)")
    with ck.Checkpointer(folder) as mgr:
        state, _ = mgr.restore(target, step, partial=True)
    return TrainedController(nnx.merge(graphdef, state["params"]), source=str(directory))


def controller_of_run(run_dir: str | Path) -> Path | None:
    """Where `scripts/train_adore.py` puts a run's controller by default (`<run>/adore`), if it is there."""
    path = Path(run_dir) / "adore"
    return path if (path / SETTINGS).is_file() else None


def check_controller_source(controller: TrainedController, run_dir: str | Path) -> None:
    """A controller learned one run's attention: refuse it for another run (`controller.json`'s
    source_run against `run_dir`, compared by where they are)."""
    source_run = read_settings(controller.source).get("source_run") if controller.source else None
    if source_run and Path(source_run).resolve() != Path(run_dir).resolve():
        raise ValueError(f"the ADORE controller {controller.source} was distilled from the run {source_run}, not "
                         f"from {run_dir}: distil one for this run (scripts/train_adore.py --run {run_dir})")
