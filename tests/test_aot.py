"""--mode=compile: the train step compiled for TPU topologies on this CPU host (libtpu)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from earthgpt_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,grid,chips", [("v5p-128", "v5p:4x4x4", 64),
                                             ("v4-32", "v4:2x2x4", 16),
                                             ("v5e-64", "v5e:8x8", 64),
                                             ("v5litepod-16", "v5e:4x4", 16),
                                             ("v5e:2x4", "v5e:2x4", 8)])
def test_accelerator_types_become_chip_grids(name, grid, chips):
    topo = aot.parse_topology(name)
    assert (topo.name, topo.chips) == (grid, chips)


@pytest.mark.parametrize("name,message", [("v9-8", "unknown TPU generation"),
                                          ("tpu", "unknown TPU topology"),
                                          ("v5e-24", "not a power of two")])
def test_bad_topologies_are_named(name, message):
    with pytest.raises(ValueError, match=message):
        aot.parse_topology(name)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_compile_mode_reports_memory_per_chip(tmp_path):
    report_path = tmp_path / "report.json"
    # Another compile may hold libtpu's lock file (benchmarks/aot_table.py beside the tests).
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("LIBTPU_INIT_ARGS", None)  # the run's collective-overlap defaults, which libtpu
    proc = subprocess.run(             # must accept (it aborts on an unknown flag)
        [sys.executable, "main.py", "--config=configs/mmrs.py:demo", f"--workdir={tmp_path}",
         "--mode=compile", "--config.model.size=tiny", "--config.compile.topology=v5e:2x2",
         "--config.train.batch_size=8", "--config.data.packing=True",
         "--config.train.stage=b", "--config.train.grad_accum_steps=2",
         f"--config.compile.report_json={report_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "v5e:2x2" in proc.stdout and "GiB of 16 GiB HBM" in proc.stdout
    import json
    report = json.loads(report_path.read_text())
    assert report["fits"] and report["chips"] == 4
    # config.mesh.layout=auto: the tiny model's step fits a chip whole, so plain data
    # parallelism, checked against the 16 GiB of a v5e chip by XLA's TPU compiler.
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report["layout"]["chosen"] == "data parallel"
    assert report["layout"]["data_parallel"]["budget_gib"] == pytest.approx(16 * 0.9)
    per_chip = report["per_chip"]
    assert per_chip["arguments_gib"] > 0 and per_chip["temporaries_gib"] > 0
    assert per_chip["total_gib"] < report["hbm_gib_per_chip"]
    assert report["model_tflops_per_step"] > 0
    # Stage B stores what it freezes in bf16 (2 bytes each), what it trains in fp32.
    params = report["parameters"]
    assert report["frozen_param_dtype"] == "bfloat16"
    assert report["remat_policy"] == "none"  # the demo's; a column of aot_table
    from earthgpt_jax.parallel import TPU_OVERLAP_FLAGS
    assert report["libtpu_init_args"] == " ".join(TPU_OVERLAP_FLAGS)
    assert params["frozen_bytes"] == 2 * (params["total"] - params["trainable"])
    assert params["trainable_bytes"] == 4 * params["trainable"] > 0
    # The report names what its FLOPs are of (tests/test_flops.py recomputes result files).
    from earthgpt_jax.models import flops
    model, hardware = flops.flops_for_spec(report["flops_spec"])
    assert report["model_tflops_per_step"] == pytest.approx(model["total"] / 1e12, rel=1e-9)
    assert report["hardware_tflops_per_step"] == pytest.approx(hardware["total"] / 1e12,
                                                               rel=1e-9)
