"""HIT-UAV infrared (thermal) UAV object detection (Suo et al., Sci. Data 2023) as detection
records (sensor `infrared`).

Format, checked against the release files (github.com/suojiashun/HIT-UAV-Infrared-Thermal-
Dataset): `normal_json/annotations/train.json`, `instances_val.json` (older copies: `val.json`)
and `test.json`, COCO-like with two spellings of their own: images carry `filename` (not
`file_name`) and the box list is `annotation` (not `annotations`). Images are
`normal_json/<split>/<filename>`, 640x512 JPEG. Categories: Person, Car, Bicycle, OtherVehicle,
DontCare. The README calls the standard box `[xc, yc, w, h]`, but the files' own polygons show
`bbox` is [x, y, w, h] from the top-left corner (COCO), which is how it is read here.

One record per image: the release's detection prompt; one `<p>N class</p>[...]` group per class
(class phrases: person, car, bicycle, other vehicle; plural forms from boxes.py), classes in
order of first appearance. DontCare boxes are ignore regions, not objects: they are left out of
the answer by design and their number is logged. An image without objects (1.0-1.4% of each real
split) is kept, answered `boxes.NO_OBJECTS_ANSWER`, so false positives on it are scored.

Bad input, skipped and counted in `bad_records_<split>.json`: an unreadable JSON file, a missing
or undecodable image, an image path that leaves the folder, a box outside the image or with
x1<=x0, an unknown category.
"""

from __future__ import annotations

from tfds_builders import eval_common as ec

SOURCE = "HIT-UAV"
ANNOTATION_FILES = {"train": ("train.json",), "val": ("instances_val.json", "val.json"),
                    "test": ("test.json",)}
CLASSES = {"Person": "person", "Car": "car", "Bicycle": "bicycle",
           "OtherVehicle": "other vehicle"}
IGNORED_CLASSES = ("DontCare",)


class HitUav(ec.EvalBuilder):
    """HIT-UAV thermal infrared detection (person, car, bicycle, other vehicle)."""

    HOMEPAGE = "https://github.com/suojiashun/HIT-UAV-Infrared-Thermal-Dataset"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Clone or download github.com/suojiashun/HIT-UAV-Infrared-Thermal-Dataset and pass the "
        "folder holding normal_json/ as manual_dir.")

    def _split_generators(self, dl_manager):
        root = ec.find_root(self._manual_dir(dl_manager),
                            ("", "HIT-UAV", "HIT-UAV-Infrared-Thermal-Dataset"),
                            "normal_json/annotations/test.json", self.name,
                            self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        splits = {}
        for split, names in ANNOTATION_FILES.items():
            name = next((n for n in names
                         if (root / "normal_json/annotations" / n).is_file()), None)
            if name is None:
                continue
            json_rel = f"normal_json/annotations/{name}"
            splits[split] = self._generate_examples(split, ec.coco_candidates(
                root, json_rel, f"normal_json/{split}", SOURCE, CLASSES.get, IGNORED_CLASSES))
        return splits

