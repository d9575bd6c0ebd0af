"""Per-task metrics as pure functions over Python lists.

Every function accepts empty inputs and then returns `n = 0` with `None` for the undefined
figures (JSON-friendly, unlike NaN). Boxes are `[x0, y0, x1, y1]` in any one frame; the padded
[0,1] frame of MMRS-1M is an isotropic scale plus a shift of pixel space, so IoU is the same in
both.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import io
import itertools
import os
import shutil
import subprocess
from collections import defaultdict
from typing import Iterable, Sequence

from earthgpt_jax.evaluate import parsers

BoxLike = Sequence[float]
# In the order the paper's captioning table gives them.
CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def classification_accuracy(preds: Sequence[str], refs: Sequence[str]) -> dict:
    """Exact match of `normalise_class(pred)` and `normalise_class(ref)`."""
    _check_lengths(preds, refs)
    hits = [float(parsers.normalise_class(p) == parsers.normalise_class(r))
            for p, r in zip(preds, refs)]
    return {"accuracy": _mean(hits), "n": len(hits)}


def caption_scores(preds: Sequence[str], refs_list: Sequence[Sequence[str]],
                   java_metrics: bool = False) -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr (pycocoevalcap) over simple lowercase/no-punctuation tokens;
    METEOR and SPICE too when `java_metrics` and their Java parts are present (`java_status`).

    CIDEr's IDF comes from the references of the evaluated set itself, as in the COCO toolkit,
    so a score depends on which captions are evaluated together. Items without references are
    skipped. With a single item every n-gram has document frequency 1 and CIDEr is 0 by
    construction. A Java metric that cannot run is `None`, with its reason under `not_computed`.
    METEOR and SPICE are off by default because each starts a JVM (tens of seconds on a
    loaded 2-core machine; `--mode=eval` turns them on with `config.eval.java_metrics`).
    """
    _check_lengths(preds, refs_list)
    gts, res = {}, {}
    for i, (pred, refs) in enumerate(zip(preds, refs_list)):
        if isinstance(refs, str):
            refs = [refs]
        refs = [t for t in (" ".join(parsers.simple_tokens(r)) for r in refs) if t]
        if refs:
            gts[i], res[i] = refs, [" ".join(parsers.simple_tokens(pred))]
    out = dict.fromkeys(CAPTION_METRICS) | {"n": len(gts)}
    status = java_status() if java_metrics else dict.fromkeys(JAVA_METRICS, JAVA_NOT_REQUESTED)
    skipped = {name: reason for name, reason in status.items() if reason}
    if gts:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        with contextlib.redirect_stdout(io.StringIO()):  # BleuScorer prints its ratio line.
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            cider, _ = Cider().compute_score(gts, res)
        out.update({f"BLEU-{k + 1}": float(bleu[k]) for k in range(4)})
        out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        out["CIDEr"] = float(cider)
        for name in (n for n in JAVA_METRICS if n not in skipped):
            try:
                out[name] = _java_score(name, gts, res)
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                # A JVM that dies (memory, a broken jar) costs this one figure, not the run.
                skipped[name] = f"{name} failed: {type(e).__name__}: {e}"
    if skipped:
        out["not_computed"] = skipped
    return out


# ----------------------------------------------------------------------------- Java metrics

JAVA_METRICS = ("METEOR", "SPICE")
JAVA_NOT_REQUESTED = "not requested (java_metrics=False; --config.eval.java_metrics=True)"
# SPICE parses captions with Stanford CoreNLP, whose jars pycocoevalcap downloads on first use;
# they are looked for, never downloaded, here.
SPICE_CORENLP_JAR = "stanford-corenlp-3.6.0.jar"


def java_status() -> dict[str, str | None]:
    """{metric: None if it can run here, else why not}: METEOR needs `java` on PATH; SPICE
    also needs the CoreNLP jars next to pycocoevalcap's spice-1.0.jar."""
    if shutil.which("java") is None:
        reason = "java not on PATH (pycocoevalcap runs {} as a Java program)"
        return {name: reason.format(name) for name in JAVA_METRICS}
    import pycocoevalcap.spice
    lib = os.path.join(os.path.dirname(pycocoevalcap.spice.__file__), "lib")
    spice = None
    if not os.path.exists(os.path.join(lib, SPICE_CORENLP_JAR)):
        spice = (f"{SPICE_CORENLP_JAR} (+ models jar) missing from {lib}; fetch them once with "
                 f"`python -m pycocoevalcap.spice.get_stanford_models` (needs internet)")
    return {"METEOR": None, "SPICE": spice}


@functools.lru_cache(maxsize=1)
def _meteor():
    """One METEOR JVM per process: starting it (loading its paraphrase tables) is the slow part,
    so every caption group of an evaluation shares it."""
    from pycocoevalcap.meteor.meteor import Meteor
    return Meteor()


def _java_score(name: str, gts: dict, res: dict) -> float:
    if name == "METEOR":
        return float(_meteor().compute_score(gts, res)[0])
    from pycocoevalcap.spice.spice import Spice
    with contextlib.redirect_stdout(io.StringIO()):
        return float(Spice().compute_score(gts, res)[0])


def vqa_answer_correct(pred: str, answers: str | Sequence[str]) -> tuple[bool, bool]:
    """(correct, parseable). Yes/no references compare `parse_yes_no`, numeric references
    compare `parse_number`, anything else the normalised strings; any reference may match."""
    if isinstance(answers, str):
        answers = [answers]
    parseable = False
    for ans in answers:
        want = parsers.normalise_vqa_answer(ans)
        if want in ("yes", "no"):
            got = parsers.parse_yes_no(pred)
        elif want.isdigit():
            got, want = parsers.parse_number(pred), int(want)
        else:
            got = parsers.normalise_vqa_answer(pred)
        parseable |= got is not None and got != ""  # 0 is a parsed count
        if got == want:
            return True, True
    return False, parseable


def vqa_accuracy(preds: Sequence[str], answers: Sequence[str | Sequence[str]],
                 question_types: Sequence[str] | None = None) -> dict:
    """Overall and per-question-type accuracy; `n_malformed` counts answers that held no
    yes/no (for yes/no references), no number (numeric references) or no text."""
    _check_lengths(preds, answers)
    if question_types is None:
        question_types = ["all"] * len(preds)
    _check_lengths(preds, question_types)
    scored = [vqa_answer_correct(pred, ans) for pred, ans in zip(preds, answers)]
    hits = [float(ok) for ok, _ in scored]
    by_type: dict[str, list[float]] = defaultdict(list)
    for hit, qtype in zip(hits, question_types):
        by_type[qtype].append(hit)
    return {"accuracy": _mean(hits), "n": len(hits),
            "n_malformed": sum(not parseable for _, parseable in scored),
            "per_type": {t: {"accuracy": _mean(v), "n": len(v)}
                         for t, v in sorted(by_type.items())}}


def box_area(box: BoxLike) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def box_intersection(a: BoxLike, b: BoxLike) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def box_iou(a: BoxLike, b: BoxLike) -> float:
    """IoU of two xyxy boxes (continuous coordinates, no +1); 0 when the union is empty."""
    inter = box_intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def rotated_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two quadrilaterals given by their corners (x1,y1,...,x4,y4), by polygon
    intersection (shapely), as DOTA's devkit computes it. A self-crossing corner order (a
    careless annotation) is read as the valid polygon it outlines (`make_valid`)."""
    import shapely

    pa, pb = (shapely.make_valid(shapely.Polygon(list(zip(q[0::2], q[1::2])))) for q in (a, b))
    inter = pa.intersection(pb).area
    union = pa.area + pb.area - inter
    return float(inter / union) if union > 0 else 0.0


def grounding_scores(pred_boxes: Sequence[BoxLike | None], gt_boxes: Sequence[BoxLike],
                     iou_threshold: float = 0.5) -> dict:
    """Acc@0.5 (IoU >= threshold), mIoU, and cIoU = sum of intersections / sum of unions.

    A `None` prediction (nothing parseable) scores IoU 0, adds the ground-truth area to the
    cIoU union, and is counted in `n_malformed`.
    """
    _check_lengths(pred_boxes, gt_boxes)
    ious, inter_sum, union_sum, malformed = [], 0.0, 0.0, 0
    for pred, gt in zip(pred_boxes, gt_boxes):
        if pred is None:
            malformed += 1
            inter, union = 0.0, box_area(gt)
        else:
            inter = box_intersection(pred, gt)
            union = box_area(pred) + box_area(gt) - inter
        ious.append(float(inter / union) if union > 0 else 0.0)
        inter_sum += inter
        union_sum += union
    ciou = (float(inter_sum / union_sum) if union_sum > 0 else 0.0) if ious else None
    return {f"Acc@{iou_threshold:g}": _mean([float(v >= iou_threshold) for v in ious]),
            "mIoU": _mean(ious), "cIoU": ciou, "n": len(ious), "n_malformed": malformed}


def match_boxes(pred: Sequence[BoxLike], gt: Sequence[BoxLike],
                iou_threshold: float = 0.5) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching: highest-IoU pairs first, each box used at most once."""
    pairs = sorted(((iou, i, j) for i, p in enumerate(pred) for j, g in enumerate(gt)
                    if (iou := box_iou(p, g)) >= iou_threshold),
                   key=lambda t: (-t[0], t[1], t[2]))
    used_p, used_g, matches = set(), set(), []
    for iou, i, j in pairs:
        if i not in used_p and j not in used_g:
            used_p.add(i)
            used_g.add(j)
            matches.append((i, j, iou))
    return matches


def _as_class_dict(groups: Iterable) -> tuple[dict[str, list], dict[str, int]]:
    """Groups of (class, boxes) or (class, count, boxes) -> boxes per class, count per class
    (groups of one class merged); the count is the one the answer states (`<p>N ...</p>`) when
    given, else the box count."""
    boxes: dict[str, list] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for group in groups or ():
        if len(group) == 3:
            cls, count, bxs = group
        else:
            (cls, bxs), count = group, None
        bxs = list(bxs or ())
        boxes[cls].extend(bxs)
        counts[cls] += int(count) if count is not None else len(bxs)
    return dict(boxes), dict(counts)


def detection_scores(pred_groups: Sequence[Iterable], gt_groups: Sequence[Iterable],
                     iou_threshold: float = 0.5) -> dict:
    """Precision/recall at IoU 0.5 with greedy per-class matching, plus count accuracy.

    The model emits no confidences, so there is no ranking and no AP; precision and recall are
    pooled over all images, empty scenes (no true groups) included, where every predicted box
    is a false positive. `count_accuracy` is the fraction of images whose predicted count
    equals the true count for every class that either side names; `class_count_accuracy` the
    same per (image, true class) pair.
    """
    _check_lengths(pred_groups, gt_groups)
    n_pred = 0
    count_ok, class_count_ok = [], []
    cls_tp, cls_gt = defaultdict(int), defaultdict(int)
    for pred, gt in zip(pred_groups, gt_groups):
        p_boxes, p_counts = _as_class_dict(pred)
        g_boxes, g_counts = _as_class_dict(gt)
        for cls, gb in g_boxes.items():
            cls_tp[cls] += len(match_boxes(p_boxes.get(cls, []), gb, iou_threshold))
            cls_gt[cls] += len(gb)
            class_count_ok.append(float(p_counts.get(cls, 0) == g_counts.get(cls, 0)))
        n_pred += sum(len(v) for v in p_boxes.values())
        classes = set(p_counts) | set(g_counts)
        count_ok.append(float(all(p_counts.get(c, 0) == g_counts.get(c, 0) for c in classes)))
    tp, n_gt = sum(cls_tp.values()), sum(cls_gt.values())
    return {
        f"precision@{iou_threshold:g}": (tp / n_pred if n_pred else 0.0) if count_ok else None,
        f"recall@{iou_threshold:g}": (tp / n_gt if n_gt else None),
        "count_accuracy": _mean(count_ok), "class_count_accuracy": _mean(class_count_ok),
        # A reference may name a class with a count and no boxes: no recall for it then.
        "per_class_recall": {c: {"recall": cls_tp[c] / cls_gt[c] if cls_gt[c] else None,
                                 "n_gt": cls_gt[c]}
                             for c in sorted(cls_gt)},
        "n": len(count_ok), "n_pred_boxes": n_pred, "n_gt_boxes": n_gt, "n_true_positive": tp}


def exact_match_accuracy(preds: Sequence[str], refs: Sequence[str | Sequence[str]]) -> dict:
    """Normalised-phrase exact match (region captioning); any reference may match."""
    _check_lengths(preds, refs)
    hits = []
    for pred, ref in zip(preds, refs):
        phrases = {parsers.normalise_phrase(r) for r in ([ref] if isinstance(ref, str) else ref)}
        hits.append(float(parsers.normalise_phrase(pred) in phrases))
    return {"accuracy": _mean(hits), "n": len(hits)}


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} predictions vs {len(b)} references")


# ----------------------------------------------------------------------------- detection AP

AP_RANKING_RULE = (
    "A text answer has no confidences, so each predicted box gets the score 1 - r/n, where r is "
    "its 0-based position among the boxes of its class in that image's answer and n their "
    "number: the first box the model writes for a class ranks highest. Across images, equal "
    "scores keep image order (a stable sort over images in input order, then answer order), "
    "the same tie rule as pycocotools' mergesort.")


def _envelope(precision: Sequence[float]) -> list[float]:
    """Each precision raised to the best at its recall or beyond, then a 0 past the last."""
    return [*itertools.accumulate(reversed(precision), max)][::-1] + [0.0]


def _all_point_ap(recall: Sequence[float], precision: Sequence[float]) -> float:
    """VOC 2010+ AP: area under the precision envelope at every recall change."""
    mrec = [0.0, *recall, 1.0]
    return float(sum((r1 - r0) * p for r0, r1, p in zip(mrec, mrec[1:], _envelope(precision))
                     if r1 != r0))


def _coco101_ap(recall: Sequence[float], precision: Sequence[float]) -> float:
    """COCO AP: the precision envelope sampled at recall 0, 0.01, ..., 1 (0 past the last).

    The recall points are pycocotools' own `np.linspace(0, 1, 101)` (0.07 is 0.07000000000000001
    there, which decides ties when a recall lands exactly on a point).
    """
    import numpy as np
    env = _envelope(precision)
    return sum(env[bisect.bisect_left(recall, float(r))]
               for r in np.linspace(0.0, 1.0, 101)) / 101


def _voc07_ap(recall: Sequence[float], precision: Sequence[float]) -> float:
    """VOC 2007 11-point AP, the DOTA devkit's (`use_07_metric=True`): the mean over recall
    t = 0, 0.1, ..., 1 of the best precision at recall >= t (0 where none)."""
    return sum(max((p for r, p in zip(recall, precision) if r >= k / 10 - 1e-12), default=0.0)
               for k in range(11)) / 11


def ranked_detections(pred_groups_per_image: Sequence[Iterable]) -> dict[str, list]:
    """Per class: [(score, image_index, rank, box)] under `AP_RANKING_RULE`, best first."""
    dets: dict[str, list] = defaultdict(list)
    for i, groups in enumerate(pred_groups_per_image):
        for cls, bxs in _as_class_dict(groups)[0].items():
            for r, box in enumerate(bxs):  # a class named without boxes gets no entry
                dets[cls].append((1.0 - r / len(bxs), i, r, box))
    return {cls: sorted(ds, key=lambda d: (-d[0], d[1], d[2])) for cls, ds in dets.items()}


def detection_ap(pred_groups_per_image: Sequence[Iterable], gt_groups_per_image: Sequence[Iterable],
                 iou_threshold: float = 0.5, interpolation: str = "voc", iou=box_iou) -> dict:
    """Per-class AP at one IoU threshold and their mean (mAP), for answers without scores.

    Groups per image are (class, boxes) or (class, count, boxes), as `detection_scores` takes.
    Detections are ranked by `AP_RANKING_RULE`. Matching follows the VOC devkit: in rank order,
    a detection is a true positive when its highest-IoU ground truth of the same class in the
    same image has IoU >= `iou_threshold` and is not yet taken, otherwise a false positive.
    IoU is continuous (no +1 pixel). `interpolation="voc"` is the all-point area under the
    precision envelope (VOC 2010+); `"coco101"` samples it at 101 recall points as pycocotools;
    `"voc07"` is VOC 2007's 11 points. mAP averages the classes that have ground truth; classes
    only predicted are reported with `AP: None` and their false positives, and do not enter the
    mean. `rotated_detection_ap` is the oriented-box form (DOTA's protocol).
    """
    if interpolation not in _AREAS:
        raise ValueError(f"interpolation must be one of {', '.join(_AREAS)}, got "
                         f"{interpolation!r}")
    _check_lengths(pred_groups_per_image, gt_groups_per_image)
    gts: dict[str, dict[int, list]] = defaultdict(dict)
    for i, groups in enumerate(gt_groups_per_image):
        for cls, bxs in _as_class_dict(groups)[0].items():
            if bxs:
                gts[cls][i] = list(bxs)
    dets = ranked_detections(pred_groups_per_image)
    area = _AREAS[interpolation]
    per_class = {}
    for cls in sorted(set(gts) | set(dets)):
        n_gt = sum(len(v) for v in gts.get(cls, {}).values())
        cls_dets = dets.get(cls, [])
        if n_gt == 0:
            per_class[cls] = {"AP": None, "n_gt": 0, "n_pred": len(cls_dets)}
            continue
        taken = {i: [False] * len(v) for i, v in gts[cls].items()}
        tp = fp = 0
        recall, precision = [], []
        for _, i, _, box in cls_dets:
            ious = [iou(box, g) for g in gts[cls].get(i, [])]
            best = max(range(len(ious)), key=ious.__getitem__, default=None)
            if best is not None and ious[best] >= iou_threshold and not taken[i][best]:
                taken[i][best] = True
                tp += 1
            else:
                fp += 1
            recall.append(tp / n_gt)
            precision.append(tp / (tp + fp))
        per_class[cls] = {"AP": area(recall, precision), "n_gt": n_gt, "n_pred": len(cls_dets)}
    scored = [v["AP"] for v in per_class.values() if v["AP"] is not None]
    return {f"mAP@{iou_threshold:g}": _mean(scored), "per_class_AP": per_class,
            "n": len(gt_groups_per_image), "interpolation": interpolation,
            "ranking": AP_RANKING_RULE}


_AREAS = {"voc": _all_point_ap, "coco101": _coco101_ap, "voc07": _voc07_ap}


def rotated_detection_ap(pred_groups_per_image: Sequence[Iterable],
                         gt_groups_per_image: Sequence[Iterable],
                         iou_threshold: float = 0.5) -> dict:
    """Rotated mAP as DOTA's devkit (task 1) computes it: boxes are corners (x1,y1,...,x4,y4;
    `boxes.parse_detection(text, corners=True)`), polygon IoU, a detection a true positive at
    IoU >= 0.5 with a ground truth not yet taken, VOC 2007 11-point AP per class. Ranking as
    `AP_RANKING_RULE`. The devkit leaves `difficult` objects out of both sides; records carry
    no such flag, so they are scored as ordinary objects here."""
    return detection_ap(pred_groups_per_image, gt_groups_per_image, iou_threshold,
                        interpolation="voc07", iou=rotated_iou)

