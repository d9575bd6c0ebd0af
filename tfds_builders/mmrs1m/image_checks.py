"""The expensive part of a record: reading its image and proving it decodes; and the resume cache.

`read_images` runs in worker processes (`parallel.py`): it reads each file and decodes it with
the pipeline's own decoder (`earthgpt_jax.data.images.decode_image`, so what is stored is what
training can read), giving the size of the decoded image (after EXIF orientation) or the reason
it cannot be used. `ImageChecks` runs in the main process: it decides which images need
decoding, finishes each record's outcome in order, and remembers every decode in a cache:

- Resume cache (`resume=True`, the default for a local `data_dir`): an SQLite file in WAL mode,
  `<data_dir>/mmrs1m/<config>/prepare_cache.sqlite`, beside the prepared data and not in the
  version folder TFDS deletes when a build fails. One row per image: the record's image path,
  the file's size and mtime (ns), and the decoded width/height or the reason kind and message.
  Rows are committed after every chunk, so a preparation killed at any point (`kill -9`) loses
  at most the chunks in flight (a power loss, at most the commits not yet synced: WAL with
  synchronous=NORMAL never leaves a corrupt file); the rerun reads the files again (their bytes
  go into the examples) but decodes only images without a row, or whose size or mtime changed.
  The cache also decodes an image once when several records share it. It is removed after a
  successful build, and emptied when `max_image_pixels` or the builder version changes.
- Without it (`resume=False`, or a `data_dir` on an object store, where SQLite cannot write):
  the last 4096 images are remembered in memory, for records sharing an image.

Crash injection for tests: with `EARTHGPT_PREPARE_KILL_AFTER=K` in the environment the main
process kills itself (SIGKILL) right after the first chunk commit that brings this run's
decodes to K or more.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import sqlite3

from absl import logging
from etils import epath

from earthgpt_jax.data.images import ImageDecodeError, decode_image
from tfds_builders.mmrs1m.report import BadRecord

CACHE_NAME = "prepare_cache.sqlite"
KILL_AFTER_ENV = "EARTHGPT_PREPARE_KILL_AFTER"
_MEMORY_CACHE_SIZE = 4096

# (width, height, kind, message) of a decode: kind and message empty for a usable image.
Checked = tuple[int, int, str, str]
# (size in bytes, mtime in ns) of a file: a cached result is used only while these match.
FileStamp = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class ImageJob:
    path: str                   # the file to read
    image_path: str             # as the record writes it: messages name it, the cache keys it
    max_pixels: int
    decode: bool = True         # False: an earlier job of this image decodes it
    known: FileStamp | None = None  # the cached result's stamp: skip decoding while it matches

    def __str__(self) -> str:
        return self.image_path


@dataclasses.dataclass(frozen=True)
class ImageRead:
    data: bytes = b""
    stamp: FileStamp | None = None
    checked: Checked | None = None              # None: not decoded here
    error: tuple[str, str] | None = None        # (kind, message): the file could not be read


def check_decodes(data: bytes, image_path: str, max_pixels: int) -> Checked:
    try:
        pixels = decode_image(data, image_path, max_pixels=max_pixels)
    except ImageDecodeError as e:
        return 0, 0, e.kind, f"{e.kind.replace('_', ' ')}: {e}"
    return int(pixels.shape[1]), int(pixels.shape[0]), "", ""


def _stamp(path: str) -> FileStamp:
    if "://" not in path:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    st = epath.Path(path).stat()
    return int(st.length), int(float(st.mtime or 0) * 1e9)


def read_image(job: ImageJob) -> ImageRead:
    """Reads one image and, unless its stamp matches `job.known`, decodes it."""
    try:
        try:
            stamp = _stamp(job.path)
        except (FileNotFoundError, NotADirectoryError):
            raise BadRecord("missing_image", f"missing image {job.image_path}") from None
        path = epath.Path(job.path)
        if not path.is_file():
            raise BadRecord("missing_image", f"missing image {job.image_path} (not a file)")
        data = path.read_bytes()
        checked = None
        if job.decode and stamp != job.known:
            checked = check_decodes(data, job.image_path, job.max_pixels)
        return ImageRead(data, stamp, checked)
    except BadRecord as e:
        return ImageRead(error=(e.kind, str(e)))
    except Exception as e:  # a surprise in one image must not end a long build
        return ImageRead(error=("unexpected_error", f"{type(e).__name__}: {e}"))


def read_images(jobs: list[ImageJob]) -> list[ImageRead]:
    """The worker call of `parallel.ChunkPool`: one chunk of jobs."""
    return [read_image(job) for job in jobs]


class MemoryCache:
    """The last images decoded, in memory only."""

    path = None

    def __init__(self, size: int = _MEMORY_CACHE_SIZE):
        self.size = size
        self._rows: collections.OrderedDict = collections.OrderedDict()

    def get(self, image_path: str) -> tuple[FileStamp, Checked] | None:
        row = self._rows.get(image_path)
        if row is not None:
            self._rows.move_to_end(image_path)
        return row

    def put(self, image_path: str, stamp: FileStamp, checked: Checked) -> None:
        self._rows[image_path] = (stamp, checked)
        self._rows.move_to_end(image_path)
        if len(self._rows) > self.size:
            self._rows.popitem(last=False)

    def __len__(self) -> int:
        return len(self._rows)

    def commit(self) -> None:
        pass

    def close(self, remove: bool = False) -> None:
        pass


class SqliteCache:
    """The resume cache (module docstring): one row per image, committed per chunk."""

    def __init__(self, path: epath.Path, settings: dict):
        self.path = epath.Path(path)
        try:
            self._open(settings)
        except sqlite3.Error as e:
            raise RuntimeError(f"resume cache {self.path}: {type(e).__name__}: {e} (delete the "
                               "file, or build with resume=False)") from e

    def _open(self, settings: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(os.fspath(self.path))
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash never corrupts the file
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS images (image_path TEXT PRIMARY KEY, "
                         "size INTEGER, mtime_ns INTEGER, width INTEGER, height INTEGER, "
                         "kind TEXT, message TEXT)")
        wanted = json.dumps(settings, sort_keys=True)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()
        if row is not None and row[0] != wanted:
            logging.warning("resume cache %s was written with other settings (%s, now %s); "
                            "starting it afresh", self.path, row[0], wanted)
            self._db.execute("DELETE FROM images")
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('settings', ?)", (wanted,))
        self._db.commit()
        count = len(self)
        if count:
            logging.info("resuming: %d images already checked in %s", count, self.path)

    def get(self, image_path: str) -> tuple[FileStamp, Checked] | None:
        row = self._db.execute("SELECT size, mtime_ns, width, height, kind, message FROM "
                               "images WHERE image_path = ?", (image_path,)).fetchone()
        return None if row is None else (tuple(row[:2]), tuple(row[2:]))

    def put(self, image_path: str, stamp: FileStamp, checked: Checked) -> None:
        self._db.execute("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (image_path, *stamp, *checked))

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM images").fetchone()[0]

    def commit(self) -> None:
        self._db.commit()

    def close(self, remove: bool = False) -> None:
        self._db.commit()
        self._db.close()
        if remove:
            for suffix in ("", "-wal", "-shm"):
                epath.Path(os.fspath(self.path) + suffix).unlink(missing_ok=True)


def open_cache(folder: epath.Path | None, settings: dict) -> MemoryCache | SqliteCache:
    """The resume cache in `folder`, or a memory cache when `folder` is None or remote."""
    if folder is None:
        return MemoryCache()
    if "://" in os.fspath(folder):
        logging.warning("no resume cache: %s is not a local folder (SQLite needs one); a "
                        "rerun after a crash decodes every image again", folder)
        return MemoryCache()
    return SqliteCache(epath.Path(folder) / CACHE_NAME, settings)


class ImageChecks:
    """Finishes the `image` outcomes of `walk.py` in order; counts decodes and cache hits."""

    def __init__(self, cache: MemoryCache | SqliteCache, max_pixels: int):
        self.cache = cache
        self.max_pixels = max_pixels
        self.decoded = 0   # images decoded by this run
        self.reused = 0    # image checks answered by the cache (earlier run or earlier record)
        self._decoding: collections.Counter = collections.Counter()  # in-flight decode jobs
        kill_after = os.environ.get(KILL_AFTER_ENV)
        self._kill_after = int(kill_after) if kill_after else None

    def job(self, outcome) -> ImageJob | None:
        """The job of an outcome that waits for its image; called when its chunk is sent."""
        if outcome.status != "image":
            return None
        path, image_path = outcome.image
        if self._decoding[image_path]:  # decoded by a job still in flight; finish() looks up
            return ImageJob(path, image_path, self.max_pixels, decode=False)
        row = self.cache.get(image_path)
        self._decoding[image_path] += 1
        return ImageJob(path, image_path, self.max_pixels, known=row[0] if row else None)

    def finish(self, outcome, job: ImageJob, read: ImageRead) -> None:
        """Makes an `image` outcome good or bad from its job's result; called in input order."""
        if job.decode:
            self._decoding[job.image_path] -= 1
            if not self._decoding[job.image_path]:
                del self._decoding[job.image_path]
        if read.error is not None:
            outcome.to_bad(*read.error)
            return
        checked, fresh = read.checked, read.checked is not None
        if not fresh:  # not decoded in the worker: the cache knows it
            row = self.cache.get(job.image_path)
            if row is not None and row[0] == read.stamp:
                checked = row[1]
                self.reused += 1
            else:  # the file changed since, or the row was evicted from the memory cache
                checked, fresh = check_decodes(read.data, job.image_path, self.max_pixels), True
        if fresh:
            self.decoded += 1
            self.cache.put(job.image_path, read.stamp, checked)
        width, height, kind, message = checked
        if kind:
            outcome.to_bad(kind, message)
        else:
            outcome.to_good(read.data, width, height)

    def commit(self) -> None:
        """After each chunk: rows reach the disk, so a crash after this loses none of them."""
        self.cache.commit()
        if self._kill_after is not None and self.decoded >= self._kill_after:
            logging.warning("%s=%d: killing this process after %d decodes (crash test)",
                            KILL_AFTER_ENV, self._kill_after, self.decoded)
            os.kill(os.getpid(), signal.SIGKILL)
