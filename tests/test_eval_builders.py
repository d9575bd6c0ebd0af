"""The evaluation-set TFDS builders, each built through the standard TFDS API from a tiny copy of
its dataset in the real format (tests/fixtures/eval_sets.py): counts, fields, boxes, splits,
bad records in the report, the threshold, and the eval runner's view of the records."""

import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tfds_builders  # noqa: F401  (registers every builder)
from earthgpt_jax.data.boxes import (DETECTION_PROMPT, GROUNDING_PROMPT, NO_OBJECTS_ANSWER,
                                     parse_detection)
from tests.fixtures import eval_sets
from tfds_builders import eval_common
from tfds_builders.crsvqa.crsvqa import _split_ids
from tfds_builders.mmrs1m import BadRecordsError, Mmrs1m

# (builder name with config, fixture writer, sensor every record must carry, task)
CASES = {
    "dior_rsvg": (eval_sets.dior_rsvg, "optical", "grounding"),
    "nwpu_captions": (eval_sets.nwpu_captions, "optical", "captioning"),
    "rsvqa_hr": (eval_sets.rsvqa_hr, "optical", "vqa"),
    "crsvqa": (eval_sets.crsvqa, "optical", "vqa"),
    "scene_folders/ucm": (lambda r: eval_sets.scene_folders(r, "ucm"), "optical",
                          "classification"),
    "scene_folders/clrs": (lambda r: eval_sets.scene_folders(r, "clrs"), "optical",
                           "classification"),
    "scene_folders/nwpu_resisc45": (lambda r: eval_sets.scene_folders(r, "nwpu_resisc45"),
                                    "optical", "classification"),
    "scene_folders/nasc_tg2": (lambda r: eval_sets.scene_folders(r, "nasc_tg2"), "optical",
                               "classification"),
    "scene_folders/aid": (lambda r: eval_sets.scene_folders(r, "aid"), "optical",
                          "classification"),
    "sar_ships/ssdd": (eval_sets.ssdd, "sar", "detection"),
    "sar_ships/hrsid": (eval_sets.hrsid, "sar", "detection"),
    "hit_uav": (eval_sets.hit_uav, "infrared", "detection"),
    "dota": (eval_sets.dota, "optical", "detection"),
    "hrsc2016": (eval_sets.hrsc2016, "optical", "detection"),
}


def _text(v):
    return v.decode() if isinstance(v, bytes) else v


def _turns(ex):
    conv = ex["conversations"]
    return [(_text(f), _text(v)) for f, v in zip(conv["from"], conv["value"])]


