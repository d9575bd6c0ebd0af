"""Whole scenes in the web chat: an uploaded raster on disk, its overview, and one background
job at a time that runs the CLI's own loop (`scene.run_scene`) with progress events.

- An upload is streamed to a file under the server's scene folder by the HTTP layer (a scene
  is never held whole in memory: it may be gigabytes); `register` then opens it with
  `scene.raster.SceneReader` (the CLI's reader) and writes a PNG overview, the only picture of
  the scene the page ever loads.
- A job is `run_scene(scene, <folder>/<task>-<hash>.geojson, SessionAnswerer(...))` on a thread
  of its own, so its GeoJSON, overview and journal are the CLI's for the same scene, tiling and
  batch size. Its progress callback appends events the page reads as Server-Sent Events; the
  job's journal makes a cancelled job (or one cut by a restart) resume when started again.
- One job at a time: the model is one, and a second scene would halve both jobs' speed while
  giving nothing sooner. Chat questions are not queued behind a scene: the engine's thread keeps
  decoding them while the job's thread decodes tiles (JAX runs both; on one GPU they share its
  compute, so a chat token may wait for the running batch of tiles, never for the whole scene;
  `--scene_batch` bounds that wait).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time

from earthgpt_jax.data.images import TooFewBandsError, kept_bands
from earthgpt_jax.scene import TASKS, SceneError, SessionAnswerer, run_scene, task_prompt
from earthgpt_jax.scene.outputs import overview_path, scene_crs_path
from earthgpt_jax.scene.raster import SceneReader
from earthgpt_jax.serve.service import ApiError, checked_question, evict_idle

# Terminal events of a job: the page closes its event stream after one of them.
FINAL = ("done", "error", "cancelled")


@dataclasses.dataclass
class SceneLimits:
    max_scene_bytes: int = 4 * 2**30
    max_scenes: int = 8  # scenes kept on disk; the oldest without a running job goes first
    max_question_chars: int = 2000


@dataclasses.dataclass
class Job:
    task: str
    question: str
    out: str  # the GeoJSON run_scene writes (its siblings beside it)
    tiling: dict  # run_scene's tile and overlap (0 and -1: the CLI's defaults)
    status: str = "running"  # running, done, error, cancelled
    events: list = dataclasses.field(default_factory=list)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    started: float = dataclasses.field(default_factory=time.time)
    progress: dict = dataclasses.field(default_factory=dict)

    def add(self, kind: str, data: dict) -> None:
        # list.append is atomic: readers on the event loop see whole events, in order.
        self.events.append(dict(data, type=kind, seq=len(self.events)))

    def facts(self) -> dict:
        return {"task": self.task, "question": self.question, "status": self.status,
                "events": len(self.events), **self.progress}


@dataclasses.dataclass
class Scene:
    id: str
    name: str
    folder: str
    path: str
    width: int
    height: int
    bands: int  # the raster's bands (the model reads training's choice of them)
    crs: str | None
    overview_size: tuple[int, int]
    job: Job | None = None

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.status == "running"

    def facts(self) -> dict:
        base = f"/api/scenes/{self.id}"
        facts = {"id": self.id, "name": self.name, "width": self.width, "height": self.height,
                 "bands": self.bands, "crs": self.crs, "georeferenced": self.crs is not None,
                 "overview_url": f"{base}/overview", "overview_size": list(self.overview_size),
                 # scene pixels per overview pixel, the same along both axes up to rounding
                 "overview_scale": self.width / self.overview_size[0],
                 "job": self.job.facts() if self.job else None}
        if self.crs is None:
            facts["note"] = (f"{self.name} has no georeference: results are in scene pixels "
                             "(x right, y down from the top-left corner)")
        return facts


def _boxes(entries: list[dict]) -> list[dict]:
    return [{"label": label, "corners": [round(v, 1) for v in corners], "tile": e["tile"]}
            for e in entries for corners, label in zip(e["corners"], e["labels"])]


class SceneJobs:
    """Uploaded scenes and the one job that may run; thread-safe."""

    def __init__(self, session, limits: SceneLimits | None = None, folder: str = "", *,
                 batch_size: int = 8, max_new_tokens: int = 256):
        self.session, self.limits = session, limits or SceneLimits()
        self._own_folder = not folder  # a folder we made is ours to delete
        self.folder = folder or tempfile.mkdtemp(prefix="earthgpt-scenes-")
        os.makedirs(self.folder, exist_ok=True)
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self._scenes: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- scenes

    def new_folder(self) -> tuple[str, str]:
        """(id, folder) for an upload about to be streamed to disk."""
        scene_id = secrets.token_urlsafe(9)
        folder = os.path.join(self.folder, scene_id)
        os.makedirs(folder)
        return scene_id, folder

    def upload_path(self, folder: str, name: str) -> str:
        """The upload's name made a safe file name in its folder (GDAL reads by content, but the
        extension helps it and the user recognise the file)."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(name))[-100:].lstrip(".")
        return os.path.join(folder, safe or "scene")

    def register(self, scene_id: str, folder: str, name: str, path: str) -> Scene:
        """Open the streamed upload as a raster and draw its overview; ApiError (and the
        folder removed) when it is not one."""
        try:
            if os.path.getsize(path) == 0:
                raise ApiError(400, f"{name}: the upload is empty; send the scene file's bytes")
            try:
                with SceneReader(path) as reader:
                    image, _ = reader.overview()
                    crs = reader.crs.to_string() if reader.crs is not None else None
                    size, bands = (reader.width, reader.height), reader.ds.count
            except SceneError:
                raise ApiError(415, f"{name}: not a raster image (GeoTIFF, TIFF, PNG, JPEG or "
                                    "another format GDAL reads)") from None
            try:  # a raster, but can the model read it? (a 4-band model and an RGB scene)
                kept_bands(bands, self.session.model.cfg.input_bands, name)
            except TooFewBandsError as e:
                raise ApiError(400, str(e)) from None
            from PIL import Image
            Image.fromarray(image).save(os.path.join(folder, "overview.png"))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        scene = Scene(scene_id, name, folder, path, *size, bands, crs,
                      (image.shape[1], image.shape[0]))
        with self._lock:
            self._scenes[scene_id] = scene
            for old in evict_idle(self._scenes, self.limits.max_scenes):
                shutil.rmtree(old.folder, ignore_errors=True)
        return scene

    def get(self, scene_id: str) -> Scene:
        with self._lock:
            scene = self._scenes.get(scene_id)
        if scene is None:
            raise ApiError(404, f"unknown scene id {scene_id!r} (never uploaded, deleted, or "
                                "pushed out by newer scenes); upload the scene again")
        return scene

    def delete(self, scene_id: str) -> None:
        scene = self.get(scene_id)
        if scene.busy:
            raise ApiError(409, f"scene {scene.name} has a job running; cancel it first")
        with self._lock:
            self._scenes.pop(scene_id, None)
        shutil.rmtree(scene.folder, ignore_errors=True)

    def _running(self) -> Scene | None:  # under self._lock
        return next((s for s in self._scenes.values() if s.busy), None)

    # ---------------------------------------------------------------- jobs

    def start(self, scene: Scene, body: dict) -> Job:
        task = body.get("task", "detect")
        question = body.get("question", "") or ""
        if task not in TASKS:
            raise ApiError(400, f"task={task!r} is not one of {', '.join(TASKS)}")
        if not isinstance(question, str):
            raise ApiError(400, "question must be a string")
        question = checked_question(question, self.limits.max_question_chars)
        try:
            task_prompt(task, question)
        except SceneError as e:  # the CLI's wording names its flags; the API's fields differ
            raise ApiError(400, str(e).replace("--task=", "task=").replace(
                "--question", "a question")) from None
        tiling = {}
        for name, low in (("tile", 0), ("overlap", -1)):  # the CLI's --tile and --overlap
            value = body.get(name, low)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ApiError(400, f"{name} must be an integer >= {low}, got {value!r}")
            tiling[name] = value
        # One result file per task, question and tiling: asking again resumes that run.
        key = hashlib.sha1(f"{task}\n{question}\n{tiling}".encode()).hexdigest()[:10]
        job = Job(task, question, os.path.join(scene.folder, f"{task}-{key}.geojson"), tiling)
        with self._lock:
            busy = self._running()
            if busy is not None:
                done = busy.job.progress
                where = f", {done['done']}/{done['total']} tiles" if done else ""
                raise ApiError(409, f"a scene job is already running ({busy.name}, "
                                    f"{busy.job.task}{where}); wait for it or cancel it")
            scene.job = job
        job.add("start", {"task": task, "question": question, "scene": scene.name})
        self._thread = threading.Thread(target=self._run, args=(scene, job),
                                        name="earthgpt-scene-job", daemon=True)
        self._thread.start()
        return job

    def cancel(self, scene: Scene) -> Job:
        if not scene.busy:
            raise ApiError(409, f"scene {scene.name} has no job running")
        scene.job.cancel.set()
        return scene.job

    def result_path(self, scene: Scene, kind: str) -> str:
        """The finished job's file: `geojson` (WGS84, or pixels), `scene_crs.geojson`, `png`."""
        job = scene.job
        if job is None or job.status != "done":
            raise ApiError(409, f"scene {scene.name} has no finished job; start one and wait "
                                "for its done event")
        path = {"geojson": job.out, "scene_crs.geojson": scene_crs_path(job.out),
                "png": overview_path(job.out)}.get(kind)
        if path is None:
            raise ApiError(404, f"no result named {kind!r}; choose geojson, scene_crs.geojson "
                                "or png")
        if not os.path.exists(path):
            raise ApiError(404, f"{scene.name} has no georeference, so there is no "
                                f"{kind} (its geojson is in scene pixels)")
        return path

    def _run(self, scene: Scene, job: Job) -> None:
        def progress(event):
            job.progress = {k: event[k] for k in ("done", "total", "tiles_per_s", "eta_s")}
            job.add("progress", dict(job.progress, boxes=_boxes(event["entries"]),
                                     windows=[e["window"] for e in event["entries"]]))

        log = _JobLog(job, scene.path, scene.name)
        try:
            answerer = SessionAnswerer(self.session, self.batch_size, self.max_new_tokens)
            summary = run_scene(scene.path, job.out, answerer, task=job.task,
                                question=job.question, log=log, progress=progress,
                                should_stop=job.cancel.is_set, **job.tiling)
            if not summary["complete"]:
                job.status = "cancelled"
                job.add("cancelled", dict(summary, message="cancelled; start the same task "
                                                           "again to continue where it stopped"))
                return
            job.status = "done"
            summary.pop("files")  # server paths: the page gets download links instead
            base = f"/api/scenes/{scene.id}/result"
            kinds = ["geojson"] + (["scene_crs.geojson"] if scene.crs is not None else []) + ["png"]
            job.add("done", dict(summary, boxes=_final_boxes(job.out, job.task == "ask"),
                                 downloads={kind: f"{base}/{kind}" for kind in kinds}))
        except Exception as e:  # noqa: BLE001 - a failed job must not take the server down
            if not isinstance(e, SceneError):
                logging.exception("scene job failed on %s", scene.name)
            job.status = "error"
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            job.add("error", {"message": f"{scene.name}: {message}"})

    def close(self, timeout: float = 30.0) -> None:
        """Cancel a running job (it stops after its batch; the journal keeps what was done)
        and remove the scene folder when the server made it."""
        with self._lock:
            scene = self._running()
        if scene is not None:
            scene.job.cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)


class _JobLog:
    """run_scene's log lines (no georeference, tile counts) as the job's `log` events."""

    def __init__(self, job: Job, path: str, name: str):
        self.job, self.path, self.name = job, path, name

    def write(self, text: str) -> None:
        for line in filter(None, text.splitlines()):
            if not line.startswith("tiles "):  # progress lines: the progress events say it
                self.job.add("log", {"message": line.replace(self.path, self.name)})

    def flush(self) -> None:
        pass


def _final_boxes(out: str, answers: bool) -> list[dict]:
    """The merged boxes of a finished run, read back from the GeoJSON it wrote (with each
    tile's answer for `ask`, where a box is the tile)."""
    with open(out) as f:
        features = json.load(f)["features"]
    return [{"label": p["class"], "corners": p["pixel_corners"], "tile": p["tile"],
             **({"answer": p["answer"]} if answers else {})}
            for p in (feature["properties"] for feature in features)]
