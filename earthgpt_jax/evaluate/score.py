"""Score any model's answers from a JSONL file, without a model (and without importing JAX).

    python -m earthgpt_jax.evaluate.score --task=grounding --predictions=preds.jsonl

Prints the metrics as one JSON object on stdout. Exit code 2 with `error: FILE line N: reason`
on stderr for a line that cannot be read (not JSON, not an object, a field of the wrong type).

Predictions file schema (one JSON object per line; blank lines are ignored):

| field          | tasks            | meaning                                                     |
|----------------|------------------|-------------------------------------------------------------|
| `id`           | all              | any string or number (optional; the line number otherwise) |
| `prediction`   | all              | the model's raw answer text                                 |
| `answer`       | all              | one reference answer (string); for grounding/detection a    |
|                |                  | reference in the model's own box text format                |
| `references`   | classification,  | list of reference strings (a single string is accepted);    |
|                | caption, vqa     | classification uses the first, VQA accepts any              |
| `question_type`| vqa              | optional: VQA accuracy is also reported per type            |
| `box`          | grounding        | true box `[x0, y0, x1, y1]`                                 |
| `boxes`        | detection        | true boxes `[[x0, y0, x1, y1], ...]` (grounding: first one);|
|                |                  | `[]` for an image without objects (an empty scene)          |
| `labels`       | detection        | class name of each box in `boxes` (same length)             |
| `corners`      | detection        | oriented true boxes `[[x1, y1, ..., x4, y4], ...]` instead  |
|                |                  | of `boxes` (`labels` then names them)                       |
| `width`,`height`| grounding, detection | original image size in pixels, needed for pixel boxes |
| `normalized`   | grounding, detection | `true`: boxes are already in the padded [0,1] frame   |

An empty scene is scored like any image: its reference is `boxes: []` or the answer
`boxes.NO_OBJECTS_ANSWER` ("There are no objects."), the form the model is trained to give; any
box predicted there is a false positive and lowers precision and mAP.

Boxes are in pixels of the original image, or normalised: fractions of the image after
centre-padding it to a square, the frame the model writes (MMRS-1M's convention). A box is taken
as normalised when `normalized` is true, or when `normalized` is absent and every value is
<= 1; pixel boxes are converted with `boxes.pixel_to_norm(box, width, height)`. Class names are
normalised (`parsers.normalise_class`: case, plurals, synonyms such as plane -> airplane).

A line without the fields its task needs (no `prediction`, no reference, pixel boxes without
`width`/`height`) is not scored: it is counted in `skipped`, with its reason in
`skipped_lines` (the first 20).

Output keys per task: classification `accuracy`; caption `BLEU-1..4`, `ROUGE-L`, `CIDEr` (and
`METEOR`, `SPICE` with --java_metrics; a metric that could not run is null, its reason under
`not_computed`); vqa `accuracy`,
`per_type`, `n_malformed`; grounding `Acc@0.5`, `mIoU`, `cIoU`, `n_malformed`; detection
`mAP@0.5` and `per_class_AP` (VOC all-point AP; a text answer has no confidences, so the k-th
of n boxes a class gets in an answer is scored 1 - k/n, see `metrics.AP_RANKING_RULE`), plus
`precision@0.5`, `recall@0.5`, `count_accuracy`, and where references hold oriented boxes
`rotated_mAP@0.5` and `rotated_per_class_AP` (polygon IoU, 11-point AP: DOTA's devkit);
always `n` (lines scored), `skipped`, `task`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable

from earthgpt_jax.data import boxes as box_text
from earthgpt_jax.evaluate import metrics, parsers

TASKS = ("classification", "caption", "vqa", "grounding", "detection")
_ALIASES = {"captioning": "caption", "cls": "classification"}
MAX_SKIPPED_REPORTED = 20
JAVA_NOT_REQUESTED = "not requested (add --java_metrics; needs java on PATH)"


class LineError(ValueError):
    """A line that cannot be read; the message names the line and the reason."""


class _Skip(Exception):
    """A line that lacks the fields its task needs."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _box(value, what: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(map(_is_number, value)):
        raise LineError(f"`{what}` must be a list of 4 numbers [x0, y0, x1, y1], got "
                        f"{json.dumps(value)[:80]}")
    return [float(v) for v in value]


