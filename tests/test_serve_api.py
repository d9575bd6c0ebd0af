"""The web chat's API over real HTTP, on a tiny EarthGPT trained until it writes its boxes.

The checkpoint is made once per session (`trained_workdir`, also used by the browser test): two
generated scenes, four question/answer pairs, a tokenizer trained on their text, 60 steps of
real training, saved by the real trainer. The server is the real Starlette app under uvicorn
on a free loopback port, decoding with the real engine thread.
"""

import http.client
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.test_train import tiny_config, one_device_trainer
from earthgpt_jax import train as train_lib
from earthgpt_jax.data import boxes
from earthgpt_jax.data.pipeline import TrainPreprocess
from earthgpt_jax.data.synthetic import CAPTION_PROMPTS, CLASSIFICATION_PROMPT
from earthgpt_jax.data.tokenizer import USER_TEMPLATE, train_tokenizer
from earthgpt_jax.checkpoints import save_model_config
from earthgpt_jax.run import model_config

# Scene A: two white "ships" on a noisy blue sea; scene B: one red "vehicle", taller than wide.
SHIPS = [(8, 10, 20, 18), (40, 28, 54, 36)]
VEHICLE = [(20, 30, 34, 44)]
_CACHE: dict = {}


def _scene(seed: int, width: int, height: int, objects, colour) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.normal(90, 12, (height, width, 3))
    img[..., 2] += 40
    for x0, y0, x1, y1 in objects:
        img[y0:y1, x0:x1] = colour
    return img.clip(0, 255).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _detection(objects, width, height, name):
    return boxes.detection_to_text([(name, [boxes.pixel_to_norm(b, width, height)
                                            for b in objects])])


def trained_workdir(tmp_path_factory) -> dict:
    """A training workdir whose model answers the scenes' questions exactly (once a session)."""
    if "work" in _CACHE:
        return _CACHE
    work = str(tmp_path_factory.mktemp("serve"))
    scene_a = _png(_scene(1, 64, 48, SHIPS, 250))
    scene_b = _png(_scene(2, 48, 64, VEHICLE, (240, 40, 30)))
    pairs = [(scene_a, boxes.DETECTION_PROMPT, _detection(SHIPS, 64, 48, "ship")),
             (scene_a, CLASSIFICATION_PROMPT, "harbor"),
             (scene_b, boxes.DETECTION_PROMPT, _detection(VEHICLE, 48, 64, "vehicle")),
             (scene_b, CAPTION_PROMPTS[0], "A grey parking lot with one red vehicle.")]
    records = [{"image": image, "image_path": f"pair{i}.png",
                "conversations": {"from": ["human", "gpt"], "value": [q, a]}}
               for i, (image, q, a) in enumerate(pairs)]
    tok = train_tokenizer([USER_TEMPLATE] + [t for p in pairs for t in p[1:]],
                          os.path.join(work, "tokenizer.model"), vocab_size=360)
    config = tiny_config(work, batch_size=4, num_steps=60, learning_rate=1e-2, warmup_steps=10,
                         log_every_steps=30)
    config = config.replace(checkpoint={"every_steps": 1000})
    cfg = model_config(config, tok.vocab_size, tok.bos_id)
    save_model_config(cfg, work)
    trainer = one_device_trainer(config, cfg)
    train_lib.train(config, work, trainer, records,
                    TrainPreprocess(tok.path, cfg.image_size, config.data.max_text_len))
    for name, data in (("ships.png", scene_a), ("vehicle.png", scene_b)):
        with open(os.path.join(work, name), "wb") as f:
            f.write(data)
    _CACHE.update(work=work, answers={p[1] + name: p[2] for p, name in
                                      zip(pairs, ("ships", "ships", "vehicle", "vehicle"))})
    return _CACHE


class ServerThread:
    """The real app under uvicorn on a free loopback port, in this process."""

    def __init__(self, service):
        import uvicorn
        from earthgpt_jax.serve.__main__ import bind
        from earthgpt_jax.serve.app import create_app
        self.service = service
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        if self.service.scenes is not None:  # its uploaded scenes' temporary folder
            self.service.scenes.close()
        self.service.engine.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from earthgpt_jax.serve.__main__ import build_service
    from earthgpt_jax.serve.service import Limits
    trained = trained_workdir(tmp_path_factory)
    # Small limits so that "too big" is cheap to send.
    limits = Limits(max_upload_bytes=200_000, max_image_pixels=60_000, max_question_chars=3000,
                    max_new_tokens=96)
    service = build_service(trained["work"], limits=limits)
    with ServerThread(service) as server:
        yield dict(trained, server=server, service=service)


