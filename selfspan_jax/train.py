"""Fine-tuning on span-annotated data: the loss, the optimizer, the steps and the loop.

The config is `train_config.TrainConfig`, the model it names is built by
`models.build_model`, the data come from the `tasks` registry through
`data.batches`, and the run directory (config, metrics, checkpoints,
exports) is `runs`. `scripts/train.py` only parses flags into a
`TrainConfig` and calls `train`.
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

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from selfspan_jax import runs, tasks
from selfspan_jax import sharding as shd
from selfspan_jax.checkpoint import abstract_tree
from selfspan_jax.data.batches import DataPosition, TokenizedSet, next_indices, tokenize_set
from selfspan_jax.evaluate import decode
from selfspan_jax.models import build_model, trainable_filter
from selfspan_jax.policies import make_policy
from selfspan_jax.spans import SpanTokens, attention_mask
from selfspan_jax.train_config import TrainConfig


class TrainingDiverged(FloatingPointError):
    """Loss became NaN/inf; the last good checkpoint is left in place."""


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
# Steps
# ---------------------------------------------------------------------------
def _mask_fn(cfg: TrainConfig, span_tokens) -> Callable[[dict], jax.Array | None]:
    """Batch -> attention mask bool [B, T, T] (self_span) or None (dense = causal).

    Dense needs no padding mask: padding is at the right end and never a
    loss target, so causal queries before it never see it.
    """
    if cfg.span_policy == "dense":
        return lambda batch: None
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
    model, tokenizer = build_model(cfg)
    span_tokens = SpanTokens.from_tokenizer(tokenizer)
    train_records, eval_records = tasks.get(cfg.task).training_records(
        cfg.data, num_train=cfg.num_train, num_eval=cfg.num_eval, seed=cfg.seed, tokenizer=tokenizer,
        seq_len=cfg.seq_len)
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
    shd.maybe_initialize_distributed()
    # One writer per run directory (process 0 of a multi-process job writes for all).
    with runs.RunLock(cfg.run_dir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train(cfg, mesh)


def _train(cfg: TrainConfig, mesh) -> TrainResult:
    t_start, cpu_start = time.time(), time.process_time()
    runs.check_resumable(cfg)
    b = build(cfg, mesh)
    runs.prepare(cfg)
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
    ckpt = runs.checkpointer(cfg)
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
        trainable = runs.warm_start_params(cfg, trainable, b.param_shardings)
    is_main = jax.process_index() == 0
    log = runs.MetricsLog(cfg.run_dir, step, is_main, cfg.tensorboard)
    schedule = make_schedule(cfg)
    rows = shd.local_batch_slice(cfg.batch_size)

    def save(at_step: int):
        # The step as a global (replicated) array: a host-local scalar cannot be saved by a multi-process job
        step_array = jax.device_put(np.int32(at_step), rep)
        ckpt.save(at_step, {"params": trainable, "opt_state": opt_state, "step": step_array},
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
        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.task}", dynamic_ncols=True, file=sys.stderr)
    t_last, tokens_since = time.time(), 0
    final_eval: dict[str, float] = {}
    def evaluate_and_log() -> dict[str, float]:
        nonlocal t_last
        metrics = evaluate(b, trainable, eval_step, generate=cfg.eval_generate)
        log.write({"step": step, **metrics})
        if bar is not None:
            bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        t_last = time.time()  # evaluation time is not training throughput
        return metrics

    try:
        if runs.evaluation_owed(cfg, step):
            # the last run was killed between this step's checkpoint and its evaluation
            final_eval = evaluate_and_log()
        while step < cfg.steps:
            idx, pos = next_indices(len(b.train_set), cfg.batch_size, pos)
            # the width comes from the whole global batch, so every process cuts its rows alike
            host = b.train_set.rows(idx, cfg.pad_multiple)
            host = {k: v[rows] for k, v in host.items()}
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
                final_eval = evaluate_and_log()
        flush(time.time())
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
        log.close()
    result = TrainResult(cfg.run_dir, step, trainable, b.frozen, b.graphdef, b.tokenizer, final_eval,
                         time.time() - t_start)
    if is_main:
        runs.export(cfg, result.model, result.tokenizer)
    return result


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
        host = b.eval_set.rows(np.minimum(idx, n - 1), cfg.pad_multiple)
        # Padding rows repeat the last example with no loss targets, so every
        # eval batch has one static shape (one compile).
        host["loss_mask"] = host["loss_mask"] & valid[:, None]
        host = {k: v[rows] for k, v in host.items()}
        out = eval_step(trainable, b.frozen, shd.put_batch(host, b.mesh))
        total += np.asarray(jax.device_get(out), np.float64)
    metrics = {"eval_loss": total[0] / max(total[1], 1), "eval_token_acc": total[2] / max(total[1], 1)}
    # Generation runs on this host's devices; with several hosts the
    # parameters are not all addressable here, so exact match is skipped.
    task = tasks.get(cfg.task)
    if generate and "exact_match" in task.accuracy_keys and jax.process_count() == 1:
        metrics["eval_exact_match"] = exact_match(b, trainable)
    return metrics


def exact_match(b: Built, trainable) -> float:
    """Fraction of held-out problems whose greedy completion the task's checker
    accepts, generated with the run's span policy and the task's budget."""
    cfg = b.cfg
    model = nnx.merge(b.graphdef, jax.device_get(trainable), jax.device_get(b.frozen))
    records = b.eval_set.records
    max_new = tasks.generation_budget(records, b.tokenizer, model.config.max_seq_len)
    policy = make_policy(cfg.span_policy, tokenizer=b.tokenizer, max_segments=cfg.max_segments)
    out = decode(model, b.tokenizer, [r["prompt"] for r in records], policy=policy,
                 batch_size=cfg.eval_batch_size, max_new_tokens=max_new)
    return float(np.mean(tasks.get(cfg.task).exact(records, out.texts)))
