"""The decoder computes what `transformers.LlamaForCausalLM` computes (tiny random models, fp32),
layer by layer, with and without scan and GQA; cached greedy decoding equals HF `generate`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from earthgpt_jax.generate import _decode_loop
from earthgpt_jax.models.llama import LlamaDecoder, init_cache
from earthgpt_jax.models.presets import LlamaConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LENGTH = 512


def hf_model(kv_heads, rope_theta, eps, seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=eps,
        rope_theta=rope_theta, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; random scales catch a misplaced norm
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def ours_from_hf(model, scan_layers):
    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                      intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers,
                      num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
                      rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_parameters["rope_theta"],
                      scan_layers=scan_layers)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    layers = []
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        layer = {p: {"kernel": sd[f"{pre}self_attn.{p}.weight"].T}
                 for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        layer |= {p: {"kernel": sd[f"{pre}mlp.{p}.weight"].T}
                  for p in ("gate_proj", "up_proj", "down_proj")}
        layer |= {n: {"scale": sd[f"{pre}{n}.weight"]}
                  for n in ("input_layernorm", "post_attention_layernorm")}
        layers.append(layer)
    params = {"embed_tokens": {"embedding": sd["model.embed_tokens.weight"]},
              "norm": {"scale": sd["model.norm.weight"]},
              "lm_head": {"kernel": sd["lm_head.weight"].T}}
    if scan_layers:
        params["layers"] = {m: {k: np.stack([l[m][k] for l in layers]) for k in layers[0][m]}
                            for m in layers[0]}
    else:
        params |= {f"layers_{i}": l for i, l in enumerate(layers)}
    return LlamaDecoder(cfg), params


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("kv_heads,rope_theta,eps", [(2, 500.0, 1e-6), (4, 10000.0, 1e-5)])
def test_logits_and_every_layer_match_transformers(scan_layers, kv_heads, rope_theta, eps):
    model = hf_model(kv_heads, rope_theta, eps)
    ids = np.random.default_rng(0).integers(0, 128, (2, LENGTH))
    with torch.no_grad():
        out = model(torch.tensor(ids), output_hidden_states=True)
    decoder, params = ours_from_hf(model, scan_layers)
    embeds = decoder.apply({"params": params}, jnp.asarray(ids), method=LlamaDecoder.embed)
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (2, LENGTH))
    (logits, _), state = decoder.apply({"params": params}, embeds, positions,
                                       jnp.ones((2, LENGTH), bool), mutable=["intermediates"])
    inter = state["intermediates"]
    if scan_layers:
        hidden = list(inter["layers"]["hidden_state"][0])
    else:
        hidden = [inter[f"layers_{i}"]["hidden_state"][0] for i in range(3)]
    # HF's hidden_states: embeddings, then each layer's output (the last one after the norm).
    for i, ours in enumerate(hidden[:-1]):
        np.testing.assert_allclose(np.asarray(ours), out.hidden_states[i + 1].numpy(),
                                   atol=1e-4, err_msg=f"layer {i}")
    assert np.abs(np.asarray(logits) - out.logits.numpy()).max() <= 1e-4


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens"))
def greedy_generate_text(decoder, params, prompt_tokens, prompt_valid, *, max_new_tokens):
    """Text-only greedy decoding with the decoder alone: generate's loop and KV cache."""
    variables = {"params": params}
    embed = functools.partial(decoder.apply, variables, method=LlamaDecoder.embed)
    # head_from=-1: the LM head at the last position only (the prefill needs no other logits).
    decode = functools.partial(decoder.apply, variables, head_from=-1)
    batch, prefill_len = prompt_tokens.shape
    cache = init_cache(decoder.cfg, batch, prefill_len + max_new_tokens, decoder.dtype)
    key_valid = jnp.zeros((batch, prefill_len + max_new_tokens), bool)
    key_valid = key_valid.at[:, :prefill_len].set(prompt_valid)
    positions = jnp.cumsum(prompt_valid, axis=1) - 1
    logits, cache = decode(embed(prompt_tokens), positions, key_valid, cache, 0)
    return _decode_loop(decode, embed, logits[:, -1], cache, key_valid, positions[:, -1],
                        prefill_len, max_new_tokens=max_new_tokens, eos_id=-1, pad_id=0)


@pytest.mark.parametrize("scan_layers", [True, False])  # the two KV-cache layouts
def test_cached_greedy_decoding_equals_transformers_generate(scan_layers):
    model = hf_model(2, 10000.0, 1e-5, seed=1)
    decoder, params = ours_from_hf(model, scan_layers=scan_layers)
    prompt = np.random.default_rng(1).integers(3, 128, (1, 20))
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompt), max_new_tokens=32, do_sample=False,
                                  eos_token_id=None, pad_token_id=0,
                                  attention_mask=torch.ones_like(torch.tensor(prompt)))
    got = greedy_generate_text(decoder, params, jnp.asarray(prompt, jnp.int32),
                               jnp.ones(prompt.shape, bool), max_new_tokens=32)
    assert np.asarray(got)[0].tolist() == expected[0, 20:].tolist()
