"""Serve the web chat: `python -m earthgpt_jax.serve --ckpt_dir=WORKDIR [--host=127.0.0.1
--port=8000]`, then open the printed address in a browser.

The model is loaded once; one worker thread decodes every chat request (see engine.py), and
whole scenes uploaded on /scene run as one background job at a time (see scenes.py). The
server binds to loopback unless told otherwise, because the page has no login.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys

from earthgpt_jax.inference import PROMPT_BUCKET, InferenceError, InferenceSession
from earthgpt_jax.serve.app import create_app
from earthgpt_jax.serve.service import ChatService, Limits, find_examples
from earthgpt_jax.serve.engine import Engine
from earthgpt_jax.serve.scenes import SceneJobs, SceneLimits


def build_service(ckpt_dir: str, *, tokenizer_path: str = "", examples_dir: str = "",
                  limits: Limits | None = None, max_batch: int = 8, max_groups: int = 4,
                  warmup_tokens: int = 0, scene_limits: SceneLimits | None = None,
                  scene_dir: str = "", scene_batch: int = 8,
                  scene_max_new_tokens: int = 256) -> ChatService:
    """Load the checkpoint, start the engine (optionally compiling the common shapes first);
    InferenceError (one line) when the workdir cannot be served."""
    import numpy as np
    session = InferenceSession.from_workdir(ckpt_dir, tokenizer_path)
    engine = Engine(session, max_batch=max_batch, max_groups=max_groups).start()
    if warmup_tokens:
        # Compile the shapes of a first question: one user, the fixed task shortcuts' prompts
        # (they may fall into different prompt buckets; "find" holds the user's phrase), the
        # page's default answer length.
        from earthgpt_jax.data.tokenizer import encode_dialogue_prompt
        from earthgpt_jax.serve.service import TASK_PROMPTS
        size = session.model.cfg.image_size
        pixels = session.pixels(np.zeros((size, size, session.model.cfg.input_bands), np.uint8))
        buckets = {}
        for task in ("describe", "classify", "detect"):
            ids = encode_dialogue_prompt(session.tokenizer, [], TASK_PROMPTS[task])
            buckets.setdefault(-(-len(ids) // PROMPT_BUCKET), ids)
        for ids in buckets.values():
            engine.warmup(pixels, ids, warmup_tokens)
    description = f"{os.path.basename(os.path.abspath(ckpt_dir))}, step {session.step}"
    # Scene jobs decode on the chat's session (one copy of the weights), on its mesh.
    scenes = SceneJobs(session, scene_limits, scene_dir, batch_size=scene_batch,
                       max_new_tokens=scene_max_new_tokens)
    return ChatService(engine, limits or Limits(),
                       find_examples(os.path.abspath(ckpt_dir), examples_dir), description,
                       scenes)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), bound before the banner names the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def banner(host: str, port: int, description: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    lines = [f"EarthGPT web chat ({description}): http://{shown}:{port}/"]
    if _is_loopback(host):
        lines += [
            "Listening on loopback only. To use it from another machine, either tunnel:",
            f"  ssh -N -L {port}:127.0.0.1:{port} USER@THIS_HOST   then open "
            f"http://127.0.0.1:{port}/ there",
            "or restart with --host=0.0.0.0 (all interfaces; the page has no login, so do that "
            "only on a trusted network or behind an authenticating reverse proxy)."]
    else:
        lines.append(f"WARNING: listening on {host}: anyone who can reach this port can use "
                     "the model and see no login; prefer --host=127.0.0.1 with an SSH tunnel.")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m earthgpt_jax.serve",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", required=True, help="training workdir")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--tokenizer", default="", help="default: CKPT_DIR/tokenizer.model")
    parser.add_argument("--examples_dir", default="",
                        help="example images to offer (default: the demo release's test images)")
    parser.add_argument("--max_batch", type=int, default=8, help="rows per decoding group")
    parser.add_argument("--max_groups", type=int, default=4,
                        help="decoding groups stepped round-robin at once")
    parser.add_argument("--max_upload_mb", type=float, default=25.0)
    parser.add_argument("--max_image_pixels", type=int, default=50_000_000)
    parser.add_argument("--max_question_chars", type=int, default=2000)
    parser.add_argument("--max_new_tokens", type=int, default=256,
                        help="the most tokens one answer may ask for")
    parser.add_argument("--warmup_tokens", type=int, default=128,
                        help="compile one answer of this many tokens before serving (0: skip)")
    parser.add_argument("--max_scene_mb", type=float, default=4096.0,
                        help="largest scene upload (/scene), streamed to --scene_dir")
    parser.add_argument("--scene_dir", default="",
                        help="where uploaded scenes and their results are kept (default: a "
                             "temporary folder removed on exit)")
    parser.add_argument("--max_scenes", type=int, default=8,
                        help="scenes kept; the oldest idle one is removed first")
    parser.add_argument("--scene_batch", type=int, default=8,
                        help="tiles a scene job decodes at once (a chat token may wait for one "
                             "such batch)")
    parser.add_argument("--scene_max_new_tokens", type=int, default=256)
    parser.add_argument("--log_level", default="info")
    args = parser.parse_args(argv)
    # Libraries (orbax, absl) log every restore detail at INFO; the server's own log is uvicorn's.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20),
                    max_image_pixels=args.max_image_pixels,
                    max_question_chars=args.max_question_chars,
                    max_new_tokens=args.max_new_tokens)
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    try:
        service = build_service(args.ckpt_dir, tokenizer_path=args.tokenizer,
                                examples_dir=args.examples_dir, limits=limits,
                                max_batch=args.max_batch, max_groups=args.max_groups,
                                warmup_tokens=min(args.warmup_tokens, args.max_new_tokens),
                                scene_limits=SceneLimits(
                                    max_scene_bytes=int(args.max_scene_mb * 2**20),
                                    max_scenes=args.max_scenes,
                                    max_question_chars=args.max_question_chars),
                                scene_dir=args.scene_dir, scene_batch=args.scene_batch,
                                scene_max_new_tokens=args.scene_max_new_tokens)
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import signal
    import uvicorn

    def exit_on_sigterm(signum, _frame):
        raise SystemExit(128 + signum)

    # uvicorn shuts down gracefully on SIGTERM, then restores this handler and raises the signal
    # again: as SystemExit (not the default handler's instant death) the `finally` below runs
    # and removes the uploaded scenes' temporary folder.
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    port = sock.getsockname()[1]
    print(banner(args.host, port, service.description), flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level=args.log_level,
                                           timeout_graceful_shutdown=2))
    try:
        server.run(sockets=[sock])
    finally:
        service.scenes.close()
        service.engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
