"""Boxes as MMRS-1M writes them in text, and the way back to pixels.

MMRS-1M (README of the release) normalises a horizontal box by first centre-padding the image to
a square, then dividing by the square's side. Answers hold `[x0,y0,x1,y1]` with two decimals,
several boxes `;`-separated inside one pair of brackets, and detection answers group the boxes of
one class behind `<p>N class</p>`. This module owns all of that: formatting, tolerant parsing,
and the inverse of the padding transform.

An image with no objects is answered `NO_OBJECTS_ANSWER` ("There are no objects."): the release's
format has no group for "none", and an empty scene is where a detector's false positives show,
so the generator, the evaluation builders and the scorer all write and read this one sentence.
The parser also reads any answer without a `<p>` group or a box that says "no object(s)" as an
empty detection (MMRS-1M keeps its own wording byte for byte).

Oriented boxes (DOTA, HRSC2016, MMRS-1M's `HRSID_OBB`) are written as their four corners
`[x1,y1,x2,y2,x3,y3,x4,y4]` in the same frame, brackets, `;` and `<p>` groups, two decimals,
corners in the annotation's order. The parser also reads centre, size and angle
`[cx,cy,w,h,a]` (a in degrees, turning the width axis from +x towards +y: clockwise on the
screen) and turns it into corners. Every box keeps both forms: its corners (a horizontal box's
are its rectangle's) and its enclosing horizontal box. A chunk of any other number of values is
a bad box, its text kept (`Shapes.bad`) for the reports.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

Box = tuple[float, float, float, float]
Quad = tuple[float, float, float, float, float, float, float, float]  # x1,y1,...,x4,y4

GROUNDING_PROMPT = (
    "Please provide the horizontal bounding box coordinate of the region which is described "
    "as:{phrase} in this remote sensing image")
REGION_CAPTION_PROMPT = (
    "Please provide a short description for this region in this remote sensing image :{box}")
DETECTION_PROMPT = "Please detect all objects in this image."
NO_OBJECTS_ANSWER = "There are no objects."
_SAYS_NO_OBJECTS = re.compile(r"\bno\s+objects?\b", re.IGNORECASE)

_IRREGULAR_PLURALS = {"person": "people", "bus": "buses", "storage tank": "storage tanks"}
_IRREGULAR_SINGULARS = {v: k for k, v in _IRREGULAR_PLURALS.items()}


def pad_offsets(width: int, height: int) -> tuple[int, int, int]:
    """(pad_x, pad_y, side) of the release's centre pad: the short side is padded, floor'd."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width} height={height}")
    if height > width:
        return int((height - width) / 2), 0, height
    return 0, int((width - height) / 2), width


def pixel_to_norm(coords: Sequence[float], width: int, height: int) -> tuple[float, ...]:
    """Pixel [x0,y0,x1,y1] (or corners x1,y1,...,x4,y4) of the original image -> [0,1]
    coordinates of the padded square. Boxes and corners alternate x and y alike, so one
    transform serves every shape."""
    pad_x, pad_y, side = pad_offsets(width, height)
    return tuple((v + (pad_x if k % 2 == 0 else pad_y)) / side for k, v in enumerate(coords))


def norm_to_pixel(coords: Sequence[float], width: int, height: int) -> tuple[float, ...]:
    """Inverse of `pixel_to_norm`: padded-square [0,1] coordinates -> original-image pixels."""
    pad_x, pad_y, side = pad_offsets(width, height)
    return tuple(v * side - (pad_x if k % 2 == 0 else pad_y) for k, v in enumerate(coords))


def rotated_corners(cx: float, cy: float, w: float, h: float, angle_deg: float) -> Quad:
    """Corners of a w x h rectangle centred at (cx, cy), its width axis turned `angle_deg`
    from +x towards +y (y points down: clockwise on the screen), in order around it."""
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    out = []
    for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
        out += [cx + c * dx - s * dy, cy + s * dx + c * dy]
    return tuple(out)


def box_corners(box: Sequence[float]) -> Quad:
    """The corners of a horizontal box, clockwise from the top left."""
    x0, y0, x1, y1 = box
    return (x0, y0, x1, y0, x1, y1, x0, y1)


def enclosing_box(quad: Sequence[float]) -> Box:
    """The horizontal box enclosing a quadrilateral."""
    xs, ys = quad[0::2], quad[1::2]
    return (min(xs), min(ys), max(xs), max(ys))


def is_oriented(quad: Sequence[float]) -> bool:
    """Corners that are not their enclosing horizontal box's rectangle."""
    return tuple(quad) != box_corners(enclosing_box(quad))


def drawn_shape(quad: Sequence[float]) -> tuple[float, ...]:
    """What to draw for a box read as corners: an oriented box's corners, else [x0,y0,x1,y1]."""
    return tuple(quad) if is_oriented(quad) else enclosing_box(quad)


def boxes_to_text(boxes: Sequence[Sequence[float]]) -> str:
    """`[x0,y0,x1,y1;...]` with two decimals and no spaces, as in the release."""
    if not boxes:
        raise ValueError("boxes_to_text needs at least one box")
    return "[" + ";".join(",".join(f"{v:.2f}" for v in box) for box in boxes) + "]"


