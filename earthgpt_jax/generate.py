"""KV-cached batched greedy decoding.

Prompts are left-padded so every row's prompt ends at the same index and the rows decode in
lockstep; positions come from the validity mask (cumsum), so padding shifts no RoPE position.
Layout: [BOS][visual][pad..][prompt text][generated...] for EarthGPT, [pad..][tokens] for the
text-only decoder.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from earthgpt_jax.models.earthgpt import EarthGPT
from earthgpt_jax.models.llama import init_cache, select_cache_rows


def unrolled_for_decoding(model: EarthGPT, params) -> tuple[EarthGPT, dict]:
    """The same model with its decoder layers unrolled (`layers_0`, `layers_1`, ...).

    Training stacks layers under `nn.scan`; decoding that layout reads each step's weights
    through a dynamic slice of the stacked arrays, which XLA (GPU and CPU) materialises as a
    copy, so every generated token moves the weights about three times instead of once, and
    each layer's KV cache is a slice of a stacked one. `run.run` (evaluation after training
    and `--mode=eval`), `InferenceSession.from_workdir` (chat, web chat, scenes) and the
    benchmarks call this once and decode with the result (same maths, same tokens).
    """
    cfg = model.cfg
    if not cfg.llm.scan_layers:
        return model, params
    llm = dict(params["llm"])
    stacked = llm.pop("layers")
    for i in range(cfg.llm.num_layers):
        llm[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    unrolled = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, scan_layers=False))
    return EarthGPT(unrolled), {**params, "llm": llm}


def left_pad(sequences: list[list[int]], pad_id: int, multiple: int = 1
             ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, valid) [B, L], each row right-aligned; L is the longest rounded up to
    `multiple`, so callers compile one program per bucket of prompt lengths, not per length."""
    length = -(-max(len(s) for s in sequences) // multiple) * multiple
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    valid = np.zeros((len(sequences), length), bool)
    for i, seq in enumerate(sequences):
        if seq:
            tokens[i, length - len(seq):] = seq
            valid[i, length - len(seq):] = True
    return tokens, valid


def _argmax_token(logits, rng):
    del rng  # greedy decoding draws nothing
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _decode_loop(decode, embed_tokens, logits, cache, key_valid, last_position, prefill_len, *,
                 max_new_tokens, eos_id, pad_id, pick=_argmax_token, rng=None):
    """One token per step after a prefill (`_prefill_state`'s outputs); greedy decoding and
    sampling differ only in `pick`.

    decode(embeddings, positions, key_valid, cache, cache_index) -> (logits, cache);
    embed_tokens(ids [B, 1]) -> embeddings; pick(logits [B, V], rng) -> ids [B].
    """
    rng = jax.random.key(0) if rng is None else rng
    batch = key_valid.shape[0]
    rng, sub = jax.random.split(rng)
    first = pick(logits, sub)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)

    def cond(carry):
        t, _, _, _, _, done, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, token, cache, key_valid, out, done, rng = carry
        out = out.at[:, t].set(jnp.where(done, pad_id, token))
        done = done | (token == eos_id)
        index = prefill_len + t
        key_valid = key_valid.at[:, index].set(True)
        logits, cache = decode(embed_tokens(token[:, None]), (last_position + 1 + t)[:, None],
                               key_valid, cache, index)
        rng, sub = jax.random.split(rng)
        token = pick(logits[:, -1].astype(jnp.float32), sub)
        return t + 1, token, cache, key_valid, out, done, rng

    carry = (jnp.int32(0), first, cache, key_valid, out, jnp.zeros((batch,), bool), rng)
    return jax.lax.while_loop(cond, body, carry)[4]


def _model_fns(model: EarthGPT, params):
    """(decode, embed_tokens) of `_decode_loop` for EarthGPT."""
    variables = {"params": params}
    return (functools.partial(model.apply, variables, method=EarthGPT.decode),
            functools.partial(model.apply, variables, method=EarthGPT.embed_tokens))


