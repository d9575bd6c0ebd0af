"""The optimizer and the trainable sets of the paper's stages, as masks over the params tree.

Frozen parameters get `optax.set_to_zero()`, which keeps no state: optimizer memory is spent on
trainable parameters only.
"""

from __future__ import annotations

import re

import jax
import optax
from flax import traverse_util

# Which parameter paths each stage trains (regexes over '/'-joined paths).
STAGE_TRAINABLE = {
    # Demo from scratch: nothing is pre-trained, so everything learns.
    "all": (r".*",),
    # Stage A, cross-modal mutual comprehension: projector, attention q/k/v and RMSNorm scales.
    "a": (r"^projector/", r"^llm/layers/(q_proj|k_proj|v_proj)/", r"^llm/.*norm.*/scale$"),
    # Stage B, unified instruction tuning: only the bias/scale adapters (+ projector).
    "b": (r"^llm/.*/adapter_(scale|bias)$", r"^projector/"),
}


def trainable_labels(params, stage: str):
    """A tree of 'train'/'freeze' labels with the structure of `params`."""
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGE_TRAINABLE)}")
    patterns = [re.compile(p) for p in STAGE_TRAINABLE[stage]]
    flat = traverse_util.flatten_dict(params, sep="/")
    labels = {path: "train" if any(p.search(path) for p in patterns) else "freeze"
              for path in flat}
    if "train" not in labels.values():
        raise ValueError(f"stage {stage!r} trains no parameter of this model (adapters off?)")
    return traverse_util.unflatten_dict(labels, sep="/")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """Linear warmup, then cosine decay to `end_lr_fraction` of the peak."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.get("lr_decay_steps") or cfg.num_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.end_lr_fraction)


def make_optimizer(train_cfg, labels) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                        weight_decay=train_cfg.weight_decay)
    tx = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), adamw)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def count_params(tree, labels=None) -> int:
    leaves = jax.tree.leaves(tree)
    if labels is None:
        return sum(x.size for x in leaves)
    return sum(x.size for x, l in zip(leaves, jax.tree.leaves(labels)) if l == "train")