def plural(name: str) -> str:
    return _IRREGULAR_PLURALS.get(name, name + ("es" if name.endswith(("s", "x", "ch", "sh"))
                                                else "s"))


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
    """`There are <p>3 ships</p>[...]`, one `<p>` group per class, classes joined by ` and `;
    `NO_OBJECTS_ANSWER` for no groups (an empty scene)."""
    if not groups:
        return NO_OBJECTS_ANSWER
    parts = [f"<p>{len(boxes)} {name if len(boxes) == 1 else plural(name)}</p>"
             f"{boxes_to_text(boxes)}" for name, boxes in groups]
    verb = "is" if len(groups[0][1]) == 1 else "are"
    return f"There {verb} " + " and ".join(parts)


_NUMBER = re.compile(r"-?\d+(?:\.\d*)?|-?\.\d+")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]?")


@dataclasses.dataclass
class Shapes:
    """Boxes read from text: enclosing horizontal boxes, the corners of each (a horizontal
    box's rectangle for 4-value chunks), the malformed count and the bad chunks' text."""
    boxes: list[Box] = dataclasses.field(default_factory=list)
    corners: list[Quad] = dataclasses.field(default_factory=list)
    malformed: int = 0
    bad: list[str] = dataclasses.field(default_factory=list)

    def extend(self, other: "Shapes") -> None:
        self.boxes += other.boxes
        self.corners += other.corners
        self.malformed += other.malformed
        self.bad += other.bad


def _clip(values: list[float]) -> list[float]:
    return [min(max(v, 0.0), 1.0) for v in values]


def _parse_box_list(body: str) -> Shapes:
    """Boxes from the inside of one bracket: chunks of 4 (horizontal), 8 (corners) or 5 (centre,
    size, angle) numbers; every repair or dropped chunk counts as malformed."""
    out = Shapes()
    for chunk in body.split(";"):
        if not chunk.strip():
            continue
        values = [float(v) for v in _NUMBER.findall(chunk)]
        if len(values) in (5, 8):
            quad = rotated_corners(*values) if len(values) == 5 else tuple(values)
            clipped = tuple(_clip(list(quad)))
            out.malformed += clipped != quad
            out.boxes.append(enclosing_box(clipped))
            out.corners.append(clipped)
            continue
        if len(values) != 4:
            out.malformed += 1
            out.bad.append(chunk.strip())
            if len(values) < 4:
                continue
            values = values[:4]
        clipped = _clip(values)
        if clipped != values:
            out.malformed += 1
        x0, y0, x1, y1 = clipped
        # A box written corner-swapped still names a region; keep it but count it.
        if x1 < x0 or y1 < y0:
            out.malformed += 1
            x0, x1 = sorted((x0, x1))
            y0, y1 = sorted((y0, y1))
        out.boxes.append((x0, y0, x1, y1))
        out.corners.append(box_corners((x0, y0, x1, y1)))
    return out


def parse_shapes(text: str) -> Shapes:
    """All boxes in free text, tolerant of spaces and missing brackets: horizontal, corners
    or centre/size/angle (module docstring). `malformed` counts every repair or dropped
    chunk: a chunk of another number of values (its text in `bad`), values outside [0,1]
    (clipped), swapped corners (sorted). Text without brackets is read as one bracket's body."""
    bodies = [m.group(1) for m in _BRACKETED.finditer(text)]
    if not bodies:
        if not _NUMBER.search(text):
            return Shapes(malformed=1 if text.strip() else 0)
        bodies = [text]
    out = Shapes()
    for body in bodies:
        out.extend(_parse_box_list(body))
    return out


def parse_boxes(text: str) -> tuple[list[Box], int]:
    """(enclosing horizontal boxes, malformed count) of `parse_shapes`."""
    shapes = parse_shapes(text)
    return shapes.boxes, shapes.malformed


_DETECTION_GROUP = re.compile(r"<p>\s*(\d+)\s+([^<]*?)\s*</p>\s*(\[[^\[\]]*\]?)?")


def says_no_objects(text: str) -> bool:
    """An answer that states an empty scene: no `<p>` group, no bracket, "no object(s)"."""
    return ("<p>" not in text and "[" not in text
            and _SAYS_NO_OBJECTS.search(text) is not None)


def parse_detection(text: str, corners: bool = False
                    ) -> tuple[list[tuple[str, int, list]], int]:
    """`<p>N class</p>[boxes]` groups -> [(singular class, N, boxes)], malformed count; the
    boxes are enclosing horizontal boxes, or with `corners` every box's four corners (for
    rotated IoU). A group whose count disagrees with its number of boxes is kept (the boxes are
    what is scored) but counted as malformed, as is a group without boxes. A "no objects"
    answer (`says_no_objects`) is an empty detection, not malformed."""
    groups = []
    malformed = 0
    for match in _DETECTION_GROUP.finditer(text):
        count, label, bracket = int(match.group(1)), match.group(2), match.group(3)
        shapes = _parse_box_list(bracket.strip("[]")) if bracket else Shapes(malformed=1)
        boxes = shapes.corners if corners else shapes.boxes
        malformed += shapes.malformed + (len(boxes) != count)
        groups.append((singular(label), count, boxes))
    if not groups and text.strip() and not says_no_objects(text):
        malformed += 1
    return groups, malformed
