"""The train-step benchmark at a tiny size (both sides, both stages, in this process), and the
pieces its figures rest on: the FLOPs formula against the program's own matmuls, the parameter
counts against the model, the reference's stage sets and schedule against ours."""

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from benchmarks import torch_reference, train_vs_torch  # noqa: E402
from earthgpt_jax import optim  # noqa: E402
from earthgpt_jax.models import earthgpt, flops  # noqa: E402
from earthgpt_jax.models.earthgpt import abstract_params, dummy_inputs  # noqa: E402


def test_tiny_benchmark_runs_and_the_two_sides_agree(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier sections stay\n")
    # One thread: in one process torch's OpenMP and XLA's pool would fight over 2 busy cores.
    args = train_vs_torch.parse_args([
        "--size=tiny", "--batch=2", "--text_len=12", "--warmup=1", "--steps=2", "--threads=1",
        "--matmul_n=128", "--matmul_repeats=2", "--no-isolate", f"--workdir={tmp_path / 'w'}",
        f"--results={results}"])
    rows = train_vs_torch.run_and_record(args)
    assert [r["stage"] for r in rows] == ["a", "b"]
    for row in rows:
        assert row["losses_agree"], row["loss_max_rel_diff"]
        for side in ("ours", "torch"):
            s = row[side]
            assert len(s["losses"]) == 3
            for key in ("ms_per_step", "tokens_per_s", "mfu_fp32", "peak_rss_mib",
                        "executed_gflops_per_step"):
                assert math.isfinite(s[key]) and s[key] > 0, (row["stage"], side, key, s[key])
            # the update moved the weights: the losses are not all the same
            assert len(set(np.round(s["losses"], 6))) > 1
        # both sides train the same number of parameters
        assert row["ours"]["trainable_params"] == row["torch"]["trainable_params"]
        # the hardware formula is exactly what our step program multiplies: no weight gradient
        # for a frozen weight, no LM head at the image prefix, the whole score matrix
        cfg = train_vs_torch.bench_model_config("tiny", row["stage"])
        assert 1e9 * row["ours"]["executed_gflops_per_step"] == pytest.approx(
            flops.executed_train_step_flops(cfg, 2, 12, row["stage"])["total"], rel=1e-9)
    text = results.read_text()
    assert text.startswith("# earlier sections stay\n")
    assert "## Train step: ours vs the PyTorch/HF reference" in text
    assert text.count("| a | ours |") == 1 and text.count("| b | torch |") == 1


@pytest.mark.parametrize("size", ["tiny", "100m"])
def test_parameter_counts_match_the_model(size):
    for stage in ("a", "b"):
        cfg = train_vs_torch.bench_model_config(size, stage)
        params = nn.unbox(abstract_params(earthgpt.EarthGPT(cfg)))
        counted = flops.parameter_summary(params)
        assert flops.parameter_counts(cfg) == counted
    if size == "100m":
        assert 95e6 < counted["total"] < 110e6 and 80e6 < counted["llm"] < 90e6


@pytest.mark.parametrize("stage", ["a", "b", "all"])
def test_trained_matmuls_match_the_optimizer_masks(stage):
    cfg = train_vs_torch.bench_model_config("tiny", stage)
    params = nn.unbox(abstract_params(earthgpt.EarthGPT(cfg)))
    labels = optim.trainable_labels(params, stage)
    llm = labels["llm"]
    trained = {name for name, leaves in {**llm["layers"], "lm_head": llm["lm_head"]}.items()
               if isinstance(leaves, dict) and leaves.get("kernel") == "train"}
    assert trained == set(flops.STAGE_TRAINED_MATMULS[stage])


def test_formula_matches_the_forward_programs_matmuls():
    """The forward part of the hardware formula is exactly the dot/conv FLOPs of the jitted
    forward (the LM head runs at the text positions only; einsum attention computes every
    score, the masked ones too)."""
    cfg = train_vs_torch.bench_model_config("tiny", "a")
    batch, text_len = 3, 10
    model = earthgpt.EarthGPT(cfg)
    inputs = dummy_inputs(cfg, batch, text_len)
    params = nn.unbox(abstract_params(model))
    jaxpr = jax.make_jaxpr(lambda p, *x: model.apply({"params": p}, *x))(params, *inputs)
    f = flops.executed_train_step_flops(cfg, batch, text_len, "a")
    seq = 1 + cfg.num_visual_tokens + text_len
    forward = (f["decoder_forward"] + f["attention_forward"] + f["lm_head_forward"]
               + f["projector_forward_and_weight_gradient"] / 2 + f["vit"] + f["convnext"])
    assert flops.jaxpr_matmul_flops(jaxpr) == pytest.approx(forward, rel=1e-9)
    # stage b trains no decoder matmul: it differs from stage a by q/k/v's weight gradients
    b = flops.executed_train_step_flops(dataclasses.replace(cfg, llm=dataclasses.replace(
        cfg.llm, adapters=True)), batch, text_len, "b")
    qkv = cfg.llm.hidden_size * (cfg.llm.num_heads + 2 * cfg.llm.num_kv_heads) * cfg.llm.head_dim
    assert f["total"] - b["total"] == pytest.approx(2 * qkv * cfg.llm.num_layers * batch * seq)


def test_reference_schedule_and_normalisation_match_ours():
    from earthgpt_jax.config import TrainConfig
    hp = dict(train_vs_torch.TRAIN_HPARAMS, num_steps=9, warmup_steps=3)
    schedule = optim.learning_rate_schedule(TrainConfig(**hp))
    for step in range(12):
        assert torch_reference.learning_rate(step, hp) == pytest.approx(float(schedule(step)),
                                                                        rel=1e-6, abs=1e-12)
    assert torch_reference.IMAGENET_MEAN == earthgpt.IMAGENET_MEAN
    assert torch_reference.IMAGENET_STD == earthgpt.IMAGENET_STD
    assert torch_reference.CLIP_MEAN == earthgpt.CLIP_MEAN
    assert torch_reference.CLIP_STD == earthgpt.CLIP_STD


def test_measure_matmul_peak_is_a_rate():
    peak = flops.measure_matmul_peak("float32", n=128, repeats=2)
    assert math.isfinite(peak) and peak > 1e6
    assert flops.mfu(2e9, 1.0, 4e9) == 0.5
