"""Sequence packing: the packed forward equals each sample's own forward; the pipeline's packed
rows keep samples apart, restart positions, bound image slots, and resume from saved state."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from earthgpt_jax.models.earthgpt import EarthGPT
from earthgpt_jax.data.tokenizer import IMAGE_TOKEN
from earthgpt_jax.models.presets import get_preset


def _pack_rows(samples, length, slots, visual, bos):
    """Rows laid out by hand as the pipeline lays them out (first sample first)."""
    tokens = np.zeros(length, np.int32)
    seg = np.zeros(length, np.int32)
    pos = np.zeros(length, np.int32)
    start = 0
    for i, text in enumerate(samples):
        seq = [bos] + [IMAGE_TOKEN] * visual + list(text)
        tokens[start:start + len(seq)] = seq
        seg[start:start + len(seq)] = i + 1
        pos[start:start + len(seq)] = np.arange(len(seq))
        start += len(seq)
    return tokens, seg, pos


# splash: the TPU kernel in Pallas interpret mode on CPU, through the whole packed forward.
@pytest.mark.parametrize("impl", ["einsum", "xla", "splash"])
def test_packed_logits_equal_each_sample_alone(impl):
    cfg = get_preset("tiny", vocab_size=64, llm={"attention_impl": impl})
    model = EarthGPT(cfg)
    v = cfg.num_visual_tokens
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, cfg.image_size, cfg.image_size, 3), np.uint8)
    texts = [rng.integers(3, 64, n).astype(np.int32) for n in (7, 4, 9)]
    params = jax.jit(model.init)(jax.random.key(0), images[:1], texts[0][None],
                        np.ones((1, 7), bool))["params"]
    length, slots = 1 + v + 9 + 2 * (1 + v) + 11 + 5, 4  # room to spare: trailing padding
    tokens, seg, pos = _pack_rows(texts, length, slots, v, cfg.bos_id)
    slot_images = np.zeros((1, slots) + images.shape[1:], np.uint8)
    slot_images[0, :3] = images
    apply = jax.jit(model.apply, static_argnames="method")  # whole programs: faster than eager
    packed = apply({"params": params}, slot_images, tokens[None], seg[None], pos[None],
                         method=EarthGPT.packed_logits)
    assert packed.shape == (1, length - 1, 64)
    start = 0
    for i, text in enumerate(texts):
        alone = apply({"params": params}, images[i:i + 1], text[None],
                            np.ones((1, text.size), bool))
        # Sample i's text token t sits at start + 1 + v + t; the logits predicting it at the
        # position before, which is entry start + v + t of the packed output.
        got = packed[0, start + v:start + v + text.size]
        np.testing.assert_allclose(got, alone[0], atol=2e-5, rtol=2e-5)
        start += 1 + v + text.size


def test_segments_never_see_each_other():
    """Changing the first sample changes nothing at the second sample's positions."""
    cfg = get_preset("tiny", vocab_size=64)
    model = EarthGPT(cfg)
    v = cfg.num_visual_tokens
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (1, 2, cfg.image_size, cfg.image_size, 3), np.uint8)
    a, b = rng.integers(3, 64, 6), rng.integers(3, 64, 5)
    length = 2 * (1 + v) + 11
    tokens, seg, pos = _pack_rows([a, b], length, 2, v, cfg.bos_id)
    params = jax.jit(model.init)(jax.random.key(0), images[:, 0], a[None].astype(np.int32),
                        np.ones((1, 6), bool))["params"]
    apply = jax.jit(model.apply, static_argnames="method")
    out1 = apply({"params": params}, images, tokens[None], seg[None], pos[None],
                       method=EarthGPT.packed_logits)
    changed_tokens = tokens.copy()
    changed_tokens[1 + v:1 + v + 6] = (changed_tokens[1 + v:1 + v + 6] + 7) % 60 + 3
    changed_images = images.copy()
    changed_images[0, 0] = 255 - changed_images[0, 0]
    out2 = apply({"params": params}, changed_images, changed_tokens[None], seg[None],
                       pos[None], method=EarthGPT.packed_logits)
    second = slice(1 + v + 6, length - 1)
    np.testing.assert_allclose(out1[0, second], out2[0, second], atol=1e-6)
    assert not np.allclose(out1[0, :1 + v + 5], out2[0, :1 + v + 5])


