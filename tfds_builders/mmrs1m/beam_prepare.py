"""Cluster preparation: a split of the `mmrs1m` builder as an Apache Beam transform.

The builder takes this path when `download_and_prepare` gets a `DownloadConfig` naming a Beam
runner or Beam options (TFDS then runs every split in one Beam pipeline and writes the shards
with its Beam writer); otherwise it prepares locally with worker processes. Beam is imported
only here, so training and local preparation never need it (it is not in the runtime pins).

A split's pipeline: the annotation files -> the outcomes of their records (`walk.py`, the local
build's rules, one worker per file) -> the records waiting for an image, grouped by image path
(so each image is read and decoded once, on any worker, and one large file's records spread over
the cluster) -> read + decode (`image_checks.read_image`, the local workers' function) -> the
good examples, under the local build's keys, to TFDS's writer. Every outcome, without its
example, also goes to one final step that sorts them into the local build's order (file, then
record) and writes the same `bad_records_<split>.json`, raising `BadRecordsError` past
`max_bad_fraction`, which fails the pipeline. Beam counters `<split>_good`, `<split>_bad` and
`<split>_excluded` (namespace `mmrs1m`) show progress in the runner's monitoring. The resume
cache is not used: Beam retries failed work itself.
"""

from __future__ import annotations

import dataclasses
import os

import apache_beam as beam

from tfds_builders.mmrs1m.image_checks import ImageJob, read_image
from tfds_builders.mmrs1m.report import SplitReport
from tfds_builders.mmrs1m.walk import Outcome, RecordRules, count_outcome


@dataclasses.dataclass(frozen=True)
class _ReportSpec:
    """What the final step needs to write a split's report (plain data, shipped to a worker)."""

    name: str
    split: str
    max_bad_fraction: float
    extra: dict
    data_dir: str


def split_transform(builder, json_files, split: str) -> beam.PTransform:
    """The Beam transform generating `split`'s (key, example) pairs; `builder` is an Mmrs1m
    inside its `_split_generators` (its record rules set, its data_dir the unfinished folder)."""
    report = builder._new_report(split)
    spec = _ReportSpec(builder.name, split, builder.max_bad_fraction, report.extra,
                       os.fspath(builder.data_dir))
    return _PrepareSplit(builder._rules, [os.fspath(f) for f in json_files], split,
                         builder.max_image_pixels, spec)


def _file_outcomes(pos_and_file: tuple[int, str], rules: RecordRules, split: str):
    pos, json_file = pos_and_file
    return rules.outcomes(json_file, split, pos)


def _check_image(group: tuple[str, list[Outcome]], max_pixels: int):
    """Reads and decodes one image, then finishes every outcome waiting for it."""
    image_path, outcomes = group
    outcomes = sorted(outcomes, key=lambda o: o.order)
    read = read_image(ImageJob(outcomes[0].image[0], image_path, max_pixels))
    for outcome in outcomes:
        outcome = dataclasses.replace(outcome)  # Beam's inputs are not to be changed
        if read.error is not None:
            outcome.to_bad(*read.error)
        elif read.checked[2]:
            outcome.to_bad(*read.checked[2:])
        else:
            outcome.to_good(read.data, *read.checked[:2])
        yield outcome


def _count(outcome: Outcome, split: str) -> Outcome:
    beam.metrics.Metrics.counter("mmrs1m", f"{split}_{outcome.status}").inc()
    return dataclasses.replace(outcome, example=None)  # the report needs no image bytes


def _write_report(outcomes: list[Outcome], spec: _ReportSpec) -> None:
    report = SplitReport(spec.name, spec.split, spec.max_bad_fraction)
    report.extra = spec.extra
    for outcome in sorted(outcomes, key=lambda o: o.order):
        count_outcome(report, outcome)
    report.write(spec.data_dir)


class _PrepareSplit(beam.PTransform):
    def __init__(self, rules: RecordRules, json_files: list[str], split: str, max_pixels: int,
                 report: _ReportSpec):
        super().__init__()
        self.rules = rules
        self.json_files = json_files
        self.split = split
        self.max_pixels = max_pixels
        self.report = report

    def expand(self, pipeline):
        split = self.split
        outcomes = (
            pipeline
            | "AnnotationFiles" >> beam.Create(list(enumerate(self.json_files)))
            | "SpreadFiles" >> beam.Reshuffle()
            | "Records" >> beam.FlatMap(_file_outcomes, rules=self.rules, split=split))
        checked = (
            outcomes
            | "WaitingForImage" >> beam.Filter(lambda o: o.status == "image")
            | "ByImage" >> beam.Map(lambda o: (o.image[1], o))
            | "GroupByImage" >> beam.GroupByKey()
            | "CheckImage" >> beam.FlatMap(_check_image, max_pixels=self.max_pixels))
        decided = outcomes | "Decided" >> beam.Filter(lambda o: o.status != "image")
        finished = (checked, decided) | "AllOutcomes" >> beam.Flatten()
        _ = (finished
             | "Count" >> beam.Map(_count, split=split)
             | "Collect" >> beam.combiners.ToList()
             | "WriteReport" >> beam.Map(_write_report, spec=self.report))
        return (finished
                | "Good" >> beam.Filter(lambda o: o.status == "good")
                | "Examples" >> beam.Map(lambda o: (o.key, o.example)))