def _prepare(name, manual, data_dir, **kwargs):
    builder = tfds.builder(name, data_dir=data_dir, **kwargs)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return builder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every builder prepared once from its fixture: {name: (builder, manual_dir, facts)}."""
    out = {}
    for name, (write, _, _) in CASES.items():
        manual = tmp_path_factory.mktemp(name.replace("/", "_"))
        facts = write(str(manual))
        data_dir = str(tmp_path_factory.mktemp("tfds"))
        # The fixtures hold many bad records on purpose; the threshold is tested separately.
        builder = _prepare(name, manual, data_dir, max_bad_fraction=1.0)
        out[name] = (builder, manual, facts, data_dir)
    return out


def _read(built, name, split):
    builder, manual, facts, data_dir = built[name]
    src = tfds.data_source(name, data_dir=data_dir, split=split)
    return [src[i] for i in range(len(src))]


def _by_key(built, name, split):
    """{example key: record}; array_record keeps examples in the order TFDS shuffled them by
    key, so records are matched through a field that names them."""
    return {_text(r["image_path"]): r for r in _read(built, name, split)}


@pytest.mark.parametrize("name", list(CASES))
def test_counts_fields_and_report(built, name):
    builder, manual, facts, data_dir = built[name]
    _, sensor, task = CASES[name]
    assert set(builder.info.splits) == set(facts["counts"])
    for split, (good, bad) in facts["counts"].items():
        assert builder.info.splits[split].num_examples == good
        report = builder.bad_records(split)
        assert (report["good"], report["bad"]) == (good, bad), report["bad_records"]
        assert all(b["reason"] and b["file"] for b in report["bad_records"])
        if split == "test":
            assert report["bad_by_reason"] == facts["kinds"], report["bad_records"]
        records = _read(built, name, split)
        assert len(records) == good
        for r in records:
            assert set(r) == set(eval_common.record_features().keys())
            assert _text(r["sensor"]) == sensor and _text(r["task"]) == task
            # image_path is relative to the dataset folder found inside manual_dir.
            path = os.path.join(manual, facts.get("root", ""), _text(r["image_path"]))
            with open(path, "rb") as f:
                assert r["image"] == f.read()  # the source's encoded bytes, untouched
            with Image.open(path) as im:
                assert (int(r["width"]), int(r["height"])) == im.size
            turns = _turns(r)
            assert turns and len(turns) % 2 == 0
            assert [f for f, _ in turns] == ["human", "gpt"] * (len(turns) // 2)
            boxes = np.asarray(r["boxes"])
            assert boxes.dtype == np.float32 and boxes.shape[1:] == (4,)
            empty = _text(r["image_path"]) in facts.get("empty", ())
            assert (boxes.shape[0] > 0) == (task in ("grounding", "detection") and not empty)
            assert np.all((boxes >= 0) & (boxes <= 1))
            assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
            assert len(r["box_labels"]) == len(r["box_turns"]) == boxes.shape[0]
            assert np.all(np.asarray(r["box_turns"]) == 1)  # boxes are in the first answer
    assert "tensorflow" not in sys.modules


def test_features_match_mmrs1m(tmp_path):
    """The same fields as mmrs1m's records (boxes included), so the runner reads both alike."""
    ours = eval_common.record_features()
    theirs = Mmrs1m(data_dir=str(tmp_path)).info.features
    assert set(ours.keys()) == set(theirs.keys())
    for key in theirs.keys():
        assert repr(ours[key]) == repr(theirs[key]), key
    assert ours["boxes"].shape == (None, 4) and ours["boxes"].np_dtype == np.float32


def test_dior_rsvg_boxes_and_indices(built):
    facts = built["dior_rsvg"][2]
    recs = _by_key(built, "dior_rsvg", "test")
    assert set(recs) == {"JPEGImages/00001.jpg", "JPEGImages/00003.jpg"}  # under DIOR_RSVG/
    wide = recs["JPEGImages/00001.jpg"]
    known = facts["known"]
    assert _turns(wide) == [("human", GROUNDING_PROMPT.format(phrase=known["phrase"])),
                            ("gpt", known["text"])]
    np.testing.assert_allclose(wide["boxes"], [known["box"]], atol=1e-6)
    assert [_text(v) for v in wide["box_labels"]] == [known["phrase"]]
    # Expression 3 comes after the broken XML: the index stayed aligned.
    tall = recs["JPEGImages/00003.jpg"]
    assert "A white ship" in _turns(tall)[0][1]
    np.testing.assert_allclose(tall["boxes"], [facts["tall"]["box"]], atol=1e-6)
    reasons = " | ".join(b["reason"] for b in built["dior_rsvg"][0].bad_records("test")
                         ["bad_records"])
    for fragment in ("unreadable XML", "outside the 20x40 image", "missing image",
                     "unknown class 'spaceport'", "outside the 7 expressions",
                     "not an expression index"):
        assert fragment in reasons
    train = _read(built, "dior_rsvg", "train")
    assert "The tiny vehicle" in _turns(train[0])[0][1]


def test_detection_answers_and_boxes(built):
    for name in ("sar_ships/ssdd", "sar_ships/hrsid", "hit_uav"):
        facts = built[name][2]
        known = facts["known"]
        recs = [r for path, r in _by_key(built, name, "test").items()
                if path not in facts["empty"]]
        assert len(recs) == 1
        assert _turns(recs[0]) == [("human", DETECTION_PROMPT), ("gpt", known["answer"])]
        np.testing.assert_allclose(recs[0]["boxes"], known["boxes"], atol=1e-6)
        assert [_text(v) for v in recs[0]["box_labels"]] == known["labels"]
    reasons = {name: " | ".join(b["reason"] for b in built[name][0].bad_records("test")
                                ["bad_records"])
               for name in ("sar_ships/ssdd", "sar_ships/hrsid", "hit_uav")}
    assert "inverted box" in reasons["sar_ships/ssdd"]
    assert "unknown class 'boat'" in reasons["sar_ships/ssdd"]
    assert "missing image" in reasons["sar_ships/hrsid"]
    assert "unknown category id 5" in reasons["sar_ships/hrsid"]
    assert "outside the 64x32 image" in reasons["hit_uav"]
    (val,) = _read(built, "hit_uav", "val")
    assert _turns(val)[1][1] == "There is <p>1 other vehicle</p>[0.16,0.41,0.25,0.50]"


