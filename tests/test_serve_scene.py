"""The web chat takes a whole scene (issue 18 item 3), over real HTTP on the tiny checkpoint of
tests/test_serve_api.py: upload a GeoTIFF (streamed to disk), its overview, a background job
that runs the CLI's loop with progress events, the GeoJSON download, and the errors.

The scene is six 64 px cells, each exactly the model's view of one of the two training images
(ships, or the red vehicle, centre-padded to a square), so the tiny model answers every tile as
it was trained to and the boxes are known.
"""

import http.client
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from earthgpt_jax.data.images import square_and_resize
from earthgpt_jax.scene.__main__ import main as scene_main
from earthgpt_jax.scene.outputs import PIXELS
from tests.test_scene import _write
from tests.test_serve_api import ServerThread, call, trained_workdir

# Which training image each 64 px cell of the 192 x 128 scene shows.
CELLS = [["ships", "vehicle", "ships"], ["vehicle", "ships", "vehicle"]]
TILING = {"tile": 64, "overlap": 0}  # one tile per cell

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def _views(trained_work) -> dict:
    return {name: square_and_resize(np.asarray(Image.open(
        os.path.join(trained_work, f"{name}.png")).convert("RGB")), 64)
        for name in ("ships", "vehicle")}


def mosaic_scene(trained_work, path) -> str:
    """The 192 x 128 UTM GeoTIFF of `CELLS` (also the browser test's scene)."""
    views = _views(trained_work)
    mosaic = np.concatenate([np.concatenate([views[n] for n in row], axis=1) for row in CELLS])
    return _write(path, np.moveaxis(mosaic, -1, 0))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from earthgpt_jax.serve.__main__ import build_service
    from earthgpt_jax.serve.scenes import SceneLimits
    trained = trained_workdir(tmp_path_factory)
    # Batches of 4 tiles: the scene takes two, so a job can be cancelled between them.
    service = build_service(trained["work"], scene_limits=SceneLimits(max_scene_bytes=400_000),
                            scene_batch=4, scene_max_new_tokens=80)
    work = tmp_path_factory.mktemp("scenes")
    scene = mosaic_scene(trained["work"], work / "mosaic.tif")
    plain = _write(work / "plain.tif", np.moveaxis(_views(trained["work"])["ships"], -1, 0),
                   crs=None)
    with ServerThread(service) as server:
        yield dict(trained, server=server, service=service, scene=scene, plain=plain,
                   work=str(work), trained_work=trained["work"])
    assert not os.path.exists(service.scenes.folder)  # its uploads go with the server


def upload(served, path, name=None):
    with open(path, "rb") as f:
        return call(served, "POST", f"/api/scenes?name={name or os.path.basename(path)}",
                    f.read())


def get_bytes(served, path):
    """(response, body bytes) of a GET: pictures and downloads."""
    conn = http.client.HTTPConnection("127.0.0.1", served["server"].port, timeout=30)
    conn.request("GET", path)
    response = conn.getresponse()
    return response, response.read()


def events(served, sid, after=None):
    """The job's events, read as the page's EventSource reads them, until the last one."""
    query = f"?after={after}" if after is not None else ""
    status, text = call(served, "GET", f"/api/scenes/{sid}/events{query}")
    assert status == 200, text
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"]), int(lines["id"])))
    return out


