"""HRSC2016 (Liu et al., ICPRAM 2017) oriented ship detection as detection records, the L1 task
(every object is a ship), as oriented-box detectors report it.

Format, checked against a real annotation (shared/formats/hrsc2016/, from mmrotate's tests):
`FullDataSet/Annotations/<id>.xml` with root `HRSC_Image` (`Img_SizeWidth`, `Img_SizeHeight`,
...) and `HRSC_Objects/HRSC_Object`, each with its horizontal `box_xmin..box_ymax` and its
rotated box `mbox_cx`, `mbox_cy`, `mbox_w`, `mbox_h`, `mbox_ang` (radians, the width axis turned
from +x towards +y, as mmrotate reads it); images `FullDataSet/AllImages/<id>.bmp`; splits
`ImageSets/<split>.txt`, one image id per line (train, val, trainval, test: each present gives
a TFDS split of that name).

One record per listed image: the release's detection prompt; the answer `There are <p>N
ships</p>[...]` writes each rotated box as its four corners (`boxes.py`'s oriented form,
normalised in the centre-padded square; corners are clipped to the image, as rotated boxes of
ships at the border reach past it); `box_corners` holds them, `boxes` their enclosing
horizontal boxes. An image without ships is an empty scene, answered `boxes.NO_OBJECTS_ANSWER`.

Bad input, skipped and counted in `bad_records_<split>.json`: an unreadable XML, an object
whose `mbox_*` values are missing or not numbers (its index and text quoted), a missing or
undecodable image, an id without an annotation file, a box with no area inside the image.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

from etils import epath

from earthgpt_jax.data.boxes import rotated_corners
from tfds_builders import eval_common as ec

SOURCE = "HRSC2016"
SPLITS = ("train", "val", "trainval", "test")
MBOX = ("mbox_cx", "mbox_cy", "mbox_w", "mbox_h", "mbox_ang")


class Hrsc2016(ec.EvalBuilder):
    """HRSC2016 oriented ship detection (L1: ship), answers written as corners."""

    HOMEPAGE = "https://www.kaggle.com/datasets/guofeng/hrsc2016"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download HRSC2016, extract it and pass the folder holding FullDataSet/ (Annotations/, "
        "AllImages/) and ImageSets/ (train.txt, val.txt, trainval.txt, test.txt) as "
        "manual_dir.")

    def _split_generators(self, dl_manager):
        root = ec.find_root(self._manual_dir(dl_manager), ("", "HRSC2016"),
                            "FullDataSet/Annotations", self.name,
                            self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        splits = {split: self._generate_examples(split, _candidates(root, split))
                  for split in SPLITS if (root / f"ImageSets/{split}.txt").is_file()}
        if not splits:
            raise FileNotFoundError(f"{self.name}: no ImageSets/{{{','.join(SPLITS)}}}.txt "
                                    f"under {root}. " + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        return splits


def _candidates(root: epath.Path, split: str):
    for line_no, image_id in enumerate(ec.read_lines(root / f"ImageSets/{split}.txt")):
        rel = f"FullDataSet/Annotations/{image_id}.xml"
        yield ec.Candidate(image_id, rel, None, lambda image_id=image_id, rel=rel:
                           _example(root, image_id, rel))


def parse_objects(data: bytes, where: str) -> list[list[float]]:
    """Pixel corners of each `HRSC_Object`'s rotated box; BadRecord quoting a broken one."""
    try:
        xml = ET.fromstring(data)
    except ET.ParseError as e:
        raise ec.BadRecord("unreadable_xml", f"unreadable XML {where}: {e}") from e
    out = []
    for k, obj in enumerate(xml.iter("HRSC_Object")):
        texts = [obj.findtext(tag) for tag in MBOX]
        try:
            cx, cy, w, h, angle = (float(t) for t in texts)
            if not all(math.isfinite(v) for v in (cx, cy, w, h, angle)) or w <= 0 or h <= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ec.BadRecord("box_malformed", f"object {k}: rotated box "
                                                f"{dict(zip(MBOX, texts))} is not numbers with "
                                                "positive size") from None
        out.append(list(rotated_corners(cx, cy, w, h, math.degrees(angle))))
    return out


def _example(root: epath.Path, image_id: str, rel: str) -> dict:
    path = ec.resolve_inside(root, rel, "annotation")
    if not path.is_file():
        raise ec.BadRecord("missing_annotation", f"no annotation {rel} for listed id "
                                                 f"{image_id!r}")
    corners = parse_objects(path.read_bytes(), rel)
    image = ec.load_image(root, ec.find_image(root, "FullDataSet/AllImages", image_id,
                                              (".bmp", ".jpg", ".png", ".tif")))
    return ec.oriented_detection_example(image, SOURCE, [("ship", q) for q in corners])
