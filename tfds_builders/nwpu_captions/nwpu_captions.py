"""NWPU-Captions (Cheng et al., TGRS 2022) as captioning records with five references.

Format (shared/research/peers-and-datasets.md B.2, sample in shared/formats/captions/): the
release (github.com/HaiyanHuang98/NWPU-Captions) holds `dataset_nwpu.json`, a dict keyed by class
name whose values are lists of records with `filename`, `split` (train/val/test), `imgid`, and
the five captions `raw`, `raw_1` ... `raw_4` (each with a `sentids*` id); the images, the
31,500 NWPU-RESISC45 pictures, are `NWPU_images/<class>/<filename>`.

One record per image: five human/gpt turns, each the caption prompt and one reference caption,
which `earthgpt_jax.evaluate.runner.eval_examples` turns into one question with five references.
Every split named in the file is built.

Bad input, skipped and counted in `bad_records_<split>.json`: a missing or undecodable image, a
record that is not an object, lacks `filename`, names an unknown split or has fewer than five
non-empty captions, a class entry that is not a list. The JSON file itself unreadable is a
clear error naming it (there is nothing else to build from).
"""

from __future__ import annotations

from etils import epath

from tfds_builders import eval_common as ec

SOURCE = "NWPU-Captions"
JSON_NAME = "dataset_nwpu.json"
IMAGE_DIR = "NWPU_images"
CAPTION_KEYS = ("raw", "raw_1", "raw_2", "raw_3", "raw_4")
SPLITS = ("train", "val", "test")


class NwpuCaptions(ec.EvalBuilder):
    """NWPU-Captions images with their five reference captions (captioning)."""

    HOMEPAGE = "https://github.com/HaiyanHuang98/NWPU-Captions"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download NWPU-Captions (github.com/HaiyanHuang98/NWPU-Captions: {JSON_NAME} and "
        f"NWPU_images.tar.gz), extract the images to {IMAGE_DIR}/<class>/ next to {JSON_NAME} "
        "and pass that folder as manual_dir.")

    def _split_generators(self, dl_manager):
        root = ec.find_root(self._manual_dir(dl_manager), ("", "NWPU-Captions"), JSON_NAME,
                            self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        if not (root / IMAGE_DIR).is_dir():
            raise FileNotFoundError(f"{self.name}: image folder {root / IMAGE_DIR} not found. "
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        data = ec.read_json(root / JSON_NAME, root)  # unreadable: nothing to build, so raise
        if not isinstance(data, dict):
            raise ec.BadRecord("not_an_object",
                               f"{self.name}: {JSON_NAME} is not a class-keyed object")
        by_split: dict[str, list] = {s: [] for s in SPLITS}
        problems: list[ec.Skip] = []
        for class_name in sorted(data):
            records = data[class_name]
            if not isinstance(records, list):
                problems.append(ec.Skip(JSON_NAME, class_name, "not_a_list",
                                        "class entry is not a list"))
                continue
            for k, record in enumerate(records):
                split = record.get("split") if isinstance(record, dict) else None
                if split not in by_split:
                    problems.append(ec.Skip(JSON_NAME, f"{class_name}[{k}]", "unknown_split",
                                            f"record has no known split (got {split!r})"))
                    continue
                by_split[split].append((class_name, k, record))
        # A record without a usable split belongs to no split; it is reported with test, the
        # split this builder exists for.
        return {split: self._generate_examples(split, _candidates(root, items,
                                                         problems if split == "test" else []))
                for split, items in by_split.items() if items or split == "test"}


def _candidates(root: epath.Path, items, problems):
    yield from problems
    for class_name, k, record in items:
        yield ec.Candidate(f"{class_name}:{k}", JSON_NAME,
                           f"{class_name}[{k}]",
                           lambda c=class_name, r=record: _example(root, c, r))


def _example(root: epath.Path, class_name: str, record: dict) -> dict:
    filename = record.get("filename")
    if not isinstance(filename, str) or not filename:
        raise ec.BadRecord("no_image_path", "record has no filename")
    captions = [record.get(key) for key in CAPTION_KEYS]
    missing = [key for key, c in zip(CAPTION_KEYS, captions)
               if not isinstance(c, str) or not c.strip()]
    if missing:
        raise ec.BadRecord("missing_caption",
                           f"{filename}: caption(s) {', '.join(missing)} missing or empty")
    image = ec.load_image(root, f"{IMAGE_DIR}/{class_name}/{filename}")
    return ec.qa_example(image, SOURCE, "captioning",
                         [(ec.CAPTION_PROMPT, c) for c in captions])
