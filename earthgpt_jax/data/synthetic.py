"""A seeded miniature MMRS-1M release: same folders, file names and record format as the real one.

The real release (see shared/research/peers-and-datasets.md §0.1) is a `data/` tree of image
folders per task and source plus LLaVA-style JSON lists under `data/json/`. This module writes a
tiny release with that exact layout so the `mmrs1m` TFDS builder, the grain pipeline, training
and evaluation all run end to end on a CPU in minutes. The content is learnable on purpose:
scene classes differ by colour and texture, objects are small coloured shapes, captions and
answers are functions of what was drawn, and boxes follow the release's pad-then-normalise rule.

The real release has no split field; here the test split lives in the same folders, in
annotation files whose name ends in `_test.json`, with images of its own (`test_*.png`).

A multispectral sensor is opt-in (`--multispectral`, `write_release(sources=
MULTISPECTRAL_SOURCES)`): a release of its own, 4-band R, G, B, NIR TIFFs (the order is each
`Source.bands`, also written into every TIFF as GDAL band descriptions) whose targets show only
in NIR, for a model of config.model.input_bands=4. The default release is unchanged by it.

    python -m earthgpt_jax.data.synthetic --out=/tmp/mmrs_mini [--seed=0] [--multispectral]
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Sequence

import numpy as np
from PIL import Image

from earthgpt_jax.data.boxes import (DETECTION_PROMPT, GROUNDING_PROMPT, REGION_CAPTION_PROMPT,
                                     box_corners, boxes_to_text, detection_to_text, enclosing_box,
                                     pixel_to_norm, plural, rotated_corners)

SCENE_CLASSES = ("forest", "sea", "desert", "farmland", "residential", "snowfield")
LAND_SCENES = tuple(c for c in SCENE_CLASSES if c != "sea")
# Words used by captions: (adjective, noun) per scene class.
SCENE_WORDS = {"forest": ("dense green", "forest"), "sea": ("calm blue", "sea"),
               "desert": ("dry sandy", "desert"), "farmland": ("striped", "farmland"),
               "residential": ("grey", "residential area"),
               "snowfield": ("white snowy", "snowfield")}
VEHICLE_COLOURS = {"red": (220, 30, 30), "yellow": (240, 220, 20), "blue": (30, 60, 230),
                   "black": (15, 15, 15), "orange": (250, 140, 0), "purple": (150, 40, 200)}

CLASSIFICATION_PROMPT = ("What is the category of this remote sensing image? "
                         "Answer with one word or phrase.")
CAPTION_PROMPTS = (
    "Describe this remote sensing image in one sentence.",
    "Please provide a one-sentence caption for this image.",
    "What does this remote sensing image show? Answer with a short caption.",
)
PRESENCE_PROMPT = "Is there a {name} in this image?"
COUNT_PROMPT = "How many {names} are there in this image?"

_COUNT_WORDS = ("no", "one", "two", "three", "four")

# One detection image in this many is an empty scene (no objects), answered NO_OBJECTS_ANSWER.
EMPTY_SCENE_EVERY = 10

# Minimum pixel side of an object; below this a shape is no longer recognisable.
_MIN_OBJECT_PX = 3


@dataclasses.dataclass(frozen=True)
class Source:
    """One source folder of the mini release: where its images and its annotations go."""
    task: str        # classification | caption | vqa | rsvg | detection
    name: str        # source folder name; it encodes the sensor as in the real release
    sensor: str      # optical | sar | infrared (the builder derives this from `name` itself)
    image_dir: str   # relative to root
    json_path: str   # train annotation file, relative to root
    # Images per 600 train images. VQA is over-represented on purpose: a yes/no answer is one
    # token, so presence has to be seen often to be learned next to long detection answers.
    weight: int
    # The image's bands in file order (a model reads the first config.model.input_bands);
    # empty: the sensor's own (SENSOR_BANDS).
    bands: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.bands:
            object.__setattr__(self, "bands", SENSOR_BANDS[self.sensor])


# Bands of each sensor's images, in file order: RGB PNGs, single-band (grey) SAR and thermal
# infrared PNGs. (The multispectral source names its own: MULTISPECTRAL_BANDS.)
SENSOR_BANDS = {"optical": ("red", "green", "blue"), "sar": ("amplitude",),
                "infrared": ("thermal",)}


SOURCES = (
    Source("classification", "SynthScene", "optical", "data/classification/SynthScene",
           "data/json/classification/SynthScene_cls.json", 60),
    Source("caption", "SynthCap", "optical", "data/caption/SynthCap",
           "data/json/caption/caption_synthcap.json", 60),
    Source("vqa", "SynthVQA", "optical", "data/VQA/SynthVQA", "data/json/VQA/synthvqa.json", 120),
    Source("vqa", "HRSID_mini", "sar", "data/VQA/HRSID_mini", "data/json/VQA/hrsid_mini.json", 60),
    Source("vqa", "infrared_ship_mini", "infrared", "data/VQA/infrared_ship_mini",
           "data/json/VQA/infrared_ship_mini.json", 60),
    Source("rsvg", "DIOR_RSVG", "optical", "data/RSVG/DIOR_RSVG/images",
           "data/json/RSVG/rsvg_trainval.json", 60),
    Source("detection", "DIOR_mini", "optical", "data/detection/DIOR_mini",
           "data/json/detection/DIOR_mini/dior_mini_trainval.json", 90),
    Source("detection", "SSDD_mini", "sar", "data/detection/SSDD_mini",
           "data/json/detection/SSDD_mini/ssdd_mini_trainval.json", 45),
    Source("detection", "HIT-UAV_mini", "infrared", "data/detection/HIT-UAV_mini",
           "data/json/detection/HIT-UAV_mini/hit_uav_mini_trainval.json", 45),
    # Oriented boxes, as MMRS-1M's HRSID_OBB: ships at any angle, answered as four corners.
    Source("detection", "HRSID_OBB_mini", "sar", "data/detection/HRSID_OBB_mini",
           "data/json/detection/HRSID_OBB_mini/hrsid_obb_mini_trainval.json", 45),
)
# Object classes each detection source annotates, in the order answers list them.
DETECTION_CLASSES = {"DIOR_mini": ("airplane", "ship", "vehicle"), "SSDD_mini": ("ship",),
                     "HIT-UAV_mini": ("person", "vehicle"), "HRSID_OBB_mini": ("ship",)}
# Detection sources whose answers give oriented boxes (four corners, `boxes.py`). At most
# `MAX_ORIENTED_SHIPS` per image: a box is 8 numbers (~40 tokens with split digits), and
# the demo's answers must fit its 128 text tokens and 120 decoded ones.
ORIENTED_SOURCES = ("HRSID_OBB_mini",)
MAX_ORIENTED_SHIPS = 2

# The opt-in multispectral sensor: camouflage nets over vegetation. Their visible colours are
# the vegetation's, so R, G, B hold nothing of them; in near infrared, where leaves are bright
# and the nets' dyes are not, they are dark patches. Only a model that reads NIR can answer.
MULTISPECTRAL_BANDS = ("red", "green", "blue", "nir")
CAMOUFLAGE = "camouflaged vehicle"
MULTISPECTRAL_SOURCES = (
    Source("vqa", "MSCamo_mini", "optical", "data/VQA/MSCamo_mini",
           "data/json/VQA/mscamo_mini.json", 600, bands=MULTISPECTRAL_BANDS),
)


def split_json_path(train_json_path: str, split: str) -> str:
    """Annotation file of a split: test turns `.../rsvg_trainval.json` into `.../rsvg_test.json`
    and `.../X_cls.json` into `.../X_cls_test.json` (the builder splits on `_test.json`)."""
    if split == "train":
        return train_json_path
    return train_json_path.removesuffix(".json").removesuffix("_trainval") + f"_{split}.json"


# --------------------------------------------------------------------------------------------
# Drawing


@dataclasses.dataclass
class Obj:
    cls: str                       # singular class name
    box: tuple[int, int, int, int]  # pixel x0, y0, x1, y1 (x1, y1 exclusive)
    colour: str = ""               # vehicles only
    corners: tuple[float, ...] | None = None  # an oriented object's pixel corners; box encloses


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """Non-square sizes, tall and wide, so the pad-to-square convention matters."""
    long_side = int(rng.integers(72, 97))
    short_side = int(rng.integers(56, long_side - 7))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _optical_image(rng: np.random.Generator, scene: str, w: int, h: int,
                   objs: Sequence[Obj] = ()) -> np.ndarray:
    """The scene's background with `objs` drawn over it (drawing draws no random numbers)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if scene == "forest":
        base = np.array([34, 105, 40.0]) + rng.normal(0.0, 22, (h, w, 3)) * [0.6, 1.0, 0.6]
    elif scene == "sea":
        phase = rng.uniform(0, 2 * np.pi)
        waves = 6 * np.sin(yy / 3.0 + phase)[..., None]
        base = np.array([25, 70, 150.0]) + waves + rng.normal(0.0, 5, (h, w, 3))
    elif scene == "desert":
        phase = rng.uniform(0, 2 * np.pi)
        dunes = 18 * np.sin((xx + yy) / 5.0 + phase)[..., None]
        base = np.array([215, 185, 125.0]) + dunes + rng.normal(0.0, 6, (h, w, 3))
    elif scene == "farmland":
        period = int(rng.integers(6, 11))
        stripes = ((xx if rng.random() < 0.5 else yy) // period % 2)[..., None]
        base = np.where(stripes > 0, np.array([120, 170, 60.0]), np.array([190, 170, 80.0]))
        base = base + rng.normal(0.0, 6, (h, w, 3))
    elif scene == "residential":
        cell = int(rng.integers(9, 14))
        roofs = ((xx % cell) > 2) & ((yy % cell) > 2)
        base = np.where(roofs[..., None], np.array([95, 90, 100.0]), np.array([170, 170, 170.0]))
        base = base + rng.normal(0.0, 8, (h, w, 3))
    elif scene == "snowfield":
        base = np.array([238, 240, 246.0]) + rng.normal(0.0, 4, (h, w, 3))
    else:
        raise ValueError(f"unknown scene {scene!r}")
    # Clip before the cast: a wrapped uint8 would scatter bright specks over the scene.
    img = np.clip(np.broadcast_to(base, (h, w, 3)), 0, 255).astype(np.uint8)
    for o in objs:
        _draw_optical(img, o)
    return img


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _object_size(rng, cls: str, w: int, h: int) -> tuple[int, int]:
    """Small objects: the long edge is ~4-10% of the image's long side."""
    long_edge = max(_MIN_OBJECT_PX + 1, int(round(rng.uniform(0.05, 0.10) * max(w, h))))
    aspect = {"ship": 2.5, "vehicle": 1.6, "airplane": 1.0, "person": 1.0}[cls]
    short_edge = max(_MIN_OBJECT_PX, int(round(long_edge / aspect)))
    return (long_edge, short_edge) if rng.random() < 0.5 else (short_edge, long_edge)


def _clear(box: tuple, objs: list[Obj]) -> bool:
    """`box` touches no other object's box."""
    return all(box[0] > o.box[2] or box[2] < o.box[0] or box[1] > o.box[3] or box[3] < o.box[1]
               for o in objs)


def _place(rng, objs: list[Obj], cls: str, w: int, h: int,
           region: tuple[float, float, float, float] = (0, 0, 1, 1), colour: str = "") -> None:
    """Uniform position inside `region` (fractions of the image), not touching other objects."""
    for _ in range(200):
        ow, oh = _object_size(rng, cls, w, h)
        lo_x, lo_y = int(region[0] * w), int(region[1] * h)
        hi_x, hi_y = int(region[2] * w) - ow, int(region[3] * h) - oh
        if hi_x < lo_x or hi_y < lo_y:
            continue
        x0, y0 = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
        if _clear((x0, y0, x0 + ow, y0 + oh), objs):
            objs.append(Obj(cls, (x0, y0, x0 + ow, y0 + oh), colour))
            return
    raise RuntimeError("could not place an object; image too small for the requested objects")


def _place_oriented_ship(rng, objs: list[Obj], w: int, h: int) -> None:
    """A long thin ship (HRSID's are 3-5 times longer than wide) at any angle, large enough
    (18-30% of the long side) that its outline survives the demo's 64-pixel view; its
    enclosing box keeps clear of the others. Corners clockwise from the topmost one, so the
    answer is a function of the image."""
    for _ in range(200):
        length = rng.uniform(0.18, 0.30) * max(w, h)
        width = max(float(_MIN_OBJECT_PX), length / rng.uniform(3.0, 5.0))
        angle = rng.uniform(0.0, 180.0)
        quad = rotated_corners(0.0, 0.0, length, width, angle)
        x0, y0, x1, y1 = enclosing_box(quad)
        if x1 - x0 > w - 2 or y1 - y0 > h - 2:
            continue
        cx, cy = rng.uniform(1 - x0, w - 1 - x1), rng.uniform(1 - y0, h - 1 - y1)
        quad = [v + (cx if k % 2 == 0 else cy) for k, v in enumerate(quad)]
        top = min(range(4), key=lambda k: (quad[2 * k + 1], quad[2 * k]))
        quad = tuple(quad[2 * top:] + quad[:2 * top])
        ex0, ey0, ex1, ey1 = enclosing_box(quad)
        box = (int(np.floor(ex0)), int(np.floor(ey0)), int(np.ceil(ex1)), int(np.ceil(ey1)))
        if _clear(box, objs):
            objs.append(Obj("ship", box, corners=quad))
            return
    raise RuntimeError("could not place an oriented ship; image too small")


def _mask(obj: Obj, w: int, h: int) -> np.ndarray:
    """Pixels of an object: those whose centre lies inside its corners (its box's for a
    horizontal one; a convex quadrilateral, clockwise on the screen)."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    q = box_corners(obj.box) if obj.corners is None else obj.corners
    mask = np.ones((h, w), bool)
    for k in range(4):
        ax, ay, bx, by = q[2 * k], q[2 * k + 1], q[(2 * k + 2) % 8], q[(2 * k + 3) % 8]
        mask &= (bx - ax) * (yy - ay) - (by - ay) * (xx - ax) >= 0
    return mask


def _draw_optical(img: np.ndarray, obj: Obj) -> None:
    x0, y0, x1, y1 = obj.box
    patch = img[y0:y1, x0:x1]
    if obj.cls == "ship":
        patch[...] = (245, 245, 245)
        patch[0, 0] = patch[0, -1] = patch[-1, 0] = patch[-1, -1] = (25, 70, 150)  # round ends
    elif obj.cls == "vehicle":
        patch[...] = VEHICLE_COLOURS[obj.colour]
    elif obj.cls == "airplane":
        # A light grey cross: fuselage along the long edge, wings across the middle.
        ph, pw = patch.shape[:2]
        patch[ph // 2 - max(1, ph // 8):ph // 2 + max(1, ph // 8) + 1, :] = (200, 200, 210)
        patch[:, pw // 2 - max(1, pw // 8):pw // 2 + max(1, pw // 8) + 1] = (200, 200, 210)
    else:
        raise ValueError(obj.cls)


def _sar_image(rng, w: int, h: int, objs: list[Obj]) -> np.ndarray:
    """Dark sea, bright ships, all under multiplicative gamma speckle (4-look)."""
    intensity = np.full((h, w), rng.uniform(25, 45))
    for o in objs:
        intensity[_mask(o, w, h)] = rng.uniform(190, 230)
    speckle = rng.gamma(4.0, 1.0 / 4.0, size=(h, w))  # 4 looks
    return np.clip(intensity * speckle, 0, 255).astype(np.uint8)


def _infrared_image(rng, w: int, h: int, objs: list[Obj]) -> np.ndarray:
    """Cool background with a gentle gradient; people and vehicles are hot (bright)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    g = rng.uniform(-0.3, 0.3, size=2)
    img = rng.uniform(55, 80) + g[0] * xx + g[1] * yy + rng.normal(0.0, 4, (h, w))
    for o in objs:
        x0, y0, x1, y1 = o.box
        if o.cls == "person":
            img[y0:y1, x0:x1] = 235
        else:  # vehicle: warm body, hot engine block at one end
            img[y0:y1, x0:x1] = 185
            img[y0:y0 + max(1, (y1 - y0) // 3), x0:x1] = 230
    return np.clip(img, 0, 255).astype(np.uint8)


def _multispectral_pixels(rng, w: int, h: int, targets: int) -> tuple[np.ndarray, list[Obj]]:
    """uint8 [h, w, 4] R, G, B, NIR of vegetation holding `targets` camouflaged vehicles
    (25-40% of the long side: they must survive the tiny model's 32-pixel view). R, G, B are
    drawn first and never touched again: they are the same whatever `targets` is."""
    rgb = _optical_image(rng, _pick(rng, ("forest", "farmland")), w, h)
    objs: list[Obj] = []
    for _ in range(targets):
        for _ in range(200):
            long_edge = int(round(rng.uniform(0.25, 0.40) * max(w, h)))
            ow, oh = long_edge, max(_MIN_OBJECT_PX, int(round(long_edge / 1.6)))
            if rng.random() < 0.5:
                ow, oh = oh, ow
            x0, y0 = int(rng.integers(0, w - ow + 1)), int(rng.integers(0, h - oh + 1))
            if _clear((x0, y0, x0 + ow, y0 + oh), objs):
                objs.append(Obj(CAMOUFLAGE, (x0, y0, x0 + ow, y0 + oh)))
                break
        else:
            raise RuntimeError("could not place a camouflaged vehicle; image too small")
    nir = rng.uniform(185, 200) + rng.normal(0.0, 8, (h, w))  # leaves reflect NIR strongly
    for o in objs:
        x0, y0, x1, y1 = o.box
        nir[y0:y1, x0:x1] = rng.uniform(45, 75) + rng.normal(0.0, 6, (y1 - y0, x1 - x0))
    nir = np.clip(nir, 0, 255).astype(np.uint8)
    return np.dstack([rgb, nir]), objs


def _gen_multispectral_vqa(rng, src, split, i, out, json_rel, present: bool):
    """A presence and a counting question about camouflaged vehicles, per 4-band image."""
    w, h = _image_size(rng)
    img, objs = _multispectral_pixels(rng, w, h, int(rng.integers(1, 3)) if present else 0)
    path = out.image(f"{src.image_dir}/{split}_{i:05d}.tif", img, src.bands)
    out.record(json_rel, path, _turns(
        (PRESENCE_PROMPT.format(name=CAMOUFLAGE), "yes" if objs else "no"),
        (COUNT_PROMPT.format(names=plural(CAMOUFLAGE)), str(len(objs)))))


def _write_tiff(path: str, pixels: np.ndarray, bands: tuple[str, ...]) -> None:
    """A band-interleaved-by-pixel TIFF whose GDAL_METADATA tag names each band (rasterio's
    `descriptions`), so the band order travels with the file. No tifffile metadata or date:
    equal pixels give equal bytes."""
    import tifffile  # only the multispectral sensor writes TIFF
    items = "".join(f'<Item name="DESCRIPTION" sample="{k}" role="description">{name}</Item>'
                    for k, name in enumerate(bands))
    tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="contig",
                     metadata=None, extratags=[(42112, "s", 0,
                                                f"<GDALMetadata>{items}</GDALMetadata>", True)])


# --------------------------------------------------------------------------------------------
# Records


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": who, "value": text} for q, a in pairs
            for who, text in (("human", q), ("gpt", a))]


def _norm_sorted(objs: list[Obj], w: int, h: int) -> list[tuple[float, ...]]:
    # Reading order (top to bottom, left to right) so answers are a function of the image;
    # an oriented object as its four corners.
    return [pixel_to_norm(o.box if o.corners is None else o.corners, w, h)
            for o in sorted(objs, key=lambda o: (o.box[1], o.box[0]))]


def _captions(scene: str, objs: list[Obj]) -> list[str]:
    adj, noun = SCENE_WORDS[scene]
    if not objs:
        return [f"A {adj} {noun} with no visible objects.",
                f"There is nothing but {noun} in this image.",
                f"This image shows an empty {adj} {noun}."]
    cls = objs[0].cls
    colour = objs[0].colour or "white"
    things = f"{_COUNT_WORDS[len(objs)]} {colour} {cls if len(objs) == 1 else plural(cls)}"
    verb = "is" if len(objs) == 1 else "are"
    return [f"A {adj} {noun} with {things}.",
            f"{things[0].upper()}{things[1:]} {verb} in the {noun}.",
            f"This image shows a {noun} containing {things}."]


class _Writer:
    """Images go to disk at once; records are kept per json file and written at the end."""

    def __init__(self, root: str):
        self.root = root
        self.records: dict[str, list[dict]] = {}

    def image(self, rel_path: str, pixels: np.ndarray, bands: tuple[str, ...] = ()) -> str:
        path = os.path.join(self.root, rel_path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if rel_path.endswith(".tif"):
            _write_tiff(path, pixels, bands)
        else:  # no metadata in the PNG, so equal pixels give equal bytes across runs
            Image.fromarray(pixels).save(path, format="PNG", optimize=False, compress_level=6)
        return rel_path

    def record(self, json_rel: str, image: str, conversations: list[dict]) -> None:
        self.records.setdefault(json_rel, []).append(
            {"image": image, "conversations": conversations})


def _scene_with_objects(rng, scene: str, w: int, h: int,
                        max_objs: int) -> tuple[np.ndarray, list[Obj]]:
    """Ships on sea, single-colour vehicles on land; 0..max_objs of them."""
    objs: list[Obj] = []
    n = int(rng.integers(0, max_objs + 1))
    colour = str(rng.choice(sorted(VEHICLE_COLOURS)))
    for _ in range(n):
        _place(rng, objs, "ship" if scene == "sea" else "vehicle", w, h,
               colour="" if scene == "sea" else colour)
    return _optical_image(rng, scene, w, h, objs), objs


def _gen_classification(rng, src, split, i, out: _Writer, json_rel):
    scene = _pick(rng, SCENE_CLASSES)
    w, h = _image_size(rng)
    img, _ = _scene_with_objects(rng, scene, w, h, max_objs=2)
    path = out.image(f"{src.image_dir}/{scene}/{split}_{i:05d}.png", img)
    out.record(json_rel, path, _turns((CLASSIFICATION_PROMPT, scene)))


def _gen_caption(rng, src, split, i, out, json_rel):
    scene = _pick(rng, SCENE_CLASSES)
    w, h = _image_size(rng)
    img, objs = _scene_with_objects(rng, scene, w, h, max_objs=3)
    path = out.image(f"{src.image_dir}/{split}_{i:05d}.png", img)
    out.record(json_rel, path, _turns(*zip(CAPTION_PROMPTS, _captions(scene, objs))))


def _gen_vqa(rng, src, split, i, out, json_rel, present: bool):
    """One presence question (balanced by the caller) and one counting question per image."""
    w, h = _image_size(rng)
    objs: list[Obj] = []
    if src.sensor == "optical":
        asked = "ship" if rng.random() < 0.5 else "vehicle"
        scene = "sea" if asked == "ship" else _pick(rng, LAND_SCENES)
        if not present:  # a land scene never holds ships; a "no vehicle" scene may be sea
            scene = _pick(rng, LAND_SCENES if asked == "ship" else SCENE_CLASSES)
        colour = str(rng.choice(sorted(VEHICLE_COLOURS)))
        if present:
            placed, count = asked, int(rng.integers(1, 5))
        else:
            placed = "ship" if scene == "sea" else "vehicle" if asked == "ship" else "airplane"
            count = int(rng.integers(0, 3))
        for _ in range(count):
            _place(rng, objs, placed, w, h, colour=colour if placed == "vehicle" else "")
        img = _optical_image(rng, scene, w, h, objs)
    elif src.sensor == "sar":
        asked = "ship"
        for _ in range(int(rng.integers(1, 5)) if present else 0):
            _place(rng, objs, "ship", w, h)
        img = _sar_image(rng, w, h, objs)
    else:
        asked = "person" if rng.random() < 0.5 else "vehicle"
        other = "vehicle" if asked == "person" else "person"
        for _ in range(int(rng.integers(1, 5)) if present else 0):
            _place(rng, objs, asked, w, h)
        for _ in range(int(rng.integers(0, 3))):
            _place(rng, objs, other, w, h)
        img = _infrared_image(rng, w, h, objs)
    # Mostly count the asked class; sometimes another class in view, so counts are not implied.
    candidates = sorted({o.cls for o in objs} | {asked})
    counted = asked if rng.random() < 0.7 else _pick(rng, candidates)
    path = out.image(f"{src.image_dir}/{split}_{i:05d}.png", img)
    out.record(json_rel, path, _turns(
        (PRESENCE_PROMPT.format(name=asked), "yes" if any(o.cls == asked for o in objs) else "no"),
        (COUNT_PROMPT.format(names=plural(counted)), str(sum(o.cls == counted for o in objs)))))


def _gen_rsvg(rng, src, split, i, out, json_rel):
    """Each target's phrase is unique in its image by construction: distinct vehicle colours, or
    one ship per quadrant. One grounding and one region-caption record per image (2 turns each)."""
    w, h = _image_size(rng)
    objs: list[Obj] = []
    phrases = []
    if rng.random() < 0.4:
        scene = "sea"
        for q in rng.permutation(4)[:int(rng.integers(2, 4))]:
            qx, qy = int(q) % 2, int(q) // 2
            _place(rng, objs, "ship", w, h, region=(qx / 2, qy / 2, qx / 2 + 0.5, qy / 2 + 0.5))
            phrases.append(f"The ship at the {('top', 'bottom')[qy]} {('left', 'right')[qx]}")
    else:
        scene = _pick(rng, LAND_SCENES)
        for c in rng.permutation(sorted(VEHICLE_COLOURS))[:int(rng.integers(2, 5))]:
            _place(rng, objs, "vehicle", w, h, colour=str(c))
            phrases.append(f"The {c} vehicle")
    img = _optical_image(rng, scene, w, h, objs)
    path = out.image(f"{src.image_dir}/{split}_{i:05d}.png", img)
    targets = rng.permutation(len(objs))[:2]
    pairs = [(phrases[t], boxes_to_text([pixel_to_norm(objs[t].box, w, h)])) for t in targets]
    out.record(json_rel, path, _turns(*((GROUNDING_PROMPT.format(phrase=p), b) for p, b in pairs)))
    out.record(json_rel, path,
               _turns(*((REGION_CAPTION_PROMPT.format(box=b), p) for p, b in pairs)))


def _gen_detection(rng, src, split, i, out, json_rel):
    """1-4 objects of 1-2 classes (1-2 oriented ships in `ORIENTED_SOURCES`); answer groups
    boxes per class in the source's class order.
    Every `EMPTY_SCENE_EVERY`-th image is an empty scene answered `NO_OBJECTS_ANSWER`, as real
    sets hold them (HIT-UAV: 1-1.4% of each split; SAR sea without ships)."""
    w, h = _image_size(rng)
    objs: list[Obj] = []
    n = int(rng.integers(1, 5))
    if i % EMPTY_SCENE_EVERY == EMPTY_SCENE_EVERY - 1:
        n = 0
    if src.name == "DIOR_mini":
        scene = "sea" if rng.random() < 0.35 else _pick(rng, LAND_SCENES)
        classes = ["ship"] if scene == "sea" else _pick(
            rng, [["vehicle"], ["airplane"], ["vehicle", "airplane"]])
        colour = str(rng.choice(sorted(VEHICLE_COLOURS)))
        for k in range(max(n, len(classes)) if n else 0):
            cls = classes[k % len(classes)]
            _place(rng, objs, cls, w, h, colour=colour if cls == "vehicle" else "")
        img = _optical_image(rng, scene, w, h, objs)
    elif src.name == "SSDD_mini":
        for _ in range(n):
            _place(rng, objs, "ship", w, h)
        img = _sar_image(rng, w, h, objs)
    elif src.name in ORIENTED_SOURCES:
        for _ in range(1 + (n - 1) % MAX_ORIENTED_SHIPS if n else 0):  # 1 or 2, evenly
            _place_oriented_ship(rng, objs, w, h)
        img = _sar_image(rng, w, h, objs)
    else:
        classes = _pick(rng, [["person"], ["vehicle"], ["person", "vehicle"]])
        for k in range(max(n, len(classes)) if n else 0):
            _place(rng, objs, classes[k % len(classes)], w, h)
        img = _infrared_image(rng, w, h, objs)
    groups = [(c, _norm_sorted([o for o in objs if o.cls == c], w, h))
              for c in DETECTION_CLASSES[src.name] if any(o.cls == c for o in objs)]
    path = out.image(f"{src.image_dir}/{split}_{i:05d}.png", img)
    out.record(json_rel, path, _turns((DETECTION_PROMPT, detection_to_text(groups))))


_GENERATORS = {"classification": _gen_classification, "caption": _gen_caption,
               "rsvg": _gen_rsvg, "detection": _gen_detection}


def _rng_for(seed: int, *names: str) -> np.random.Generator:
    # A stream per (seed, source, split): sizes of one source never shift another's content.
    key = [zlib.crc32(n.encode()) for n in names]
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _allocate(total: int, src: Source) -> int:
    n = max(2, int(round(total * src.weight / 600)))
    if src.task == "vqa":
        n += n % 2  # presence answers are exactly half yes, half no
    return n


def write_release(root: str, *, seed: int = 0, num_train_images: int = 600,
                  num_test_images: int = 150,
                  sources: tuple[Source, ...] = SOURCES) -> dict[str, int]:
    """Write a mini MMRS-1M release under `root/data`; returns {json path: record count}.
    `sources`: SOURCES (the demo's mix) or MULTISPECTRAL_SOURCES (4-band images only).

    Deterministic: the same seed and sizes give byte-identical files.
    """
    out = _Writer(root)
    for split, total in (("train", num_train_images), ("test", num_test_images)):
        for src in sources:
            rng = _rng_for(seed, src.name, split)
            json_rel = split_json_path(src.json_path, split)
            n = _allocate(total, src)
            if src.task == "vqa":
                present = np.zeros(n, bool)
                present[rng.permutation(n)[:n // 2]] = True
            for i in range(n):
                args = (rng, src, split, i, out, json_rel)
                if src.task != "vqa":
                    _GENERATORS[src.task](*args)
                elif src in MULTISPECTRAL_SOURCES:
                    _gen_multispectral_vqa(*args, bool(present[i]))
                else:
                    _gen_vqa(*args, bool(present[i]))
    total_train = []
    for json_rel, records in sorted(out.records.items()):
        if not json_rel.endswith("_test.json"):
            total_train += records
        _write_json(os.path.join(root, json_rel), records)
    # The real release ships an aggregate file too; consumers must skip it.
    _write_json(os.path.join(root, "data/json/total.json"), total_train)
    return {k: len(v) for k, v in sorted(out.records.items())}


def _write_json(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
        f.write("\n")


def main(argv: list[str] | None = None) -> None:
    from absl import app, flags  # imported here so the library part needs no absl flags

    flags.DEFINE_string("out", None, "Release root; `data/` is written inside it.", required=True)
    flags.DEFINE_integer("seed", 0, "Generator seed.")
    flags.DEFINE_integer("num_train_images", 600, "About this many train images in total.")
    flags.DEFINE_integer("num_test_images", 150, "About this many test images in total.")
    flags.DEFINE_bool("multispectral", False, "Write the multispectral release (4-band "
                      "R,G,B,NIR TIFFs, targets only in NIR) instead of the demo's mix.")

    def _run(_):
        f = flags.FLAGS
        counts = write_release(f.out, seed=f.seed, num_train_images=f.num_train_images,
                               num_test_images=f.num_test_images,
                               sources=MULTISPECTRAL_SOURCES if f.multispectral else SOURCES)
        for path, n in counts.items():
            print(f"{n:6d}  {path}")

    app.run(_run, argv)


if __name__ == "__main__":
    main()
