"""Talk to a trained EarthGPT about an image, in the terminal.

    python -m earthgpt_jax.chat --ckpt_dir=/tmp/earthgpt_demo --image=scene.png

`--ckpt_dir` is a training workdir: `model_config.json`, `tokenizer.model` (or `--tokenizer`)
and `checkpoints/` (the latest step is loaded; only its params are read). Each line on stdin is
one user turn; the answer is streamed token by token (host loop over a jitted single-step
decode with the KV cache; each turn re-prefills the image and the whole dialogue, laid out by
the training chat template). Commands: `/image PATH` switches the image and clears the history,
`/reset` clears the history, `/quit` (or end of input) exits. When an answer holds boxes
(grounding or detection), they are drawn into a PNG next to the image (into the workdir when
that folder is not writable) and its path is printed.

Images: PNG, JPEG or TIFF with 1 band (SAR, infrared; replicated to 3) or 3 bands (an alpha
band is ignored); 16-bit and float bands are stretched to 8 bits. Errors (missing checkpoint,
unreadable image, unsupported band count) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys

import numpy as np

from earthgpt_jax.data import boxes as box_text
from earthgpt_jax.data.images import ImageTooLargeError, decode_image, square_and_resize

STOP_STRINGS = ("USER:",)  # a model that runs past its `</s>` starts the next turn
PROMPT_BUCKET = 32  # prompts are left-padded to a multiple: one compile per bucket, not per turn


class ChatError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- loading

def load_model_config(path: str):
    from earthgpt_jax.models.presets import (ConvNeXtConfig, EarthGPTConfig, LlamaConfig,
                                             ViTConfig)
    with open(path) as f:
        raw = json.load(f)
    vit = dict(raw["vit"], feature_layers=tuple(raw["vit"]["feature_layers"]))
    conv = dict(raw["convnext"], dims=tuple(raw["convnext"]["dims"]),
                depths=tuple(raw["convnext"]["depths"]))
    top = {k: v for k, v in raw.items() if k not in ("llm", "vit", "convnext")}
    return EarthGPTConfig(llm=LlamaConfig(**raw["llm"]), vit=ViTConfig(**vit),
                          convnext=ConvNeXtConfig(**conv), **top)


def _checkpoint_dir(workdir: str) -> str:
    inner = os.path.join(workdir, "checkpoints")
    return inner if os.path.isdir(inner) else workdir


def restore_latest_params(ckpt_dir: str, model):
    """Params only (no optimizer state, whatever the training stage), on the default device."""
    import jax
    import flax.linen as nn
    from earthgpt_jax import checkpoints
    from earthgpt_jax.models.earthgpt import abstract_params

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                           nn.unbox(abstract_params(model)))
    try:
        return checkpoints.restore_params(ckpt_dir, targets)
    except FileNotFoundError as e:
        raise ChatError(str(e)) from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float64)
    lo, hi = np.percentile(arr, (0.5, 99.5))
    return (np.clip((arr - lo) / max(hi - lo, 1e-9), 0, 1) * 255).astype(np.uint8)


def load_image(path: str) -> np.ndarray:
    """PNG/JPEG/TIFF with 1 or 3 bands -> uint8 [H, W, 3]; ChatError otherwise."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ChatError(f"cannot read image {path}: {e.strerror or e}") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            bands = [b for b in img.getbands() if b != "A"]
            mode, fmt = img.mode, img.format
    except Exception:
        bands = mode = fmt = None
    broken = None  # why the pixels of an image whose header reads could not be decoded
    if bands is not None:
        if mode != "P" and len(bands) not in (1, 3):
            raise ChatError(f"unsupported band count {len(bands)} in {path} (mode {mode}); "
                            "EarthGPT reads 1-band (SAR/infrared) or 3-band images")
        try:
            return decode_image(data, path)
        except ImageTooLargeError as e:
            raise ChatError(str(e)) from None
        except ValueError as e:
            broken = e.__cause__ or e  # a TIFF goes on to tifffile (compressions PIL lacks)
    if path.lower().endswith((".tif", ".tiff")):
        try:
            import tifffile
            arr = np.asarray(tifffile.imread(io.BytesIO(data)))
        except Exception as e:
            raise ChatError(f"cannot decode image {path}: {e}") from None
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] > 4:
            arr = np.moveaxis(arr, 0, -1)  # planar (bands first) TIFF
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
            count = arr.shape[-1] if arr.ndim == 3 else arr.ndim
            raise ChatError(f"unsupported band count {count} in {path}; EarthGPT reads 1-band "
                            "(SAR/infrared) or 3-band images")
        arr = _to_uint8(arr)
        return np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr
    if broken is not None:
        raise ChatError(f"cannot decode image {path}: its {fmt} data is truncated or corrupt "
                        f"({broken})")
    raise ChatError(f"cannot decode image {path}: not a PNG, JPEG or TIFF image")


