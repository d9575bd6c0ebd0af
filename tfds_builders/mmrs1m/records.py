"""One MMRS-1M JSON record checked, with the rule for every defect: skip it or repair it.

Each check raises `BadRecord(kind, message)` for a record that is skipped; repairs are returned
as (kind, message) pairs and counted in the report. Strings are never rewritten: the example
keeps the release's human/gpt text byte for byte; repairs touch only derived fields (`boxes`,
`source`).

Rules (kind in brackets):
- not an object [not_an_object], no `image` string [no_image_path], `conversations` absent or
  empty [no_conversations]; a turn that is not `human` at even and `gpt` at odd positions, an
  odd number of turns, or a turn without a string value [bad_turns]: skipped, because the chat
  template and the loss mask need question/answer pairs.
- text that was not valid UTF-8 in the file (read with replacement characters) [not_utf8]:
  the record is skipped; the file's other records are kept.
- image path absolute, with `..`, or resolving (through a symlink) outside the release root
  [path_outside_release]; a path not under `data/` [bad_image_path]: skipped. A path of only
  `data/<task>/<file>` has no source folder; its source is taken from the annotation file's
  name [repair: source_from_json_name].
- RSVG prompt that is neither grounding nor region captioning [unknown_rsvg_prompt]: skipped.
- Boxes, read from the text with `earthgpt_jax.data.boxes` (answers for grounding and
  detection, the question for region captioning):
  - boxes are 4 numbers (horizontal), 8 (an oriented box's corners) or 5 (centre, size,
    angle), the forms `boxes.py` reads; an oriented box keeps its corners (`box_corners`) and
    its enclosing horizontal box (`boxes`). The text of MMRS-1M's oriented sources (HRSID_OBB,
    DOTA) is unknown until the release is read, so the first build's report shows it:
  - a box that is not 4, 5 or 8 comma-separated numbers [box_malformed] (its text quoted), a
    grounding or region caption turn without a box [box_missing], a box with x1 < x0 or y1 < y0
    [box_corners_swapped], a box lying wholly outside [0, 1] [box_outside_image]: skipped,
    since the text that would be trained on states a wrong box, and the text is not rewritten.
  - a box overlapping [0, 1] but reaching past it [repair: box_clipped]: kept and clipped in
    `boxes`. Rounding to two decimals and annotations that touch the border produce these, and
    the text's box still names the right region.
  - zero-width or zero-height boxes (two-decimal rounding of tiny objects) are valid.
  - a detection group `<p>N class</p>[...]` whose N differs from its number of boxes
    [detection_count_mismatch], or boxes outside any `<p>` group [detection_unparsable]:
    skipped, since the text would teach a wrong count. An answer with no `<p>` group and no
    bracket is a valid "no objects" answer with zero boxes: the empty scene is kept (its false
    positives are scored). One whose wording the scorer would not read as "no objects"
    (`boxes.says_no_objects`; ours is `boxes.NO_OBJECTS_ANSWER`) is kept and noted with its
    text [repair: no_objects_wording], so the first build shows how the release says it.
"""

from __future__ import annotations

import os
import re

import numpy as np
from etils import epath

from earthgpt_jax.data.boxes import (enclosing_box, parse_detection, parse_shapes,
                                     rotated_corners, says_no_objects)
from tfds_builders.mmrs1m.report import BadRecord

GROUNDING_MARK = "bounding box coordinate"
REGION_CAPTION_MARK = "short description"
_GROUNDING_PHRASE = re.compile(r"described as\s*:\s*(.*?)\s+in this remote sensing image",
                               re.DOTALL)
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*")

Repairs = list[tuple[str, str]]


def check_conversations(conversations) -> None:
    if not isinstance(conversations, list) or not conversations:
        raise BadRecord("no_conversations", "conversations missing or empty")
    if len(conversations) % 2:
        raise BadRecord("bad_turns", f"odd number of turns ({len(conversations)})")
    for k, turn in enumerate(conversations):
        want = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want:
            got = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
            raise BadRecord("bad_turns", f"turn {k} is not from {want!r} (got {got!r})")
        if not isinstance(turn.get("value"), str):
            raise BadRecord("bad_turns", f"turn {k} has no text value")


