"""TFDS builder over an extracted MMRS-1M release (or the synthetic mini release).

The release is a `data/` tree: image folders per task and source, and LLaVA-style JSON lists
under `data/json/` (layout: shared/research/peers-and-datasets.md §0.1). This builder walks every
`data/json/**/*.json` except the aggregate `total.json`, and writes one example per record with
the image's original encoded bytes; decoding, padding and resizing happen later in the grain
pipeline. It writes `array_record` so neither preparing nor reading needs TensorFlow.

Splits: the real release has no split field; annotation files whose name ends in `_test.json`
form the `test` split (the synthetic release writes them; for the real data, put rebuilt test
lists there), all other files form `train`.

Bad input (missing or undecodable image, malformed record, unparsable JSON file) is skipped and
counted. After each split a report `bad_records_<split>.json` is written next to the built
dataset (`<data_dir>/mmrs1m/<version>/`). If the bad fraction of a split exceeds
`max_bad_fraction` the build stops with an error; the report is then written to
`<data_dir>/mmrs1m/bad_records_<split>.json` because TFDS deletes the unfinished version folder.

    from tfds_builders.mmrs1m import build
    builder = build('/path/to/release', data_dir='/tmp/tfds')   # release holds data/
    src = tfds.data_source('mmrs1m', data_dir='/tmp/tfds', split='train')
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

# Sensor of a source folder, by case-insensitive name prefix. MMRS-1M carries no modality field;
# the folder names of its SAR and infrared sources are the only signal (paper-digest §3.5).
# First match wins; anything unmatched is optical.
SENSOR_BY_SOURCE_PREFIX = (
    ("HRSID", "sar"),
    ("SSDD", "sar"),
    ("SARV2", "sar"),
    ("AIR-SARSHIP", "sar"),
    ("HIT-UAV", "infrared"),
    ("IR_", "infrared"),
    ("INFRARED_SHIP", "infrared"),
)

# Task of an annotation file from its folder under data/json/ (RSVG is decided per record).
TASK_BY_JSON_FOLDER = {
    "classification": "classification",
    "caption": "captioning",
    "vqa": "vqa",
    "detection": "detection",
}
TASKS = ("classification", "captioning", "vqa", "grounding", "region_captioning", "detection")
SENSORS = ("optical", "sar", "infrared")

TEST_SUFFIX = "_test.json"
SKIPPED_JSON = ("total.json",)
# Reasons listed in an error message; the full list is in the report file.
_REASONS_IN_ERROR = 5


def sensor_for_source(source: str) -> str:
    upper = source.upper()
    for prefix, sensor in SENSOR_BY_SOURCE_PREFIX:
        if upper.startswith(prefix):
            return sensor
    return "optical"


def source_of(image_path: str) -> str:
    """`data/<task>/<SOURCE>/...` -> SOURCE (the folder that names the source dataset)."""
    parts = image_path.split("/")
    if len(parts) < 4 or parts[0] != "data":
        raise ValueError(f"image path is not data/<task>/<source>/...: {image_path!r}")
    return parts[2]


def _rsvg_task(first_question: str) -> str:
    if "bounding box coordinate" in first_question:
        return "grounding"
    if "short description" in first_question:
        return "region_captioning"
    raise ValueError("RSVG prompt is neither grounding nor region captioning")


def _check_conversations(conversations) -> None:
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("conversations missing or empty")
    if len(conversations) % 2:
        raise ValueError(f"odd number of turns ({len(conversations)})")
    for k, turn in enumerate(conversations):
        want = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want:
            raise ValueError(f"turn {k} is not from {want!r}")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {k} has no text value")


def _walk(folder: epath.Path) -> Iterator[epath.Path]:
    # epath refuses `rglob('**')` (it would be slow on GCS); the json tree is small, so recurse.
    for p in folder.iterdir():
        if p.is_dir():
            yield from _walk(p)
        else:
            yield p


class BadRecordsError(ValueError):
    """Too large a fraction of a split's records could not be used."""


