"""python -m earthgpt_jax.scene --ckpt_dir=W --image=scene.tif --task=detect|ground|ask
[--question=...] --out=result.geojson: a whole scene, tiled, answered, merged, georeferenced."""

from __future__ import annotations

import argparse
import json
import os
import sys

from earthgpt_jax.scene import (DATA_PARALLEL_RULES, TASKS, SceneError, SessionAnswerer,
                                data_parallel_mesh, run_scene, task_prompt)
from earthgpt_jax.scene.raster import SceneReader


def main(argv=None, stdout=None, stderr=None) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    parser = argparse.ArgumentParser(prog="python -m earthgpt_jax.scene",
                                     description=__doc__.split(":")[1].strip())
    parser.add_argument("--ckpt_dir", required=True, help="training workdir")
    parser.add_argument("--image", required=True, help="GeoTIFF (or any raster GDAL reads)")
    parser.add_argument("--task", default="detect", choices=TASKS)
    parser.add_argument("--question", default="", help="grounding phrase, or the question")
    parser.add_argument("--out", required=True, help="GeoJSON to write (WGS84)")
    parser.add_argument("--tokenizer", default="", help="default: CKPT_DIR/tokenizer.model")
    parser.add_argument("--tile", type=int, default=0,
                        help="tile side in scene pixels (default: the model's input size)")
    parser.add_argument("--overlap", type=int, default=-1,
                        help="pixels shared by neighbouring tiles; above the largest object "
                             "(default: a quarter of the tile)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="tiles decoded at once, split over every local device (rounded "
                             "up to a multiple of the device count)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--devices", type=int, default=0,
                        help="local devices to decode on, each holding the whole model "
                             "(default 0: all)")
    args = parser.parse_args(argv)
    image, out = os.path.expanduser(args.image), os.path.expanduser(args.out)
    from earthgpt_jax.inference import InferenceError, InferenceSession
    try:  # the scene and the question first: a wrong path should not wait for the checkpoint
        task_prompt(args.task, args.question)
        SceneReader(image).close()
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise SceneError(f"output folder not found: {os.path.dirname(out)}")
        import jax
        local = jax.local_devices()
        if not 0 <= args.devices <= len(local):
            raise SceneError(f"--devices={args.devices}: this host has {len(local)} devices")
        session = InferenceSession.from_workdir(
            args.ckpt_dir, args.tokenizer, rules=DATA_PARALLEL_RULES,
            mesh=data_parallel_mesh(local[:args.devices or len(local)]))
        answerer = SessionAnswerer(session, args.batch_size, args.max_new_tokens)
        summary = run_scene(image, out, answerer, task=args.task, question=args.question,
                            tile=args.tile, overlap=args.overlap, log=stderr)
    except (SceneError, InferenceError) as e:
        print(f"error: {e}", file=stderr, flush=True)
        return 2
    stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
