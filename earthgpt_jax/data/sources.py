"""What a training source is and how it is opened: `config.data.sources` and its readers.

`config.data.sources` is a comma-separated list of `KIND:PATH` or `KIND:PATH:WEIGHT` entries,
mixed by weight (default weight 1); empty means MMRS-1M from `config.data.manual_dir` (or the
generated miniature release for the demo). Kinds:

- `mmrs1m:DIR`      the MMRS-1M release (the directory holding `data/`), built by the `mmrs1m`
                    TFDS builder into `config.data.tfds_dir`; random access.
- `coco:DIR`        COCO Captions as distributed: `DIR/annotations/captions_train2017.json` and
                    `DIR/train2017/*.jpg`. One sample per caption annotation; random access (the
                    json is read once, images at map time).
- `webdataset:DIR`  image-text shards as img2dataset writes them (LAION-400M, CC3M, ...):
                    `DIR/*.tar` holding `KEY.jpg`, `KEY.txt` (caption) and `KEY.json`
                    (metadata) per sample, `*_stats.json` / `*.parquet` beside each tar. Read as a
                    stream (no preparation pass): shards shuffled per epoch by the seed, split
                    across processes, members read in order with `tarfile`'s streaming mode.
                    The iterator state is (epoch, shard position, samples read in the shard): a
                    resumed run reopens the shard, skips that many samples and goes on exactly.
- `llava:JSON[:IMAGE_ROOT][:WEIGHT]`  instruction data in the LLaVA/ShareGPT form (a JSON list
                    or JSONL of {id, image, conversations}: GeoChat-Instruct, VHM, FIT-RS,
                    LLaVA), images under IMAGE_ROOT (default: the JSON's folder); random access
                    (the file is read once, images at map time). `llava.py` has the rules. A
                    last part that is a number is the weight, anything else is the root, so
                    `llava:a.json:2` weighs 2 and `llava:a.json:imgs` reads images from `imgs`
                    (a root named like a number is written `./2`); JSON paths hold no `:`.

Captions become one-turn conversations (`CaptionRecords`): a prompt from
`config.data.caption_prompts` picked by a hash of the sample key and the seed, answered by the
caption. Bad samples (image missing or undecodable, caption missing or empty) are skipped and
counted (`BadSampleLog`): the counts per reason and a few keys are logged and written to
`WORKDIR/data_report_<kind>.json`, and more than `config.data.max_bad_fraction` of what was read
stops the run (after `min_samples`). llava records are checked the same way
(`llava.LlavaToRecord`), their reasons those of the `mmrs1m` builder.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import tarfile
import threading
import time
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from earthgpt_jax.data.images import ImageDecodeError, decode_image

KINDS = ("mmrs1m", "coco", "webdataset", "llava")
CAPTION_KINDS = ("coco", "webdataset")
COCO_ANNOTATIONS = os.path.join("annotations", "captions_train2017.json")
COCO_IMAGES = "train2017"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Bad fraction is judged only after this many samples were read, so one early corrupt file
# does not stop a run.
MIN_SAMPLES_FOR_BAD_FRACTION = 1000


# --------------------------------------------------------------------------------------------
# The spec: config.data.sources


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    path: str      # `~` expanded, absolute
    weight: float
    entry: str     # the entry as written, for messages
    written_path: str = ""  # the path as written (before `~` expansion)
    image_root: str = ""    # llava: the images' folder, `~` expanded, absolute ("" = the JSON's)

    @property
    def name(self) -> str:
        """Keys this source's part of the mixture's iterator state: the kind and the path as
        written, so a resumed run may change weights (or move home directories)."""
        return f"{self.kind}:{self.written_path or self.path}"


def parse_sources(spec: str, *, check_paths: bool = True,
                  allow_missing: Sequence[str] = ()) -> list[SourceSpec]:
    """`config.data.sources` -> its entries; one ValueError names a bad entry. `check_paths`:
    every directory must exist (kinds in `allow_missing` excepted, e.g. mmrs1m for the demo,
    whose release is generated on first use)."""
    out: list[SourceSpec] = []
    for entry in (e.strip() for e in (spec or "").split(",")):
        if not entry:
            continue
        kind, _, rest = entry.partition(":")
        kind = kind.strip()
        if kind not in KINDS:
            raise ValueError(f"config.data.sources entry {entry!r}: unknown kind {kind!r}; "
                             f"known kinds: {', '.join(KINDS)} (write KIND:PATH[:WEIGHT])")
        root = ""
        if kind == "llava":
            path, root, weight_text = _split_llava(rest)
        else:
            # A last `:` part without a `/` is the weight (so gs://... style paths stay whole).
            head, sep, tail = rest.rpartition(":")
            path, weight_text = (head, tail) if sep and "/" not in tail else (rest, None)
        path = path.strip()
        if not path:
            raise ValueError(f"config.data.sources entry {entry!r}: no path (write "
                             f"{kind}:{'JSON[:IMAGE_ROOT]' if kind == 'llava' else 'PATH'}"
                             f"[:WEIGHT])")
        weight = 1.0
        if weight_text is not None:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(f"config.data.sources entry {entry!r}: weight "
                                 f"{weight_text!r} is not a number") from None
            if not np.isfinite(weight) or weight <= 0:
                raise ValueError(f"config.data.sources entry {entry!r}: weight must be a "
                                 f"positive number, got {weight_text!r}")
        written, path = path, os.path.abspath(os.path.expanduser(path))
        root = os.path.abspath(os.path.expanduser(root)) if root else ""
        if check_paths and kind not in allow_missing:
            _check_exists(entry, kind, path, root)
        source = SourceSpec(kind, path, weight, entry, written, root)
        if any((s.kind, s.path) == (kind, path) or s.name == source.name for s in out):
            raise ValueError(f"config.data.sources entry {entry!r}: {source.name} is listed "
                             f"twice; give one entry a larger weight instead")
        out.append(source)
    if sum(s.kind == "mmrs1m" for s in out) > 1:
        raise ValueError(f"config.data.sources {spec!r}: at most one mmrs1m entry (it is built "
                         f"into config.data.tfds_dir)")
    return out


def _split_llava(rest: str) -> tuple[str, str, str | None]:
    """`JSON[:IMAGE_ROOT][:WEIGHT]` -> (JSON, IMAGE_ROOT or "", WEIGHT text or None): a last
    part that reads as a number is the weight (module docstring)."""
    parts = rest.split(":")
    weight_text = None
    if len(parts) > 1:
        try:
            float(parts[-1])
            weight_text = parts.pop()
        except ValueError:
            pass
    if len(parts) > 2:
        raise ValueError(f"config.data.sources entry 'llava:{rest}': write "
                         f"llava:JSON[:IMAGE_ROOT][:WEIGHT] (a weight is a number; paths hold "
                         f"no ':')")
    if len(parts) == 2 and not parts[1].strip():
        raise ValueError(f"config.data.sources entry 'llava:{rest}': empty image root (write "
                         f"llava:JSON[:IMAGE_ROOT][:WEIGHT])")
    return parts[0], (parts[1].strip() if len(parts) == 2 else ""), weight_text


def _check_exists(entry: str, kind: str, path: str, root: str) -> None:
    if kind != "llava" and not os.path.isdir(path):
        problem = f"directory {path} does not exist"
    elif kind == "llava" and not os.path.isfile(path):
        problem = f"the JSON file {path} does not exist"
    elif kind == "llava" and root and not os.path.isdir(root):
        problem = (f"the image root {root} is not a directory (a last part that is a number is "
                   f"the weight)")
    else:
        return
    raise ValueError(f"config.data.sources entry {entry!r}: {problem}")


def reads_release(spec: str) -> bool:
    """Training reads the MMRS-1M release: no sources listed, or an mmrs1m entry."""
    entries = parse_sources(spec, check_paths=False)
    return not entries or any(s.kind == "mmrs1m" for s in entries)


def with_release_dir(config):
    """The config whose `data.manual_dir` is the mmrs1m entry's directory, if one is listed
    (so the release checks, the TFDS build and evaluation all read that release)."""
    release = [s for s in parse_sources(config.data.sources, check_paths=False)
               if s.kind == "mmrs1m"]
    if not release or release[0].path == config.data.manual_dir:
        return config
    return config.replace(data={"manual_dir": release[0].path})


# --------------------------------------------------------------------------------------------
# Bad samples: counted, reported, bounded


class BadSamplesError(ValueError):
    """Too large a fraction of a caption source's samples could not be used."""


