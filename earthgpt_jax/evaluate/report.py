"""From raw model answers to a results table with a trivial baseline beside every figure.

An example is a dict: `task` (classification | captioning | vqa | grounding | region_captioning |
detection), `sensor` (optical | sar | infrared), `question`, `prediction` (raw model text),
`references` (the record's answers; several for captioning), `width`, `height` (original image
size), optional `id` and, for pictures, `image` (uint8 array of the original image).

Baselines answer without looking at the image: the majority class / answer / count, the most
common caption, the mean box. Their statistics come from training answers (`baselines_from`) or,
when none are given, from the evaluated references themselves (an optimistic baseline, since it
peeks at the test answers' distribution). Statistics are kept per task and per (task, sensor);
a sensor's own statistics are used when it has any.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

from earthgpt_jax.data import boxes as box_text
from earthgpt_jax.evaluate import metrics, parsers

TASKS = ("classification", "captioning", "vqa", "grounding", "region_captioning", "detection")
# Rows of the report, in order; VQA is also reported on its presence, comparison and counting
# questions (RSVQA's presence and comparison columns).
REPORT_TASKS = ("classification", "captioning", "vqa", "vqa_presence", "vqa_comparison",
                "vqa_count", "grounding", "region_captioning", "detection")
VQA_SUBTASKS = ("presence", "comparison", "count")
HEADLINE_METRICS = {
    **dict.fromkeys(("classification", "vqa", "vqa_presence", "vqa_comparison", "vqa_count"),
                    ("accuracy",)),
    "captioning": metrics.CAPTION_METRICS,
    "grounding": ("Acc@0.5", "mIoU", "cIoU"),
    "region_captioning": ("exact_match", "BLEU-4", "CIDEr"),
    "detection": ("mAP@0.5", "precision@0.5", "recall@0.5", "count_accuracy"),
}
# Reported only where the references hold oriented boxes.
OPTIONAL_METRICS = {"detection": ("rotated mAP@0.5",)}
ALL = "all"
TRUE_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)


# ----------------------------------------------------------------------------- answer parsing

# RSVQA's wordings: presence 'Is there a road?' / 'Is a parking present?'; comparison 'Are
# there more roads than buildings?' / 'Is the number of roads equal to the number of parkings?'.
_ASKS_PRESENCE = re.compile(r"\b(is|are) there\b|\bpresent\b")
_COMPARES = re.compile(r"\b(more|less|fewer|than|equal|number)\b")


def vqa_question_type(question: str, reference: str) -> str:
    """presence ('Is there a road?', 'Is a parking present?'), count ('How many ...'),
    comparison (any other yes/no question), other."""
    q = str(question or "").lower()
    ref = parsers.normalise_vqa_answer(reference)
    if ref in ("yes", "no"):
        asks_presence = _ASKS_PRESENCE.search(q) and not _COMPARES.search(q)
        return "presence" if asks_presence else "comparison"
    if "how many" in q or ref.isdigit():
        return "count"
    return "other"


def _reference(example: dict) -> str:
    return (example.get("references") or [""])[0]


def _sensor(example: dict) -> str:
    return str(example.get("sensor") or "unknown").lower()


def _gt_box(example: dict):
    found, _ = box_text.parse_boxes(_reference(example))
    return list(found[0]) if found else None


def _gt_groups(example: dict):
    return parsers.parse_detection_answer(_reference(example))[0]


def _corner_groups(text: str):
    """Detection groups with every box as its four corners (for rotated IoU)."""
    groups, _ = box_text.parse_detection(str(text or ""), corners=True)
    return [(parsers.normalise_class(c), n, bxs) for c, n, bxs in groups]


def _any_oriented(*group_lists) -> bool:
    """Whether any box of these `_corner_groups` results is oriented."""
    return any(box_text.is_oriented(q) for gs in group_lists for _, _, qs in gs for q in qs)


def picture_group(example: dict) -> tuple[str, bool]:
    """Pictures are counted per (task, oriented references?): scenes with oriented boxes get
    their own `num_pictures` beside the horizontal ones, wherever they fall in the split."""
    task = example.get("task")
    return task, task == "detection" and _any_oriented(_corner_groups(_reference(example)))


# ----------------------------------------------------------------------------- baselines

def _majority(values: Iterable):
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else None


def _most_common_caption(captions: Sequence[str]) -> str:
    """Most frequent normalised caption; ties (e.g. all unique) go to the caption made of the
    most frequent words, a cheap stand-in for the consensus caption."""
    norm = [c for c in (" ".join(parsers.simple_tokens(c)) for c in captions) if c]
    if not norm:
        return ""
    counts = Counter(norm)
    top = max(counts.values())
    tied = [c for c, k in counts.items() if k == top]
    word_freq = Counter(w for c in norm for w in c.split())
    return max(tied, key=lambda c: (np.mean([word_freq[w] for w in c.split()]), -len(c)))


def _task_stats(examples: Sequence[dict], task: str) -> dict:
    if task == "classification":
        return {"majority": _majority(parsers.normalise_class(_reference(e)) for e in examples)}
    if task == "vqa":
        by_type = defaultdict(list)
        for e in examples:
            ref = _reference(e)
            by_type[vqa_question_type(e.get("question", ""), ref)].append(
                parsers.normalise_vqa_answer(ref))
        return {"majority_by_type": {t: _majority(v) for t, v in sorted(by_type.items())},
                "majority": _majority(a for v in by_type.values() for a in v)}
    if task == "captioning":
        return {"caption": _most_common_caption([r for e in examples
                                                 for r in e.get("references") or []])}
    if task == "region_captioning":
        return {"phrase": _majority(parsers.normalise_phrase(_reference(e)) for e in examples
                                    if _reference(e).strip())}
    if task == "grounding":
        found = [b for b in (_gt_box(e) for e in examples) if b is not None]
        return {"mean_box": np.mean(found, axis=0).tolist() if found else None}
    if task == "detection":
        groups = [g for e in examples for g in _gt_groups(e)]
        all_boxes = [b for _, _, bxs in groups for b in bxs]
        by_class = sorted(_group_by(groups, lambda g: g[0]).items())
        return {"mean_box": np.mean(all_boxes, axis=0).tolist() if all_boxes else None,
                "majority_count": _majority(count for _, count, _ in groups),
                "majority_count_by_class": {c: _majority(count for _, count, _ in gs)
                                            for c, gs in by_class}}
    raise ValueError(f"unknown task {task!r}")


def baselines_from(train_examples: Sequence[dict], source: str = "train") -> dict:
    """Answer statistics per task and per (task, sensor): {'source', 'stats': {task: {sensor|'all':
    stats}}}. `train_examples` use the example schema; `prediction` is not needed."""
    by_task = _group_by((e for e in train_examples or () if e.get("task") in TASKS),
                        lambda e: e["task"])
    stats = {}
    for task, exs in by_task.items():
        per_sensor = sorted(_group_by(exs, _sensor).items())
        stats[task] = {ALL: _task_stats(exs, task)} | {sensor: _task_stats(sexs, task)
                                                       for sensor, sexs in per_sensor}
    return {"source": source, "n": sum(len(v) for v in by_task.values()), "stats": stats}


def _group_by(items: Iterable, key) -> dict[str, list]:
    groups = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return groups


def _baseline_answer_groups(gt_groups, stats):
    """Mean box and majority count for every class the image truly holds (the baseline is told
    the classes, so its recall and count accuracy are upper bounds for a blind constant)."""
    mean_box = stats.get("mean_box")
    by_class = stats.get("majority_count_by_class") or {}
    return [(cls, by_class.get(cls, stats.get("majority_count") or 0),
             [mean_box] if mean_box is not None else []) for cls, _, _ in gt_groups]


# ----------------------------------------------------------------------------- scoring

def _score_group(task: str, examples: Sequence[dict], stats: dict,
                 java_metrics: bool = False) -> dict:
    """Model and baseline metrics of one (task, sensor) group; task may be a VQA sub-task.
    `java_metrics` adds METEOR/SPICE to captioning (see `metrics.caption_scores`)."""
    preds = [str(e.get("prediction") or "") for e in examples]
    refs = [_reference(e) for e in examples]
    out = {"n": len(examples), "n_malformed": 0, "model": {}, "baseline": {}, "details": {}}
    if task == "classification":
        base = stats.get("majority") or ""
        out["model"] = metrics.classification_accuracy(preds, refs)
        out["baseline"] = metrics.classification_accuracy([base] * len(refs), refs)
        out["details"]["majority_class"] = base
    elif task.startswith("vqa"):
        types = [vqa_question_type(e.get("question", ""), r) for e, r in zip(examples, refs)]
        by_type = stats.get("majority_by_type") or {}
        base_preds = [by_type.get(t, stats.get("majority") or "") for t in types]
        out["model"] = metrics.vqa_accuracy(preds, refs, types)
        out["baseline"] = metrics.vqa_accuracy(base_preds, refs, types)
        out["n_malformed"] = out["model"]["n_malformed"]
        out["details"]["majority_by_type"] = by_type
    elif task == "captioning":
        all_refs = [list(e.get("references") or []) for e in examples]
        base = stats.get("caption") or ""
        for side, answers in (("model", preds), ("baseline", [base] * len(refs))):
            out[side] = metrics.caption_scores(answers, all_refs, java_metrics=java_metrics)
        out["details"]["baseline_caption"] = base
        out["n_malformed"] = sum(not parsers.simple_tokens(p) for p in preds)
    elif task == "region_captioning":
        base = stats.get("phrase") or ""
        for side, answers in (("model", preds), ("baseline", [base] * len(refs))):
            scores = metrics.exact_match_accuracy(answers, refs)
            scores.update(metrics.caption_scores(answers, [[r] for r in refs]))
            scores["exact_match"] = scores.pop("accuracy")
            out[side] = scores
        out["details"]["majority_phrase"] = base
        out["n_malformed"] = sum(not parsers.simple_tokens(p) for p in preds)
    elif task == "grounding":
        gts, pred_boxes, malformed = [], [], 0
        for e, p in zip(examples, preds):
            gt = _gt_box(e)
            if gt is not None:
                box, bad = parsers.parse_grounding_answer(p)
                malformed += bad
                gts.append(gt)
                pred_boxes.append(box)
        mean_box = stats.get("mean_box")
        out["model"] = metrics.grounding_scores(pred_boxes, gts)
        out["baseline"] = metrics.grounding_scores([mean_box] * len(gts), gts)
        out["baseline"]["n_malformed"] = 0
        out["n"], out["n_malformed"] = len(gts), malformed
        out["details"].update(mean_box=mean_box, n_unparseable_references=len(examples) - len(gts),
                              n_no_box=out["model"]["n_malformed"])
    elif task == "detection":
        gts = [_gt_groups(e) for e in examples]
        parsed = [parsers.parse_detection_answer(p) for p in preds]
        pred_groups = [groups for groups, _ in parsed]
        base_groups = [_baseline_answer_groups(gt, stats) for gt in gts]
        out["model"] = metrics.detection_scores(pred_groups, gts)
        out["baseline"] = metrics.detection_scores(base_groups, gts)
        # VOC AP with answer-order ranking (metrics.AP_RANKING_RULE, quoted in the notes).
        for side, groups in (("model", pred_groups), ("baseline", base_groups)):
            ap = metrics.detection_ap(groups, gts)
            out[side]["mAP@0.5"] = ap["mAP@0.5"]
            out[side]["per_class_AP"] = {c: v["AP"] for c, v in ap["per_class_AP"].items()}
        # Oriented references (DOTA, HRSC2016): rotated mAP as DOTA's devkit computes it,
        # horizontal predictions taken as their rectangles.
        corner_gts = [_corner_groups(r) for r in refs]
        if _any_oriented(*corner_gts):
            corner_preds = [_corner_groups(p) for p in preds]
            corner_base = [[(c, n, [box_text.box_corners(b) for b in bxs]) for c, n, bxs in g]
                           for g in base_groups]
            for side, groups in (("model", corner_preds), ("baseline", corner_base)):
                out[side]["rotated mAP@0.5"] = metrics.rotated_detection_ap(
                    groups, corner_gts)["mAP@0.5"]
        out["n_malformed"] = sum(bad for _, bad in parsed)
        # Empty scenes (answered boxes.NO_OBJECTS_ANSWER) are scored like any image: every box
        # predicted there is a false positive in precision and AP; shown here on their own.
        empty = [sum(len(b) for _, _, b in p) for g, p in zip(gts, pred_groups) if not g]
        out["details"].update(mean_box=stats.get("mean_box"),
                              majority_count=stats.get("majority_count"),
                              n_empty_scenes=len(empty),
                              false_positives_on_empty_scenes=sum(empty))
    else:
        raise ValueError(f"unknown task {task!r}")
    return out


def _report_task_of(example: dict) -> list[str]:
    """The report groups an example belongs to (VQA also to its presence/count sub-task)."""
    task = example.get("task")
    if task != "vqa":
        return [task]
    qtype = vqa_question_type(example.get("question", ""), _reference(example))
    return ["vqa"] + ([f"vqa_{qtype}"] if qtype in VQA_SUBTASKS else [])


def evaluate_predictions(examples: Sequence[dict], baselines: dict | None = None,
                         java_metrics: bool = False) -> dict:
    """Metrics per task and per (task, sensor), each with its baseline; see module docstring.

    Returns {'n_examples', 'n_unknown_task', 'baseline_source', 'groups': {task: {sensor|'all':
    {'n', 'n_malformed', 'model': {...}, 'baseline': {...}, 'details': {...}}}}, 'rows': [{'task',
    'sensor', 'metric', 'model', 'baseline', 'n'}], 'notes': [why a figure is missing, how
    detection answers are ranked]}. `java_metrics` asks for METEOR and SPICE on captioning.
    """
    examples = list(examples or ())
    known = [e for e in examples if e.get("task") in TASKS]
    if baselines is None:
        baselines = baselines_from(known, source="eval_references")
    grouped: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for e in known:
        for task in _report_task_of(e):
            grouped[task][ALL].append(e)
            grouped[task][_sensor(e)].append(e)
    groups = {}
    for task in (t for t in REPORT_TASKS if t in grouped):
        stats = baselines.get("stats", {}).get("vqa" if task.startswith("vqa") else task, {})
        sensors = [ALL] + sorted(s for s in grouped[task] if s != ALL)
        groups[task] = {s: _score_group(task, grouped[task][s],
                                        stats.get(s) or stats.get(ALL) or {}, java_metrics)
                        for s in sensors}
    return {"n_examples": len(examples), "n_unknown_task": len(examples) - len(known),
            "baseline_source": baselines.get("source", "given"), "groups": groups,
            "rows": _rows(groups), "notes": _notes(groups)}


def _notes(groups: dict) -> list[str]:
    """Why a reported figure is missing (a Java metric that could not run), once per reason."""
    # Only captioning reports METEOR/SPICE (region captioning scores short phrases without them).
    notes = list(dict.fromkeys(
        f"{name} not computed: {reason}" for g in groups.get("captioning", {}).values()
        for name, reason in (g["model"].get("not_computed") or {}).items()))
    if "detection" in groups:
        notes.append(f"Detection mAP@0.5: {metrics.AP_RANKING_RULE}")
    return notes


def _rows(groups: dict) -> list[dict]:
    rows = []
    for task, per_sensor in groups.items():
        for sensor, g in per_sensor.items():
            optional = tuple(m for m in OPTIONAL_METRICS.get(task, ()) if m in g["model"])
            rows += [{"task": task, "sensor": sensor, "metric": metric,
                      "model": g["model"].get(metric), "baseline": g["baseline"].get(metric),
                      "n": g["n"]} for metric in HEADLINE_METRICS[task] + optional]
            rows.append({"task": task, "sensor": sensor, "metric": "malformed answers",
                         "model": g["n_malformed"], "baseline": None, "n": g["n"]})
    return rows


# ----------------------------------------------------------------------------- writing

def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_table(results: dict) -> str:
    """Markdown table: task | sensor | metric | model | baseline | n."""
    lines = [f"| {r['task']} | {r['sensor']} | {r['metric']} | {_fmt(r['model'])} | "
             f"{_fmt(r['baseline'])} | {r['n']} |" for r in results.get("rows", [])]
    header = ["| task | sensor | metric | model | baseline | n |", "|---|---|---|---|---|---|"]
    return "\n".join(header + (lines or ["| (no examples) | - | - | - | - | 0 |"])) + "\n"


def write_report(results: dict, out_dir: str) -> str:
    """Write results.json and results.md into out_dir; return the markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    table = results_table(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=json_default)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        notes = results.get("notes")
        f.write(f"# Evaluation results\n\n{results.get('n_examples', 0)} questions; baselines "
                f"from {results.get('baseline_source', '-')}.\n\n{table}"
                + ("\n" + "".join(f"- {n}\n" for n in notes) if notes else ""))
    return table


