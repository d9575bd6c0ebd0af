"""TFDS builder over an extracted MMRS-1M release (or the synthetic mini release).

The release is a `data/` tree: image folders per task and source, and LLaVA-style JSON lists
under `data/json/` (layout: shared/research/peers-and-datasets.md §0.1). This builder walks
`data/json/**/*.json` except the aggregate `total.json` and writes one example per record with
the image's original encoded bytes; decoding, padding and resizing happen later in the grain
pipeline (`earthgpt_jax.data.images.decode_image`, which the build also runs on every image so
that nothing undecodable reaches training). It writes `array_record`, so neither preparing nor
reading needs TensorFlow.

Configs (task families, by folder under `data/json/`): `all` (default), `classification`,
`captioning` (caption/), `vqa` (VQA/), `grounding` (RSVG/: visual grounding and region-level
captioning records), `detection` (detection/<source>/).

Features: `image` (encoded bytes), `image_path`, `width`, `height` (of the decoded image, after
EXIF orientation), `sensor` (optical/sar/infrared, from the source folder: `sources.py`),
`source`, `task`, `conversations` (the release's strings, untouched), and the boxes the text
states, for re-templating and evaluation: `boxes` float32 [N, 4] ([x0, y0, x1, y1] in [0, 1] of
the centre-padded square), `box_turns` int32 [N] (the turn each box is written in) and
`box_labels` [N] (detection class, or the referring phrase for grounding/region captioning).
N is 0 for classification, captioning and VQA.

Splits:
- `test`: annotation files whose name ends in `_test.json` (the synthetic release writes them;
  for the real data, put rebuilt test lists there).
- `validation`: a deterministic held-out slice of the other files, chosen by a hash of the
  image path (`validation_fraction`, default 1%; 0 = no validation split; a release so small
  that no image falls in the slice gets none either). See `selection.py`.
- `train`: the rest.

Builder options (keyword arguments of `Mmrs1m(...)`, `tfds.builder('mmrs1m/<config>', ...)`
and `build(...)`): `validation_fraction`, `exclude_images` (a file, or list of files, naming
images to remove from train and validation, e.g. the evaluation test sets: overlap removal,
counted in the report as `excluded`), `max_bad_fraction`, `max_image_pixels`,
`follow_symlinks_outside`. Excluded records are removed before any check, so they count
neither as good nor as bad. The prepared folder does not record the options: build different
option sets into different `data_dir`s.

Bad input is skipped or repaired by the rules in `records.py` and counted per reason and per
file in `bad_records_<split>.json` beside the dataset (`<data_dir>/mmrs1m/<config>/<version>/`;
format in `report.py`). File-level problems (unreadable JSON, unknown task folder) are reported
in the `train` report only, as validation records come from the same files. If the bad fraction
of a split exceeds `max_bad_fraction` the build stops with `BadRecordsError`, and the report is
written to `<data_dir>/mmrs1m/<config>/bad_records_<split>.json` (TFDS deletes the unfinished
version folder).

    from tfds_builders.mmrs1m import build
    builder = build('/path/to/release', data_dir='/tmp/tfds')   # release holds data/
    src = tfds.data_source('mmrs1m', data_dir='/tmp/tfds', split='train')
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from earthgpt_jax.data.images import MAX_IMAGE_PIXELS, ImageDecodeError, decode_image
from tfds_builders.mmrs1m import records as rec
from tfds_builders.mmrs1m.report import BadRecord, BadRecordsError, SplitReport, read_report
from tfds_builders.mmrs1m.selection import ExclusionList, in_validation
# Re-exported: other modules import the sensor table from here.
from tfds_builders.mmrs1m.sources import SENSOR_BY_SOURCE_PREFIX, SENSORS, sensor_for_source

__all__ = ["Mmrs1m", "Mmrs1mConfig", "build", "BadRecordsError", "SENSOR_BY_SOURCE_PREFIX",
           "SENSORS", "sensor_for_source", "TASKS"]

# Task of an annotation file from its folder under data/json/ (RSVG is decided per record).
TASK_BY_JSON_FOLDER = {
    "classification": "classification",
    "caption": "captioning",
    "vqa": "vqa",
    "detection": "detection",
}
RSVG_FOLDER = "rsvg"
TASKS = ("classification", "captioning", "vqa", "grounding", "region_captioning", "detection")

TEST_SUFFIX = "_test.json"
SKIPPED_JSON = ("total.json",)
DEFAULT_VALIDATION_FRACTION = 0.01


@dataclasses.dataclass(eq=False)
class Mmrs1mConfig(tfds.core.BuilderConfig):
    # Lower-case folder names under data/json/ this config reads; empty = every folder.
    json_folders: tuple[str, ...] = ()


BUILDER_CONFIGS = [
    Mmrs1mConfig(name="all", description="Every task family (the default)."),
    Mmrs1mConfig(name="classification", json_folders=("classification",),
                 description="Scene classification (data/json/classification/)."),
    Mmrs1mConfig(name="captioning", json_folders=("caption",),
                 description="Image captioning (data/json/caption/)."),
    Mmrs1mConfig(name="vqa", json_folders=("vqa",),
                 description="Visual question answering (data/json/VQA/)."),
    Mmrs1mConfig(name="grounding", json_folders=(RSVG_FOLDER,),
                 description="DIOR-RSVG (data/json/RSVG/): visual grounding and region-level "
                             "captioning records."),
    Mmrs1mConfig(name="detection", json_folders=("detection",),
                 description="Object detection, optical/SAR/infrared (data/json/detection/)."),
]


def _walk(folder: epath.Path) -> Iterator[epath.Path]:
    # epath refuses `rglob('**')` (it would be slow on GCS); the json tree is small, so recurse.
    for p in folder.iterdir():
        if p.is_dir():
            yield from _walk(p)
        else:
            yield p


def _load_records(json_file: epath.Path) -> tuple[list, bool]:
    """The record list and whether the text had to be read lossily (not UTF-8)."""
    try:
        raw = json_file.read_bytes()
    except OSError as e:  # permissions, a dangling link, an I/O error: lose this file only
        raise BadRecord("unreadable_json", f"cannot read the file: {e}") from e
    try:
        text, lossy = raw.decode("utf-8-sig"), False  # a BOM is harmless; tolerate it
    except UnicodeDecodeError:
        text, lossy = raw.decode("utf-8", errors="replace"), True
    try:
        records = json.loads(text)
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise BadRecord("unreadable_json", f"unreadable json: {e}") from e
    if not isinstance(records, list):
        raise BadRecord("unreadable_json", "unreadable json: top level is not a list")
    return records, lossy


def record_features() -> tfds.features.FeaturesDict:
    """The features of one record: mmrs1m's, and the evaluation builders' (eval_common), so the
    pipeline and the eval runner read every builder alike."""
    text = tfds.features.Text()
    return tfds.features.FeaturesDict({
        # Original encoded file (jpg/png/tif): an Image feature would need TensorFlow to encode.
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "image_path": text,
        "width": np.int32,
        "height": np.int32,
        "sensor": text,
        "source": text,
        "task": text,
        "conversations": tfds.features.Sequence({"from": text, "value": text}),
        # Boxes in [0,1] of the centre-padded square, in answer-text order, not rounded (the
        # text has two decimals); [0, 4] for tasks without boxes.
        "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        # The turn each box is written in, and its label (detection class or referring phrase).
        "box_turns": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "box_labels": tfds.features.Sequence(text),
    })


class Mmrs1m(tfds.core.GeneratorBasedBuilder):
    """MMRS-1M instruction records (all six tasks, optical/SAR/infrared) with image bytes."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Conversation records with original image bytes; train/test.",
        "2.0.0": "Task-family configs; boxes parsed from the text; hashed validation split; "
                 "evaluation-overlap exclusion; per-reason, per-file bad-record report.",
    }
    BUILDER_CONFIGS = BUILDER_CONFIGS
    DEFAULT_BUILDER_CONFIG_NAME = "all"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract the MMRS-1M release (cat data.tar.gz.* | tar xz) and pass the folder holding "
        "`data/` as manual_dir. `python -m earthgpt_jax.data.synthetic --out=DIR` writes a "
        "miniature release with the same layout.")
    # Largest fraction of skipped records a split may have before the build fails.
    MAX_BAD_FRACTION = 0.01

    def __init__(self, *, max_bad_fraction: float | None = None,
                 validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                 exclude_images=None, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 follow_symlinks_outside: bool = False, **kwargs):
        self.max_bad_fraction = (self.MAX_BAD_FRACTION if max_bad_fraction is None
                                 else float(max_bad_fraction))
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        self.validation_fraction = float(validation_fraction)
        self.exclude_images = exclude_images
        self.max_image_pixels = int(max_image_pixels)
        self.follow_symlinks_outside = bool(follow_symlinks_outside)
        self._exclusions = ExclusionList()
        # (path, size, mtime) -> (width, height): records sharing an image decode it once.
        self._sizes: collections.OrderedDict = collections.OrderedDict()
        # array_record by default, so the plain TFDS API (download_and_prepare without a
        # file_format) needs no TensorFlow either.
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=record_features(),
            homepage="https://github.com/wivizhang/EarthGPT",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = epath.Path(dl_manager.manual_dir)
        json_root = root / "data" / "json"
        if not json_root.is_dir():
            raise FileNotFoundError(f"no data/json/ under manual_dir {root}; "
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        self._exclusions = ExclusionList.from_files(self.exclude_images)
        folders = self.builder_config.json_folders
        files = sorted(
            p for p in _walk(json_root)
            if p.suffix == ".json" and p.name not in SKIPPED_JSON
            and (not folders or p.relative_to(json_root).parts[0].lower() in folders))
        if not files:
            raise FileNotFoundError(
                f"config {self.builder_config.name!r} found no annotation files under "
                f"{json_root}" + (f" in the folders {list(folders)}" if folders else ""))
        train = [p for p in files if not p.name.endswith(TEST_SUFFIX)]
        test = [p for p in files if p.name.endswith(TEST_SUFFIX)]
        splits = {"train": self._generate_examples(root, train, "train")}
        if self._has_validation_records(train):
            splits["validation"] = self._generate_examples(root, train, "validation")
        if test:
            splits["test"] = self._generate_examples(root, test, "test")
        return splits

    def _has_validation_records(self, json_files: list[epath.Path]) -> bool:
        """Whether any record hashes into validation; TFDS refuses a split with no examples,
        so a release too small for the fraction gets no validation split (stops at the first
        hit, so the real release pays for one file)."""
        if self.validation_fraction <= 0:
            return False
        for json_file in json_files:
            try:
                records, _ = _load_records(json_file)
            except BadRecord:
                continue
            for record in records:
                image_path = record.get("image") if isinstance(record, dict) else None
                if (isinstance(image_path, str)
                        and in_validation(image_path, self.validation_fraction)
                        and not self._exclusions.matches(image_path)):
                    return True
        return False

    def _generate_examples(self, root: epath.Path, json_files: list[epath.Path],
                           split: str) -> Iterator[tuple[str, dict]]:
        report = SplitReport(self.name, split, self.max_bad_fraction)
        report.extra = {"config": self.builder_config.name,
                        "validation_fraction": self.validation_fraction,
                        "exclusion_entries": len(self._exclusions)}
        for json_file in json_files:
            rel_json = os.fspath(json_file.relative_to(root))
            try:
                folder = json_file.relative_to(root / "data" / "json").parts[0].lower()
                if folder != RSVG_FOLDER and folder not in TASK_BY_JSON_FOLDER:
                    raise BadRecord("unknown_task_folder",
                                    f"data/json/{folder} is no task folder (known: "
                                    f"{sorted(TASK_BY_JSON_FOLDER) + [RSVG_FOLDER]})")
                records, lossy = _load_records(json_file)
            except BadRecord as e:
                if split != "validation":  # the file's records would mostly have been train
                    report.add_bad(rel_json, None, e.kind, str(e))
                continue
            for index, record in enumerate(records):
                image_path = record.get("image") if isinstance(record, dict) else None
                if split != "test":
                    if isinstance(image_path, str):
                        if in_validation(image_path, self.validation_fraction) != (
                                split == "validation"):
                            continue
                        if self._exclusions.matches(image_path):
                            report.add_excluded(rel_json)
                            continue
                    elif split == "validation":
                        continue  # no path to hash: reported in train
                try:
                    example, repairs = self._example(root, folder, json_file.stem, record, lossy)
                except BadRecord as e:
                    report.add_bad(rel_json, index, e.kind, str(e))
                    continue
                except Exception as e:  # a surprise in one record must not end a long build
                    report.add_bad(rel_json, index, "unexpected_error",
                                   f"{type(e).__name__}: {e}")
                    continue
                for kind, reason in repairs:
                    report.add_repair(rel_json, index, kind, reason)
                report.good += 1
                yield f"{rel_json}:{index}", example
        report.write(self.data_dir)

    def _example(self, root: epath.Path, folder: str, json_stem: str, record,
                 lossy: bool) -> tuple[dict, rec.Repairs]:
        if not isinstance(record, dict):
            raise BadRecord("not_an_object", "record is not an object")
        image_path = record.get("image")
        if not isinstance(image_path, str) or not image_path.strip():
            raise BadRecord("no_image_path", "record has no image path")
        conversations = record.get("conversations")
        rec.check_conversations(conversations)
        if lossy:
            rec.check_text_decoded(record)
        path = rec.resolve_image_path(root, image_path,
                                      follow_symlinks_outside=self.follow_symlinks_outside)
        source, repairs = rec.source_of(image_path, json_stem)
        task = (rec.rsvg_task(conversations[0]["value"]) if folder == RSVG_FOLDER
                else TASK_BY_JSON_FOLDER[folder])
        boxes = rec.record_boxes(task, conversations)
        data, (width, height) = self._read_image(path, image_path)
        return {
            "image": data,
            "image_path": image_path,
            "width": width,
            "height": height,
            "sensor": sensor_for_source(source),
            "source": source,
            "task": task,
            "conversations": [{"from": t["from"], "value": t["value"]} for t in conversations],
            **boxes.arrays(),
        }, repairs + boxes.repairs

    def _read_image(self, path: epath.Path, image_path: str) -> tuple[bytes, tuple[int, int]]:
        """The file's bytes and its decoded size; every failure becomes a counted BadRecord."""
        try:
            stat = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise BadRecord("missing_image", f"missing image {image_path}") from None
        if not path.is_file():
            raise BadRecord("missing_image", f"missing image {image_path} (not a file)")
        data = path.read_bytes()
        key = (os.fspath(path), len(data), getattr(stat, "mtime", None))
        if key in self._sizes:
            self._sizes.move_to_end(key)
            return data, self._sizes[key]
        try:  # the pipeline's own decoder, so what is stored is what training can read
            pixels = decode_image(data, image_path, max_pixels=self.max_image_pixels)
        except ImageDecodeError as e:
            raise BadRecord(e.kind, f"{e.kind.replace('_', ' ')}: {e}") from e
        size = (int(pixels.shape[1]), int(pixels.shape[0]))
        self._sizes[key] = size
        if len(self._sizes) > 4096:
            self._sizes.popitem(last=False)
        return data, size

    def _report(self, split: str, good: int, bad: list[dict]) -> None:
        """Writes a split's report from (good, [{file, index, reason[, kind]}]); kept for
        builders written against the 1.0 report."""
        report = SplitReport(self.name, split, self.max_bad_fraction)
        report.good = good
        for b in bad:
            report.add_bad(b["file"], b["index"], b.get("kind", "unspecified"), b["reason"])
        report.write(self.data_dir)

    def bad_records(self, split: str) -> dict:
        """The bad-record report of a prepared split."""
        return read_report(self.data_dir, split)


def build(manual_dir: str, data_dir: str, max_bad_fraction: float | None = None,
          config: str | None = None, **builder_kwargs) -> Mmrs1m:
    """Prepare `mmrs1m[/<config>]` from the release at `manual_dir` into `data_dir`.

    `builder_kwargs` are the builder options (module docstring). Returns the builder.
    """
    builder = Mmrs1m(data_dir=data_dir, max_bad_fraction=max_bad_fraction, config=config,
                     **builder_kwargs)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
    return builder