_WORKER = {"index": None}  # set in grain worker processes by `note_worker`


def note_worker(worker_index: int, worker_count: int) -> None:
    """grain `mp_prefetch` worker_init_fn: reports from workers get their own file."""
    del worker_count
    _WORKER["index"] = worker_index


class BadSampleLog:
    """Counts the samples read and the bad ones per reason (with a few keys and their messages,
    which quote the offending text) for one source;
    writes `report_dir/data_report_<kind>[.processP][.workerW].json` when something is bad, and
    raises `BadSamplesError` past `max_bad_fraction` (after `min_samples` read)."""

    EXAMPLES_PER_REASON = 5
    WRITE_EVERY_S = 30.0

    def __init__(self, kind: str, report_dir: str | None, max_bad_fraction: float,
                 min_samples: int = MIN_SAMPLES_FOR_BAD_FRACTION, process_index: int = 0):
        self.kind, self.report_dir = kind, report_dir
        self.max_bad_fraction, self.min_samples = max_bad_fraction, min_samples
        self.process_index = process_index
        self.read = 0
        self.bad: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = {}
        self.details: dict[str, list[str]] = {}  # "key: message", beside `examples`
        self._lock = threading.Lock()
        self._last_write = 0.0

    def __getstate__(self):  # pickled into grain workers: a copy of the counts, a new lock
        state = self.__dict__.copy()
        state.pop("_lock")
        return state

    def __setstate__(self, state):  # copy.deepcopy goes through these two as well
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def for_process(self, process_index: int) -> "BadSampleLog":
        """A fresh log of the same source for one process's part of the data."""
        return BadSampleLog(self.kind, self.report_dir, self.max_bad_fraction, self.min_samples,
                            process_index)

    @property
    def path(self) -> str | None:
        if not self.report_dir:
            return None
        suffix = f".process{self.process_index}" if self.process_index else ""
        if _WORKER["index"] is not None:
            suffix += f".worker{_WORKER['index']}"
        return os.path.join(self.report_dir, f"data_report_{self.kind}{suffix}.json")

    def as_dict(self) -> dict:
        bad = sum(self.bad.values())
        return {"kind": self.kind, "records": self.read, "good": self.read - bad, "bad": bad,
                "bad_fraction": bad / max(self.read, 1),
                "max_bad_fraction": self.max_bad_fraction,
                "bad_by_reason": dict(sorted(self.bad.items())),
                "bad_examples": {k: list(v) for k, v in sorted(self.examples.items())},
                "bad_details": {k: list(v) for k, v in sorted(self.details.items())}}

    def good_sample(self) -> None:
        with self._lock:
            self.read += 1
            self._check()

    def bad_sample(self, key: str, reason: str, message: str) -> None:
        with self._lock:
            self.read += 1
            self.bad[reason] += 1
            examples = self.examples.setdefault(reason, [])
            if len(examples) < self.EXAMPLES_PER_REASON:
                examples.append(key)
                self.details.setdefault(reason, []).append(f"{key}: {message}")
                logging.warning("%s: skipping sample %r (%s): %s", self.kind, key, reason,
                                message)
            now = time.monotonic()
            if sum(self.bad.values()) <= 10 or now - self._last_write > self.WRITE_EVERY_S:
                self._write(now, announce=len(examples) >= self.EXAMPLES_PER_REASON)
            self._check()

    def _check(self) -> None:
        bad = sum(self.bad.values())
        if self.read < self.min_samples or bad <= self.max_bad_fraction * self.read:
            return
        self._write(time.monotonic(), announce=True)
        reasons = ", ".join(f"{r}: {n} (e.g. {', '.join(repr(k) for k in self.examples[r])}; "
                            f"first: {self.details[r][0]})" for r, n in self.bad.most_common())
        raise BadSamplesError(
            f"{self.kind}: {bad} of {self.read} samples read are bad ({bad / self.read:.1%} > "
            f"config.data.max_bad_fraction={self.max_bad_fraction}): {reasons}. "
            f"Report: {self.path or '(no report dir)'}")

    def _write(self, now: float, announce: bool) -> None:
        self._last_write = now
        path = self.path
        report = self.as_dict()
        if announce:
            logging.warning("%s: %d of %d samples skipped so far %s; report %s", self.kind,
                            report["bad"], report["records"], report["bad_by_reason"], path)
        if path is None:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(report, f, indent=1)
            os.replace(path + ".tmp", path)
        except OSError as e:  # a report that cannot be written never stops training
            logging.warning("could not write %s: %s", path, e)


