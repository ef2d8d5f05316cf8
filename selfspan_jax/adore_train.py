"""Distil an ADORE controller from a trained run's own dense attention (`scripts/train_adore.py`).

Targets: for every decode query of the run's training data (a completion
position t), the `top_k` keys j < t with the most attention of that query in
the frozen model, summed over the query heads of each KV head, layer by layer
(`teacher_top_k`). The query's own key is not a target: the policy always
reads it. The controller's scores of the same keys for the same query
(`adore.Controller.sequence_scores`, its GRU having read keys 0..t-1) are trained
with a listwise loss: the cross-entropy of softmax_j(score) against the
teacher's attention over its top-k, renormalised. What retention needs is the
ranking, and a softmax over the keys is not swamped by the hundreds of
negatives per row that a per-key BCE would see; weighting by the teacher's
mass ranks the few keys that carry most of the attention first (a uniform
target over the top-k was tried first and kept 34% exact match where this
keeps more, docs/design-notes.md).
The reported `recall` is the share of the teacher's top-k that the
controller's own top-`recall_at` contains (recall_at = the policy's
budget - 1, the tokens it reads besides the query).

The directory holds controller.json, checkpoints/ (orbax, resumable: a
killed run continues from its last checkpoint) and metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from selfspan_jax import adore, runs, tasks
from selfspan_jax import checkpoint as ck
from selfspan_jax.data.batches import DataPosition, next_indices, tokenize_set


def _opt(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """One controller distillation (`scripts/train_adore.py` derives its flags from these fields)."""

    run: str = _opt(None, "the trained run whose dense attention is distilled (required)")
    out: str | None = _opt(None, "output directory (default: RUN/adore, where evaluation looks for it)")
    dim: int = _opt(8, "controller size: GRU state and per-token feature (reads dim/head_dim of a K row per token)")
    buckets: int = _opt(adore.DEFAULT_BUCKETS, "distance buckets of the recency bias (>= 9)")
    top_k: int = _opt(16, "the teacher's top-k keys per decode query are the positives")
    recall_at: int = _opt(31, "report recall of the teacher's top-k within the controller's top-N (budget - 1)")
    steps: int = _opt(300, "optimizer steps")
    batch_size: int = _opt(8, "sequences per step")
    lr: float = _opt(3e-3, "Adam learning rate (cosine decay to 0.1x)")
    num_train: int = _opt(2000, "training records (generated with the run's data settings and seed)")
    num_eval: int = _opt(64, "held-out records for eval_loss / eval_recall")
    seed: int = _opt(0, "controller initialisation and data order")
    save_every: int = _opt(100, "checkpoint every N steps (resumable)")
    eval_every: int = _opt(100, "held-out evaluation every N steps")
    progress: bool = _opt(True, "progress bar")

    def __post_init__(self):
        if not self.run:
            raise ValueError("run is required: the trained run directory whose attention the controller learns")
        for name in ("dim", "buckets", "top_k", "recall_at", "steps", "batch_size", "num_train", "num_eval",
                     "save_every", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.buckets < adore.EXACT_DISTANCES + 1:  # the controller's own bound, checked before any work
            raise ValueError(f"buckets must be >= {adore.EXACT_DISTANCES + 1}, got {self.buckets}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.run) / "adore"


def teacher_top_k(q: jax.Array, k: jax.Array, query_mask: jax.Array, top_k: int):
    """One layer of a causal forward: q [B, T, N, H], k [B, K, T, H], query_mask bool [B, T] (the decode
    queries) -> (positives bool [B, K, T, T], weights f32 [B, K, T, T], rows bool [B, T]).

    Row t holds the `top_k` keys j < t with the most attention of the query at t (summed over its
    group; every j < t when t <= top_k). The query's own key is left out: the policy always reads
    it. weights: the teacher's attention over the positives, renormalised to 1 per row. rows[b, t]
    = query_mask[b, t] and t >= 1.
    """
    B, T, N, H = q.shape
    K = k.shape[1]
    qg = q.reshape(B, T, K, N // K, H).astype(jnp.float32)
    s = jnp.einsum("btkgh,bksh->bkgts", qg, k.astype(jnp.float32)) / math.sqrt(H)
    causal = jnp.tril(jnp.ones((T, T), bool))
    # [B, K, T, T]: attention of query t over keys, summed over the group
    p = jnp.sum(jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1), axis=2)
    earlier = jnp.tril(jnp.ones((T, T), bool), -1)  # j < t
    masked = jnp.where(earlier, p, -1.0)
    kth = jax.lax.top_k(masked, min(top_k, T))[0][..., -1:]
    positives = earlier & (masked >= kth)
    rows = query_mask & (jnp.arange(T) >= 1)[None, :]
    # the teacher's attention over its top-k, renormalised: the target distribution of the loss
    mass = jnp.where(positives, p, 0.0)
    weights = mass / jnp.maximum(jnp.sum(mass, -1, keepdims=True), 1e-30)
    return positives, weights, rows


def listwise_loss(scores, weights, rows):
    """(sum over valid rows and KV heads of the cross-entropy of softmax over keys j < t of the scores
    against the teacher's renormalised top-k attention `weights`, their number)."""
    T = scores.shape[-1]
    earlier = jnp.tril(jnp.ones((T, T), bool), -1)
    log_z = jax.nn.logsumexp(jnp.where(earlier, scores, -jnp.inf), axis=-1)
    per_row = jnp.where(rows[:, None, :], log_z - jnp.sum(weights * jnp.where(earlier, scores, 0.0), -1), 0.0)
    w = jnp.broadcast_to(rows[:, None, :], per_row.shape).astype(jnp.float32)
    return jnp.sum(per_row), jnp.sum(w)


def recall(scores, positives, rows, at: int):
    """(sum over valid rows and KV heads of |top-`at` of scores among j < t  ∩  positives| / |positives|,
    their number)."""
    T = scores.shape[-1]
    earlier = jnp.tril(jnp.ones((T, T), bool), -1)
    s = jnp.where(earlier, scores, -jnp.inf)
    kth = jax.lax.top_k(s, min(at, T))[0][..., -1:]
    chosen = earlier & (s >= kth)
    hit = jnp.sum(chosen & positives, -1) / jnp.maximum(jnp.sum(positives, -1), 1)
    w = jnp.broadcast_to(rows[:, None, :], hit.shape).astype(jnp.float32)
    return jnp.sum(hit * w), jnp.sum(w)


def make_steps(model_graphdef, ctl_graphdef, tx, top_k: int, recall_at: int):
    """(train_step, eval_step), jitted; the frozen model's state is an argument, not a constant."""

    def targets(model_state, tokens, loss_mask):
        model = nnx.merge(model_graphdef, model_state)
        qs, ks = model.attention_inputs(tokens)
        per_layer = [teacher_top_k(qs[i], ks[i], loss_mask, top_k) for i in range(qs.shape[0])]
        return jax.lax.stop_gradient(qs), jax.lax.stop_gradient(ks), per_layer

    def loss_and_recall(params, qs, ks, per_layer, lengths):
        ctl = nnx.merge(ctl_graphdef, params)
        loss = n = hits = 0.0
        for i, (positives, weights, rows) in enumerate(per_layer):
            scores = ctl.sequence_scores(i, qs[i], ks[i], lengths)
            l_sum, l_n = listwise_loss(scores, weights, rows)
            r_sum, _ = recall(scores, positives, rows, recall_at)
            loss, n, hits = loss + l_sum, n + l_n, hits + r_sum
        n = jnp.maximum(n, 1.0)
        return loss / n, hits / n

    @jax.jit
    def train_step(params, opt_state, model_state, tokens, loss_mask, lengths):
        qs, ks, per_layer = targets(model_state, tokens, loss_mask)
        (loss, rec), grads = jax.value_and_grad(loss_and_recall, has_aux=True)(params, qs, ks, per_layer, lengths)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "recall": rec,
                                                                 "grad_norm": optax.tree.norm(grads)}

    @jax.jit
    def eval_step(params, model_state, tokens, loss_mask, lengths):
        qs, ks, per_layer = targets(model_state, tokens, loss_mask)
        return loss_and_recall(params, qs, ks, per_layer, lengths)

    return train_step, eval_step


