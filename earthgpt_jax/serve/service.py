"""What the chat serves, without HTTP: conversations, upload checks, prompts, limits.

A conversation is an uploaded image (decoded once, kept with the model's view of it) and its
dialogue. Every refusal is an `ApiError` whose status and message the HTTP layer passes on.
Decoding itself is `engine.Engine`'s; this module only prepares requests and files answers.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import secrets
import threading

import numpy as np

from earthgpt_jax import inference
from earthgpt_jax.data import boxes as box_text
from earthgpt_jax.data.images import (ImageDecodeError, ImageTooLargeError, decode_image,
                                      sniff_format)
from earthgpt_jax.data.synthetic import CAPTION_PROMPTS, CLASSIFICATION_PROMPT
from earthgpt_jax.data.tokenizer import encode_dialogue_prompt
from earthgpt_jax.serve.engine import Engine, QueueFull, Request as DecodeRequest

# The page's task shortcuts send exactly the prompts the model was trained with.
TASK_PROMPTS = {
    "describe": CAPTION_PROMPTS[0],
    "classify": CLASSIFICATION_PROMPT,
    "detect": box_text.DETECTION_PROMPT,
    "find": box_text.GROUNDING_PROMPT,  # {phrase} is filled in by the page
}


@dataclasses.dataclass
class Limits:
    max_upload_bytes: int = 25 * 2**20
    max_image_pixels: int = 50_000_000
    max_question_chars: int = 2000
    max_new_tokens: int = 256
    max_conversations: int = 256
    max_json_bytes: int = 64 * 2**10


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def checked_question(question: str, limit: int) -> str:
    question = question.strip()
    if len(question) > limit:
        raise ApiError(413, f"question is {len(question)} characters; the limit is {limit}")
    return question


def evict_idle(entries: collections.OrderedDict, limit: int) -> list:
    """Drops the least recently used entries that are not `busy` until at most `limit` remain
    (or only busy ones are left); returns the dropped values."""
    dropped = []
    while len(entries) > limit:
        idle = next((k for k, v in entries.items() if not v.busy), None)
        if idle is None:
            break
        dropped.append(entries.pop(idle))
    return dropped


@dataclasses.dataclass
class Conversation:
    id: str
    name: str
    image: np.ndarray   # uint8 [H, W, 3], as training decodes the upload
    pixels: np.ndarray  # the model's view: padded square, resized
    bands: int          # 1: grey (SAR, infrared; replicated), 3: colour
    history: list = dataclasses.field(default_factory=list)
    busy: bool = False
    png: bytes | None = None

    def facts(self) -> dict:
        h, w = self.image.shape[:2]
        return {"id": self.id, "name": self.name, "width": w, "height": h, "bands": self.bands,
                "image_url": f"/api/conversations/{self.id}/image",
                "history": [{"question": q, "answer": a} for q, a in self.history]}


def decode_upload(data: bytes, name: str, limits: Limits, bands: int = 3
                  ) -> tuple[np.ndarray, int]:
    """Uploaded bytes -> (uint8 [H, W, 3] decoded as training decodes it, the bands the model
    reads: 1 grey or 3); ApiError naming the upload otherwise."""
    if not data:
        raise ApiError(400, f"{name}: the upload is empty; send the image file's bytes")
    if sniff_format(data) not in ("png", "jpeg", "tiff"):
        raise ApiError(415, f"{name}: not a PNG, JPEG or TIFF image")
    try:  # the size in the header is checked before any pixel is decoded
        image = decode_image(data, name, max_pixels=limits.max_image_pixels, bands=bands)
    except ImageTooLargeError as e:
        size = "{}x{} pixels".format(*e.size) if e.size else "the image"
        raise ApiError(413, f"{name}: {size} is over the limit of {limits.max_image_pixels} "
                            "pixels") from None
    except ImageDecodeError as e:
        raise ApiError(400, str(e).splitlines()[0]) from None
    grey = all(np.array_equal(image[..., 0], image[..., b]) for b in range(1, bands))
    return image, 1 if grey else bands


def answer_boxes(answer: str, width: int, height: int) -> list[dict]:
    """Boxes of a grounding or detection answer: label, [0,1] box of the padded square, and the
    box in the original image's pixels (clipped to the image). An oriented box's `box` and
    `pixels` enclose it, and its corners come both ways too (`corners`, `corner_pixels`,
    clipped), which the page draws as a polygon."""
    found, labels = inference.answer_boxes(answer)
    out = []
    for shape, label in zip(found, labels):
        pixels = [min(max(v, 0), width if k % 2 == 0 else height)
                  for k, v in enumerate(box_text.norm_to_pixel(shape, width, height))]
        entry = {"label": label, "box": [round(v, 4) for v in box_text.enclosing_box(shape)],
                 "pixels": [round(v, 1) for v in box_text.enclosing_box(pixels)]}
        if len(shape) == 8:
            entry.update(corners=[round(v, 4) for v in shape],
                         corner_pixels=[round(v, 1) for v in pixels])
        out.append(entry)
    return out


def find_examples(ckpt_dir: str, examples_dir: str = "", limit: int = 9) -> dict[str, str]:
    """name -> path of example images: every image in `examples_dir`, or else the test images of
    the miniature release a demo workdir holds (one per source folder: optical, SAR, IR)."""
    images = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
    if examples_dir:
        names = sorted(n for n in os.listdir(examples_dir) if n.lower().endswith(images))
        return {n: os.path.join(examples_dir, n) for n in names[:limit]}
    release = os.path.join(ckpt_dir, "mini_mmrs1m", "data")
    firsts = []
    for folder, _, files in os.walk(release):
        tests = sorted(f for f in files if f.startswith("test_") and f.lower().endswith(images))
        if tests:
            firsts.append(os.path.relpath(os.path.join(folder, tests[0]), release))

    def rank(rel):  # detection scenes first (they show boxes), then grounding, then the rest
        return 0 if rel.startswith("detection") else 1 if rel.startswith("RSVG") else 2, rel

    return {rel: os.path.join(release, rel) for rel in sorted(firsts, key=rank)[:limit]}


class ChatService:
    """Conversations and prompts; hands decoding to the engine. Thread-safe."""

    def __init__(self, engine: Engine, limits: Limits, examples: dict[str, str] | None = None,
                 description: str = "", scenes=None):
        self.engine, self.session, self.limits = engine, engine.session, limits
        self.scenes = scenes  # scenes.SceneJobs, or None: the server takes no whole scenes
        self.tok, self.cfg = self.session.tokenizer, self.session.model.cfg
        self.examples = examples or {}
        self.description = description
        self._conversations: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- conversations

    def create(self, data: bytes, name: str) -> Conversation:
        image, bands = decode_upload(data, name, self.limits, self.cfg.input_bands)
        conv = Conversation(secrets.token_urlsafe(12), name, image, self.session.pixels(image),
                            bands)
        with self._lock:
            self._conversations[conv.id] = conv
            evict_idle(self._conversations, self.limits.max_conversations)
        return conv

    def get(self, conversation_id: str) -> Conversation:
        with self._lock:
            conv = self._conversations.get(conversation_id)
            if conv is None:
                raise ApiError(404, f"unknown conversation id {conversation_id!r} (never created, "
                                    "deleted, or expired); upload the image again")
            self._conversations.move_to_end(conversation_id)
            return conv

    def count(self) -> int:
        return len(self._conversations)

    def delete(self, conversation_id: str) -> None:
        self.get(conversation_id)
        with self._lock:
            self._conversations.pop(conversation_id, None)

    def image_png(self, conv: Conversation) -> bytes:
        if conv.png is None:
            from PIL import Image
            buf = io.BytesIO()
            Image.fromarray(conv.image).save(buf, format="PNG")
            conv.png = buf.getvalue()
        return conv.png

    # ---------------------------------------------------------------- questions

    def settings(self, body: dict) -> dict:
        """Validated decoding settings from a message body."""
        def number(key, default, kind, lo, hi):
            value = body.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    kind is int and not float(value).is_integer()):
                what = "an integer" if kind is int else "a number"
                raise ApiError(400, f"{key} must be {what}, got {value!r}")
            if not lo <= value <= hi:
                raise ApiError(400, f"{key}={value} is out of range [{lo}, {hi}]")
            return kind(value)
        return {"max_new_tokens": number("max_new_tokens", min(128, self.limits.max_new_tokens),
                                         int, 1, self.limits.max_new_tokens),
                "temperature": number("temperature", 0.0, float, 0.0, 5.0),
                "top_p": number("top_p", 0.9, float, 0.0, 1.0),
                "seed": number("seed", 0, int, 0, 2**31 - 1)}

    def prompt(self, conv: Conversation, question: str, max_new_tokens: int
               ) -> tuple[list[int], int]:
        """Prompt ids and how many earlier turns it drops so image + dialogue + answer fit the
        model's context (the oldest turns go first)."""
        context = self.cfg.llm.max_position_embeddings
        budget = context - 1 - self.cfg.num_visual_tokens - max_new_tokens
        for dropped in range(len(conv.history) + 1):
            ids = encode_dialogue_prompt(self.tok, conv.history[dropped:], question)
            if len(ids) <= budget:
                return ids, dropped
        raise ApiError(413, f"question is {len(ids)} tokens; the model's context of {context} "
                            f"positions leaves {max(budget, 0)} for it after the image "
                            f"({1 + self.cfg.num_visual_tokens}) and max_new_tokens="
                            f"{max_new_tokens}")

    def start_answer(self, conv: Conversation, body: dict, emit) -> tuple[DecodeRequest, dict]:
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ApiError(400, "question is empty; ask something about the image")
        question = checked_question(question, self.limits.max_question_chars)
        settings = self.settings(body)
        ids, dropped = self.prompt(conv, question, settings["max_new_tokens"])
        with self._lock:
            if conv.busy:
                raise ApiError(409, f"conversation {conv.id} is still answering; wait for the "
                                    "answer or reset the conversation")
            conv.busy = True
        request = DecodeRequest(conv.pixels, ids, emit=emit, **settings)
        try:
            self.engine.submit(request)
        except QueueFull as e:
            conv.busy = False
            raise ApiError(503, f"server busy ({e}); try again shortly") from None
        return request, {"question": question, "dropped_turns": dropped,
                         "prompt_tokens": len(ids), **settings}

    def finish_answer(self, conv: Conversation, question: str, event: dict) -> dict:
        h, w = conv.image.shape[:2]
        event = dict(event, boxes=answer_boxes(event.get("answer", ""), w, h))
        if event.get("finish") != "cancelled":
            conv.history.append((question, event.get("answer", "")))
        return event

    def info(self) -> dict:
        llm = self.cfg.llm
        return {
            "model": {"description": self.description, "image_size": self.cfg.image_size,
                      "visual_tokens": self.cfg.num_visual_tokens, "layers": llm.num_layers,
                      "hidden_size": llm.hidden_size, "vocab_size": llm.vocab_size,
                      "context": llm.max_position_embeddings},
            "limits": dataclasses.asdict(self.limits),
            "scene_limits": dataclasses.asdict(self.scenes.limits) if self.scenes else None,
            "prompts": TASK_PROMPTS,
            "examples": [{"name": n, "url": f"/api/examples/{n}"} for n in self.examples]}