# ----------------------------------------------------------------------------- boxes

def answer_boxes(answer: str) -> tuple[list, list]:
    """(normalised boxes, labels) of a detection or grounding answer; ([], []) when none."""
    from earthgpt_jax.evaluate import parsers
    groups, _ = parsers.parse_detection_answer(answer)
    found, labels = [], []
    for cls, _, bxs in groups:
        found += bxs
        labels += [cls] * len(bxs)
    if not found:
        found, _ = box_text.parse_boxes(answer) if "[" in answer else ([], 0)
        labels = [None] * len(found)
    return [list(b) for b in found], labels


def picture_path(image_path: str, workdir: str, turn: int) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    name = f"{stem}.earthgpt_turn{turn}.png"
    folder = os.path.dirname(os.path.abspath(image_path))
    return os.path.join(folder if os.access(folder, os.W_OK) else workdir, name)


def draw_answer(image: np.ndarray, image_path: str, answer: str, workdir: str, turn: int):
    from earthgpt_jax.evaluate.report import draw_boxes_png
    found, labels = answer_boxes(answer)
    if not found:
        return None
    h, w = image.shape[:2]
    pixel = [box_text.norm_to_pixel(b, w, h) for b in found]
    path = picture_path(image_path, workdir, turn)
    try:
        return draw_boxes_png(image, [], pixel, None, path, pred_labels=labels)
    except OSError:
        path = os.path.join(workdir, os.path.basename(path))
        return draw_boxes_png(image, [], pixel, None, path, pred_labels=labels)


# ----------------------------------------------------------------------------- the dialogue

