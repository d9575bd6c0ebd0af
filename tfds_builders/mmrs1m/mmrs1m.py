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
`box_labels` [N] (detection class, or the referring phrase for grounding/region captioning),
`box_corners` float32 [N, 8] (each box's corners: an oriented box's own, whose enclosing box is
its `boxes` row; a horizontal box's rectangle).
N is 0 for classification, captioning and VQA. `independent` (bool): the record's questions are
independent, each to be asked alone (never after another's answer); true for VQA, whose
sources (RSVQA, CRSVQA, ...) ask unrelated questions about one image, false otherwise (turn k
follows turns 0..k-1).

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
`follow_symlinks_outside`, `num_workers`, `resume`. Excluded records are removed before any
check, so they count neither as good nor as bad. The prepared folder does not record the
options: build different option sets into different `data_dir`s.

Preparation. Reading and decoding every image (the check that keeps undecodable files out of
training) is the expensive part; it runs in `num_workers` spawned worker processes (default:
every core this process may use; builds under 2000 records use one process, as starting
workers costs about a second), fed in order-preserving chunks, so the examples, their keys and
the reports equal a one-process build's (`parallel.py`, `image_checks.py`). A script that
prepares data must guard its entry point (`if __name__ == "__main__":`). Each split shows its
progress (records done of the total, good and bad so far, rate, ETA): a tqdm bar on a terminal,
else a log line every 5% (at most one per 30 s), `progress.py`.

Resume (`resume=True`, the default): every image check is committed to an SQLite file,
`<data_dir>/mmrs1m/<config>/prepare_cache.sqlite`, after each chunk. A preparation that dies
(`kill -9`, a lost machine, `BadRecordsError`) and is run again with the same command decodes
only the images not checked yet (or changed since: size and mtime are compared); it reads the
files again, as their bytes go into the examples. The cache is removed after a successful
build; `resume=False` keeps nothing on disk. A killed build also leaves TFDS's unfinished
folder `incomplete.*_<version>` behind: the rerun names it in a warning, delete it.

Cluster preparation (Apache Beam): pass a `DownloadConfig` with `beam_runner` or
`beam_options`; every split then runs as a Beam transform (`beam_prepare.py`) that applies the
same rules and writes the same examples and reports (the report step raises `BadRecordsError`).
apache-beam 2.77 wants protobuf<7, pillow<13, pyarrow<26, older than the runtime pins: it is
pinned apart (requirements-beam.txt; the tests run it from an overlay): install it in the
preparation environment. Beam workers must be able to import this checkout
(`tfds_builders`, `earthgpt_jax`): on Dataflow, a custom container or `--setup_file`.

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    options = PipelineOptions(['--direct_num_workers=8',   # or --runner=DataflowRunner ...
                               '--direct_running_mode=multi_processing'])
    dl = tfds.download.DownloadConfig(manual_dir='/path/to/release', beam_options=options,
                                      beam_runner=beam.runners.DirectRunner())
    tfds.builder('mmrs1m/all', data_dir='gs://bucket/tfds').download_and_prepare(
        download_config=dl)

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

import contextlib
import dataclasses
import itertools
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from earthgpt_jax.data.images import MAX_IMAGE_PIXELS
from tfds_builders.mmrs1m import image_checks, tfds_compat
from tfds_builders.mmrs1m.parallel import ChunkPool, default_num_workers
from tfds_builders.mmrs1m.progress import Progress
from tfds_builders.mmrs1m.report import BadRecordsError, SplitReport, read_report
from tfds_builders.mmrs1m.selection import ExclusionList
# Re-exported: other modules import the sensor table from here.
from tfds_builders.mmrs1m.sources import SENSOR_BY_SOURCE_PREFIX, SENSORS, sensor_for_source
from tfds_builders.mmrs1m.walk import (RSVG_FOLDER, SKIPPED_JSON, TASK_BY_JSON_FOLDER,
                                       TEST_SUFFIX, RecordRules, count_outcome, walk)

__all__ = ["Mmrs1m", "Mmrs1mConfig", "build", "BadRecordsError", "SENSOR_BY_SOURCE_PREFIX",
           "SENSORS", "sensor_for_source", "TASKS", "TASK_BY_JSON_FOLDER"]

TASKS = ("classification", "captioning", "vqa", "grounding", "region_captioning", "detection")
DEFAULT_VALIDATION_FRACTION = 0.01
# With num_workers=None, smaller builds run in one process: spawning workers costs ~1 s.
MIN_RECORDS_FOR_WORKERS = 2000


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
        # Each box's four corners (x1,y1,...,x4,y4), same frame and order: an oriented box's
        # own (DOTA, HRSC2016, HRSID_OBB), a horizontal box's rectangle; `boxes` encloses them.
        "box_corners": tfds.features.Tensor(shape=(None, 8), dtype=np.float32),
        # The turn each box is written in, and its label (detection class or referring phrase).
        "box_turns": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "box_labels": tfds.features.Sequence(text),
        # True: every question is asked alone in evaluation (one image, many unrelated
        # questions: RSVQA-HR holds ~100 per image); false: turn k follows turns 0..k-1.
        "independent": np.bool_,
    })


