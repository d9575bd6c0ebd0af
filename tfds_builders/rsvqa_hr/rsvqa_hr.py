"""RSVQA-HR test set 2 (Lobry et al., TGRS 2020), presence and comparison questions, as VQA
records: EarthGPT's zero-shot RSVQA-HR protocol (shared/research/paper-digest.md §5.3).

Format (shared/research/peers-and-datasets.md B.3, real files in shared/formats/rsvqa/RSVQA-HR/):
the Zenodo release (record 6344367) holds, per split, three JSON files:
`USGS_split_<split>_questions.json` = {"questions": [{id, img_id, type, question, answers_ids,
active, ...}]}, `..._answers.json` = {"answers": [{id, question_id, answer, active, ...}]} and
`..._images.json` = {"images": [{id, active, questions_ids, ...}]} (inactive entries may be just
{id, active: false}); images are `Data/<img_id>.png` (older copies: `.tif`). Test set 2 is the
`test_phili` split (Philadelphia).

One record per image, holding all of its active `presence` and `comp` questions (the paper's
two columns) in question-id order, each turn pair = the question as written and its active
answer, marked `independent`: the eval runner asks each question alone (never after another's
answer) and batches them across the image. The real split has about 100 questions per image
(about 59 presence/comparison), so storing the image once instead of once per question cuts
the prepared test set from about 49 GB to under 1 GB (benchmarks/rsvqa_hr_size.py). Inactive
questions and the count/area types are left out by design and logged with their numbers, not
reported as bad.

Bad input, skipped and counted in `bad_records_test.json`: an unreadable questions/answers/images
file (then nothing can be built and the threshold stops the build); a question without an active
answer (one entry; the image's other questions are kept); an image whose entry is missing or
inactive, or whose file is missing or undecodable (one entry naming how many questions it took).
"""

from __future__ import annotations

from absl import logging
from etils import epath

from tfds_builders import eval_common as ec

SOURCE = "RSVQA-HR"
SPLIT_FILES = {"test": "test_phili"}   # TFDS split -> the release's split name
QUESTION_TYPES = ("presence", "comp")
IMAGE_DIR = "Data"


class RsvqaHr(ec.EvalBuilder):
    """RSVQA-HR test set 2: presence and comparison questions (VQA)."""

    HOMEPAGE = "https://rsvqa.sylvainlobry.com/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download RSVQA-HR from Zenodo (record 6344367), extract it and pass the folder holding "
        "USGS_split_test_phili_{questions,answers,images}.json and Data/ as manual_dir.")

    def _split_generators(self, dl_manager):
        manual = self._manual_dir(dl_manager)
        splits = {}
        for split, name in SPLIT_FILES.items():
            root = ec.find_root(manual, ("", "RSVQA-HR", "RSVQAHR"),
                                f"USGS_split_{name}_questions.json", self.name,
                                self.MANUAL_DOWNLOAD_INSTRUCTIONS)
            for kind in ("answers", "images"):
                if not (root / f"USGS_split_{name}_{kind}.json").is_file():
                    raise FileNotFoundError(
                        f"{self.name}: {root / f'USGS_split_{name}_{kind}.json'} not found. "
                        + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
            splits[split] = self._generate_examples(split, _candidates(root, name))
        return splits


def _load(root: epath.Path, name: str, kind: str) -> dict:
    """{id: entry} of one of the three files; BadRecord naming the file when unreadable."""
    file = f"USGS_split_{name}_{kind}.json"
    data = ec.read_json(root / file, root)
    entries = data.get(kind) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ec.BadRecord("unreadable_json", f"{file}: no '{kind}' list")
    return {e["id"]: e for e in entries if isinstance(e, dict) and "id" in e}


def _candidates(root: epath.Path, name: str):
    questions_file = f"USGS_split_{name}_questions.json"
    try:
        questions, answers, images = (_load(root, name, kind)
                                      for kind in ("questions", "answers", "images"))
    except ec.BadRecord as e:
        yield ec.Skip(questions_file, None, e.kind, str(e))
        return
    wanted = [q for q in questions.values()
              if q.get("active") and q.get("type") in QUESTION_TYPES]
    logging.info("%s %s: %d of %d questions are active %s questions; the rest are left out by "
                 "design", SOURCE, name, len(wanted), len(questions), "/".join(QUESTION_TYPES))
    by_image: dict[str, list[tuple[dict, str]]] = {}
    for q in sorted(wanted, key=lambda q: q["id"]):
        answer = next((answers[a] for a in q.get("answers_ids") or []
                       if a in answers and answers[a].get("active")), None)
        if answer is None or not isinstance(answer.get("answer"), str):
            yield ec.Skip(questions_file, q["id"], "no_answer",
                          f"question {q['id']}: no active answer")
            continue
        by_image.setdefault(q.get("img_id"), []).append((q, answer["answer"]))
    for img_id, pairs in sorted(by_image.items(), key=lambda kv: str(kv[0])):
        yield ec.Candidate(str(img_id), questions_file, f"image {img_id}",
                           lambda img_id=img_id, pairs=pairs: _example(root, img_id, pairs,
                                                                       images))


def _example(root: epath.Path, img_id, pairs: list[tuple[dict, str]], images: dict) -> dict:
    entry = images.get(img_id)
    lost = f"its {len(pairs)} question(s) {[q['id'] for q, _ in pairs][:5]}"
    if entry is None or not entry.get("active"):
        raise ec.BadRecord("image_inactive", f"image {img_id} missing or inactive in the images "
                                             f"file: {lost} skipped")
    try:
        image = ec.load_image(root, ec.find_image(root, IMAGE_DIR, str(img_id)))
    except ec.BadRecord as e:
        raise ec.BadRecord(e.kind, f"{e}: {lost} skipped") from e
    return ec.qa_example(image, SOURCE, "vqa", [(q.get("question"), a) for q, a in pairs],
                         independent=True)
