"""Stage-A caption streaming speed: img2dataset webdataset shards read as a stream.

Data: generated shards in img2dataset's layout (tests/fixtures/captions.py: `KEY.jpg`,
`KEY.json`, `KEY.txt` per sample in `00000.tar`, ... with `_stats.json` and `.parquet` beside),
photo-like JPEGs (smooth gradients plus noise, quality 90) of 256-512 px per side, cached in
--workdir. Stages, each timed over --samples samples after a short warm-up, one thread, in this
process (the training pipeline adds grain worker processes on top: config.data.num_workers):

  tar           the shard stream alone: tar members read and grouped by key (`WebDatasetShards`)
  raw           + JPEG decode and the caption conversation (`CaptionRecords`)
  train_demo    + `TrainPreprocess` at the demo's size (64 px, 128 text tokens), batched by
                `pipeline.train_dataset` exactly as training reads it (batch 8, unpacked)
  train_448     the same at the 7B/13B size (448 px, 1024 text tokens)

The tokenizer is a small one trained on the captions (the real runs use LLaMA-2's 32k one;
tokenising a caption is a small part of a sample's cost either way).

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/caption_streaming.py \
      [--shards=4] [--samples_per_shard=200] [--samples=400] [--out=benchmarks/results/...]

Writes the raw result JSON to benchmarks/results/<date>_caption_streaming.json and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ("Describe the image concisely.", "Write a short caption for the image.")


def make_shards(workdir: str, shards: int, per_shard: int, seed: int = 0) -> dict:
    """Generated once per (shards, per_shard); a crash mid-write leaves no half set to reuse."""
    from tests.fixtures import captions

    root = os.path.join(workdir, f"wds_{shards}x{per_shard}")
    if not os.path.isdir(root):
        rng = np.random.default_rng(seed)
        sizes = [tuple(int(v) for v in rng.integers(256, 513, 2)) for _ in range(97)]
        tmp = root + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        captions.write_webdataset(tmp, shards, per_shard, smooth=True, sizes=sizes)
        os.replace(tmp, root)
    tars = sorted(f for f in os.listdir(root) if f.endswith(".tar"))
    total = sum(os.path.getsize(os.path.join(root, f)) for f in tars)
    return {"dir": root, "shards": len(tars), "samples": shards * per_shard,
            "mean_sample_bytes": total / (shards * per_shard)}


def timed(next_fn, samples: int, warmup: int, per_call: int = 1) -> dict:
    for _ in range(max(warmup // per_call, 1)):
        next_fn()
    calls = max(samples // per_call, 1)
    start = time.perf_counter()
    for _ in range(calls):
        next_fn()
    seconds = time.perf_counter() - start
    return {"samples": calls * per_call, "seconds": seconds,
            "samples_per_s": calls * per_call / seconds}


def run(args) -> dict:
    sys.path.insert(0, ROOT)
    from earthgpt_jax.data import pipeline, sources
    from earthgpt_jax.data.tokenizer import USER_TEMPLATE, train_tokenizer

    os.makedirs(args.workdir, exist_ok=True)
    data = make_shards(args.workdir, args.shards, args.samples_per_shard)
    spec = sources.parse_sources(f"webdataset:{data['dir']}")[0]

    def source():
        return sources.open_caption_source(spec, prompts=PROMPTS, seed=0, report_dir=None,
                                           max_bad_fraction=0.01)

    results = {"data": data}
    stream = iter(source().stream)
    results["tar"] = timed(lambda: next(stream), args.samples, args.warmup)
    src = source()
    stream = iter(src.stream)
    shapes = []

    def raw_record():
        record = src.to_record.map(next(stream))
        shapes.append(record["image"].shape[:2])

    results["raw"] = timed(raw_record, args.samples, args.warmup)
    results["raw"]["mean_decoded_pixels"] = float(np.mean([h * w for h, w in shapes]))

    tok_path = os.path.join(args.workdir, "tokenizer.model")
    if not os.path.exists(tok_path):
        texts = [USER_TEMPLATE, *PROMPTS] + [f"photo {i} caption {j}: a {c} scene" for i in
                                             range(20) for j in range(5)
                                             for c in ("red", "green", "blue")]
        train_tokenizer(texts, tok_path, 400)
    for name, image_size, text_len in (("train_demo", 64, 128), ("train_448", 448, 1024)):
        pre = pipeline.TrainPreprocess(tok_path, image_size, text_len)
        batches = pipeline.iterate(pipeline.train_dataset(
            [source()], pre, batch_size=args.batch, seed=0, num_threads=1))
        results[name] = timed(lambda: next(batches), args.samples, args.warmup,
                              per_call=args.batch)
        results[name].update(image_size=image_size, max_text_len=text_len, batch=args.batch)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/earthgpt_bench_captions",
                        help="generated shards and tokenizer (cached)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--samples_per_shard", type=int, default=200)
    parser.add_argument("--samples", type=int, default=400, help="timed samples per stage")
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default="", help="result JSON; default "
                        "benchmarks/results/<date>_caption_streaming.json")
    args = parser.parse_args(argv)
    from absl import flags
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags

    from benchmarks.results import machine

    env = machine(("grain", "pillow", "numpy", "sentencepiece"))
    results = run(args)
    env["load_average_end"] = os.getloadavg()[0]
    report = {"env": env, "args": vars(args), "results": results}
    out = args.out or os.path.join(
        ROOT, "benchmarks", "results",
        f"{datetime.date.today().isoformat()}_caption_streaming.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