class Mmrs1m(tfds.core.GeneratorBasedBuilder):
    """MMRS-1M instruction records (all six tasks, optical/SAR/infrared) with image bytes."""

    VERSION = tfds.core.Version("2.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Conversation records with original image bytes; train/test.",
        "2.0.0": "Task-family configs; boxes parsed from the text; hashed validation split; "
                 "evaluation-overlap exclusion; per-reason, per-file bad-record report.",
        "2.1.0": "`independent` feature (VQA questions are asked alone); empty detection "
                 "scenes noted when their wording does not say 'no objects'; oriented boxes "
                 "(8 corners, or centre/size/angle) read, with `box_corners`.",
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
                 follow_symlinks_outside: bool = False, num_workers: int | None = None,
                 resume: bool = True, **kwargs):
        self.max_bad_fraction = (self.MAX_BAD_FRACTION if max_bad_fraction is None
                                 else float(max_bad_fraction))
        if not 0.0 <= validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        self.validation_fraction = float(validation_fraction)
        self.exclude_images = exclude_images
        self.max_image_pixels = int(max_image_pixels)
        self.follow_symlinks_outside = bool(follow_symlinks_outside)
        if num_workers is not None and int(num_workers) < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = None if num_workers is None else int(num_workers)
        self.resume = bool(resume)
        # Set while preparing: the record rules, the splits' record counts, the image checks.
        self._rules: RecordRules | None = None
        self._totals: dict[str, int] = {}
        self._checks: image_checks.ImageChecks | None = None
        self._pool: ChunkPool | None = None
        self._exit_stack: contextlib.ExitStack | None = None
        self._beam = False
        # What the last preparation did: decodes, cache hits, workers (tests and benchmarks).
        self.prepare_stats: dict = {}
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

    def _generate_splits(self, dl_manager, download_config):
        """TFDS's split generation, wrapped: a Beam run when the download config names a Beam
        runner or options, else the local run's worker pool and resume cache around it."""
        self._beam = (download_config.beam_runner is not None
                      or download_config.beam_options is not None)
        if self._beam:
            return super()._generate_splits(dl_manager, download_config)
        tfds_compat.spill_without_tensorflow()  # splits over 1 GB, TensorFlow not installed
        with self._local_preparation() as finish:
            split_infos = super()._generate_splits(dl_manager, download_config)
            finish()
        return split_infos

    @contextlib.contextmanager
    def _local_preparation(self):
        config_dir = epath.Path(self.data_dir).parent  # survives a failed build; see report.py
        stale = [p.name for p in config_dir.glob(f"incomplete.*_{self.version}")
                 if os.fspath(p) != os.fspath(epath.Path(self.data_dir))]
        if stale:
            logging.warning("%s holds folders of unfinished builds (a killed preparation): %s; "
                            "delete them to free their space", config_dir, stale)
        cache = image_checks.open_cache(
            config_dir if self.resume else None,
            settings={"version": str(self.version), "max_image_pixels": self.max_image_pixels})
        self._checks = image_checks.ImageChecks(cache, self.max_image_pixels)
        succeeded = False

        def finish():
            nonlocal succeeded
            succeeded = True

        try:
            with contextlib.ExitStack() as self._exit_stack:
                yield finish
        finally:
            checks, pool = self._checks, self._pool
            self._checks = self._pool = self._exit_stack = None
            num_workers = pool.num_workers if pool else 0
            self.prepare_stats = {"decoded": checks.decoded, "reused": checks.reused,
                                  "num_workers": num_workers,
                                  "resume_cache": os.fspath(cache.path) if cache.path else None}
            logging.info("%s/%s: %d images decoded, %d checks answered by the cache, %d "
                         "worker(s)%s", self.name, self.builder_config.name, checks.decoded,
                         checks.reused, num_workers,
                         "" if cache.path is None else
                         f"; resume cache {'removed' if succeeded else 'kept'}: {cache.path}")
            cache.close(remove=succeeded)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = epath.Path(dl_manager.manual_dir)
        json_root = root / "data" / "json"
        if not json_root.is_dir():
            raise FileNotFoundError(f"no data/json/ under manual_dir {root}; "
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        self._rules = RecordRules(root, self.validation_fraction,
                                  ExclusionList.from_files(self.exclude_images),
                                  self.follow_symlinks_outside)
        folders = self.builder_config.json_folders
        files = sorted(
            p for p in walk(json_root)
            if p.suffix == ".json" and p.name not in SKIPPED_JSON
            and (not folders or p.relative_to(json_root).parts[0].lower() in folders))
        if not files:
            raise FileNotFoundError(
                f"config {self.builder_config.name!r} found no annotation files under "
                f"{json_root}" + (f" in the folders {list(folders)}" if folders else ""))
        files_of = {"train": [p for p in files if not p.name.endswith(TEST_SUFFIX)],
                    "test": [p for p in files if p.name.endswith(TEST_SUFFIX)]}
        # Every annotation file is read once here: the progress totals, and whether any record
        # falls in validation (TFDS refuses a split with no examples, so a release too small
        # for the fraction gets no validation split).
        splits = ("train", "validation") if self.validation_fraction > 0 else ("train",)
        self._totals = self._rules.count(files_of["train"], splits)
        self._totals["test"] = self._rules.count(files_of["test"], ("test",))["test"]
        files_of["validation"] = files_of["train"] if self._totals["validation_kept"] else []
        return {split: self._split_generator(files_of[split], split)
                for split in ("train", "validation", "test") if files_of[split]}

    def _split_generator(self, json_files: list[epath.Path], split: str):
        if self._beam:
            from tfds_builders.mmrs1m import beam_prepare  # Beam only for cluster preparation
            return beam_prepare.split_transform(self, json_files, split)
        return self._generate_examples(json_files, split)

    def _image_pool(self) -> ChunkPool:
        """The worker pool of this preparation, started at its first split."""
        if self._pool is None:
            num_workers = self.num_workers
            if num_workers is None:
                records = sum(v for k, v in self._totals.items() if k != "validation_kept")
                num_workers = (default_num_workers() if records >= MIN_RECORDS_FOR_WORKERS
                               else 1)
            self._pool = self._exit_stack.enter_context(
                ChunkPool(image_checks.read_images, num_workers))
        return self._pool

    def _new_report(self, split: str) -> SplitReport:
        report = SplitReport(self.name, split, self.max_bad_fraction)
        report.extra = {"config": self.builder_config.name,
                        "validation_fraction": self.validation_fraction,
                        "exclusion_entries": len(self._rules.exclusions)}
        return report

    def _generate_examples(self, json_files: list[epath.Path], split: str
                           ) -> Iterator[tuple[str, dict]]:
        report = self._new_report(split)
        progress = Progress(f"{self.name}/{self.builder_config.name} {split}",
                            self._totals.get(split, 0))
        outcomes = itertools.chain.from_iterable(
            self._rules.outcomes(json_file, split, pos) for pos, json_file in
            enumerate(json_files))
        checks = self._checks
        for chunk in self._image_pool().map_chunks(outcomes, checks.job):
            for outcome, job, read in chunk:
                if job is not None:
                    checks.finish(outcome, job, read)
                count_outcome(report, outcome)
                progress.update(outcome.status)
                if outcome.status == "good":
                    yield outcome.key, outcome.example
            checks.commit()
        progress.close()
        report.write(self.data_dir)

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
          config: str | None = None, download_config: tfds.download.DownloadConfig | None = None,
          **builder_kwargs) -> Mmrs1m:
    """Prepare `mmrs1m[/<config>]` from the release at `manual_dir` into `data_dir`.

    `builder_kwargs` are the builder options (module docstring). `download_config` (its
    manual_dir is set here) can name a Beam runner. Returns the builder.
    """
    builder = Mmrs1m(data_dir=data_dir, max_bad_fraction=max_bad_fraction, config=config,
                     **builder_kwargs)
    download_config = dataclasses.replace(download_config or tfds.download.DownloadConfig(),
                                          manual_dir=os.fspath(manual_dir))
    builder.download_and_prepare(file_format="array_record", download_config=download_config)
    return builder
