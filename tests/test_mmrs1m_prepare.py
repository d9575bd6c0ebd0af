"""Preparing mmrs1m at scale: worker processes give the sequential build exactly, a killed
preparation resumes without decoding again what it had checked, progress is reported, and the
Apache Beam path (DirectRunner, in the overlay `make test` installs) writes the same examples
and reports."""

import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from earthgpt_jax.data import synthetic
from tfds_builders.mmrs1m import BadRecordsError, Mmrs1m, build
from tfds_builders.mmrs1m.image_checks import CACHE_NAME, KILL_AFTER_ENV
from tfds_builders.mmrs1m.parallel import default_num_workers
from tfds_builders.mmrs1m.progress import Progress
from tests.test_mmrs1m_builder import _write

SPLITS = ("train", "validation", "test")
VALIDATION_FRACTION = 0.2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES_JSON = "data/json/VQA/prepare_cases.json"


def _png(seed, size=(20, 14)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _add_cases(root):
    """Records that exercise the image checks: an image shared by three records, a missing
    one, a truncated one shared by two, a folder in place of a file, and a non-image."""
    q = [{"from": "human", "value": "Is there a ship?"}, {"from": "gpt", "value": "yes"}]
    folder = "data/VQA/PrepareCases"
    shared = _write(root, f"{folder}/shared.png", _png(1))
    truncated = _write(root, f"{folder}/truncated.png", _png(2, (64, 64))[:200])
    not_image = _write(root, f"{folder}/page.jpg", b"<html>gone</html>")
    os.makedirs(os.path.join(root, folder, "dir.png"))
    paths = [shared, shared, f"{folder}/missing.png", truncated, truncated, f"{folder}/dir.png",
             not_image, shared]
    _write(root, CASES_JSON, json.dumps([{"image": p, "conversations": q} for p in paths])
           .encode())


def _dataset(data_dir, builder):
    """{split: ([examples as comparable tuples, in stored order], report)}."""
    out = {}
    for split in builder.info.splits:
        src = tfds.data_source("mmrs1m", data_dir=data_dir, split=split)
        rows = []
        for i in range(len(src)):
            ex = src[i]
            rows.append(tuple((k, np.asarray(v).tolist() if not isinstance(v, (bytes, dict))
                               else v if isinstance(v, bytes)
                               else {kk: np.asarray(vv).tolist() for kk, vv in v.items()})
                              for k, v in sorted(ex.items())))
        out[split] = (rows, builder.bad_records(split))
    return out


def _distinct_images(root):
    """Image paths of the release's records that name an existing file (each decoded once)."""
    paths = set()
    for dirpath, _, files in os.walk(os.path.join(root, "data", "json")):
        for name in files:
            if name != "total.json":
                with open(os.path.join(dirpath, name)) as f:
                    paths |= {r["image"] for r in json.load(f)}
    return {p for p in paths if os.path.isfile(os.path.join(root, p))}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("release"))
    synthetic.write_release(root, seed=3, num_train_images=40, num_test_images=10)
    _add_cases(root)
    return root


def _build(release, data_dir, **kwargs):
    kwargs = {"validation_fraction": VALIDATION_FRACTION, "max_bad_fraction": 0.5, **kwargs}
    return build(release, str(data_dir), **kwargs)


@pytest.fixture(scope="module")
def sequential(release, tmp_path_factory):
    """The reference: one process, no resume cache."""
    data_dir = tmp_path_factory.mktemp("sequential")
    builder = _build(release, data_dir, num_workers=1, resume=False)
    return builder, _dataset(str(data_dir), builder)


def test_workers_give_the_sequential_build(release, sequential, tmp_path):
    builder1, want = sequential
    assert set(want) == set(SPLITS)
    got = {(b["file"], b["index"]): b["kind"] for split in ("train", "validation")
           for b in want[split][1]["bad_records"] if b["file"] == CASES_JSON}
    assert got == {(CASES_JSON, 2): "missing_image", (CASES_JSON, 3): "undecodable_image",
                   (CASES_JSON, 4): "undecodable_image", (CASES_JSON, 5): "missing_image",
                   (CASES_JSON, 6): "not_an_image"}
    builder2 = _build(release, tmp_path, num_workers=2)
    assert builder2.prepare_stats["num_workers"] == 2
    assert _dataset(str(tmp_path), builder2) == want  # same examples, order and reports
    # Each existing image decoded once, however many records share it.
    assert builder1.prepare_stats["decoded"] == builder2.prepare_stats["decoded"] == len(
        _distinct_images(release))
    assert not (tmp_path / "mmrs1m" / "all" / CACHE_NAME).exists()  # removed after success


