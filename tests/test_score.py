"""Detection AP against pycocotools and a hand-computed case; the scoring CLI end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from earthgpt_jax.data import boxes
from earthgpt_jax.evaluate import metrics, score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hand_computed_all_point_ap():
    # One image, 3 true ships; answer order ranks det A > B > C > D.
    gt = [[("ship", [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], [0.8, 0.8, 1.0, 1.0]])]]
    pred = [[("ship", [[0.0, 0.0, 0.2, 0.2],      # A: TP
                       [0.3, 0.3, 0.4, 0.4],      # B: FP (no overlap)
                       [0.5, 0.5, 0.7, 0.69],     # C: TP (IoU 0.95)
                       [0.0, 0.0, 0.2, 0.21]])]]  # D: FP (its best truth is taken)
    out = metrics.detection_ap(pred, gt)
    # precision at each detection: 1, 1/2, 2/3, 2/4; recall 1/3, 1/3, 2/3, 2/3.
    # envelope: recall (0,1/3] -> 1, (1/3,2/3] -> 2/3, (2/3,1] -> 0 => AP = 1/3 + 2/9.
    assert out["per_class_AP"]["ship"]["AP"] == pytest.approx(1 / 3 + 2 / 9, abs=1e-12)
    assert out["mAP@0.5"] == pytest.approx(1 / 3 + 2 / 9, abs=1e-12)
    # 101-point sampling of the same curve: 34 points at 1, 33 at 2/3, 34 at 0.
    coco = metrics.detection_ap(pred, gt, interpolation="coco101")
    assert coco["mAP@0.5"] == pytest.approx((34 + 33 * 2 / 3) / 101, abs=1e-12)


def _random_case(seed):
    rng = np.random.default_rng(seed)
    classes = ["ship", "airplane", "vehicle"]
    preds, gts = [], []
    for _ in range(6):
        g, p = [], []
        for cls in classes[:rng.integers(1, 4)]:
            # Well-separated truths on a grid, so "best truth" never collides with another
            # unmatched one (the one case where VOC and COCO matching differ).
            cells = rng.choice(16, rng.integers(1, 4), replace=False)
            truth = [[(c % 4) * 0.25, (c // 4) * 0.25, (c % 4) * 0.25 + 0.2,
                      (c // 4) * 0.25 + 0.2] for c in cells]
            g.append((cls, truth))
            dets = []
            for t in truth:
                if rng.random() < 0.8:
                    jitter = rng.uniform(-0.04, 0.04, 4)
                    dets.append([float(v) for v in np.clip(np.array(t) + jitter, 0, 1)])
            for _ in range(rng.integers(0, 3)):  # false alarms
                x, y = rng.uniform(0, 0.8, 2)
                dets.append([x, y, x + 0.05, y + 0.05])
            order = rng.permutation(len(dets))
            if dets:
                p.append((cls, [dets[k] for k in order]))
        preds.append(p)
        gts.append(g)
    return preds, gts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_ap_matches_pycocotools(seed):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import contextlib
    import io
    preds, gts = _random_case(seed)
    ours = metrics.detection_ap(preds, gts, interpolation="coco101")
    classes = sorted({c for g in gts for c, _ in g})
    cat_id = {c: k + 1 for k, c in enumerate(classes)}
    scale = 1000.0  # pixel-like numbers; IoU is scale invariant
    xywh = lambda b: [b[0] * scale, b[1] * scale, (b[2] - b[0]) * scale, (b[3] - b[1]) * scale]  # noqa
    images, anns, results = [], [], []
    for i, g in enumerate(gts):
        images.append({"id": i + 1, "width": 1000, "height": 1000})
        for cls, bxs in g:
            for b in bxs:
                box = xywh(b)
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_id[cls],
                             "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    for cls, dets in metrics.ranked_detections(preds).items():
        for s, i, _, b in dets:
            results.append({"image_id": i + 1, "category_id": cat_id[cls], "bbox": xywh(b),
                            "score": s})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns,
                        "categories": [{"id": v, "name": k} for k, v in cat_id.items()]}
        coco.createIndex()
        dt = coco.loadRes(results)
        ev = COCOeval(coco, dt, "bbox")
        ev.params.iouThrs = np.array([0.5])
        ev.params.maxDets = [1000]
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    for cls, k in cat_id.items():
        prec = ev.eval["precision"][0, :, k - 1, 0, 0]
        want = float(np.mean(prec[prec > -1]))
        assert ours["per_class_AP"][cls]["AP"] == pytest.approx(want, abs=1e-6), cls


def _run_score(tmp_path, task, rows, extra=()):
    path = tmp_path / f"{task}.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return subprocess.run([sys.executable, "-m", "earthgpt_jax.evaluate.score", f"--task={task}",
                           f"--predictions={path}", *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))


def test_score_cli_grounding_pixel_and_normalised(tmp_path):
    w, h = 200, 100
    px = [20, 10, 80, 60]
    norm = boxes.pixel_to_norm(px, w, h)
    rows = [
        {"id": "a", "prediction": boxes.boxes_to_text([norm]), "box": px, "width": w, "height": h},
        {"id": "b", "prediction": "[0.10,0.10,0.50,0.50]", "box": [0.1, 0.1, 0.5, 0.5]},
        {"id": "c", "prediction": "no idea", "box": [0.1, 0.1, 0.5, 0.5], "normalized": True},
        {"id": "d", "prediction": "[0.1,0.1,0.2,0.2]", "box": px},  # pixels, no size: skipped
    ]
    proc = _run_score(tmp_path, "grounding", rows)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n"] == 3 and out["skipped"] == 1
    assert out["Acc@0.5"] == pytest.approx(2 / 3)
    assert out["n_malformed"] == 1
    assert "4" in out["skipped_lines"][0]


def test_score_module_has_no_jax_import():
    code = ("import sys; import earthgpt_jax.evaluate.score as s; "
            "print(any(m == 'jax' or m.startswith('jax.') for m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.stdout.strip() == "False", proc.stderr


def test_score_in_process_all_tasks():
    det_gt = [[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.9]]
    rows = {
        "classification": [{"id": 1, "prediction": "This is an image of airport.",
                            "answer": "Airport"},
                           {"id": 2, "prediction": "forest", "references": ["river"]}],
        "caption": [{"id": 1, "prediction": "many boats in a harbor",
                     "references": ["many boats are in a harbor", "boats in the harbor"]},
                    {"id": 2, "prediction": "a green forest",
                     "references": ["a dense green forest"]}],
        "vqa": [{"id": 1, "prediction": "Yes", "answer": "yes", "question_type": "presence"},
                {"id": 2, "prediction": "3", "references": ["4"], "question_type": "count"}],
        "detection": [{"id": 1, "prediction": boxes.detection_to_text([("ship", det_gt)]),
                       "boxes": det_gt, "labels": ["ship", "ship"]},
                      {"id": 2, "prediction": "There are none.",
                       "boxes": [[10, 10, 50, 50]], "labels": ["planes"], "width": 100,
                       "height": 100}],
    }
    cls = score.score_rows("classification", rows["classification"])
    assert cls["accuracy"] == 0.5 and cls["n"] == 2
    cap = score.score_rows("caption", rows["caption"])
    assert cap["n"] == 2 and 0 < cap["BLEU-1"] <= 1
    vqa = score.score_rows("vqa", rows["vqa"])
    assert vqa["accuracy"] == 0.5 and vqa["per_type"]["presence"]["accuracy"] == 1.0
    det = score.score_rows("detection", rows["detection"])
    assert det["per_class_AP"]["ship"]["AP"] == pytest.approx(1.0)
    assert det["per_class_AP"]["airplane"]["AP"] == 0.0
    assert det["mAP@0.5"] == pytest.approx(0.5)
    assert det["recall@0.5"] == pytest.approx(2 / 3)


def test_score_empty_scenes_count_their_false_positives():
    """Lines of images without objects (`boxes: []`, or the reference `answer` in the
    documented NO_OBJECTS_ANSWER form) are scored: a box predicted there halves precision."""
    ship = [0.1, 0.1, 0.3, 0.3]
    rows = [{"prediction": boxes.detection_to_text([("ship", [ship])]), "boxes": [ship],
             "labels": ["ship"]},
            {"prediction": boxes.NO_OBJECTS_ANSWER, "boxes": [], "labels": []},
            {"prediction": boxes.NO_OBJECTS_ANSWER, "answer": boxes.NO_OBJECTS_ANSWER}]
    clean = score.score_rows("detection", rows)
    assert (clean["n"], clean["skipped"]) == (3, 0)
    assert clean["precision@0.5"] == 1.0 and clean["mAP@0.5"] == 1.0
    rows[2]["prediction"] = boxes.detection_to_text([("ship", [[0.5, 0.5, 0.7, 0.7]])])
    noisy = score.score_rows("detection", rows)
    assert noisy["precision@0.5"] == pytest.approx(0.5) and noisy["count_accuracy"] == \
        pytest.approx(2 / 3)


@pytest.mark.parametrize("line,reason", [
    ("{not json", "line 2: not valid JSON"),
    ('{"id": 1, "prediction": "x", "box": [0.1, 0.2, 0.3]}', "line 2: `box` must"),
    ('[1, 2]', "line 2: expected a JSON object"),
])
def test_score_cli_bad_line_is_a_clear_error(tmp_path, line, reason):
    good = {"id": 0, "prediction": "[0.1,0.1,0.2,0.2]", "box": [0.1, 0.1, 0.2, 0.2]}
    proc = _run_score(tmp_path, "grounding", [good, line])
    assert proc.returncode == 2
    assert reason in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_score_help_shows_the_input_schema(capsys):
    with pytest.raises(SystemExit) as exited:
        score.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "Predictions file schema" in out
    for field in ("`prediction`", "`references`", "`box`", "`labels`", "`normalized`"):
        assert field in out, field


def test_unrequested_java_metrics_name_the_score_option():
    out = score.score_rows("caption", [{"prediction": "a ship", "references": ["a ship"]}])
    assert set(out["not_computed"]) == {"METEOR", "SPICE"}
    for reason in out["not_computed"].values():
        assert "--java_metrics" in reason and "config.eval" not in reason


def test_non_utf8_predictions_name_the_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prediction": "ship", "answer": "ship"}\n'
                     b'{"prediction": "caf\xe9", "answer": "ship"}\n')
    assert score.main(["--task=classification", f"--predictions={path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"error: {path} line 2: not UTF-8 text (byte 0xe9 at column 20)" in err


def test_score_oriented_references_give_rotated_map():
    """Oriented references (`corners`, or corners in the `answer` text) add the rotated mAP:
    the right ship scores 1; the crossing one 0 though its enclosing box is the same."""
    ship = list(boxes.rotated_corners(0.5, 0.5, 0.8, 0.06, 45))
    cross = list(boxes.rotated_corners(0.5, 0.5, 0.8, 0.06, -45))
    rows = [{"prediction": boxes.detection_to_text([("ship", [ship])]), "corners": [ship],
             "labels": ["ship"]},
            {"prediction": boxes.detection_to_text([("ship", [cross])]),
             "answer": boxes.detection_to_text([("ship", [ship])])}]
    out = score.score_rows("detection", rows[:1])
    assert out["rotated_mAP@0.5"] == pytest.approx(1.0) and out["mAP@0.5"] == pytest.approx(1)
    out = score.score_rows("detection", rows[1:])
    assert out["rotated_mAP@0.5"] == 0.0 and out["mAP@0.5"] == pytest.approx(1.0)
    # Another IoU threshold names its own keys (it was a KeyError on oriented references).
    strict = score.score_rows("detection", rows[:1], iou_threshold=0.75)
    assert strict["rotated_mAP@0.75"] == pytest.approx(1.0) and "rotated_mAP@0.5" not in strict
    assert "rotated_mAP@0.5" not in score.score_rows("detection", [
        {"prediction": "There are no objects.", "boxes": [[0.1, 0.1, 0.2, 0.2]],
         "labels": ["ship"]}])
