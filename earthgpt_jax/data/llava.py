"""Instruction data in the LLaVA/ShareGPT form: the `llava:JSON[:IMAGE_ROOT][:WEIGHT]` source.

The form GeoChat-Instruct, VHM, SkySenseGPT's FIT-RS and LLaVA itself ship: a JSON list (or
JSONL, one record a line) of

    {"id": "...", "image": "relative/path.png",
     "conversations": [{"from": "human", "value": "<image>\\n[refer] Where is the tank?"},
                       {"from": "gpt", "value": "[0.12,0.30,0.25,0.41]"}, ...]}

- Images: `image` is relative to IMAGE_ROOT (default: the JSON's folder). When that file does
  not exist, a file of the same name anywhere under the root is used if exactly one has it
  (GeoChat's records name bare files that its archive keeps in subfolders); the root's files
  are listed once, on the first such miss. Symlinks inside the root are followed: the root is
  the user's own folder. A record without `image` (absent, null or "") is a text-only sample:
  the model always reads one image before the text (`models/earthgpt.py`), so it gets a black
  image, the padding colour of `pad_to_square`, as LLaVA feeds zeros for its text-only data.
- Text is kept verbatim, task prompts included (GeoChat's `[refer]`, `[grounding]`,
  `[identify]` are learnt as written), except `<image>`: our template always puts the image
  before the first turn (README, "Chat template"), so the marker and one newline beside it are
  removed. The record's `task` is metadata only: `[refer]`/`[grounding]` -> grounding,
  `[identify]` -> region_captioning, else read from the boxes (`<p>N class</p>[...]` groups ->
  detection, a box in an answer -> grounding, in a question -> region_captioning), else
  `instruction` (`text` without an image).
- Boxes in our text form (`earthgpt_jax/data/boxes.py`: `[x0,y0,x1,y1]` in [0, 1] of the
  centre-padded square, `;` between boxes, 5 or 8 numbers for oriented ones) give the record
  the `boxes`, `box_corners`, `box_turns` and `box_labels` fields of `mmrs1m` records, checked by
  the same rules (`tfds_builders/mmrs1m/records.py`). A bracket holding only numbers and at
  least one comma is a box; other brackets (`[refer]`, `[A]`, `[2020]`) are text. Labels: the
  class of a `<p>N class</p>` group, the answer for a box written in a question, else "".
  GeoChat's own boxes (`{<x1><y1><x2><y2>|θ}` on a 0-100 grid) are not our form: they stay
  text and give no `boxes`.

Bad records are skipped and counted (`sources.BadSampleLog`, `WORKDIR/data_report_llava.json`,
the offending text quoted), with the `mmrs1m` builder's reasons: unreadable_json (a JSONL line),
not_an_object, bad_image_field, no_conversations, bad_turns (not human/gpt alternating, odd
count, a value that is not a string or is empty; the first question may be only `<image>`),
image_marker (`<image>` after the first turn, twice, or in a record without an image),
path_outside_root (absolute or `..`), missing_image, undecodable_image, box_malformed,
box_corners_swapped, box_outside_image (a box wholly outside [0, 1]: 0-1000 or pixel boxes
land here), detection_count_mismatch, detection_unparsable. A box that only reaches past
[0, 1] is clipped in `boxes` and kept, as `mmrs1m` does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import grain
import numpy as np

from earthgpt_jax.data.images import ImageDecodeError, decode_image
from tfds_builders.mmrs1m import records as mmrs1m_records
from tfds_builders.mmrs1m.report import BadRecord

IMAGE_MARKER = "<image>"
_MARKER = re.compile(r"\n?<image>\n?")
# GeoChat's task prompts -> our task names (metadata; the text keeps the prompt).
TASK_PROMPTS = {"[refer]": "grounding", "[grounding]": "grounding",
                "[identify]": "region_captioning"}
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_BOX_BODY = re.compile(r"[\s\d.,;+-]*,[\s\d.,;+-]*")
_COUNTED_GROUP = re.compile(r"<p>\s*\d+\s+[^<]*</p>\s*\[")
BLANK_IMAGE = np.zeros((1, 1, 3), np.uint8)


class LlavaRecords:
    """Random access over one LLaVA JSON (a list) or JSONL file: item i is the raw sample
    {'key': 'FILE#i', 'text': record i's JSON}. Records are held as their compact JSON text in
    one buffer, so a million-record file costs about its size (not Python dicts) and pickles
    quickly into grain workers; each is parsed and checked at map time (`LlavaToRecord`)."""

    def __init__(self, json_path: str):
        self.path = json_path
        self.name = os.path.basename(json_path)
        try:
            with open(json_path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"llava:{json_path}: cannot read it: {e}") from None
        if data.lstrip()[:1] == b"[":
            try:
                records = json.loads(data)
            except ValueError as e:
                raise ValueError(f"llava:{json_path}: not valid JSON ({e}); write a JSON list "
                                 f"of records, or JSONL (one record a line)") from None
            texts = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode()
                     for r in records]
        else:  # JSONL: each line parsed at map time, so one bad line is one bad record
            texts = [line for line in data.splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"llava:{json_path}: holds no records")
        self._blob = b"".join(texts)
        self._ends = np.cumsum([len(t) for t in texts], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> dict:
        start = int(self._ends[index - 1]) if index else 0
        return {"key": f"{self.name}#{index}", "text": self._blob[start:int(self._ends[index])]}


class ImageFiles:
    """A record's image file under the root (module docstring), refusing paths that leave it."""

    def __init__(self, root: str):
        self.root = root
        self._by_name: dict[str, str | None] | None = None  # file name -> path, None if twice

    def __getstate__(self):  # each grain worker lists the root itself, if it needs to
        return {"root": self.root, "_by_name": None}

    def find(self, image_path: str) -> str:
        parts = image_path.replace("\\", "/").split("/")
        if (os.path.isabs(image_path) or re.match(r"^[A-Za-z]:", image_path)
                or "://" in image_path or ".." in parts):
            raise BadRecord("path_outside_root",
                            f"image path {image_path!r} leaves the image root {self.root}")
        path = os.path.join(self.root, *parts)
        if os.path.isfile(path):
            return path
        if self._by_name is None:
            self._by_name = {}
            for folder, _, files in os.walk(self.root, followlinks=True):
                for name in files:
                    self._by_name[name] = (None if name in self._by_name else
                                           os.path.join(folder, name))
        other = self._by_name.get(parts[-1])
        if other is None:
            twice = parts[-1] in self._by_name
            raise BadRecord("missing_image", f"image {image_path!r} is not under {self.root}"
                            + (f" ({parts[-1]!r} is in several folders there)" if twice else ""))
        return other


def _quote(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _image_field(record: dict) -> str | None:
    image = record.get("image")
    if isinstance(image, list) and len(image) == 1:  # LLaVA-OneVision writes a one-item list
        image = image[0]
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise BadRecord("bad_image_field", f"image is not one path: {_quote(str(image))}")
    return image


def conversation(record: dict, has_image: bool) -> list[dict]:
    """The record's turns, checked, with `<image>` removed from the first question."""
    turns = record.get("conversations")
    mmrs1m_records.check_conversations(turns)
    out = []
    for k, turn in enumerate(turns):
        value = turn["value"]
        marks = value.count(IMAGE_MARKER)
        if marks and (k or marks > 1 or not has_image):
            where = ("in a record without an image" if not has_image else
                     f"{marks} times" if marks > 1 else f"in turn {k}, not the first question")
            raise BadRecord("image_marker", f"{IMAGE_MARKER} {where}: {_quote(value)}")
        if marks:
            value = _MARKER.sub("", value, count=1)
        if not value.strip() and not (k == 0 and marks):
            raise BadRecord("bad_turns", f"turn {k} ({turn['from']}) is empty: {_quote(value)}")
        out.append({"from": turn["from"], "value": value})
    return out


def _box_brackets(text: str) -> str:
    """`text` with every bracket that is no box (`[refer]`, `[A]`) blanked out."""
    return _BRACKET.sub(lambda m: m.group(0) if _BOX_BODY.fullmatch(m.group(1)) else " ", text)


def record_boxes(turns: list[dict]) -> mmrs1m_records.RecordBoxes:
    """The boxes the turns write in our form, by `mmrs1m`'s rules (module docstring)."""
    out = mmrs1m_records.RecordBoxes()
    for k, turn in enumerate(turns):
        text = _box_brackets(turn["value"])
        bodies = _BRACKET.findall(text)
        try:
            if _COUNTED_GROUP.search(text):
                mmrs1m_records._detection_boxes(out, text, k)  # pylint: disable=protected-access
            elif bodies:
                label = turns[k + 1]["value"].strip() if turn["from"] == "human" else ""
                mmrs1m_records._single_region_boxes(  # pylint: disable=protected-access
                    out, " ".join(f"[{b}]" for b in bodies), k, label)
        except BadRecord as e:  # quote the turn as written, not only the numbers read
            raise BadRecord(e.kind, f"{e} in {_quote(turn['value'])}") from None
    return out


def record_task(turns: list[dict], boxes: mmrs1m_records.RecordBoxes, has_image: bool) -> str:
    first = turns[0]["value"]
    for prompt, task in TASK_PROMPTS.items():
        if prompt in first:
            return task
    if any(_COUNTED_GROUP.search(t["value"]) for t in turns):
        return "detection"
    if boxes.turns:
        return "grounding" if any(k % 2 for k in boxes.turns) else "region_captioning"
    return "instruction" if has_image else "text"


@dataclasses.dataclass
class LlavaToRecord(grain.transforms.Map):
    """Raw LLaVA sample -> the record `TrainPreprocess` reads (the fields of `mmrs1m` records,
    `image` decoded), or None when bad (counted in `log`, a `sources.BadSampleLog`)."""
    images: ImageFiles
    source: str   # the JSON's file stem, the records' `source`
    log: object

    def for_process(self, process_index: int) -> "LlavaToRecord":
        return dataclasses.replace(self, log=self.log.for_process(process_index))

    def map(self, raw: dict) -> dict | None:
        try:
            record = self.checked(raw)
        except BadRecord as e:
            self.log.bad_sample(raw["key"], e.kind, str(e))
            return None
        self.log.good_sample()
        return record

    def checked(self, raw: dict) -> dict:
        """The record, or `BadRecord` naming the rule it breaks and quoting its text."""
        try:
            record = json.loads(raw["text"])
        except ValueError as e:
            raise BadRecord("unreadable_json",
                            f"{e}: {_quote(raw['text'].decode('utf-8', 'replace'))}") from None
        if not isinstance(record, dict):
            raise BadRecord("not_an_object", f"record is not an object: {_quote(str(record))}")
        image_path = _image_field(record)
        turns = conversation(record, has_image=image_path is not None)
        boxes = record_boxes(turns)
        if image_path is None:
            pixels, image_path = BLANK_IMAGE, ""
        else:
            path = self.images.find(image_path)
            try:
                with open(path, "rb") as f:
                    pixels = decode_image(f.read(), image_path)
            except OSError as e:
                raise BadRecord("missing_image", str(e)) from None
            except ImageDecodeError as e:
                raise BadRecord("undecodable_image", str(e)) from None
        return {"image": pixels, "image_path": image_path or raw["key"],
                "id": str(record.get("id", "")), "conversations": turns,
                "task": record_task(turns, boxes, bool(image_path)), "source": self.source,
                "sensor": "optical", "width": int(pixels.shape[1]),
                "height": int(pixels.shape[0]), **boxes.arrays(), "independent": False}


def open_records(json_path: str, image_root: str, log) -> tuple[LlavaRecords, LlavaToRecord]:
    """A llava entry's records (the file is read once) and their conversion."""
    records = LlavaRecords(json_path)
    root = image_root or os.path.dirname(json_path)
    logging.info("llava: %d records in %s, images under %s", len(records), json_path, root)
    stem = os.path.splitext(records.name)[0]
    return records, LlavaToRecord(ImageFiles(root), stem, log)
