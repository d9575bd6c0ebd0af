"""EarthGPT-7B on one GPU: stage-B train steps with MFU, and KV-cached decoding tokens/s.

    bash benchmarks/gpu.sh                            # on a machine with one H100/H200
    python benchmarks/gpu_bench.py --size=tiny ...    # a seconds-long smoke run, any machine

It runs on the GPU image's own jax/flax/optax/orbax, whatever their versions: batches are
synthetic in-memory arrays (no TFDS, grain, sentencepiece or ml_collections), weights are random
(speed does not depend on their values). Phases, each timed after its compile:

1. peak: the best bf16 and fp32 [n, n] matmul on the device (MFU's denominator, measured on the
   same card in the same run) and a device-to-device copy's bandwidth (the decoding roofline).
2. train: the real `Trainer` jitted step (stage B: bias/scale adapters + projector trainable,
   frozen 7B decoder and vision towers, fp32 master weights, bf16 compute), for each variant
   (attention kernel x remat policy x batch) asked for. MFU = model FLOPs / step time / peak and,
   beside it, hardware utilisation = hardware FLOPs (what the step runs: padding, blank image
   slots, masked score blocks, remat recompute) / step time / peak, both by
   earthgpt_jax/models/flops.py from the `flops_spec` written with each row (tests/test_flops.py
   recomputes committed results from it), against the card's datasheet bf16 peak and the
   measured matmul peak. With --pack_length, on packed rows (segment-masked attention, several
   samples and image slots per row) as the real configs train.
3. decode: `greedy_generate` at each batch size: 256 visual tokens + prompt, new tokens forced
   (no EOS), bf16 weights; decode tokens/s excludes the prefill, which is timed on its own. The
   roofline is the bytes a decode step must read, every weight and the KV cache written so
   far (mean over the steps), at the measured copy bandwidth.

The A/B grid on one card (each is one command of under 10 minutes):

    bash benchmarks/gpu.sh                                    # unpacked 768-position rows
    bash benchmarks/gpu.sh --pack_length=2048 --text_len=64 --batch=4 \
        --variants=einsum/full,cudnn/full,cudnn/save_dot_except_mlp,cudnn/minimal/2 \
        --phases=peak,train                                   # packed rows, 6 samples each

Every figure is printed with the card's name and the package versions, and all of them are
written as JSON to --out. A phase that fails prints its error and the run goes on; phases that
would start after --time_budget_s are skipped and say so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def train_config(args):
    """The typed run config of the benchmark (earthgpt_jax/config.py needs no ml_collections)."""
    from earthgpt_jax.config import RunConfig

    # data: the Trainer sizes its batches and logged model FLOPs (MFU) with it.
    return RunConfig().replace(
        train={"stage": args.stage, "batch_size": args.batch, "warmup_steps": 10,
               "num_steps": 1000},
        data={"max_text_len": args.text_len, "packing": bool(args.pack_length),
              "pack_length": args.pack_length or 2048, "images_per_pack": args.images_per_pack})


def environment() -> dict:
    import jax

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint"):
        try:
            versions[name] = __import__(name, fromlist=["_"]).__version__
        except Exception as e:  # noqa: BLE001  (reported, not fatal)
            versions[name] = f"unavailable ({e})"
    device = jax.devices()[0]
    return {"device": getattr(device, "device_kind", str(device)), "platform": device.platform,
            "device_count": jax.device_count(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure_copy_bandwidth(gigabytes: float) -> float:
    """Bytes/s read + written by a jitted device-to-device copy (x + 0 forces a new buffer)."""
    import jax
    import jax.numpy as jnp

    n = int(gigabytes * 2 ** 30 / 2)
    x = jnp.ones((n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(0))
    copy(x).block_until_ready()
    best = min(timed(lambda: copy(x).block_until_ready(), 5))
    del x
    return 2 * n * 2 / best


def phase_peak(args, report: dict) -> None:
    from earthgpt_jax.models import flops

    report["peak"] = {
        "matmul_bf16_flops": flops.measure_matmul_peak("bfloat16", n=args.matmul_n),
        "matmul_fp32_flops": flops.measure_matmul_peak("float32", n=args.matmul_n),
        "copy_bytes_per_s": measure_copy_bandwidth(args.copy_gb),
        "matmul_n": args.matmul_n,
    }


def synthetic_batch(model_cfg, batch: int, text_len: int, seed: int = 0) -> dict:
    """Random image bytes and tokens; the second half of the text is the answer (loss)."""
    rng = np.random.default_rng(seed)
    size = model_cfg.image_size
    loss_mask = np.zeros((batch, text_len), np.float32)
    loss_mask[:, text_len // 2:] = 1.0
    return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "tokens": rng.integers(3, model_cfg.llm.vocab_size, (batch, text_len),
                                   dtype=np.int32),
            "valid": np.ones((batch, text_len), bool), "loss_mask": loss_mask}


def synthetic_packed_batch(model_cfg, rows: int, length: int, slots: int, text_len: int,
                           seed: int = 0) -> dict:
    """Packed rows as the pipeline writes them (earthgpt_jax/data/packing.py): as many samples
    of 1 + V + text_len positions as fit a row (at most `slots`), the rest padding."""
    from earthgpt_jax.data.tokenizer import IMAGE_TOKEN

    rng = np.random.default_rng(seed)
    visual, size = model_cfg.num_visual_tokens, model_cfg.image_size
    sample = 1 + visual + text_len
    per_row = min(slots, length // sample)
    if per_row < 1:
        raise ValueError(f"a sample of {sample} positions does not fit a row of {length}")
    tokens = rng.integers(3, model_cfg.llm.vocab_size, (rows, length), dtype=np.int32)
    segments = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.float32)
    for k in range(per_row):
        start = k * sample
        tokens[:, start] = model_cfg.bos_id
        tokens[:, start + 1:start + 1 + visual] = IMAGE_TOKEN
        segments[:, start:start + sample] = k + 1
        positions[:, start:start + sample] = np.arange(sample)
        loss_mask[:, start + 1 + visual + text_len // 2:start + sample] = 1.0
    tokens[:, per_row * sample:] = 0
    images = np.zeros((rows, slots, size, size, 3), np.uint8)
    images[:, :per_row] = rng.integers(0, 256, (rows, per_row, size, size, 3), dtype=np.uint8)
    return {"image": images, "tokens": tokens, "segment_ids": segments,
            "positions": positions, "loss_mask": loss_mask, "samples_per_row": per_row}


def model_config(args, attention: str, remat: str = ""):
    from earthgpt_jax.models import flops
    from earthgpt_jax.models.presets import get_preset

    spec = {"size": args.size, "stage": args.stage, "attention_impl": attention,
            "remat_policy": remat or get_preset(args.size).remat_policy}
    return flops.spec_config(spec)


def flops_spec(args, model_cfg, rows: int, samples_per_row: int) -> dict:
    """What `flops.flops_for_spec` needs to recompute a train row's FLOPs from the JSON."""
    return {"size": args.size, "stage": args.stage, "rows": rows, "text_len": args.text_len,
            "pack_length": args.pack_length,
            "images_per_row": args.images_per_pack if args.pack_length else 1,
            "samples_per_row": samples_per_row,
            "attention_impl": model_cfg.llm.attention_impl,
            "remat_policy": model_cfg.remat_policy}


