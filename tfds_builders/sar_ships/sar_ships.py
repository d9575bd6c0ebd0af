"""SAR ship detection sets, SSDD and HRSID, as detection records (sensor `sar`).

Config `ssdd`, the official SSDD release (Official-SSDD-OPEN, BBox variant; shared/research/
peers-and-datasets.md B.7): `BBox_SSDD/voc_style/{Annotations_train, Annotations_test,
JPEGImages_train, JPEGImages_test}`, one VOC XML per image (`filename`, `object/name` = ship,
`object/bndbox` in pixels). manual_dir may be the release root, `BBox_SSDD/`, or `voc_style/`.
Each `Annotations_<split>` folder present gives a split; the image is `JPEGImages_<split>/` +
the XML's `filename` (or the XML's stem + .jpg when the field is missing).

Config `hrsid`, HRSID (Wei et al., IEEE Access 2020; github.com/chaozhong2010/HRSID): COCO JSON
`annotations/train2017.json` and `annotations/test2017.json` (`images[].file_name`,
`annotations[].bbox` = [x, y, w, h] from the top-left, `categories` = ship), images in
`JPEGImages/` (or `HRSID_JPG/JPEGImages/`, `images/`). The sample checked is the
modified-HRSID copy in shared/formats/hrsid/ (same structure); the original file names
(train2017/test2017) are from mmrotate's HRSID notes.

One record per image: the release's detection prompt; answer `There are <p>N ships</p>[...]`
with every box in annotation order; `boxes` the same boxes. An image without ships (an SSDD XML
without `object`, an HRSID image without annotations) is kept, answered
`boxes.NO_OBJECTS_ANSWER`, so false positives on open sea are scored.

Bad input, skipped and counted in `bad_records_<split>.json`: an unreadable XML or JSON file, a
missing or undecodable image, an image path that leaves the folder, a box outside the image or
with x1<=x0, a class other than ship, an unknown COCO category id.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds
from etils import epath

from tfds_builders import eval_common as ec

SPLITS = ("train", "test")
CLASSES = frozenset({"ship"})


@dataclasses.dataclass(eq=False)
class SarShipsConfig(tfds.core.BuilderConfig):
    source: str = ""


class SarShips(ec.EvalBuilder):
    """SAR ship detection: SSDD (VOC XML) and HRSID (COCO JSON)."""

    BUILDER_CONFIGS = [
        SarShipsConfig(name="ssdd", description="Official SSDD, BBox VOC XML.", source="SSDD"),
        SarShipsConfig(name="hrsid", description="HRSID, COCO JSON.", source="HRSID"),
    ]
    HOMEPAGE = "https://github.com/chaozhong2010/HRSID"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "ssdd: extract Official-SSDD and pass the folder holding BBox_SSDD/ (or voc_style/ "
        "itself) as manual_dir. hrsid: extract HRSID and pass the folder holding annotations/ "
        "and JPEGImages/ (or HRSID_JPG/JPEGImages/) as manual_dir.")

    def _split_generators(self, dl_manager):
        manual = self._manual_dir(dl_manager)
        if self.builder_config.name == "ssdd":
            return self._ssdd_splits(manual)
        return self._hrsid_splits(manual)

    # ------------------------------------------------------------------------------ SSDD (VOC)

    def _ssdd_splits(self, manual: epath.Path):
        root = ec.find_root(manual, ("BBox_SSDD/voc_style", "voc_style", ""), "Annotations_test",
                            f"{self.name}/ssdd", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        return {split: self._generate_examples(split, self._ssdd_candidates(root, split))
                for split in SPLITS if (root / f"Annotations_{split}").is_dir()}

    def _ssdd_candidates(self, root: epath.Path, split: str):
        folder = root / f"Annotations_{split}"
        for path in sorted((p for p in folder.iterdir() if p.suffix == ".xml"),
                           key=lambda p: p.name):
            rel = ec.relative(path, root)
            yield ec.Candidate(f"{split}/{path.stem}", rel, None,
                               lambda path=path, rel=rel: self._ssdd_example(root, split, path,
                                                                             rel))

    def _ssdd_example(self, root, split, path, rel) -> dict:
        ann = ec.parse_voc(path.read_bytes(), rel)
        objects = []
        for k, obj in enumerate(ann.objects):
            if obj.error:
                raise ec.BadRecord(obj.error.kind, str(obj.error))
            if obj.name.lower() not in CLASSES:
                raise ec.BadRecord("unknown_class", f"object {k}: unknown class {obj.name!r}")
            objects.append((obj.name.lower(), obj.box))
        filename = (ann.filename or "").strip() or f"{path.stem}.jpg"
        image = ec.load_image(root, f"JPEGImages_{split}/{filename}")
        return ec.detection_example(image, self.builder_config.source, objects)

    # ------------------------------------------------------------------------------ HRSID (COCO)

    def _hrsid_splits(self, manual: epath.Path):
        root = ec.find_root(manual, ("", "HRSID", "HRSID_JPG"), "annotations/test2017.json",
                            f"{self.name}/hrsid", self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        image_dir = next((d for d in ("JPEGImages", "HRSID_JPG/JPEGImages", "images")
                          if (root / d).is_dir()), None)
        if image_dir is None:
            raise FileNotFoundError(f"{self.name}/hrsid: no JPEGImages/ (or HRSID_JPG/JPEGImages/,"
                                    f" images/) under {root}. " + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        return {split: self._generate_examples(split, ec.coco_candidates(
                    root, f"annotations/{split}2017.json", image_dir, self.builder_config.source,
                    lambda name: name.lower() if name.lower() in CLASSES else None))
                for split in SPLITS if (root / f"annotations/{split}2017.json").is_file()}

