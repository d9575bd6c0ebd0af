"""Beam search, top-p sampling and step-wise decoding against greedy and a full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from earthgpt_jax.generate import (apply_stop_strings, beam_search_generate, greedy_generate,
                                   left_pad, nucleus_filter, sample_generate, stream_generate)
from earthgpt_jax.models.earthgpt import EarthGPT
from earthgpt_jax.models.presets import get_preset

STEPS = 6


@pytest.fixture(scope="module")
def setup():
    cfg = get_preset("tiny", vocab_size=64)
    model = EarthGPT(cfg)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    prompts = [list(rng.integers(3, 64, 4)), list(rng.integers(3, 64, 7))]
    tokens, valid = left_pad(prompts, 0)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens, valid))["params"]
    # A sharper model makes beam and greedy disagree more often (a stronger check).
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
    greedy = np.asarray(greedy_generate(model, params, images, tokens, valid,
                                        max_new_tokens=STEPS, eos_id=-1, pad_id=0))
    return model, params, images, tokens, valid, greedy


def _sequence_logprob(model, params, images, tokens, valid, generated):
    """Summed log-prob of `generated` after the prompt, by one uncached teacher-forced forward."""
    seq = np.concatenate([tokens, generated], axis=1)
    seq_valid = np.concatenate([valid, np.ones_like(generated, bool)], axis=1)
    logits = jax.jit(model.apply)({"params": params}, images, seq, seq_valid)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = tokens.shape[1]
    picked = jnp.take_along_axis(logp[:, p:], jnp.asarray(generated)[..., None], axis=-1)[..., 0]
    return np.asarray(picked.sum(axis=1))


def test_beam_width_one_equals_greedy(setup):
    model, params, images, tokens, valid, greedy = setup
    got = beam_search_generate(model, params, images, tokens, valid, beam_width=1,
                               max_new_tokens=STEPS, eos_id=-1, pad_id=0)
    np.testing.assert_array_equal(np.asarray(got), greedy)
    # With a stop token: the same tokens, `</s>` kept, padding after it.
    eos = int(greedy[0, 2])
    want = np.asarray(greedy_generate(model, params, images, tokens, valid, max_new_tokens=STEPS,
                                      eos_id=eos, pad_id=0))
    got = beam_search_generate(model, params, images, tokens, valid, beam_width=1,
                               max_new_tokens=STEPS, eos_id=eos, pad_id=0)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert want[0, 3:].tolist() == [0] * (STEPS - 3)


def test_wider_beam_scores_at_least_greedy(setup):
    model, params, images, tokens, valid, greedy = setup
    beams, scores = beam_search_generate(model, params, images, tokens, valid, beam_width=4,
                                         max_new_tokens=STEPS, eos_id=-1, pad_id=0,
                                         return_scores=True)
    beams = np.asarray(beams)
    beam_lp = _sequence_logprob(model, params, images, tokens, valid, beams)
    greedy_lp = _sequence_logprob(model, params, images, tokens, valid, greedy)
    # The search's own running score is the full forward's log-prob of what it returns.
    np.testing.assert_allclose(np.asarray(scores), beam_lp, rtol=1e-4, atol=1e-4)
    assert np.all(beam_lp >= greedy_lp - 1e-4), (beam_lp, greedy_lp)
    # Unrolled layers (what a restored session decodes with) keep one cache per layer: the
    # beams' parents are picked from each, giving the same beams.
    from earthgpt_jax.generate import unrolled_for_decoding
    unrolled, unrolled_params = unrolled_for_decoding(model, params)
    np.testing.assert_array_equal(np.asarray(beam_search_generate(
        unrolled, unrolled_params, images, tokens, valid, beam_width=4, max_new_tokens=STEPS,
        eos_id=-1, pad_id=0)), beams)


def test_tiny_top_p_is_greedy_and_fixed_rng_is_deterministic(setup):
    model, params, images, tokens, valid, greedy = setup
    kw = dict(max_new_tokens=STEPS, eos_id=-1, pad_id=0)
    got = sample_generate(model, params, images, tokens, valid, temperature=1.0, top_p=1e-6,
                          rng=jax.random.key(7), **kw)
    np.testing.assert_array_equal(np.asarray(got), greedy)
    a = sample_generate(model, params, images, tokens, valid, temperature=1.5, top_p=0.95,
                        rng=jax.random.key(11), **kw)
    b = sample_generate(model, params, images, tokens, valid, temperature=1.5, top_p=0.95,
                        rng=jax.random.key(11), **kw)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).min() >= 0 and np.asarray(a).max() < 64


def test_nucleus_filter_keeps_the_smallest_covering_set():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(nucleus_filter(logits, 0.7)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(nucleus_filter(logits, 0.0)))
    assert kept.tolist() == [[True, False, False, False]]


def test_the_web_chats_host_sampling_draws_from_the_same_nucleus():
    from earthgpt_jax.serve.engine import pick_token
    logits = np.log(np.asarray([0.5, 0.3, 0.15, 0.05], np.float32))
    drawn = [pick_token(logits, 1.0, 0.7, np.random.default_rng(seed)) for seed in range(60)]
    assert set(drawn) == {0, 1}  # nothing outside the nucleus, both of its tokens reached
    assert drawn == [pick_token(logits, 1.0, 0.7, np.random.default_rng(s)) for s in range(60)]
    assert pick_token(logits, 0.0, 0.7, np.random.default_rng(0)) == 0  # greedy
    assert pick_token(logits, 1.0, 0.0, np.random.default_rng(0)) == 0  # top_p 0 is greedy


def test_step_wise_stream_equals_greedy(setup):
    model, params, images, tokens, valid, greedy = setup
    got = list(stream_generate(model, params, images[1:], tokens[1:], valid[1:],
                               max_new_tokens=STEPS, eos_id=-1))
    assert got == greedy[1].tolist()


def test_apply_stop_strings():
    assert apply_stop_strings("a box [0.1] USER: more", ["USER:", "###"]) == "a box [0.1] "
    assert apply_stop_strings("plain", ["x"]) == "plain"
    assert apply_stop_strings("plain", []) == "plain"


def test_generate_picks_the_decoding_a_setting_asks_for(setup):
    """`generate` (what config.eval.beam_width/temperature/top_p reach) dispatches to each
    strategy with the same arguments the strategy itself takes."""
    from earthgpt_jax.generate import generate

    model, params, images, tokens, valid, greedy = setup
    kw = dict(max_new_tokens=STEPS, eos_id=-1, pad_id=0)
    np.testing.assert_array_equal(generate(model, params, images, tokens, valid, **kw), greedy)
    beams = generate(model, params, images, tokens, valid, beam_width=3, **kw)
    np.testing.assert_array_equal(beams, beam_search_generate(model, params, images, tokens,
                                                              valid, beam_width=3, **kw))
    key = jax.random.key(7)
    sampled = generate(model, params, images, tokens, valid, temperature=1.5, top_p=0.9,
                       rng=key, **kw)
    np.testing.assert_array_equal(sampled, sample_generate(
        model, params, images, tokens, valid, temperature=1.5, top_p=0.9, rng=key, **kw))
    with pytest.raises(ValueError, match="not both"):
        generate(model, params, images, tokens, valid, beam_width=2, temperature=1.0, **kw)
    with pytest.raises(ValueError, match="beam_width must be >= 1"):
        generate(model, params, images, tokens, valid, beam_width=0, **kw)