def json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def _to_rgb(image):
    from PIL import Image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return Image.fromarray(arr[..., :3], mode="RGB")


MIN_PICTURE_SIDE = 384  # small remote-sensing chips are enlarged so boxes and labels read
LEGEND_HEIGHT = 26


def draw_boxes_png(image, true_boxes_px, pred_boxes_px, labels, path, pred_labels=None,
                   note: str = "") -> str:
    """Save the image with true boxes in green and predicted boxes in red, under a legend strip.

    Images smaller than `MIN_PICTURE_SIDE` are enlarged by a whole factor (nearest neighbour,
    so pixels stay pixels). `labels` (optional) name the true boxes. Boxes are in pixels of
    `image`: [x0,y0,x1,y1], or an oriented box's four corners [x1,y1,...,x4,y4], drawn as their
    polygon. `note` goes in the legend strip (an empty scene says so: no green box shows it).
    """
    from PIL import Image, ImageDraw, ImageFont
    img = _to_rgb(image)
    scale = max(1, -(-MIN_PICTURE_SIDE // max(img.size)))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (max(img.width, 140), img.height + LEGEND_HEIGHT), (0, 0, 0))
    canvas.paste(img, (0, LEGEND_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(min(img.size) / 150))

    def _draw(bxs, names, colour):
        for k, b in enumerate(bxs or ()):
            if len(b) == 8:  # an oriented box: its four corners
                points = [(float(x) * scale, float(y) * scale + LEGEND_HEIGHT)
                          for x, y in zip(b[0::2], b[1::2])]
                draw.polygon(points, outline=colour, width=width)
                x0, y0 = min(p[0] for p in points), min(p[1] for p in points)
            else:
                x0, x1 = sorted((float(b[0]) * scale, float(b[2]) * scale))
                y0, y1 = sorted((float(b[1]) * scale + LEGEND_HEIGHT,
                                 float(b[3]) * scale + LEGEND_HEIGHT))
                draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
            if names is not None and k < len(names) and names[k]:
                draw.text((x0 + 2, max(float(LEGEND_HEIGHT), y0 - 11)), str(names[k]),
                          fill=colour, font=font)

    _draw(true_boxes_px, labels, TRUE_COLOUR)
    _draw(pred_boxes_px, pred_labels, PRED_COLOUR)
    for x, colour, legend in ((4, TRUE_COLOUR, "truth"), (60, PRED_COLOUR, "predicted")):
        draw.rectangle([x, 8, x + 8, 16], fill=colour)
        draw.text((x + 12, 6), legend, fill=(255, 255, 255), font=font)
    if note:
        draw.text((136, 6), note, fill=(255, 255, 255), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, format="PNG")
    return path


# write_box_pictures' file names: {task}_{sensor}_{example id}.png
PICTURE_NAME = re.compile(r"(grounding|detection)_[a-z]+_[A-Za-z0-9_.-]+\.png")


def write_box_pictures(examples_with_images: Sequence[dict], out_dir: str,
                       max_per_task: int = 4) -> list[str]:
    """Draw truth vs prediction for up to `max_per_task` grounding and detection examples that
    carry an `image` (the original image), counted per `picture_group` (oriented detection
    scenes apart); boxes go from the padded [0,1] frame to pixels.
    The pictures an earlier evaluation left in out_dir are removed first: those left are this
    run's."""
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            if PICTURE_NAME.fullmatch(name):
                os.remove(os.path.join(out_dir, name))
    written, per_task = [], Counter()
    for i, e in enumerate(examples_with_images or ()):
        task = e.get("task")
        if (task not in ("grounding", "detection") or e.get("image") is None
                or per_task[picture_group(e)] >= max_per_task):
            continue
        h, w = np.asarray(e["image"]).shape[:2]
        width, height = int(e.get("width") or w), int(e.get("height") or h)
        pred_text = str(e.get("prediction") or "")
        if task == "grounding":
            gt, pred = _gt_box(e), parsers.parse_grounding_answer(pred_text)[0]
            true_boxes = [box_text.norm_to_pixel(gt, width, height)] if gt is not None else []
            pred_boxes = [box_text.norm_to_pixel(pred, width, height)] if pred is not None else []
            labels, pred_labels = ["truth"] * len(true_boxes), None
        else:
            # Corners, so oriented boxes are drawn as they are; horizontal ones as rectangles.
            true_boxes, labels, pred_boxes, pred_labels = [], [], [], []
            for text, shapes, names in ((_reference(e), true_boxes, labels),
                                        (pred_text, pred_boxes, pred_labels)):
                for cls, _, bxs in _corner_groups(text):
                    shapes.extend(box_text.norm_to_pixel(box_text.drawn_shape(q), width, height)
                                  for q in bxs)
                    names.extend([cls] * len(bxs))
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(e.get("id", i)))
        path = os.path.join(out_dir, f"{task}_{_sensor(e)}_{name}.png")
        note = ("empty scene: every red box is a false positive"
                if task == "detection" and not true_boxes else "")
        written.append(draw_boxes_png(e["image"], true_boxes, pred_boxes, labels, path,
                                      pred_labels=pred_labels, note=note))
        per_task[picture_group(e)] += 1
    return written