# the run's own folders: a controller written into one of them would be read as the run's
_RUN_OWNED = (runs.CHECKPOINTS, runs.ADAPTERS, runs.EXPORT, runs.TENSORBOARD)


def _check_out(run: Path, out: Path) -> None:
    """--out must be a folder of its own: not the run directory, nor inside one of the run's folders."""
    if out == run:
        raise ValueError(f"--out {str(out)!r} is the run directory itself: the controller needs a folder of its "
                         f"own (the default is {str(run / 'adore')!r})")
    for name in _RUN_OWNED:
        if out == run / name or (run / name) in out.parents:
            raise ValueError(f"--out {str(out)!r} lies in the run's own {name}/ folder: the controller needs a "
                             f"folder of its own (the default is {str(run / 'adore')!r})")


def distill(cfg: DistillConfig) -> dict[str, float]:
    """Train (or resume) the controller of `cfg.run`; returns the final held-out metrics. One process
    at a time per output folder (`runs.RunLock`)."""
    run, out = Path(cfg.run).resolve(), cfg.out_dir.resolve()
    runs.load_config(run)  # a run directory, before anything is created beside it
    _check_out(run, out)
    with runs.RunLock(out, what="controller directory", doing="is distilling a controller into it"):
        return _distill(cfg, run, out)