def check_text_decoded(record: dict) -> None:
    """After a lossy read of a non-UTF-8 file: refuse records holding a replacement char."""
    texts = [record.get("image")] + [t.get("value") for t in record["conversations"]]
    for text in texts:
        if isinstance(text, str) and "\ufffd" in text:
            raise BadRecord("not_utf8", f"text is not valid UTF-8 in the file: {text[:60]!r}")


def resolve_image_path(root: epath.Path, image_path: str, *,
                       follow_symlinks_outside: bool = False) -> epath.Path:
    """The image file of a record, refusing paths that leave the release root."""
    if (image_path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", image_path)
            or "://" in image_path):
        raise BadRecord("path_outside_release", f"image path is absolute: {image_path}")
    parts = image_path.replace("\\", "/").split("/")
    if ".." in parts:
        raise BadRecord("path_outside_release", f"image path leaves the release: {image_path}")
    if len(parts) < 3 or parts[0] != "data":
        raise BadRecord("bad_image_path", f"image path is not data/<task>/...: {image_path!r}")
    path = root / image_path
    root_str = os.fspath(root)
    if not follow_symlinks_outside and "://" not in root_str:  # object stores have no links
        real_root = os.path.realpath(root_str)
        real = os.path.realpath(os.fspath(path))
        if os.path.commonpath([real_root, real]) != real_root:
            raise BadRecord("path_outside_release",
                            f"image path {image_path} resolves to {real}, outside the release "
                            f"root {real_root} (a symlink; pass follow_symlinks_outside=True to "
                            "allow linked image folders)")
    return path


def source_of(image_path: str, json_stem: str) -> tuple[str, Repairs]:
    """`data/<task>/<SOURCE>/...` -> SOURCE; `data/<task>/<file>` -> the annotation file stem."""
    parts = image_path.split("/")
    if len(parts) >= 4:
        return parts[2], []
    return json_stem, [("source_from_json_name",
                        f"{image_path} has no source folder; source {json_stem!r} taken from "
                        "its annotation file")]


def rsvg_task(first_question: str) -> str:
    if GROUNDING_MARK in first_question:
        return "grounding"
    if REGION_CAPTION_MARK in first_question:
        return "region_captioning"
    raise BadRecord("unknown_rsvg_prompt",
                    f"RSVG prompt is neither grounding nor region captioning: "
                    f"{first_question[:80]!r}")


# --------------------------------------------------------------------------------------------
# Boxes


class RecordBoxes:
    """The boxes a record's text states: [N, 4] float32, the turn of each, a label for each."""

    def __init__(self):
        self.boxes: list[tuple[float, float, float, float]] = []
        self.corners: list[tuple[float, ...]] = []
        self.turns: list[int] = []
        self.labels: list[str] = []
        self.repairs: Repairs = []

    def arrays(self) -> dict:
        return {"boxes": np.asarray(self.boxes, np.float32).reshape(-1, 4),
                "box_corners": np.asarray(self.corners, np.float32).reshape(-1, 8),
                "box_turns": np.asarray(self.turns, np.int32),
                "box_labels": list(self.labels)}

    def _add(self, raw: list[tuple[float, ...]], parsed: list[tuple[float, ...]],
             corners: list[tuple[float, ...]], turn: int, labels: list[str]) -> None:
        """`raw` from the strict scan decides the rules; `parsed` (boxes.py) gives the values
        (enclosing horizontal boxes) and `corners` each box's four corners."""
        if not len(raw) == len(parsed) == len(corners):
            raise BadRecord("box_malformed", f"turn {turn}: boxes could not all be read")
        for box, value, corner, label in zip(raw, parsed, corners, labels):
            x0, y0, x1, y1 = box
            if x1 < x0 or y1 < y0:
                raise BadRecord("box_corners_swapped",
                                f"turn {turn}: box {list(box)} has x1 < x0 or y1 < y0")
            if x0 > 1 or y0 > 1 or x1 < 0 or y1 < 0:
                raise BadRecord("box_outside_image",
                                f"turn {turn}: box {list(box)} lies outside [0, 1]")
            if min(box) < 0 or max(box) > 1:
                self.repairs.append(("box_clipped",
                                     f"turn {turn}: box {list(box)} clipped to [0, 1]"))
            self.boxes.append(tuple(float(v) for v in value))
            self.corners.append(tuple(float(v) for v in corner))
            self.turns.append(turn)
            self.labels.append(label)