def call(served, method, path, body=None, headers=None, chunked=False):
    """(status, parsed JSON or raw text) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", served["server"].port, timeout=120)
    if isinstance(body, dict):
        body, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    kind = response.getheader("Content-Type", "")
    return response.status, json.loads(raw) if kind.startswith("application/json") else raw


def upload(served, name) -> str:
    with open(os.path.join(served["work"], name), "rb") as f:
        status, facts = call(served, "POST", f"/api/conversations?name={name}", f.read())
    assert status == 201, facts
    return facts["id"]


def ask_streaming(served, cid, question, **settings):
    """(events in order, done event): reads the Server-Sent Events as a browser would."""
    status, text = call(served, "POST", f"/api/conversations/{cid}/messages",
                        dict(question=question, **settings))
    assert status == 200, text
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events, events[-1][1]


def test_bad_uploads_get_clear_4xx(served):
    status, body = call(served, "POST", "/api/conversations?name=notes.txt", b"hello, world")
    assert status == 415 and body["error"] == "notes.txt: not a PNG, JPEG or TIFF image"
    status, body = call(served, "POST", "/api/conversations?name=cut.png",
                        _png(_scene(3, 40, 40, [], 0))[:2000])
    assert status == 400 and "cannot decode image cut.png" in body["error"], body
    assert "PNG data is truncated or corrupt" in body["error"], body
    assert body["error"].count("cut.png") == 1, body
    status, body = call(served, "POST", "/api/conversations?name=empty.png", b"")
    assert status == 400 and "empty" in body["error"]
    import tifffile
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.random.default_rng(0).integers(0, 4000, (8, 8, 5), np.uint16),
                     photometric="minisblack", planarconfig="contig")
    status, facts = call(served, "POST", "/api/conversations?name=ms.tif", buf.getvalue())
    assert status == 201 and facts["bands"] == 3, facts  # training reads the first three bands
    # Too many bytes, declared up front and streamed without a length; too many pixels.
    big = os.urandom(250_000)
    status, body = call(served, "POST", "/api/conversations?name=big.png", big)
    assert status == 413 and "250000 bytes; the limit is 200000" in body["error"], body
    status, body = call(served, "POST", "/api/conversations", big)  # no name given
    assert status == 413 and body["error"].startswith("the upload is 250000 bytes"), body
    status, body = call(served, "POST", "/api/conversations?name=big.png",
                        (big[i:i + 50_000] for i in range(0, len(big), 50_000)), chunked=True)
    assert status == 413 and "over the limit of 200000 bytes" in body["error"], body
    status, body = call(served, "POST", "/api/conversations?name=wide.png",
                        _png(np.zeros((200, 400), np.uint8)))
    assert status == 413 and "400x200 pixels" in body["error"], body
    # A 1-band 16-bit TIFF (SAR-like) is accepted and shown as 8-bit PNG.
    buf = io.BytesIO()
    tifffile.imwrite(buf, (np.arange(30 * 40, dtype=np.uint16) * 50).reshape(30, 40))
    status, facts = call(served, "POST", "/api/conversations?name=sar.tif", buf.getvalue())
    assert status == 201 and (facts["width"], facts["height"], facts["bands"]) == (40, 30, 1)
    conn = http.client.HTTPConnection("127.0.0.1", served["server"].port, timeout=30)
    conn.request("GET", facts["image_url"])
    png = conn.getresponse().read()
    assert Image.open(io.BytesIO(png)).size == (40, 30)


def test_unknown_conversation_and_bad_questions_get_clear_4xx(served):
    for method, path, body in (("GET", "/api/conversations/nope", None),
                               ("POST", "/api/conversations/nope/messages", {"question": "hi"}),
                               ("POST", "/api/conversations/nope/reset", None),
                               ("GET", "/api/conversations/nope/image", None)):
        status, reply = call(served, method, path, body)
        assert status == 404 and "unknown conversation id 'nope'" in reply["error"], reply
    cid = upload(served, "ships.png")
    path = f"/api/conversations/{cid}/messages"
    for body, status_want, fragment in (
            ({"question": ""}, 400, "question is empty"),
            ({"question": "   "}, 400, "question is empty"),
            ({}, 400, "question is empty"),
            ({"question": "x" * 3001}, 413, "3001 characters; the limit is 3000"),
            # Fits the character limit, not the model's 512-position context.
            ({"question": " ".join(["harbor"] * 400)}, 413, "tokens; the model's context of 512"),
            ({"question": "hi", "max_new_tokens": 0}, 400, "max_new_tokens=0 is out of range"),
            ({"question": "hi", "max_new_tokens": 97}, 400, "out of range [1, 96]"),
            ({"question": "hi", "max_new_tokens": "many"}, 400, "must be an integer"),
            ({"question": "hi", "temperature": -1}, 400, "temperature=-1 is out of range")):
        status, reply = call(served, "POST", path, body)
        assert status == status_want and fragment in reply["error"], (body, reply)
    status, reply = call(served, "POST", path, b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "not valid JSON" in reply["error"]
    status, reply = call(served, "POST", path, b"x" * 70_000)
    assert status == 413 and "message body" in reply["error"]


def test_streamed_detection_answer_with_boxes_and_a_second_turn(served):
    cid = upload(served, "ships.png")
    events, done = ask_streaming(served, cid, boxes.DETECTION_PROMPT, max_new_tokens=64)
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("token") > 5, kinds
    streamed = "".join(data["text"] for kind, data in events if kind == "token")
    assert done["answer"] == streamed.strip() == served["answers"][boxes.DETECTION_PROMPT + "ships"]
    assert done["finish"] == "eos" and done["ttft_s"] > 0 and done["tokens"] > 5
    assert [b["label"] for b in done["boxes"]] == ["ship", "ship"]
    # The boxes come back in the original image's pixels (through the pad-to-square inverse).
    got = np.array([b["pixels"] for b in done["boxes"]])
    assert np.abs(got - np.array(SHIPS)).max() <= 0.01 * 64, got
    # Second turn: the dialogue so far is part of the prompt; JSON mode answers in one piece.
    status, reply = call(served, "POST", f"/api/conversations/{cid}/messages",
                         {"question": CLASSIFICATION_PROMPT, "stream": False,
                          "max_new_tokens": 8})
    assert status == 200 and reply["finish"] in ("eos", "length", "stop") and reply["answer"]
    assert reply["prompt_tokens"] > events[0][1]["prompt_tokens"]
    status, facts = call(served, "GET", f"/api/conversations/{cid}")
    assert [t["question"] for t in facts["history"]] == [boxes.DETECTION_PROMPT,
                                                         CLASSIFICATION_PROMPT]
    status, facts = call(served, "POST", f"/api/conversations/{cid}/reset")
    assert status == 200 and facts["history"] == []


def test_eight_concurrent_requests_all_complete(served):
    names = ["ships.png", "vehicle.png"] * 4
    ids = [upload(served, n) for n in names]
    before = dict(served["service"].engine.stats)
    barrier = threading.Barrier(len(ids))
    results = [None] * len(ids)

    def one(i):
        barrier.wait()  # all eight questions leave at once
        results[i] = ask_streaming(served, ids[i], boxes.DETECTION_PROMPT, max_new_tokens=64)[1]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for name, done in zip(names, results):
        assert done is not None and done["finish"] == "eos"
        want = served["answers"][boxes.DETECTION_PROMPT + name.split(".")[0]]
        assert done["answer"] == want  # batched rows decode exactly as a lone request does
    stats = served["service"].engine.stats
    assert stats["requests"] - before["requests"] == 8 and stats["errors"] == 0
    # They were decoded together (shared prefill or interleaved groups), not one after another.
    assert stats["max_rows_in_group"] > 1 or stats["max_live_groups"] > 1, stats


def test_a_short_request_is_not_stuck_behind_a_long_one(served):
    """Round-robin groups: a 2-token answer asked once a long answer has started (submitted from
    the long answer's first-token event, so the timing is exact) finishes first."""
    from earthgpt_jax.serve.engine import Request
    service = served["service"]
    with open(os.path.join(served["work"], "ships.png"), "rb") as f:
        conv = service.create(f.read(), "ships.png")
    ids, _ = service.prompt(conv, boxes.DETECTION_PROMPT, 64)
    finished, all_done = [], threading.Event()

    def on_event(name):
        def emit(event):
            if name == "long" and event["type"] == "token" and not finished and not short:
                short.append(Request(conv.pixels, ids, 2, on_event("short")))
                service.engine.submit(short[0])
            if event["type"] in ("done", "error"):
                finished.append((name, event.get("finish"), event.get("tokens")))
                if len(finished) == 2:
                    all_done.set()
        return emit

    short: list = []
    service.engine.submit(Request(conv.pixels, ids, 64, on_event("long")))
    assert all_done.wait(120), finished
    assert finished[0] == ("short", "length", 2), finished
    assert finished[1][:2] == ("long", "eos") and finished[1][2] > 20, finished


def test_cli_refuses_a_missing_checkpoint_and_says_how_to_expose(tmp_path, capsys):
    from earthgpt_jax.serve.__main__ import banner, main
    assert main([f"--ckpt_dir={tmp_path / 'none'}", "--port=0"]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    local = banner("127.0.0.1", 8123, "step 1")
    assert "http://127.0.0.1:8123/" in local and "ssh -N -L 8123:127.0.0.1:8123" in local
    assert "--host=0.0.0.0" in local
    assert "WARNING" in banner("0.0.0.0", 8123, "step 1")


def test_a_truncated_png_is_called_truncated_not_unknown():
    from earthgpt_jax.serve.service import ApiError, Limits, decode_upload
    data = _png(_scene(3, 40, 40, [], 0))
    with pytest.raises(ApiError) as raised:
        decode_upload(data[:len(data) // 2], "cut.png", Limits())
    assert raised.value.status == 400
    assert raised.value.message.startswith("cannot decode image cut.png: its PNG data is "
                                           "truncated or corrupt ("), raised.value.message


# An oriented ship in a 64 x 48 image: its corners in pixels, clockwise on the screen.
ORIENTED_SHIP = (20, 5, 50, 20, 44, 32, 14, 17)


def oriented_answer() -> str:
    """A detection answer with one oriented ship (four corners) and one horizontal vehicle."""
    return boxes.detection_to_text([
        ("ship", [boxes.pixel_to_norm(ORIENTED_SHIP, 64, 48)]),
        ("vehicle", [boxes.pixel_to_norm((2, 30, 10, 40), 64, 48)])])


def test_oriented_boxes_come_back_as_corners_beside_their_enclosing_box():
    from earthgpt_jax.serve.service import answer_boxes
    ship, vehicle = answer_boxes(oriented_answer(), 64, 48)
    assert ship["label"] == "ship" and vehicle["label"] == "vehicle"
    # Two decimals of the 64-pixel padded square move a corner by at most 0.32 pixels.
    np.testing.assert_allclose(ship["corner_pixels"], ORIENTED_SHIP, atol=0.33)
    np.testing.assert_allclose(ship["pixels"], [14, 5, 50, 32], atol=0.33)
    np.testing.assert_allclose(ship["box"], boxes.enclosing_box(ship["corners"]))
    assert "corners" not in vehicle  # a horizontal box stays a box
    np.testing.assert_allclose(vehicle["pixels"], [2, 30, 10, 40], atol=0.33)
    # Centre, size and angle (degrees) is read as the same kind of polygon, clipped to the image.
    (box,) = answer_boxes("[0.5,0.5,0.4,0.1,45]", 64, 48)
    assert len(box["corner_pixels"]) == 8 and box["label"] is None
    assert min(box["corner_pixels"][1::2]) >= 0 and max(box["corner_pixels"][1::2]) <= 48


def test_evict_idle_drops_the_least_recently_used_idle_entries_only():
    """Conversations and scenes are bounded by one rule: the oldest entries without work in
    flight go first; busy ones are kept even past the limit."""
    import collections
    import types
    from earthgpt_jax.serve.service import evict_idle

    entries = collections.OrderedDict(
        (k, types.SimpleNamespace(busy=busy)) for k, busy in
        (("a", True), ("b", False), ("c", True), ("d", False), ("e", False)))
    dropped = evict_idle(entries, 3)
    assert list(entries) == ["a", "c", "e"] and len(dropped) == 2
    last = entries["e"]
    assert evict_idle(entries, 1) == [last] and list(entries) == ["a", "c"]  # both busy: kept
