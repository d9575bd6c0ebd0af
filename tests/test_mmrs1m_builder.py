"""The mmrs1m TFDS builder over generated mini releases: contents, boxes, configs, splits,
overlap exclusion, and every kind of bad input counted per reason and per file."""

import collections
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from earthgpt_jax.data import synthetic
from earthgpt_jax.data.boxes import (NO_OBJECTS_ANSWER, is_oriented, parse_detection,
                                     parse_shapes)
from earthgpt_jax.data.images import decode_image
from tfds_builders.mmrs1m import (SOURCE_DATASETS, BadRecordsError, ExclusionList, Mmrs1m,
                                  build, in_validation, sensor_for_source)
from tfds_builders.mmrs1m.records import record_boxes
from tfds_builders.mmrs1m.report import BadRecord
from tfds_builders.mmrs1m.selection import validation_score

VALIDATION_FRACTION = 0.25


def _records(root, split):
    """{key: record} of the annotation files of a split (total.json skipped)."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(root, "data", "json")):
        for name in sorted(files):
            if name == "total.json" or name.endswith("_test.json") != (split == "test"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            with open(os.path.join(root, rel)) as f:
                for i, r in enumerate(json.load(f)):
                    out[f"{rel}:{i}"] = r
    return out


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def _turns(ex):
    return [{"from": _text(f), "value": _text(v)}
            for f, v in zip(ex["conversations"]["from"], ex["conversations"]["value"])]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("release"))
    synthetic.write_release(root, seed=1, num_train_images=24, num_test_images=12)
    return root


# --------------------------------------------------------------------------------------------
# Tables and rules that need no build


def test_sensor_table_covers_the_34_sources():
    assert len(SOURCE_DATASETS) == 34
    assert collections.Counter(s.sensor for s in SOURCE_DATASETS) == {
        "optical": 25, "sar": 3, "infrared": 6}
    for dataset in SOURCE_DATASETS:
        for folder in dataset.folders:
            assert sensor_for_source(folder) == dataset.sensor, (dataset.name, folder)
    for name, sensor in [("HRSID_mini", "sar"), ("SSDD_mini", "sar"), ("AIR-SARShip-1.0", "sar"),
                         ("HIT-UAV_mini", "infrared"), ("infrared_ship_mini", "infrared"),
                         ("IR_anything", "infrared"), ("NWPU", "optical")]:
        assert sensor_for_source(name) == sensor


def test_validation_rule_is_the_documented_hash():
    path = "data/detection/DIOR/00001.jpg"
    digest = hashlib.sha256(path.encode()).digest()
    assert validation_score(path) == int.from_bytes(digest[:8], "big") / 2 ** 64
    assert validation_score("./" + path) == validation_score(path)
    scores = [validation_score(f"data/x/s/{i}.png") for i in range(2000)]
    assert 0.07 < np.mean(np.array(scores) < 0.1) < 0.13  # uniform enough to slice by
    assert not in_validation(path, 0.0)


def test_exclusion_list_matching():
    ex = ExclusionList(["# test images", "", "SSDD/00011.jpg", "00012.jpg", "00013",
                        " data/VQA/SynthVQA/a.png "])
    assert len(ex) == 4
    assert ex.matches("data/detection/SSDD/00011.jpg")
    assert not ex.matches("data/detection/XSSDD/00011.jpg")  # folder boundary
    assert ex.matches("data/detection/DIOR/00012.jpg")        # a name matches in any folder
    assert not ex.matches("data/detection/DIOR/00012.png")
    assert ex.matches("data/detection/DIOR/00013.png")        # a bare stem: any extension
    assert ex.matches("data/VQA/SynthVQA/a.png")
    assert not ex.matches("data/VQA/SynthVQA/b.png")


def _conv(*pairs):
    return [t for q, a in pairs for t in ({"from": "human", "value": q},
                                          {"from": "gpt", "value": a})]


def test_box_rules():
    det = record_boxes("detection", _conv(
        ("Detect.", "There are <p>2 ships</p>[0.10,0.20,0.30,0.40;0.50,0.50,0.50,0.60] and "
                    "<p>1 vehicle</p>[0.90,0.90,1.04,0.95]")))
    np.testing.assert_allclose(det.arrays()["boxes"], [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.6],
                                                       [0.9, 0.9, 1.0, 0.95]], atol=1e-6)
    assert det.labels == ["ship", "ship", "vehicle"] and det.turns == [1, 1, 1]
    assert [k for k, _ in det.repairs] == ["box_clipped"]  # zero width is valid, 1.04 clipped
    none = record_boxes("detection", _conv(("Detect.", "There are no objects.")))
    assert none.arrays()["boxes"].shape == (0, 4) and none.repairs == []
    # Oriented boxes (HRSID_OBB, DOTA folders): 8 corners or centre/size/angle are kept, with
    # their corners and enclosing boxes; any other count is a bad record quoting the text.
    obb = record_boxes("detection", _conv(("Detect.", "There are <p>2 ships</p>[0.2,0.1,0.4,0.3,"
                                                      "0.3,0.4,0.1,0.2;0.5,0.5,0.4,0.2,90]")))
    np.testing.assert_allclose(obb.arrays()["boxes"], [[0.1, 0.1, 0.4, 0.4],
                                                       [0.4, 0.3, 0.6, 0.7]], atol=1e-6)
    np.testing.assert_allclose(obb.arrays()["box_corners"],
                               [[0.2, 0.1, 0.4, 0.3, 0.3, 0.4, 0.1, 0.2],
                                [0.6, 0.3, 0.6, 0.7, 0.4, 0.7, 0.4, 0.3]], atol=1e-6)
    with pytest.raises(BadRecord, match=r"box '0.1,0.2,0.3,0.4,0.5,0.6' is not 4, 5"):
        record_boxes("detection", _conv(("Detect.", "There is <p>1 ship</p>"
                                                    "[0.1,0.2,0.3,0.4,0.5,0.6]")))
    assert det.arrays()["box_corners"].shape == (3, 8)
    # An empty scene in a wording the scorer would not read as one: kept, its text noted.
    other = record_boxes("detection", _conv(("Detect.", "Nothing to detect.")))
    assert other.arrays()["boxes"].shape == (0, 4)
    assert other.repairs == [("no_objects_wording", "turn 1: empty detection answer without "
                                                    "'no objects': 'Nothing to detect.'")]
    ground = record_boxes("grounding", _conv(
        ("Please provide the horizontal bounding box coordinate of the region which is "
         "described as:The red car in this remote sensing image", "[0.1,0.2,0.3,0.4]"),
        ("Please provide a short description for this region in this remote sensing image "
         ":[0.5,0.6,0.7,0.8]", "The ship")))
    assert ground.labels == ["The red car", "The ship"] and ground.turns == [1, 2]
    np.testing.assert_allclose(ground.arrays()["boxes"], [[.1, .2, .3, .4], [.5, .6, .7, .8]])
    assert record_boxes("vqa", _conv(("Is [it] there?", "[1,2]"))).arrays()["boxes"].shape == (
        0, 4)
    for answer, kind in [("There are <p>2 ships</p>[0.1,0.2,0.3,0.4]", "detection_count_mismatch"),
                         ("There is <p>1 ship</p>[0.3,0.2,0.1,0.4]", "box_corners_swapped"),
                         ("There is <p>1 ship</p>[1.1,0.2,1.3,0.4]", "box_outside_image"),
                         ("There is <p>1 ship</p>[0.1,0.2,0.3]", "box_malformed"),
                         ("Ships at [0.1,0.2,0.3,0.4]", "detection_unparsable")]:
        with pytest.raises(BadRecord) as err:
            record_boxes("detection", _conv(("Detect.", answer)))
        assert err.value.kind == kind, answer


# --------------------------------------------------------------------------------------------
# A clean build: every config's content, the boxes, the validation slice and the exclusions


EXCLUDED_SUFFIX = "SynthVQA/train_00001.png"
EXCLUDED_STEM = "train_00002"
EXCLUDED_TEST = "SynthCap/test_00000.png"  # in the test split, which exclusions leave alone


def _excluded(image_path):
    return (image_path.endswith(("/" + EXCLUDED_SUFFIX, "/" + EXCLUDED_TEST))
            or os.path.splitext(os.path.basename(image_path))[0] == EXCLUDED_STEM)


@pytest.fixture(scope="module")
def built(release, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    exclude = tmp_path_factory.mktemp("lists") / "eval_test_images.txt"
    exclude.write_text("# evaluation test images\n"
                       + "".join(f"{e}\n" for e in (EXCLUDED_SUFFIX, EXCLUDED_STEM, EXCLUDED_TEST)))
    builder = build(release, data_dir, validation_fraction=VALIDATION_FRACTION,
                    exclude_images=str(exclude))
    return builder, data_dir


def _expected_boxes(task, turns):
    """Boxes and their corners as boxes.py reads the text, independently of the builder's own
    walk."""
    boxes, labels, corners = [], [], []
    for k in range(0, len(turns), 2):
        q, a = turns[k]["value"], turns[k + 1]["value"]
        if task == "detection":
            for label, _, group in parse_detection(a)[0]:
                boxes += group
                labels += [label] * len(group)
            corners += [c for _, _, cs in parse_detection(a, corners=True)[0] for c in cs]
        elif task in ("grounding", "region_captioning"):
            shapes = parse_shapes(a if task == "grounding" else q)
            boxes += shapes.boxes
            corners += shapes.corners
            labels += [a] if task == "region_captioning" else []
    return (np.asarray(boxes, np.float32).reshape(-1, 4), labels,
            np.asarray(corners, np.float32).reshape(-1, 8))


def test_build_and_read_back(built, release):
    builder, data_dir = built
    assert isinstance(builder, Mmrs1m) and builder.name == "mmrs1m"
    assert builder.builder_config.name == "all"
    train_records = _records(release, "train")
    assert any(_excluded(r["image"]) for r in train_records.values())
    want = {
        "train": {k: r for k, r in train_records.items() if not _excluded(r["image"])
                  and not in_validation(r["image"], VALIDATION_FRACTION)},
        "validation": {k: r for k, r in train_records.items() if not _excluded(r["image"])
                       and in_validation(r["image"], VALIDATION_FRACTION)},
        "test": _records(release, "test"),  # exclusions apply to training data only
    }
    assert want["train"] and want["validation"]
    assert any(_excluded(r["image"]) for r in want["test"].values())
    tasks, sensors, images_seen = set(), set(), {}
    oriented = collections.Counter()
    for split, records in want.items():
        src = tfds.data_source("mmrs1m", data_dir=data_dir, split=split)
        assert len(src) == len(records) == builder.info.splits[split].num_examples
        report = builder.bad_records(split)
        assert report["bad"] == 0 and report["good"] == len(records)
        by_image = collections.defaultdict(list)
        for r in records.values():
            by_image[r["image"]].append(r["conversations"])
        for i in range(len(src)):
            ex = src[i]
            path = _text(ex["image_path"])
            assert images_seen.setdefault(path, split) == split  # an image on one side only
            with open(os.path.join(release, path), "rb") as f:
                data = f.read()
            assert ex["image"] == data  # original encoded bytes, untouched
            with Image.open(io.BytesIO(data)) as im:
                assert (int(ex["width"]), int(ex["height"])) == im.size
            source = _text(ex["source"])
            assert path.split("/")[2] == source
            assert _text(ex["sensor"]) == sensor_for_source(source)
            turns = _turns(ex)
            assert turns in by_image[path]  # the release's strings, unchanged
            task = _text(ex["task"])
            boxes, labels, corners = _expected_boxes(task, turns)
            assert ex["boxes"].dtype == np.float32 and ex["boxes"].shape == boxes.shape
            np.testing.assert_array_equal(ex["boxes"], boxes)
            np.testing.assert_array_equal(ex["box_corners"], corners)
            # The generator's oriented source (as HRSID_OBB) keeps its ships' own corners.
            oriented[source] += sum(map(is_oriented, ex["box_corners"].tolist()))
            assert len(ex["box_turns"]) == len(ex["box_labels"]) == len(boxes)
            if task in ("detection", "region_captioning"):
                assert [_text(v) for v in ex["box_labels"]] == labels
            if task == "detection":  # empty scenes: the one documented answer, no boxes
                assert (len(boxes) == 0) == (turns[1]["value"] == NO_OBJECTS_ANSWER)
                assert set(ex["box_turns"]) <= {1}
            # VQA questions about one image are unrelated: each is asked alone in evaluation.
            assert bool(ex["independent"]) == (task == "vqa")
            tasks.add(task)
            sensors.add(_text(ex["sensor"]))
    assert tasks == {"classification", "captioning", "vqa", "grounding",
                     "region_captioning", "detection"}
    assert sensors == {"optical", "sar", "infrared"}
    assert {k for k, v in oriented.items() if v} == {"HRSID_OBB_mini"}, oriented
    excluded = builder.bad_records("train")["excluded"] + builder.bad_records(
        "validation")["excluded"]
    assert excluded == sum(_excluded(r["image"]) for r in train_records.values())
    assert builder.bad_records("test")["excluded"] == 0
    assert "tensorflow" not in sys.modules


def test_task_config_through_the_plain_tfds_api(release, tmp_path):
    """`tfds.builder('mmrs1m/<config>')` + DownloadConfig(manual_dir), no file_format given;
    a release without `_test.json` files gives no test split, and one too small for the
    validation fraction no validation split (TFDS refuses empty splits)."""
    root = str(tmp_path / "release")
    shutil.copytree(release, root)
    for dirpath, _, files in os.walk(os.path.join(root, "data", "json")):
        for name in files:
            if name.endswith("_test.json"):
                os.remove(os.path.join(dirpath, name))
    data_dir = str(tmp_path / "tfds")
    assert not any(in_validation(r["image"], 1e-9) for r in _records(root, "train").values())
    builder = tfds.builder("mmrs1m/grounding", data_dir=data_dir, validation_fraction=1e-9)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    assert set(builder.info.splits) == {"train"}
    src = tfds.data_source("mmrs1m/grounding", data_dir=data_dir, split="train")
    want = {k: r for k, r in _records(root, "train").items() if "/RSVG/" in k}
    assert len(src) == len(want) > 0
    assert {_text(src[i]["task"]) for i in range(len(src))} == {"grounding",
                                                                 "region_captioning"}
    assert all(src[i]["boxes"].shape[0] >= 1 for i in range(len(src)))


def test_missing_inputs_are_named(release, tmp_path):
    with pytest.raises(FileNotFoundError, match="exclude_images list not found: .*nope.txt"):
        build(release, str(tmp_path / "tfds"), exclude_images=str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty_release"
    (empty / "data" / "json" / "VQA").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="'detection' found no annotation files"):
        build(str(empty), str(tmp_path / "tfds2"), config="detection")
    with pytest.raises(FileNotFoundError, match="no data/json/ under manual_dir"):
        build(str(tmp_path), str(tmp_path / "tfds3"))


# --------------------------------------------------------------------------------------------
# Bad input: each case is one record (or one file) with a known reason


def _png(width=16, height=12, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(width, height):
    def chunk(tag, body):
        return (struct.pack(">I", len(body)) + tag + body
                + struct.pack(">I", zlib.crc32(tag + body)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _write(root, rel, data):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return rel


DET_Q = "Please detect all objects in this image."
VQA = [{"from": "human", "value": "Is there a ship?"}, {"from": "gpt", "value": "yes"}]


def _det(answer):
    return [{"from": "human", "value": DET_Q}, {"from": "gpt", "value": answer}]


def _add_bad_cases(root, outside_dir):
    """Writes new files holding one case per record; returns the expected report entries:
    {(file, index): kind} of skipped records, the repaired ones, and the good records added."""
    img = "data/VQA/BadCases"
    good_img = _write(root, f"{img}/good.png", _png())
    full = _png(64, 64)
    images = {
        "missing": f"{img}/missing.png",
        "empty": _write(root, f"{img}/empty.png", b""),
        "truncated": _write(root, f"{img}/truncated.png", full[:len(full) // 2]),
        "not_image": _write(root, f"{img}/not_image.jpg", b"<html>404 Not Found</html>"),
        "huge": _write(root, f"{img}/huge.png", _png_header(100_000, 100_000)),
    }
    outside = os.path.join(outside_dir, "outside.png")
    with open(outside, "wb") as f:
        f.write(_png())
    os.symlink(outside, os.path.join(root, img, "link.png"))
    vqa_file = "data/json/VQA/bad_cases.json"
    vqa_records = [
        {"image": images["missing"], "conversations": VQA},                  # 0
        {"image": images["empty"], "conversations": VQA},                    # 1
        {"image": images["truncated"], "conversations": VQA},                # 2
        {"image": images["not_image"], "conversations": VQA},                # 3
        {"image": images["huge"], "conversations": VQA},                     # 4
        {"image": good_img},                                                 # 5
        {"image": good_img, "conversations": VQA[:1]},                       # 6
        {"image": good_img, "conversations": VQA[::-1]},                     # 7
        {"image": os.path.join(root, good_img), "conversations": VQA},       # 8
        {"image": f"{img}/../BadCases/good.png", "conversations": VQA},      # 9
        {"image": f"{img}/link.png", "conversations": VQA},                  # 10
        ["not", "an", "object"],                                             # 11
        {"image": good_img, "conversations": VQA},                           # 12 good
        {"image": _write(root, "data/VQA/flat.png", _png()),                 # 13 repaired
         "conversations": VQA},
    ]
    _write(root, vqa_file, json.dumps(vqa_records).encode())
    det_file = "data/json/detection/BadBoxes/bad_boxes.json"
    det_img = "data/detection/DIOR_mini/train_00000.png"
    det_records = [
        {"image": det_img, "conversations": _det("There is <p>1 ship</p>[1.10,0.2,1.3,0.4]")},
        {"image": det_img, "conversations": _det("There is <p>1 ship</p>[0.30,0.2,0.10,0.4]")},
        {"image": det_img, "conversations": _det("There are <p>3 ships</p>[0.1,0.2,0.3,0.4]")},
        {"image": det_img, "conversations": _det("There is <p>1 ship</p>[0.1,0.2,0.3]")},
        {"image": det_img, "conversations": _det("There is <p>1 ship</p>[0.9,0.2,1.02,0.4]")},
        {"image": det_img, "conversations": _det("There are no objects in this image.")},
    ]
    _write(root, det_file, json.dumps(det_records).encode())
    rsvg_file = "data/json/RSVG/bad_rsvg.json"
    rsvg_img = "data/RSVG/DIOR_RSVG/images/train_00000.png"
    rsvg_records = [
        {"image": rsvg_img, "conversations": [
            {"from": "human", "value": "Please provide the horizontal bounding box coordinate "
                                       "of the region which is described as:The ship in this "
                                       "remote sensing image"},
            {"from": "gpt", "value": "somewhere on the left"}]},
        {"image": rsvg_img, "conversations": [
            {"from": "human", "value": "Where is the ship?"}, {"from": "gpt", "value": "left"}]},
    ]
    _write(root, rsvg_file, json.dumps(rsvg_records).encode())
    broken = _write(root, "data/json/VQA/broken.json", b'[{"image": "data/VQA/x.png", ')
    latin1 = "data/json/VQA/latin1.json"
    good = json.dumps({"image": good_img, "conversations": VQA}).encode()
    bad = json.dumps({"image": good_img, "conversations": [
        {"from": "human", "value": "Is there a caf\u00e9?"}, {"from": "gpt", "value": "no"}]},
        ensure_ascii=False).encode("latin-1")
    _write(root, latin1, b"[" + good + b", " + bad + b"]")
    unknown = _write(root, "data/json/segmentation/masks.json",
                      json.dumps([{"image": good_img, "conversations": VQA}]).encode())
    skipped = {
        (vqa_file, 0): "missing_image", (vqa_file, 1): "empty_image",
        (vqa_file, 2): "undecodable_image", (vqa_file, 3): "not_an_image",
        (vqa_file, 4): "image_too_large", (vqa_file, 5): "no_conversations",
        (vqa_file, 6): "bad_turns", (vqa_file, 7): "bad_turns",
        (vqa_file, 8): "path_outside_release", (vqa_file, 9): "path_outside_release",
        (vqa_file, 10): "path_outside_release", (vqa_file, 11): "not_an_object",
        (det_file, 0): "box_outside_image", (det_file, 1): "box_corners_swapped",
        (det_file, 2): "detection_count_mismatch", (det_file, 3): "box_malformed",
        (rsvg_file, 0): "box_missing", (rsvg_file, 1): "unknown_rsvg_prompt",
        (broken, None): "unreadable_json", (latin1, 1): "not_utf8",
        (unknown, None): "unknown_task_folder",
    }
    repaired = {(det_file, 4): "box_clipped", (vqa_file, 13): "source_from_json_name"}
    good_keys = {f"{vqa_file}:12", f"{vqa_file}:13", f"{det_file}:4", f"{det_file}:5",
                 f"{latin1}:0"}
    return skipped, repaired, good_keys


@pytest.fixture(scope="module")
def bad_release(release, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad") / "release")
    shutil.copytree(release, root)
    expected = _add_bad_cases(root, str(tmp_path_factory.mktemp("outside")))
    return root, expected


def test_bad_records_skipped_repaired_and_reported(release, bad_release, tmp_path):
    root, (skipped, repaired, good_keys) = bad_release
    clean = len(_records(release, "train"))  # the records before the bad cases were added
    data_dir = str(tmp_path / "tfds")
    builder = build(root, data_dir, max_bad_fraction=0.5, validation_fraction=0.0)
    report = builder.bad_records("train")
    got = {(b["file"], b["index"]): b["kind"] for b in report["bad_records"]}
    assert got == skipped
    for b in report["bad_records"]:  # every message names what is wrong
        assert b["reason"], b
        if b["kind"] in ("missing_image", "empty_image", "not_an_image", "image_too_large"):
            assert "data/VQA/BadCases/" in b["reason"]
    assert report["bad_by_reason"] == dict(collections.Counter(skipped.values()))
    by_file = collections.defaultdict(collections.Counter)
    for (file, _), kind in skipped.items():
        by_file[file][kind] += 1
    assert report["bad_by_file"] == {f: dict(c) for f, c in by_file.items()}
    assert {(r["file"], r["index"]): r["kind"] for r in report["repaired_records"]} == repaired
    assert report["repaired_by_reason"] == {"box_clipped": 1, "source_from_json_name": 1}
    assert report["good"] == clean + len(good_keys)
    assert report["bad"] == len(skipped) and report["records"] == report["good"] + len(skipped)
    src = tfds.data_source("mmrs1m", data_dir=data_dir, split="train")
    assert len(src) == report["good"]
    new = {}
    for i in range(len(src)):
        ex = src[i]
        if "/BadCases/" in _text(ex["image_path"]) or "1.02" in _text(ex["conversations"][
                "value"][-1]) or "no objects" in _text(ex["conversations"]["value"][-1]):
            new[_text(ex["conversations"]["value"][-1])] = ex
    assert len(new) == 3  # the good VQA record (shared answer with latin1's), clipped, empty
    clipped = new["There is <p>1 ship</p>[0.9,0.2,1.02,0.4]"]
    np.testing.assert_allclose(clipped["boxes"], [[0.9, 0.2, 1.0, 0.4]], atol=1e-6)
    assert new["There are no objects in this image."]["boxes"].shape == (0, 4)
    flat = [src[i] for i in range(len(src)) if _text(src[i]["image_path"]) == "data/VQA/flat.png"]
    assert len(flat) == 1 and _text(flat[0]["source"]) == "bad_cases"  # the JSON file's stem
    assert builder.bad_records("test")["bad"] == 0


def test_bad_fraction_over_threshold_fails_clearly(bad_release, tmp_path):
    root, (skipped, _, _) = bad_release
    data_dir = tmp_path / "tfds"
    with pytest.raises(BadRecordsError) as err:
        build(root, str(data_dir), validation_fraction=0.0)  # default max_bad_fraction 0.01
    msg = str(err.value)
    assert f"{len(skipped)} of" in msg and "max_bad_fraction 0.01" in msg
    assert "'train'" in msg and "missing image" in msg and "'not_utf8': 1" in msg
    # The report survives the failed build, one level above the (deleted) version folder.
    with open(data_dir / "mmrs1m" / "all" / "bad_records_train.json") as f:
        assert json.load(f)["bad"] == len(skipped)
    assert not (data_dir / "mmrs1m" / "all" / "2.1.0").exists()


def test_decoded_size_follows_exif_orientation(release, tmp_path):
    """width/height are those of the pixels the pipeline decodes (EXIF orientation applied)."""
    root = str(tmp_path / "release")
    os.makedirs(os.path.join(root, "data", "json", "VQA"))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide x 20 high, displayed rotated: 20 wide x 40 high
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(buf, format="JPEG", exif=exif)
    image = _write(root, "data/VQA/Rotated/a.jpg", buf.getvalue())
    _write(root, "data/json/VQA/rotated.json",
           json.dumps([{"image": image, "conversations": VQA}]).encode())
    data_dir = str(tmp_path / "tfds")
    build(root, data_dir, validation_fraction=0.0)
    ex = tfds.data_source("mmrs1m", data_dir=data_dir, split="train")[0]
    assert (int(ex["width"]), int(ex["height"])) == (20, 40)
    assert decode_image(ex["image"], image).shape == (40, 20, 3)
