"""KV-cached batched greedy decoding.

Prompts are left-padded so every row's prompt ends at the same index and the rows decode in
lockstep; positions come from the validity mask (cumsum), so padding shifts no RoPE position.
Layout: [BOS][visual][pad..][prompt text][generated...] for EarthGPT, [pad..][tokens] for the
text-only decoder.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from earthgpt_jax.models.earthgpt import EarthGPT
from earthgpt_jax.models.llama import LlamaDecoder, init_cache


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    valid = np.zeros((len(sequences), length), bool)
    for i, seq in enumerate(sequences):
        if seq:
            tokens[i, length - len(seq):] = seq
            valid[i, length - len(seq):] = True
    return tokens, valid


def _greedy_loop(decode, embed_tokens, embeds, prefix_valid, cache, *, max_new_tokens, eos_id,
                 pad_id):
    """Prefill `embeds`, then one token per step; shared by every model that decodes text.

    decode(embeddings, positions, key_valid, cache, cache_index) -> (logits, cache);
    embed_tokens(ids [B, 1]) -> embeddings.
    """
    batch, prefill_len = prefix_valid.shape
    total = prefill_len + max_new_tokens
    key_valid = jnp.zeros((batch, total), bool).at[:, :prefill_len].set(prefix_valid)
    positions = jnp.cumsum(prefix_valid, axis=1) - 1
    logits, cache = decode(embeds, positions, key_valid, cache, 0)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    last_position = positions[:, -1]
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)

    def cond(carry):
        t, _, _, _, _, done = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, token, cache, key_valid, out, done = carry
        out = out.at[:, t].set(jnp.where(done, pad_id, token))
        done = done | (token == eos_id)
        index = prefill_len + t
        key_valid = key_valid.at[:, index].set(True)
        logits, cache = decode(embed_tokens(token[:, None]), (last_position + 1 + t)[:, None],
                               key_valid, cache, index)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return t + 1, token, cache, key_valid, out, done

    carry = (jnp.int32(0), first, cache, key_valid, out, jnp.zeros((batch,), bool))
    return jax.lax.while_loop(cond, body, carry)[4]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id"))
def greedy_generate(model: EarthGPT, params, images, prompt_tokens, prompt_valid, *,
                    max_new_tokens: int, eos_id: int, pad_id: int):
    """Image + left-padded prompt -> generated ids [B, max_new_tokens]; `pad_id` after `</s>`."""
    variables = {"params": params}
    embeds = model.apply(variables, images, prompt_tokens, method=EarthGPT.embed_prompt)
    prefix_valid = model.apply(variables, prompt_valid, method=EarthGPT.prefix_valid)
    cache = init_cache(model.cfg.llm, prompt_tokens.shape[0],
                       embeds.shape[1] + max_new_tokens, jnp.dtype(model.cfg.dtype))
    decode = functools.partial(model.apply, variables, method=EarthGPT.decode)
    embed = functools.partial(model.apply, variables, method=EarthGPT.embed_tokens)
    return _greedy_loop(decode, embed, embeds, prefix_valid, cache,
                        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens", "eos_id", "pad_id"))
def greedy_generate_text(decoder: LlamaDecoder, params, prompt_tokens, prompt_valid, *,
                         max_new_tokens: int, eos_id: int, pad_id: int):
    """Text-only greedy decoding with the LLaMA decoder alone (conversion checks, HF parity)."""
    variables = {"params": params}
    embed = functools.partial(decoder.apply, variables, method=LlamaDecoder.embed)
    cache = init_cache(decoder.cfg, prompt_tokens.shape[0],
                       prompt_tokens.shape[1] + max_new_tokens, decoder.dtype)
    return _greedy_loop(functools.partial(decoder.apply, variables), embed,
                        embed(prompt_tokens), prompt_valid.astype(bool), cache,
                        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
