"""End to end: fake answers -> results dict with baselines -> results.json/md and box pictures."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from earthgpt_jax.data import boxes as box_text
from earthgpt_jax.evaluate import report


def _ex(task, sensor, question, prediction, references, width=80, height=60, **kw):
    return dict(task=task, sensor=sensor, question=question, prediction=prediction,
                references=list(references), width=width, height=height, **kw)


B1, B2, B3 = [0.30, 0.50, 0.50, 0.70], [0.60, 0.70, 0.80, 0.90], [0.10, 0.30, 0.30, 0.50]
FALSE_POSITIVE = [0.15, 0.35, 0.30, 0.45]


def _examples():
    ir_image = np.zeros((80, 60, 3), np.uint8)     # taller than wide: padded in x by 10
    opt_image = np.zeros((60, 80, 3), np.uint8)    # wider than tall: padded in y by 10
    q_cls = "What is the category of this remote sensing image?"
    return [
        _ex("classification", "optical", q_cls, "Airport.", ["airport"]),
        _ex("classification", "optical", q_cls, "river", ["forest"]),
        _ex("classification", "sar", q_cls, "airport", ["airport"]),
        _ex("captioning", "optical", "Describe the image.", "A plane is parked on the runway.",
            ["a plane is parked on the runway", "an airplane on the runway"]),
        _ex("captioning", "optical", "Describe the image.", "a ship",
            ["many green trees around a lake"]),
        _ex("vqa", "optical", "Is there a road?", "Yes", ["yes"]),
        _ex("vqa", "optical", "Is there a building?", "no", ["yes"]),
        _ex("vqa", "sar", "Are there water areas?", "No.", ["no"]),
        _ex("vqa", "optical", "How many buildings are there?", "There are 4 buildings", ["4"]),
        _ex("vqa", "optical", "How many roads are there?", "many", ["2"]),
        _ex("vqa", "optical", "Is it a rural or an urban area?", "urban", ["rural"]),
        _ex("grounding", "optical", box_text.GROUNDING_PROMPT.format(phrase="The tiny vehicle"),
            "[0.25,0.50,0.75,0.75]", ["[0.25,0.50,0.75,0.75]"], image=opt_image, id="g/1"),
        _ex("grounding", "optical", box_text.GROUNDING_PROMPT.format(phrase="The bridge"),
            "I do not know", ["[0.10,0.30,0.30,0.60]"], image=opt_image),
        _ex("region_captioning", "optical", "region :[0.1,0.2,0.3,0.4]", "The tiny vehicle.", ["tiny vehicle"]),
        _ex("region_captioning", "optical", "region :[0.1,0.2,0.3,0.4]", "ship", ["large storage tank"]),
        _ex("region_captioning", "optical", "region :[0.1,0.2,0.3,0.4]", "vehicle", ["tiny vehicle"]),
        _ex("detection", "infrared", box_text.DETECTION_PROMPT,
            box_text.detection_to_text([("person", [B1, FALSE_POSITIVE])]),
            [box_text.detection_to_text([("person", [B1, B2])])],
            width=60, height=80, image=ir_image, id="d1"),
        _ex("detection", "optical", box_text.DETECTION_PROMPT,
            "There is <p>1 ship</p>[0.10,0.30,0.30,0.50] and <p>1 plane</p>[0.50,0.50,0.60,0.60]",
            [box_text.detection_to_text([("ship", [B3])])], image=opt_image, id="d2"),
        _ex("segmentation", "optical", "?", "?", ["?"]),
    ]


def _row(results, task, sensor, metric):
    [row] = [r for r in results["rows"]
             if (r["task"], r["sensor"], r["metric"]) == (task, sensor, metric)]
    return row


def test_evaluate_predictions_numbers():
    res = report.evaluate_predictions(_examples())
    assert res["n_examples"] == 19 and res["n_unknown_task"] == 1
    assert res["baseline_source"] == "eval_references"
    g = res["groups"]
    assert set(g) == {"classification", "captioning", "vqa", "vqa_presence", "vqa_count",
                      "grounding", "region_captioning", "detection"}
    # classification: model 2/3, majority 'airport' 2/3; per sensor.
    assert _row(res, "classification", "all", "accuracy") == {
        "task": "classification", "sensor": "all", "metric": "accuracy",
        "model": pytest.approx(2 / 3), "baseline": pytest.approx(2 / 3), "n": 3}
    assert g["classification"]["sar"]["model"]["accuracy"] == 1.0
    assert g["classification"]["optical"]["n"] == 2
    # VQA: 3/6 right; baseline = per-type majority ('yes', '4' (tie, first), 'rural').
    assert g["vqa"]["all"]["model"]["accuracy"] == pytest.approx(0.5)
    assert g["vqa"]["all"]["baseline"]["accuracy"] == pytest.approx(4 / 6)
    assert g["vqa"]["all"]["n_malformed"] == 1      # 'many' holds no number
    assert g["vqa_presence"]["all"]["n"] == 3
    assert g["vqa_presence"]["all"]["model"]["accuracy"] == pytest.approx(2 / 3)
    assert g["vqa_presence"]["all"]["baseline"]["accuracy"] == pytest.approx(2 / 3)
    assert g["vqa_count"]["all"]["model"]["accuracy"] == pytest.approx(0.5)
    assert g["vqa_count"]["all"]["baseline"]["accuracy"] == pytest.approx(0.5)
    assert g["vqa_presence"]["sar"]["model"]["accuracy"] == 1.0
    # Grounding: one exact box, one unparseable answer.
    gr = g["grounding"]["all"]
    assert gr["model"]["Acc@0.5"] == pytest.approx(0.5) and gr["model"]["mIoU"] == pytest.approx(0.5)
    assert gr["model"]["cIoU"] == pytest.approx(0.125 / (0.125 + 0.06))
    assert gr["n_malformed"] == 1
    assert gr["details"]["mean_box"] == pytest.approx([0.175, 0.4, 0.525, 0.675])
    assert gr["baseline"]["Acc@0.5"] == 0.0
    assert gr["baseline"]["mIoU"] == pytest.approx((0.048125 / 0.173125 + 0.025 / 0.13125) / 2)
    # Region captioning exact match 1/3, majority phrase 'tiny vehicle' 2/3.
    rc = g["region_captioning"]["all"]
    assert rc["model"]["exact_match"] == pytest.approx(1 / 3)
    assert rc["baseline"]["exact_match"] == pytest.approx(2 / 3)
    # Detection: TP 2 of 4 predicted, 3 true; image d2 names an extra class.
    det = g["detection"]["all"]
    assert det["model"]["precision@0.5"] == pytest.approx(0.5)
    assert det["model"]["recall@0.5"] == pytest.approx(2 / 3)
    assert det["model"]["count_accuracy"] == pytest.approx(0.5)
    assert det["n_malformed"] == 0
    assert det["details"]["mean_box"] == pytest.approx([1 / 3, 0.5, 8 / 15, 0.7])
    assert det["baseline"]["recall@0.5"] == pytest.approx(1 / 3)   # mean box hits B1 (IoU 0.71)
    assert det["baseline"]["count_accuracy"] == pytest.approx(1.0)  # per-class majority count
    assert g["detection"]["infrared"]["model"]["per_class_recall"] == {
        "person": {"recall": 0.5, "n_gt": 2}}
    # Captioning: the model's first caption is perfect, the baseline caption is the one made of
    # the most frequent words among unique captions.
    cap = g["captioning"]["all"]
    assert cap["details"]["baseline_caption"] == "an airplane on the runway"
    assert cap["model"]["BLEU-1"] > cap["baseline"]["BLEU-1"]
    assert _row(res, "detection", "optical", "malformed answers")["model"] == 0


def test_baselines_from_training_answers():
    train = [_ex("classification", "optical", "", "", ["forest"]) for _ in range(3)]
    train += [_ex("vqa", "optical", "Is there a road?", "", ["no"]),
              _ex("vqa", "optical", "Is there a road?", "", ["no"]),
              _ex("vqa", "optical", "Is there a lake?", "", ["yes"])]
    base = report.baselines_from(train)
    assert base["source"] == "train" and base["n"] == 6
    assert base["stats"]["classification"]["all"]["majority"] == "forest"
    assert base["stats"]["vqa"]["optical"]["majority_by_type"] == {"presence": "no"}
    res = report.evaluate_predictions(_examples(), baselines=base)
    assert res["baseline_source"] == "train"
    assert res["groups"]["classification"]["all"]["baseline"]["accuracy"] == pytest.approx(1 / 3)
    # SAR has no training statistics of its own: the task-wide ones ('forest') are used.
    assert res["groups"]["classification"]["sar"]["baseline"]["accuracy"] == 0.0
    assert res["groups"]["vqa_presence"]["all"]["baseline"]["accuracy"] == pytest.approx(1 / 3)
    # Tasks without training statistics still score (baseline answers are empty).
    assert res["groups"]["grounding"]["all"]["baseline"]["mIoU"] == 0.0


def _original_pixels(picture, scale):
    """The picture's image part sampled back on the original pixel grid (top-left of each)."""
    return picture[report.LEGEND_HEIGHT::scale, ::scale]


