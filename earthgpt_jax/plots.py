"""The loss curve as a PNG, drawn with PIL (no plotting library needed on a TPU worker)."""

from __future__ import annotations

import json
import os

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT, MARGIN = 640, 360, 48


def plot_loss_curve(metrics_path: str, out_path: str) -> str | None:
    """Training loss against step from `metrics.jsonl`; None when there is nothing to draw."""
    if not os.path.exists(metrics_path):
        return None
    with open(metrics_path) as f:  # a resumed run may log a step twice: keep the last
        by_step = {r["step"]: r for r in (json.loads(line) for line in f if line.strip())}
    points = [(r["step"], r["loss"]) for _, r in sorted(by_step.items())
              if r.get("loss") == r.get("loss")]  # NaN != NaN: a diverged step is left out
    if len(points) < 2:
        return None
    steps, losses = zip(*points)
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1.0
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, y0, x1, y1 = MARGIN, MARGIN // 2, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    draw.rectangle([x0, y0, x1, y1], outline=(160, 160, 160))

    def xy(step, loss):
        fx = (step - steps[0]) / max(steps[-1] - steps[0], 1)
        fy = (loss - lo) / (hi - lo)
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    draw.line([xy(s, l) for s, l in points], fill=(31, 119, 180), width=2)
    draw.text((x0, y1 + 6), f"step {steps[0]}", fill="black", font=font)
    draw.text((x1 - 70, y1 + 6), f"step {steps[-1]}", fill="black", font=font)
    draw.text((4, y0), f"{hi:.3f}", fill="black", font=font)
    draw.text((4, y1 - 10), f"{lo:.3f}", fill="black", font=font)
    draw.text((x0 + 8, y0 + 6), f"training loss (last {losses[-1]:.4f})", fill="black",
              font=font)
    img.save(out_path)
    return out_path
