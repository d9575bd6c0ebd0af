"""Training end to end on a generated release: resume is exact, the box path is learnable and
parses back to pixels, evaluation writes its report, a missing release fails fast."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import mmrs
from earthgpt_jax import parallel, train as train_lib
from earthgpt_jax.data import boxes, prepare
from earthgpt_jax.data.pipeline import TrainPreprocess, conversation_turns
from earthgpt_jax.evaluate.runner import run_eval
from earthgpt_jax.run import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(workdir, **train):
    config = mmrs.get_config("demo")
    config.model.size = "tiny"
    config.data.manual_dir = os.path.join(workdir, "release")
    config.data.tfds_dir = os.path.join(workdir, "tfds")
    config.tokenizer.vocab_size = 400
    config.train.batch_size = 4
    config.train.num_steps = 6
    config.train.warmup_steps = 2
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 2
    config.eval.batch_size = 8
    config.eval.max_new_tokens = 8
    config.mesh.ici = {"data": 1, "fsdp": -1, "tensor": 1}
    for key, value in train.items():
        config.train[key] = value
    return config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small release, built with TFDS, and its tokenizer: shared by the tests below."""
    work = str(tmp_path_factory.mktemp("data"))
    config = tiny_config(work)
    from earthgpt_jax.data import synthetic
    synthetic.write_release(config.data.manual_dir, seed=1, num_train_images=30,
                            num_test_images=12)
    data_dir = prepare.prepare_tfds(config, work)
    train_source = prepare.data_source(data_dir, "train")
    tok = prepare.prepare_tokenizer(config, work, train_source)
    return {"work": work, "config": config, "data_dir": data_dir, "train": train_source,
            "test": prepare.data_source(data_dir, "test"), "tokenizer": tok}


def _trainer(config, tok, devices=None):
    cfg = model_config(config, tok.vocab_size, tok.bos_id)
    mesh = parallel.build_mesh(config.mesh, devices)
    return train_lib.Trainer(config, cfg, mesh), cfg


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def test_resume_after_a_crash_repeats_the_same_losses(data, tmp_path):
    config, tok = data["config"], data["tokenizer"]
    trainer, cfg = _trainer(config, tok, jax.devices()[:1])
    pre = TrainPreprocess(tok.path, cfg.image_size, config.data.max_text_len)
    straight = str(tmp_path / "straight")
    train_lib.train(config, straight, trainer, data["train"], pre)

    crashed = str(tmp_path / "crashed")
    real_step = trainer.train_step
    calls = []

    def crash_on_fifth(state, batch):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_step(state, batch)

    trainer.train_step = crash_on_fifth
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(config, crashed, trainer, data["train"], pre)
    trainer.train_step = real_step
    assert max(_losses(crashed)) == 4
    train_lib.train(config, crashed, trainer, data["train"], pre)
    expected, resumed = _losses(straight), _losses(crashed)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    # Bitwise on CPU: the same data order, the same optimizer state, the same numbers.
    assert resumed == expected


def test_sharded_step_matches_single_device(data, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    config, tok = data["config"], data["tokenizer"]
    config = tiny_config(data["work"], num_steps=3)
    single, cfg = _trainer(config, tok, jax.devices()[:1])
    pre = TrainPreprocess(tok.path, cfg.image_size, config.data.max_text_len)
    train_lib.train(config, str(tmp_path / "one"), single, data["train"], pre)
    config.mesh.ici = {"data": 2, "fsdp": 2, "tensor": 2}
    config.train.batch_size = 4
    sharded, _ = _trainer(config, tok)
    state = train_lib.train(config, str(tmp_path / "eight"), sharded, data["train"], pre)
    q_kernel = state.params["llm"]["layers"]["q_proj"]["kernel"]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    one, eight = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "eight"))
    np.testing.assert_allclose([eight[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)],
                               rtol=2e-5)


def test_mesh_that_does_not_divide_the_devices_is_refused():
    config = mmrs.get_config("demo")
    config.mesh.ici = {"data": 3, "fsdp": -1, "tensor": 1}
    with pytest.raises(ValueError, match="do not divide"):
        parallel.build_mesh(config.mesh, jax.devices()[:2])


def test_overfit_boxes_decode_back_to_pixels(data, tmp_path):
    """The box path end to end: learn a few grounding/detection answers, decode them greedily,
    parse them, and recover the original pixel boxes through the pad-to-square inverse."""
    source = data["test"]
    records = [source[i] for i in range(len(source))]
    picked = [r for r in records if r["task"] == b"grounding"][:2]
    picked += [r for r in records if r["task"] == b"detection"][:2]
    for r in picked:  # keep one question per record: the one evaluation asks
        conv = conversation_turns(r)[:2]
        r["conversations"] = {"from": [t["from"] for t in conv],
                              "value": [t["value"] for t in conv]}
    config = tiny_config(data["work"], num_steps=250, learning_rate=1e-2, warmup_steps=20,
                         log_every_steps=50)
    config.checkpoint.every_steps = 1000
    config.eval.max_new_tokens = 110
    tok = data["tokenizer"]
    trainer, cfg = _trainer(config, tok, jax.devices()[:1])
    pre = TrainPreprocess(tok.path, cfg.image_size, config.data.max_text_len)
    state = train_lib.train(config, str(tmp_path), trainer, picked, pre)
    results = run_eval(config, str(tmp_path), trainer.model, state.params, tok, picked,
                       trainer.mesh, trainer.rules)
    with open(tmp_path / "eval" / "predictions.jsonl") as f:
        predictions = [json.loads(line) for line in f]
    assert len(predictions) == 4
    for pred, record in zip(predictions, picked):
        answer = record["conversations"]["value"][1]
        assert pred["prediction"] == answer
        w, h = int(record["width"]), int(record["height"])
        parsed, malformed = boxes.parse_boxes(pred["prediction"])
        assert malformed == 0 and parsed
        truth, _ = boxes.parse_boxes(answer)
        for got, want in zip(parsed, truth):
            # Compare in pixels: both sides go through the pad-to-square inverse.
            got_px = np.array(boxes.norm_to_pixel(got, w, h))
            want_px = np.array(boxes.norm_to_pixel(want, w, h))
            assert np.abs(got_px - want_px).max() <= 0.005 * max(w, h)
    assert results["groups"]["grounding"]["all"]["model"]["Acc@0.5"] == 1.0
    assert (tmp_path / "eval" / "results.json").exists()


def test_full_config_without_release_fails_fast(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "main.py", "--config=configs/mmrs.py", f"--workdir={tmp_path}",
         f"--config.data.manual_dir={tmp_path / 'nowhere'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert str(tmp_path / "nowhere" / "data" / "json") in proc.stderr
    assert "make demo" in proc.stderr
