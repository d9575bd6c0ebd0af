"""Folder-per-class scene classification sets as classification records.

Format (shared/research/peers-and-datasets.md B.1): `<images root>/<class folder>/<image>`, the
class named by its folder. One builder serves five sets through configs:

| config        | images root (else manual_dir itself) | class list checked                  |
|---------------|--------------------------------------|-------------------------------------|
| clrs          | CLRS/                                | 25 (README; file naming unverified) |
| nasc_tg2      | NaSC-TG2/                            | no (names unverified)               |
| nwpu_resisc45 | NWPU-RESISC45/                       | 45 (TFDS list)                      |
| ucm           | UCMerced_LandUse/Images/ or Images/  | 21 (TFDS list); TIFF images         |
| aid           | AID/                                 | no (capitalisation unverified)      |

CLRS and NaSC-TG2 are EarthGPT's zero-shot classification sets (paper-digest §5.1).

Class names: the folder name through `scene_class_name`: CamelCase, `_` and `-` become spaces,
lower case (`storage_tank` -> `storage tank`, `BareLand` -> `bare land`, `bare-land` ->
`bare land`); UCM's run-together names are mapped by a fixed table (`baseballdiamond` ->
`baseball diamond`). Where the config has a class list, a folder whose name is not on it is an
unknown class: its images are skipped and counted.

Instruction: `eval_common.CLASSIFICATION_PROMPT` with every class of the set, sorted; the answer
is the image's class name.

Splits: `test.txt`, `train.txt`, `val.txt` in manual_dir (or in the images root), one image per
line, given as `<class folder>/<file>` or as the bare file name (torchgeo / VTAB lists), decide
the splits when present. Without them every image goes to `test` (CLRS and NaSC-TG2 are used
zero-shot). A listed image that does not exist is a bad record.

Other bad input, skipped and counted: an undecodable image, a file without an image extension
inside a class folder (e.g. Thumbs.db), an image path that leaves the folder.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from tfds_builders import eval_common as ec

SPLITS = ("train", "val", "test")

_CLRS = ("airport bare-land beach bridge commercial desert farmland forest golf-course highway "
         "industrial meadow mountain overpass park parking playground port railway "
         "railway-station residential river runway stadium storage-tank")
_RESISC45 = (
    "airplane airport baseball_diamond basketball_court beach bridge chaparral church "
    "circular_farmland cloud commercial_area dense_residential desert forest freeway golf_course "
    "ground_track_field harbor industrial_area intersection island lake meadow medium_residential "
    "mobile_home_park mountain overpass palace parking_lot railway railway_station "
    "rectangular_farmland river roundabout runway sea_ice ship snowberg sparse_residential "
    "stadium storage_tank tennis_court terrace thermal_power_station wetland")
# UCM writes multi-word classes run together; the spaced names are the usual reading.
UCM_NAMES = {
    "agricultural": "agricultural", "airplane": "airplane", "baseballdiamond": "baseball diamond",
    "beach": "beach", "buildings": "buildings", "chaparral": "chaparral",
    "denseresidential": "dense residential", "forest": "forest", "freeway": "freeway",
    "golfcourse": "golf course", "harbor": "harbor", "intersection": "intersection",
    "mediumresidential": "medium residential", "mobilehomepark": "mobile home park",
    "overpass": "overpass", "parkinglot": "parking lot", "river": "river", "runway": "runway",
    "sparseresidential": "sparse residential", "storagetanks": "storage tanks",
    "tenniscourt": "tennis court",
}


@dataclasses.dataclass(eq=False)
class SceneConfig(tfds.core.BuilderConfig):
    source: str = ""
    image_roots: tuple[str, ...] = ("",)
    # Normalised class names the set must use; empty = take whatever folders exist.
    classes: tuple[str, ...] = ()
    # Folder name -> class name, for names the general rule cannot split.
    name_map: tuple[tuple[str, str], ...] = ()


def scene_class_name(folder: str, name_map: dict[str, str] | None = None) -> str:
    if name_map and folder.lower() in name_map:
        return name_map[folder.lower()]
    return ec.class_phrase(folder)


def _names(words: str) -> tuple[str, ...]:
    return tuple(sorted(ec.class_phrase(w) for w in words.split()))


class SceneFolders(ec.EvalBuilder):
    """Folder-per-class scene classification (CLRS, NaSC-TG2, NWPU-RESISC45, UCM, AID)."""

    BUILDER_CONFIGS = [
        SceneConfig(name="clrs", description="CLRS (github.com/lehaifeng/CLRS), 25 classes.",
                    source="CLRS", image_roots=("CLRS", ""), classes=_names(_CLRS)),
        SceneConfig(name="nasc_tg2", description="NaSC-TG2, 10 natural-scene classes (names "
                    "taken from the folders; unverified).", source="NaSC-TG2",
                    image_roots=("NaSC-TG2", "")),
        SceneConfig(name="nwpu_resisc45", description="NWPU-RESISC45, 45 classes.",
                    source="NWPU-RESISC45", image_roots=("NWPU-RESISC45", ""),
                    classes=_names(_RESISC45)),
        SceneConfig(name="ucm", description="UC Merced Land Use, 21 classes (TIFF).",
                    source="UCMerced", image_roots=("UCMerced_LandUse/Images", "Images", ""),
                    classes=tuple(sorted(UCM_NAMES.values())),
                    name_map=tuple(UCM_NAMES.items())),
        SceneConfig(name="aid", description="AID, 30 classes (folder names as found).",
                    source="AID", image_roots=("AID", "")),
    ]
    HOMEPAGE = "https://github.com/lehaifeng/CLRS"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract the dataset and pass as manual_dir the folder whose sub-folders are the classes "
        "(or its parent: CLRS/, NaSC-TG2/, NWPU-RESISC45/, UCMerced_LandUse/Images/, AID/). "
        "Optional split files test.txt/train.txt/val.txt (one image per line) beside them.")

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        manual = self._manual_dir(dl_manager)
        root = self._images_root(manual)
        name_map = dict(cfg.name_map)
        folders = sorted(p.name for p in root.iterdir()
                         if p.is_dir() and not p.name.startswith((".", "__")))
        classes = {f: scene_class_name(f, name_map) for f in folders}
        known = set(cfg.classes) if cfg.classes else set(classes.values())
        prompt = ec.classification_prompt(sorted(known))
        if cfg.classes and not set(cfg.classes) <= set(classes.values()):
            logging.warning("%s: no folder for class(es) %s", cfg.source,
                            sorted(set(cfg.classes) - set(classes.values())))
        images, problems = [], []
        for folder in folders:
            for path in sorted((root / folder).iterdir(), key=lambda p: p.name):
                rel = f"{folder}/{path.name}"
                if path.suffix.lower() in ec.IMAGE_EXTENSIONS:
                    images.append(rel)
                elif not path.is_dir():
                    problems.append(ec.Skip(rel, None, "not_an_image",
                                            "not an image file (by extension)"))
        split_files = {s: d / f"{s}.txt" for s in SPLITS for d in (manual, root)
                       if (d / f"{s}.txt").is_file()}
        if not split_files:
            return {"test": self._generate_examples("test", self._candidates(
                root, images, problems, classes, known, prompt))}
        image_set = set(images)
        by_name = {}
        for rel in images:
            by_name.setdefault(rel.rsplit("/", 1)[-1], []).append(rel)
        out = {}
        for split, path in split_files.items():
            listed, missing = [], []
            for line_no, line in enumerate(ec.read_lines(path)):
                line = line.replace("\\", "/")
                if line in image_set or "/" in line:
                    (listed if line in image_set else missing).append((line_no, line))
                elif len(by_name.get(line, [])) == 1:
                    listed.append((line_no, by_name[line][0]))
                else:
                    missing.append((line_no, line))
            skips = [ec.Skip(f"{split}.txt", n, "missing_image", f"listed image {line} not "
                             "found (or its bare name is ambiguous)") for n, line in missing]
            out[split] = self._generate_examples(split, self._candidates(
                root, [rel for _, rel in listed], skips + (problems if split == "test" else []),
                classes, known, prompt))
        return out

    def _images_root(self, manual: epath.Path) -> epath.Path:
        for candidate in self.builder_config.image_roots:
            root = manual / candidate if candidate else manual
            # A root is a folder with at least one sub-folder that holds an image.
            if root.is_dir() and any(
                    child.suffix.lower() in ec.IMAGE_EXTENSIONS
                    for folder in root.iterdir() if folder.is_dir()
                    for child in folder.iterdir()):
                return root
        raise FileNotFoundError(
            f"{self.name}/{self.builder_config.name}: no class folders under manual_dir {manual} "
            f"(looked in {', '.join(c or '.' for c in self.builder_config.image_roots)}). "
            + self.MANUAL_DOWNLOAD_INSTRUCTIONS)

    def _candidates(self, root, images, problems, classes, known, prompt):
        yield from problems
        source = self.builder_config.source
        for rel in images:
            folder = rel.split("/", 1)[0]
            yield ec.Candidate(rel, rel, None, lambda rel=rel, folder=folder: _example(
                root, rel, classes.get(folder), known, prompt, source))


def _example(root, rel, class_name, known, prompt, source) -> dict:
    if class_name is None or class_name not in known:
        raise ec.BadRecord("unknown_class", f"unknown class folder {rel.split('/', 1)[0]!r}")
    image = ec.load_image(root, rel)
    return ec.qa_example(image, source, "classification", [(prompt, class_name)])