def _normalised(row: dict, bxs: list[list[float]]) -> list[list[float]]:
    if not bxs:
        return bxs
    flag = row.get("normalized", row.get("normalised"))
    if flag is not None and not isinstance(flag, bool):
        raise LineError(f"`normalized` must be true or false, got {json.dumps(flag)}")
    if flag or (flag is None and all(v <= 1.0 for b in bxs for v in b)):
        return bxs
    width, height = row.get("width"), row.get("height")
    if width is None or height is None:
        raise _Skip("pixel boxes need `width` and `height` (or set `normalized: true`)")
    if not (_is_number(width) and _is_number(height)) or width <= 0 or height <= 0:
        raise LineError(f"`width`/`height` must be positive numbers, got {width!r}, {height!r}")
    return [list(box_text.pixel_to_norm(b, int(width), int(height))) for b in bxs]


def _text(row: dict, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise LineError(f"`{key}` must be a string, got {type(value).__name__}")
    return value


def _references(row: dict) -> list[str]:
    if "references" in row:
        refs = row["references"]
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise LineError("`references` must be a list of strings")
        if refs:
            return refs
    if "answer" in row:
        return [_text(row, "answer")]
    raise _Skip("no `references` or `answer`")


def _gt_box(row: dict) -> list[float]:
    if "box" in row:
        return _normalised(row, [_box(row["box"], "box")])[0]
    if "boxes" in row:
        raw = row["boxes"]
        if not isinstance(raw, list) or not raw:
            raise LineError("`boxes` must be a non-empty list of [x0, y0, x1, y1]")
        return _normalised(row, [_box(raw[0], "boxes[0]")])[0]
    if "answer" in row:
        found, _ = box_text.parse_boxes(_text(row, "answer"))
        if not found:
            raise LineError("`answer` holds no box")
        return list(found[0])
    raise _Skip("no `box`, `boxes` or `answer`")


def _by_label(labels: list, shapes: list) -> list[tuple[str, list]]:
    groups: dict[str, list] = {}
    for label, shape in zip(labels, shapes):
        groups.setdefault(parsers.normalise_class(label), []).append(shape)
    return list(groups.items())


def _gt_corner_groups(row: dict) -> list[tuple[str, list]]:
    """The reference's boxes as corners (oriented boxes: `corners` with `labels`, or the
    `answer` text; horizontal `boxes` as their rectangles), for the rotated mAP."""
    if "corners" in row:
        raw, labels = row["corners"], row.get("labels")
        if not isinstance(raw, list) or not all(
                isinstance(q, list) and len(q) == 8 and all(map(_is_number, q)) for q in raw):
            raise LineError("`corners` must be a list of [x1, y1, x2, y2, x3, y3, x4, y4]")
        if not isinstance(labels, list) or len(labels) != len(raw):
            raise LineError("`labels` must name each box in `corners`")
        return _by_label(labels, _normalised(row, [[float(v) for v in q] for q in raw]))
    if "boxes" in row:
        return [(c, [box_text.box_corners(b) for b in bxs]) for c, bxs in _gt_groups(row)]
    groups, _ = box_text.parse_detection(_text(row, "answer"), corners=True)
    return [(parsers.normalise_class(c), bxs) for c, _, bxs in groups]


def _gt_groups(row: dict) -> list[tuple[str, list]]:
    if "boxes" in row:
        raw, labels = row["boxes"], row.get("labels")
        if not isinstance(raw, list):
            raise LineError("`boxes` must be a list of [x0, y0, x1, y1]")
        if not isinstance(labels, list) or len(labels) != len(raw) \
                or not all(isinstance(x, str) for x in labels):
            raise LineError("`labels` must be a list of class names, one per box in `boxes`")
        return _by_label(labels, _normalised(row, [_box(b, f"boxes[{k}]")
                                                   for k, b in enumerate(raw)]))
    if "answer" in row:
        groups, _ = parsers.parse_detection_answer(_text(row, "answer"))
        return [(cls, bxs) for cls, _, bxs in groups]
    raise _Skip("no `boxes` with `labels`, or `answer`")


def read_rows(lines: Iterable[str | bytes], name: str = "<predictions>"
              ) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line; lines may be bytes (a file opened "rb"),
    so text that is not UTF-8 is reported with its line."""
    rows = []
    for lineno, line in enumerate(lines, 1):
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise LineError(f"{name} line {lineno}: not UTF-8 text (byte "
                                f"0x{line[e.start]:02x} at column {e.start + 1}); save the file "
                                f"as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LineError(f"{name} line {lineno}: not valid JSON ({e.msg} at column "
                            f"{e.colno})") from None
        if not isinstance(row, dict):
            raise LineError(f"{name} line {lineno}: expected a JSON object, got "
                            f"{type(row).__name__}")
        rows.append((lineno, row))
    return rows


def score_rows(task: str, rows, iou_threshold: float = 0.5, name: str = "<predictions>",
               java_metrics: bool = False) -> dict:
    """Metrics of `task` over rows (dicts, or (line number, dict) pairs from `read_rows`)."""
    task = _ALIASES.get(task, task)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    preds, refs, qtypes, skipped, corner_refs = [], [], [], [], []
    for k, item in enumerate(rows):
        lineno, row = item if isinstance(item, tuple) else (k + 1, item)
        try:
            if "prediction" not in row:
                raise _Skip("no `prediction`")
            pred = _text(row, "prediction")
            if task == "grounding":
                ref = _gt_box(row)
            elif task == "detection":
                ref = _gt_groups(row) if "corners" not in row else [
                    (c, [box_text.enclosing_box(q) for q in qs])
                    for c, qs in _gt_corner_groups(row)]
                corner_refs.append(_gt_corner_groups(row))
            else:
                ref = _references(row)
            qtype = row.get("question_type", "all")
            if not isinstance(qtype, str):
                raise LineError("`question_type` must be a string")
        except _Skip as e:
            skipped.append(f"line {lineno}: {e}")
            continue
        except LineError as e:
            raise LineError(f"{name} line {lineno}: {e}") from None
        preds.append(pred)
        refs.append(ref)
        qtypes.append(qtype)
    if task == "classification":
        out = metrics.classification_accuracy(preds, [r[0] for r in refs])
    elif task == "caption":
        out = metrics.caption_scores(preds, refs, java_metrics=java_metrics)
        for name, reason in (out.get("not_computed") or {}).items():
            if reason == metrics.JAVA_NOT_REQUESTED:  # it names main.py's option
                out["not_computed"][name] = JAVA_NOT_REQUESTED
    elif task == "vqa":
        out = metrics.vqa_accuracy(preds, refs, qtypes)
    elif task == "grounding":
        pred_boxes = [parsers.parse_grounding_answer(p)[0] for p in preds]
        out = metrics.grounding_scores(pred_boxes, refs, iou_threshold)
    else:
        pred_groups = [[(c, b) for c, _, b in parsers.parse_detection_answer(p)[0]]
                       for p in preds]
        out = metrics.detection_scores(pred_groups, refs, iou_threshold)
        out.update(metrics.detection_ap(pred_groups, refs, iou_threshold))
        if any(box_text.is_oriented(q) for g in corner_refs for _, qs in g for q in qs):
            corner_preds = [[(parsers.normalise_class(c), b) for c, _, b in
                             box_text.parse_detection(p, corners=True)[0]] for p in preds]
            rotated = metrics.rotated_detection_ap(corner_preds, corner_refs, iou_threshold)
            key = f"mAP@{iou_threshold:g}"
            out["rotated_" + key] = rotated[key]
            out["rotated_per_class_AP"] = rotated["per_class_AP"]
    out.update(task=task, skipped=len(skipped), skipped_lines=skipped[:MAX_SKIPPED_REPORTED])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m earthgpt_jax.evaluate.score", description=__doc__.split("\n\n")[0],
        # The input schema and the output keys, as the module docstring gives them.
        epilog=__doc__[__doc__.index("Predictions file schema"):],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=TASKS + tuple(_ALIASES))
    parser.add_argument("--predictions", required=True,
                        help="JSONL file, one JSON object per line (schema below)")
    parser.add_argument("--iou_threshold", type=float, default=0.5)
    parser.add_argument("--java_metrics", action="store_true",
                        help="caption: also METEOR and SPICE (need `java`; SPICE also the "
                             "Stanford CoreNLP jars); reasons under `not_computed` otherwise")
    args = parser.parse_args(argv)
    try:
        with open(args.predictions, "rb") as f:  # decoded per line: errors name their line
            rows = read_rows(f, args.predictions)
        out = score_rows(args.task, rows, args.iou_threshold, args.predictions,
                         java_metrics=args.java_metrics)
    except OSError as e:
        print(f"error: cannot read {args.predictions}: {e.strerror or e}", file=sys.stderr)
        return 2
    except LineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    json.dump(out, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
