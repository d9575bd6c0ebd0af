"""The model: LLaMA decoder parity with transformers, cached decoding, real 7B/13B shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from earthgpt_jax.generate import greedy_generate, left_pad
from earthgpt_jax.models.earthgpt import EarthGPT
from earthgpt_jax.models.llama import LlamaDecoder
from earthgpt_jax.models.presets import LlamaConfig, get_preset
from earthgpt_jax.train import abstract_params


def _count(tree):
    return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("size,expected", [("7b", 6_738_415_616), ("13b", 13_015_864_320)])
def test_language_model_parameter_counts_match_llama2(size, expected):
    params = nn.unbox(abstract_params(EarthGPT(get_preset(size))))
    assert _count(params["llm"]) == expected


def test_llama_decoder_matches_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, rms_norm_eps=1e-5,
                                      rope_theta=500.0, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=500.0)

    def stack(name):  # torch Linear [out, in] -> our kernel [in, out], layers stacked
        return np.stack([sd[f"model.layers.{i}.{name}"].T for i in range(2)])

    layer = {p: {"kernel": stack(f"self_attn.{p}.weight")}
             for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    layer |= {p: {"kernel": stack(f"mlp.{p}.weight")} for p in ("gate_proj", "up_proj",
                                                                  "down_proj")}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        layer[norm] = {"scale": np.stack([sd[f"model.layers.{i}.{norm}.weight"]
                                          for i in range(2)])}
    params = {"embed_tokens": {"embedding": sd["model.embed_tokens.weight"]}, "layers": layer,
              "norm": {"scale": sd["model.norm.weight"]},
              "lm_head": {"kernel": sd["lm_head.weight"].T}}
    ids = np.random.default_rng(0).integers(0, 96, (2, 11))
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    dec = LlamaDecoder(cfg)
    embeds = dec.apply({"params": params}, jnp.asarray(ids), method=LlamaDecoder.embed)
    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    logits, _ = dec.apply({"params": params}, embeds, positions, jnp.ones((2, 11), bool))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=2e-5, rtol=1e-4)


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
