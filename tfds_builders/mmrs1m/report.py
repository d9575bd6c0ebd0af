"""The bad-record report every builder writes beside its prepared dataset, and the threshold.

A split's report, `bad_records_<split>.json`, lists every skipped record (file, index, reason
kind, message) and every repair, and counts both per reason and per file; records removed on
purpose (overlap with evaluation test sets) are counted apart and do not count as bad. When
the skipped fraction of a split passes `max_bad_fraction` the build stops with
`BadRecordsError`; the report is then written one level up, because TFDS deletes the unfinished
version folder.

Report keys (stable; evaluation builders write the same): split, records (= good + bad), good,
bad, bad_fraction, max_bad_fraction, bad_records [{file, index, kind, reason}], bad_by_reason
{kind: n}, bad_by_file {file: {kind: n}}, repaired, repaired_by_reason, repaired_by_file,
repaired_records [{file, index, kind, reason}], excluded, excluded_by_file, and `extra` for
builder-specific facts.
"""

from __future__ import annotations

import collections
import json

from absl import logging
from etils import epath

# Reasons listed in an error message; the full list is in the report file.
_REASONS_IN_ERROR = 5


class BadRecordsError(ValueError):
    """Too large a fraction of a split's records could not be used."""


class BadRecord(ValueError):
    """One record that is skipped; `kind` is the short reason counted in the report."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class SplitReport:
    """Collects one split's good, bad, repaired and excluded records while it is generated."""

    def __init__(self, name: str, split: str, max_bad_fraction: float):
        self.name = name
        self.split = split
        self.max_bad_fraction = max_bad_fraction
        self.good = 0
        self.bad: list[dict] = []
        self.repaired: list[dict] = []
        self.excluded_by_file: collections.Counter = collections.Counter()
        self.extra: dict = {}

    def add_bad(self, file: str, index: int | None, kind: str, reason: str) -> None:
        self.bad.append({"file": file, "index": index, "kind": kind, "reason": reason})

    def add_repair(self, file: str, index: int | None, kind: str, reason: str) -> None:
        self.repaired.append({"file": file, "index": index, "kind": kind, "reason": reason})

    def add_excluded(self, file: str) -> None:
        self.excluded_by_file[file] += 1

    def as_dict(self) -> dict:
        total = self.good + len(self.bad)
        return {
            "split": self.split, "records": total, "good": self.good, "bad": len(self.bad),
            "bad_fraction": self.bad_fraction, "max_bad_fraction": self.max_bad_fraction,
            "bad_records": self.bad,
            "bad_by_reason": _count_by(self.bad, "kind"),
            "bad_by_file": _count_by_file(self.bad),
            "repaired": len(self.repaired),
            "repaired_by_reason": _count_by(self.repaired, "kind"),
            "repaired_by_file": _count_by_file(self.repaired),
            "repaired_records": self.repaired,
            "excluded": sum(self.excluded_by_file.values()),
            "excluded_by_file": dict(sorted(self.excluded_by_file.items())),
            "extra": self.extra,
        }

    @property
    def bad_fraction(self) -> float:
        total = self.good + len(self.bad)
        return len(self.bad) / total if total else 0.0

    def write(self, data_dir: str) -> epath.Path:
        """Writes the report beside the dataset; raises BadRecordsError past the threshold."""
        report = self.as_dict()
        exceeded = self.bad_fraction > self.max_bad_fraction
        # While preparing, data_dir is TFDS's unfinished folder, renamed on success and deleted
        # on failure; a failing report goes one level up so it survives.
        out_dir = epath.Path(data_dir)
        if exceeded:
            out_dir = out_dir.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        report_path = out_dir / f"bad_records_{self.split}.json"
        report_path.write_text(json.dumps(report, indent=1))
        # The unfinished folder is renamed when preparation succeeds, so name the file only.
        (logging.warning if self.bad else logging.info)(
            "%s %s: %d records, %d skipped (%.4f), %d repaired, %d excluded; by reason %s; "
            "details in %s beside the dataset", self.name, self.split, report["records"],
            report["bad"], self.bad_fraction, report["repaired"], report["excluded"],
            report["bad_by_reason"], report_path.name)
        if exceeded:
            reasons = "; ".join(f"{b['file']}[{b['index']}]: {b['reason']}"
                                for b in self.bad[:_REASONS_IN_ERROR])
            raise BadRecordsError(
                f"{self.name} split {self.split!r}: {len(self.bad)} of {report['records']} "
                f"records are bad (fraction {self.bad_fraction:.4f} > max_bad_fraction "
                f"{self.max_bad_fraction}). By reason: {report['bad_by_reason']}. "
                f"First reasons: {reasons}. Full report: {report_path}")
        return report_path


def _count_by(entries: list[dict], key: str) -> dict[str, int]:
    return dict(sorted(collections.Counter(e[key] for e in entries).items()))


def _count_by_file(entries: list[dict]) -> dict[str, dict[str, int]]:
    by_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in entries:
        by_file[e["file"]][e["kind"]] += 1
    return {f: dict(sorted(c.items())) for f, c in sorted(by_file.items())}


def read_report(data_dir: str, split: str) -> dict:
    """The report of a prepared split (`data_dir` is the builder's version folder)."""
    return json.loads((epath.Path(data_dir) / f"bad_records_{split}.json").read_text())
