"""DOTA (Xia et al., CVPR 2018; v1.0/v1.5/v2.0) oriented-box detection as detection records.

Format, checked against real label files (shared/formats/dota/: DOTA_devkit's examples and
mmrotate's split patches): one `labelTxt` file per image, `<stem>.txt`, whose lines are
`x1 y1 x2 y2 x3 y3 x4 y4 class difficult` (pixel corners in the annotator's order, class names
such as `large-vehicle`, difficult 0/1). Release files start with two header lines,
`imagesource:GoogleEarth` and `gsd:0.28...`, and end lines in CRLF; the DOTA_devkit split tool's
patches have no header, float coordinates and LF, and a patch without objects is an empty file.
manual_dir holds `<split>/images/<stem>.png` and the split's labels in `<split>/labelTxt/` (or
the release's `labelTxt-v1.0/labelTxt/`, `labelTxt-v1.5/DOTA-v1.5_<split>/`,
`labelTxt-v2.0/DOTA-v2.0_<split>/`), for the splits train, val and test that are present (the
official test labels are not public: a test split needs labels of one's own).

One record per label file: the release's detection prompt; the answer groups the objects per
class (phrases: `large-vehicle` -> large vehicle) in order of first appearance and writes each
box as its four corners (`boxes.py`'s oriented form, normalised in the centre-padded square);
`box_corners` holds them, `boxes` their enclosing horizontal boxes. A file without objects is an
empty scene, answered `boxes.NO_OBJECTS_ANSWER`. Difficult objects are kept as ordinary ones:
records carry no difficult flag (DOTA's own evaluation leaves them out; see
`metrics.rotated_detection_ap`). Whole DOTA images are up to 20,000 px a side: evaluate on split
patches (the devkit's ImgSplit output has this same layout), which the image-size guard of
`images.py` also asks for.

Bad input, skipped and counted in `bad_records_<split>.json`, with the offending line quoted: a
line that is not 8 numbers, a class and an optional 0/1 flag; a file that is not UTF-8; a
missing or undecodable image; corners that leave no area inside the image.
"""

from __future__ import annotations

import math

from etils import epath

from tfds_builders import eval_common as ec

SOURCE = "DOTA"
SPLITS = ("train", "val", "test")
LABEL_DIRS = ("labelTxt", "labelTxt-v1.0/labelTxt", "labelTxt-v1.5/DOTA-v1.5_{split}",
              "labelTxt-v2.0/DOTA-v2.0_{split}")
HEADER_KEYS = ("imagesource:", "gsd:")


class Dota(ec.EvalBuilder):
    """DOTA oriented-box detection (labelTxt corners), answers written as corners."""

    HOMEPAGE = "https://captain-whu.github.io/DOTA/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download DOTA (captain-whu.github.io/DOTA), extract each split as <split>/images/ and "
        "<split>/labelTxt/ (the release's labelTxt-v1.0/labelTxt/ etc. are found too), "
        "preferably cut into patches with DOTA_devkit's ImgSplit, and pass the folder holding "
        "train/, val/ (and a labelled test/) as manual_dir.")

    def _split_generators(self, dl_manager):
        manual = self._manual_dir(dl_manager)
        splits = {}
        for split in SPLITS:
            labels = next((manual / split / d.format(split=split) for d in LABEL_DIRS
                           if (manual / split / d.format(split=split)).is_dir()), None)
            if labels is not None:
                splits[split] = self._generate_examples(split, _candidates(manual, split,
                                                                           labels))
        if not splits:
            raise FileNotFoundError(f"{self.name}: no <split>/labelTxt/ (or "
                                    f"{', '.join(LABEL_DIRS[1:])}) under {manual} for splits "
                                    f"{', '.join(SPLITS)}. " + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        return splits


def _candidates(root: epath.Path, split: str, labels: epath.Path):
    for path in sorted((p for p in labels.iterdir() if p.suffix == ".txt"), key=lambda p: p.name):
        rel = ec.relative(path, root)
        yield ec.Candidate(f"{split}/{path.stem}", rel, None,
                           lambda path=path: _example(root, split, path))


def parse_label_file(data: bytes) -> list[tuple[str, list[float], int]]:
    """(class name, 8 corner values, difficult) per object line; BadRecord quoting a bad line."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ec.BadRecord("not_utf8", f"not UTF-8 text: {e}") from e
    objects = []
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(HEADER_KEYS):
            continue
        fields = line.split()
        try:
            if len(fields) not in (9, 10):
                raise ValueError
            corners = [float(v) for v in fields[:8]]
            difficult = int(fields[9]) if len(fields) == 10 else 0
            if difficult not in (0, 1) or not all(math.isfinite(v) for v in corners):
                raise ValueError
        except ValueError:
            raise ec.BadRecord("box_malformed", f"line {line_no} is not 'x1 y1 ... x4 y4 class "
                                                f"difficult': {line[:120]!r}") from None
        objects.append((fields[8], corners, difficult))
    return objects


def _example(root: epath.Path, split: str, path: epath.Path) -> dict:
    objects = parse_label_file(path.read_bytes())
    image = ec.load_image(root, ec.find_image(root, f"{split}/images", path.stem))
    return ec.oriented_detection_example(image, SOURCE, [(ec.class_phrase(name), corners)
                                                         for name, corners, _ in objects])
