"""LoRA (stage lora, default targets and rank) against stage B on the ~100M CPU configuration
of benchmarks/train_vs_torch.py: train-step time, optimizer-state bytes and trainable
parameters; and the trainable counts at 7B/13B (from the configs, no params built).

  python benchmarks/lora_vs_stage_b.py [--size=100m] [--batch=2] [--text_len=64] [--steps=3]
      [--out=benchmarks/results/lora_vs_stage_b_cpu.json]

Step time: the median of --steps steps after one compiling step, fp32 on this machine's CPU.
Optimizer memory: the bytes of the optimizer state's arrays (exact, not a process RSS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from benchmarks.train_vs_torch import bench_model_config  # noqa: E402
from earthgpt_jax import parallel, train as train_lib  # noqa: E402
from earthgpt_jax.config import LoraConfig, RunConfig  # noqa: E402
from earthgpt_jax.models import flops  # noqa: E402
from earthgpt_jax.models.presets import get_preset  # noqa: E402


def _with_lora(cfg, lora: LoraConfig):
    return dataclasses.replace(cfg, llm=dataclasses.replace(
        cfg.llm, lora_rank=lora.rank, lora_alpha=lora.alpha, lora_targets=lora.modules))


def measure(stage: str, args) -> dict:
    lora = LoraConfig()
    cfg = bench_model_config(args.size, stage)
    if stage == "lora":
        cfg = _with_lora(cfg, lora)
    config = RunConfig().replace(
        model={"size": "tiny", "dtype": "float32", "remat_policy": "none"},
        data={"packing": False, "max_text_len": args.text_len, "num_workers": 0},
        train={"stage": stage, "batch_size": args.batch, "num_steps": args.steps + 1,
               "warmup_steps": 0})
    cfg = dataclasses.replace(cfg, dtype="float32", remat_policy="none")
    trainer = train_lib.Trainer.for_run(config, cfg,
                                        parallel.build_mesh(config.mesh, jax.devices()[:1]))
    state = trainer.init_state(0)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 255, (args.batch, cfg.image_size, cfg.image_size, 3),
                                   np.uint8),
             "tokens": rng.integers(3, 1000, (args.batch, args.text_len)).astype(np.int32),
             "valid": np.ones((args.batch, args.text_len), bool),
             "loss_mask": np.ones((args.batch, args.text_len), np.float32)}
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch, step)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    return {"stage": stage, "first_step_s_incl_compile": times[0],
            "step_s_median": float(np.median(times[1:])), "step_s_all": times[1:],
            "optimizer_state_bytes": int(opt_bytes),
            "trainable_parameters": int(trainer.summary["trainable"]),
            "total_parameters": int(trainer.summary["total"])}


def large_counts() -> dict:
    """Trainable parameters of stage lora (default rank and targets) and stage B at 7B/13B."""
    lora = LoraConfig()
    out = {}
    for size in ("7b", "13b"):
        base = get_preset(size)
        with_lora = flops.parameter_counts(_with_lora(base, lora))
        stage_b = flops.parameter_counts(get_preset(size, llm={"adapters": True}))
        out[size] = {"lora_rank": lora.rank, "lora_targets": list(lora.modules),
                     "lora_trainable": with_lora["adapters"],
                     "lora_fraction_of_llm": with_lora["adapters"] / with_lora["llm"],
                     "stage_b_adapters": stage_b["adapters"],
                     "stage_b_trainable_with_projector": stage_b["adapters"]
                     + stage_b["projector"], "llm": with_lora["llm"]}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="100m", choices=("100m", "tiny"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--text_len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="")
    args = p.parse_args()
    result = {"command": results.command_line(__file__), "size": args.size,
              "batch": args.batch, "text_len": args.text_len,
              "machine": results.machine(("jax", "jaxlib", "flax", "optax")),
              "large": large_counts(),
              "stages": [measure(stage, args) for stage in ("b", "lora")]}
    result["load_average_end"] = os.getloadavg()[0]
    for row in result["stages"]:  # the summary; the whole record goes to --out
        print(f"stage {row['stage']}: {row['step_s_median']:.3f} s/step, optimizer state "
              f"{row['optimizer_state_bytes'] / 2**20:.1f} MiB, trainable "
              f"{row['trainable_parameters']:,}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