def test_empty_scenes_are_kept_with_the_no_objects_answer(built):
    """Images without objects (HIT-UAV: 1.0-1.4% of each real split; an SSDD XML without
    `object`; an HRSID image without annotations) are records answered NO_OBJECTS_ANSWER with
    no boxes, which the parser reads as an empty detection, not as malformed."""
    for name in ("sar_ships/ssdd", "sar_ships/hrsid", "hit_uav"):
        facts = built[name][2]
        recs = _by_key(built, name, "test")
        for path in facts["empty"]:
            rec = recs[path]
            assert _turns(rec) == [("human", DETECTION_PROMPT), ("gpt", NO_OBJECTS_ANSWER)]
            assert np.asarray(rec["boxes"]).shape == (0, 4) and len(rec["box_labels"]) == 0
            assert parse_detection(_turns(rec)[1][1]) == ([], 0)
        assert "no_objects" not in built[name][0].bad_records("test")["bad_by_reason"]


def test_malformed_json_fails_its_split_by_name(tmp_path):
    """One of HIT-UAV's three annotation files is malformed: the build stops with a message
    naming it, and the report of that split survives beside the dataset."""
    manual = tmp_path / "manual"
    eval_sets.hit_uav(str(manual), broken_val=True)
    with pytest.raises(BadRecordsError, match=r"hit_uav split 'val'.*instances_val\.json"):
        _prepare("hit_uav", manual, str(tmp_path / "tfds"))
    report = eval_common.read_report(str(tmp_path / "tfds" / "hit_uav"), "val")
    assert report["bad_by_reason"] == {"unreadable_json": 1}
    # Even when every skip is allowed, a split with no usable record is an error, not a crash
    # inside TFDS.
    with pytest.raises(BadRecordsError, match="no usable record"):
        _prepare("hit_uav", manual, str(tmp_path / "tfds2"), max_bad_fraction=1.0)


def test_captions_vqa_classification_turns(built):
    from earthgpt_jax.evaluate.runner import eval_examples

    caps = built["nwpu_captions"][2]["captions"]
    (rec,) = _read(built, "nwpu_captions", "test")
    (example,) = eval_examples(rec, 0)  # five turns -> one question with five references
    assert example["references"] == caps and example["task"] == "captioning"
    assert _text(rec["image_path"]) == "NWPU_images/airplane/airplane_001.jpg"

    # One record per image, its questions in id order, each asked alone.
    (rec,) = _read(built, "rsvqa_hr", "test")
    assert _turns(rec) == [
        ("human", "Is there a road?"), ("gpt", "yes"), ("human", "Is a parking present?"),
        ("gpt", "no"), ("human", "Is the number of residential buildings equal to the number "
                                  "of roads?"), ("gpt", "no")]
    assert bool(rec["independent"])
    assert [e["history"] for e in eval_examples(rec, 0)] == [[], [], []]

    (crs,) = _read(built, "crsvqa", "test")
    question, answer = built["crsvqa"][2]["first"]
    assert _turns(crs)[:2] == [("human", question), ("gpt", answer)]  # full-width ？ read as ?
    assert len(_turns(crs)) == 4 and bool(crs["independent"])

    for name in [n for n in CASES if n.startswith("scene_folders/")]:
        facts = built[name][2]
        path, answer = facts["answer"]
        rec = _by_key(built, name, "test")[path]
        (question, q), (gpt, a) = _turns(rec)
        assert a == answer
        listed = q.split("following classes: ")[1].split(". Answer")[0].split(", ")
        assert listed == sorted(listed) and answer in listed
        if "classes" in facts:
            assert listed == sorted(facts["classes"])