def _distill(cfg: DistillConfig, run: Path, out: Path) -> dict[str, float]:
    loaded = runs.load_run(run)
    mcfg = loaded.model.config
    settings = dict(n_layers=mcfg.n_layers, head_dim=mcfg.head_dim, dim=cfg.dim, buckets=cfg.buckets,
                    top_k=cfg.top_k, recall_at=cfg.recall_at, source_run=str(run), source_step=loaded.step)
    if (out / adore.SETTINGS).is_file():
        old = adore.read_settings(out)
        if old.get("source_run"):  # the same run however it was named (relative, trailing slash): where it is
            old["source_run"] = str(Path(old["source_run"]).resolve())
        clash = {k: (old.get(k), v) for k, v in settings.items() if k != "source_step" and old.get(k) != v}
        if clash:
            raise ValueError(f"{out} holds a controller trained with other settings {clash}; choose another --out")
    adore.save_settings(out, settings)

    rc = loaded.config
    train_records, eval_records = tasks.get(rc.task).training_records(
        rc.data, num_train=cfg.num_train, num_eval=cfg.num_eval, seed=rc.seed, tokenizer=loaded.tokenizer,
        seq_len=rc.seq_len)
    train_set = tokenize_set(train_records, loaded.tokenizer, rc.seq_len, rc.overlong, "training")
    eval_set = tokenize_set(eval_records, loaded.tokenizer, rc.seq_len, rc.overlong, "held-out")
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"{len(train_set)} training examples cannot fill a batch of {cfg.batch_size}")

    controller = adore.controller_from_settings(settings, seed=cfg.seed)
    ctl_graphdef, params = nnx.split(controller)
    model_graphdef, model_state = nnx.split(loaded.model)
    tx = optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.steps, alpha=0.1))
    opt_state = tx.init(params)
    position, step = DataPosition(seed=cfg.seed), 0
    with ck.Checkpointer(out / adore.CHECKPOINTS, max_to_keep=2) as mgr:
        if mgr.latest_step() is not None:
            target = {"params": ck.abstract_tree(params), "opt_state": ck.abstract_tree(opt_state),
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}
            state, data = mgr.restore(target)
            params, opt_state, step = state["params"], state["opt_state"], int(state["step"])
            position = DataPosition.from_dict(data["position"])
            print(f"[adore] resuming {out} at step {step}", file=sys.stderr)
        log = runs.MetricsLog(out, step, enabled=True, tensorboard=False)
        train_step, eval_step = make_steps(model_graphdef, ctl_graphdef, tx, cfg.top_k, cfg.recall_at)

        def held_out():
            loss = rec = 0.0
            idx = np.arange(len(eval_set))
            chunks = [idx[i:i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
            for c in chunks:
                c = np.resize(c, cfg.batch_size)  # one shape: the last chunk repeats rows
                b = eval_set.rows(c)
                chunk_loss, chunk_recall = eval_step(params, model_state, b["tokens"], b["loss_mask"], b["lengths"])
                loss, rec = loss + float(chunk_loss), rec + float(chunk_recall)
            return {"eval_loss": loss / len(chunks), "eval_recall": rec / len(chunks)}

        start = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=step, desc="adore controller", disable=not cfg.progress)
        metrics: dict[str, float] = {}
        while step < cfg.steps:
            idx, position = next_indices(len(train_set), cfg.batch_size, position)
            b = train_set.rows(idx)
            params, opt_state, m = train_step(params, opt_state, model_state, b["tokens"], b["loss_mask"],
                                              b["lengths"])
            step += 1
            bar.update(1)
            record = {"step": step, **{k: float(v) for k, v in m.items()},
                      "elapsed_s": time.perf_counter() - start}
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"controller loss is {record['loss']} at step {step}; lower --lr")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record.update(held_out())
                metrics = record
            bar.set_postfix(loss=f"{record['loss']:.3f}", recall=f"{record['recall']:.3f}")
            log.write(record)
            if step % cfg.save_every == 0 or step == cfg.steps:
                mgr.save(step, {"params": params, "opt_state": opt_state, "step": jnp.int32(step)},
                         {"position": position.to_dict()})
        bar.close()
        log.close()
        if not metrics:  # resumed at the end: evaluate what is there
            metrics = {"step": step, **held_out()}
    return metrics