def test_write_report_and_pictures(tmp_path):
    res = report.evaluate_predictions(_examples())
    table = report.write_report(res, str(tmp_path))
    assert table.startswith("| task | sensor | metric | model | baseline | n |")
    assert "| classification | all | accuracy | 0.6667 | 0.6667 | 3 |" in table
    assert "| detection | infrared | recall@0.5 | 0.5000 | 0.0000 | 1 |" in table
    # (infrared mean box [.45,.6,.65,.8] overlaps B1 and B2 with IoU 0.075 only.)
    md = (tmp_path / "results.md").read_text()
    assert table in md
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert loaded["groups"]["vqa"]["all"]["model"]["accuracy"] == 0.5
    assert len(loaded["rows"]) == len(res["rows"])

    paths = report.write_box_pictures(_examples(), str(tmp_path / "pics"), max_per_task=1)
    assert [os.path.basename(p) for p in paths] == ["grounding_optical_g_1.png",
                                                    "detection_infrared_d1.png"]
    img = np.asarray(Image.open(paths[1]).convert("RGB"))
    # The original size (not the square), enlarged 5x under the legend strip.
    assert img.shape == (80 * 5 + report.LEGEND_HEIGHT, 60 * 5, 3)
    img = _original_pixels(img, 5)
    # B2 in pixels: pad_x = 10, side = 80 -> x 38..54, y 56..72; its left edge is green.
    x0, y0, x1, y1 = box_text.norm_to_pixel(B2, 60, 80)
    assert (x0, y0, x1, y1) == pytest.approx((38, 56, 54, 72))
    assert tuple(img[64, 38]) == report.TRUE_COLOUR
    # The false positive (x 2..14, y 28..36) is red; B1 is covered by its red duplicate.
    assert tuple(img[32, 2]) == report.PRED_COLOUR
    assert tuple(img[48, 14]) == report.PRED_COLOUR
    assert tuple(img[78, 2]) == (0, 0, 0)             # far from boxes and labels: untouched
    g = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert g.shape == (60 * 5 + report.LEGEND_HEIGHT, 80 * 5, 3)
    assert (np.all(g == report.PRED_COLOUR, axis=-1)).sum() > 100


