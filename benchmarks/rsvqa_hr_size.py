"""Prepared size and build time of RSVQA-HR test set 2 (`rsvqa_hr`), measured on a generated set
of the real split's shape and extrapolated to the whole split.

The real `test_phili` split holds 105,647 questions, 62,554 of them presence or comparison (the
paper's two columns), about 100 per image, so about 1,056 images; each image is a 512x512 RGB
uncompressed TIFF of 786 KB. This script writes --images such images (pixel noise, so nothing
compresses) with 100 questions each in the real type mix (25 presence, 34 comparison, 27 count,
14 area: 59 of 100 presence/comparison, as 62,554 / 105,647) and the release's three JSON files,
then builds `rsvqa_hr` with the builder as it is in the working tree, through the TFDS API
(array_record). Figures: records, questions stored, bytes of the prepared folder, build time;
then the whole split extrapolated per image (bytes and seconds per generated image x 1,056).
Run it before and after a change of the builder's layout to compare them.

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/rsvqa_hr_size.py \\
      [--images=8] [--label=after] [--workdir=/tmp/earthgpt_bench_rsvqa] [--no_append]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from benchmarks import results

SPLIT_QUESTIONS = 105_647
SPLIT_PRESENCE_COMPARISON = 62_554
QUESTIONS_PER_IMAGE = 100
SPLIT_IMAGES = round(SPLIT_QUESTIONS / QUESTIONS_PER_IMAGE)
TYPE_MIX = {"presence": 25, "comp": 34, "count": 27, "area": 14}
TEXTS = {"presence": ("Is there a road?", "yes"),
         "comp": ("Is the number of roads equal to the number of buildings?", "no"),
         "count": ("How many buildings are there?", "12"),
         "area": ("What is the area covered by residential buildings?", "between 100m2 and 500m2")}
SIDE = 512


def write_split(root: str, num_images: int) -> None:
    """Data/<id>.tif plus USGS_split_test_phili_{questions,answers,images}.json."""
    import numpy as np
    from PIL import Image

    os.makedirs(os.path.join(root, "Data"), exist_ok=True)
    questions, answers, images = [], [], []
    rng = np.random.default_rng(0)
    for img_id in range(num_images):
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "Data", f"{img_id}.tif"))
        ids = []
        for qtype, n in TYPE_MIX.items():
            question, answer = TEXTS[qtype]
            for _ in range(n):
                qid = len(questions)
                ids.append(qid)
                questions.append({"id": qid, "img_id": img_id, "type": qtype,
                                  "question": question, "answers_ids": [qid], "active": True})
                answers.append({"id": qid, "question_id": qid, "answer": answer,
                                "active": True})
        images.append({"id": img_id, "questions_ids": ids, "active": True})
    for kind, entries in (("questions", questions), ("answers", answers), ("images", images)):
        with open(os.path.join(root, f"USGS_split_test_phili_{kind}.json"), "w") as f:
            json.dump({kind: entries}, f)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def measure(manual: str, data_dir: str) -> dict:
    import tensorflow_datasets as tfds

    import tfds_builders  # noqa: F401  (registers rsvqa_hr)

    shutil.rmtree(data_dir, ignore_errors=True)
    start = time.perf_counter()
    builder = tfds.builder("rsvqa_hr", data_dir=data_dir)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual))
    seconds = time.perf_counter() - start
    source = builder.as_data_source(split="test")
    questions = sum(len(source[i]["conversations"]["value"]) // 2 for i in range(len(source)))
    return {"records": len(source), "questions": questions, "seconds": seconds,
            "bytes": folder_bytes(os.path.join(data_dir, "rsvqa_hr"))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--label", default="current builder")
    parser.add_argument("--workdir", default="/tmp/earthgpt_bench_rsvqa")
    parser.add_argument("--no_append", action="store_true")
    args = parser.parse_args(argv)
    manual = os.path.join(args.workdir, f"raw_{args.images}")
    if not os.path.isfile(os.path.join(manual, "USGS_split_test_phili_images.json")):
        write_split(manual, args.images)
    raw_image_bytes = folder_bytes(os.path.join(manual, "Data")) / args.images
    got = measure(manual, os.path.join(args.workdir, "tfds"))
    per_image_bytes = got["bytes"] / args.images
    per_image_s = got["seconds"] / args.images
    out = {
        "label": args.label, "images": args.images, **got,
        "presence_comparison_per_image": TYPE_MIX["presence"] + TYPE_MIX["comp"],
        "tiff_bytes_per_image": raw_image_bytes,
        "split_images": SPLIT_IMAGES, "split_questions": SPLIT_PRESENCE_COMPARISON,
        "split_bytes": per_image_bytes * SPLIT_IMAGES,
        "split_seconds": per_image_s * SPLIT_IMAGES,
        "machine": results.machine(("tensorflow-datasets", "array-record", "numpy")),
    }
    print(json.dumps(out, indent=2))
    name = f"rsvqa_hr_size_{args.label.replace(' ', '_')}.json"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    if not args.no_append:
        results.append_section(
            f"RSVQA-HR test set 2 prepared size and build time: {args.label}",
            results.command_line(__file__, argv),
            [f"- Generated set: {args.images} images of {raw_image_bytes / 1e3:.0f} KB (512x512 "
             f"RGB TIFF), {QUESTIONS_PER_IMAGE} questions each, "
             f"{out['presence_comparison_per_image']} presence/comparison",
             f"- Built: {got['records']} records holding {got['questions']} questions, "
             f"{got['bytes'] / 1e6:.1f} MB, {got['seconds']:.1f} s",
             f"- Whole split extrapolated per image ({SPLIT_IMAGES} images, "
             f"{SPLIT_PRESENCE_COMPARISON:,} presence/comparison questions): "
             f"{out['split_bytes'] / 1e9:.2f} GB, {out['split_seconds'] / 60:.1f} min",
             f"- Raw JSON: benchmarks/results/{name}"] + results.machine_lines(
                 ("tensorflow-datasets", "array-record", "numpy")) + [results.load_line()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
