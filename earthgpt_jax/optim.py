"""The optimizer and the trainable sets of the paper's stages, as masks over the params tree.

Frozen parameters get `optax.set_to_zero()`, which keeps no state. Weight decay pulls only
matrices toward zero, as big_vision and MaxText do: decaying a norm or adapter scale pulls it
toward 0, not its neutral 1, so a stage-B run would shrink everything it trains.
"""

from __future__ import annotations

import re

import jax
import optax
from flax import traverse_util

from earthgpt_jax.config import STAGES, TrainConfig

# Which parameter paths each stage trains (regexes over '/'-joined paths).
STAGE_TRAINABLE = {
    # Demo from scratch: nothing is pre-trained, so everything learns.
    "all": (r".*",),
    # Stage A, cross-modal mutual comprehension: projector, attention q/k/v and RMSNorm scales
    # (`layers/` scanned, `layers_<i>/` unrolled). The band adapter (models/bands.py) trains
    # beside the projector, in one pattern so that a model without it still matches.
    "a": (r"^(projector|band_adapter)/",
          r"^llm/layers(_\d+)?/(q_proj|k_proj|v_proj)/(kernel|bias)$", r"^llm/.*norm.*/scale$"),
    # Stage B, unified instruction tuning: only the bias/scale adapters (+ projector).
    "b": (r"^llm/.*/adapter_(scale|bias)$", r"^(projector|band_adapter)/"),
    # LoRA (config.model.lora): only the low-rank factors, so the optimizer keeps state for
    # them alone and the export is the base LLaMA plus a PEFT adapter (convert orbax-to-hf).
    "lora": (r"^llm/.*/lora_(a|b)$",),
}
assert tuple(STAGE_TRAINABLE) == STAGES  # config.train.stage is checked against STAGES


def trainable_labels(params, stage: str):
    """'train'/'freeze' labels with the structure of `params`."""
    if stage not in STAGE_TRAINABLE:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGE_TRAINABLE)}")
    patterns = [re.compile(p) for p in STAGE_TRAINABLE[stage]]
    flat = traverse_util.flatten_dict(params, sep="/")
    # Every pattern must select something: a pattern that silently matches nothing (a layout
    # it was not written for) would train a smaller set than the stage promises.
    unmatched = [p.pattern for p in patterns if not any(p.search(path) for path in flat)]
    if unmatched:
        raise ValueError(f"stage {stage!r}: no parameter of this model matches {unmatched} "
                         f"(adapters off for stage b? LoRA rank 0 for stage lora? a parameter "
                         f"layout the stage does not know?); e.g. {sorted(flat)[:3]}")
    labels = {path: "train" if any(p.search(path) for p in patterns) else "freeze"
              for path in flat}
    return traverse_util.unflatten_dict(labels, sep="/")


# Leaf names that are matrices (or stacks of them under nn.scan): the only leaves weight decay
# touches. Named rather than told by ndim, since a scanned RMSNorm scale is [layers, dim].
# LoRA's factors decay too, as in PEFT + HF Trainer (decaying B pulls toward the base model).
DECAYED_LEAF_NAMES = frozenset({"kernel", "embedding", "lora_a", "lora_b"})


def weight_decay_mask(params):
    """True for the leaves weight decay applies to, by leaf name (see DECAYED_LEAF_NAMES)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in DECAYED_LEAF_NAMES, params)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup, then cosine decay to `end_lr_fraction` of the peak."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.decay_steps, end_value=cfg.learning_rate * cfg.end_lr_fraction)


def make_optimizer(train_cfg: TrainConfig, labels) -> optax.GradientTransformation:
    """AdamW with a unit learning rate over the trainable leaves: the train step scales the
    updates (decoupled weight decay included, as in adamw) by the schedule's rate, an argument,
    so that the schedule is no constant of the compiled program."""
    adamw = optax.adamw(1.0, b1=train_cfg.b1, b2=train_cfg.b2,
                        weight_decay=train_cfg.weight_decay, mask=weight_decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip_norm), adamw)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)

