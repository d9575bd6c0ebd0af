"""What every evaluation-set builder shares: the record features, image and path checks, the
annotation readers two builders need (VOC XML, COCO JSON), the task templates and the
skipped-record report.

The evaluation builders turn a source dataset's own files into records shaped exactly like
`mmrs1m` records (the same features, `boxes`, `box_turns` and `box_labels` included), so
`earthgpt_jax.evaluate.runner` reads every evaluation set the way it reads MMRS-1M: the question
is the human turn, the references are the gpt turns, the image is the source's encoded bytes.

Box convention (owned by `earthgpt_jax.data.boxes`): pixel boxes are checked against the image,
then mapped with `pixel_to_norm` to [0,1] coordinates of the centre-padded square; the answer
text is written from those values with `boxes_to_text` / `detection_to_text` (two decimals) and
the `boxes` feature keeps them unrounded (float32 [N, 4]).

Bad input is skipped and counted, never dropped silently: each builder yields `Candidate`s (a
key plus a function that makes the example or raises `BadRecord(kind, message)`) and `Skip`s (a
problem found while reading annotation files). `EvalBuilder._generate_examples` turns them into
examples and a `bad_records_<split>.json` report (counts per reason kind and per file) written
by mmrs1m's `SplitReport`, with its `max_bad_fraction` threshold (default 1%).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from earthgpt_jax.data.boxes import (DETECTION_PROMPT, GROUNDING_PROMPT, box_corners,
                                     boxes_to_text, detection_to_text, enclosing_box,
                                     pixel_to_norm)
from earthgpt_jax.data.images import MAX_IMAGE_PIXELS, ImageDecodeError, decode_image
from tfds_builders.mmrs1m.mmrs1m import Mmrs1m, record_features
from tfds_builders.mmrs1m.report import BadRecord, BadRecordsError, SplitReport, read_report
from tfds_builders.mmrs1m.sources import sensor_for_source

# Instruction templates. MMRS-1M's wording for classification and captioning was not recovered
# (shared/research/paper-digest.md §3.2), so these two are ours, kept here so they can be swapped
# for the release's strings in one place. Grounding and detection use the release's prompts from
# boxes.py; VQA asks the dataset's own question unchanged.
CLASSIFICATION_PROMPT = ("What is the category of this remote sensing image? Choose one of the "
                         "following classes: {classes}. Answer with one word or phrase.")
CAPTION_PROMPT = "Describe this remote sensing image in one sentence."

# Pixel boxes may overshoot the image by this much (VOC's 1-based inclusive xmax lands on
# width+1; float COCO boxes on width+epsilon). Such boxes are clipped; anything further out is
# a bad record.
BOX_TOLERANCE_PX = 1.0

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


# ----------------------------------------------------------------------------- files and images

def find_root(manual_dir: epath.Path, candidates: Sequence[str], marker: str,
              dataset: str, instructions: str) -> epath.Path:
    """The first `manual_dir/<candidate>` that holds `marker`; a clear error when none does."""
    for candidate in candidates:
        root = manual_dir / candidate if candidate else manual_dir
        if (root / marker).exists():
            return root
    looked = ", ".join(os.fspath((manual_dir / c) / marker if c else manual_dir / marker)
                       for c in candidates)
    raise FileNotFoundError(f"{dataset}: {marker} not found in manual_dir (looked for {looked}). "
                            f"{instructions}")


def relative(path: epath.Path, root: epath.Path) -> str:
    return os.fspath(path.relative_to(root)).replace(os.sep, "/")


def resolve_inside(root: epath.Path, rel_path: str, what: str = "image") -> epath.Path:
    """`root/rel_path`, refusing a path from an annotation file that leaves the dataset folder
    (absolute, through `..`, or through a symlink that points outside)."""
    if not rel_path or os.path.isabs(rel_path) or ".." in re.split(r"[\\/]", rel_path):
        raise BadRecord("path_outside_dataset",
                        f"{what} path leaves the dataset folder: {rel_path!r}")
    path = root / rel_path
    if "://" not in os.fspath(root):  # symlinks only exist on local disks
        real_root = os.path.realpath(os.fspath(root))
        if os.path.commonpath([real_root, os.path.realpath(os.fspath(path))]) != real_root:
            raise BadRecord("path_outside_dataset", f"{what} path leaves the dataset folder "
                                                    f"through a symlink: {rel_path!r}")
    return path


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """A checked image: original bytes plus the size the pipeline will see when decoding."""
    path: str       # relative to the dataset root, '/'-separated
    data: bytes
    width: int
    height: int


def load_image(root: epath.Path, rel_path: str,
               max_pixels: int = MAX_IMAGE_PIXELS) -> LoadedImage:
    """Reads and fully decodes an image with the pipeline's own decoder, so a file that passes
    here also decodes in training and evaluation; raises BadRecord naming the file. The size is
    that of the decoded image (after EXIF orientation), the frame the boxes are normalised in."""
    path = resolve_inside(root, rel_path)
    if not path.is_file():
        raise BadRecord("missing_image", f"missing image {rel_path}")
    data = path.read_bytes()
    try:
        height, width = decode_image(data, rel_path, max_pixels=max_pixels).shape[:2]
    except ImageDecodeError as e:  # empty, not an image, too large, truncated: e.kind says which
        raise BadRecord(e.kind, str(e)) from e
    return LoadedImage(rel_path, data, int(width), int(height))


def find_image(root: epath.Path, folder: str, stem: str,
               extensions: Sequence[str] = IMAGE_EXTENSIONS) -> str:
    """`folder/stem.<ext>` for the first extension that exists (datasets ship PNG or TIFF copies
    of the same release); raises BadRecord when none does."""
    for ext in extensions:
        rel_path = f"{folder}/{stem}{ext}" if folder else f"{stem}{ext}"
        if (root / rel_path).is_file():
            return rel_path
    raise BadRecord("missing_image",
                    f"missing image {folder}/{stem}.* (tried {', '.join(extensions)})")


def read_json(path: epath.Path, root: epath.Path):
    """A JSON annotation file; a UTF-8 BOM (Windows editors write one) is accepted, as the
    mmrs1m builder accepts it."""
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise BadRecord("unreadable_json", f"unreadable JSON {relative(path, root)}: {e}") from e


def read_lines(path: epath.Path) -> list[str]:
    """Non-empty stripped lines of a split/list file (CRLF and a BOM tolerated)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"split/list file {path} is not UTF-8 text: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- boxes and classes