@pytest.mark.parametrize("name,files", [
    ("hit_uav", ("normal_json/annotations/test.json",)),
    ("sar_ships/hrsid", ("annotations/test2017.json",)),
    ("rsvqa_hr", ("USGS_split_test_phili_questions.json", "USGS_split_test_phili_answers.json",
                  "USGS_split_test_phili_images.json")),
    ("nwpu_captions", ("dataset_nwpu.json",)),
    ("sar_ships/ssdd", ("BBox_SSDD/voc_style/Annotations_test/000001.xml",)),
])
def test_utf8_bom_is_accepted(tmp_path, built, name, files):
    """Annotation files saved with a UTF-8 BOM (Windows editors) build as without one."""
    write = CASES[name][0]
    manual = tmp_path / "manual"
    write(str(manual))
    for rel in files:
        path = manual / rel
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    builder = _prepare(name, manual, str(tmp_path / "tfds"), max_bad_fraction=1.0)
    assert builder.bad_records("test")["bad_by_reason"] == built[name][0].bad_records(
        "test")["bad_by_reason"]
    assert builder.info.splits["test"].num_examples == built[name][0].info.splits[
        "test"].num_examples


def test_dota_real_label_files(tmp_path):
    """DOTA's real labelTxt files (release: header + CRLF; split patches: floats, LF, one
    empty): one record per file, corners written in the answer and kept in `box_corners`,
    enclosing boxes in `boxes`; the empty patch an empty scene; a broken line quoted."""
    facts = eval_sets.dota(str(tmp_path / "manual"))
    builder = _prepare("dota", tmp_path / "manual", str(tmp_path / "tfds"), max_bad_fraction=1.0)
    for split, (good, bad) in facts["counts"].items():
        report = builder.bad_records(split)
        assert (report["good"], report["bad"]) == (good, bad), report
    (bad,) = builder.bad_records("val")["bad_records"]
    assert bad["kind"] == "box_malformed" and facts["bad_line"] in bad["reason"]
    src = tfds.data_source("dota", data_dir=str(tmp_path / "tfds"), split="train")
    (rec,) = [src[i] for i in range(len(src))]
    answer = _turns(rec)[1][1]
    assert answer.startswith("There are <p>14 small vehicles</p>[0.89,0.49,0.90,0.49,0.90,0.52,"
                             "0.89,0.52;") and " and <p>50 large vehicles</p>[" in answer
    corners = np.asarray(rec["box_corners"])
    assert corners.shape == (64, 8)
    # First object: 674 375 683 375 684 394 675 395 on a 760 x 760 image.
    np.testing.assert_allclose(corners[0] * 760, [674, 375, 683, 375, 684, 394, 675, 395],
                               atol=1e-3)
    np.testing.assert_allclose(rec["boxes"][0] * 760, [674, 375, 684, 395], atol=1e-3)
    groups, malformed = parse_detection(answer, corners=True)
    assert malformed == 0 and sum(len(b) for _, _, b in groups) == 64
    val = _by_key(built={"dota": (builder, None, None, str(tmp_path / "tfds"))}, name="dota",
                  split="val")
    assert _turns(val[facts["empty"][0]])[1][1] == NO_OBJECTS_ANSWER
    assert np.asarray(val[facts["empty"][0]]["box_corners"]).shape == (0, 8)


def test_hrsc2016_real_annotation(tmp_path):
    """HRSC2016's real XML: the rotated box (mbox_*, radians) becomes four corners in the
    answer and `box_corners`; a listed image without ships is an empty scene; an object missing
    mbox_w is a bad record quoting its values."""
    from earthgpt_jax.data.boxes import pixel_to_norm, rotated_corners
    import math

    facts = eval_sets.hrsc2016(str(tmp_path / "manual"))
    builder = _prepare("hrsc2016", tmp_path / "manual", str(tmp_path / "tfds"),
                       max_bad_fraction=1.0)
    report = builder.bad_records("test")
    assert (report["good"], report["bad"]) == facts["counts"]["test"]
    (bad,) = report["bad_records"]
    assert bad["kind"] == "box_malformed" and "'mbox_w': None" in bad["reason"]
    recs = _by_key({"hrsc2016": (builder, None, None, str(tmp_path / "tfds"))}, "hrsc2016",
                   "test")
    ship = recs["FullDataSet/AllImages/100000006.bmp"]
    cx, cy, w, h, angle = facts["mbox"]
    width, height = facts["size"]
    quad = [min(max(v, 0), width if k % 2 == 0 else height)
            for k, v in enumerate(rotated_corners(cx, cy, w, h, math.degrees(angle)))]
    want = pixel_to_norm(quad, width, height)
    np.testing.assert_allclose(np.asarray(ship["box_corners"])[0], want, atol=1e-5)
    (turn,) = [t for f, t in _turns(ship) if f == "gpt"]
    assert turn.startswith("There is <p>1 ship</p>[") and turn.count(",") == 7
    empty = recs[facts["empty"][0]]
    assert _turns(empty)[1][1] == NO_OBJECTS_ANSWER and np.asarray(empty["boxes"]).shape == (0, 4)


