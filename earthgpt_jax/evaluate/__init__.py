"""Answer parsers, per-task metrics, and the results report (with baselines and pictures)."""