def _strict_boxes(text: str, turn: int) -> list[tuple[float, ...]]:
    """Every `[...]` in `text`: `;`-separated chunks of exactly 4, 5 or 8 numbers, nothing
    repaired; an oriented box (5 or 8) as its enclosing horizontal box, for the rules."""
    found = []
    for body in _BRACKET.findall(text):
        for chunk in body.split(";"):
            if not chunk.strip():
                continue
            fields = chunk.split(",")
            if len(fields) not in (4, 5, 8) or not all(_NUMBER.fullmatch(f) for f in fields):
                raise BadRecord("box_malformed", f"turn {turn}: box {chunk.strip()!r} is not "
                                                 "4, 5 (centre, size, angle) or 8 (corners) "
                                                 "numbers")
            values = [float(f) for f in fields]
            found.append(tuple(values) if len(values) == 4 else enclosing_box(
                values if len(values) == 8 else rotated_corners(*values)))
    return found


def _single_region_boxes(out: RecordBoxes, text: str, turn: int, label: str) -> None:
    raw = _strict_boxes(text, turn)
    if not raw:
        raise BadRecord("box_missing", f"turn {turn} has no [x0,y0,x1,y1] box: {text[:80]!r}")
    shapes = parse_shapes(text)
    out._add(raw, shapes.boxes, shapes.corners, turn, [label] * len(raw))


def _detection_boxes(out: RecordBoxes, text: str, turn: int) -> None:
    raw = _strict_boxes(text, turn)
    groups, _ = parse_detection(text)
    if not groups:
        if raw or "<p>" in text:
            raise BadRecord("detection_unparsable",
                            f"turn {turn}: no '<p>N class</p>[...]' group in {text[:80]!r}")
        if not says_no_objects(text):
            out.repairs.append(("no_objects_wording", f"turn {turn}: empty detection answer "
                                                      f"without 'no objects': {text[:80]!r}"))
        return  # a "no objects" answer
    parsed, labels = [], []
    for label, count, boxes in groups:
        if count != len(boxes):
            raise BadRecord("detection_count_mismatch",
                            f"turn {turn}: '<p>{count} {label}' but {len(boxes)} boxes")
        parsed += boxes
        labels += [label] * len(boxes)
    corners = [c for _, _, cs in parse_detection(text, corners=True)[0] for c in cs]
    if len(parsed) != len(raw):
        raise BadRecord("detection_unparsable",
                        f"turn {turn}: {len(raw)} boxes in the text, {len(parsed)} inside "
                        "'<p>' groups")
    out._add(raw, parsed, corners, turn, labels)


def record_boxes(task: str, conversations: list[dict]) -> RecordBoxes:
    """Boxes of every turn pair; none for classification, captioning and VQA."""
    out = RecordBoxes()
    if task not in ("grounding", "region_captioning", "detection"):
        return out
    for k in range(0, len(conversations), 2):
        question, answer = conversations[k]["value"], conversations[k + 1]["value"]
        if task == "detection":
            _detection_boxes(out, answer, k + 1)
        elif REGION_CAPTION_MARK in question:  # box in the question, phrase in the answer
            _single_region_boxes(out, question, k, answer.strip())
        elif GROUNDING_MARK in question:  # phrase in the question, box in the answer
            match = _GROUNDING_PHRASE.search(question)
            _single_region_boxes(out, answer, k + 1, match.group(1) if match else "")
        else:
            raise BadRecord("unknown_rsvg_prompt",
                            f"turn {k}: RSVG prompt is neither grounding nor region captioning")
    return out
