"""The records of a split, checked in the order the builder writes them.

Each record a split examines becomes an `Outcome`: `bad` (skipped, with the reason), `excluded`
(overlap removal), or `image`: every rule of `records.py` passed and the example waits for its
image check, the expensive part, which `image_checks.py` runs (in worker processes for a local
build, on Beam workers for a cluster build). Both builds walk the records here, so they apply
the same rules and count the same report (`count_outcome`).

Which records a split examines: `test` every record of the `_test.json` files; `train` and
`validation` the records of the other files on their side of the hashed validation slice
(`selection.py`); a record without an image path is examined by `train` only. Excluded records
count as examined (the report counts them apart) but are never checked.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

from etils import epath

from tfds_builders.mmrs1m import records as rec
from tfds_builders.mmrs1m.report import BadRecord, SplitReport
from tfds_builders.mmrs1m.selection import ExclusionList, in_validation
from tfds_builders.mmrs1m.sources import sensor_for_source

# Task of an annotation file from its folder under data/json/ (RSVG is decided per record).
TASK_BY_JSON_FOLDER = {
    "classification": "classification",
    "caption": "captioning",
    "vqa": "vqa",
    "detection": "detection",
}
RSVG_FOLDER = "rsvg"
TEST_SUFFIX = "_test.json"
SKIPPED_JSON = ("total.json",)


def walk(folder: epath.Path) -> Iterator[epath.Path]:
    # epath refuses `rglob('**')` (it would be slow on GCS); the json tree is small, so recurse.
    for p in folder.iterdir():
        if p.is_dir():
            yield from walk(p)
        else:
            yield p


def load_records(json_file: epath.Path) -> tuple[list, bool]:
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


@dataclasses.dataclass
class Outcome:
    """One examined record. `order` sorts outcomes into the sequential build's order."""

    file: str                    # the annotation file, relative to the release root
    index: int | None            # the record's index in it; None for a file-level problem
    status: str                  # "image" (waits for its image check), "good", "bad", "excluded"
    file_pos: int = 0            # position of the file in the split's sorted file list
    kind: str = ""               # why a bad record was skipped (the report's reason kind)
    reason: str = ""
    key: str = ""                # the example key, `<file>:<index>`
    example: dict | None = None  # every feature but image/width/height until the image check
    repairs: list = dataclasses.field(default_factory=list)
    image: tuple[str, str] | None = None  # (file to read, the record's image path)

    @property
    def order(self) -> tuple[int, int]:
        return self.file_pos, -1 if self.index is None else self.index

    def to_bad(self, kind: str, reason: str) -> None:
        self.status, self.kind, self.reason, self.example = "bad", kind, reason, None

    def to_good(self, data: bytes, width: int, height: int) -> None:
        self.example = {**self.example, "image": data, "width": width, "height": height}
        self.status = "good"


def count_outcome(report: SplitReport, outcome: Outcome) -> None:
    """Adds a finished outcome (good, bad or excluded) to the split's report."""
    if outcome.status == "good":
        for kind, reason in outcome.repairs:
            report.add_repair(outcome.file, outcome.index, kind, reason)
        report.good += 1
    elif outcome.status == "bad":
        report.add_bad(outcome.file, outcome.index, outcome.kind, outcome.reason)
    elif outcome.status == "excluded":
        report.add_excluded(outcome.file)
    else:
        raise ValueError(f"{outcome.file}[{outcome.index}]: outcome not finished "
                         f"({outcome.status!r})")


