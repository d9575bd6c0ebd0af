"""benchmarks/gpu_bench.py at a tiny size on CPU (batch 8: the mesh spans the 8 test devices): every phase runs (the GPU run is rare, so this
keeps the script from rotting between runs)."""

import math

import pytest

from benchmarks import gpu_bench
from earthgpt_jax.models import flops


def test_gpu_bench_runs_every_phase_at_a_tiny_size(tmp_path):
    out = tmp_path / "gpu_bench.json"
    report = gpu_bench.main([
        "--size=tiny", "--batch=8", "--text_len=16", "--steps=2", "--new_tokens=4",
        "--prompt_len=4", "--matmul_n=128", "--copy_gb=0.01",
        # Both attention kernels, one of them under a remat policy: each variant is a compile.
        "--variants=xla,einsum/save_qkv_proj", "--decode_batches=2", f"--out={out}"])
    assert out.exists()
    assert report["peak"]["matmul_fp32_flops"] > 0
    for name in ("xla/none/8", "einsum/save_qkv_proj/8"):
        row = report["train"][name]
        assert "error" not in row, row
        assert row["step_s_median"] > 0 and math.isfinite(row["loss_last"])
        assert row["mfu_vs_datasheet_bf16"] is None  # CPU: no datasheet peak
        model, hardware = flops.flops_for_spec(row["flops_spec"])
        assert row["model_tflops_per_step"] == model["total"] / 1e12
        assert row["hardware_tflops_per_step"] == hardware["total"] / 1e12 > model["total"] / 1e12
    assert report["train"]["einsum/save_qkv_proj/8"]["hardware_flops_breakdown_tflops"][
        "remat_recompute"] > 0
    decode = report["decode"]["batch_2"]
    assert "error" not in decode, decode
    assert decode["end_to_end_tokens_per_s"] > 0
    assert decode["kv_cache_read_gb_mean"] > 0


def test_gpu_bench_trains_packed_rows(tmp_path):
    report = gpu_bench.main([
        "--size=tiny", "--batch=8", "--text_len=11", "--pack_length=40", "--images_per_pack=3",
        "--steps=1", "--variants=einsum,xla", "--phases=train", f"--out={tmp_path / 'g.json'}"])
    for name in ("einsum/none/8", "xla/none/8"):
        row = report["train"][name]
        assert "error" not in row, row
        # 1 + 4 visual + 11 text = 16 positions: two samples per 40-position row
        assert row["examples_per_s"] == pytest.approx(2 * 8 / row["step_s_median"])
        assert math.isfinite(row["loss_last"])
