"""Parameter counts per part of EarthGPT, and how many of them a stage trains."""

from __future__ import annotations

from flax import traverse_util

PARTS = ("llm", "vit", "convnext", "projector")


def parameter_summary(params, labels=None) -> dict[str, int]:
    """{'llm', 'vit', 'convnext', 'projector', 'adapters', 'total'[, 'trainable']} counts.

    `llm` counts the decoder without its adapters, which are reported on their own.
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    counts = dict.fromkeys(PARTS + ("adapters",), 0)
    for path, value in flat.items():
        part = path.split("/", 1)[0]
        key = "adapters" if "/adapter_" in path else part
        counts[key] = counts.get(key, 0) + int(value.size)
    counts["total"] = sum(int(v.size) for v in flat.values())
    if labels is not None:
        flat_labels = traverse_util.flatten_dict(labels, sep="/")
        counts["trainable"] = sum(int(flat[p].size) for p, l in flat_labels.items()
                                  if l == "train")
    return counts


def format_summary(counts: dict[str, int], stage: str | None = None) -> str:
    parts = [f"{k} {v:,}" for k, v in counts.items() if k not in ("total", "trainable")]
    line = "parameters: " + ", ".join(parts) + f"; total {counts['total']:,}"
    if "trainable" in counts:
        line += f"; trainable in stage {stage}: {counts['trainable']:,}"
    return line
