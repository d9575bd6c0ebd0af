"""benchmarks/maxtext_side_by_side.py without MaxText (not a dependency of this repo): our side
builds the shared shape with the parameter count MaxText logged for it and trains; MaxText's
log lines, as its trainer writes them, parse into steps, seconds and losses."""

import json

import numpy as np
import pytest

from benchmarks import maxtext_side_by_side as side


def test_our_side_has_the_llama_parameter_count_and_trains():
    s = side.SHAPES
    per_layer = 4 * s["d_model"] * s["num_heads"] * s["head_dim"] + \
        3 * s["d_model"] * s["mlp_dim"] + 2 * s["d_model"]
    expected = 2 * s["vocab_size"] * s["d_model"] + s["num_layers"] * per_layer + s["d_model"]
    assert expected == 45_421_056  # what MaxText counted for these overrides (RESULTS.md)
    run = side.run_ours(batch=2, seq_len=16, learning_rate=1e-3, warmup=1, steps=3)
    assert run["params"] == expected
    losses = run["losses"]
    assert losses[0] == pytest.approx(np.log(s["vocab_size"]), abs=1.0)
    assert losses[-1] < losses[0]  # one fixed batch: memorised
    assert len(run["step_seconds"]) == 4 and min(run["step_seconds"]) > 0


def test_maxtext_log_lines_parse():
    mark = side._MARK + json.dumps({"params": 45421056})
    text = "\n".join([
        mark,
        "I1205 23:31:41.226615 140131940756352 metric_logger.py:265] completed step: 0, "
        "seconds: 0.073, TFLOP/s/device: 10.095, Tokens/s/device: 55931.833, total_weights: "
        "4096, loss: 10.865, lm_loss: 10.865, perplexity: 52298.512",
        "I1205 23:31:49.198359 140131940756352 metric_logger.py:265] completed step: 1, "
        "seconds: 0.485, TFLOP/s/device: 1.523, Tokens/s/device: 8440.297, total_weights: "
        "4096, loss: 10.865, lm_loss: 10.865, perplexity: 52298.512",
    ])
    out = side.parse_maxtext_log(text)
    assert out["params"] == 45421056
    assert out["step_seconds"] == [0.073, 0.485] and out["losses"] == [10.865, 10.865]
    assert out["log_line_gaps_s"] == [pytest.approx(7.971744)]
    with pytest.raises(ValueError, match="not steps 0..n-1"):
        side.parse_maxtext_log(text.replace("completed step: 0", "completed step: 5"))
