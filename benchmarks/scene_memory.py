"""Whole scenes (issue 18): peak memory of the windowed reading path on a large GeoTIFF, and
tiles/s + scene time of a real checkpoint.

    PYTHONPATH=. .venv/bin/python benchmarks/scene_memory.py --side 20000 \
        [--ckpt_dir WORKDIR --model_side 256] --out benchmarks/results/DATE_scene_memory_cpu.json

1. Writes a SIDE x SIDE, 3-band 16-bit UTM GeoTIFF (deflate, 256 px blocks) strip by strip, so
   the writer never holds the raster either; sparse bright 8 x 8 targets on a smooth texture.
2. Runs `run_scene` over it in a child process with a stand-in answerer (no model, so the
   figure is the reading, stretching, journalling and merging path alone) and reports the
   child's peak RSS (ru_maxrss) beside its RSS after imports, the raster's decoded size and
   one batch of tile buffers.
3. With --ckpt_dir: the same on a MODEL_SIDE scene through the real checkpoint
   (`SessionAnswerer`, greedy KV-cached decoding): tiles/s and the scene's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

GSD = 10.0


def write_scene(path: str, side: int, seed: int = 0) -> None:
    import rasterio
    from affine import Affine
    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint16",
                   crs="EPSG:32633", transform=Affine.translation(500_000, 4_500_000) @
                   Affine.scale(GSD, -GSD), tiled=True, blockxsize=256, blockysize=256,
                   compress="deflate", BIGTIFF="YES")
    xs = np.arange(side)
    with rasterio.open(path, "w", **profile) as ds:
        for top in range(0, side, 1024):
            rows = min(1024, side - top)
            y = np.arange(top, top + rows)[:, None]
            strip = (1000 + 200 * np.sin(xs[None, :] / 97.0) * np.cos(y / 61.0))
            strip = np.broadcast_to(strip, (3, rows, side)).astype(np.uint16).copy()
            for _ in range(rows * side // 40_000):  # about one target per 200 x 200 px
                cx, cy = rng.integers(8, side - 8), rng.integers(0, rows)
                strip[:, max(cy - 4, 0):cy + 4, cx - 4:cx + 4] = 4000
            ds.write(strip, window=rasterio.windows.Window(0, top, side, rows))


class NoObjects:
    """Stand-in answerer: training's pixels, no model."""

    def __init__(self, image_size: int, batch_size: int = 8):
        self.image_size, self.batch_size = image_size, batch_size

    def pixels(self, tile):
        from earthgpt_jax.data.images import square_and_resize
        return square_and_resize(tile, self.image_size)

    def answer(self, images, prompt):
        return ["There are no objects."] * len(images)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    """One run in this process; prints its summary with memory figures as JSON."""
    import rasterio  # noqa: F401  (imported before the baseline: the libraries are not the run)
    from earthgpt_jax import inference  # noqa: F401
    from earthgpt_jax.scene import SessionAnswerer, run_scene
    if args.ckpt_dir:
        from earthgpt_jax.inference import InferenceSession
        answerer = SessionAnswerer(InferenceSession.from_workdir(args.ckpt_dir),
                                   args.batch_size, args.max_new_tokens)
    else:
        answerer = NoObjects(args.tile, args.batch_size)
    after_imports = _rss_mb()
    out = os.path.join(args.workdir, "result.geojson")
    with open(os.devnull, "w") as log:
        summary = run_scene(args.scene, out, answerer, tile=args.tile, log=log)
    summary.pop("files", None)
    print(json.dumps(dict(summary, rss_after_imports_mb=round(after_imports, 1),
                          peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF)
                                            .ru_maxrss / 1024, 1))))


def run_child(scene: str, workdir: str, **flags) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", "--scene", scene,
            "--workdir", workdir] + [f"--{k}={v}" for k, v in flags.items() if v != ""]
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", type=int, default=20_000)
    p.add_argument("--tile", type=int, default=0, help="0: 256 (stand-in) / model size")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--ckpt_dir", default="")
    p.add_argument("--model_side", type=int, default=256)
    p.add_argument("--max_new_tokens", type=int, default=80)
    p.add_argument("--out", default="")
    p.add_argument("--child", action="store_true")
    p.add_argument("--scene", default="")
    p.add_argument("--workdir", default="")
    args = p.parse_args()
    if args.child:
        return child(args)
    result = {"host": os.uname().nodename, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        scene = os.path.join(tmp, "scene.tif")
        start = time.perf_counter()
        write_scene(scene, args.side)
        write_s = time.perf_counter() - start
        tile = args.tile or 256
        reading = run_child(scene, tmp, tile=tile, batch_size=args.batch_size)
        result["reading"] = dict(
            reading, side=args.side, write_s=round(write_s, 1),
            file_mb=round(os.path.getsize(scene) / 2**20, 1),
            raster_decoded_mb=round(args.side ** 2 * 3 * 2 / 2**20, 1),
            tile_batch_mb=round(args.batch_size * tile ** 2 * 3 * 8 / 2**20, 1))
        if args.ckpt_dir:
            small = os.path.join(tmp, "small.tif")
            write_scene(small, args.model_side, seed=1)
            os.makedirs(os.path.join(tmp, "model"))
            result["model"] = dict(
                run_child(small, os.path.join(tmp, "model"), ckpt_dir=args.ckpt_dir,
                          tile=args.tile or "", batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens),
                side=args.model_side, ckpt_dir=os.path.abspath(args.ckpt_dir))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
