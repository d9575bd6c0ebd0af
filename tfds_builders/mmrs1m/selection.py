"""Which records go where: the held-out validation slice and the evaluation-overlap exclusions.

Validation: a record goes to `validation` when a hash of its image path falls below the
fraction, so the choice is deterministic, independent of file order and of which other records
exist, and every record of one image (several RSVG or VQA records share an image) lands on the
same side: no image is seen in training and validated on.

Exclusions (overlap removal): MMRS-1M has no split field, and some of its images are also in
the test sets the paper evaluates on. An exclusion list names those images, one per line;
blank lines and lines starting with `#` are ignored. An entry matches an image path by, in order
of precedence:
- a path with a `/`: the image path ends with it on a folder boundary
  (`SSDD/00011.jpg` matches `data/detection/SSDD/00011.jpg`);
- a file name with an extension: the image's file name (`00011.jpg`);
- a bare stem without extension (as VOC `ImageSets/*.txt` lists ids): the file name without its
  extension (`00011`).
Matching is case-sensitive. Bare names match in every source folder; give `SOURCE/name` where
file names repeat across sources.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import Iterable

from etils import epath


def normalised_image_path(image_path: str) -> str:
    return posixpath.normpath(image_path.strip())


def validation_score(image_path: str) -> float:
    """Uniform in [0, 1) from SHA-256 of the normalised image path (stable across machines)."""
    digest = hashlib.sha256(normalised_image_path(image_path).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def in_validation(image_path: str, fraction: float) -> bool:
    return fraction > 0 and validation_score(image_path) < fraction


class ExclusionList:
    """Image paths or names to leave out of the training data (see module docstring)."""

    def __init__(self, entries: Iterable[str] = ()):
        self.suffixes: set[str] = set()
        self.names: set[str] = set()
        self.stems: set[str] = set()
        for entry in entries:
            entry = entry.strip().replace("\\", "/")
            if not entry or entry.startswith("#"):
                continue
            if "/" in entry:
                self.suffixes.add(posixpath.normpath(entry).lstrip("/"))
            elif posixpath.splitext(entry)[1]:
                self.names.add(entry)
            else:
                self.stems.add(entry)

    @classmethod
    def from_files(cls, paths: str | os.PathLike | Iterable[str | os.PathLike] | None
                   ) -> "ExclusionList":
        if paths is None:
            return cls()
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        entries: list[str] = []
        for path in paths:
            path = epath.Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"exclude_images list not found: {path}")
            entries += path.read_text(encoding="utf-8").splitlines()
        return cls(entries)

    def __len__(self) -> int:
        return len(self.suffixes) + len(self.names) + len(self.stems)

    def matches(self, image_path: str) -> bool:
        if not len(self):
            return False
        path = normalised_image_path(image_path)
        name = posixpath.basename(path)
        if name in self.names or posixpath.splitext(name)[0] in self.stems:
            return True
        parts = path.split("/")
        # Every folder-boundary suffix of the path: "a/b/c.jpg" -> "a/b/c.jpg", "b/c.jpg".
        return any("/".join(parts[k:]) in self.suffixes for k in range(len(parts) - 1))