class Mmrs1m(tfds.core.GeneratorBasedBuilder):
    """MMRS-1M instruction records (all six tasks, optical/SAR/infrared) with image bytes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Conversation records with original image bytes; train/test."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract the MMRS-1M release (cat data.tar.gz.* | tar xz) and pass the folder holding "
        "`data/` as manual_dir. `python -m earthgpt_jax.data.synthetic --out=DIR` writes a "
        "miniature release with the same layout.")
    # Largest fraction of skipped records a split may have before the build fails.
    MAX_BAD_FRACTION = 0.01

    def __init__(self, *, max_bad_fraction: float | None = None, **kwargs):
        self.max_bad_fraction = (self.MAX_BAD_FRACTION if max_bad_fraction is None
                                 else float(max_bad_fraction))
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                # Original encoded file (jpg/png/tif): an Image feature would need TF to encode.
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "image_path": text,
                "width": np.int32,
                "height": np.int32,
                "sensor": text,
                "source": text,
                "task": text,
                "conversations": tfds.features.Sequence({"from": text, "value": text}),
            }),
            homepage="https://github.com/wivizhang/EarthGPT",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = epath.Path(dl_manager.manual_dir)
        json_root = root / "data" / "json"
        if not json_root.is_dir():
            raise FileNotFoundError(f"no data/json/ under manual_dir {root}; "
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        files = sorted(p for p in _walk(json_root)
                       if p.suffix == ".json" and p.name not in SKIPPED_JSON)
        train = [p for p in files if not p.name.endswith(TEST_SUFFIX)]
        test = [p for p in files if p.name.endswith(TEST_SUFFIX)]
        splits = {"train": self._generate_examples(root, train, "train")}
        if test:
            splits["test"] = self._generate_examples(root, test, "test")
        return splits

    def _generate_examples(self, root: epath.Path, json_files: list[epath.Path],
                           split: str) -> Iterator[tuple[str, dict]]:
        bad: list[dict] = []
        good = 0
        for json_file in json_files:
            rel_json = os.fspath(json_file.relative_to(root))
            try:
                records = json.loads(json_file.read_text(encoding="utf-8"))
                if not isinstance(records, list):
                    raise ValueError("top level is not a list")
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                bad.append({"file": rel_json, "index": None, "reason": f"unreadable json: {e}"})
                continue
            folder = json_file.relative_to(root / "data" / "json").parts[0].lower()
            for index, record in enumerate(records):
                try:
                    example = self._example(root, folder, record)
                except (ValueError, OSError) as e:
                    bad.append({"file": rel_json, "index": index, "reason": str(e)})
                    continue
                good += 1
                yield f"{rel_json}:{index}", example
        self._report(split, good, bad)

    def _example(self, root: epath.Path, folder: str, record) -> dict:
        if not isinstance(record, dict):
            raise ValueError("record is not an object")
        conversations = record.get("conversations")
        _check_conversations(conversations)
        image_path = record.get("image")
        if not isinstance(image_path, str):
            raise ValueError("record has no image path")
        if ".." in image_path.split("/"):
            raise ValueError(f"image path leaves the release: {image_path}")
        source = source_of(image_path)
        if folder == "rsvg":
            task = _rsvg_task(conversations[0]["value"])
        elif folder in TASK_BY_JSON_FOLDER:
            task = TASK_BY_JSON_FOLDER[folder]
        else:
            raise ValueError(f"unknown task folder data/json/{folder}")
        path = root / image_path
        if not path.is_file():
            raise ValueError(f"missing image {image_path}")
        data = path.read_bytes()
        try:  # load() decodes every pixel, so truncated files are caught here, not in training
            with Image.open(path) as im:
                im.load()
                width, height = im.size
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBomb)
            raise ValueError(f"undecodable image {image_path}: {type(e).__name__}: {e}") from e
        return {
            "image": data,
            "image_path": image_path,
            "width": width,
            "height": height,
            "sensor": sensor_for_source(source),
            "source": source,
            "task": task,
            "conversations": [{"from": t["from"], "value": t["value"]} for t in conversations],
        }

    def _report(self, split: str, good: int, bad: list[dict]) -> None:
        total = good + len(bad)
        fraction = len(bad) / total if total else 0.0
        report = {"split": split, "records": total, "good": good, "bad": len(bad),
                  "bad_fraction": fraction, "max_bad_fraction": self.max_bad_fraction,
                  "bad_records": bad}
        exceeded = fraction > self.max_bad_fraction
        # While preparing, data_dir is TFDS's unfinished folder, renamed on success and deleted
        # on failure; a failing report goes one level up so it survives.
        out_dir = epath.Path(self.data_dir)
        if exceeded:
            out_dir = out_dir.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        report_path = out_dir / f"bad_records_{split}.json"
        report_path.write_text(json.dumps(report, indent=1))
        # The unfinished folder is renamed when preparation succeeds, so name the file only.
        (logging.warning if bad else logging.info)(
            "mmrs1m %s: %d records, %d skipped (%.4f); details in %s beside the dataset",
            split, total, len(bad), fraction, report_path.name)
        if exceeded:
            reasons = "; ".join(f"{b['file']}[{b['index']}]: {b['reason']}"
                                for b in bad[:_REASONS_IN_ERROR])
            raise BadRecordsError(
                f"mmrs1m split {split!r}: {len(bad)} of {total} records are bad "
                f"(fraction {fraction:.4f} > max_bad_fraction {self.max_bad_fraction}). "
                f"First reasons: {reasons}. Full report: {report_path}")

    def bad_records(self, split: str) -> dict:
        """The bad-record report of a prepared split."""
        return json.loads((epath.Path(self.data_dir) / f"bad_records_{split}.json").read_text())


def build(manual_dir: str, data_dir: str, max_bad_fraction: float | None = None,
          **builder_kwargs) -> Mmrs1m:
    """Prepare `mmrs1m` from the release at `manual_dir` into `data_dir`; returns the builder."""
    builder = Mmrs1m(data_dir=data_dir, max_bad_fraction=max_bad_fraction, **builder_kwargs)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder
