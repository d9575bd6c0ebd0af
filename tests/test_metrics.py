"""Metric values on small cases computed by hand."""

import pytest

from earthgpt_jax.evaluate import metrics


def test_box_iou():
    assert metrics.box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert metrics.box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert metrics.box_iou([0, 0, 1, 1], [0, 0, 1, 0.5]) == pytest.approx(0.5)
    assert metrics.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert metrics.box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # empty union


def test_grounding_scores():
    preds = [[0, 0, 1, 1], [0, 0, 2, 2], None, [0, 0, 1, 0.5]]
    gts = [[0, 0, 1, 1], [1, 1, 3, 3], [0, 0, 1, 1], [0, 0, 1, 1]]
    s = metrics.grounding_scores(preds, gts)
    assert s["n"] == 4 and s["n_malformed"] == 1
    assert s["Acc@0.5"] == pytest.approx(2 / 4)           # IoU 1 and IoU 0.5 count (>= 0.5)
    assert s["mIoU"] == pytest.approx((1 + 1 / 7 + 0 + 0.5) / 4)
    # cIoU: intersections 1 + 1 + 0 + 0.5, unions 1 + 7 + 1 (the missing box's gt) + 1.
    assert s["cIoU"] == pytest.approx(2.5 / 10)


def test_detection_scores_precision_recall_counts():
    ship_a, ship_b, far = [0, 0, .1, .1], [.2, .2, .3, .3], [.5, .5, .6, .6]
    plane_gt, plane_pred = [.4, .4, .5, .5], [.41, .4, .5, .5]   # IoU 0.9
    gt = [[("ship", [ship_a, ship_b])], [("airplane", [plane_gt])]]
    pred = [
        # right ship + a miss; the right place for ship_b but the wrong class.
        [("ship", 2, [ship_a, far]), ("airplane", 1, [ship_b])],
        [("airplane", 1, [plane_pred])],
    ]
    s = metrics.detection_scores(pred, gt)
    assert s["n"] == 2
    assert (s["n_true_positive"], s["n_pred_boxes"], s["n_gt_boxes"]) == (2, 4, 3)
    assert s["precision@0.5"] == pytest.approx(0.5)
    assert s["recall@0.5"] == pytest.approx(2 / 3)
    # Image 1 names an airplane that is not there -> wrong; image 2 right.
    assert s["count_accuracy"] == pytest.approx(0.5)
    assert s["class_count_accuracy"] == pytest.approx(1.0)
    assert s["per_class_recall"] == {"airplane": {"recall": 1.0, "n_gt": 1},
                                     "ship": {"recall": 0.5, "n_gt": 2}}


def test_detection_greedy_matching_is_one_to_one():
    gt = [[("ship", [[0, 0, 1, 1]])]]
    pred = [[("ship", [[0, 0, 1, 1], [0, 0, 1, 0.9]])]]
    s = metrics.detection_scores(pred, gt)
    assert s["n_true_positive"] == 1
    assert s["precision@0.5"] == pytest.approx(0.5) and s["recall@0.5"] == pytest.approx(1.0)
    # Stated count from (class, boxes) pairs is the number of boxes: 2 != 1.
    assert s["count_accuracy"] == 0.0
    # Greedy takes the highest IoU pair first.
    assert metrics.match_boxes([[0, 0, 1, 0.6], [0, 0, 1, 0.9]], [[0, 0, 1, 1]]) == [
        (1, 0, pytest.approx(0.9))]


def test_classification_accuracy():
    s = metrics.classification_accuracy(["Airport.", "planes", "river"], ["airport", "airplane", "lake"])
    assert s == {"accuracy": pytest.approx(2 / 3), "n": 3}


def test_vqa_accuracy_per_type():
    preds = ["Yes.", "There are 3 ships", "I don't know", "Rural", "four"]
    answers = ["yes", "3", "yes", "rural", ["5", "4"]]
    types = ["presence", "count", "presence", "other", "count"]
    s = metrics.vqa_accuracy(preds, answers, types)
    assert s["accuracy"] == pytest.approx(4 / 5)
    assert s["n_malformed"] == 1
    assert s["per_type"] == {"count": {"accuracy": 1.0, "n": 2}, "other": {"accuracy": 1.0, "n": 1},
                             "presence": {"accuracy": 0.5, "n": 2}}
    assert metrics.vqa_accuracy(["no"], ["yes"])["per_type"] == {"all": {"accuracy": 0.0, "n": 1}}


def test_caption_scores_identical_beats_different():
    refs = [["a plane is parked on the runway"], ["many green trees are around a lake"]]
    same = metrics.caption_scores(["A plane is parked on the runway.", "Many green trees are around a lake"], refs)
    other = metrics.caption_scores(["a ship in the harbor", "some buildings near a road"], refs)
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"):
        assert same[k] == pytest.approx(1.0, abs=1e-6)
    # CIDEr-D of a perfect match is 10 (x10 scaled cosine, every n-gram order equal to 1).
    assert same["CIDEr"] == pytest.approx(10.0, abs=1e-6)
    assert same["ROUGE-L"] == pytest.approx(1.0) and other["ROUGE-L"] < 0.3
    assert same["METEOR"] is None and "METEOR" in same["not_computed"]  # java_metrics is off
    assert other["CIDEr"] < 0.5 and other["BLEU-4"] < 0.01
    assert same["n"] == other["n"] == 2


def test_exact_match_accuracy():
    s = metrics.exact_match_accuracy(["The tiny vehicle.", "a big ship"], ["tiny vehicle", ["big boat", "small ship"]])
    assert s == {"accuracy": 0.5, "n": 2}