def test_rsvqa_hr_real_files_one_record_per_image(tmp_path):
    """The real test_phili files (ConfigILM's cut: 2 active images, ~100 questions each): one
    record per image holding its 63 and 62 presence/comparison questions, marked independent,
    so the image is stored once, not once per question, and the runner asks each alone."""
    from earthgpt_jax.evaluate.runner import eval_examples

    facts = eval_sets.rsvqa_hr_real(str(tmp_path / "manual"))
    builder = _prepare("rsvqa_hr", tmp_path / "manual", str(tmp_path / "tfds"))
    src = tfds.data_source("rsvqa_hr", data_dir=str(tmp_path / "tfds"), split="test")
    records = {_text(src[i]["image_path"]): src[i] for i in range(len(src))}
    assert {p: len(_turns(r)) // 2 for p, r in records.items()} == facts["per_image"]
    for r in records.values():
        assert bool(r["independent"])
        examples = eval_examples(r, 0)
        assert all(e["history"] == [] for e in examples)
        assert {e["references"][0] for e in examples} == {"yes", "no"}
    assert builder.bad_records("test")["bad"] == 0


def test_threshold_stops_the_build_and_keeps_the_report(tmp_path):
    manual = tmp_path / "manual"
    eval_sets.dior_rsvg(str(manual))
    data_dir = tmp_path / "tfds"
    with pytest.raises(BadRecordsError, match=r"dior_rsvg split 'test': 6 of 8 records are bad"):
        _prepare("dior_rsvg", manual, str(data_dir))
    assert (data_dir / "dior_rsvg" / "bad_records_test.json").is_file()


@pytest.mark.parametrize("name", list(CASES))
def test_missing_files_name_what_is_missing(tmp_path, name):
    """A manual_dir holding something else: the error names the builder and what it looked
    for. (An empty or absent manual_dir is refused by TFDS itself with the instructions.)"""
    eval_sets.write_text(str(tmp_path / "other" / "README.txt"), "not the dataset")
    eval_sets.write_text(str(tmp_path / "other" / "folder" / "x.txt"), "not the dataset")
    with pytest.raises(FileNotFoundError, match=name.split("/")[0]) as raised:
        _prepare(name, tmp_path / "other", str(tmp_path / "tfds"))
    assert "manual_dir" in str(raised.value) or str(tmp_path / "other") in str(raised.value)


def test_crsvqa_default_split_is_the_last_30_percent(tmp_path):
    ids = [str(i) for i in range(10)]
    splits = _split_ids(tmp_path, ids)
    assert splits == {"train": ids[:7], "test": ids[7:]}


def test_paths_leaving_the_dataset_are_refused(tmp_path):
    root = tmp_path / "root"
    eval_sets.write_image(str(root / "a.png"), 4, 4, fmt="PNG")
    eval_sets.write_image(str(tmp_path / "outside.png"), 4, 4, fmt="PNG")
    os.symlink(tmp_path / "outside.png", root / "link.png")
    from etils import epath
    base = epath.Path(root)
    assert eval_common.load_image(base, "a.png").width == 4
    for bad in ("../outside.png", str(tmp_path / "outside.png"), "link.png"):
        with pytest.raises(ValueError, match="leaves the dataset folder"):
            eval_common.load_image(base, bad)


def test_box_rules():
    assert eval_common.checked_box((0, 0, 41, 20.5), 40, 20, "o") == (0, 0, 40, 20)  # clipped
    for box in ((5, 0, 3, 4), (0, 0, 0, 4), (0, 0, 43, 4), (-2, 0, 3, 4)):
        with pytest.raises(ValueError):
            eval_common.checked_box(box, 40, 20, "o")
    assert eval_common.class_phrase("OtherVehicle") == "other vehicle"
    assert eval_common.class_phrase("Expressway-Service-area") == "expressway service area"
    assert eval_common.class_phrase("storage_tank") == "storage tank"