def test_flop_formula_matches_the_packed_forward():
    """The packed hardware formula (S = row length, every image slot encoded, LM head at S - 1
    positions, every score) equals the dot/conv FLOPs of the jitted packed forward."""
    import flax.linen as nn
    from earthgpt_jax.models import flops  # the formula and the jaxpr FLOP counter
    from earthgpt_jax.models.earthgpt import abstract_params

    from benchmarks import train_vs_torch
    # The config the unpacked formula test uses: frozen towers whose maps all divide the grid
    # (the tiny preset's resizes add small dots that the formula leaves out).
    cfg = train_vs_torch.bench_model_config("tiny", "a")
    model = EarthGPT(cfg)
    rows, length, slots = 2, 40, 3
    params = nn.unbox(abstract_params(model))
    args = (jnp.zeros((rows, slots, cfg.image_size, cfg.image_size, 3), jnp.uint8),
            jnp.zeros((rows, length), jnp.int32), jnp.ones((rows, length), jnp.int32),
            jnp.zeros((rows, length), jnp.int32))
    jaxpr = jax.make_jaxpr(lambda p, *x: model.apply({"params": p}, *x,
                                                     method=EarthGPT.packed_logits))(params, *args)
    f = flops.executed_train_step_flops(cfg, rows, 0, "a", packed_length=length,
                                        images_per_row=slots)
    forward = (f["decoder_forward"] + f["attention_forward"] + f["lm_head_forward"]
               + f["projector_forward_and_weight_gradient"] / 2 + f["vit"] + f["convnext"])
    assert flops.jaxpr_matmul_flops(jaxpr) == pytest.approx(forward, rel=1e-9)


def test_packing_benchmark_counts_what_the_packer_does():
    """benchmarks/packing.py's efficiency: rows filled exactly give 1.0; samples longer than half
    a row go one per row; the image-slot bound caps samples per row."""
    from benchmarks import packing as bench

    # 1 + 2 visual + 5 text = 8 positions: four fill a 32-position row exactly.
    exact = bench.pack_lengths(np.full(40, 5), visual=2, pack_length=32, images=4, bins=4)
    assert exact == {"rows": 10, "position_efficiency": 1.0, "samples_per_row": 4.0,
                     "image_slot_use": 1.0}
    long = bench.pack_lengths(np.full(6, 17), visual=2, pack_length=32, images=4, bins=4)
    assert long["rows"] == 6 and long["position_efficiency"] == pytest.approx(20 / 32)
    capped = bench.pack_lengths(np.full(12, 1), visual=2, pack_length=32, images=3, bins=4)
    assert capped["samples_per_row"] == 3 and capped["position_efficiency"] == pytest.approx(
        12 / 32)
    stream = bench.mix_stream({"detection": np.array([100]), "vqa": np.array([10])}, 4000)
    share = np.mean(stream == 100)  # detection's weight among the two tasks present
    want = bench.MMRS1M_TASK_PAIRS["detection"] / (bench.MMRS1M_TASK_PAIRS["detection"]
                                                  + bench.MMRS1M_TASK_PAIRS["vqa"])
    assert share == pytest.approx(want, abs=0.03)


@pytest.mark.parametrize("field,value", [("images_per_row", 0), ("bins_per_batch", 0)])
def test_packing_options_refuse_empty_rows_and_groups(field, value):
    from earthgpt_jax.data.packing import PackingOptions

    options = dict(length=64, images_per_row=2, visual_tokens=4, bos_id=1, bins_per_batch=4)
    with pytest.raises(ValueError, match=f"{field} must be >= 1, got 0"):
        PackingOptions(**{**options, field: value})


def test_image_slots_no_row_can_fill_are_refused_and_the_default_is_derived():
    """A 2048-position row holds at most 7 samples of 1 + 256 + 1 positions: an 8th slot would
    be encoded by both towers every step and never read."""
    from configs import mmrs
    from earthgpt_jax import train as train_lib
    from earthgpt_jax.data.packing import PackingOptions
    from earthgpt_jax.models.presets import get_preset

    with pytest.raises(ValueError, match=r"images_per_pack=8 can never be filled.*at most 7"):
        PackingOptions(length=2048, images_per_row=8, visual_tokens=256, bos_id=1)
    PackingOptions(length=2048, images_per_row=7, visual_tokens=256, bos_id=1)
    for size in ("7b", "13b"):
        config = mmrs.get_run_config(f"size={size},stage=b")
        options = train_lib.packing_options(config.data, get_preset(size))
        assert options.images_per_row == 7 and options.length == 2048
