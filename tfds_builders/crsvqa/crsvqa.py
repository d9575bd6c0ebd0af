"""CRSVQA (= MQVQA; Zhang et al., TGRS 2023) as VQA records; EarthGPT reports 82.00 on it.

Format: UNVERIFIED. The research notes found no sample (shared/research/peers-and-datasets.md
B.3). This builder reads what the dataset's own code describes (github.com/MeimeiZhang-data/
MQVQA, `MQVQA_code/dataset.py` and `configure.py`): the release unpacks to `data/image/<id>.png`
and `data/text/<id>.txt`, one text file per image whose lines alternate question and answer
(Windows line ends; a question may end in the full-width `？`, read as `?`). Lines that are empty
after stripping are ignored before pairing.

Splits: the release ships no split file; its code evaluates on a cut of the question list. Here
`test.txt` / `train.txt` in the dataset folder (one image id per line) decide the splits when
present (e.g. the images of MMRS-1M's `MQVQA_train.json` as train, the rest as test). Without
them the image ids are sorted and the last 30% form `test`, the rest `train` (the official code
validates on the last 30%, but over its unsorted question rows; cutting by image keeps an image
out of both splits).

One record per image holding all of its question pairs (human = question, gpt = answer as
written), marked `independent`: the questions are unrelated, so the runner asks each alone and
the image is stored once. Bad input, skipped and counted: an odd number of lines, a file that
is not UTF-8, a missing or undecodable image, an id in a split file without a text file.
"""

from __future__ import annotations

from absl import logging
from etils import epath

from tfds_builders import eval_common as ec

SOURCE = "CRSVQA"
TEST_FRACTION = 0.3


class Crsvqa(ec.EvalBuilder):
    """CRSVQA / MQVQA question-answer pairs (VQA); format read from the dataset's own code."""

    HOMEPAGE = "https://github.com/MeimeiZhang-data/MQVQA"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the MQVQA/CRSVQA archive (link in github.com/MeimeiZhang-data/MQVQA), unzip it "
        "and pass the folder holding image/ and text/ (or its parent holding data/) as "
        "manual_dir. Optional: test.txt and train.txt there, one image id per line.")

    def _split_generators(self, dl_manager):
        root = ec.find_root(self._manual_dir(dl_manager), ("", "data"), "text", self.name,
                            self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        if not (root / "image").is_dir():
            raise FileNotFoundError(f"{self.name}: image folder {root / 'image'} not found. "
                                    + self.MANUAL_DOWNLOAD_INSTRUCTIONS)
        ids = sorted(p.stem for p in (root / "text").iterdir() if p.suffix == ".txt")
        splits = _split_ids(root, ids)
        return {split: self._generate_examples(split, _candidates(root, split, listed, set(ids)))
                for split, listed in splits.items()}


def _split_ids(root: epath.Path, ids: list[str]) -> dict[str, list[str]]:
    if (root / "test.txt").is_file():
        test = ec.read_lines(root / "test.txt")
        train = (ec.read_lines(root / "train.txt") if (root / "train.txt").is_file()
                 else [i for i in ids if i not in set(test)])
        return {"train": train, "test": test}
    cut = len(ids) - round(len(ids) * TEST_FRACTION)
    logging.warning("%s: no test.txt; the last %d of %d sorted image ids form the test split",
                    SOURCE, len(ids) - cut, len(ids))
    return {"train": ids[:cut], "test": ids[cut:]}


def _candidates(root: epath.Path, split: str, listed: list[str], known: set[str]):
    for line_no, image_id in enumerate(listed):
        text_file = f"text/{image_id}.txt"
        if image_id not in known:
            yield ec.Skip(f"{split}.txt", line_no, "unknown_image_id", f"no text file {text_file}")
            continue
        try:
            pairs = _qa_pairs(root / text_file)
        except ec.BadRecord as e:
            yield ec.Skip(text_file, None, e.kind, str(e))
            continue
        yield ec.Candidate(image_id, text_file, None,
                           lambda pairs=pairs, image_id=image_id: _example(root, image_id, pairs))


def _qa_pairs(path: epath.Path) -> list[tuple[str, str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ec.BadRecord("not_utf8", f"not UTF-8 text: {e}") from e
    lines = [line.strip().replace("？", "?") for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ec.BadRecord("no_questions", "empty text file: no question")
    if len(lines) % 2:
        raise ec.BadRecord("unpaired_lines",
                           f"{len(lines)} lines: questions and answers do not pair up")
    return [(lines[i], lines[i + 1]) for i in range(0, len(lines), 2)]


def _example(root: epath.Path, image_id: str, pairs: list[tuple[str, str]]) -> dict:
    image = ec.load_image(root, ec.find_image(root, "image", image_id))
    return ec.qa_example(image, SOURCE, "vqa", pairs, independent=True)
