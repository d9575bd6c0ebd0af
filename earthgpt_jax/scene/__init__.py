"""Whole Earth-observation scenes: tile a large raster, ask the model about every tile, merge
the answers on the scene grid, and write them in map coordinates (issue 18).

`python -m earthgpt_jax.scene --ckpt_dir=W --image=scene.tif --task=detect --out=result.geojson`

- `raster`: windowed reads (never the whole raster), training's band choice and stretch per
  tile (a tile is what a training chip was), nodata masked to black, the tile grid;
- `merge`: one box per object across overlapping tiles;
- `outputs`: GeoJSON in WGS84 and in the scene's CRS (pixels when it has none), PNG overview;
- here: the loop. Tiles go to an `answerer` in batches; each finished tile is appended to a
  journal (`<out>.tiles.jsonl`) before the next batch, so a killed run resumes from the tiles
  done. The answerer is `SessionAnswerer` (the shared `InferenceSession`, KV-cached decoding,
  each batch split over every device of the session's mesh: the CLI builds it with
  `data_parallel_mesh` and `DATA_PARALLEL_RULES`); tests pass a stand-in with the same two
  methods where the model is not what they test. The web chat's scene jobs (serve/scenes.py)
  call `run_scene` too, with `progress` and `should_stop`.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np

from earthgpt_jax.data import boxes as box_text
from earthgpt_jax.scene.merge import Detection, margin, merge
from earthgpt_jax.scene.outputs import overview_path, write_geojson, write_overview
from earthgpt_jax.scene.raster import SceneError, SceneReader, Tile, tile_grid

TASKS = ("detect", "ground", "ask")


def task_prompt(task: str, question: str) -> str:
    """The question every tile is asked: training's detection and grounding prompts."""
    if task not in TASKS:
        raise SceneError(f"unknown --task={task}; choose one of {', '.join(TASKS)}")
    if task != "detect" and not question:
        raise SceneError(f"--task={task} needs --question")
    if task == "ground":
        return box_text.GROUNDING_PROMPT.format(phrase=question)
    return question or box_text.DETECTION_PROMPT


# Decoding tiles is data parallel: the batch axis is split over every device of the mesh, the
# weights are replicated (no rule names their axes). Whole copies of the weights per device
# decode fastest (no weight all-gather per token) and fit: a 7B model is 14 GB in bf16.
DATA_PARALLEL_RULES = (("batch", ("data", "fsdp")),)


def data_parallel_mesh(devices=None):
    """A mesh with every device (default: all local ones) on the `data` axis."""
    import jax
    from earthgpt_jax.parallel import MESH_AXES
    devices = list(devices if devices is not None else jax.local_devices())
    return jax.sharding.Mesh(np.asarray(devices).reshape(len(devices), 1, 1), MESH_AXES)