def test_draw_boxes_grayscale(tmp_path):
    path = report.draw_boxes_png(np.full((40, 50), 128, np.uint8), [[30, 30, 45, 38]],
                                 [[40, 26, 20, 30]], ["ship"], str(tmp_path / "a.png"))
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (40 * 8 + report.LEGEND_HEIGHT, 50 * 8, 3)
    img = _original_pixels(img, 8)
    assert tuple(img[34, 30]) == report.TRUE_COLOUR and tuple(img[28, 20]) == report.PRED_COLOUR
    assert tuple(img[39, 0]) == (128, 128, 128)


def test_empty_inputs(tmp_path):
    res = report.evaluate_predictions([])
    assert res["n_examples"] == 0 and res["rows"] == [] and res["groups"] == {}
    table = report.write_report(res, str(tmp_path))
    assert "(no examples)" in table
    assert json.loads((tmp_path / "results.json").read_text())["n_examples"] == 0
    assert report.write_box_pictures([], str(tmp_path)) == []
    assert report.baselines_from([])["stats"] == {}
    # A task with only unparseable references still yields a row with n = 0.
    res = report.evaluate_predictions([_ex("grounding", "sar", "q", "[0.1,0.1,0.2,0.2]", ["none"])])
    assert _row(res, "grounding", "sar", "Acc@0.5") == {
        "task": "grounding", "sensor": "sar", "metric": "Acc@0.5", "model": None,
        "baseline": None, "n": 0}


