"""LoRA fine-tuning on top of `Llama`, built from flax.nnx's own LoRA modules.

A wrapped projection is a `ScaledLoRALinear` (an `nnx.LoRALinear`), so its base
kernel stays at the same path (`...q_proj.kernel`) and a weight loader or
checkpoint written for the plain model still finds it; the adapters appear
beside it as `...q_proj.lora.lora_a` [in, r] and `...q_proj.lora.lora_b` [r, out]
(`nnx.LoRAParam`). The forward is y = x W + (alpha / r) * x A B, the scaling
of Hu et al. (2021) that flax's LoRA leaves out.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from selfspan_jax.model import Llama, NewTokenParam

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")

# Selects what LoRA fine-tuning trains: the adapters plus the rows that
# `Llama.add_tokens` appended (the span tokens have no pretrained embedding,
# so they must learn one). Use as `nnx.Optimizer(model, tx, wrt=lora_trainable_filter)`
# and `nnx.grad(loss, argnums=nnx.DiffState(0, lora_trainable_filter))`.
lora_trainable_filter = nnx.Any(nnx.LoRAParam, NewTokenParam)


class ScaledLoRALinear(nnx.LoRALinear):
    """nnx.LoRALinear with the LoRA branch multiplied by `lora_scale` = alpha / rank.

    The branch is cast to the base output dtype so a bf16 model stays bf16
    even though the adapters are stored in fp32 (optimizer precision).
    """

    def __init__(self, in_features: int, out_features: int, *, lora_rank: int, lora_scale: float, **kwargs):
        super().__init__(in_features, out_features, lora_rank=lora_rank, **kwargs)
        self.lora_scale = float(lora_scale)

    def __call__(self, x: jax.Array, out_sharding=None) -> jax.Array:
        # x: [..., in] -> [..., out]
        y = nnx.Linear.__call__(self, x)
        return y + (self.lora_scale * self.lora(x)).astype(y.dtype)


def _parents(model: Llama, targets: tuple[str, ...]):
    """(parent module, attribute name) of every targeted projection, in layer order."""
    for layer in model.layers:
        for name in targets:
            yield (layer.attn if name in ATTN_TARGETS else layer.mlp), name


def apply_lora(model: Llama, *, rank: int, alpha: float, targets=ATTN_TARGETS, include_mlp: bool = False,
               rngs: nnx.Rngs) -> Llama:
    """Wrap the chosen projections of every layer in place; returns `model` for chaining.

    A is he-uniform, B is zero, so the model's output is unchanged at init.
    `include_mlp=True` adds gate/up/down_proj to `targets`.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"apply_lora: rank must be a positive int, got {rank!r}")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"apply_lora: alpha must be a positive number, got {alpha!r}")
    targets = tuple(targets) + (MLP_TARGETS if include_mlp else ())
    unknown = [t for t in targets if t not in ATTN_TARGETS + MLP_TARGETS]
    if unknown or not targets:
        raise ValueError(f"apply_lora: targets {unknown or targets!r} not in {ATTN_TARGETS + MLP_TARGETS}")
    targets = tuple(dict.fromkeys(targets))  # de-duplicate, keep order
    if is_lora(model):
        raise ValueError("apply_lora: model already has LoRA adapters; merge_lora first")
    # Check every projection before wrapping any, so a bad rank leaves the model untouched.
    for parent, name in _parents(model, targets):
        base = getattr(parent, name)
        if rank > min(base.in_features, base.out_features):
            raise ValueError(f"apply_lora: rank={rank} exceeds min(in, out) of {name} "
                             f"({base.in_features}, {base.out_features})")
    for parent, name in _parents(model, targets):
        base = getattr(parent, name)
        kernel = base.kernel[...]
        wrapped = ScaledLoRALinear(
            base.in_features, base.out_features, lora_rank=rank, lora_scale=alpha / rank,
            use_bias=False, dtype=base.dtype, param_dtype=base.param_dtype,
            # Reuse the pretrained kernel instead of drawing a random one.
            kernel_init=lambda *_, kernel=kernel: kernel,
            lora_dtype=base.dtype, lora_param_dtype=jnp.float32, rngs=rngs,
        )
        setattr(parent, name, wrapped)
    return model


def is_lora(model: Llama) -> bool:
    """True if any LoRA adapter is present."""
    return len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) > 0


def merge_lora(model: Llama) -> Llama:
    """Fold W + (alpha/r) A B into every wrapped kernel and restore plain nnx.Linear, in place.

    The merge is computed in fp32 and rounded once to the storage dtype.
    Afterwards the model has exactly the plain parameter layout again.
    """
    for parent, name in _parents(model, ATTN_TARGETS + MLP_TARGETS):
        mod = getattr(parent, name)
        if not isinstance(mod, nnx.LoRALinear):
            continue
        scale = getattr(mod, "lora_scale", 1.0)  # plain nnx.LoRALinear has no scaling
        # delta: [in, out] = A [in, r] @ B [r, out]
        delta = jnp.matmul(mod.lora.lora_a[...].astype(jnp.float32), mod.lora.lora_b[...].astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
        merged = (mod.kernel[...].astype(jnp.float32) + scale * delta).astype(mod.param_dtype)
        plain = nnx.Linear(mod.in_features, mod.out_features, use_bias=False, dtype=mod.dtype,
                           param_dtype=mod.param_dtype, kernel_init=lambda *_, merged=merged: merged,
                           rngs=nnx.Rngs(0))
        setattr(parent, name, plain)
    return model
