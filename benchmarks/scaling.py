"""Scaling on this CPU: weak scaling of training over 1/2/4/8 devices, and decode latency vs
batch and context.

  JAX_PLATFORMS=cpu NPROC=16 XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python benchmarks/scaling.py \
      [--devices=1,2,4,8] [--decode_batches=1,2,4,8,16,32,64] [--contexts=321,1024,2048,4096] \
      [--layouts=scanned,unrolled] [--quick] [--json=PATH] [--no_append]

Training (weak scaling): the public `train.Trainer` on the first N of the 8 virtual CPU devices,
its default mesh (`config.mesh`: FSDP over every device), the same per-device batch at every N
(global batch = N x `--per_device_batch` padded examples of BOS + visual tokens + `--text_len`
text tokens), `--stage` (default `all`: every weight trained, so every gradient crosses the
mesh). Random images and tokens; each point is the median of `--steps` timed
`Trainer.train_step` calls (host batch to devices, step, loss fetched) after `--warmup` steps
(which include the compile). Model: the `demo` preset (LLM 192 wide, 4 layers; towers at 64 px,
16 visual tokens). Tokens counted: every decoder position, batch x (1 + V + T).

The 8 "devices" are XLA host-platform devices that share this machine's cores (2 here): N
devices do N times the work on the same cores, so per-device throughput falls with N for that
reason alone; what the figures can show is the overhead beyond that (collectives, partitioning),
i.e. how far aggregate tokens/s stays from the 1-device figure.

Decode latency: the ~134M LLaMA of benchmarks/decode_vs_hf.py (hidden 768, 12 layers, vocab
32000; fp32), in each `--layouts` layout: `scanned` (the training layout, stacked layers) and
`unrolled` (`generate.unrolled_for_decoding`, the serving engine's), stepped with the public
`generate.decode_step` (one token per row per call, KV cache donated), as `stream_generate` and
the serving engine do. A context of C positions is a KV cache whose first C slots are valid
(C = 321 is decode_vs_hf's [BOS] + 256 visual + 64 prompt) plus `--decode_steps` + 1 free slots;
the cache holds zeros instead of a real prefill: a decode step reads and attends over every slot
the same way whatever the values, and a real prefill of 64 x 4096 positions would cost this CPU
far more than the steps measured. Each point: one warm-up step (the compile), then the median
of `--decode_steps` steps, each timed to its logits being ready; ms/step and tokens/s =
batch / step time. Batch sweep at context 321; context sweep at batches `--context_batches`.

--quick: the `tiny` preset for both parts, devices 1 and 2, two decode points per layout;
seconds, for CI (tests/test_benchmarks_scaling.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

# The 8-device CPU mesh: set before JAX starts (a caller's own XLA_FLAGS are kept).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import results  # noqa: E402

VERSIONS = ("jax", "jaxlib", "flax", "optax")
# decode_vs_hf's ~134M decoder, with room for 4k contexts.
DECODE_LLM = dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12,
                  num_kv_heads=12, intermediate_size=2048)
TINY_DECODE_LLM = dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, intermediate_size=128)


# ----------------------------------------------------------------------------- training

def train_model_config(preset: str):
    from earthgpt_jax.models.presets import get_preset
    return get_preset(preset)


def random_batch(model_cfg, batch: int, text_len: int, seed: int) -> dict:
    """A padded host batch as the train step takes it: answers on the second half."""
    rng = np.random.default_rng(seed)
    size = model_cfg.image_size
    loss_mask = np.zeros((batch, text_len), np.float32)
    loss_mask[:, text_len // 2:] = 1.0
    return {"image": rng.integers(0, 256, (batch, size, size, model_cfg.input_bands), np.uint8),
            "tokens": rng.integers(3, model_cfg.llm.vocab_size, (batch, text_len)).astype(
                np.int32),
            "valid": np.ones((batch, text_len), bool), "loss_mask": loss_mask}


def measure_training(model_cfg, devices: int, per_device_batch: int, text_len: int, stage: str,
                     warmup: int, steps: int) -> dict:
    """Median train-step time of the public Trainer on the first `devices` devices."""
    from earthgpt_jax import parallel
    from earthgpt_jax import train as train_lib
    from earthgpt_jax.config import DataConfig, InitConfig, MeshConfig, TrainConfig

    batch = devices * per_device_batch
    mesh_cfg = MeshConfig()
    mesh = parallel.build_mesh(mesh_cfg, jax.devices()[:devices])
    train = TrainConfig(stage=stage, batch_size=batch, num_steps=warmup + steps,
                        warmup_steps=1, learning_rate=1e-4)
    data = DataConfig(packing=False, max_text_len=text_len)
    start = time.perf_counter()
    trainer = train_lib.Trainer(model_cfg, mesh, train, data, InitConfig(), mesh_cfg.rules)
    state = trainer.init_state(0)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    batches = [random_batch(model_cfg, batch, text_len, seed) for seed in range(warmup + steps)]
    times, losses = [], []
    for step, host_batch in enumerate(batches):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, host_batch, step)
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[warmup:])
    tokens = batch * (1 + model_cfg.num_visual_tokens + text_len)
    return {"devices": devices, "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
            "batch": batch, "tokens_per_step": tokens, "init_s": init_s,
            "first_step_s": times[0], "step_times_s": times, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "tokens_per_s_per_device": tokens / step_s / devices,
            "losses": losses}


def run_training(preset: str, device_counts, per_device_batch: int, text_len: int, stage: str,
                 warmup: int, steps: int, log=print) -> dict:
    model_cfg = train_model_config(preset)
    rows = []
    for n in device_counts:
        row = measure_training(model_cfg, n, per_device_batch, text_len, stage, warmup, steps)
        row["efficiency_vs_1"] = None
        rows.append(row)
        log(f"train {n} device(s): {row['step_s'] * 1e3:.0f} ms/step, "
            f"{row['tokens_per_s']:.0f} tok/s, {row['tokens_per_s_per_device']:.0f} "
            f"tok/s/device")
    base = next((r for r in rows if r["devices"] == 1), None)
    for row in rows:
        if base is not None:
            # Weak-scaling efficiency per device, and aggregate throughput against 1 device.
            row["efficiency_vs_1"] = (row["tokens_per_s_per_device"]
                                      / base["tokens_per_s_per_device"])
            row["aggregate_vs_1"] = row["tokens_per_s"] / base["tokens_per_s"]
    llm = model_cfg.llm
    return {"preset": preset, "stage": stage, "per_device_batch": per_device_batch,
            "text_len": text_len, "visual_tokens": model_cfg.num_visual_tokens,
            "image_size": model_cfg.image_size,
            "llm": {"hidden_size": llm.hidden_size, "num_layers": llm.num_layers,
                    "vocab_size": llm.vocab_size}, "warmup": warmup, "steps": steps,
            "rows": rows}


# ----------------------------------------------------------------------------- decoding

def decode_models(llm: dict, max_context: int, layouts, seed: int = 0) -> dict:
    """decode_vs_hf's EarthGPT (random weights drawn on the host) per layout: `scanned` (the
    training layout, what `greedy_generate` decodes with in decode_vs_hf) and `unrolled`
    (`generate.unrolled_for_decoding`, the serving engine's)."""
    from benchmarks import decode_vs_hf
    from earthgpt_jax.generate import unrolled_for_decoding

    cfg = decode_vs_hf.earthgpt_config(**dict(llm, max_position_embeddings=max_context))
    model, params = decode_vs_hf.init_model(cfg, seed)
    made = {"scanned": lambda: (model, params),
            "unrolled": lambda: unrolled_for_decoding(model, params)}
    return {layout: made[layout]() for layout in layouts}


def measure_decode(model, params, batch: int, context: int, steps: int) -> dict:
    """ms per `generate.decode_step` at `batch` rows with `context` valid cache positions."""
    from earthgpt_jax import generate
    from earthgpt_jax.models.llama import init_cache

    llm = model.cfg.llm
    length = context + steps + 1
    cache = init_cache(llm, batch, length, jnp.dtype(model.cfg.dtype))
    key_valid = jnp.zeros((batch, length), bool).at[:, :context].set(True)
    token = jnp.full((batch,), 3, jnp.int32)
    times = []
    for t in range(steps + 1):  # step 0: compile + warm-up
        position = jnp.full((batch,), context + t, jnp.int32)
        start = time.perf_counter()
        logits, cache, key_valid = generate.decode_step(model, params, token, cache, key_valid,
                                                        position, context + t)
        jax.block_until_ready(logits)
        times.append(time.perf_counter() - start)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    step_s = statistics.median(times[1:])
    cache_bytes = 2 * llm.num_layers * batch * length * llm.num_kv_heads * llm.head_dim * 4
    return {"batch": batch, "context": context, "cache_slots": length,
            "cache_mb": cache_bytes / 1e6, "first_step_s": times[0], "step_times_s": times[1:],
            "ms_per_step": step_s * 1e3, "tokens_per_s": batch / step_s}


def run_decode(llm: dict, batches, contexts, context_batches, base_context: int, steps: int,
               layouts=("scanned", "unrolled"), log=print) -> dict:
    models = decode_models(llm, max(list(contexts) + [base_context]) + steps + 1, layouts)
    model, params = next(iter(models.values()))
    n_llm = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["llm"]))
    points = [(b, base_context) for b in batches]
    points += [(b, c) for b in context_batches for c in contexts if (b, c) not in points]
    rows = []
    for batch, context in points:
        for layout, (model, params) in models.items():
            row = dict(layout=layout, **measure_decode(model, params, batch, context, steps))
            rows.append(row)
            log(f"decode {layout} batch {batch} context {context}: "
                f"{row['ms_per_step']:.1f} ms/step, {row['tokens_per_s']:.1f} tok/s")
    cfg = dataclasses.replace(model.cfg.llm, scan_layers=True)
    return {"llm_params": n_llm, "llm": dataclasses.asdict(cfg), "steps": steps,
            "base_context": base_context, "layouts": list(models), "rows": rows}


