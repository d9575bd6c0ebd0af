"""KV-cached batched greedy decoding.

Prompts are left-padded so every row's prompt ends at the same index and the rows decode in
lockstep; positions come from the validity mask (cumsum), so padding shifts no RoPE position.
Layout: [BOS][visual][pad..][prompt text][generated...].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from earthgpt_jax.models.earthgpt import EarthGPT
from earthgpt_jax.models.llama import init_cache


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    valid = np.zeros((len(sequences), length), bool)
    for i, seq in enumerate(sequences):
        if seq:
            tokens[i, length - len(seq):] = seq
            valid[i, length - len(seq):] = True
    return tokens, valid


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id"))
def greedy_generate(model: EarthGPT, params, images, prompt_tokens, prompt_valid, *,
                    max_new_tokens: int, eos_id: int, pad_id: int):
    """-> generated ids [B, max_new_tokens]; after `</s>` a row holds `pad_id`."""
    cfg = model.cfg
    variables = {"params": params}
    batch = prompt_tokens.shape[0]
    embeds = model.apply(variables, images, prompt_tokens, method=EarthGPT.embed_prompt)
    prefix_valid = model.apply(variables, prompt_valid, method=EarthGPT.prefix_valid)
    prefill_len = embeds.shape[1]
    total = prefill_len + max_new_tokens
    key_valid = jnp.zeros((batch, total), bool).at[:, :prefill_len].set(prefix_valid)
    positions = jnp.cumsum(prefix_valid, axis=1) - 1
    cache = init_cache(cfg.llm, batch, total, jnp.dtype(cfg.dtype))
    logits, cache = model.apply(variables, embeds, positions, key_valid, cache, 0,
                                method=EarthGPT.decode)
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
        embedded = model.apply(variables, token[:, None], method=EarthGPT.embed_tokens)
        logits, cache = model.apply(variables, embedded, (last_position + 1 + t)[:, None],
                                    key_valid, cache, index, method=EarthGPT.decode)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return t + 1, token, cache, key_valid, out, done

    carry = (jnp.int32(0), first, cache, key_valid, out, jnp.zeros((batch,), bool))
    return jax.lax.while_loop(cond, body, carry)[4]