def parse_variants(text: str, default_batch: int) -> list[tuple[str, str, int, str]]:
    """'einsum/full/16,cudnn/none/8/float32' -> [(attention, remat, batch, frozen dtype), ...];
    parts may be empty ('cudnn' alone keeps the preset's remat, --batch and the config's
    frozen_param_dtype, bf16)."""
    out = []
    for item in filter(None, text.split(",")):
        parts = item.split("/") + ["", "", ""]
        out.append((parts[0], parts[1], int(parts[2]) if parts[2] else default_batch,
                    parts[3]))
    return out


def device_memory_gb() -> dict:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return {k: round(stats[k] / 2 ** 30, 2) for k in ("peak_bytes_in_use", "bytes_limit")
            if k in stats}


def phase_train(args, report: dict, deadline: float) -> None:
    import jax
    from earthgpt_jax.parallel import build_mesh
    from earthgpt_jax.train import Trainer

    config = train_config(args)
    mesh = build_mesh(config.mesh)
    state = None
    report["train"] = {}
    state_frozen = None  # the frozen dtype the state was made with
    for attention, remat, batch_size, frozen in parse_variants(args.variants, args.batch):
        model_cfg = model_config(args, attention, remat)
        name = f"{attention}/{model_cfg.remat_policy}/{batch_size}" + (f"/{frozen}" if frozen
                                                                        else "")
        frozen = frozen or config.train.frozen_param_dtype
        if time.time() > deadline:
            report["train"][name] = {"skipped": "time budget spent"}
            print(f"[train {name}] skipped: time budget spent", flush=True)
            continue
        try:
            trainer = Trainer.for_run(
                config.replace(train={"batch_size": batch_size, "frozen_param_dtype": frozen}),
                model_cfg, mesh)
            if state is not None and frozen != state_frozen:
                state = None  # another storage dtype: freed before the new one is made
                gc.collect()
            if state is None:
                start = time.perf_counter()
                state = trainer.init_state(0)
                jax.block_until_ready(state)
                report["train"]["init_seconds"] = time.perf_counter() - start
                state_frozen = frozen
            if args.pack_length:
                batch = synthetic_packed_batch(model_cfg, batch_size, args.pack_length,
                                               args.images_per_pack, args.text_len)
                per_row, seq = batch.pop("samples_per_row"), args.pack_length
            else:
                batch = synthetic_batch(model_cfg, batch_size, args.text_len)
                per_row, seq = 1, 1 + model_cfg.num_visual_tokens + args.text_len
            samples = per_row * batch_size
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, batch, 0)
            first_loss = float(metrics["loss"])
            compile_s = time.perf_counter() - start
            for _ in range(args.warmup):
                state, metrics = trainer.train_step(state, batch, 0)
            jax.block_until_ready(metrics)

            def step():
                nonlocal state, metrics
                state, metrics = trainer.train_step(state, batch, 0)
                jax.block_until_ready(metrics["loss"])

            times = timed(step, args.steps)
            step_s = float(np.median(times))
            spec = flops_spec(args, model_cfg, batch_size, per_row)
            row = {
                "compile_and_first_step_s": compile_s, "step_s_median": step_s,
                "step_s_min": min(times), "steps_timed": args.steps,
                "sequence_tokens_per_s": batch_size * seq / step_s,
                "text_tokens_per_s": samples * args.text_len / step_s,
                "examples_per_s": samples / step_s, "rows": batch_size,
                "positions_per_row": seq,
                **utilisation(spec, step_s, report),
                "loss_first": first_loss, "loss_last": float(metrics["loss"]),
                "frozen_param_dtype": frozen,
                "state_gb": sum(x.nbytes for x in jax.tree.leaves(state)) / 2 ** 30,
                "memory_gb": device_memory_gb(),
            }
            report["train"][name] = row
            print(f"[train {name}] {report['env']['device']}: {step_s * 1e3:.0f} ms/step, "
                  f"{row['sequence_tokens_per_s']:.0f} tok/s, MFU "
                  f"{_pct(row['mfu_vs_datasheet_bf16'])} (hardware "
                  f"{_pct(row['hardware_utilisation_vs_datasheet_bf16'])}) of the datasheet bf16 "
                  f"peak, {_pct(row['mfu_vs_measured_bf16_matmul'])} "
                  f"({_pct(row['hardware_utilisation_vs_measured_bf16_matmul'])}) of the measured "
                  f"matmul; loss {first_loss:.3f} -> {row['loss_last']:.3f}; compile "
                  f"{compile_s:.0f} s; memory {row['memory_gb']}", flush=True)
        except Exception as e:  # noqa: BLE001  (one failed variant must not lose the others)
            report["train"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            traceback.print_exc()
    report["train"]["params_for_decode"] = state.params if state is not None else None


def utilisation(spec: dict, step_s: float, report: dict) -> dict:
    """A train row's FLOP figures: model and hardware TFLOP per step and per second, MFU and
    hardware utilisation against the datasheet and the measured matmul peaks, the spec."""
    from earthgpt_jax.models import flops

    model, hardware = flops.flops_for_spec(spec)
    peaks = {"datasheet_bf16": flops.device_peak_flops(report["env"]["device"]),
             "measured_bf16_matmul": report.get("peak", {}).get("matmul_bf16_flops")}
    row = {"flops_spec": spec,
           "model_tflops_per_step": model["total"] / 1e12,
           "hardware_tflops_per_step": hardware["total"] / 1e12,
           "model_tflops_per_s": model["total"] / step_s / 1e12,
           "hardware_tflops_per_s": hardware["total"] / step_s / 1e12}
    for name, peak in peaks.items():
        row[f"mfu_vs_{name}"] = flops.mfu(model["total"], step_s, peak) if peak else None
        row[f"hardware_utilisation_vs_{name}"] = (flops.mfu(hardware["total"], step_s, peak)
                                                  if peak else None)
    row["flops_breakdown_tflops"] = {k: v / 1e12 for k, v in model.items()}
    row["hardware_flops_breakdown_tflops"] = {k: v / 1e12 for k, v in hardware.items()}
    return row


def kv_cache_read_bytes(llm, batch: int, prefill_len: int, new_tokens: int,
                        itemsize: int) -> float:
    """Mean bytes of K and V a decode step must read: every layer's cache written so far
    (the prefill, then one more slot per step), over the new_tokens - 1 decode steps."""
    mean_slots = prefill_len + (new_tokens - 1) / 2
    return 2.0 * llm.num_layers * batch * mean_slots * llm.num_kv_heads * llm.head_dim * itemsize


def phase_decode(args, report: dict, deadline: float) -> None:
    import jax
    import jax.numpy as jnp
    from earthgpt_jax.generate import greedy_generate, prefill, unrolled_for_decoding
    from earthgpt_jax.models.earthgpt import EarthGPT

    params = report.get("train", {}).pop("params_for_decode", None)
    model_cfg = model_config(args, "einsum")
    model = EarthGPT(model_cfg)
    if params is None:  # the train phase did not run: random weights of our own
        import flax.linen as nn
        data = synthetic_batch(model_cfg, 1, 8)
        params = jax.jit(lambda r: nn.unbox(model.init(
            r, data["image"], data["tokens"], data["valid"]))["params"])(jax.random.key(0))
    # Serving weights: bf16 (decoding is bound by reading them once per token), layers unrolled.
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    if args.decode_layers == "unrolled":
        model, params = unrolled_for_decoding(model, params)
    gc.collect()
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    report["decode"] = {"weight_gb": weight_bytes / 2 ** 30}
    for batch in (int(b) for b in args.decode_batches.split(",")):
        if time.time() > deadline:
            report["decode"][f"batch_{batch}"] = {"skipped": "time budget spent"}
            print(f"[decode batch {batch}] skipped: time budget spent", flush=True)
            continue
        try:
            data = synthetic_batch(model_cfg, batch, args.prompt_len, seed=batch)
            images, tokens, valid = data["image"], data["tokens"], data["valid"]
            kwargs = dict(max_new_tokens=args.new_tokens)
            start = time.perf_counter()
            out = greedy_generate(model, params, images, tokens, valid, eos_id=-1, pad_id=0,
                                  **kwargs)
            out.block_until_ready()
            compile_s = time.perf_counter() - start
            prefill(model, params, images, tokens, valid, **kwargs)[0].block_until_ready()
            total = float(np.median(timed(lambda: greedy_generate(
                model, params, images, tokens, valid, eos_id=-1, pad_id=0,
                **kwargs).block_until_ready(), 3)))
            pre = float(np.median(timed(lambda: prefill(
                model, params, images, tokens, valid, **kwargs)[0].block_until_ready(), 3)))
            decode_s = max(total - pre, 1e-9)
            per_token_s = decode_s / args.new_tokens
            bandwidth = report.get("peak", {}).get("copy_bytes_per_s")
            prefill_len = 1 + model_cfg.num_visual_tokens + args.prompt_len
            kv_bytes = kv_cache_read_bytes(model_cfg.llm, batch, prefill_len, args.new_tokens,
                                           jnp.dtype(model_cfg.dtype).itemsize)
            row = {"prefill_s": pre, "total_s": total, "compile_s": compile_s,
                   "decode_tokens_per_s": batch * args.new_tokens / decode_s,
                   "end_to_end_tokens_per_s": batch * args.new_tokens / total,
                   "ms_per_decode_step": per_token_s * 1e3,
                   # Each decode step reads every weight once and the KV cache written so
                   # far: the bandwidth roofline.
                   "kv_cache_read_gb_mean": kv_bytes / 2 ** 30,
                   "weight_read_fraction_of_copy_bandwidth":
                       (weight_bytes / per_token_s / bandwidth) if bandwidth else None,
                   "roofline_fraction_weights_and_kv":
                       ((weight_bytes + kv_bytes) / per_token_s / bandwidth)
                       if bandwidth else None,
                   "prefill_tokens": prefill_len,
                   "distinct_tokens_generated": int(len(np.unique(np.asarray(out))))}
            report["decode"][f"batch_{batch}"] = row
            print(f"[decode batch {batch}] {report['env']['device']}: "
                  f"{row['decode_tokens_per_s']:.0f} tok/s decoding "
                  f"({row['ms_per_decode_step']:.1f} ms/step, "
                  f"{_pct(row['roofline_fraction_weights_and_kv'])} of the copy bandwidth "
                  f"roofline, weights + KV cache), prefill {pre * 1e3:.0f} ms for "
                  f"{row['prefill_tokens']} tokens, "
                  f"end to end {row['end_to_end_tokens_per_s']:.0f} tok/s; compile "
                  f"{compile_s:.0f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            report["decode"][f"batch_{batch}"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            traceback.print_exc()


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="7b", help="7b | 13b | tiny | demo")
    p.add_argument("--stage", default="b", choices=("a", "b", "all"))
    p.add_argument("--batch", type=int, default=16)
    # 1 + 256 visual + 511 = 768 positions: cuDNN flash attention wants a multiple of 64.
    p.add_argument("--text_len", type=int, default=511)
    p.add_argument("--pack_length", type=int, default=0,
                   help="train on packed rows of this many positions (0: padded samples); "
                        "each row holds as many samples of 1 + 256 + text_len as fit")
    p.add_argument("--images_per_pack", type=int, default=7)
    p.add_argument("--steps", type=int, default=8, help="timed train steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants",
                   default="einsum/full,cudnn/full,cudnn/save_dot_except_mlp,cudnn/minimal/8,"
                           "cudnn/none/8,cudnn/full//float32",
                   help="train variants to time, comma-separated attention/remat/batch/frozen "
                        "(attention: einsum|xla|cudnn; remat: none or a policy of "
                        "earthgpt_jax/models/llama.py REMAT_POLICIES, empty = the preset's; "
                        "batch: empty = --batch; frozen: the storage dtype of frozen weights, "
                        "bfloat16|float32, empty = the config's, bfloat16)")
    p.add_argument("--decode_batches", default="1,8")
    p.add_argument("--decode_layers", default="unrolled", choices=("unrolled", "scanned"))
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--matmul_n", type=int, default=8192)
    p.add_argument("--copy_gb", type=float, default=4.0)
    p.add_argument("--phases", default="peak,train,decode")
    p.add_argument("--time_budget_s", type=float, default=480.0,
                   help="phases that would start later than this are skipped")
    p.add_argument("--out", default="gpu_bench.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    deadline = time.time() + args.time_budget_s
    report = {"env": environment(), "args": vars(args)}
    env = report["env"]
    print(f"[env] {env['device']} x{env['device_count']} ({env['platform']}); "
          + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), flush=True)
    phases = args.phases.split(",")
    if "peak" in phases:
        try:
            phase_peak(args, report)
            pk = report["peak"]
            print(f"[peak] {env['device']}: bf16 matmul {pk['matmul_bf16_flops'] / 1e12:.0f} "
                  f"TFLOP/s, fp32 matmul {pk['matmul_fp32_flops'] / 1e12:.0f} TFLOP/s "
                  f"(n={args.matmul_n}); copy {pk['copy_bytes_per_s'] / 1e9:.0f} GB/s",
                  flush=True)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    if "train" in phases:
        phase_train(args, report, deadline)
    if "decode" in phases:
        phase_decode(args, report, deadline)
    report.get("train", {}).pop("params_for_decode", None)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"[done] figures in {args.out}", flush=True)
    return report


if __name__ == "__main__":
    main()