def test_detection_map_per_sensor_and_rsvqa_columns():
    """mAP@0.5 (answer-order ranking) per sensor, by hand: infrared person [B1 (TP), FP] over
    [B1, B2] -> precision 1 at recall 0.5 -> AP 0.5; optical ship B3 found -> AP 1 (the (air)plane
    has no ground truth and stays out of the mean); all sensors: (0.5 + 1) / 2."""
    res = report.evaluate_predictions(_examples())
    det = res["groups"]["detection"]
    assert det["infrared"]["model"]["mAP@0.5"] == pytest.approx(0.5)
    assert det["optical"]["model"]["mAP@0.5"] == pytest.approx(1.0)
    assert det["all"]["model"]["mAP@0.5"] == pytest.approx(0.75)
    assert det["optical"]["model"]["per_class_AP"] == {"airplane": None, "ship": 1.0}
    assert _row(res, "detection", "infrared", "mAP@0.5")["model"] == pytest.approx(0.5)
    assert any("1 - r/n" in n for n in res["notes"])
    # RSVQA's wordings: 'Is a parking present?' is presence, equal/number/more-than comparison.
    qa = [("Is a parking present?", "no", "no"), ("Is there a road?", "yes", "yes"),
          ("Is the number of roads equal to the number of parkings?", "yes", "no"),
          ("Are there more roads than buildings?", "no", "no")]
    res = report.evaluate_predictions([_ex("vqa", "optical", q, p, [a]) for q, a, p in qa])
    g = res["groups"]
    assert (g["vqa_presence"]["all"]["n"], g["vqa_comparison"]["all"]["n"]) == (2, 2)
    assert g["vqa_presence"]["all"]["model"]["accuracy"] == 1.0
    assert g["vqa_comparison"]["all"]["model"]["accuracy"] == 0.5


def test_a_new_evaluation_replaces_the_pictures_of_the_last_one(tmp_path):
    out = tmp_path / "eval"
    old = [dict(e, id=f"old{k}") for k, e in enumerate(_examples())]
    first = report.write_box_pictures(old, str(out), max_per_task=1)
    (out / "notes.png").write_bytes(b"")  # not a picture of ours: kept
    second = report.write_box_pictures(_examples(), str(out), max_per_task=1)
    assert first and set(first).isdisjoint(second)
    assert sorted(os.listdir(out)) == sorted([os.path.basename(p) for p in second]
                                             + ["notes.png"])
    report.write_report(report.evaluate_predictions(_examples()), str(out))
    assert "19 questions; baselines from" in (out / "results.md").read_text()