def _prefill_state(model: EarthGPT, params, images, prompt_tokens, prompt_valid, new_tokens: int,
                   repeat: int = 1):
    """Prefill once per prompt -> (last logits [B, V] fp32, cache, key_valid, last position,
    prefill_len); the cache is then repeated `repeat` times per row (beams)."""
    variables = {"params": params}
    embeds = model.apply(variables, images, prompt_tokens, method=EarthGPT.embed_prompt)
    prefix_valid = model.apply(variables, prompt_valid, method=EarthGPT.prefix_valid)
    batch, prefill_len = prefix_valid.shape
    cache = init_cache(model.cfg.llm, batch, prefill_len + new_tokens,
                       jnp.dtype(model.cfg.dtype))
    positions = jnp.cumsum(prefix_valid, axis=1) - 1
    key_valid = jnp.zeros((batch, prefill_len + new_tokens), bool)
    key_valid = key_valid.at[:, :prefill_len].set(prefix_valid)
    logits, cache = _model_fns(model, params)[0](embeds, positions, key_valid, cache, 0)
    if repeat > 1:
        cache = select_cache_rows(model.cfg.llm, cache, jnp.repeat(jnp.arange(batch), repeat))
        key_valid = jnp.repeat(key_valid, repeat, axis=0)
    return logits[:, -1].astype(jnp.float32), cache, key_valid, positions[:, -1], prefill_len


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id"))
def greedy_generate(model: EarthGPT, params, images, prompt_tokens, prompt_valid, *,
                    max_new_tokens: int, eos_id: int, pad_id: int):
    """Image + left-padded prompt -> generated ids [B, max_new_tokens]; `pad_id` after `</s>`."""
    return _decode_loop(*_model_fns(model, params),
                        *_prefill_state(model, params, images, prompt_tokens, prompt_valid,
                                        max_new_tokens),
                        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


# ----------------------------------------------------------------------------- beam search,
# top-p sampling, step-wise decoding for streaming, stop strings.

def nucleus_filter(logits, top_p):
    """Logits outside the smallest set of tokens whose probability reaches `top_p` -> -inf.

    The most probable token is always kept, so `top_p` -> 0 is greedy decoding.
    """
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep_sorted = keep_sorted.at[..., 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


@jax.jit
def sampling_logits(logits, temperature, top_p):
    """What top-p sampling draws from: logits / temperature, -inf outside the nucleus."""
    return nucleus_filter(logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6), top_p)


def _sample_token(logits, rng, temperature, top_p):
    return jax.random.categorical(rng, sampling_logits(logits, temperature, top_p),
                                  axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id", "pad_id"))
def sample_generate(model: EarthGPT, params, images, prompt_tokens, prompt_valid, *,
                    max_new_tokens: int, eos_id: int, pad_id: int, temperature=1.0, top_p=0.9,
                    rng=None):
    """Top-p (nucleus) sampling with temperature; same layout and padding as `greedy_generate`.

    `temperature` and `top_p` are traced (changing them does not recompile); `rng` is a JAX key
    (default `jax.random.key(0)`), so a fixed key gives the same tokens every time.
    """
    return _decode_loop(
        *_model_fns(model, params),
        *_prefill_state(model, params, images, prompt_tokens, prompt_valid, max_new_tokens),
        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
        pick=lambda logits, key: _sample_token(logits, key, temperature, top_p), rng=rng)


@functools.partial(jax.jit, static_argnames=("model", "beam_width", "max_new_tokens", "eos_id",
                                             "pad_id", "return_scores"))
def beam_search_generate(model: EarthGPT, params, images, prompt_tokens, prompt_valid, *,
                         beam_width: int, max_new_tokens: int, eos_id: int, pad_id: int,
                         length_penalty=1.0, return_scores: bool = False):
    """Beam search -> best beam's ids [B, max_new_tokens] (`pad_id` after `</s>`).

    Beams are kept by their summed log-probability; a beam that has emitted `</s>` stays in the
    beam with its score frozen (it extends only with padding at log-prob 0). The loop stops when
    every beam of every row has finished or after `max_new_tokens`. The returned beam is the one
    with the best `sum_logprob / length ** length_penalty` (length counts the `</s>`;
    `length_penalty=0` ranks by the plain sum). With `return_scores`, also returns that beam's
    summed log-probability [B]. `beam_width=1` is greedy decoding.
    """
    k = beam_width
    batch = prompt_tokens.shape[0]
    logits, cache, key_valid, last_position, prefill_len = _prefill_state(
        model, params, images, prompt_tokens, prompt_valid, max_new_tokens, repeat=k)
    vocab = logits.shape[-1]
    decode, embed = _model_fns(model, params)
    # Every beam starts as the same prompt; only beam 0 is live so the first top-k is distinct.
    logprobs = jnp.repeat(jax.nn.log_softmax(logits, axis=-1)[:, None], k, axis=1)  # [B,K,V]
    scores = jnp.full((batch, k), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
    out = jnp.full((batch, k, max_new_tokens), pad_id, jnp.int32)
    lengths = jnp.zeros((batch, k), jnp.int32)
    done = jnp.zeros((batch, k), bool)
    last_position = jnp.repeat(last_position, k, axis=0)
    pad_only = jnp.full((vocab,), -jnp.inf, jnp.float32).at[pad_id].set(0.0)

    def cond(carry):
        return (carry[0] < max_new_tokens) & ~jnp.all(carry[5])

    def body(carry):
        t, logprobs, cache, key_valid, out, done, scores, lengths = carry
        step = jnp.where(done[..., None], pad_only, logprobs)
        candidates = (scores[..., None] + step).reshape(batch, k * vocab)
        scores, flat = jax.lax.top_k(candidates, k)
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        gather = lambda x: jnp.take_along_axis(x, parent, axis=1)  # noqa: E731
        was_done = gather(done)
        out = jnp.take_along_axis(out, parent[..., None], axis=1)
        token = jnp.where(was_done, pad_id, token)
        out = out.at[:, :, t].set(token)
        lengths = gather(lengths) + (~was_done).astype(jnp.int32)
        done = was_done | (token == eos_id)
        rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
        cache = select_cache_rows(model.cfg.llm, cache, rows)
        index = prefill_len + t
        key_valid = key_valid.at[:, index].set(True)
        logits, cache = decode(embed(token.reshape(-1, 1)), (last_position + 1 + t)[:, None],
                               key_valid, cache, index)
        logprobs = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), -1).reshape(batch, k, -1)
        return t + 1, logprobs, cache, key_valid, out, done, scores, lengths

    carry = (jnp.int32(0), logprobs, cache, key_valid, out, done, scores, lengths)
    _, _, _, _, out, _, scores, lengths = jax.lax.while_loop(cond, body, carry)
    ranked = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
    best = jnp.argmax(ranked, axis=1)
    tokens = jnp.take_along_axis(out, best[:, None, None], axis=1)[:, 0]
    if return_scores:
        return tokens, jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0]
    return tokens


