"""The mmrs1m TFDS builder over a generated mini release: contents, splits and bad input."""

import collections
import json
import os
import sys

import pytest
import tensorflow_datasets as tfds
from PIL import Image

from earthgpt_jax.data import synthetic
from tfds_builders.mmrs1m import BadRecordsError, Mmrs1m, build, sensor_for_source


def _release(root, **kwargs):
    synthetic.write_release(str(root), seed=1, num_train_images=24, num_test_images=12, **kwargs)
    return str(root)


def _records(root, split):
    """{key: record} as the builder should see them (total.json skipped)."""
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


def test_sensor_table():
    assert sensor_for_source("HRSID_HBB") == "sar"
    assert sensor_for_source("SARV2") == "sar"
    assert sensor_for_source("AIR-SARShip-1.0") == "sar"
    assert sensor_for_source("SSDD_mini") == "sar"
    assert sensor_for_source("HIT-UAV_mini") == "infrared"
    assert sensor_for_source("IR_ship") == "infrared"
    assert sensor_for_source("infrared_ship_mini") == "infrared"
    assert sensor_for_source("DIOR_RSVG") == "optical"
    assert sensor_for_source("NWPU") == "optical"


def test_build_and_read_back(tmp_path):
    root = _release(tmp_path / "release")
    data_dir = str(tmp_path / "tfds")
    builder = build(root, data_dir)
    assert isinstance(builder, Mmrs1m) and builder.name == "mmrs1m"
    for split in ("train", "test"):
        want = _records(root, split)
        src = tfds.data_source("mmrs1m", data_dir=data_dir, split=split)
        assert len(src) == len(want) == builder.info.splits[split].num_examples
        report = builder.bad_records(split)
        assert report["bad"] == 0 and report["good"] == len(want)
        by_image = collections.defaultdict(list)
        for r in want.values():
            by_image[r["image"]].append(r["conversations"])
        tasks, sensors = set(), set()
        for i in range(len(src)):
            ex = src[i]
            path = _text(ex["image_path"])
            with open(os.path.join(root, path), "rb") as f:
                assert ex["image"] == f.read()  # original encoded bytes, untouched
            with Image.open(os.path.join(root, path)) as im:
                assert (int(ex["width"]), int(ex["height"])) == im.size
            source = _text(ex["source"])
            assert path.split("/")[2] == source
            assert _text(ex["sensor"]) == sensor_for_source(source)
            turns = [{"from": _text(f), "value": _text(v)}
                     for f, v in zip(ex["conversations"]["from"], ex["conversations"]["value"])]
            assert turns in by_image[path]
            task = _text(ex["task"])
            first = turns[0]["value"]
            if task == "grounding":
                assert "bounding box coordinate" in first
            elif task == "region_captioning":
                assert "short description" in first
            tasks.add(task)
            sensors.add(_text(ex["sensor"]))
        assert tasks == {"classification", "captioning", "vqa", "grounding",
                         "region_captioning", "detection"}
        assert sensors == {"optical", "sar", "infrared"}
    assert "tensorflow" not in sys.modules


def test_only_train_split_without_test_files(tmp_path):
    root = _release(tmp_path / "release")
    for dirpath, _, files in os.walk(os.path.join(root, "data", "json")):
        for name in files:
            if name.endswith("_test.json"):
                os.remove(os.path.join(dirpath, name))
    builder = build(root, str(tmp_path / "tfds"))
    assert set(builder.info.splits) == {"train"}


def _corrupt(root):
    """Break five records and one whole file; returns {(file, index): reason fragment}."""
    def edit(rel, fn):
        path = os.path.join(root, rel)
        with open(path) as f:
            records = json.load(f)
        fn(records)
        with open(path, "w") as f:
            json.dump(records, f)
        return records

    det = "data/json/detection/DIOR_mini/dior_mini_trainval.json"
    missing = edit(det, lambda r: None)[0]["image"]
    os.remove(os.path.join(root, missing))
    sar = "data/json/detection/SSDD_mini/ssdd_mini_trainval.json"
    truncated = os.path.join(root, edit(sar, lambda r: None)[1]["image"])
    with open(truncated, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[:len(data) // 2])
    cls = "data/json/classification/SynthScene_cls.json"
    edit(cls, lambda r: r[0].pop("conversations"))
    cap = "data/json/caption/caption_synthcap.json"
    edit(cap, lambda r: r[0]["conversations"].pop())
    vqa = "data/json/VQA/synthvqa.json"
    edit(vqa, lambda r: r[1]["conversations"].reverse())
    broken = "data/json/VQA/broken.json"
    with open(os.path.join(root, broken), "w") as f:
        f.write('[{"image": "data/VQA/x.png", ')
    return {(det, 0): "missing image", (sar, 1): "undecodable image",
            (cls, 0): "conversations missing", (cap, 0): "odd number of turns",
            (vqa, 1): "is not from", (broken, None): "unreadable json"}


def test_bad_records_skipped_and_reported(tmp_path):
    root = _release(tmp_path / "release")
    total = len(_records(root, "train"))
    expected = _corrupt(root)
    data_dir = str(tmp_path / "tfds")
    builder = build(root, data_dir, max_bad_fraction=0.5)
    report = builder.bad_records("train")
    got = {(b["file"], b["index"]): b["reason"] for b in report["bad_records"]}
    assert got.keys() == expected.keys()
    for key, fragment in expected.items():
        assert fragment in got[key], (key, got[key])
    good = total - (len(expected) - 1)  # the broken file held no readable records
    assert report["good"] == good and report["bad"] == len(expected)
    assert report["records"] == good + len(expected)
    assert len(tfds.data_source("mmrs1m", data_dir=data_dir, split="train")) == good
    assert builder.bad_records("test")["bad"] == 0


def test_bad_fraction_over_threshold_fails_clearly(tmp_path):
    root = _release(tmp_path / "release")
    _corrupt(root)
    data_dir = tmp_path / "tfds"
    with pytest.raises(BadRecordsError) as err:
        build(root, str(data_dir))  # class default MAX_BAD_FRACTION = 0.01
    msg = str(err.value)
    assert "6 of" in msg and "max_bad_fraction 0.01" in msg
    assert "missing image" in msg and "'train'" in msg
    # The report survives the failed build, one level above the (deleted) version folder.
    with open(data_dir / "mmrs1m" / "bad_records_train.json") as f:
        assert json.load(f)["bad"] == 6
    assert not (data_dir / "mmrs1m" / "1.0.0").exists()
