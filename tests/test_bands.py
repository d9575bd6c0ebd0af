"""Every band: the band adapter starts as the bands it picks, trains in stages a/b/all without
weight decay, the N-band data path (decode, pipeline, packing, inference, scenes) reaches the
model, and a 4-band model learns what only NIR shows."""

import jax
import numpy as np
import flax.linen as nn
import pytest
from flax import traverse_util

from earthgpt_jax import optim
from earthgpt_jax.config import ModelConfig, RunConfig
from earthgpt_jax.models.bands import BandAdapter, band_init_matrix
from earthgpt_jax.models.earthgpt import EarthGPT, abstract_params, dummy_inputs
from earthgpt_jax.models.presets import get_preset


def _adapter_out(bands, band_init, x):
    adapter = BandAdapter(bands, band_init)
    params = nn.unbox(adapter.init(jax.random.key(0), x))
    return np.asarray(adapter.apply(params, x))


@pytest.mark.parametrize("bands,band_init,picked", [
    (4, "", [0, 1, 2]), (13, "3,2,1", [3, 2, 1]), (3, "2,1,0", [2, 1, 0]), (1, "", [0, 0, 0]),
    (2, "", [0, 0, 0])])
def test_adapter_starts_as_the_picked_bands(bands, band_init, picked):
    x = np.random.default_rng(bands).random((2, 5, 7, bands), np.float32)
    np.testing.assert_array_equal(_adapter_out(bands, band_init, x), x[..., picked])


def test_mean_init_averages_every_band():
    x = np.random.default_rng(0).random((3, 4, 5), np.float32)
    out = _adapter_out(5, "mean", x)
    np.testing.assert_allclose(out, np.repeat(x.mean(-1, keepdims=True), 3, -1), rtol=1e-6)


def test_four_band_model_starts_where_the_rgb_model_is():
    """The pretrained towers see exactly what they saw: with the same tower and LLM weights, a
    4-band model on (R, G, B, NIR) gives the 3-band model's logits on (R, G, B)."""
    rgb_cfg = get_preset("tiny", vocab_size=64)
    four = EarthGPT(get_preset("tiny", vocab_size=64, input_bands=4))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 4), dtype=np.uint8)
    tokens, valid = rng.integers(3, 64, (2, 6)).astype(np.int32), np.ones((2, 6), bool)
    params = nn.unbox(jax.jit(four.init)(jax.random.key(1), images, tokens, valid))["params"]
    assert set(params["band_adapter"]) == {"band_weights", "band_bias"}
    rgb_params = {k: v for k, v in params.items() if k != "band_adapter"}
    got = jax.jit(four.apply)({"params": params}, images, tokens, valid)
    want = jax.jit(EarthGPT(rgb_cfg).apply)({"params": rgb_params}, images[..., :3], tokens,
                                            valid)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # And the default model has no adapter at all: its params and checkpoints are unchanged.
    assert "band_adapter" not in nn.unbox(abstract_params(EarthGPT(rgb_cfg)))


def test_images_with_the_wrong_band_count_are_refused():
    model = EarthGPT(get_preset("tiny", vocab_size=64, input_bands=4))
    images, tokens, valid = dummy_inputs(get_preset("tiny", vocab_size=64), 1, 4)
    with pytest.raises(ValueError, match="have 3 bands; this model reads 4"):
        jax.eval_shape(model.init, jax.random.key(0), images, tokens, valid)


def test_band_settings_are_checked_where_they_are_given():
    with pytest.raises(ValueError, match="config.model.band_init='0,1,4'"):
        ModelConfig(input_bands=4, band_init="0,1,4")
    with pytest.raises(ValueError, match="config.model.band_init='red'"):
        ModelConfig(input_bands=4, band_init="red")
    with pytest.raises(ValueError, match="config.model.input_bands=0"):
        ModelConfig(input_bands=0)
    with pytest.raises(ValueError, match="band_init"):
        get_preset("tiny", input_bands=2, band_init="0,1,2")
    assert RunConfig().model.input_bands == 3 and not get_preset("tiny").band_adapter
    assert get_preset("tiny", band_init="2,1,0").band_adapter  # BGR files: 3 bands, adapter
    np.testing.assert_array_equal(band_init_matrix("", 4),
                                  [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])


