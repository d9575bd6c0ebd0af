"""Training end to end on a generated release: resume is exact, the box path is learnable and
parses back to pixels, evaluation writes its report, a missing release fails fast."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mmrs
from earthgpt_jax import parallel, train as train_lib
from earthgpt_jax.data import boxes, prepare
from earthgpt_jax.data.pipeline import TrainPreprocess, conversation_turns
from earthgpt_jax.evaluate.runner import run_eval
from earthgpt_jax.inference import InferenceSession
from earthgpt_jax.models import flops
from earthgpt_jax.run import model_config
from tests.fixtures import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(workdir, **train):
    config = mmrs.get_run_config("demo")
    config = config.replace(
        model={"size": "tiny"},
        data={"manual_dir": os.path.join(workdir, "release"),
              "tfds_dir": os.path.join(workdir, "tfds")},
        tokenizer={"vocab_size": 400},
        train={"batch_size": 4, "num_steps": 6, "warmup_steps": 2, "log_every_steps": 1},
        checkpoint={"every_steps": 2})
    # CPU has no datasheet peak: a stand-in one so the logged MFU is exercised.
    config = config.replace(
        train={"peak_flops_per_device": 1e11},
        eval={"batch_size": 8, "max_new_tokens": 8},
        mesh={"ici": {"data": 1, "fsdp": -1, "tensor": 1}})
    return config.replace(train=train)


def build_data(tmp_path_factory):
    """A small release, built with TFDS, and its tokenizer: the session-wide `data` fixture
    (tests/conftest.py) shared by these tests and test_multiprocess.py. Read-only for its users:
    they train into their own tmp_path."""
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


def one_device_trainer(config, cfg):
    return train_lib.Trainer.for_run(config, cfg,
                                     parallel.build_mesh(config.mesh, jax.devices()[:1]))


def _trainer(config, tok, devices=None):
    cfg = model_config(config, tok.vocab_size, tok.bos_id)
    mesh = parallel.build_mesh(config.mesh, devices)
    return train_lib.Trainer.for_run(config, cfg, mesh), cfg


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def packed(config):
    """The tiny config with sequence packing: rows of 160 positions, up to 3 samples each."""
    # >= 1 + 4 visual + 128 text: the longest sample fits
    config = config.replace(
        data={"packing": True, "pack_length": 160, "images_per_pack": 3, "pack_bins": 8})
    return config


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_resume_after_a_crash_repeats_the_same_losses(data, tmp_path, packing):
    config, tok = data["config"], data["tokenizer"]
    if packing:  # the packer's iterator state is checkpointed and restored the same way
        config = packed(config)
    trainer, cfg = _trainer(config, tok, jax.devices()[:1])
    pre = TrainPreprocess(tok.path, cfg.image_size, config.data.max_text_len)
    straight = str(tmp_path / "straight")
    train_lib.train(config, straight, trainer, data["train"], pre)

    crashed = str(tmp_path / "crashed")
    real_step = trainer.train_step
    calls = []

    def crash_on_fifth(state, batch, step):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_step(state, batch, step)

    trainer.train_step = crash_on_fifth
    with pytest.raises(KeyboardInterrupt):
        train_lib.train(config, crashed, trainer, data["train"], pre)
    trainer.train_step = real_step
    assert max(_losses(crashed)) == 4
    train_lib.train(config, crashed, trainer, data["train"], pre)
    expected, resumed = _losses(straight), _losses(crashed)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    with open(os.path.join(straight, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for row in rows:  # MFU: each batch's model FLOPs per second / (peak x devices)
        assert row["mfu"] == pytest.approx(row["model_tflops_per_s"] * 1e12 / 1e11, rel=1e-6)
        assert row["model_tflops_per_s"] > 0
        # Hardware utilisation: every step's executed FLOPs (padding, blank slots included).
        assert row["hardware_utilization"] == pytest.approx(
            trainer.executed_flops * row["steps_per_s"] / 1e11, rel=1e-6)
        assert row["mfu"] < row["hardware_utilization"]
    from PIL import Image
    assert Image.open(os.path.join(crashed, "loss.png")).size == (640, 360)
    # Bitwise on CPU: the same data order, the same optimizer state, the same numbers.
    assert resumed == expected


def test_sharded_step_matches_single_device_and_resumes_on_another_device_count(data, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    tok = data["tokenizer"]
    config = tiny_config(data["work"], num_steps=6)
    single, cfg = _trainer(config, tok, jax.devices()[:1])
    pre = TrainPreprocess(tok.path, cfg.image_size, config.data.max_text_len)
    train_lib.train(config, str(tmp_path / "one"), single, data["train"], pre)
    # Steps 1-3 on a 2x2x2 mesh of 8 devices...
    config = config.replace(
        train={"num_steps": 3},
        mesh={"ici": {"data": 2, "fsdp": 2, "tensor": 2}})
    sharded, _ = _trainer(config, tok)
    state = train_lib.train(config, str(tmp_path / "eight"), sharded, data["train"], pre)
    q_kernel = state.params["llm"]["layers"]["q_proj"]["kernel"]
    assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    # ...then steps 4-6 resumed from that checkpoint on one device: orbax reshards on restore.
    config = config.replace(
        train={"num_steps": 6},
        mesh={"ici": {"data": 1, "fsdp": -1, "tensor": 1}})
    train_lib.train(config, str(tmp_path / "eight"), single, data["train"], pre)
    one, eight = _losses(str(tmp_path / "one")), _losses(str(tmp_path / "eight"))
    assert sorted(eight) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([eight[s] for s in range(1, 7)], [one[s] for s in range(1, 7)],
                               rtol=2e-5)


def test_mesh_that_does_not_divide_the_devices_is_refused():
    config = mmrs.get_run_config("demo")
    config = config.replace(mesh={"ici": {"data": 3, "fsdp": -1, "tensor": 1}})
    with pytest.raises(ValueError, match="do not divide"):
        parallel.build_mesh(config.mesh, jax.devices()[:2])


@pytest.mark.optimized  # 250 steps: the optimised step pays for its compile
def test_overfit_boxes_decode_back_to_pixels(data, tmp_path):
    """The box path end to end: learn a few grounding/detection answers, decode them greedily,
    parse them, and recover the original pixel boxes through the pad-to-square inverse."""
    source = data["test"]
    records = [source[i] for i in range(len(source))]
    picked = [r for r in records if r["task"] == b"grounding"][:2]
    # Two detection scenes the tiny model can tell apart in 250 steps: an optical one
    # (horizontal boxes) and a SAR one with oriented ships (four corners per box).
    detection = [r for r in records if r["task"] == b"detection" and len(r["boxes"])]
    picked += [next(r for r in detection if r["sensor"] == b"optical"),
               next(r for r in detection if b"HRSID_OBB" in r["image_path"])]
    for r in picked:  # keep one question per record: the one evaluation asks
        conv = conversation_turns(r)[:2]
        r["conversations"] = {"from": [t["from"] for t in conv],
                              "value": [t["value"] for t in conv]}
    config = tiny_config(data["work"], num_steps=250, learning_rate=1e-2, warmup_steps=20,
                         log_every_steps=50)
    config = config.replace(
        checkpoint={"every_steps": 1000},
        eval={"max_new_tokens": 110})
    tok = data["tokenizer"]
    trainer, cfg = _trainer(config, tok, jax.devices()[:1])
    pre = TrainPreprocess(tok.path, cfg.image_size, config.data.max_text_len)
    state = train_lib.train(config, str(tmp_path), trainer, picked, pre)
    session = InferenceSession(trainer.model, state.params, tok, trainer.mesh, trainer.rules)
    results = run_eval(config, str(tmp_path), session, picked)
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
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()  # one line, nothing else (no traceback, no logs)
    assert len(lines) == 1 and lines[0].startswith("error: MMRS-1M release not found"), lines
    assert str(tmp_path / "nowhere" / "data" / "json") in lines[0]
    assert "make demo" in lines[0]


def _random_batch(cfg, batch=4, length=16, seed=0):
    rng = np.random.default_rng(seed)
    loss_mask = np.zeros((batch, length), np.float32)
    loss_mask[:, 6:12] = 1.0
    loss_mask[1, 6:] = 1.0  # examples with different answer lengths
    return {"image": rng.integers(0, 255, (batch, cfg.image_size, cfg.image_size, 3), np.uint8),
            "tokens": rng.integers(3, 60, (batch, length)).astype(np.int32),
            "valid": np.ones((batch, length), bool), "loss_mask": loss_mask}


@pytest.mark.parametrize("stage", ["a", "b"])
def test_stage_masks_train_exactly_their_leaves(stage):
    from flax import traverse_util
    from earthgpt_jax.optim import STAGE_TRAINABLE
    import re

    config = tiny_config("/unused")
    config = config.replace(train={"stage": stage})
    cfg = get_preset_for(config, vocab=64)
    trainer = one_device_trainer(config, cfg)
    state = trainer.init_state(0)
    before = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    for step in range(2):
        state, _ = trainer.train_step(state, _random_batch(cfg, seed=step), step + 1)
    after = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    patterns = [re.compile(p) for p in STAGE_TRAINABLE[stage]]
    trained = {p for p in before if not np.array_equal(before[p], after[p])}
    expected = {p for p in before if any(r.search(p) for r in patterns)}
    assert trained == expected and trained
    # Trained leaves keep fp32 masters, frozen ones stay in train.frozen_param_dtype (bf16).
    for path, value in after.items():
        want = np.float32 if path in expected else jnp.bfloat16
        assert value.dtype == before[path].dtype == want, path
    if stage == "a":
        assert "llm/layers/q_proj/kernel" in trained and "llm/layers/o_proj/kernel" not in trained
    else:
        assert trained == {p for p in before if "adapter_" in p or p.startswith("projector/")}


def get_preset_for(config, vocab):
    from earthgpt_jax.models.presets import get_preset
    return get_preset(config.model.size, vocab_size=vocab,
                      llm={"adapters": config.train.stage == "b"})


@pytest.mark.parametrize("frozen", ["bfloat16", "float32"])
def test_frozen_weights_are_created_and_counted_in_their_dtype(frozen):
    """train.frozen_param_dtype is the frozen leaves' dtype from the jitted init on (so in the
    abstract state every restore casts to); trainable leaves and the optimizer's moments are
    fp32; the parameter summary counts the bytes as stored."""
    from flax import traverse_util

    config = tiny_config("/unused").replace(train={"stage": "b", "frozen_param_dtype": frozen})
    trainer = one_device_trainer(config, get_preset_for(config, vocab=64))
    labels = traverse_util.flatten_dict(trainer.labels)
    abstract = traverse_util.flatten_dict(trainer.abstract_state.params)
    made = traverse_util.flatten_dict(trainer.init_state(0).params)
    for path, label in labels.items():
        want = np.float32 if label == "train" else jnp.dtype(frozen)
        assert abstract[path].dtype == made[path].dtype == want, path
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(trainer.abstract_state.opt_state)
               if x.ndim)
    counts = trainer.summary
    frozen_count = counts["total"] - counts["trainable"]
    assert frozen_count > 10 * counts["trainable"] > 0
    assert counts["trainable_bytes"] == 4 * counts["trainable"]
    assert counts["frozen_bytes"] == jnp.dtype(frozen).itemsize * frozen_count
    assert f"({jnp.dtype(frozen).itemsize:g} bytes each)" in flops.format_summary(counts, "b")


def test_bad_frozen_param_dtype_is_a_one_line_error():
    from earthgpt_jax.config import TrainConfig
    with pytest.raises(ValueError, match=r"^config.train.frozen_param_dtype='fp16' is not one "
                                         r"of float32, bfloat16$"):
        TrainConfig(frozen_param_dtype="fp16")


def test_microbatches_are_strided_over_every_batch_shard():
    """grad_accum_steps splits the batch strided (microbatch i: rows i, i + accum, ...), so on
    an 8-device mesh every device holds an equal share of every microbatch and the split moves
    no data; the accumulated loss and update are the full batch's."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    import re
    from jax.sharding import NamedSharding, PartitionSpec

    results = {}
    for accum in (1, 2):
        config = tiny_config("/unused").replace(
            train={"batch_size": 16, "grad_accum_steps": accum},
            mesh={"ici": {"data": 2, "fsdp": 4, "tensor": 1}})
        cfg = get_preset_for(config, vocab=64)
        trainer = train_lib.Trainer.for_run(config, cfg, parallel.build_mesh(config.mesh))
        batch = _random_batch(cfg, batch=16)
        state, metrics = trainer.train_step(trainer.init_state(0), batch, 0)
        results[accum] = (jax.device_get(state.params), float(metrics["loss"]))
    placed = {k: jax.device_put(v, trainer.batch_shardings[k]) for k, v in batch.items()}
    split = jax.jit(trainer.microbatches)
    with jax.set_mesh(trainer.mesh):
        micro = split(placed)
        hlo = split.lower(placed).compile().as_text()
    spread = NamedSharding(trainer.mesh, PartitionSpec(None, ("data", "fsdp")))
    for key, value in micro.items():
        np.testing.assert_array_equal(np.asarray(value),
                                      np.stack([batch[key][0::2], batch[key][1::2]]))
        assert value.sharding.is_equivalent_to(spread, value.ndim), (key, value.sharding)
        # 16 rows, 2 microbatches, 8 devices: one row of each microbatch on every device
        assert len(value.addressable_shards) == 8
        assert all(s.data.shape[:2] == (2, 1) for s in value.addressable_shards), key
    assert not re.search(r"all-to-all|collective-permute|all-gather|all-reduce", hlo)
    assert results[1][1] == pytest.approx(results[2][1], rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(results[2][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_gives_the_same_update():
    states = {}
    for accum in (1, 2):
        config = tiny_config("/unused")
        config = config.replace(train={"grad_accum_steps": accum})
        cfg = get_preset_for(config, vocab=64)
        trainer = one_device_trainer(config, cfg)
        state, metrics = trainer.train_step(trainer.init_state(0), _random_batch(cfg), 0)
        states[accum] = (jax.device_get(state.params), float(metrics["loss"]))
    assert states[1][1] == pytest.approx(states[2][1], rel=1e-6)
    for a, b in zip(jax.tree.leaves(states[1][0]), jax.tree.leaves(states[2][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _random_packed_batch(cfg, rows=2, length=24, seed=0):
    """Rows of two samples of 12 positions each (BOS, the visual tokens, text)."""
    from earthgpt_jax.data.tokenizer import IMAGE_TOKEN
    rng = np.random.default_rng(seed)
    v = cfg.num_visual_tokens
    tokens = np.concatenate([np.concatenate([[cfg.bos_id], np.full(v, IMAGE_TOKEN),
                                             rng.integers(3, 60, (rows, 11 - v))[r]])
                             for r in range(rows) for _ in range(2)]).reshape(rows, length)
    loss_mask = np.zeros((rows, length), np.float32)
    loss_mask[:, 1 + v + 2:12] = loss_mask[:, 13 + v:] = 1.0
    return {"image": rng.integers(0, 255, (rows, 2, cfg.image_size, cfg.image_size, 3),
                                  np.uint8),
            "tokens": tokens.astype(np.int32),
            "segment_ids": np.repeat([[1] * 12 + [2] * 12], rows, 0).astype(np.int32),
            "positions": np.tile(np.concatenate([np.arange(12), np.arange(12)]),
                                 (rows, 1)).astype(np.int32),
            "loss_mask": loss_mask}


@pytest.mark.parametrize("normalization,packing", [("tokens", False), ("examples", False),
                                                   ("examples", True)])
def test_chunked_loss_gives_the_same_loss_and_update(normalization, packing):
    """train.loss_chunk=5 (16 or 23 positions: the last chunk padded) computes the same loss
    and gradients as the whole-row cross-entropy, on padded and packed rows."""
    results = {}
    for chunk in (0, 5):
        config = tiny_config("/unused").replace(
            train={"loss_chunk": chunk, "loss_normalization": normalization})
        if packing:
            config = config.replace(data={"packing": True, "pack_length": 24,
                                          "images_per_pack": 2})
        cfg = get_preset_for(config, vocab=64)
        trainer = one_device_trainer(config, cfg)
        batch = _random_packed_batch(cfg) if packing else _random_batch(cfg)
        state, metrics = trainer.train_step(trainer.init_state(0), batch, 0)
        results[chunk] = (jax.device_get(state.params), float(metrics["loss"]))
    assert results[0][1] == pytest.approx(results[5][1], rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[5][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_keeps_one_chunk_of_logits():
    """Value and gradient match optax on the whole rows, and the compiled gradient's scratch
    memory holds about one chunk's logits instead of all of them (remat inside the map)."""
    import optax

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 61, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 4096, (2, 61)), jnp.int32)
    kernel = jnp.asarray(rng.normal(size=(16, 4096)) / 4, jnp.float32)

    def loss(kernel, hidden, chunk):
        def head(h):
            return h @ kernel
        if chunk:
            ce = train_lib.chunked_cross_entropy(head, hidden, targets, chunk)
        else:
            ce = optax.softmax_cross_entropy_with_integer_labels(head(hidden), targets)
        return jnp.sum(ce * jnp.arange(61))

    grads, temp = {}, {}
    for chunk in (0, 8):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
        grads[chunk] = fn(kernel, hidden, chunk)
        temp[chunk] = fn.lower(kernel, hidden, chunk).compile().memory_analysis() \
            .temp_size_in_bytes
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[8])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5)
    logits_bytes = 2 * 61 * 4096 * 4  # 2.0 MB of fp32 logits for the whole rows
    assert temp[0] >= logits_bytes
    assert temp[8] < logits_bytes / 2, temp


def test_nonfinite_steps_in_a_row_stop_the_run_naming_the_examples(data, tmp_path):
    config, tok = tiny_config(data["work"], num_steps=6), data["tokenizer"]
    # the first update overflows: every later loss is NaN
    config = config.replace(
        train={"learning_rate": 1e30, "warmup_steps": 0, "max_nonfinite_steps_in_row": 2})
    trainer, cfg = _trainer(config, tok, jax.devices()[:1])
    pre = TrainPreprocess(tok.path, cfg.image_size, config.data.max_text_len)
    with pytest.raises(FloatingPointError, match=r"2 steps in a row.*data/") as err:
        train_lib.train(config, str(tmp_path), trainer, data["train"], pre)
    assert "png" in str(err.value)


def _main_cmd(data, workdir, **overrides):
    config = data["config"]
    args = {"model.size": "tiny", "data.manual_dir": config.data.manual_dir,
            "data.tfds_dir": config.data.tfds_dir, "tokenizer.path": data["tokenizer"].path,
            "train.batch_size": 4, "train.num_steps": 8, "train.warmup_steps": 2,
            "train.log_every_steps": 1, "checkpoint.every_steps": 2, "eval.at_end": False,
            "mesh.ici": "{'data': 1, 'fsdp': -1, 'tensor': 1}"} | overrides
    return [sys.executable, "main.py", "--config=configs/mmrs.py:demo",
            f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in args.items()]


def _run_until(cmd, workdir, step, sig):
    """Starts `cmd`, waits until metrics.jsonl reaches `step`, then sends `sig`."""
    import time
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags.for_devices(1))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and max(_losses(workdir), default=0) >= step:
            proc.send_signal(sig)
            break
        time.sleep(0.05)
    _, stderr = proc.communicate(timeout=240)
    return proc.returncode, stderr


def test_kill_9_then_rerun_gives_the_uninterrupted_losses(data, tmp_path):
    """The real thing: SIGKILL a training process mid-run, rerun the same command."""
    import signal
    straight = str(tmp_path / "straight")
    config = tiny_config(data["work"], num_steps=8)
    trainer, cfg = _trainer(config, data["tokenizer"], jax.devices()[:1])
    train_lib.train(config, straight, trainer, data["train"],
                    TrainPreprocess(data["tokenizer"].path, cfg.image_size,
                                    config.data.max_text_len))
    killed = str(tmp_path / "killed")
    code, _ = _run_until(_main_cmd(data, killed), killed, 5, signal.SIGKILL)
    assert code == -signal.SIGKILL
    code, stderr = _run_until(_main_cmd(data, killed), killed, 99, signal.SIGKILL)
    assert code == 0, stderr[-2000:]
    assert "Resuming from the checkpoint of step" in stderr
    expected, resumed = _losses(straight), _losses(killed)
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == expected


def test_sigterm_saves_and_exits_cleanly(data, tmp_path):
    import signal
    workdir = str(tmp_path)
    # lr_decay_steps=8: the learning-rate schedule (a constant in the compiled step) of the
    # kill -9 test's 8-step runs, so this run reuses their compiled train step from the cache.
    code, stderr = _run_until(_main_cmd(data, workdir, **{"train.num_steps": 200,
                                                          "train.lr_decay_steps": 8,
                                                          "checkpoint.every_steps": 1000}),
                              workdir, 3, signal.SIGTERM)
    assert code == 0, stderr[-2000:]
    assert "after SIGTERM" in stderr
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved and saved[-1] >= 3 and saved[-1] < 200


def _visual_slot_index(is_visual: np.ndarray) -> np.ndarray:
    """Index into the row's flattened visual tokens ([images_per_row * V]) of every position;
    -1 where the position holds text: a numpy twin of the model's own computation."""
    return np.where(is_visual, np.cumsum(is_visual, axis=-1) - 1, -1)


def test_packed_rows_hold_whole_samples_apart(data):
    """Every segment of a packed row is exactly its sample's unpacked layout: BOS, V image
    placeholders, the sample's text tokens and loss mask; positions restart; image slots follow
    the segments; nothing but padding is left over."""
    from earthgpt_jax.data import pipeline
    from earthgpt_jax.data.tokenizer import IMAGE_TOKEN

    config, tok = packed(data["config"]), data["tokenizer"]
    cfg = model_config(config, tok.vocab_size, tok.bos_id)
    v = cfg.num_visual_tokens
    pre = TrainPreprocess(tok.path, cfg.image_size, config.data.max_text_len)
    options = train_lib.packing_options(config.data, cfg)
    rows = pipeline.iterate(pipeline.train_dataset(data["train"], pre, batch_size=4, seed=3,
                                                   packing=options))
    alone = {}  # image path -> its samples (several conversations may share an image)
    for i in range(len(data["train"])):
        sample = pre.map(data["train"][i])
        alone.setdefault(sample["example_id"], []).append(sample)
    seen = 0
    for _ in range(3):
        batch = next(rows)
        assert batch["image"].shape == (4, 3, cfg.image_size, cfg.image_size, 3)
        for r in range(4):
            seg, tokens = batch["segment_ids"][r], batch["tokens"][r]
            count = int(seg.max())
            assert 1 <= count <= 3 and set(np.unique(seg[seg > 0])) == set(range(1, count + 1))
            for k in range(count):
                at = np.flatnonzero(seg == k + 1)
                assert np.array_equal(at, np.arange(at[0], at[0] + at.size))  # contiguous
                text = tokens[at[1 + v:]]
                matches = [c for c in alone[batch["example_id"][r][k]]
                           if np.array_equal(c["tokens"][:int(c["valid"].sum())], text)]
                assert matches, "a packed segment matches none of its image's samples"
                sample = matches[0]
                n = int(sample["valid"].sum())
                assert at.size == 1 + v + n
                assert tokens[at[0]] == tok.bos_id
                assert (tokens[at[1:1 + v]] == IMAGE_TOKEN).all()
                assert np.array_equal(tokens[at[1 + v:]], sample["tokens"][:n])
                assert np.array_equal(batch["loss_mask"][r][at[1 + v:]], sample["loss_mask"][:n])
                assert not batch["loss_mask"][r][at[:1 + v]].any()
                assert np.array_equal(batch["positions"][r][at], np.arange(at.size))
                assert np.array_equal(batch["image"][r, k], sample["image"])
                seen += 1
            assert not batch["image"][r, count:].any()  # unused slots are blank
            assert (tokens[seg == 0] == 0).all() and not batch["loss_mask"][r][seg == 0].any()
            assert _visual_slot_index(tokens == IMAGE_TOKEN).max() == count * v - 1
    assert seen > 12  # more samples than rows: packing happened
    with pytest.raises(ValueError, match="pack_length=100 is shorter than one sample"):
        pipeline.train_dataset(data["train"], pre, batch_size=4, seed=0,
                               packing=dataclasses.replace(options, length=100))


def test_worker_processes_resume_the_same_packed_batches(data):
    """With grain worker processes the iterator state still restores the exact stream."""
    from earthgpt_jax.data import pipeline

    config, tok = packed(data["config"]), data["tokenizer"]
    cfg = model_config(config, tok.vocab_size, tok.bos_id)
    pre = TrainPreprocess(tok.path, cfg.image_size, config.data.max_text_len)

    def stream():
        return pipeline.iterate(pipeline.train_dataset(
            data["train"], pre, batch_size=2, seed=5, num_threads=1, num_workers=2,
            packing=train_lib.packing_options(config.data, cfg)))

    first = stream()
    for _ in range(3):
        next(first)
    state = first.get_state()
    want = [next(first) for _ in range(2)]
    resumed = stream()
    resumed.set_state(state)
    for a, b in zip(want, [next(resumed) for _ in range(2)]):
        for key in ("tokens", "segment_ids", "positions", "loss_mask", "image"):
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ValueError, match="num_workers must be >= 0"):
        pipeline.train_dataset(data["train"], pre, batch_size=2, seed=0, num_workers=-1)