def class_phrase(name: str) -> str:
    """Dataset class name -> the words used in prompts and answers: CamelCase, `_` and `-` become
    spaces, lower case ('OtherVehicle' -> 'other vehicle', 'storage_tank' -> 'storage tank',
    'bare-land' -> 'bare land'). Names written without separators ('baseballdiamond') stay as
    they are; a builder that knows better maps them itself."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name.strip())
    return " ".join(re.split(r"[\s_\-]+", words)).lower().strip()


def checked_box(box_xyxy: Sequence, width: int, height: int, what: str) -> tuple[float, ...]:
    """Pixel [x0,y0,x1,y1] that lies in the image: x1<x0 (or y), zero size or outside ->
    BadRecord; up to BOX_TOLERANCE_PX outside is clipped."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    except (TypeError, ValueError) as e:
        raise BadRecord("box_malformed", f"{what}: box is not 4 numbers: {box_xyxy!r}") from e
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise BadRecord("box_malformed", f"{what}: box has non-finite values {box_xyxy!r}")
    if x1 < x0 or y1 < y0:
        raise BadRecord("box_corners_swapped",
                        f"{what}: inverted box {[x0, y0, x1, y1]} (x1 < x0 or y1 < y0)")
    if x1 == x0 or y1 == y0:
        raise BadRecord("box_empty", f"{what}: empty box {[x0, y0, x1, y1]} (zero width/height)")
    tol = BOX_TOLERANCE_PX
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        raise BadRecord("box_outside_image",
                        f"{what}: box {[x0, y0, x1, y1]} outside the {width}x{height} image")
    return (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))


def xywh_to_xyxy(box: Sequence) -> list:
    if not isinstance(box, (list, tuple)) or len(box) != 4 \
            or not all(isinstance(v, (int, float)) for v in box):
        raise BadRecord("box_malformed", f"bbox is not [x, y, w, h]: {box!r}")
    x, y, w, h = box
    return [x, y, x + w, y + h]


# ----------------------------------------------------------------------------- examples

