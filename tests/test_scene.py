"""Whole scenes (issue 18): windowed reads, tiling, merging across tile borders, map
coordinates, resuming, on generated GeoTIFFs.

Where the detector is not what a test checks, `BrightBlobs` stands in for the model: it boxes
the saturated blobs of each tile exactly, in the model's answer text, so the tiling, the merge
and the coordinates are checked to a fraction of a pixel. One test runs the real CLI on the
tiny checkpoint `tests/test_serve_api.trained_workdir` trains (once a session, shared).
"""

import json
import math
import os

import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import Transformer
from affine import Affine
from scipy import ndimage

from earthgpt_jax.data.images import decode_image, square_and_resize
from earthgpt_jax.scene import SceneError, run_scene
from earthgpt_jax.scene.__main__ import main as scene_main
from earthgpt_jax.scene.merge import Detection, merge
from earthgpt_jax.scene.outputs import PIXELS, scene_crs_path
from earthgpt_jax.scene.raster import SceneReader, tile_grid

UTM = "EPSG:32633"  # UTM zone 33N
ORIGIN = (500_000.0, 4_500_000.0)  # map coordinates of the raster's top-left corner
GSD = 10.0  # metres per pixel
HALF = 4  # planted targets are 8 x 8 pixels


class BrightBlobs:
    """A deterministic stand-in for the model: each saturated blob of 16+ pixels is a ship."""

    def __init__(self, image_size=128, batch_size=4):
        self.image_size, self.batch_size, self.asked = image_size, batch_size, 0

    def pixels(self, tile):
        return square_and_resize(tile, self.image_size)

    def answer(self, images, prompt):
        self.asked += len(images)
        out = []
        for image in images:
            labels, _ = ndimage.label(image.min(axis=-1) == 255)
            side = image.shape[0]
            boxes = [(s[1].start / side, s[0].start / side, s[1].stop / side, s[0].stop / side)
                     for s in ndimage.find_objects(labels)
                     if (s[0].stop - s[0].start) * (s[1].stop - s[1].start) >= 16]
            text = ";".join(",".join(f"{v:.5f}" for v in b) for b in boxes)
            out.append(f"There are <p>{len(boxes)} ships</p>[{text}]" if boxes
                       else "There are no objects.")
        return out


def _scene(width, height, centres, bands=3, seed=0, dtype=np.uint16):
    """[bands, h, w] noisy background (about 1000) with 8 x 8 targets (4000) at `centres`."""
    rng = np.random.default_rng(seed)
    data = rng.normal(1000, 30, (bands, height, width))
    for cx, cy in centres:
        data[:, cy - HALF:cy + HALF, cx - HALF:cx + HALF] = 4000
    return data.clip(0, 65535).astype(dtype)


def _write(path, data, crs=UTM, nodata=None):
    transform = Affine.translation(*ORIGIN) @ Affine.scale(GSD, -GSD)
    geo = dict(crs=crs, transform=transform) if crs else {}
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype, nodata=nodata, tiled=True,
                       blockxsize=64, blockysize=64, **geo) as ds:
        ds.write(data)
    return str(path)


def _map(cx, cy):
    return ORIGIN[0] + cx * GSD, ORIGIN[1] - cy * GSD


def _centres(geojson_path):
    with open(geojson_path) as f:
        collection = json.load(f)
    return collection, [tuple(np.mean(feat["geometry"]["coordinates"][0][:4], axis=0))
                        for feat in collection["features"]]


# Targets straddling tile borders (tiles of 128 px start every 96 px): whole in two tiles, cut
# by one tile's edge (x 122..130 against the border at 128), at a four-tile corner, at the
# scene's edge, and alone.
PLANTED = [(100, 100), (126, 300), (224, 224), (596, 590), (300, 470), (420, 60)]


