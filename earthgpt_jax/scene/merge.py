"""Boxes from overlapping tiles -> one box per object on the scene grid.

An object in the overlap of two tiles is answered twice: whole in one tile, and whole or cut
by the border in the other. The answers carry no confidence, so the box to keep is the one
seen farthest from the border of its tile (`margin`), the least likely to be cut; a box is
dropped when a kept box of the same class overlaps it by `iou` or holds `contain` of it (a cut
copy lies inside the whole one, with a small IoU). Oriented boxes are compared by their
enclosing horizontal boxes and keep their corners. An object larger than the overlap can be
cut in every tile that sees it: choose the overlap above the largest object.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from earthgpt_jax.data.boxes import enclosing_box
from earthgpt_jax.scene.raster import Tile


@dataclasses.dataclass
class Detection:
    corners: tuple[float, ...]  # x1,y1,...,x4,y4 in scene pixels
    label: str | None
    tile: int
    answer: str
    margin: float = math.inf  # distance to the nearest border its tile shares with another

    @property
    def box(self) -> tuple[float, float, float, float]:
        return enclosing_box(self.corners)


def margin(box, tile: Tile, width: int, height: int) -> float:
    """How far inside its tile a box lies, counting only tile borders inside the scene (a
    scene border cuts nothing that another tile would see whole)."""
    x0, y0, x1, y1 = box
    right, bottom = tile.col + tile.width, tile.row + tile.height
    gaps = [gap for gap, shared in ((x0 - tile.col, tile.col > 0), (right - x1, right < width),
                                    (y0 - tile.row, tile.row > 0), (bottom - y1, bottom < height))
            if shared]
    return min(gaps, default=math.inf)


def merge(detections: list[Detection], iou: float = 0.5, contain: float = 0.8
          ) -> list[Detection]:
    """Greedy NMS by margin (ties: tile order), per class; see the module docstring."""
    order = sorted(range(len(detections)), key=lambda i: (-detections[i].margin,
                                                          detections[i].tile))
    kept: list[int] = []
    boxes = np.array([d.box for d in detections], np.float64).reshape(-1, 4)
    areas = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    for i in order:
        same = [k for k in kept if detections[k].label == detections[i].label]
        if same:
            other = boxes[same]
            w = np.minimum(other[:, 2], boxes[i, 2]) - np.maximum(other[:, 0], boxes[i, 0])
            h = np.minimum(other[:, 3], boxes[i, 3]) - np.maximum(other[:, 1], boxes[i, 1])
            inter = np.maximum(w, 0) * np.maximum(h, 0)
            union = areas[same] + areas[i] - inter
            smaller = np.minimum(areas[same], areas[i])
            if (inter > iou * np.maximum(union, 1e-9)).any() or \
                    (inter > contain * np.maximum(smaller, 1e-9)).any():
                continue
        kept.append(i)
    return [detections[i] for i in sorted(kept)]