def _example(image: LoadedImage, source: str, task: str, pairs: Sequence[tuple[str, str]],
             boxes: Sequence[Sequence[float]] = (), labels: Sequence[str] = (),
             independent: bool = False, corners: Sequence[Sequence[float]] | None = None
             ) -> dict:
    """A record; `boxes`/`labels` all belong to the first answer (turn 1). `corners`: each
    box's four corners when oriented (default: the horizontal boxes' rectangles)."""
    if corners is None:
        corners = [box_corners(b) for b in boxes]
    turns = []
    for question, answer in pairs:
        if not isinstance(question, str) or not question.strip():
            raise BadRecord("empty_text", "empty question")
        if not isinstance(answer, str) or not answer.strip():
            raise BadRecord("empty_text", f"empty answer to {question!r}")
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {
        "image": image.data,
        "image_path": image.path,
        "width": image.width,
        "height": image.height,
        "sensor": sensor_for_source(source),
        "source": source,
        "task": task,
        "conversations": turns,
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "box_corners": np.asarray(corners, np.float32).reshape(-1, 8),
        "box_turns": np.ones(len(boxes), np.int32),
        "box_labels": list(labels),
        "independent": bool(independent),
    }


def qa_example(image: LoadedImage, source: str, task: str,
               pairs: Sequence[tuple[str, str]], independent: bool = False) -> dict:
    """Classification, captioning or VQA: text turns, no boxes. `independent`: the questions
    are unrelated, each asked alone in evaluation, so one record holds all of an image's
    questions and its bytes are stored once."""
    return _example(image, source, task, pairs, independent=independent)


def classification_prompt(classes: Sequence[str]) -> str:
    return CLASSIFICATION_PROMPT.format(classes=", ".join(classes))


def grounding_example(image: LoadedImage, source: str, phrase: str, box_px: Sequence) -> dict:
    """Phrase -> box, with the release's grounding prompt; the box is checked first."""
    box = pixel_to_norm(checked_box(box_px, image.width, image.height, "object"),
                        image.width, image.height)
    return _example(image, source, "grounding",
                    [(GROUNDING_PROMPT.format(phrase=phrase), boxes_to_text([box]))], [box],
                    [phrase])


def detection_example(image: LoadedImage, source: str,
                      objects: Sequence[tuple[str, Sequence]]) -> dict:
    """(class phrase, pixel box) pairs -> one `<p>N class</p>[...]` group per class, classes in
    order of first appearance, boxes in annotation order; `boxes` follows the same order. An
    image without objects is kept, answered `NO_OBJECTS_ANSWER`: its false positives are
    scored."""
    groups: dict[str, list] = {}
    for k, (name, box_px) in enumerate(objects):
        box = checked_box(box_px, image.width, image.height, f"object {k} ({name})")
        groups.setdefault(name, []).append(pixel_to_norm(box, image.width, image.height))
    ordered = list(groups.items())
    return _example(image, source, "detection", [(DETECTION_PROMPT, detection_to_text(ordered))],
                    [b for _, bxs in ordered for b in bxs],
                    [name for name, bxs in ordered for _ in bxs])


def oriented_detection_example(image: LoadedImage, source: str,
                               objects: Sequence[tuple[str, Sequence]]) -> dict:
    """(class phrase, pixel corners x1,y1,...,x4,y4) pairs -> a detection record whose answer
    writes each box as its four corners (boxes.py's oriented form), grouped per class as
    `detection_example` groups; `box_corners` holds the corners, `boxes` their enclosing
    horizontal boxes. Corners are clipped to the image (annotations of objects cut by the
    border reach past it); a box left with no area inside it is a bad record."""
    groups: dict[str, list] = {}
    for k, (name, quad) in enumerate(objects):
        quad = [float(v) for v in quad]
        if len(quad) != 8 or not all(math.isfinite(v) for v in quad):
            raise BadRecord("box_malformed", f"object {k} ({name}): not 8 corner values: "
                                             f"{quad!r}")
        clipped = [min(max(v, 0.0), float(image.width if i % 2 == 0 else image.height))
                   for i, v in enumerate(quad)]
        x0, y0, x1, y1 = enclosing_box(clipped)
        if x1 <= x0 or y1 <= y0:
            raise BadRecord("box_outside_image", f"object {k} ({name}): corners {quad} leave "
                                                 f"no area inside the {image.width}x"
                                                 f"{image.height} image")
        groups.setdefault(name, []).append(pixel_to_norm(clipped, image.width, image.height))
    ordered = list(groups.items())
    corners = [q for _, qs in ordered for q in qs]
    return _example(image, source, "detection", [(DETECTION_PROMPT, detection_to_text(ordered))],
                    [enclosing_box(q) for q in corners],
                    [name for name, qs in ordered for _ in qs], corners=corners)


