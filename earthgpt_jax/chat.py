"""Talk to a trained EarthGPT about an image, in the terminal.

    python -m earthgpt_jax.chat --ckpt_dir=/tmp/earthgpt_demo --image=scene.png

`--ckpt_dir` is a training workdir: `model_config.json`, `tokenizer.model` (or `--tokenizer`)
and `checkpoints/` (the latest step's params). Each line on stdin is one user turn; the answer
is streamed token by token (each turn re-prefills the image and the whole dialogue, laid out by
the training chat template). Commands: `/image PATH` switches the image and clears the history,
`/reset` clears the history, `/quit` (or end of input) exits. Boxes in an answer (grounding or
detection) are drawn into a PNG next to the image (or into the workdir) and its path printed.

Images are decoded as training decodes them (`earthgpt_jax/inference.py`). Errors (missing
checkpoint, unreadable image) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

from earthgpt_jax.data import boxes as box_text
from earthgpt_jax.inference import (InferenceError, InferenceSession, answer_boxes, answer_text,
                                    load_image)


def draw_answer(image: np.ndarray, image_path: str, answer: str, workdir: str, turn: int):
    """The PNG of the answer's boxes beside the image (in the workdir where that folder is not
    writable), or None when the answer has none."""
    from earthgpt_jax.evaluate.report import draw_boxes_png
    found, labels = answer_boxes(answer)
    if not found:
        return None
    h, w = image.shape[:2]
    pixel = [box_text.norm_to_pixel(b, w, h) for b in found]
    name = f"{os.path.splitext(os.path.basename(image_path))[0]}.earthgpt_turn{turn}.png"
    folder = os.path.dirname(os.path.abspath(image_path))
    path = os.path.join(folder if os.access(folder, os.W_OK) else workdir, name)
    try:
        return draw_boxes_png(image, [], pixel, None, path, pred_labels=labels)
    except OSError:
        return draw_boxes_png(image, [], pixel, None, os.path.join(workdir, name),
                              pred_labels=labels)


# ----------------------------------------------------------------------------- the dialogue

@dataclasses.dataclass
class Chat:
    """One terminal dialogue's decoding settings over an inference session."""
    session: InferenceSession
    workdir: str
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 0.9
    seed: int = 0
    turns: int = 0

    def answer(self, image: np.ndarray, history, question: str, out) -> str:
        """Streams the answer to `out` while decoding; returns the full answer text."""
        import jax
        from earthgpt_jax.generate import stream_generate
        session, tok = self.session, self.session.tokenizer
        tokens, valid = session.prompts([(history, question)])
        rng = jax.random.key(self.seed + self.turns)
        generated, shown, text = [], 0, ""
        with session.context():
            for token in stream_generate(session.model, session.params,
                                         session.pixels(image)[None], tokens, valid,
                                         max_new_tokens=self.max_new_tokens, eos_id=tok.eos_id,
                                         temperature=self.temperature, top_p=self.top_p,
                                         rng=rng):
                generated.append(token)
                text, stopped, safe = answer_text(tok, generated)
                upto = max(shown, safe)
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


def chat_loop(chat: Chat, image_path: str, image: np.ndarray, stdin, stdout, stderr):
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
                image, image_path = chat.session.load_image(os.path.expanduser(path)), path
            except InferenceError as e:
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
        answer = chat.answer(image, history, line, stdout)
        history.append((line, answer))
        picture = draw_answer(image, image_path, answer, chat.workdir, chat.turns)
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
    try:  # the image first: a wrong path should not wait for the checkpoint to load
        load_image(os.path.expanduser(args.image))
        session = InferenceSession.from_workdir(args.ckpt_dir, args.tokenizer)
        image = session.load_image(os.path.expanduser(args.image))  # the model's bands
    except InferenceError as e:
        stderr.write(f"error: {e}\n")
        stderr.flush()
        return 2
    workdir = os.path.abspath(os.path.expanduser(args.ckpt_dir))
    stderr.write(f"(loaded step {session.step} from {workdir})\n")
    chat = Chat(session, workdir, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    chat_loop(chat, args.image, image, stdin, stdout, stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