class SessionAnswerer:
    """Tiles -> answers through an `InferenceSession` (greedy, KV-cached, batched), the batch
    split over every device of the session's mesh. The batch size is rounded up to a multiple
    of the device count and a short last batch repeats its last tile, so every device gets
    whole rows and one batch size is compiled."""

    def __init__(self, session, batch_size: int = 8, max_new_tokens: int = 256):
        devices = session.mesh.devices.size
        self.batch_size = -(-max(batch_size, 1) // devices) * devices
        self.session, self.max_new_tokens = session, max_new_tokens
        self.image_size = session.model.cfg.image_size
        self.input_bands = session.model.cfg.input_bands  # the bands each tile is read with

    def pixels(self, tile: np.ndarray) -> np.ndarray:
        return self.session.pixels(tile)

    def inputs(self, images: list[np.ndarray], prompt: str):
        """(images, tokens, valid) of one batch, padded to `batch_size` rows and placed with
        their batch axis split over the session's `data` and `fsdp` mesh axes."""
        import jax
        from earthgpt_jax.parallel import batch_sharding
        batch = np.stack(images + images[-1:] * (self.batch_size - len(images)))
        tokens, valid = self.session.prompts([([], prompt)] * self.batch_size)
        return tuple(jax.device_put(x, batch_sharding(self.session.mesh, x.ndim))
                     for x in (batch, tokens, valid))

    def answer(self, images: list[np.ndarray], prompt: str) -> list[str]:
        import jax
        from earthgpt_jax.generate import apply_stop_strings
        from earthgpt_jax.inference import STOP_STRINGS
        out = self.session.generate(*self.inputs(images, prompt),
                                    max_new_tokens=self.max_new_tokens)
        out = np.asarray(jax.device_get(out))
        return [apply_stop_strings(self.session.tokenizer.decode(row), STOP_STRINGS).strip()
                for row in out[:len(images)]]


class Journal:
    """`<out>.tiles.jsonl`: a header naming the run, then one line per finished tile."""

    def __init__(self, path: str, header: dict):
        self.path = path
        raw = pathlib.Path(path).read_bytes() if os.path.exists(path) else b""
        # A run killed mid-write leaves a partial last line: cut it, redo that tile.
        raw = raw[:raw.rfind(b"\n") + 1]
        lines = raw.decode().splitlines()
        if lines and json.loads(lines[0]) != header:
            raise SceneError(f"{path} holds another run's tiles (other scene, task or tiling); "
                             "delete it, or choose another --out")
        self.done = {r["tile"]: r for r in map(json.loads, lines[1:])}
        with open(path, "wb") as f:
            f.write(raw or (json.dumps(header) + "\n").encode())
        self._file = open(path, "a")

    def record(self, entry: dict) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()  # the OS keeps it when the process is killed
        self.done[entry["tile"]] = entry

    def close(self) -> None:
        self._file.close()


def _tile_entry(tile: Tile, answer: str | None, task: str, question: str) -> dict:
    """A tile's answer with its boxes in scene pixels (corners, oriented or not); `answer` None:
    an all-nodata tile, not asked."""
    from earthgpt_jax.inference import answer_boxes
    entry = {"tile": tile.index, "window": tile.window, "answer": answer, "corners": [],
             "labels": []}
    if task == "ask" or answer is None:
        return entry
    shapes, labels = answer_boxes(answer)
    for shape, label in zip(shapes, labels):
        pixel = box_text.norm_to_pixel(shape, tile.width, tile.height)
        quad = box_text.box_corners(pixel) if len(pixel) == 4 else pixel
        entry["corners"].append([v + (tile.col if k % 2 == 0 else tile.row)
                                 for k, v in enumerate(quad)])
        # A grounding box names no class: it is the phrase asked about.
        entry["labels"].append(label if label is not None or task != "ground" else question)
    return entry


def _detections(journal: Journal, tiles: list[Tile], width: int, height: int, task: str
                ) -> list[Detection]:
    found = []
    for index, entry in sorted(journal.done.items()):
        tile = tiles[index]
        if task == "ask":
            if entry.get("answer") is not None:
                box = (tile.col, tile.row, tile.col + tile.width, tile.row + tile.height)
                found.append(Detection(box_text.box_corners(box), None, index, entry["answer"]))
            continue
        for quad, label in zip(entry["corners"], entry["labels"]):
            found.append(Detection(tuple(quad), label, index, entry["answer"],
                                   margin(box_text.enclosing_box(quad), tile, width, height)))
    return found if task == "ask" else merge(found)


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def run_scene(image: str, out: str, answerer, *, task: str = "detect", question: str = "",
              tile: int = 0, overlap: int = -1, log=None, stop_after: int = 0,
              progress=None, should_stop=None) -> dict:
    """Answer every tile of `image`, merge, write --out and its siblings; -> a summary.
    `tile` 0: the model's input size (the answerer's `image_size`); `overlap` -1: a quarter of
    the tile. `stop_after` > 0 stops after that many batches (tests of resuming).

    `progress(event)`, when given, is called after every batch with {"done", "total",
    "tiles_per_s", "eta_s", "entries"} (the batch's journal entries: boxes in scene pixels,
    before merging); `should_stop()` is asked before every batch (the web server's cancel).
    Both run on the caller's thread; a stopped run is resumable like a killed one."""
    log = log or sys.stderr
    prompt = task_prompt(task, question)
    tile = tile or answerer.image_size
    overlap = tile // 4 if overlap < 0 else overlap
    # An answerer that names no band count (a test's stand-in) reads training's three.
    with SceneReader(image, getattr(answerer, "input_bands", 3)) as reader:
        tiles = tile_grid(reader.width, reader.height, tile, overlap)
        header = {"scene": os.path.abspath(image), "size": [reader.width, reader.height],
                  "task": task, "prompt": prompt, "tile": tile, "overlap": overlap}
        journal = Journal(out + ".tiles.jsonl", header)
        resumed = len(journal.done)
        todo = [t for t in tiles if t.index not in journal.done]
        if reader.crs is None:
            log.write(f"{image} has no georeference: coordinates are scene pixels\n")
        log.write(f"{len(tiles)} tiles of {tile} px (overlap {overlap}) over "
                  f"{reader.width} x {reader.height} px; {resumed} done before\n")
        start, decoded, skipped, shown = time.perf_counter(), 0, 0, -1.0
        try:
            for b, first in enumerate(range(0, len(todo), answerer.batch_size)):
                if (stop_after and b >= stop_after) or (should_stop and should_stop()):
                    break
                live, entries = [], []
                for t in todo[first:first + answerer.batch_size]:
                    pixels, filled = reader.read(t)
                    if filled == 0:  # all nodata: nothing to ask about
                        entries.append(_tile_entry(t, None, task, question))
                        skipped += 1
                    else:
                        live.append((t, answerer.pixels(pixels)))
                if live:
                    answers = answerer.answer([p for _, p in live], prompt)
                    entries += [_tile_entry(t, answer, task, question)
                                for (t, _), answer in zip(live, answers)]
                for entry in sorted(entries, key=lambda e: e["tile"]):
                    journal.record(entry)
                decoded += len(live)
                elapsed = time.perf_counter() - start
                left = len(tiles) - len(journal.done)
                rate = (decoded + skipped) / max(elapsed, 1e-9)
                if progress:
                    progress({"done": len(journal.done), "total": len(tiles),
                              "tiles_per_s": round(rate, 3),
                              "eta_s": round(left / max(rate, 1e-9), 1), "entries": entries})
                if elapsed - shown < 1 and left:  # a line a second at most
                    continue
                shown = elapsed
                log.write(f"tiles {len(journal.done)}/{len(tiles)}, {rate:.2f} tiles/s, "
                          f"ETA {_eta(left / max(rate, 1e-9))}\n")
                log.flush()
        finally:
            journal.close()
        seconds = time.perf_counter() - start
        summary = {"tiles": len(tiles), "resumed": resumed, "decoded": decoded,
                   "skipped_nodata": skipped, "seconds": round(seconds, 3),
                   "tiles_per_s": round(decoded / seconds, 3) if decoded else None,
                   "complete": len(journal.done) == len(tiles),
                   "georeferenced": reader.crs is not None}
        if not summary["complete"]:
            return summary
        detections = _detections(journal, tiles, reader.width, reader.height, task)
        files = write_geojson(reader, detections, out, task)
        files.append(write_overview(reader, detections, overview_path(out)))
    return dict(summary, features=len(detections), files=files)