@dataclasses.dataclass(frozen=True)
class RecordRules:
    """The record rules of one build: plain data, so Beam can ship it to its workers."""

    root: epath.Path
    validation_fraction: float
    exclusions: ExclusionList
    follow_symlinks_outside: bool

    def _examined(self, record, split: str) -> str | None:
        """None if the split does not examine the record, else "excluded" or "check"."""
        if split == "test":
            return "check"
        image_path = record.get("image") if isinstance(record, dict) else None
        if isinstance(image_path, str):
            if in_validation(image_path, self.validation_fraction) != (split == "validation"):
                return None
            return "excluded" if self.exclusions.matches(image_path) else "check"
        return None if split == "validation" else "check"  # no path to hash: reported in train

    def count(self, json_files: list[epath.Path], splits: tuple[str, ...]) -> dict[str, int]:
        """{split: records it examines, as a progress total; and, as `validation_kept`, the
        validation records not excluded}. Reads every file once."""
        counts = dict.fromkeys(splits + ("validation_kept",), 0)
        for json_file in json_files:
            try:
                _, records, _ = self._file_records(epath.Path(json_file))
            except BadRecord:  # one file-level outcome, in every split but validation
                for split in splits:
                    counts[split] += split != "validation"
                continue
            for record in records:
                for split in splits:
                    examined = self._examined(record, split)
                    counts[split] += examined is not None
                    if split == "validation" and examined == "check":
                        counts["validation_kept"] += 1
        return counts

    def outcomes(self, json_file: epath.Path, split: str, file_pos: int = 0
                 ) -> Iterator[Outcome]:
        """The outcomes of one annotation file's records for `split`, in record order."""
        json_file = epath.Path(json_file)
        rel_json = os.fspath(json_file.relative_to(self.root))
        try:
            folder, records, lossy = self._file_records(json_file)
        except BadRecord as e:
            if split != "validation":  # the file's records would mostly have been train
                yield Outcome(rel_json, None, "bad", file_pos, e.kind, str(e))
            return
        for index, record in enumerate(records):
            examined = self._examined(record, split)
            if examined is None:
                continue
            outcome = Outcome(rel_json, index, examined, file_pos, key=f"{rel_json}:{index}")
            if examined == "check":
                try:
                    self._check(outcome, folder, json_file.stem, record, lossy)
                except BadRecord as e:
                    outcome.to_bad(e.kind, str(e))
                except Exception as e:  # a surprise in one record must not end a long build
                    outcome.to_bad("unexpected_error", f"{type(e).__name__}: {e}")
            yield outcome

    def _file_records(self, json_file: epath.Path) -> tuple[str, list, bool]:
        """(task folder, records, lossy) of an annotation file, or a file-level BadRecord."""
        folder = json_file.relative_to(self.root / "data" / "json").parts[0].lower()
        if folder != RSVG_FOLDER and folder not in TASK_BY_JSON_FOLDER:
            raise BadRecord("unknown_task_folder",
                            f"data/json/{folder} is no task folder (known: "
                            f"{sorted(TASK_BY_JSON_FOLDER) + [RSVG_FOLDER]})")
        records, lossy = load_records(json_file)
        return folder, records, lossy

    def _check(self, outcome: Outcome, folder: str, json_stem: str, record, lossy: bool
               ) -> None:
        """Every rule but the image's; fills the example's other features and the repairs."""
        if not isinstance(record, dict):
            raise BadRecord("not_an_object", "record is not an object")
        image_path = record.get("image")
        if not isinstance(image_path, str) or not image_path.strip():
            raise BadRecord("no_image_path", "record has no image path")
        conversations = record.get("conversations")
        rec.check_conversations(conversations)
        if lossy:
            rec.check_text_decoded(record)
        path = rec.resolve_image_path(self.root, image_path,
                                      follow_symlinks_outside=self.follow_symlinks_outside)
        source, repairs = rec.source_of(image_path, json_stem)
        task = (rec.rsvg_task(conversations[0]["value"]) if folder == RSVG_FOLDER
                else TASK_BY_JSON_FOLDER[folder])
        boxes = rec.record_boxes(task, conversations)
        outcome.status = "image"
        outcome.image = (os.fspath(path), image_path)
        outcome.repairs = repairs + boxes.repairs
        outcome.example = {
            "image_path": image_path,
            "sensor": sensor_for_source(source),
            "source": source,
            "task": task,
            "conversations": [{"from": t["from"], "value": t["value"]} for t in conversations],
            **boxes.arrays(),
            "independent": task == "vqa",
        }
