"""DIOR-RSVG visual grounding (Zhan et al., TGRS 2023) as grounding records.

Format (shared/research/peers-and-datasets.md B.4, sample in shared/formats/dior_rsvg/): the
release folder `DIOR_RSVG/` holds `Annotations/NNNNN.xml` (VOC-style: `filename`, `size` and one
`object` per referring expression with `name` (DIOR class), `bndbox` in pixels and
`description`), `JPEGImages/NNNNN.jpg`, and `train.txt` / `val.txt` / `test.txt`. A split file
lists expression indices, one per line, counted over the objects of all XML files in sorted
file-name order (the official `data_loader.py` counts in directory-walk order; the files are
numbered, so sorting gives the intended order).

One record per listed expression: human = the release's grounding prompt with the description,
gpt = its box as `[x0,y0,x1,y1]` in the padded square, `boxes` = that box. Every split whose file
is present is built (test is required).

Bad input, skipped and counted in `bad_records_<split>.json`: an XML that does not parse (its
`<object>` tags are counted textually so later indices stay aligned, and the listed expressions
inside it are skipped), a missing or undecodable image, an image path that leaves the folder, a
box outside the image or with x1<=x0, an unknown class, an empty description, a split line that
is not an index or points past the last expression, a repeated index.
"""

from __future__ import annotations

from typing import Iterator

from etils import epath

from tfds_builders import eval_common as ec

SOURCE = "DIOR_RSVG"
SPLITS = ("train", "val", "test")
# The 20 DIOR classes as the XML files spell them (compared case-insensitively).
DIOR_CLASSES = frozenset(c.lower() for c in (
    "airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney", "dam",
    "Expressway-Service-area", "Expressway-toll-station", "golffield", "groundtrackfield",
    "harbor", "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation",
    "vehicle", "windmill"))


class DiorRsvg(ec.EvalBuilder):
    """DIOR-RSVG referring expressions as grounding records (phrase -> box)."""

    HOMEPAGE = "https://github.com/ZhanYang-nwpu/RSVG-pytorch"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download DIOR-RSVG (link in github.com/ZhanYang-nwpu/RSVG-pytorch), extract it and pass "
        "the folder holding Annotations/, JPEGImages/ and test.txt (or its parent holding "
        "DIOR_RSVG/) as manual_dir.")

    def _split_generators(self, dl_manager):
        root = ec.find_root(self._manual_dir(dl_manager), ("", "DIOR_RSVG"), "Annotations",
                            self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        if not (root / "test.txt").is_file():
            raise FileNotFoundError(f"{self.name}: split file {root / 'test.txt'} not found. "
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        expressions = _expressions(root)
        return {split: self._generate_examples(split, _candidates(root, split, expressions))
                for split in SPLITS if (root / f"{split}.txt").is_file()}


def _expressions(root: epath.Path
                 ) -> list[tuple[str, ec.VocAnnotation | None, int, ec.BadRecord | None]]:
    """(xml path, parsed file or None, object index in the file, error) per expression, in the
    global order the split files count in."""
    out = []
    xml_files = sorted((p for p in (root / "Annotations").iterdir() if p.suffix == ".xml"),
                       key=lambda p: p.name)
    for path in xml_files:
        rel = ec.relative(path, root)
        data = path.read_bytes()
        try:
            ann = ec.parse_voc(data, rel)
        except ec.BadRecord as e:
            out += [(rel, None, k, e) for k in range(ec.count_voc_objects(data))]
            continue
        out += [(rel, ann, k, None) for k in range(len(ann.objects))]
    return out


def _candidates(root: epath.Path, split: str, expressions) -> Iterator:
    split_file = f"{split}.txt"
    seen = set()
    # Expressions of one image are listed next to each other: decode each image once in a row.
    last: dict = {}
    for line_no, line in enumerate(ec.read_lines(root / split_file)):
        try:
            index = int(line)
        except ValueError:
            yield ec.Skip(split_file, line_no, "bad_split_line",
                          f"line is not an expression index: {line!r}")
            continue
        if not 0 <= index < len(expressions):
            yield ec.Skip(split_file, line_no, "bad_split_line", f"index {index} is outside the "
                                                                 f"{len(expressions)} expressions")
            continue
        if index in seen:
            yield ec.Skip(split_file, line_no, "bad_split_line", f"index {index} listed twice")
            continue
        seen.add(index)
        xml_rel, ann, k, error = expressions[index]
        yield ec.Candidate(f"{index:06d}", xml_rel, k,
                           lambda ann=ann, k=k, error=error: _example(root, ann, k, error, last))


def _example(root: epath.Path, ann: ec.VocAnnotation | None, k: int,
             error: ec.BadRecord | None, last: dict) -> dict:
    if ann is None:
        raise ec.BadRecord(error.kind, str(error))
    obj = ann.objects[k]
    if obj.error:
        raise ec.BadRecord(obj.error.kind, str(obj.error))
    if obj.name.lower() not in DIOR_CLASSES:
        raise ec.BadRecord("unknown_class", f"object {k}: unknown class {obj.name!r}")
    phrase = (obj.description or "").strip()
    if not phrase:
        raise ec.BadRecord("empty_text", f"object {k}: empty description")
    if not (ann.filename or "").strip():
        raise ec.BadRecord("no_image_path", "no <filename>")
    path = f"JPEGImages/{ann.filename.strip()}"
    if last.get("path") != path:
        last.clear()
        last["image"] = ec.load_image(root, path)
        last["path"] = path
    image = last["image"]
    return ec.grounding_example(image, SOURCE, phrase, obj.box)