# ----------------------------------------------------------------------------- annotation readers

@dataclasses.dataclass(frozen=True)
class VocObject:
    name: str
    box: tuple | None            # pixel xmin, ymin, xmax, ymax as written
    description: str | None      # DIOR-RSVG's referring expression
    error: BadRecord | None = None


@dataclasses.dataclass(frozen=True)
class VocAnnotation:
    filename: str | None
    objects: list[VocObject]


def parse_voc(data: bytes, where: str) -> VocAnnotation:
    """A VOC-style annotation (`filename`, `object/{name, bndbox, description?}`); an unreadable
    file raises BadRecord, a broken object comes back with `error` set."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise BadRecord("unreadable_xml", f"unreadable XML {where}: {e}") from e
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        description = obj.findtext("description")
        bndbox = obj.find("bndbox")
        try:
            if bndbox is None:
                raise ValueError("no bndbox")
            box = tuple(float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as e:
            objects.append(VocObject(name, None, description,
                                     BadRecord("box_malformed", f"object {k}: bad bndbox ({e})")))
            continue
        objects.append(VocObject(name, box, description))
    return VocAnnotation(root.findtext("filename"), objects)


def count_voc_objects(data: bytes) -> int:
    """Objects in an XML that does not parse, counted textually, so object indices counted over
    many files (DIOR-RSVG's split files) stay aligned past a broken file."""
    return len(re.findall(rb"<object[\s>]", data))


@dataclasses.dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    objects: list[tuple[str, list]]   # (class name as in the file, pixel xyxy)
    error: BadRecord | None = None


def parse_coco(coco, where: str, drop_classes: Sequence[str] = ()) -> tuple[list[CocoImage], int]:
    """COCO detection JSON -> images in file order with their objects; returns also how many
    annotations were dropped because their class is in `drop_classes` (ignore regions).

    Accepts the spellings seen in real files: `file_name` or `filename` per image and
    `annotations` or `annotation` (HIT-UAV) for the box list; `bbox` is [x, y, w, h] from the
    top-left corner. An annotation with an unknown category or a malformed bbox marks its image
    bad; annotations naming an image id that is not listed become one bad entry of their own.
    """
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise BadRecord("unreadable_json", f"{where}: not a COCO file (no 'images' list)")
    anns = coco.get("annotations", coco.get("annotation"))
    if not isinstance(anns, list):
        raise BadRecord("unreadable_json", f"{where}: not a COCO file (no 'annotations' list)")
    categories = {c.get("id"): str(c.get("name")) for c in coco.get("categories") or []
                  if isinstance(c, dict)}
    by_image: dict = {}
    for ann in anns:
        if isinstance(ann, dict):
            by_image.setdefault(ann.get("image_id"), []).append(ann)
    dropped = 0
    images = []
    for entry in coco["images"]:
        if not isinstance(entry, dict):
            images.append(CocoImage(-1, "", [], BadRecord("not_an_object",
                                                          "image entry is not an object")))
            continue
        file_name = entry.get("file_name", entry.get("filename"))
        objects, error = [], None
        if not isinstance(file_name, str) or not file_name:
            error = BadRecord("no_image_path", f"image {entry.get('id')} has no file_name")
        for ann in by_image.pop(entry.get("id"), []):
            name = categories.get(ann.get("category_id"))
            if name is None:
                error = error or BadRecord("unknown_class", f"annotation {ann.get('id')}: "
                                           f"unknown category id {ann.get('category_id')!r}")
                continue
            if name in drop_classes:
                dropped += 1
                continue
            try:
                objects.append((name, xywh_to_xyxy(ann.get("bbox"))))
            except BadRecord as e:
                error = error or BadRecord(e.kind, f"annotation {ann.get('id')}: {e}")
        images.append(CocoImage(entry.get("id"), file_name or "", objects, error))
    orphans = sum(len(v) for v in by_image.values())
    if orphans:
        images.append(CocoImage(-1, "", [], BadRecord(
            "unknown_image_id", f"{orphans} annotations name image ids not in 'images'")))
    return images, dropped


def coco_candidates(root: epath.Path, json_rel: str, image_dir: str, source: str,
                    class_of: Callable[[str], str | None], drop_classes: Sequence[str] = ()):
    """Detection candidates, one per image of a COCO file; `class_of(name)` gives the answer's
    class phrase, or None for a class the set does not have (a bad record)."""
    try:
        images, dropped = parse_coco(read_json(root / json_rel, root), json_rel, drop_classes)
    except BadRecord as e:
        yield Skip(json_rel, None, e.kind, str(e))
        return
    if drop_classes:
        logging.info("%s %s: %d %s boxes left out by design", source, json_rel, dropped,
                     "/".join(drop_classes))
    for k, entry in enumerate(images):
        yield Candidate(f"{entry.id}:{entry.file_name}", json_rel, k,
                        lambda entry=entry: _coco_example(root, entry, image_dir, source,
                                                          class_of))


def _coco_example(root, entry: CocoImage, image_dir, source, class_of) -> dict:
    if entry.error:
        raise entry.error
    objects = []
    for name, box in entry.objects:
        phrase = class_of(name)
        if phrase is None:
            raise BadRecord("unknown_class", f"unknown class {name!r}")
        objects.append((phrase, box))
    image = load_image(root, f"{image_dir}/{entry.file_name}")
    return detection_example(image, source, objects)


# ----------------------------------------------------------------------------- the builder base

@dataclasses.dataclass(frozen=True)
class Skip:
    """A record that could not even become a candidate (unreadable file, bad split line)."""
    file: str
    index: Union[int, str, None]
    kind: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One example to make: `make()` returns it or raises BadRecord(kind, reason)."""
    key: str
    file: str
    index: Union[int, str, None]
    make: Callable[[], dict]


class EvalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the evaluation builders: features, the max_bad_fraction knob, the report."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Records in mmrs1m's format (boxes included).",
                     "1.1.0": "Empty detection scenes kept; VQA sets one record per image with "
                              "independent questions."}
    HOMEPAGE = ""
    # Largest fraction of skipped records a split may have before the build fails.
    MAX_BAD_FRACTION = Mmrs1m.MAX_BAD_FRACTION

    def __init__(self, *, max_bad_fraction: float | None = None, **kwargs):
        self.max_bad_fraction = (self.MAX_BAD_FRACTION if max_bad_fraction is None
                                 else float(max_bad_fraction))
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=type(self).__doc__,
                                     features=record_features(), homepage=self.HOMEPAGE)

    def _manual_dir(self, dl_manager) -> epath.Path:
        if dl_manager.manual_dir is None:
            raise FileNotFoundError(f"{self.name}: no manual_dir given. "
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        return epath.Path(dl_manager.manual_dir)

    def _generate_examples(self, split: str, candidates: Iterable[Candidate | Skip]
                           ) -> Iterator[tuple[str, dict]]:
        """Examples of one split; every skip goes to the split's report, written (and the
        threshold checked) once the split is done."""
        report = SplitReport(self.name, split, self.max_bad_fraction)
        for c in candidates:
            if isinstance(c, Skip):
                report.add_bad(c.file, c.index, c.kind, c.reason)
                continue
            try:
                example = c.make()
            except BadRecord as e:
                report.add_bad(c.file, c.index, e.kind, str(e))
                continue
            except OSError as e:  # a file that vanished or cannot be read mid-build
                report.add_bad(c.file, c.index, "unreadable_file", f"{type(e).__name__}: {e}")
                continue
            report.good += 1
            yield c.key, example
        if report.good or report.bad_fraction > report.max_bad_fraction:
            report.write(self.data_dir)  # raises BadRecordsError past the threshold
            return
        # TFDS cannot store an empty split: say why instead of failing inside its writer, with
        # the report one level up, as TFDS deletes the unfinished folder.
        path = report.write(os.fspath(epath.Path(self.data_dir).parent))
        raise BadRecordsError(f"{self.name} split {split!r}: no usable record "
                              f"({len(report.bad)} skipped). Report: {path}")

    def bad_records(self, split: str) -> dict:
        """The bad-record report of a prepared split."""
        return read_report(self.data_dir, split)
