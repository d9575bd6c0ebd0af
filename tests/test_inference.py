"""The inference session (terminal chat, web chat, evaluation) sees every image exactly as the
training pipeline does: multi-band TIFFs in either storage layout, 16-bit SAR."""

import numpy as np
import pytest
import tifffile

from earthgpt_jax import inference
from earthgpt_jax.data.images import square_and_resize, to_uint8
from earthgpt_jax.data.pipeline import TrainPreprocess
from earthgpt_jax.data.tokenizer import USER_TEMPLATE, train_tokenizer
from earthgpt_jax.models.earthgpt import EarthGPT
from earthgpt_jax.models.presets import get_preset
from earthgpt_jax.serve.service import Limits, decode_upload

QUESTION, ANSWER = "What is in the image?", "A harbor with two ships."
# Five bands of different ranges, so a wrong band choice or a per-band stretch shows.
BANDS = (np.random.default_rng(0).integers(0, 4000, (40, 60, 5))
         * np.array([1, 2, 3, 5, 8])).astype(np.uint16)


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer([USER_TEMPLATE, QUESTION, ANSWER] * 4, path, vocab_size=300)
    session = inference.InferenceSession(EarthGPT(get_preset("tiny")), None, None, None)
    return session, TrainPreprocess(path, session.model.cfg.image_size, 64)


@pytest.mark.parametrize("samples,layout", [
    (BANDS, "contig"),                      # band-interleaved pixels
    (BANDS.transpose(2, 0, 1), "separate"),  # band by band (planar)
    (BANDS[..., 3], None),                  # one 16-bit band (SAR-like)
], ids=["5-band-contig", "5-band-planar", "16-bit"])
def test_session_pixels_equal_the_training_pipelines(training, tmp_path, samples, layout):
    session, preprocess = training
    path = str(tmp_path / "scene.tif")
    tifffile.imwrite(path, samples, photometric="minisblack", planarconfig=layout)
    with open(path, "rb") as f:
        data = f.read()
    record = {"image": data, "image_path": "scene.tif",
              "conversations": {"from": ["human", "gpt"], "value": [QUESTION, ANSWER]}}
    trained_on = preprocess.map(record)["image"]
    image = inference.load_image(path)  # terminal chat and evaluation
    np.testing.assert_array_equal(session.pixels(image), trained_on)
    np.testing.assert_array_equal(decode_upload(data, "scene.tif", Limits())[0], image)  # web
    # What training takes: the first three bands (or the one band replicated), stretched jointly.
    want = (to_uint8(BANDS[..., :3]) if samples.ndim == 3
            else np.repeat(to_uint8(samples)[..., None], 3, axis=-1))
    np.testing.assert_array_equal(image, want)
    assert image.dtype == np.uint8 and image.max() == 255 and trained_on.shape == (32, 32, 3)
    np.testing.assert_array_equal(trained_on, square_and_resize(want, 32))


def test_unreadable_images_are_one_line_errors(tmp_path):
    with pytest.raises(inference.InferenceError, match="cannot read image .*nowhere.png"):
        inference.load_image(str(tmp_path / "nowhere.png"))
    (tmp_path / "notes.png").write_bytes(b"hello")
    with pytest.raises(inference.InferenceError, match="cannot decode image .*not an image"):
        inference.load_image(str(tmp_path / "notes.png"))
