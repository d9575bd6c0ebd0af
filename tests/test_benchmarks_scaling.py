"""Smoke test of benchmarks/scaling.py in its --quick mode (tiny models, devices 1 and 2): the
weak-scaling training points and decode-latency points come out with positive figures and
finite losses, the raw JSON is written and the RESULTS section appended (into tmp files)."""

import json

import jax
import numpy as np
import pytest

from benchmarks import scaling


def test_quick_scaling_run_writes_json_and_section(tmp_path):
    if jax.device_count() < 2:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    out, md = tmp_path / "scaling.json", tmp_path / "RESULTS.md"
    md.write_text("# earlier section\n")
    # One decode layout: the unrolled one decodes the same tokens (tests/test_models.py).
    assert scaling.main(["--quick", "--layouts=scanned", f"--json={out}",
                         f"--results_md={md}"]) == 0
    result = json.loads(out.read_text())
    train = result["training"]
    assert [r["devices"] for r in train["rows"]] == [1, 2]
    for row in train["rows"]:
        # Weak scaling: the same per-device batch at every device count.
        assert row["batch"] == row["devices"] * train["per_device_batch"]
        assert row["step_s"] > 0 and row["tokens_per_s_per_device"] > 0
        assert np.all(np.isfinite(row["losses"]))
    assert train["rows"][0]["efficiency_vs_1"] == 1.0
    assert train["rows"][1]["mesh"]["fsdp"] == 2
    decode = result["decode"]
    points = {(r["layout"], r["batch"], r["context"]) for r in decode["rows"]}
    assert points == {("scanned", 2, context) for context in (16, 40)}
    for row in decode["rows"]:
        assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0
        assert len(row["step_times_s"]) == decode["steps"]
    text = md.read_text()
    assert text.startswith("# earlier section\n")
    assert "### Training, weak scaling" in text and "| 2 | fsdp2 | 2 |" in text
    assert "| 2 | 40 |" in text and "| scanned |" in text and str(out.name) in text