def test_split_over_the_memory_buffer_without_tensorflow(release, sequential, tmp_path,
                                                         monkeypatch):
    """TFDS spills a split past its 1 GB shuffle buffer into bucket files through tf.io.gfile;
    with a 16 KB buffer the spill happens here, and must work without TensorFlow."""
    from tensorflow_datasets.core import shuffle

    assert "tensorflow" not in sys.modules
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 16 << 10)
    builder = _build(release, tmp_path, num_workers=1, resume=False)
    assert _dataset(str(tmp_path), builder) == sequential[1]
    assert "tensorflow" not in sys.modules


def _cache_rows(path):
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM images").fetchone()[0]


def _gone(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_killed_preparation_resumes_without_decoding_again(release, sequential, tmp_path):
    """kill -9 of the main process in the middle of the train split (after K decodes); the
    rerun decodes only the images the cache does not hold, and the dataset is the same."""
    _, want = sequential
    total = len(_distinct_images(release))
    kill_after = 20
    script = ("import sys; from tfds_builders.mmrs1m import build\n"
              "if __name__ == '__main__':\n"
              f"    build({release!r}, {str(tmp_path)!r}, num_workers=2, "
              f"validation_fraction={VALIDATION_FRACTION}, max_bad_fraction=0.5)\n")
    env = {**os.environ, KILL_AFTER_ENV: str(kill_after), "PYTHONPATH": REPO,
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
        deadline = time.monotonic() + 10  # the workers notice their parent is gone
        while not _gone(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(proc.pid), "worker processes outlived the killed preparation"
    finally:
        if not _gone(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    cache = tmp_path / "mmrs1m" / "all" / CACHE_NAME
    done = _cache_rows(cache)
    assert kill_after <= done < total
    assert not (tmp_path / "mmrs1m" / "all" / "2.1.0").exists()

    builder = _build(release, tmp_path, num_workers=2)
    assert builder.prepare_stats["decoded"] == total - done
    assert builder.prepare_stats["reused"] >= done
    assert _dataset(str(tmp_path), builder) == want
    assert not cache.exists()


def test_script_without_main_guard_prepares_in_one_process(release, sequential, tmp_path):
    """A plain script (no `if __name__ == "__main__":`) asking for worker processes: each
    spawned worker would run the script again and die; the build notices, says so, runs in one
    process and leaves a finished dataset, no `incomplete.*` folder and no resume cache."""
    _, want = sequential
    script = tmp_path / "prepare.py"
    script.write_text("from tfds_builders.mmrs1m import build\n"
                      f"b = build({release!r}, {str(tmp_path / 'tfds')!r}, num_workers=2, "
                      f"validation_fraction={VALIDATION_FRACTION}, max_bad_fraction=0.5)\n"
                      "print('workers', b.prepare_stats['num_workers'])\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": REPO,
                                            "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "workers 1" in proc.stdout
    assert "has no `if __name__ == \"__main__\":` guard" in proc.stderr
    assert "preparing in one process instead of 2" in proc.stderr
    folder = tmp_path / "tfds" / "mmrs1m" / "all"
    assert sorted(os.listdir(folder)) == ["2.1.0"]  # no incomplete.*, no resume cache
    builder = tfds.builder("mmrs1m", data_dir=str(tmp_path / "tfds"))
    assert _dataset(str(tmp_path / "tfds"), builder) == want


def test_failed_build_keeps_the_cache_and_changed_images_are_decoded_again(release, tmp_path):
    """A build stopped by max_bad_fraction keeps its cache; the rerun decodes only the images
    it does not hold and the one whose file changed since. With resume=False nothing is
    written beside the dataset."""
    with pytest.raises(BadRecordsError):
        _build(release, tmp_path, num_workers=1, max_bad_fraction=0.0)
    cache = tmp_path / "mmrs1m" / "all" / CACHE_NAME
    done = _cache_rows(cache)  # the train split's images: it failed before the others
    with sqlite3.connect(f"file:{cache}?mode=ro", uri=True) as db:
        changed = db.execute("SELECT image_path FROM images WHERE kind = '' "
                             "ORDER BY image_path LIMIT 1").fetchone()[0]
    path = os.path.join(release, changed)
    with open(path, "rb") as f:
        original = f.read()
    try:
        with open(path, "wb") as f:
            f.write(_png(5, (30, 10)))
        builder = _build(release, tmp_path, num_workers=1)
        assert builder.prepare_stats["decoded"] == len(_distinct_images(release)) - done + 1
        sizes = set()
        for split in builder.info.splits:
            src = tfds.data_source("mmrs1m", data_dir=str(tmp_path), split=split)
            sizes |= {(int(src[i]["width"]), int(src[i]["height"])) for i in range(len(src))
                      if src[i]["image_path"].decode() == changed}
        assert sizes == {(30, 10)}
    finally:
        with open(path, "wb") as f:
            f.write(original)
    other = tmp_path / "other"
    builder = _build(release, other, num_workers=1, resume=False)
    assert builder.prepare_stats["resume_cache"] is None
    assert sorted(os.listdir(other / "mmrs1m" / "all")) == ["2.1.0"]


def test_progress_lines_for_logs(release, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _build(release, tmp_path, num_workers=1, resume=False)
    lines = [r.getMessage() for r in caplog.records if " records (" in r.getMessage()]
    train = [line for line in lines if line.startswith("mmrs1m/all train: ")]
    assert len(train) == 1, lines  # a fast split: only its last line (30 s apart at most)
    done, total = train[0].split(": ")[1].split()[0].split("/")
    assert done == total and int(total) > 0 and "good " in train[0] and ", bad " in train[0]
    progress = Progress("x", 200, min_interval_s=0, tty=False)
    with caplog.at_level(logging.INFO):
        caplog.clear()
        for k in range(50):
            progress.update("bad" if k % 10 == 0 else "good")
    assert len(caplog.records) == 5  # every 5% of 200
    assert progress.line().startswith("x: 50/200 records (25%) [")
    assert progress.line().endswith("good 45, bad 5]")


def test_worker_count_option(tmp_path):
    assert default_num_workers() == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        Mmrs1m(data_dir=str(tmp_path), num_workers=0)


# --------------------------------------------------------------------------------------------
# Apache Beam (cluster preparation), with the DirectRunner


# `make test` installs Beam here (requirements-beam.txt): it needs older protobuf/pillow/pyarrow
# than .venv pins, so its build runs in a subprocess with the overlay ahead on the path.
BEAM_OVERLAY = os.path.join(REPO, ".venv", "beam-overlay")


def build_with_beam(release, data_dir, options: dict) -> None:
    """A DirectRunner build; runs in the Beam overlay's subprocess (see `_beam_build`)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    config = tfds.download.DownloadConfig(beam_runner=beam.runners.DirectRunner(),
                                          beam_options=PipelineOptions([]))
    builder = _build(release, data_dir, download_config=config, **options)
    assert builder.prepare_stats == {}  # no local workers, no resume cache


def _beam_build(release, data_dir, **options) -> subprocess.CompletedProcess:
    code = ("import json, sys; from tests.test_mmrs1m_prepare import build_with_beam; "
            "build_with_beam(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))")
    path = [BEAM_OVERLAY, REPO] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    return subprocess.run([sys.executable, "-c", code, release, str(data_dir),
                           json.dumps(options)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.skipif(not os.path.isdir(os.path.join(BEAM_OVERLAY, "apache_beam")),
                    reason="apache-beam overlay not installed (make install-dev installs it)")
def test_beam_build_equals_the_local_build(release, sequential, tmp_path):
    _, want = sequential
    proc = _beam_build(release, tmp_path / "beam")
    assert proc.returncode == 0, proc.stderr[-3000:]
    builder = Mmrs1m(data_dir=str(tmp_path / "beam"))
    assert _dataset(str(tmp_path / "beam"), builder) == want

    # The report step fails the pipeline past max_bad_fraction, as the local build fails.
    proc = _beam_build(release, tmp_path / "strict", max_bad_fraction=0.0)
    assert proc.returncode != 0
    assert "BadRecordsError" in proc.stderr and "max_bad_fraction 0.0" in proc.stderr
    with open(tmp_path / "strict" / "mmrs1m" / "all" / "bad_records_train.json") as f:
        assert json.load(f)["bad_records"] == want["train"][1]["bad_records"]


def test_readme_tfds_snippet_runs_as_pasted(tmp_path):
    """README, "MMRS-1M through TFDS": the code block, unchanged, run as a script file (its
    worker processes re-import it) in an empty folder."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("### MMRS-1M through TFDS"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n",
                                                                                   10)]
    (tmp_path / "snippet.py").write_text(code)
    proc = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "records; first:" in proc.stdout
    assert (tmp_path / "tfds_data" / "mmrs1m" / "all").is_dir()
