"""Answer parsers, per-task metrics, and the results report (with baselines and pictures)."""

from earthgpt_jax.evaluate.metrics import (
    box_iou,
    caption_scores,
    classification_accuracy,
    detection_scores,
    exact_match_accuracy,
    grounding_scores,
    vqa_accuracy,
)
from earthgpt_jax.evaluate.parsers import (
    normalise_class,
    normalise_vqa_answer,
    parse_detection_answer,
    parse_grounding_answer,
    parse_number,
    parse_yes_no,
)
from earthgpt_jax.evaluate.report import (
    baselines_from,
    draw_boxes_png,
    evaluate_predictions,
    write_box_pictures,
    write_report,
)