# ----------------------------------------------------------------------------- report

def result_lines(result: dict) -> list[str]:
    tr, de = result["training"], result["decode"]
    out = [f"- Devices: {jax.device_count()} XLA host-platform (CPU) devices on "
           f"{os.cpu_count()} cores; NPROC={os.environ.get('NPROC')}",
           "", f"### Training, weak scaling (`{tr['preset']}` preset, stage `{tr['stage']}`, "
           f"{tr['per_device_batch']} examples per device x (1 + {tr['visual_tokens']} visual "
           f"+ {tr['text_len']} text) positions, default FSDP mesh; median of {tr['steps']} "
           f"steps after {tr['warmup']})", "",
           "| devices | mesh | global batch | ms/step | tokens/s | tokens/s per device "
           "| per device vs 1 | aggregate vs 1 | first step s (compile) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in tr["rows"]:
        mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
        eff = "-" if r.get("efficiency_vs_1") is None else f"{r['efficiency_vs_1']:.2f}"
        agg = "-" if r.get("aggregate_vs_1") is None else f"{r['aggregate_vs_1']:.2f}"
        out.append(f"| {r['devices']} | {mesh} | {r['batch']} | {r['step_s'] * 1e3:.0f} "
                   f"| {r['tokens_per_s']:.0f} | {r['tokens_per_s_per_device']:.0f} | {eff} "
                   f"| {agg} | {r['first_step_s']:.1f} |")
    llm = de["llm"]
    out += ["", f"### Decode latency (LLaMA {de['llm_params'] / 1e6:.1f}M: hidden "
            f"{llm['hidden_size']}, {llm['num_layers']} layers, vocab {llm['vocab_size']}, fp32; "
            f"`generate.decode_step`, median of {de['steps']} steps; layers scanned (training "
            f"layout) and unrolled (`generate.unrolled_for_decoding`, serving))", "",
            "| batch | context | KV cache MB | layout | ms/step | tokens/s |",
            "|---|---|---|---|---|---|"]
    for r in de["rows"]:
        out.append(f"| {r['batch']} | {r['context']} | {r['cache_mb']:.0f} | {r['layout']} "
                   f"| {r['ms_per_step']:.1f} | {r['tokens_per_s']:.1f} |")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--stage", default="all")
    parser.add_argument("--per_device_batch", type=int, default=4)
    parser.add_argument("--text_len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--decode_batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--contexts", default="321,1024,2048,4096")
    parser.add_argument("--context_batches", default="1,8")
    parser.add_argument("--base_context", type=int, default=321)
    parser.add_argument("--decode_steps", type=int, default=5)
    parser.add_argument("--layouts", default="scanned,unrolled",
                        help="decoder layouts timed at every decode point")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and few points: seconds, for CI")
    parser.add_argument("--json", default=time.strftime(
        "benchmarks/results/%Y-%m-%d_scaling_cpu.json", time.gmtime()))
    parser.add_argument("--results_md", default=results.RESULTS,
                        help="the Markdown record the section is appended to")
    parser.add_argument("--no_append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    ints = lambda s: tuple(int(x) for x in s.split(","))
    llm = DECODE_LLM
    if args.quick:
        args.devices, args.preset, args.per_device_batch, args.text_len = "1,2", "tiny", 1, 8
        args.warmup, args.steps, args.decode_steps = 1, 2, 2
        args.decode_batches, args.contexts, args.context_batches = "2", "16,40", "2"
        args.base_context, llm = 16, TINY_DECODE_LLM
    header = results.machine_lines(VERSIONS)
    uptime_start = os.getloadavg()
    start = time.perf_counter()
    training = run_training(args.preset, ints(args.devices), args.per_device_batch,
                            args.text_len, args.stage, args.warmup, args.steps)
    decode = run_decode(llm, ints(args.decode_batches), ints(args.contexts),
                        ints(args.context_batches), args.base_context, args.decode_steps,
                        tuple(args.layouts.split(",")))
    result = {"training": training, "decode": decode, "quick": args.quick,
              "wall_s": time.perf_counter() - start, "load_average_start": uptime_start,
              "load_average_end": os.getloadavg(), "devices": jax.device_count(),
              "nproc_env": os.environ.get("NPROC")}
    lines = header + [f"- Load average (1/5/15 min) at start {uptime_start[0]:.1f}/"
                      f"{uptime_start[1]:.1f}/{uptime_start[2]:.1f}, at end "
                      f"{result['load_average_end'][0]:.1f}/{result['load_average_end'][1]:.1f}"
                      f"/{result['load_average_end'][2]:.1f}; wall {result['wall_s']:.0f} s"]
    lines += result_lines(result)
    print("\n".join(lines))
    if not args.no_append:
        command = results.command_line(__file__, argv)
        with open(args.json, "w") as f:
            json.dump({"command": command, "machine": results.machine(VERSIONS), **result}, f,
                      indent=1)
        results.append_section("Scaling on CPU: weak scaling of training, decode latency vs "
                               "batch and context", command,
                               lines + [f"- Raw JSON: "
                                        f"{os.path.relpath(os.path.abspath(args.json), ROOT)}"],
                               args.results_md)
        print(f"wrote {args.json}; appended to {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
