"""Boxes as MMRS-1M writes them in text, and the way back to pixels.

MMRS-1M (README of the release) normalises a horizontal box by first centre-padding the image to
a square, then dividing by the square's side. Answers hold `[x0,y0,x1,y1]` with two decimals,
several boxes `;`-separated inside one pair of brackets, and detection answers group the boxes of
one class behind `<p>N class</p>`. This module owns all of that: formatting, tolerant parsing,
and the inverse of the padding transform.
"""

from __future__ import annotations

import re
from typing import Sequence

Box = tuple[float, float, float, float]

GROUNDING_PROMPT = (
    "Please provide the horizontal bounding box coordinate of the region which is described "
    "as:{phrase} in this remote sensing image")
REGION_CAPTION_PROMPT = (
    "Please provide a short description for this region in this remote sensing image :{box}")
DETECTION_PROMPT = "Please detect all objects in this image."

_IRREGULAR_PLURALS = {"person": "people", "bus": "buses", "storage tank": "storage tanks"}
_IRREGULAR_SINGULARS = {v: k for k, v in _IRREGULAR_PLURALS.items()}


def pad_offsets(width: int, height: int) -> tuple[int, int, int]:
    """(pad_x, pad_y, side) of the release's centre pad: the short side is padded, floor'd."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width} height={height}")
    if height > width:
        return int((height - width) / 2), 0, height
    return 0, int((width - height) / 2), width


def pixel_to_norm(box_xyxy: Sequence[float], width: int, height: int) -> Box:
    """Pixel [x0,y0,x1,y1] of the original image -> [0,1] coordinates of the padded square."""
    pad_x, pad_y, side = pad_offsets(width, height)
    x0, y0, x1, y1 = box_xyxy
    return ((x0 + pad_x) / side, (y0 + pad_y) / side, (x1 + pad_x) / side, (y1 + pad_y) / side)


def norm_to_pixel(box: Sequence[float], width: int, height: int) -> Box:
    """Inverse of `pixel_to_norm`: padded-square [0,1] coordinates -> original-image pixels."""
    pad_x, pad_y, side = pad_offsets(width, height)
    x0, y0, x1, y1 = box
    return (x0 * side - pad_x, y0 * side - pad_y, x1 * side - pad_x, y1 * side - pad_y)


def _fmt(value: float) -> str:
    return f"{value:.2f}"


def boxes_to_text(boxes: Sequence[Sequence[float]]) -> str:
    """`[x0,y0,x1,y1;...]` with two decimals and no spaces, as in the release."""
    if not boxes:
        raise ValueError("boxes_to_text needs at least one box")
    return "[" + ";".join(",".join(_fmt(v) for v in box) for box in boxes) + "]"


def plural(name: str) -> str:
    if name in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[name]
    if name.endswith(("s", "x", "ch", "sh")):
        return name + "es"
    return name + "s"


def singular(name: str) -> str:
    name = name.strip().lower()
    if name in _IRREGULAR_SINGULARS:
        return _IRREGULAR_SINGULARS[name]
    if name.endswith(("ses", "xes", "ches", "shes")):
        return name[:-2]
    if name.endswith("s") and not name.endswith(("ss", "us", "is")):
        return name[:-1]
    return name


def detection_to_text(groups: Sequence[tuple[str, Sequence[Sequence[float]]]]) -> str:
    """`There are <p>3 ships</p>[...]`, one `<p>` group per class, classes joined by ` and `."""
    if not groups:
        raise ValueError("detection_to_text needs at least one (class, boxes) group")
    parts = []
    for name, boxes in groups:
        count = len(boxes)
        label = name if count == 1 else plural(name)
        parts.append(f"<p>{count} {label}</p>{boxes_to_text(boxes)}")
    verb = "is" if len(groups[0][1]) == 1 else "are"
    return f"There {verb} " + " and ".join(parts)


_NUMBER = re.compile(r"-?\d+(?:\.\d*)?|-?\.\d+")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]?")


def _parse_box_list(body: str) -> tuple[list[Box], int]:
    """Boxes from the inside of one bracket; each chunk that is not 4 numbers in [0,1] counts."""
    boxes: list[Box] = []
    malformed = 0
    for chunk in body.split(";"):
        if not chunk.strip():
            continue
        values = [float(v) for v in _NUMBER.findall(chunk)]
        if len(values) != 4:
            malformed += 1
            if len(values) < 4:
                continue
            values = values[:4]
        clipped = [min(max(v, 0.0), 1.0) for v in values]
        if clipped != values:
            malformed += 1
        x0, y0, x1, y1 = clipped
        # A box written corner-swapped still names a region; keep it but count it.
        if x1 < x0 or y1 < y0:
            malformed += 1
            x0, x1 = sorted((x0, x1))
            y0, y1 = sorted((y0, y1))
        boxes.append((x0, y0, x1, y1))
    return boxes, malformed


def parse_boxes(text: str) -> tuple[list[Box], int]:
    """All boxes in free text, tolerant of spaces and missing brackets.

    Returns (boxes, malformed) where `malformed` counts every repair or dropped chunk: a chunk
    with other than four numbers, values outside [0,1] (clipped), swapped corners (sorted).
    Text without brackets is read as one bracket's body.
    """
    bodies = [m.group(1) for m in _BRACKETED.finditer(text)]
    if not bodies:
        if not _NUMBER.search(text):
            return [], 1 if text.strip() else 0
        bodies = [text]
    boxes: list[Box] = []
    malformed = 0
    for body in bodies:
        found, bad = _parse_box_list(body)
        boxes.extend(found)
        malformed += bad
    return boxes, malformed


_DETECTION_GROUP = re.compile(r"<p>\s*(\d+)\s+([^<]*?)\s*</p>\s*(\[[^\[\]]*\]?)?")


def parse_detection(text: str) -> tuple[list[tuple[str, int, list[Box]]], int]:
    """`<p>N class</p>[boxes]` groups -> [(singular class, N, boxes)], malformed count.

    A group whose count disagrees with its number of boxes is kept (the boxes are what is
    scored) but counted as malformed, as is a group without boxes.
    """
    groups = []
    malformed = 0
    for match in _DETECTION_GROUP.finditer(text):
        count, label, bracket = int(match.group(1)), match.group(2), match.group(3)
        boxes, bad = _parse_box_list(bracket.strip("[]")) if bracket else ([], 1)
        malformed += bad
        if len(boxes) != count:
            malformed += 1
        groups.append((singular(label), count, boxes))
    if not groups and text.strip():
        malformed += 1
    return groups, malformed