def test_scene_uploads_and_jobs_refuse_bad_input_in_one_line(served):
    status, body = call(served, "POST", "/api/scenes?name=notes.txt", b"hello, world")
    assert status == 415 and body["error"].startswith("notes.txt: not a raster image"), body
    status, body = call(served, "POST", "/api/scenes?name=empty.tif", b"")
    assert status == 400 and body["error"] == ("empty.tif: the upload is empty; send the scene "
                                               "file's bytes")
    big = os.urandom(450_000)
    status, body = call(served, "POST", "/api/scenes?name=big.tif", big)
    assert status == 413 and body["error"] == ("big.tif is 450000 bytes; the limit for scenes "
                                               "is 400000 bytes (--max_scene_mb)")
    status, body = call(served, "POST", "/api/scenes?name=big.tif",
                        (big[i:i + 100_000] for i in range(0, len(big), 100_000)), chunked=True)
    assert status == 413 and "over the limit for scenes of 400000 bytes" in body["error"], body
    folder = served["service"].scenes.folder
    assert os.listdir(folder) == []  # refused uploads leave nothing on disk
    status, body = call(served, "GET", "/api/scenes/nope")
    assert status == 404 and "unknown scene id 'nope'" in body["error"]
    status, facts = upload(served, served["scene"])
    assert status == 201, facts
    for job, fragment in (({"task": "count"}, "task='count' is not one of detect, ground, ask"),
                          ({"task": "ground"}, "task=ground needs a question"),
                          ({"tile": -5}, "tile must be an integer >= 0, got -5")):
        status, body = call(served, "POST", f"/api/scenes/{facts['id']}/job", job)
        assert status == 400 and fragment in body["error"], body
    for path in ("events", "result/geojson"):
        status, body = call(served, "GET", f"/api/scenes/{facts['id']}/{path}")
        assert status in (404, 409) and "mosaic.tif has no" in body["error"], body
    # The chat's own upload, sent a whole scene, points to the scene page.
    status, body = call(served, "POST", "/api/conversations?name=big.tif", os.urandom(26 << 20))
    assert status == 413 and body["error"].endswith("use the scene page, /scene"), body


def test_detect_all_streams_tiles_and_its_geojson_equals_the_cli(served, capsys):
    status, facts = upload(served, served["scene"])
    assert status == 201 and facts["georeferenced"] and "note" not in facts, facts
    assert (facts["width"], facts["height"], facts["bands"]) == (192, 128, 3)
    assert facts["crs"] == "EPSG:32633" and facts["overview_size"] == [192, 128]
    sid = facts["id"]
    response, data = get_bytes(served, facts["overview_url"])
    assert response.getheader("Content-Type") == "image/png"  # what the page shows, not the TIFF
    assert Image.open(io.BytesIO(data)).size == (192, 128)
    status, job = call(served, "POST", f"/api/scenes/{sid}/job", dict(task="detect", **TILING))
    assert status == 202 and job["status"] == "running", job
    status, body = call(served, "POST", f"/api/scenes/{sid}/job", {"task": "detect"})
    assert status == 409 and body["error"].startswith("a scene job is already running "
                                                      "(mosaic.tif, detect"), body
    # The chat keeps answering while the job decodes tiles.
    with open(os.path.join(served["trained_work"], "ships.png"), "rb") as f:
        status, conv = call(served, "POST", "/api/conversations?name=ships.png", f.read())
    from earthgpt_jax.data import boxes
    status, reply = call(served, "POST", f"/api/conversations/{conv['id']}/messages",
                         {"question": boxes.DETECTION_PROMPT, "stream": False,
                          "max_new_tokens": 64})
    assert status == 200 and reply["answer"] == served["answers"][boxes.DETECTION_PROMPT +
                                                                  "ships"]
    seen = events(served, sid)
    kinds = [kind for kind, _, _ in seen]
    assert kinds[0] == "start" and kinds[-1] == "done" and [i for *_, i in seen] == list(
        range(len(seen)))
    progress = [data for kind, data, _ in seen if kind == "progress"]
    assert [p["done"] for p in progress] == [4, 6] and {p["total"] for p in progress} == {6}
    assert all(p["tiles_per_s"] > 0 and p["eta_s"] >= 0 for p in progress)
    assert progress[-1]["eta_s"] == 0
    assert sorted(w for p in progress for w in p["windows"]) == sorted(
        [c, r, 64, 64] for r in (0, 64) for c in (0, 64, 128))
    # The boxes found so far, as tiles fill in, and the merged ones at the end.
    labels = sorted(b["label"] for p in progress for b in p["boxes"])
    assert labels == ["ship"] * 6 + ["vehicle"] * 3, labels
    done = seen[-1][1]
    assert done["complete"] and done["tiles"] == 6 and sorted(
        b["label"] for b in done["boxes"]) == labels
    assert set(done["downloads"]) == {"geojson", "scene_crs.geojson", "png"}
    # Replay from the middle (a page that reconnects): the same events after that one.
    assert events(served, sid, after=seen[1][2]) == seen[2:]
    web = {}
    for kind, url in done["downloads"].items():
        response, web[kind] = get_bytes(served, url)
        assert response.status == 200, web[kind]
        assert response.getheader("Content-Disposition") == (
            f'attachment; filename="mosaic.detect.{kind}"')
    assert Image.open(io.BytesIO(web["png"])).size == (192, 128)
    # The CLI on the same file, tiling and batch size: the same features.
    out = os.path.join(served["work"], "cli.geojson")
    assert scene_main(["--ckpt_dir", served["trained_work"], "--image", served["scene"],
                       "--out", out, "--tile", "64", "--overlap", "0", "--batch_size", "4",
                       "--max_new_tokens", "80"]) == 0
    capsys.readouterr()
    for kind, path in (("geojson", out),
                       ("scene_crs.geojson", out.replace(".geojson", ".scene_crs.geojson"))):
        with open(path) as f:
            cli = json.load(f)
        got = json.loads(web[kind])
        assert got["features"] == cli["features"] and got["coordinates"] == cli["coordinates"]
        assert len(got["features"]) == 9