# --------------------------------------------------------------------------------------------
# Raw samples -> caption records


def pick_prompt(prompts: Sequence[str], key: str, seed: int) -> str:
    """The same prompt for a sample on every host, run and epoch (Python's hash() is salted)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return prompts[int.from_bytes(digest, "little") % len(prompts)]


def caption_conversation(prompt: str, caption: str) -> list[dict]:
    return [{"from": "human", "value": prompt}, {"from": "gpt", "value": caption.strip()}]


@dataclasses.dataclass
class CaptionRecords(grain.transforms.Map):
    """Raw caption sample -> the record `TrainPreprocess` reads, or None when bad (counted).

    A raw sample is {'key', 'image_path', 'caption' (str or None), 'image' (bytes or None),
    'file' (a path to read instead of 'image', or None), 'width', 'height'}. The record's
    `image` is the decoded uint8 [H, W, 3] array (decoded once, here, so an undecodable file is
    skipped rather than failing the step)."""
    kind: str
    prompts: tuple[str, ...]
    seed: int
    log: BadSampleLog

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("config.data.caption_prompts is empty: caption sources need at "
                             "least one prompt")

    def for_process(self, process_index: int) -> "CaptionRecords":
        return dataclasses.replace(self, log=self.log.for_process(process_index))

    def map(self, raw: dict) -> dict | None:
        key, caption, data = raw["key"], raw.get("caption"), raw.get("image")
        if data is None and raw.get("file"):
            try:
                with open(raw["file"], "rb") as f:
                    data = f.read()
            except OSError as e:
                self.log.bad_sample(key, "missing_image", str(e))
                return None
        if data is None:
            self.log.bad_sample(key, "missing_image", "no image in the sample")
            return None
        if caption is None:
            self.log.bad_sample(key, "missing_caption", "no caption in the sample")
            return None
        if not caption.strip():
            self.log.bad_sample(key, "empty_caption", "the caption is empty")
            return None
        try:
            pixels = decode_image(data, key)
        except ImageDecodeError as e:
            self.log.bad_sample(key, "undecodable_image", str(e))
            return None
        self.log.good_sample()
        return {"image": pixels, "image_path": raw["image_path"],
                "conversations": caption_conversation(pick_prompt(self.prompts, key, self.seed),
                                                      caption),
                "task": "caption", "source": self.kind, "sensor": "optical",
                "width": int(pixels.shape[1]), "height": int(pixels.shape[0])}


def is_record(record) -> bool:
    return record is not None


# --------------------------------------------------------------------------------------------
# COCO Captions


class CocoCaptions:
    """Random access over the caption annotations of `captions_train2017.json`: item i is the
    raw sample of annotation i (no I/O; the image is read by `CaptionRecords`)."""

    def __init__(self, root: str, annotations: str = COCO_ANNOTATIONS,
                 images: str = COCO_IMAGES):
        self.root = os.path.abspath(os.path.expanduser(root))
        path = os.path.join(self.root, annotations)
        if not os.path.isfile(path):
            raise ValueError(f"coco:{root}: the caption annotations {path} do not exist (COCO "
                             f"Captions as distributed: {annotations} and {images}/*.jpg)")
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        self.images_dir = images
        files = {im["id"]: (im["file_name"], int(im.get("width", 0) or 0),
                            int(im.get("height", 0) or 0)) for im in data.get("images", [])}
        annotations = data.get("annotations", [])
        self._ids = [int(ann.get("id", k)) for k, ann in enumerate(annotations)]
        self._files = [files.get(ann.get("image_id"), (None, 0, 0)) for ann in annotations]
        self._captions = [ann["caption"] if isinstance(ann.get("caption"), str) else None
                          for ann in annotations]
        if not self._ids:
            raise ValueError(f"coco:{root}: {path} has no caption annotations")

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> dict:
        file_name, width, height = self._files[index]
        rel = (f"{self.images_dir}/{file_name}" if file_name else
               f"<unknown image of annotation {self._ids[index]}>")
        return {"key": f"{rel}#{self._ids[index]}", "image_path": rel,
                "file": os.path.join(self.root, rel) if file_name else None, "image": None,
                "caption": self._captions[index], "width": width, "height": height}


# --------------------------------------------------------------------------------------------
# webdataset shards (img2dataset's layout), streamed


def list_shards(root: str) -> list[str]:
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise ValueError(f"webdataset:{root}: the directory does not exist")
    shards = sorted(os.path.join(root, n) for n in os.listdir(root) if n.endswith(".tar"))
    if not shards:
        raise ValueError(f"webdataset:{root}: no *.tar shards in it (img2dataset's "
                         f"output_format=webdataset writes 00000.tar, 00001.tar, ...)")
    return shards


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower()


def read_shard(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order, reading the tar as a stream."""
    key, members = None, {}
    with tarfile.open(path, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            member_key, ext = _split_member(info.name)
            if member_key != key:
                if key is not None:
                    yield key, members
                key, members = member_key, {}
            members[ext] = tar.extractfile(info).read()
    if key is not None:
        yield key, members


def raw_webdataset_sample(shard: str, key: str, members: dict[str, bytes]) -> dict:
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    caption = members.get("txt")
    width = height = 0
    if "json" in members:
        try:
            meta = json.loads(members["json"])
            width, height = int(meta.get("width") or 0), int(meta.get("height") or 0)
        except (ValueError, TypeError, AttributeError):
            pass
    name = f"{os.path.basename(shard)}/{key}"
    return {"key": name, "image_path": name, "image": image, "file": None,
            "caption": caption.decode("utf-8", "replace") if caption is not None else None,
            "width": width, "height": height}


class WebDatasetShards(grain.IterDataset):
    """Endless stream of raw samples from img2dataset shards (module docstring). Epoch e visits
    every shard once in an order shuffled by (seed, e); process i of n reads shards i::n of
    that order, and grain worker w of m (set by `mp_prefetch` through `set_slice`) shards w::m
    of those."""

    def __init__(self, shards: Sequence[str], seed: int, process_index: int = 0,
                 process_count: int = 1):
        super().__init__()
        if len(shards) < process_count:
            raise ValueError(f"webdataset: {len(shards)} shards for {process_count} processes; "
                             f"every process needs at least one shard (write smaller shards)")
        self.shards = tuple(shards)
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        self.worker_slice = slice(0, None, 1)

    def for_process(self, process_index: int, process_count: int) -> "WebDatasetShards":
        return WebDatasetShards(self.shards, self.seed, process_index, process_count)

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice  # shards are the unit either way
        self.worker_slice = sl
        if not self.epoch_shards(0):
            raise ValueError(
                f"webdataset: {len(self.shards)} shards cannot feed {self.process_count} "
                f"processes x {sl.step} grain workers; lower config.data.num_workers")

    def epoch_shards(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        mine = order[self.process_index::self.process_count][self.worker_slice]
        return [self.shards[i] for i in mine]

    def __iter__(self) -> "_ShardIterator":
        return _ShardIterator(self)

    def __str__(self) -> str:
        return (f"WebDatasetShards({len(self.shards)} shards, process {self.process_index}/"
                f"{self.process_count}, workers {self.worker_slice})")


class _ShardIterator(grain.DatasetIterator):
    def __init__(self, ds: WebDatasetShards):
        super().__init__()
        self._ds = ds
        self._epoch, self._shard_index, self._in_shard = 0, 0, 0
        self._order: list[str] | None = None
        self._reader: Iterator | None = None
        self._empty_shards = 0

    def __next__(self) -> dict:
        while True:
            if self._reader is None:
                if self._order is None:
                    self._order = self._ds.epoch_shards(self._epoch)
                if self._shard_index >= len(self._order):
                    self._epoch, self._shard_index, self._order = self._epoch + 1, 0, None
                    continue
                self._open(self._order[self._shard_index], skip=self._in_shard)
            item = next(self._reader, None)
            if item is None:
                if self._in_shard == 0:
                    self._empty_shards += 1
                    if self._empty_shards > len(self._ds.shards):
                        raise ValueError(f"webdataset: every shard read is empty: "
                                         f"{self._order}")
                self._reader = None
                self._shard_index, self._in_shard = self._shard_index + 1, 0
                continue
            self._empty_shards = 0
            self._in_shard += 1
            return raw_webdataset_sample(self._order[self._shard_index], *item)

    def _open(self, shard: str, skip: int) -> None:
        self._reader = read_shard(shard)
        for _ in range(skip):
            if next(self._reader, None) is None:
                raise ValueError(f"webdataset: cannot resume {shard} after {skip} samples: it "
                                 f"has fewer (the shard changed since the checkpoint)")

    def get_state(self) -> dict:
        return {"epoch": self._epoch, "shard_index": self._shard_index,
                "samples_in_shard": self._in_shard}

    def set_state(self, state: dict) -> None:
        self.close()
        self._order = None
        self._epoch, self._shard_index = int(state["epoch"]), int(state["shard_index"])
        self._in_shard = int(state["samples_in_shard"])

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __str__(self) -> str:
        return f"WebDatasetShardsIterator({self.get_state()})"


# --------------------------------------------------------------------------------------------
# Opening the configured sources


@dataclasses.dataclass
class TrainSource:
    """One opened entry of `config.data.sources`. Exactly one of `records` (random access:
    `len()` and `[i]`) and `stream` (a `WebDatasetShards`) is set; `to_record` (caption kinds,
    llava) turns their raw samples into records, None for bad ones."""
    spec: SourceSpec
    records: Any = None
    stream: WebDatasetShards | None = None
    to_record: Any = None  # CaptionRecords | llava.LlavaToRecord

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def weight(self) -> float:
        return self.spec.weight


def open_caption_source(spec: SourceSpec, *, prompts: Sequence[str], seed: int,
                        report_dir: str | None, max_bad_fraction: float,
                        min_samples: int = MIN_SAMPLES_FOR_BAD_FRACTION) -> TrainSource:
    """A coco or webdataset entry, opened (the COCO json is read; shards are only listed)."""
    log = BadSampleLog(spec.kind, report_dir, max_bad_fraction, min_samples)
    to_record = CaptionRecords(spec.kind, tuple(prompts), seed, log)
    if spec.kind == "coco":
        return TrainSource(spec, records=CocoCaptions(spec.path), to_record=to_record)
    if spec.kind == "webdataset":
        return TrainSource(spec, stream=WebDatasetShards(list_shards(spec.path), seed),
                           to_record=to_record)
    raise ValueError(f"{spec.entry}: not a caption source kind ({', '.join(CAPTION_KINDS)})")


def open_llava_source(spec: SourceSpec, *, report_dir: str | None, max_bad_fraction: float,
                      min_samples: int = MIN_SAMPLES_FOR_BAD_FRACTION) -> TrainSource:
    """A llava entry, opened (its JSON is read; images are read at map time)."""
    from earthgpt_jax.data import llava  # the mmrs1m record rules it reuses load only here

    log = BadSampleLog(spec.kind, report_dir, max_bad_fraction, min_samples)
    records, to_record = llava.open_records(spec.path, spec.image_root, log)
    return TrainSource(spec, records=records, to_record=to_record)


def open_sources(config, workdir: str, mmrs1m_source=None) -> list[TrainSource]:
    """`config.data.sources` opened for training. `mmrs1m_source` is the built `mmrs1m` train
    split (`prepare.data_source`), needed when an mmrs1m entry is listed."""
    specs = parse_sources(config.data.sources,
                          allow_missing=("mmrs1m",) if config.data.synthetic else ())
    out = []
    for spec in specs:
        if spec.kind == "mmrs1m":
            if mmrs1m_source is None:
                raise ValueError(f"{spec.entry}: the mmrs1m train split is not built")
            out.append(TrainSource(spec, records=mmrs1m_source))
        elif spec.kind == "llava":
            out.append(open_llava_source(spec, report_dir=workdir,
                                         max_bad_fraction=config.data.max_bad_fraction))
        else:
            out.append(open_caption_source(
                spec, prompts=tuple(config.data.caption_prompts), seed=config.data.seed,
                report_dir=workdir, max_bad_fraction=config.data.max_bad_fraction))
    return out
