"""Turn a model's free-text answer into something a metric can compare.

Box text (grounding, detection) is parsed by `earthgpt_jax.data.boxes`, the one module that owns
the box format; this module only adds the answer-level normalisation on top: class names,
yes/no, numbers and short VQA answers.
"""

from __future__ import annotations

import re
import string

from earthgpt_jax.data import boxes as box_text

_ARTICLES = frozenset({"a", "an", "the"})

# Phrases a model (or a dataset) puts around a class name; the first that matches is removed
# from the front.
_CLASS_PREFIXES = (
    "this is an image of", "this is a picture of", "this image shows", "this image is",
    "this picture shows", "the image shows", "the scene is", "this scene is", "it is",
    "this is", "image of", "picture of", "a remote sensing image of", "remote sensing image of",
)
_CLASS_PREFIX = re.compile("^(?:" + "|".join(map(re.escape, _CLASS_PREFIXES)) + ") ")

# Names that different datasets use for the same class; left side after singularisation.
CLASS_SYNONYMS = {
    "plane": "airplane", "aeroplane": "airplane", "aircraft": "airplane", "car": "vehicle",
    "storagetank": "storage tank", "groundtrackfield": "ground track field",
    "tenniscourt": "tennis court", "basketballcourt": "basketball court",
    "baseballfield": "baseball field", "golffield": "golf field", "golf course": "golf field",
    "trainstation": "train station", "railway station": "train station", "harbour": "harbor",
}

_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
          "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
NUMBER_WORDS = ({w: i for i, w in enumerate(_UNITS)} | {w: 10 * i for i, w in enumerate(_TENS) if w}
                | {"hundred": 100})

_YES = frozenset({"yes", "yeah", "yep", "true", "correct"})
_NO = frozenset({"no", "nope", "false", "incorrect"})

_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def simple_tokens(text: str) -> list[str]:
    """Lowercase, punctuation -> space, split on whitespace (the captioning tokenizer)."""
    return str(text or "").lower().translate(_PUNCT_TABLE).split()


def normalise_class(text: str) -> str:
    """Canonical class name: 'The Planes.' -> 'airplane', 'storage_tanks' -> 'storage tank'."""
    # simple_tokens also splits at '_', '-' and '/' (punctuation): 'storage_tanks'.
    s = _CLASS_PREFIX.sub("", " ".join(simple_tokens(text)), count=1)
    words = [w for w in s.split() if w not in _ARTICLES]
    if not words:
        return ""
    # Only the head noun (last word) is plural in class names: 'storage tanks', 'tennis courts'.
    # Words like 'bus', 'campus', 'tennis', 'grass' are already singular; guarding them also
    # makes the function idempotent on names `parse_detection` has singularised once.
    if not words[-1].endswith(("us", "ss", "is")):
        words[-1] = box_text.singular(words[-1])
    s = " ".join(words)
    return CLASS_SYNONYMS.get(s, s)


def parse_yes_no(text: str) -> str | None:
    """'Yes, there is.' -> 'yes'; 'No.' -> 'no'; neither word -> None (first one wins)."""
    for tok in simple_tokens(text):
        if tok in _YES:
            return "yes"
        if tok in _NO:
            return "no"
    return None


def _words_to_number(tokens: list[str]) -> int | None:
    """First number written in words: 'twenty one' -> 21, 'three hundred' -> 300."""
    for i, tok in enumerate(tokens):
        if tok not in NUMBER_WORDS or tok == "hundred":
            continue
        value = NUMBER_WORDS[tok]
        j = i + 1
        if 20 <= value < 100 and j < len(tokens) and tokens[j] in NUMBER_WORDS \
                and NUMBER_WORDS[tokens[j]] < 10:
            value += NUMBER_WORDS[tokens[j]]
            j += 1
        if j < len(tokens) and tokens[j] == "hundred":
            value *= 100
        return value
    return None


def parse_number(text: str) -> int | None:
    """First count in an answer: '12', 'There are 1,024 cars', 'twenty-one', 'none' -> 0."""
    s = str(text or "").lower()
    m = re.search(r"\d+(?:,\d{3})*(?:\.\d+)?", s)
    if m:
        digits = m.group(0).replace(",", "")
        # Integers exactly (a 400-digit 'count' is a float overflow, not an answer to crash on).
        if "." not in digits:
            return int(digits)
        value = float(digits)
        return int(round(value)) if value != float("inf") else int(digits.split(".")[0])
    tokens = s.replace("-", " ").translate(_PUNCT_TABLE).split()
    value = _words_to_number(tokens)
    if value is None and ("none" in tokens or "no" in tokens):
        return 0
    return value


def normalise_vqa_answer(text: str) -> str:
    """VQA-style normalisation: lowercase, no punctuation or articles, number words -> digits."""
    s = str(text or "").lower().strip()
    # Keep decimal points and thousands separators inside numbers; drop other punctuation.
    s = re.sub(r"(?<=\d),(?=\d{3})", "", s)
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)
    s = s.translate(str.maketrans({c: " " for c in string.punctuation if c != "."}))
    return " ".join(str(NUMBER_WORDS[t]) if t in NUMBER_WORDS and t != "hundred" else t
                    for t in s.split() if t not in _ARTICLES)


def normalise_phrase(text: str) -> str:
    """Short free-text phrase (region captions) for exact match: tokens without articles."""
    return " ".join(t for t in simple_tokens(text) if t not in _ARTICLES)


def parse_grounding_answer(text: str) -> tuple[list[float] | None, int]:
    """First box of a grounding answer, or None; plus the malformed-entry count of the text."""
    found, n_malformed = box_text.parse_boxes(str(text or ""))
    if not found:
        return None, max(1, n_malformed)
    return [float(v) for v in found[0]], n_malformed


def parse_detection_answer(text: str) -> tuple[list[tuple[str, int, list[list[float]]]], int]:
    """Detection groups with canonical class names: [(class, stated_count, boxes)], malformed."""
    groups, n_malformed = box_text.parse_detection(str(text or ""))
    return [(normalise_class(cls), int(count) if count is not None else len(bxs),
             [[float(v) for v in b] for b in bxs]) for cls, count, bxs in groups], n_malformed
