"""The model: cached decoding, frozen towers, real 7B/13B shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from earthgpt_jax.generate import greedy_generate, left_pad
from earthgpt_jax.models.earthgpt import EarthGPT
from earthgpt_jax.models.presets import get_preset
from earthgpt_jax.models.earthgpt import abstract_params


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
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens, valid))["params"]
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
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens, valid))["params"]
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, images, tokens, valid).sum()))(params)
    assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads["vit"]))
    assert float(jnp.abs(grads["projector"]["kernel"]).sum()) > 0


def test_unknown_size_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        get_preset("huge")


def test_parameter_summary_counts_parts_and_stage_b_trainables():
    from earthgpt_jax import optim
    from earthgpt_jax.models.flops import parameter_summary

    cfg = get_preset("7b", llm={"adapters": True})
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
    params = nn.unbox(jax.jit(EarthGPT(base).init)(jax.random.key(0), images, tokens,
                                                   valid))["params"]
    want = jax.jit(EarthGPT(base).apply)({"params": params}, images, tokens, valid)
    fused = get_preset("tiny", vocab_size=64, llm={"attention_impl": "xla"})
    got = jax.jit(EarthGPT(fused).apply)({"params": params}, images, tokens, valid)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        get_preset("tiny", llm={"attention_impl": "flash"})


def _dense_attention(q, k, v, allowed):
    """The reference: per head, softmax over the allowed keys of q k^T / sqrt(d), then V
    (float64; kv head h // (H / KV) serves query head h)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(allowed[:, None], scores, -np.inf)
    with np.errstate(invalid="ignore"):  # a query that may see no key gets nan (not compared)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


def _random_qkv(seed, batch, t, heads=4, kv_heads=2, dim=8):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((batch, t, h, dim)), jnp.float32)
                 for h in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_attention_equals_a_dense_masked_softmax_in_every_mode(impl):
    from earthgpt_jax.models.layers import attention, write_cache

    t, causal = 6, np.tril(np.ones((6, 6), bool))
    # Unpacked rows, causal + right padding.
    q, k, v = _random_qkv(0, 2, t)
    valid = np.arange(t)[None] < np.array([[6], [4]])
    got = attention(q, k, v, impl=impl, key_valid=jnp.asarray(valid))
    want = _dense_attention(q, k, v, causal[None] & valid[:, None, :])
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    # Packed rows: a query sees its own segment only; padding (0) queries are not compared.
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2]])
    got = attention(q, k, v, impl=impl, segment_ids=jnp.asarray(seg))
    allowed = causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(got)[real], _dense_attention(q, k, v, allowed)[real],
                               atol=1e-5)
    # A cached decode step (and a two-token one): write_cache puts the new keys at slots
    # [index, index + new) of the heads-major cache; new queries see the valid slots up to
    # their own (row 1 left-padded: slots 0-1 never written), never the stale ones after.
    slots, index = 8, 5
    cache_k, cache_v = _random_qkv(1, 2, slots)[1:]
    for new in (1, 2):
        q, k, v = _random_qkv(2 + new, 2, new)
        valid = np.arange(slots)[None] < index + new
        valid = valid & ~((np.arange(2)[:, None] == 1) & (np.arange(slots)[None] < 2))
        cache = write_cache((cache_k.swapaxes(1, 2), cache_v.swapaxes(1, 2)), k, v, index)
        got = attention(q, k, v, impl=impl, key_valid=jnp.asarray(valid), cache=cache,
                        cache_index=index)
        written_k = np.asarray(cache_k).copy()
        written_v = np.asarray(cache_v).copy()
        written_k[:, index:index + new], written_v[:, index:index + new] = k, v
        np.testing.assert_array_equal(np.asarray(cache[0]).swapaxes(1, 2), written_k)
        np.testing.assert_array_equal(np.asarray(cache[1]).swapaxes(1, 2), written_v)
        query_slot = index + np.arange(new)
        allowed = (np.arange(slots)[None, :] <= query_slot[:, None])[None] & valid[:, None, :]
        np.testing.assert_allclose(np.asarray(got), _dense_attention(q, written_k, written_v,
                                                                     allowed), atol=1e-5)
    with pytest.raises(ValueError, match="key_valid .* or segment_ids"):
        attention(q, k, v, impl=impl)


def test_unrolled_decoding_gives_the_scanned_tokens():
    from earthgpt_jax.generate import unrolled_for_decoding

    model = EarthGPT(get_preset("tiny", vocab_size=64))
    rng = np.random.default_rng(4)
    images = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    tokens, valid = left_pad([list(rng.integers(3, 64, 3)), list(rng.integers(3, 64, 6))], 0)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), images, tokens, valid))["params"]
    unrolled, unrolled_params = unrolled_for_decoding(model, params)
    assert "layers" not in unrolled_params["llm"] and "layers_1" in unrolled_params["llm"]
    kwargs = dict(max_new_tokens=5, eos_id=-1, pad_id=0)
    want = greedy_generate(model, params, images, tokens, valid, **kwargs)
    got = greedy_generate(unrolled, unrolled_params, images, tokens, valid, **kwargs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