def test_model_config_json_keeps_the_bands_and_old_ones_read_as_rgb(tmp_path):
    import json
    from earthgpt_jax import checkpoints
    cfg = get_preset("tiny", input_bands=4, band_init="mean")
    checkpoints.save_model_config(cfg, str(tmp_path))
    path = str(tmp_path / checkpoints.MODEL_CONFIG)
    assert checkpoints.load_model_config(path) == cfg
    with open(path) as f:  # a workdir written before model.input_bands existed
        raw = json.load(f)
    del raw["input_bands"], raw["band_init"]
    with open(path, "w") as f:
        json.dump(raw, f)
    old = checkpoints.load_model_config(path)
    assert old.input_bands == 3 and not old.band_adapter


def _labels(cfg, stage):
    params = nn.unbox(abstract_params(EarthGPT(cfg)))
    return traverse_util.flatten_dict(optim.trainable_labels(params, stage), sep="/"), params


@pytest.mark.parametrize("stage", ["all", "a", "b", "lora"])
def test_stages_train_the_adapter_without_decaying_it(stage):
    llm = {"adapters": stage == "b", "lora_rank": 2 if stage == "lora" else 0}
    labels, params = _labels(get_preset("tiny", vocab_size=64, input_bands=4, llm=llm), stage)
    band = {k: v for k, v in labels.items() if k.startswith("band_adapter/")}
    assert set(band) == {"band_adapter/band_weights", "band_adapter/band_bias"}
    # LoRA trains the low-rank factors alone (its export is a PEFT adapter of the decoder).
    assert set(band.values()) == {"freeze" if stage == "lora" else "train"}
    decayed = traverse_util.flatten_dict(optim.weight_decay_mask(params), sep="/")
    assert not decayed["band_adapter/band_weights"] and not decayed["band_adapter/band_bias"]
    # The pattern is optional: an RGB model has no adapter and the stage still builds.
    rgb_labels, _ = _labels(get_preset("tiny", vocab_size=64, llm=llm), stage)
    assert not any(k.startswith("band_adapter") for k in rgb_labels)


def test_frozen_towers_pass_gradient_to_the_adapter_only():
    cfg = get_preset("tiny", vocab_size=64, input_bands=4, freeze_vision=True)
    model = EarthGPT(cfg)
    images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 4), dtype=np.uint8)
    tokens, valid = np.ones((1, 4), np.int32), np.ones((1, 4), bool)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens, valid))["params"]
    grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, images, tokens,
                                                   valid).sum()))(params)
    flat = traverse_util.flatten_dict(grads, sep="/")
    towers = [np.abs(np.asarray(g)).sum() for k, g in flat.items()
              if k.startswith(("vit/", "convnext/"))]
    assert towers and max(towers) == 0.0
    assert np.abs(np.asarray(grads["band_adapter"]["band_weights"][3])).sum() > 0


def test_batch_shapes_carry_the_bands():
    from earthgpt_jax.config import DataConfig
    from earthgpt_jax.train import batch_shapes
    cfg = get_preset("tiny", vocab_size=64, input_bands=4)
    padded = batch_shapes(DataConfig(packing=False, max_text_len=8), cfg, 2)
    packed = batch_shapes(DataConfig(pack_length=64, images_per_pack=2), cfg, 2)
    assert padded["image"][0] == (2, 32, 32, 4) and packed["image"][0] == (2, 2, 32, 32, 4)


def test_packed_rows_hold_four_band_image_slots():
    """The packer moves each sample's image, whatever its bands, into its row's slot."""
    import grain
    from earthgpt_jax.data import packing

    samples = [{"image": np.full((32, 32, 4), i, np.uint8), "tokens": np.arange(6, dtype=np.int32),
                "valid": np.ones(6, bool), "loss_mask": np.ones(6, np.float32),
                "truncated": np.int32(0), "example_id": f"e{i}"} for i in range(1, 5)]
    options = packing.PackingOptions(length=24, images_per_row=2, visual_tokens=4, bos_id=1,
                                     bins_per_batch=2)
    ds = grain.MapDataset.source(samples).map(packing.ToPackable(4, 1)).to_iter_dataset()
    rows = list(packing.pack(ds, options, seed=0))
    assert rows and all(r["image"].shape == (2, 32, 32, 4) for r in rows)
    slots = sorted(int(r["image"][k, 0, 0, 3]) for r in rows for k in range(2)
                   if r["example_id"][k])
    assert slots == [1, 2, 3, 4]  # every sample's 4th band arrived in a used slot


