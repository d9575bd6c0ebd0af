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


def test_fused_attention_equals_einsum_on_right_padded_batches():
    base = get_preset("tiny", vocab_size=64)
    images = np.random.default_rng(2).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    tokens = np.random.default_rng(3).integers(3, 64, (2, 7)).astype(np.int32)
    valid = np.arange(7)[None] < np.array([[7], [4]])  # row 1 right-padded
    params = nn.unbox(EarthGPT(base).init(jax.random.key(0), images, tokens, valid))["params"]
    want = EarthGPT(base).apply({"params": params}, images, tokens, valid)
    fused = get_preset("tiny", vocab_size=64, llm_attention_impl="xla")
    got = EarthGPT(fused).apply({"params": params}, images, tokens, valid)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        get_preset("tiny", llm_attention_impl="flash")


def test_unrolled_decoding_gives_the_scanned_tokens():
    from earthgpt_jax.generate import unrolled_for_decoding

    model = EarthGPT(get_preset("tiny", vocab_size=64))
    rng = np.random.default_rng(4)
    images = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    tokens, valid = left_pad([list(rng.integers(3, 64, 3)), list(rng.integers(3, 64, 6))], 0)
    params = nn.unbox(model.init(jax.random.key(1), images, tokens, valid))["params"]
    unrolled, unrolled_params = unrolled_for_decoding(model, params)
    assert "layers" not in unrolled_params["llm"] and "layers_1" in unrolled_params["llm"]
    kwargs = dict(max_new_tokens=5, eos_id=-1, pad_id=0)
    want = greedy_generate(model, params, images, tokens, valid, **kwargs)
    got = greedy_generate(unrolled, unrolled_params, images, tokens, valid, **kwargs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