@dataclasses.dataclass
class Session:
    model: object
    params: object
    tokenizer: object
    workdir: str
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int = 0
    turns: int = 0

    def answer(self, image: np.ndarray, history, question: str, out) -> str:
        """Streams the answer to `out` while decoding; returns the full answer text."""
        import jax
        from earthgpt_jax.data.tokenizer import encode_dialogue_prompt
        from earthgpt_jax.generate import apply_stop_strings, left_pad, stream_generate
        tok = self.tokenizer
        ids = encode_dialogue_prompt(tok, history, question)
        length = -(-len(ids) // PROMPT_BUCKET) * PROMPT_BUCKET
        tokens, valid = left_pad([ids], tok.pad_id)
        tokens = np.pad(tokens, ((0, 0), (length - tokens.shape[1], 0)),
                        constant_values=tok.pad_id)
        valid = np.pad(valid, ((0, 0), (length - valid.shape[1], 0)))
        pixels = square_and_resize(image, self.model.cfg.image_size)[None]
        rng = jax.random.key(self.seed + self.turns)
        hold = max(len(s) for s in STOP_STRINGS) - 1  # never print the start of a stop string
        generated, shown = [], 0
        text = ""
        for token in stream_generate(self.model, self.params, pixels, tokens, valid,
                                     max_new_tokens=self.max_new_tokens, eos_id=tok.eos_id,
                                     temperature=self.temperature, top_p=self.top_p, rng=rng):
            generated.append(token)
            full = tok.sp.decode(generated)
            text = apply_stop_strings(full, STOP_STRINGS)
            stopped = len(text) < len(full)
            upto = len(text) if stopped else max(shown, len(text) - hold)
            out.write(text[shown:upto])
            out.flush()
            shown = upto
            if stopped:
                break
        out.write(text[shown:] + "\n")
        out.flush()
        self.turns += 1
        return text.strip()


HELP = "commands: /image PATH (new image, clears history), /reset, /quit"
USER_PROMPT = "you> "


def chat_loop(session: Session, image_path: str, image: np.ndarray, stdin, stdout, stderr):
    history: list[tuple[str, str]] = []
    stdout.write(f"EarthGPT chat on {image_path} ({image.shape[1]}x{image.shape[0]}). {HELP}\n")
    while True:
        stdout.write(USER_PROMPT)
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D)
            stdout.write("\n")
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            history = []
            stdout.write("(history cleared)\n")
            continue
        if line.split()[0] == "/image":
            path = line[len("/image"):].strip()
            try:
                image, image_path = load_image(os.path.expanduser(path)), path
            except ChatError as e:
                stderr.write(f"error: {e}\n")
                continue
            history = []
            stdout.write(f"(image {image_path}, {image.shape[1]}x{image.shape[0]}; "
                         "history cleared)\n")
            continue
        if line.startswith("/"):
            stdout.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        stdout.write("ASSISTANT: ")
        stdout.flush()
        answer = session.answer(image, history, line, stdout)
        history.append((line, answer))
        picture = draw_answer(image, image_path, answer, session.workdir, session.turns)
        if picture:
            stdout.write(f"(boxes drawn: {picture})\n")
        stdout.flush()


def main(argv=None, stdin=None, stdout=None, stderr=None) -> int:
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    parser = argparse.ArgumentParser(prog="python -m earthgpt_jax.chat",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", required=True, help="training workdir")
    parser.add_argument("--image", required=True)
    parser.add_argument("--tokenizer", default="", help="default: CKPT_DIR/tokenizer.model")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus size when sampling")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        workdir = os.path.abspath(os.path.expanduser(args.ckpt_dir))
        config_path = os.path.join(workdir, "model_config.json")
        ckpt = _checkpoint_dir(workdir)
        if not os.path.isdir(workdir):
            raise ChatError(f"checkpoint directory not found: {workdir}")
        if not os.path.exists(config_path):
            raise ChatError(f"no model_config.json in {workdir} (is it a training workdir?)")
        tok_path = args.tokenizer or os.path.join(workdir, "tokenizer.model")
        if not os.path.exists(tok_path):
            raise ChatError(f"tokenizer not found: {tok_path} (pass --tokenizer)")
        image = load_image(os.path.expanduser(args.image))
        from earthgpt_jax.data.tokenizer import Tokenizer
        from earthgpt_jax.models.earthgpt import EarthGPT
        model = EarthGPT(load_model_config(config_path))
        tokenizer = Tokenizer(tok_path)
        try:
            params, step = restore_latest_params(ckpt, model)
        except ChatError:
            raise
        except Exception as e:  # orbax: a checkpoint of another model, a broken step folder
            raise ChatError(f"cannot restore the checkpoint in {ckpt}: "
                            f"{str(e).splitlines()[0][:300]}") from None
    except ChatError as e:
        stderr.write(f"error: {e}\n")
        stderr.flush()
        return 2
    stderr.write(f"(loaded step {step} from {ckpt})\n")
    session = Session(model, params, tokenizer, workdir, args.max_new_tokens, args.temperature,
                      args.top_p, args.seed)
    chat_loop(session, args.image, image, stdin, stdout, stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
