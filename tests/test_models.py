"""The model: cached decoding, frozen towers, real 7B/13B shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from earthgpt_jax.generate import greedy_generate, left_pad
from earthgpt_jax.models.earthgpt import EarthGPT
from earthgpt_jax.models.presets import get_preset
from earthgpt_jax.train import abstract_params


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("size,expected", [("7b", 6_738_415_616), ("13b", 13_015_864_320)])
def test_language_model_parameter_counts_match_llama2(size, expected):
    params = nn.unbox(abstract_params(EarthGPT(get_preset(size))))
    assert _count(params["llm"]) == expected


def test_cached_greedy_decoding_equals_full_forward_argmax():
    cfg = get_preset("tiny", vocab_size=64)
    model = EarthGPT(cfg)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    prompts = [list(rng.integers(3, 64, 5)), list(rng.integers(3, 64, 9))]
    tokens, valid = left_pad(prompts, 0)
    params = nn.unbox(model.init(jax.random.key(0), images, tokens, valid))["params"]
    steps = 6
    # eos_id=-1: never stops, so every step is compared.
    got = np.asarray(greedy_generate(model, params, images, tokens, valid, max_new_tokens=steps,
                                     eos_id=-1, pad_id=0))
    width = max(map(len, prompts)) + steps + 1

    @jax.jit
    def next_token(image, seq, length):
        # No cache, no left padding: right-padded keys are never attended (causal). Entry t of
        # the output predicts input token t, so entry `length` follows the whole sequence.
        logits = model.apply({"params": params}, image, seq, jnp.arange(width)[None] <= length)
        return jnp.argmax(logits[0, length])

    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(steps):
            padded = jnp.asarray([seq + [0] * (width - len(seq))])
            seq.append(int(next_token(images[row:row + 1], padded, len(seq))))
        assert got[row].tolist() == seq[len(prompt):], f"row {row}"


def test_frozen_towers_get_no_gradient():
    cfg = get_preset("tiny", vocab_size=64, freeze_vision=True)
    model = EarthGPT(cfg)
    images = np.zeros((1, 32, 32, 3), np.uint8)
    tokens, valid = np.ones((1, 4), np.int32), np.ones((1, 4), bool)
    params = nn.unbox(model.init(jax.random.key(0), images, tokens, valid))["params"]
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, images, tokens, valid).sum()))(params)
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads["vit"]))
    assert float(jnp.abs(grads["projector"]["kernel"]).sum()) > 0


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        get_preset("huge")


def test_parameter_summary_counts_parts_and_stage_b_trainables():
    from earthgpt_jax import optim
    from earthgpt_jax.models.summary import parameter_summary

    cfg = get_preset("7b", llm_adapters=True)
    params = nn.unbox(abstract_params(EarthGPT(cfg)))
    counts = parameter_summary(params, optim.trainable_labels(params, "b"))
    # One scale and one bias per output feature of every decoder linear, per layer.
    per_layer = 2 * (3 * 4096 + 4096 + 2 * 11008 + 4096)
    assert counts["adapters"] == 32 * per_layer
    assert counts["llm"] == 6_738_415_616
    assert counts["trainable"] == counts["adapters"] + counts["projector"]
    assert counts["total"] == sum(counts[k] for k in ("llm", "vit", "convnext", "projector",
                                                       "adapters"))