def test_empty_scene_scored_and_pictured(tmp_path):
    """A SAR scene without ships (reference NO_OBJECTS_ANSWER): answering so is not malformed;
    a box there is a false positive, counted on its own, and its picture says the scene is
    empty."""
    sea = np.zeros((60, 80, 3), np.uint8)
    ship = _ex("detection", "sar", box_text.DETECTION_PROMPT,
               box_text.detection_to_text([("ship", [B3])]),
               [box_text.detection_to_text([("ship", [B3])])], image=sea, id="ship")
    quiet = _ex("detection", "sar", box_text.DETECTION_PROMPT, box_text.NO_OBJECTS_ANSWER,
                [box_text.NO_OBJECTS_ANSWER], image=sea, id="quiet")
    noisy = dict(quiet, id="noisy", prediction=box_text.detection_to_text([("ship", [B1])]))
    good = report.evaluate_predictions([ship, quiet])["groups"]["detection"]["all"]
    assert good["n_malformed"] == 0 and good["model"]["precision@0.5"] == 1.0
    assert good["details"]["n_empty_scenes"] == 1
    bad = report.evaluate_predictions([noisy, ship])["groups"]["detection"]["all"]
    assert bad["model"]["precision@0.5"] == pytest.approx(0.5)
    assert bad["model"]["mAP@0.5"] == pytest.approx(0.5)   # the FP is ranked first
    assert bad["details"]["false_positives_on_empty_scenes"] == 1
    (path,) = report.write_box_pictures([noisy], str(tmp_path), max_per_task=1)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert not np.any(np.all(img == report.TRUE_COLOUR, axis=-1)[report.LEGEND_HEIGHT:])
    assert np.any(np.all(img == report.PRED_COLOUR, axis=-1)[report.LEGEND_HEIGHT:])
    legend = img[:report.LEGEND_HEIGHT, 136:]
    assert legend.max() > 128  # the empty-scene note is written



def test_oriented_boxes_rotated_map_and_polygons(tmp_path):
    """References with oriented boxes (DOTA/HRSC2016 records) get `rotated mAP@0.5` beside the
    horizontal mAP: a ship on one diagonal answered with the other has the same enclosing box
    (horizontal AP 1) but no rotated overlap (rotated AP 0). Pictures draw the corners."""
    ship = box_text.rotated_corners(0.5, 0.5, 0.8, 0.06, 45)
    cross = box_text.rotated_corners(0.5, 0.5, 0.8, 0.06, -45)
    image = np.zeros((50, 50, 3), np.uint8)
    ref = [box_text.detection_to_text([("ship", [ship])])]
    right = _ex("detection", "sar", box_text.DETECTION_PROMPT, ref[0], ref, 50, 50, image=image,
                id="right")
    wrong = dict(right, id="wrong", prediction=box_text.detection_to_text([("ship", [cross])]))
    good = report.evaluate_predictions([right])["groups"]["detection"]["all"]["model"]
    assert good["rotated mAP@0.5"] == pytest.approx(1.0)
    res = report.evaluate_predictions([wrong])
    bad = res["groups"]["detection"]["all"]["model"]
    assert bad["mAP@0.5"] == pytest.approx(1.0) and bad["rotated mAP@0.5"] == 0.0
    assert _row(res, "detection", "all", "rotated mAP@0.5")["model"] == 0.0
    # Horizontal references: no rotated row.
    assert not [r for r in report.evaluate_predictions(_examples())["rows"]
                if r["metric"] == "rotated mAP@0.5"]
    (path,) = report.write_box_pictures([wrong], str(tmp_path), max_per_task=1)
    img = np.asarray(Image.open(path).convert("RGB"))[report.LEGEND_HEIGHT:]

    def colours_near(x, y):  # original-pixel point -> colours within 1 original pixel of it
        window = img[(y - 1) * 8:(y + 2) * 8, (x - 1) * 8:(x + 2) * 8].reshape(-1, 3)
        return {tuple(c) for c in window}

    # Truth runs top-left to bottom-right, the prediction bottom-left to top-right; the
    # enclosing box's edges (10..40), which a rectangle would draw, stay untouched.
    assert report.TRUE_COLOUR in colours_near(15, 15)
    assert report.PRED_COLOUR in colours_near(35, 15)
    assert colours_near(25, 11) == colours_near(11, 25) == {(0, 0, 0)}
    # Oriented scenes are pictured apart from horizontal ones (the demo's split holds both):
    # one picture per task and kind, wherever the oriented scene falls in the split.
    both = report.write_box_pictures(_examples() + [wrong], str(tmp_path / "both"), max_per_task=1)
    assert [os.path.basename(p) for p in both] == ["grounding_optical_g_1.png",
                                                   "detection_infrared_d1.png",
                                                   "detection_sar_wrong.png"]
    assert report.picture_group(wrong) == ("detection", True)

