"""`python -m earthgpt_jax.chat` driven through stdin on a tiny model trained for 2 steps."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.test_train import tiny_config, one_device_trainer
from earthgpt_jax import chat, inference, train as train_lib
from earthgpt_jax.data import prepare
from earthgpt_jax.data.pipeline import TrainPreprocess
from earthgpt_jax.checkpoints import save_model_config
from earthgpt_jax.run import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("chat"))
    config = tiny_config(work, batch_size=2, num_steps=2, warmup_steps=1)
    from earthgpt_jax.data import synthetic
    synthetic.write_release(config.data.manual_dir, seed=2, num_train_images=6,
                            num_test_images=2)
    data_dir = prepare.prepare_tfds(config, work)
    source = prepare.data_source(data_dir, "train")
    tok = prepare.prepare_tokenizer(config, work, source)
    cfg = model_config(config, tok.vocab_size, tok.bos_id)
    save_model_config(cfg, work)
    trainer = one_device_trainer(config, cfg)
    train_lib.train(config, work, trainer, source,
                    TrainPreprocess(tok.path, cfg.image_size, config.data.max_text_len))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
        os.path.join(work, "rgb.png"))
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(
        os.path.join(work, "sar.png"))
    return work


def test_chat_streams_a_multi_turn_dialogue_through_stdin(workdir):
    script = "\n".join(["What is in this image?", "And the boats?", "/reset",
                        f"/image {os.path.join(workdir, 'sar.png')}", "Describe it.",
                        "/image /nowhere.png", "/quit", "never read"]) + "\n"
    proc = subprocess.run(
        [sys.executable, "-m", "earthgpt_jax.chat", f"--ckpt_dir={workdir}",
         f"--image={os.path.join(workdir, 'rgb.png')}", "--max_new_tokens=6"],
        input=script, cwd=ROOT, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("ASSISTANT:") == 3, out
    assert "(history cleared)" in out and "sar.png, 30x30" in out
    assert "error: cannot read image /nowhere.png" in proc.stderr
    assert "loaded step 2" in proc.stderr


def test_session_matches_greedy_and_keeps_history(workdir):
    from earthgpt_jax.data.tokenizer import Tokenizer, encode_dialogue_prompt
    from earthgpt_jax.generate import greedy_generate, left_pad
    from earthgpt_jax.data.images import square_and_resize
    session = inference.InferenceSession.from_workdir(os.path.join(workdir, "checkpoints"))
    assert session.step == 2
    model, params = session.model, session.params
    tok = Tokenizer(os.path.join(workdir, "tokenizer.model"))
    dialogue = chat.Chat(session, workdir, max_new_tokens=5)
    image = inference.load_image(os.path.join(workdir, "rgb.png"))
    history = [("What is this?", "A harbor.")]
    streamed = io.StringIO()
    answer = dialogue.answer(image, history, "How many ships?", streamed)
    ids = encode_dialogue_prompt(tok, history, "How many ships?")
    tokens, valid = left_pad([ids], tok.pad_id)
    want = greedy_generate(model, params, square_and_resize(image, model.cfg.image_size)[None],
                           tokens, valid, max_new_tokens=5, eos_id=tok.eos_id,
                           pad_id=tok.pad_id)
    from earthgpt_jax.generate import apply_stop_strings
    want_text = apply_stop_strings(tok.decode(np.asarray(want)[0]), inference.STOP_STRINGS)
    assert answer == want_text.strip()
    assert streamed.getvalue().strip() == answer


def test_boxes_are_drawn_next_to_the_image(workdir):
    image = inference.load_image(os.path.join(workdir, "rgb.png"))
    path = chat.draw_answer(image, os.path.join(workdir, "rgb.png"),
                            "There are <p>2 ships</p>[0.10,0.20,0.30,0.40;0.5,0.5,0.6,0.6]",
                            workdir, 1)
    assert path == os.path.join(workdir, "rgb.earthgpt_turn1.png") and os.path.exists(path)
    assert chat.draw_answer(image, os.path.join(workdir, "rgb.png"), "A harbor.", workdir, 2) \
        is None
    assert inference.answer_boxes("[0.1,0.1,0.5,0.5]")[0] == [[0.1, 0.1, 0.5, 0.5]]
    # An oriented box (four corners) comes back, and is drawn, as its corners.
    oriented = "There is <p>1 ship</p>[0.20,0.10,0.50,0.30,0.40,0.45,0.10,0.25]"
    assert inference.answer_boxes(oriented) == (
        [[0.2, 0.1, 0.5, 0.3, 0.4, 0.45, 0.1, 0.25]], ["ship"])
    assert chat.draw_answer(image, os.path.join(workdir, "rgb.png"), oriented, workdir, 3)


def test_clear_errors_exit_2(workdir, tmp_path):
    def run(*argv):
        err = io.StringIO()
        code = chat.main(list(argv), stdin=io.StringIO(""), stdout=io.StringIO(), stderr=err)
        return code, err.getvalue()

    code, err = run(f"--ckpt_dir={tmp_path / 'none'}", f"--image={workdir}/rgb.png")
    assert code == 2 and "checkpoint directory not found" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("model_config.json", "tokenizer.model"):
        (empty / name).write_bytes(open(os.path.join(workdir, name), "rb").read())
    code, err = run(f"--ckpt_dir={empty}", f"--image={workdir}/rgb.png")
    assert code == 2 and "no checkpoint found" in err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, err = run(f"--ckpt_dir={workdir}", f"--image={bad}")
    assert code == 2 and "cannot decode image" in err and err.count("\n") == 1
    # Multi-band and 16-bit TIFFs are read as training reads them: tests/test_inference.py.


def test_each_user_turn_gets_a_prompt_marker():
    out = io.StringIO()
    chat.chat_loop(None, "scene.png", np.zeros((4, 6, 3), np.uint8),
                   io.StringIO("/reset\n/nope\n"), out, io.StringIO())
    text = out.getvalue()
    assert text.count(chat.USER_PROMPT) == 3  # before each line, and before the end of input
    assert text.index(chat.USER_PROMPT) < text.index("(history cleared)")
    assert text.endswith(chat.USER_PROMPT + "\n")