def generate(model: EarthGPT, params, images, prompt_tokens, prompt_valid, *,
             max_new_tokens: int, eos_id: int, pad_id: int, beam_width: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, rng=None):
    """The decoding a setting asks for: beam search (`beam_width` > 1), top-p sampling
    (`temperature` > 0), else greedy. Evaluation's `config.eval.{beam_width,temperature,top_p}`
    choose through here, so every strategy is reachable from a config."""
    common = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if beam_width > 1 and temperature > 0:
        raise ValueError("choose beam search (beam_width > 1) or sampling (temperature > 0), "
                         "not both")
    if beam_width > 1:
        return beam_search_generate(model, params, images, prompt_tokens, prompt_valid,
                                    beam_width=beam_width, **common)
    if temperature > 0:
        return sample_generate(model, params, images, prompt_tokens, prompt_valid,
                               temperature=temperature, top_p=top_p, rng=rng, **common)
    return greedy_generate(model, params, images, prompt_tokens, prompt_valid, **common)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def prefill(model: EarthGPT, params, images, prompt_tokens, prompt_valid, *, max_new_tokens: int):
    """First half of step-wise decoding: -> (last logits [B, V], cache, key_valid, position).

    `position` is the RoPE position of the last prompt token; the prompt fills cache slots
    [0, prefill_len) where prefill_len = 1 + visual tokens + prompt length.
    """
    logits, cache, key_valid, last_position, _ = _prefill_state(
        model, params, images, prompt_tokens, prompt_valid, max_new_tokens)
    return logits, cache, key_valid, last_position


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def decode_step(model: EarthGPT, params, token, cache, key_valid, position, index):
    """Feed one token [B] at cache slot `index` and RoPE `position` [B] -> (logits, cache,
    key_valid). Shapes never change between steps, so it compiles once per prompt bucket."""
    variables = {"params": params}
    key_valid = key_valid.at[:, index].set(True)
    embeds = model.apply(variables, token[:, None].astype(jnp.int32),
                         method=EarthGPT.embed_tokens)
    logits, cache = model.apply(variables, embeds, position[:, None], key_valid, cache, index,
                                method=EarthGPT.decode)
    return logits[:, -1].astype(jnp.float32), cache, key_valid


def stream_generate(model: EarthGPT, params, images, prompt_tokens, prompt_valid, *,
                    max_new_tokens: int, eos_id: int, temperature: float = 0.0,
                    top_p: float = 1.0, rng=None):
    """Yields the generated ids of row 0 one at a time (host loop over `decode_step`), ending
    after `</s>` (not yielded) or `max_new_tokens`. temperature 0 is greedy; otherwise top-p."""
    logits, cache, key_valid, position = prefill(model, params, images, prompt_tokens,
                                                 prompt_valid, max_new_tokens=max_new_tokens)
    prefill_len = key_valid.shape[1] - max_new_tokens
    rng = jax.random.key(0) if rng is None else rng
    pick = jax.jit(lambda lg, key: _sample_token(lg, key, temperature, top_p))
    for t in range(max_new_tokens):
        if temperature > 0:
            rng, sub = jax.random.split(rng)
            token = pick(logits, sub)
        else:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        value = int(token[0])
        if value == eos_id:
            return
        yield value
        if t + 1 == max_new_tokens:
            return
        position = position + 1
        logits, cache, key_valid = decode_step(model, params, token, cache, key_valid, position,
                                               prefill_len + t)


def apply_stop_strings(text: str, stops) -> str:
    """Cut decoded text at the earliest occurrence of any stop string (the stop is dropped)."""
    cut = len(text)
    for stop in stops or ():
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]
