"""The optimizer keeps what it trains: weight decay touches matrices only, small adapter scales
reach a bf16 forward, and every stage trains the same set whether layers are scanned or not."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from earthgpt_jax import optim
from earthgpt_jax.config import TrainConfig
from earthgpt_jax.models.earthgpt import EarthGPT, abstract_params
from earthgpt_jax.models.layers import Linear
from earthgpt_jax.models.presets import get_preset


def _train_cfg(weight_decay=0.1):
    return TrainConfig(learning_rate=1e-2, warmup_steps=0, num_steps=10, end_lr_fraction=1.0,
                       weight_decay=weight_decay)


def test_weight_decay_leaves_norms_biases_and_adapters_unchanged():
    """With zero gradients only decay moves a parameter: matrices shrink, nothing else moves
    (before the fix, AdamW decayed every trainable leaf, adapter scales toward 0)."""
    params = {
        "llm": {"layers": {"q_proj": {"kernel": jnp.ones((2, 4, 4)),
                                      "adapter_scale": jnp.ones((2, 4)),
                                      "adapter_bias": jnp.full((2, 4), 0.5)},
                           "input_layernorm": {"scale": jnp.ones((2, 4))}},
                "embed_tokens": {"embedding": jnp.ones((8, 4))},
                "norm": {"scale": jnp.ones((4,))}},
        "projector": {"kernel": jnp.ones((3, 4)), "bias": jnp.full((4,), 0.25)},
        "vit": {"cls_token": jnp.ones((1, 1, 4))},
    }
    labels = jax.tree.map(lambda _: "train", params)
    labels["vit"]["cls_token"] = "freeze"
    tx = optim.make_optimizer(_train_cfg(), labels)
    state = tx.init(params)
    current = params
    for _ in range(3):
        updates, state = tx.update(jax.tree.map(jnp.zeros_like, current), state, current)
        current = optax.apply_updates(current, updates)
    before = traverse_util.flatten_dict(params, sep="/")
    after = traverse_util.flatten_dict(current, sep="/")
    decayed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert decayed == {"llm/layers/q_proj/kernel", "llm/embed_tokens/embedding",
                       "projector/kernel"}
    for path in decayed:
        assert np.all(np.asarray(after[path]) < np.asarray(before[path]))


def test_weight_decay_mask_names_matrices_only():
    params = {"a": {"kernel": 0, "bias": 0, "adapter_scale": 0}, "emb": {"embedding": 0},
              "n": {"scale": 0}}
    mask = traverse_util.flatten_dict(optim.weight_decay_mask(params), sep="/")
    assert {p for p, m in mask.items() if m} == {"a/kernel", "emb/embedding"}


def test_small_adapter_scale_changes_a_bf16_forward():
    """A learned scale of 1 + 1e-3 is exactly 1 in bf16: the adapter must multiply in fp32."""
    layer = Linear(64, (None, None), adapter=True, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (4, 32), jnp.float32)
    params = layer.init(jax.random.key(1), x)["params"]
    base = layer.apply({"params": params}, x)
    for delta in (1e-3, 3e-3):
        scaled = dict(params, adapter_scale=jnp.full((64,), 1.0 + delta))
        out = layer.apply({"params": scaled}, x)
        assert out.dtype == jnp.bfloat16
        changed = np.mean(np.asarray(out != base))
        assert changed > 0.1, (delta, changed)
        # And in the right direction: the output grows by about the scale.
        ratio = np.asarray(out, np.float32).ravel() / np.asarray(base, np.float32).ravel()
        big = np.abs(np.asarray(base, np.float32).ravel()) > 0.5
        assert abs(np.median(ratio[big]) - (1 + delta)) < 2e-3


def _paths(scan_layers: bool, adapters: bool) -> list[str]:
    cfg = get_preset("tiny", vocab_size=64,
                     llm={"scan_layers": scan_layers, "adapters": adapters})
    abstract = jax.tree.map(lambda x: x, abstract_params(EarthGPT(cfg)))
    import flax.linen as nn
    return traverse_util.flatten_dict(nn.unbox(abstract), sep="/")


@pytest.mark.parametrize("stage", ["a", "b", "all"])
def test_every_stage_trains_the_same_set_scanned_or_unrolled(stage):
    adapters = stage == "b"
    sets = {}
    for scan in (True, False):
        params = _paths(scan, adapters)
        labels = traverse_util.flatten_dict(
            optim.trainable_labels(traverse_util.unflatten_dict(params, sep="/"), stage), sep="/")
        # layers_<i>/... (unrolled) names the same parameter as layers/... (scanned).
        sets[scan] = {re.sub(r"^llm/layers_\d+/", "llm/layers/", p)
                      for p, label in labels.items() if label == "train"}
    assert sets[True] == sets[False]
    if stage == "a":
        assert {"llm/layers/q_proj/kernel", "llm/layers/k_proj/kernel",
                "llm/layers/v_proj/kernel"} <= sets[True]
        assert "llm/layers/o_proj/kernel" not in sets[True]


def test_a_stage_pattern_that_matches_nothing_is_an_error():
    params = traverse_util.unflatten_dict(_paths(True, adapters=False), sep="/")
    with pytest.raises(ValueError, match=r"stage 'b'.*adapter_"):
        optim.trainable_labels(params, "b")