def test_a_cancelled_job_resumes_and_a_scene_without_crs_answers_in_pixels(served):
    status, facts = upload(served, served["scene"])
    sid = facts["id"]
    job = dict(task="ground", question="ship", **TILING)
    assert call(served, "POST", f"/api/scenes/{sid}/job", job)[0] == 202
    status, cancelled = call(served, "DELETE", f"/api/scenes/{sid}/job")
    assert status == 202
    last = events(served, sid)[-1]
    # Stopped before the second batch of four tiles (the journal keeps what was done).
    assert last[0] == "cancelled" and last[1]["tiles"] == 6 and not last[1]["complete"], last
    status, facts = call(served, "GET", f"/api/scenes/{sid}")
    assert facts["job"]["status"] == "cancelled"
    before = facts["job"].get("done", 0)
    assert before in (0, 4)
    assert call(served, "POST", f"/api/scenes/{sid}/job", job)[0] == 202
    kind, done, _ = events(served, sid)[-1]
    assert kind == "done" and done["resumed"] == before and done["decoded"] == 6 - before
    # No CRS: accepted, said so, answered in scene pixels; no scene-CRS file to download.
    status, facts = upload(served, served["plain"])
    assert status == 201 and not facts["georeferenced"] and facts["crs"] is None
    assert facts["note"] == ("plain.tif has no georeference: results are in scene pixels "
                             "(x right, y down from the top-left corner)")
    sid = facts["id"]
    assert call(served, "POST", f"/api/scenes/{sid}/job", {"task": "detect"})[0] == 202
    seen = events(served, sid)
    assert ("log", "plain.tif has no georeference: coordinates are scene pixels") in [
        (k, d.get("message")) for k, d, _ in seen]
    done = seen[-1][1]
    assert seen[-1][0] == "done" and set(done["downloads"]) == {"geojson", "png"}
    response, collection = get_bytes(served, done["downloads"]["geojson"])
    assert json.loads(collection)["coordinates"] == PIXELS
    status, body = call(served, "GET", f"/api/scenes/{sid}/result/scene_crs.geojson")
    assert status == 404 and "plain.tif has no georeference" in body["error"]
    status, body = call(served, "DELETE", f"/api/scenes/{sid}")
    assert status == 200 and call(served, "GET", f"/api/scenes/{sid}")[0] == 404


def test_a_scene_with_fewer_bands_than_the_model_reads_is_refused_by_name(tmp_path):
    """An RGB scene uploaded to a 4-band model (model.input_bands=4): a 400 naming the upload,
    and its folder removed. Only the model's band count is read at registration, so the session
    here is just that number."""
    from types import SimpleNamespace
    from earthgpt_jax.serve.scenes import SceneJobs
    from earthgpt_jax.serve.service import ApiError
    session = SimpleNamespace(model=SimpleNamespace(cfg=SimpleNamespace(input_bands=4)))
    jobs = SceneJobs(session, folder=str(tmp_path / "scenes"))
    scene_id, folder = jobs.new_folder()
    path = _write(os.path.join(folder, "rgb.tif"),
                  np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8))
    with pytest.raises(ApiError) as e:
        jobs.register(scene_id, folder, "rgb.tif", path)
    assert e.value.status == 400
    assert "image rgb.tif has 3 bands, fewer than the 4 the model reads" in str(e.value)
    assert not os.path.exists(folder)
