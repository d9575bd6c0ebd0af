"""The synthetic mini MMRS-1M release: determinism, layout, content and difficulty."""

import collections
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from earthgpt_jax.data import synthetic
from earthgpt_jax.data.boxes import (DETECTION_PROMPT, GROUNDING_PROMPT, NO_OBJECTS_ANSWER,
                                     box_corners, enclosing_box, norm_to_pixel, parse_boxes,
                                     parse_detection)
from earthgpt_jax.evaluate.metrics import rotated_iou
from tfds_builders.mmrs1m.mmrs1m import sensor_for_source


def _hashes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _load(root, rel):
    with open(os.path.join(root, rel)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The default-size release (the one the demo trains on)."""
    root = str(tmp_path_factory.mktemp("release"))
    counts = synthetic.write_release(root, seed=0)
    return root, counts


def _split_records(root, split):
    """{source name: records} of one split."""
    out = {}
    for src in synthetic.SOURCES:
        out[src.name] = _load(root, synthetic.split_json_path(src.json_path, split))
    return out


def test_deterministic_per_seed(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    synthetic.write_release(a, seed=3, num_train_images=40, num_test_images=20)
    synthetic.write_release(b, seed=3, num_train_images=40, num_test_images=20)
    synthetic.write_release(c, seed=4, num_train_images=40, num_test_images=20)
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert ha == hb
    assert ha["data/json/total.json"] != hc["data/json/total.json"]


def test_layout_matches_release(release):
    root, counts = release
    expected = {s.json_path for s in synthetic.SOURCES}
    expected |= {synthetic.split_json_path(p, "test") for p in expected}
    assert set(counts) == expected
    assert "data/json/RSVG/rsvg_trainval.json" in expected
    assert "data/json/RSVG/rsvg_test.json" in expected
    assert "data/json/classification/SynthScene_cls_test.json" in expected
    for rel in expected:
        records = _load(root, rel)
        assert records and len(records) == counts[rel]
        for r in records:
            assert set(r) == {"image", "conversations"}
            assert r["image"].startswith("data/") and os.path.isfile(os.path.join(root, r["image"]))
            turns = r["conversations"]
            assert len(turns) % 2 == 0 and turns
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    # Image folders are the release's: data/<task folder>/<SOURCE>/...
    folders = {r["image"].split("/")[1] for rel in expected for r in _load(root, rel)}
    assert folders == {"classification", "caption", "VQA", "RSVG", "detection"}
    # The aggregate file holds exactly the train records.
    train = [r for s in synthetic.SOURCES for r in _load(root, s.json_path)]
    total = _load(root, "data/json/total.json")
    assert sorted(map(json.dumps, total)) == sorted(map(json.dumps, train))


def test_default_sizes_and_speed_budget(release):
    root, _ = release
    # 600/150 images, plus the oriented SAR ships' 45 per 600 (HRSID_OBB_mini).
    for split, want in (("train", 645), ("test", 161)):
        images = {r["image"] for recs in _split_records(root, split).values() for r in recs}
        assert abs(len(images) - want) <= 0.05 * want


def test_train_test_disjoint(release):
    root, _ = release
    train = {r["image"] for recs in _split_records(root, "train").values() for r in recs}
    test = {r["image"] for recs in _split_records(root, "test").values() for r in recs}
    assert train and test and not train & test


def test_every_task_and_sensor(release):
    root, _ = release
    for split in ("train", "test"):
        records = _split_records(root, split)
        tasks, sensors = set(), collections.defaultdict(set)
        for src in synthetic.SOURCES:
            # The builder reads the sensor from the source folder name: the names must encode it.
            assert sensor_for_source(src.name) == src.sensor
            for r in records[src.name]:
                assert r["image"].split("/")[2] == src.name
                q = r["conversations"][0]["value"]
                task = {"classification": "classification", "caption": "captioning",
                        "vqa": "vqa", "detection": "detection"}.get(src.task)
                if src.task == "rsvg":
                    task = "grounding" if "bounding box coordinate" in q else "region_captioning"
                tasks.add(task)
                sensors[task].add(src.sensor)
        assert tasks == {"classification", "captioning", "vqa", "grounding",
                         "region_captioning", "detection"}
        assert sensors["vqa"] == sensors["detection"] == {"optical", "sar", "infrared"}


def test_images_non_square_and_modes(release):
    root, _ = release
    shapes = collections.Counter()
    for src in synthetic.SOURCES:
        for r in _load(root, src.json_path)[:20]:
            with Image.open(os.path.join(root, r["image"])) as im:
                assert im.format == "PNG"
                assert im.mode == ("RGB" if src.sensor == "optical" else "L")
                w, h = im.size
                assert 56 <= min(w, h) and max(w, h) <= 96
                shapes["tall" if h > w else "wide" if w > h else "square"] += 1
    assert shapes["tall"] > 20 and shapes["wide"] > 20


def test_vqa_presence_balanced(release):
    root, _ = release
    for split in ("train", "test"):
        answers = collections.Counter()
        for src in synthetic.SOURCES:
            if src.task != "vqa":
                continue
            for r in _split_records(root, split)[src.name]:
                for q, a in zip(r["conversations"][::2], r["conversations"][1::2]):
                    if q["value"].startswith("Is there"):
                        answers[a["value"]] += 1
                    else:
                        assert q["value"].startswith("How many") and a["value"].isdigit()
        assert set(answers) == {"yes", "no"} and answers["yes"] == answers["no"]


def test_captions_and_rsvg_content(release):
    root, _ = release
    records = _split_records(root, "train")
    for r in records["SynthCap"]:
        answers = [t["value"] for t in r["conversations"][1::2]]
        assert len(answers) == 3 and len(set(answers)) == 3
    grounding, region = {}, {}
    for r in records["DIOR_RSVG"]:
        turns = r["conversations"]
        for q, a in zip(turns[::2], turns[1::2]):
            if "bounding box coordinate" in q["value"]:
                phrase = q["value"].split("described as:")[1].removesuffix(
                    " in this remote sensing image")
                assert q["value"] == GROUNDING_PROMPT.format(phrase=phrase)
                grounding[(r["image"], phrase)] = a["value"]
            else:
                region[(r["image"], a["value"])] = q["value"].rsplit(":", 1)[1]
    # Each box/phrase pair appears once in each direction, as in DIOR-RSVG.
    assert grounding == region
    for (image, _), box_text in grounding.items():
        boxes, bad = parse_boxes(box_text)
        assert len(boxes) == 1 and not bad


def _answer_boxes(root, split):
    """(image path, boxes) of grounding and detection answers."""
    out = []
    recs = _split_records(root, split)
    for r in recs["DIOR_RSVG"]:
        for q, a in zip(r["conversations"][::2], r["conversations"][1::2]):
            if "bounding box coordinate" in q["value"]:
                out.append((r["image"], parse_boxes(a["value"])[0]))
    for name in ("DIOR_mini", "SSDD_mini", "HIT-UAV_mini"):
        empty = 0
        for r in recs[name]:
            assert r["conversations"][0]["value"] == DETECTION_PROMPT
            answer = r["conversations"][1]["value"]
            groups, bad = parse_detection(answer)
            assert not bad and len(groups) <= 2
            boxes = [b for _, _, bs in groups for b in bs]
            assert len(boxes) <= 4
            # Empty scenes are written in the one documented form.
            empty += not boxes
            assert bool(boxes) or answer == NO_OBJECTS_ANSWER
            out.append((r["image"], boxes))
        assert empty == len(recs[name]) // synthetic.EMPTY_SCENE_EVERY
    return out


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def test_objects_small_and_mean_box_baseline_fails(release):
    root, _ = release
    train = [b for _, boxes in _answer_boxes(root, "train") for b in boxes]
    for b in train:
        assert max(b[2] - b[0], b[3] - b[1]) <= 0.12
    mean_box = np.mean(np.array(train), axis=0)
    test = [b for _, boxes in _answer_boxes(root, "test") for b in boxes]
    acc = np.mean([_iou(mean_box, b) >= 0.5 for b in test])
    assert acc < 0.1, acc


def test_boxes_follow_pad_convention(release):
    """SAR ships are bright: mapped back through the inverse pad, each box sits on bright pixels."""
    root, _ = release
    for r in _split_records(root, "test")["SSDD_mini"]:
        with Image.open(os.path.join(root, r["image"])) as im:
            pixels = np.asarray(im, np.float64)
        h, w = pixels.shape
        groups, _ = parse_detection(r["conversations"][1]["value"])
        for _, _, boxes in groups:
            for box in boxes:
                x0, y0, x1, y1 = (int(round(v)) for v in norm_to_pixel(box, w, h))
                # Two-decimal rounding moves each edge by < 1 px, so most of the box is ship;
                # a box shifted by the pad offset (>= 4 px here) would land on dark sea.
                inside = pixels[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
                assert inside.mean() > 2.5 * pixels.mean(), (r["image"], box)


def test_oriented_ships_at_any_angle(release):
    """HRSID_OBB_mini (as MMRS-1M's HRSID_OBB) answers with each ship's four corners: ships at
    any angle, the polygon on the bright hull, corners clockwise from the topmost, 1-2 ships
    (answers fit the demo's text length), empty scenes in the documented form."""
    root, _ = release
    angles, tight = [], []
    for split in ("train", "test"):
        records = _split_records(root, split)["HRSID_OBB_mini"]
        empty = 0
        for r in records:
            answer = r["conversations"][1]["value"]
            groups, bad = parse_detection(answer, corners=True)
            quads = [q for _, _, qs in groups for q in qs]
            assert not bad and len(quads) <= synthetic.MAX_ORIENTED_SHIPS
            if not quads:
                assert answer == NO_OBJECTS_ANSWER
                empty += 1
                continue
            assert [c for c, _, _ in groups] == ["ship"]
            assert all(len(chunk.split(",")) == 8 for chunk in answer[answer.index("[") + 1:-1]
                       .split(";"))
            with Image.open(os.path.join(root, r["image"])) as im:
                w, h = im.size
                pixels = np.asarray(im, np.float64)
            for q in quads:
                xs, ys = q[0::2], q[1::2]
                assert ys[0] == min(ys)  # the topmost corner first ...
                area = sum(xs[k] * ys[(k + 1) % 4] - xs[(k + 1) % 4] * ys[k] for k in range(4))
                assert area > 0  # ... then clockwise on the screen (y points down)
                hull = Image.new("L", (w, h))
                ImageDraw.Draw(hull).polygon(list(zip(*[iter(norm_to_pixel(q, w, h))] * 2)),
                                             fill=1)
                inside = np.asarray(hull, bool)
                assert pixels[inside].mean() > 2.5 * pixels[~inside].mean(), (r["image"], q)
                side = [(xs[k + 1] - xs[k], ys[k + 1] - ys[k]) for k in (0, 1)]
                dx, dy = max(side, key=lambda v: np.hypot(*v))
                angles.append(np.degrees(np.arctan2(dy, dx)) % 180)
                tight.append(rotated_iou(q, box_corners(enclosing_box(q))))
        assert empty == len(records) // synthetic.EMPTY_SCENE_EVERY
    # Any angle: every 30-degree sector of the long axis holds ships, and for many the
    # horizontal box would be a poor fit (IoU < 0.5 with their own polygon).
    assert np.all(np.histogram(angles, bins=6, range=(0, 180))[0] > 0), angles
    assert np.mean(np.array(tight) < 0.5) > 0.3, tight


def test_every_source_records_its_band_order(release):
    """Each image's bands match its source's `bands` (what a model of that many bands reads);
    the default mix holds no multispectral image."""
    root, _ = release
    for src in synthetic.SOURCES:
        with Image.open(os.path.join(root, _load(root, src.json_path)[0]["image"])) as im:
            assert len(im.getbands()) == len(src.bands)
    assert not any(len(src.bands) > 3 for src in synthetic.SOURCES)
    assert synthetic.MULTISPECTRAL_SOURCES[0] not in synthetic.SOURCES


def test_multispectral_targets_show_only_in_nir(tmp_path):
    import warnings

    import rasterio
    import rasterio.errors
    from earthgpt_jax.data.images import decode_image

    root = str(tmp_path)
    counts = synthetic.write_release(root, seed=0, num_train_images=40, num_test_images=10,
                                     sources=synthetic.MULTISPECTRAL_SOURCES)
    (src,) = synthetic.MULTISPECTRAL_SOURCES
    assert sensor_for_source(src.name) == src.sensor == "optical"
    assert counts == {src.json_path: 40, synthetic.split_json_path(src.json_path, "test"): 10}
    answers = collections.Counter()
    for r in _load(root, src.json_path):
        path = os.path.join(root, r["image"])
        with warnings.catch_warnings():  # chips, not scenes: no georeference, by design
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:  # the band order travels in the file
                assert ds.descriptions == src.bands == ("red", "green", "blue", "nir")
        with open(path, "rb") as f:
            pixels = decode_image(f.read(), r["image"], bands=4)
        present, count = (t["value"] for t in r["conversations"][1::2])
        answers[present] += 1
        # Vegetation is bright in NIR, the nets dark: a dark NIR pixel means a target.
        assert (pixels[..., 3].min() < 120) == (present == "yes") == (count != "0")
    assert answers["yes"] == answers["no"] == 20
    # R, G, B are drawn before the targets: the same stream gives the same visible bands
    # with or without them, so nothing but NIR can tell.
    with_targets, objs = synthetic._multispectral_pixels(np.random.default_rng(7), 70, 60, 2)
    without, none = synthetic._multispectral_pixels(np.random.default_rng(7), 70, 60, 0)
    assert len(objs) == 2 and not none
    np.testing.assert_array_equal(with_targets[..., :3], without[..., :3])
    assert (with_targets[..., 3] != without[..., 3]).any()
