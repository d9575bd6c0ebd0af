"""One inference session: model, params, tokenizer, mesh and rules, with training's own image
preprocessing; the terminal chat (chat.py), the web chat (serve/) and evaluation
(evaluate/runner.py) all decode through it. Built from a training workdir (`from_workdir`) or
from the parts a run already holds (training's end-of-run evaluation).

Images go through `data/images.decode_image` and `square_and_resize`, the calls the training
pipeline makes, so every entry point sees an image (band choice, bit-depth stretch, TIFF layout,
orientation) exactly as training did. Use the session's `load_image` and `decode`: they pass
the model's band count (config.model.input_bands).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import flax.linen as nn
import jax
import numpy as np

from earthgpt_jax.data import boxes as box_text
from earthgpt_jax.data.images import ImageDecodeError, decode_image, square_and_resize
from earthgpt_jax.data.tokenizer import Tokenizer, encode_dialogue_prompt
from earthgpt_jax.generate import apply_stop_strings, generate, left_pad, unrolled_for_decoding
from earthgpt_jax.models.earthgpt import EarthGPT

STOP_STRINGS = ("USER:",)  # a model that runs past its `</s>` starts the next turn
HOLD = max(len(s) for s in STOP_STRINGS) - 1  # never show the start of a stop string
PROMPT_BUCKET = 32  # prompts are left-padded to a multiple: one compile per bucket, not per turn


class InferenceError(Exception):
    """A user-facing error (no workdir, checkpoint or tokenizer; unreadable image): one line."""


def load_image(path: str, bands: int = 3) -> np.ndarray:
    """An image file -> uint8 [H, W, bands], decoded as training decodes it (or InferenceError)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InferenceError(f"cannot read image {path}: {e.strerror or e}") from None
    try:
        return decode_image(data, path, bands=bands)
    except ImageDecodeError as e:
        raise InferenceError(str(e).splitlines()[0]) from None


def answer_boxes(answer: str) -> tuple[list, list]:
    """(normalised boxes, labels) of a detection or grounding answer; ([], []) when none. A box
    is [x0,y0,x1,y1], or an oriented box's four corners [x1,y1,...,x4,y4] (drawn as written)."""
    from earthgpt_jax.evaluate import parsers
    groups, _ = box_text.parse_detection(answer, corners=True)
    found, labels = [], []
    for cls, _, quads in groups:
        found += quads
        labels += [parsers.normalise_class(cls)] * len(quads)
    if not found:
        found = box_text.parse_shapes(answer).corners if "[" in answer else []
        labels = [None] * len(found)
    return [list(box_text.drawn_shape(q)) for q in found], labels


def answer_text(tokenizer: Tokenizer, generated: list[int]) -> tuple[str, bool, int]:
    """(answer so far, cut at a stop string; whether one was met; how much of it may be shown
    while streaming, holding back what could still become a stop string)."""
    full = tokenizer.sp.decode(generated)
    text = apply_stop_strings(full, STOP_STRINGS)
    stopped = len(text) < len(full)
    return text, stopped, len(text) if stopped else len(text) - HOLD


@dataclasses.dataclass
class InferenceSession:
    model: EarthGPT
    params: object
    tokenizer: Tokenizer
    mesh: jax.sharding.Mesh
    rules: tuple = ()
    step: int | None = None  # the training step of the params, when known

    @classmethod
    def from_workdir(cls, workdir: str, tokenizer_path: str = "", *, mesh=None, rules=()
                     ) -> "InferenceSession":
        """A training workdir's (or its checkpoints/ folder's) model, tokenizer and latest
        params, restored sharded onto `mesh` by `rules` (default: the first device)."""
        from earthgpt_jax import checkpoints, parallel
        from earthgpt_jax.models.earthgpt import abstract_params
        workdir = os.path.abspath(os.path.expanduser(workdir))
        if os.path.basename(workdir) == "checkpoints" and not os.path.exists(
                os.path.join(workdir, "model_config.json")):
            workdir = os.path.dirname(workdir)
        if not os.path.isdir(workdir):
            raise InferenceError(f"checkpoint directory not found: {workdir}")
        config_path = os.path.join(workdir, "model_config.json")
        if not os.path.exists(config_path):
            raise InferenceError(f"no model_config.json in {workdir} (is it a training workdir?)")
        tok_path = tokenizer_path or os.path.join(workdir, "tokenizer.model")
        if not os.path.exists(tok_path):
            raise InferenceError(f"tokenizer not found: {tok_path} (pass --tokenizer)")
        model = EarthGPT(checkpoints.load_model_config(config_path))
        if mesh is None:
            mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                                     parallel.MESH_AXES)
        boxed = abstract_params(model)
        targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                               nn.unbox(boxed), parallel.shardings_for(boxed, mesh, rules))
        try:
            params, step = checkpoints.restore_params(workdir, targets, stored_dtypes=True)
        except FileNotFoundError as e:
            raise InferenceError(str(e)) from None
        except Exception as e:  # orbax: a checkpoint of another model, a broken step folder
            raise InferenceError(f"cannot restore the checkpoint in "
                                 f"{os.path.join(workdir, 'checkpoints')}: "
                                 f"{str(e).splitlines()[0][:300]}") from None
        # Decoding reads unrolled layers (generate.unrolled_for_decoding): a restored session
        # only decodes, and the stacked arrays are dropped once split.
        model, params = unrolled_for_decoding(model, params)
        return cls(model, params, Tokenizer(tok_path), mesh, rules, step)

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical-axis rules that decoding's activation shardings refer to."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def load_image(self, path: str) -> np.ndarray:
        return load_image(path, self.model.cfg.input_bands)

    def decode(self, data: bytes, name: str, **options) -> np.ndarray:
        """Encoded bytes decoded with this model's bands (`images.decode_image`'s errors)."""
        return decode_image(data, name, bands=self.model.cfg.input_bands, **options)

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """The model's view of a decoded image: training's centre-padded, resized square."""
        bands = self.model.cfg.input_bands
        if image.ndim != 3 or image.shape[-1] != bands:
            raise InferenceError(f"an image of shape {image.shape} for a model of {bands} input "
                                 f"bands: decode it with the session's load_image or decode")
        return square_and_resize(image, self.model.cfg.image_size)

    def prompts(self, dialogues, multiple: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
        """[(history, question)] -> left-padded (tokens, valid), as training lays text out."""
        ids = [encode_dialogue_prompt(self.tokenizer, h, q) for h, q in dialogues]
        return left_pad(ids, self.tokenizer.pad_id, multiple)

    def generate(self, images, tokens, valid, **settings):
        """Batched decoding on the session's mesh (`generate.generate`: greedy, beam, top-p).
        On a mesh over several processes each one gets the whole result (every process decodes
        the same batch), since no process can read the others' shards."""
        with self.context():
            out = generate(self.model, self.params, images, tokens, valid,
                           eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                           **settings)
        if not out.is_fully_addressable:
            from jax.experimental import multihost_utils
            return multihost_utils.process_allgather(out, tiled=True)
        return out