def test_empty_inputs():
    assert metrics.classification_accuracy([], []) == {"accuracy": None, "n": 0}
    assert metrics.caption_scores([], [])["n"] == 0
    assert metrics.caption_scores([], [])["CIDEr"] is None
    assert metrics.vqa_accuracy([], [])["accuracy"] is None
    g = metrics.grounding_scores([], [])
    assert g["n"] == 0 and g["Acc@0.5"] is None and g["cIoU"] is None
    d = metrics.detection_scores([], [])
    assert d["n"] == 0 and d["recall@0.5"] is None and d["count_accuracy"] is None
    assert metrics.exact_match_accuracy([], [])["n"] == 0


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.grounding_scores([None], [])


def test_false_positives_on_empty_scenes_lower_precision_and_map():
    """Image 1 holds one ship, found; image 2 is an empty scene. Answering it 'no objects'
    keeps precision and AP at 1; a box written there is a false positive: precision 1/2 and,
    ranked equal to the true positive but after it (image order), AP stays 1 (the TP comes
    first); placed before it (empty scene first), AP drops to 1/2 (VOC all-point)."""
    ship = [0.1, 0.1, 0.2, 0.2]
    gt = [[("ship", [ship])], []]
    clean = [[("ship", [ship])], []]
    noisy = [[("ship", [ship])], [("ship", [[0.5, 0.5, 0.6, 0.6]])]]
    s = metrics.detection_scores(clean, gt)
    assert s["precision@0.5"] == 1.0 and s["count_accuracy"] == 1.0
    assert metrics.detection_ap(clean, gt)["mAP@0.5"] == 1.0
    s = metrics.detection_scores(noisy, gt)
    assert s["precision@0.5"] == pytest.approx(0.5) and s["recall@0.5"] == 1.0
    assert s["count_accuracy"] == pytest.approx(0.5)  # the empty scene's count is wrong
    assert metrics.detection_ap(noisy, gt)["mAP@0.5"] == pytest.approx(1.0)
    first = metrics.detection_ap(noisy[::-1], gt[::-1])
    assert first["mAP@0.5"] == pytest.approx(0.5)
    assert first["per_class_AP"]["ship"] == {"AP": pytest.approx(0.5), "n_gt": 1, "n_pred": 2}


def test_rotated_iou_hand_computed():
    from earthgpt_jax.data.boxes import box_corners, rotated_corners

    square = box_corners((0, 0, 2, 2))
    assert metrics.rotated_iou(square, square) == pytest.approx(1.0)
    # The same square turned 45 degrees about its centre: the overlap is a regular octagon of
    # area 2a^2(sqrt2 - 1), so IoU = 1 / sqrt2.
    diamond = rotated_corners(1, 1, 2, 2, 45)
    assert metrics.rotated_iou(square, diamond) == pytest.approx(2 ** -0.5)
    # A 4 x 1 bar and the same bar turned 90 degrees: overlap 1, union 7.
    bar = rotated_corners(0, 0, 4, 1, 0)
    assert metrics.rotated_iou(bar, rotated_corners(0, 0, 4, 1, 90)) == pytest.approx(1 / 7)
    assert metrics.rotated_iou(bar, rotated_corners(10, 0, 4, 1, 0)) == 0.0
    # Corners listed in a self-crossing order still give the polygon they outline.
    bow_tie = (0, 0, 2, 2, 2, 0, 0, 2)
    assert metrics.rotated_iou(bow_tie, bow_tie) == pytest.approx(1.0)


def test_rotated_map_hand_computed_dota_protocol():
    """DOTA task 1: polygon IoU, VOC 2007 11-point AP. One image, two true ships; answer order
    ranks A (TP), B (FP), C (TP, IoU 1/sqrt2): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1,
    so 6 of the 11 points (recall 0..0.5) see precision 1 and 5 see 2/3: AP = (6 + 10/3) / 11."""
    from earthgpt_jax.data.boxes import rotated_corners

    ship1 = rotated_corners(0.3, 0.3, 0.2, 0.2, 0)
    ship2 = rotated_corners(0.7, 0.7, 0.2, 0.2, 0)
    gt = [[("ship", [ship1, ship2])]]
    pred = [[("ship", [ship1, rotated_corners(0.1, 0.9, 0.1, 0.1, 30),
                       rotated_corners(0.7, 0.7, 0.2, 0.2, 45)])]]
    out = metrics.rotated_detection_ap(pred, gt)
    assert out["mAP@0.5"] == pytest.approx((6 + 10 / 3) / 11)
    assert out["interpolation"] == "voc07"
    # Thin ships along the two diagonals: their enclosing horizontal boxes are the same box
    # (horizontal AP 1), the ships cross at right angles (rotated AP 0).
    ship = rotated_corners(0.5, 0.5, 0.8, 0.05, 45)
    other = rotated_corners(0.5, 0.5, 0.8, 0.05, -45)
    assert metrics.rotated_detection_ap([[("ship", [other])]], [[("ship", [ship])]])[
        "mAP@0.5"] == 0.0
    hbb = lambda q: [min(q[0::2]), min(q[1::2]), max(q[0::2]), max(q[1::2])]  # noqa: E731
    assert metrics.detection_ap([[("ship", [hbb(other)])]], [[("ship", [hbb(ship)])]])[
        "mAP@0.5"] == pytest.approx(1.0)


def test_detection_reference_with_a_count_and_no_boxes_has_no_class_recall():
    """A reference group may state a count without boxes: its class gets recall None (it was a
    ZeroDivisionError), and the count still scores."""
    out = metrics.detection_scores([[("ship", 2, [])]], [[("ship", 2, [])]])
    assert out["per_class_recall"] == {"ship": {"recall": None, "n_gt": 0}}
    assert out["count_accuracy"] == 1.0 and out["recall@0.5"] is None