def test_utm_scene_targets_land_on_their_map_coordinates_once(tmp_path):
    scene = _write(tmp_path / "utm.tif", _scene(600, 600, PLANTED))
    out = str(tmp_path / "ships.geojson")
    log = []
    summary = run_scene(scene, out, BrightBlobs(), tile=128, overlap=32,
                        log=type("L", (), {"write": log.append, "flush": lambda s: 0})())
    assert summary["tiles"] == 36 and summary["complete"] and summary["georeferenced"]
    assert any("tiles 36/36" in line and "tiles/s" in line and "ETA" in line for line in log)
    native, centres = _centres(scene_crs_path(out))
    assert native["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert len(centres) == len(PLANTED)  # nothing counted twice across tile borders
    for cx, cy in PLANTED:
        e, n = _map(cx, cy)
        assert min(math.dist((e, n), c) for c in centres) <= GSD
    # WGS84: the same points, through pyproj's own transform.
    wgs84, lonlat = _centres(out)
    back = Transformer.from_crs("EPSG:4326", UTM, always_xy=True)
    for cx, cy in PLANTED:
        assert min(math.dist(_map(cx, cy), back.transform(*c)) for c in lonlat) <= GSD
    assert wgs84["coordinates"].startswith("EPSG:4326")
    props = wgs84["features"][0]["properties"]
    assert props["class"] == "ship" and isinstance(props["tile"], int) and "ships" in \
        props["answer"]
    assert Image.open(os.path.splitext(out)[0] + ".png").size == (600, 600)


def test_a_killed_run_resumes_without_redoing_tiles(tmp_path):
    scene = _write(tmp_path / "utm.tif", _scene(600, 600, PLANTED))
    out = str(tmp_path / "ships.geojson")
    first = BrightBlobs()
    partial = run_scene(scene, out, first, tile=128, overlap=32, stop_after=2,
                        log=open(os.devnull, "w"))
    assert not partial["complete"] and first.asked == 8 and not os.path.exists(out)
    with open(out + ".tiles.jsonl", "a") as f:  # killed in the middle of writing a line
        f.write('{"tile": 8, "window": [0, 9')
    second = BrightBlobs()
    summary = run_scene(scene, out, second, tile=128, overlap=32, log=open(os.devnull, "w"))
    assert summary["resumed"] == 8 and second.asked == 28 and summary["complete"]
    _, centres = _centres(scene_crs_path(out))
    assert len(centres) == len(PLANTED)
    with pytest.raises(SceneError, match="another run"):  # other tiling, same journal
        run_scene(scene, out, BrightBlobs(), tile=128, overlap=16, log=open(os.devnull, "w"))


def test_thirteen_bands_read_three_stretched_as_training_decodes(tmp_path):
    data = _scene(128, 128, [(40, 50)], bands=13, seed=1)
    data[3:] = 60000  # bands training drops must not move the stretch
    scene = _write(tmp_path / "s2.tif", data)
    with SceneReader(scene) as reader:
        assert reader.bands == [1, 2, 3]
        tile = tile_grid(128, 128, 128, 32)[0]
        pixels, filled = reader.read(tile)
    with open(scene, "rb") as f:  # the same bytes through training's decoder
        np.testing.assert_array_equal(pixels, decode_image(f.read(), scene))
    assert filled == 1.0
    summary = run_scene(scene, str(tmp_path / "s2.geojson"), BrightBlobs(), tile=64,
                        overlap=16, log=open(os.devnull, "w"))
    assert summary["features"] == 1


def test_nodata_border_is_masked_out_of_the_stretch_and_skipped(tmp_path):
    data = _scene(400, 200, [(300, 100), (160, 100)], bands=1)
    data[:, :, :150] = 0  # a nodata border 150 px wide, as an orthorectified swath has
    scene = _write(tmp_path / "swath.tif", data, nodata=0)
    with SceneReader(scene) as reader:
        pixels, filled = reader.read(tile_grid(400, 200, 128, 32)[1])  # cols 96..224
    assert filled == (224 - 150) / 128
    valid = pixels[:, 150 - 96:]
    assert (pixels[:, :150 - 96] == 0).all()
    # The stretch came from the data alone: its darkest pixels reach 0 (with the nodata zeros
    # in the percentiles, the background would sit near 1000/4000 of white).
    assert valid.min() == 0 and valid.max() == 255
    summary = run_scene(scene, str(tmp_path / "swath.geojson"), BrightBlobs(), tile=128,
                        overlap=32, log=open(os.devnull, "w"))
    assert summary["skipped_nodata"] == 2 and summary["features"] == 2


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_a_scene_without_georeference_answers_in_pixels(tmp_path):
    log, planted = tmp_path / "log.txt", [(100, 100), (126, 150)]
    for name, path in (("tif", _write(tmp_path / "plain.tif", _scene(300, 200, planted),
                                      crs=None)),
                       ("png", str(tmp_path / "plain.png"))):
        if name == "png":
            grey = _scene(300, 200, planted)[0]  # 8-bit is kept as is: targets white
            Image.fromarray(np.where(grey == 4000, 255, grey // 16).astype(np.uint8)).save(path)
        out = str(tmp_path / f"{name}.geojson")
        with open(log, "w") as f:
            summary = run_scene(path, out, BrightBlobs(), tile=128, overlap=32, log=f)
        assert not summary["georeferenced"] and not os.path.exists(scene_crs_path(out))
        assert "no georeference" in log.read_text()
        collection, centres = _centres(out)
        assert collection["coordinates"] == PIXELS
        np.testing.assert_allclose(sorted(centres), sorted(planted), atol=0.01)


def test_merge_keeps_the_whole_copy_and_oriented_corners():
    quad = (10, 20, 30, 10, 40, 30, 20, 40)  # an oriented box, corners kept as answered
    whole = Detection(quad, "ship", tile=1, answer="", margin=20)
    cut = Detection((10, 20, 28, 20, 28, 40, 10, 40), "ship", tile=0, answer="", margin=0)
    other = Detection(quad, "plane", tile=0, answer="", margin=0)
    assert merge([cut, whole, other]) == [whole, other]


def test_bad_input_gets_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.tif"
    bad.write_text("not a raster")
    cases = [(["--image", str(tmp_path / "missing.tif")], "scene not found"),
             (["--image", str(bad)], "cannot read scene"),
             (["--image", str(bad), "--task", "ask"], "--task=ask needs --question")]
    for argv, message in cases:
        assert scene_main(["--ckpt_dir", str(tmp_path), "--out", str(tmp_path / "o.geojson")]
                          + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_on_a_trained_tiny_model_writes_ships_in_map_coordinates(tmp_path_factory, capsys):
    from tests.test_serve_api import SHIPS, trained_workdir
    trained = trained_workdir(tmp_path_factory)
    work = str(tmp_path_factory.mktemp("scene"))
    ships = np.asarray(Image.open(os.path.join(trained["work"], "ships.png")))
    scene = _write(os.path.join(work, "ships.tif"), np.moveaxis(ships, -1, 0))
    out = os.path.join(work, "ships.geojson")
    assert scene_main(["--ckpt_dir", trained["work"], "--image", scene, "--out", out,
                       "--tile", "64", "--batch_size", "1", "--max_new_tokens", "80"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["tiles"] == 1
    collection, centres = _centres(scene_crs_path(out))
    assert [f["properties"]["class"] for f in collection["features"]] == ["ship"] * len(SHIPS)
    for x0, y0, x1, y1 in SHIPS:  # the model writes two decimals of the 64 px square
        want = _map((x0 + x1) / 2, (y0 + y1) / 2)
        assert min(math.dist(want, c) for c in centres) <= GSD
    with open(out) as f:
        assert json.load(f)["type"] == "FeatureCollection"


def test_tiles_decode_split_over_all_eight_devices_as_on_one(tmp_path_factory):
    """The CLI's session (every device on the `data` axis, weights replicated): a batch of
    tiles is padded to a multiple of the device count, its arrays are split over all eight
    devices, the tokens come back split the same way, and the scene's answers equal one
    device's."""
    import jax
    from earthgpt_jax.data.boxes import DETECTION_PROMPT
    from earthgpt_jax.inference import InferenceSession
    from earthgpt_jax.scene import DATA_PARALLEL_RULES, SessionAnswerer, data_parallel_mesh
    from tests.test_serve_api import trained_workdir
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    work = trained_workdir(tmp_path_factory)["work"]
    views = [square_and_resize(np.asarray(Image.open(os.path.join(work, f"{n}.png"))), 64)
             for n in ("ships", "vehicle", "ships")]  # the model's views of its two images
    scene = _write(tmp_path_factory.mktemp("mosaic") / "m.tif",
                   np.moveaxis(np.concatenate(views, axis=1), -1, 0))
    runs = {}
    for devices in (1, 8):
        session = InferenceSession.from_workdir(
            work, mesh=data_parallel_mesh(jax.devices()[:devices]), rules=DATA_PARALLEL_RULES)
        answerer = SessionAnswerer(session, batch_size=3, max_new_tokens=80)
        assert answerer.batch_size == (3 if devices == 1 else 8)
        if devices == 8:
            placed = answerer.inputs([answerer.pixels(v) for v in views], DETECTION_PROMPT)
            for array in placed:  # 3 tiles padded to 8 rows, one row per device
                assert array.sharding.device_set == set(jax.devices())
                assert [s.data.shape[0] for s in array.addressable_shards] == [1] * 8
            tokens = session.generate(*placed, max_new_tokens=8)
            assert len(tokens.sharding.device_set) == 8 and tokens.shape[0] == 8
            assert [s.data.shape[0] for s in tokens.addressable_shards] == [1] * 8
        out = str(tmp_path_factory.mktemp(f"d{devices}") / "m.geojson")
        summary = run_scene(scene, out, answerer, tile=64, overlap=0, log=open(os.devnull, "w"))
        assert summary["complete"] and summary["decoded"] == 3
        with open(out + ".tiles.jsonl") as f:
            runs[devices] = [json.loads(line) for line in f][1:]
        with open(scene_crs_path(out)) as f:
            runs[devices, "features"] = json.load(f)["features"]
    assert runs[8] == runs[1]
    assert runs[8, "features"] == runs[1, "features"]
    assert sorted(f["properties"]["class"] for f in runs[8, "features"]) == [
        "ship"] * 4 + ["vehicle"]