def test_training_and_inference_read_the_same_four_bands(tmp_path):
    """A 5-band TIFF: the pipeline's image and the session's are the same [S, S, 4]; an RGB
    file is refused by both, naming it; a 3-band image handed to a 4-band session too."""
    import tifffile
    from PIL import Image
    from earthgpt_jax import inference
    from earthgpt_jax.data.images import TooFewBandsError, decode_image, square_and_resize
    from earthgpt_jax.data.pipeline import TrainPreprocess
    from earthgpt_jax.data.tokenizer import USER_TEMPLATE, train_tokenizer

    question, answer = "Is there a camouflaged vehicle?", "yes"
    tok = str(tmp_path / "tok.model")
    train_tokenizer([USER_TEMPLATE, question, answer] * 4, tok, vocab_size=300)
    session = inference.InferenceSession(
        EarthGPT(get_preset("tiny", vocab_size=300, input_bands=4)), None, None, None)
    preprocess = TrainPreprocess(tok, 32, 32, input_bands=4)
    bands = np.random.default_rng(0).integers(0, 4000, (5, 40, 60)).astype(np.uint16)
    path = str(tmp_path / "ms.tif")
    tifffile.imwrite(path, bands, photometric="minisblack", planarconfig="separate")
    conversation = {"from": ["human", "gpt"], "value": [question, answer]}
    with open(path, "rb") as f:
        data = f.read()
    trained_on = preprocess.map({"image": data, "image_path": "ms.tif",
                                 "conversations": conversation})["image"]
    assert trained_on.shape == (32, 32, 4)
    image = session.load_image(path)
    np.testing.assert_array_equal(session.pixels(image), trained_on)
    np.testing.assert_array_equal(session.decode(data, "ms.tif"), image)
    np.testing.assert_array_equal(trained_on, square_and_resize(
        decode_image(data, "ms.tif", bands=4), 32))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(inference.InferenceError, match="rgb.png has 3 bands"):
        session.load_image(str(tmp_path / "rgb.png"))
    with pytest.raises(TooFewBandsError, match="rgb.png has 3 bands"):  # already decoded RGB
        preprocess.map({"image": np.zeros((8, 8, 3), np.uint8), "image_path": "rgb.png",
                        "conversations": conversation})
    with pytest.raises(inference.InferenceError, match="for a model of 4 input bands"):
        session.pixels(np.zeros((8, 8, 3), np.uint8))


def test_scene_tiles_read_the_models_bands(tmp_path):
    """A 5-band GeoTIFF scene: tiles of a 4-band model hold the first four bands as training
    decodes them; the overview stays an RGB picture; a 3-band scene is refused, named."""
    import rasterio
    from earthgpt_jax.data.images import decode_image
    from earthgpt_jax.scene.raster import SceneError, SceneReader, tile_grid

    bands = np.random.default_rng(1).integers(0, 256, (5, 48, 64), dtype=np.uint8)
    path = str(tmp_path / "scene.tif")
    with rasterio.open(path, "w", driver="GTiff", width=64, height=48, count=5, dtype="uint8",
                       crs="EPSG:32633",
                       transform=rasterio.Affine(10, 0, 500000, 0, -10, 4e6)) as ds:
        ds.write(bands)
    with SceneReader(path, input_bands=4) as reader:
        (tile,) = tile_grid(reader.width, reader.height, 64, 0)
        pixels, filled = reader.read(tile)
        overview, _ = reader.overview()
    with open(path, "rb") as f:
        np.testing.assert_array_equal(pixels, decode_image(f.read(), path, bands=4))
    assert filled == 1.0 and overview.shape == (48, 64, 3)
    np.testing.assert_array_equal(overview, bands[:3].transpose(1, 2, 0))
    with pytest.raises(SceneError, match="scene.tif has 5 bands, fewer than the 6"):
        SceneReader(path, input_bands=6)


def test_four_band_model_learns_what_only_nir_shows(tmp_path):
    """Camouflage nets visible only in NIR (benchmarks/band_adapter.py; R, G, B hold nothing
    of them: tests/test_synthetic.py, so an RGB model stays at chance). A 4-band model whose
    adapter starts as colour infrared (NIR, R, G) learns to answer held-out images, and the
    adapter trains with it."""
    from benchmarks import band_adapter
    band_adapter.write_release(str(tmp_path), train_images=160, test_images=40)
    run = band_adapter.train_presence(str(tmp_path), bands=4, band_init="3,0,1", steps=50,
                                      learning_rate=3e-3)
    assert run["nir_row_before"] == [1.0, 0.0, 0.0]
    assert run["test_accuracy_before"] <= 0.7
    assert run["last10_mean_loss"] < 0.3 < run["first_loss"]
    assert run["test_accuracy"] >= 0.9
    assert run["nir_row_after"] != run["nir_row_before"]
