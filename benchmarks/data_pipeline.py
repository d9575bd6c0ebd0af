"""Data pipeline speed: the grain training pipeline with 0, 1 and 2 worker processes vs what the
train step consumes.

Data: the demo's generated miniature MMRS-1M release, built into the `mmrs1m` TFDS dataset
(array_record) and its trained tokenizer, exactly as `make demo` prepares them (cached in
--workdir, so a rerun starts at once). Pipeline: `pipeline.train_dataset` + `TrainPreprocess`
(decode, centre-pad, resize, chat template + loss mask, batch), read as `train.py` reads it:
0 workers is `pipeline.iterate` itself (threads in this process); 1 and 2 workers put grain's
`mp_prefetch` (spawned worker processes, each running the same threaded reader) behind it.

Two preprocessing sizes:
  demo  configs/mmrs.py:demo: 64 px images, 128 text tokens, batch 16, 4x4 grid (16 visual).
  7b    the 7B/13B config: 448 px images, 1024 text tokens (config.data.max_text_len), 256
        visual tokens. The synthetic source images are small (56-96 px), so decoding costs less
        than for real MMRS-1M images; --source_px re-encodes them larger to show that cost.

Consumption: the demo train step is measured in the same run (config demo, one CPU device, fed
pre-made batches) and again fed live from the pipeline, which shares the CPU with it. For 7B
there is no step to time here; its consumption is derived per accelerator chip from a stated
assumption (see `seven_b_consumption`).

Figures: examples/s; non-padding tokens/s (text tokens, and LLM tokens counting the BOS and the
visual prefix, which are never padding); padding efficiency = non-padding / all tokens of the
padded batches. Packed rows (config.data.packing, the real configs' default) are measured by
benchmarks/packing.py.

  JAX_PLATFORMS=cpu NPROC=16 PYTHONPATH=. .venv/bin/python benchmarks/data_pipeline.py \
      [--workers=0,1,2] [--batches=30] [--sizes=demo,7b] [--source_px=0] [--no_train_step]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time


from benchmarks import results
from earthgpt_jax.models.flops import device_peak_flops

# Preprocessing sizes per config: (image px, text tokens, visual tokens, batch).
SIZES = {"demo": dict(image_size=64, max_text_len=128, visual_tokens=16, batch_size=16),
         "7b": dict(image_size=448, max_text_len=1024, visual_tokens=256, batch_size=16)}


def demo_config(workdir: str, num_train_images: int):
    from configs import mmrs

    return mmrs.get_run_config("demo").replace(data={
        "manual_dir": os.path.join(workdir, "release"), "tfds_dir": os.path.join(workdir, "tfds"),
        "synthetic_train_images": num_train_images, "synthetic_test_images": 20})


def prepare_data(workdir: str, num_train_images: int = 600, source_px: int = 0):
    """(train source, tokenizer, config): the demo's release -> TFDS -> tokenizer, cached.

    With `source_px`, every image of the release is first upscaled (aspect kept) so its long
    side is `source_px` and re-encoded as PNG, in a separate cache directory.
    """
    from earthgpt_jax.data import prepare, synthetic

    workdir = os.path.abspath(workdir)
    if source_px:
        workdir = os.path.join(workdir, f"px{source_px}")
    config = demo_config(workdir, num_train_images)
    release = config.data.manual_dir
    if not os.path.isdir(os.path.join(release, "data", "json")):
        tmp = release + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        synthetic.write_release(tmp, seed=0, num_train_images=num_train_images,
                                num_test_images=20)
        if source_px:
            _upscale_images(os.path.join(tmp, "data"), source_px)
        os.replace(tmp, release)  # a crash mid-write leaves no half release to reuse
    data_dir = prepare.prepare_tfds(config, workdir)
    source = prepare.data_source(data_dir, "train")
    tokenizer = prepare.prepare_tokenizer(config, workdir, source)
    return source, tokenizer, config


def _upscale_images(data_root: str, long_side: int) -> None:
    from PIL import Image

    for folder, _, files in os.walk(data_root):
        for name in files:
            if name.endswith(".png"):
                path = os.path.join(folder, name)
                with Image.open(path) as img:
                    img.load()
                    scale = long_side / max(img.size)
                    big = img.resize((round(img.width * scale), round(img.height * scale)),
                                     Image.BICUBIC)
                big.save(path, compress_level=6)


def batch_reader(source, preprocess, *, batch_size: int, workers: int, num_threads: int):
    """The training pipeline's iterator; 0 workers is exactly what `train.py` iterates."""
    import grain
    from earthgpt_jax.data import pipeline

    dataset = pipeline.train_dataset(source, preprocess, batch_size=batch_size, seed=0,
                                     num_threads=num_threads)
    if workers == 0:
        return pipeline.iterate(dataset)
    return iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))


def measure_pipeline(source, preprocess, *, batch_size: int, workers: int, num_batches: int,
                     visual_tokens: int, num_threads: int = 2, warmup_batches: int = 8) -> dict:
    """Steady-state throughput: the clock starts after `warmup_batches`, by when the start-up
    (reported apart) is over and the prefetch buffers filled during it are drained."""
    start = time.perf_counter()
    reader = batch_reader(source, preprocess, batch_size=batch_size, workers=workers,
                          num_threads=num_threads)
    next(reader)
    startup = time.perf_counter() - start
    for _ in range(warmup_batches - 1):
        next(reader)
    examples = text_tokens = text_slots = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(reader)
        examples += batch["tokens"].shape[0]
        text_tokens += int(batch["valid"].sum())
        text_slots += batch["valid"].size
    seconds = time.perf_counter() - start
    prefix = examples * (1 + visual_tokens)  # BOS + visual tokens: never padding
    del reader  # stops the worker processes
    return {"workers": workers, "startup_s": startup, "seconds": seconds, "examples": examples,
            "examples_per_s": examples / seconds,
            "text_tokens_per_s": text_tokens / seconds,
            "llm_tokens_per_s": (text_tokens + prefix) / seconds,
            "text_padding_efficiency": text_tokens / text_slots,
            "llm_padding_efficiency": (text_tokens + prefix) / (text_slots + prefix),
            "mean_text_tokens": text_tokens / examples}


def measure_train_step(config, tokenizer, batches: list, live_reader=None, steps: int = 8
                       ) -> dict:
    """Seconds per demo train step fed pre-made `batches`, and (with `live_reader`) fed live
    from the pipeline, which then shares the CPU with the step. Dispatched as `train._loop`
    does: the host fetches the next batch while the previous step still runs."""
    import jax
    from earthgpt_jax import parallel, train as train_lib
    from earthgpt_jax.run import model_config

    cfg = model_config(config, tokenizer.vocab_size, tokenizer.bos_id)
    trainer = train_lib.Trainer.for_run(config, cfg, parallel.build_mesh(config.mesh))
    state = trainer.init_state(config.train.seed)
    start = time.perf_counter()
    state, metrics = trainer.train_step(state, batches[0], 0)
    jax.block_until_ready(metrics)
    out = {"compile_s": time.perf_counter() - start, "batch_size": config.train.batch_size}

    def timed(next_batch):
        nonlocal state, metrics
        start = time.perf_counter()
        for i in range(steps):
            state, new_metrics = trainer.train_step(state, next_batch(i), i + 1)
            jax.block_until_ready(metrics)  # the previous step's, as the training loop reads it
            metrics = new_metrics
        jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / steps

    out["step_s"] = timed(lambda i: batches[1 + i % (len(batches) - 1)])
    out["examples_per_s"] = out["batch_size"] / out["step_s"]
    if live_reader is not None:
        next(live_reader)  # start-up outside the timing
        out["live_step_s"] = timed(lambda i: next(live_reader))
    return out


# Documented assumption for the 7B consumption (no 7B step can run on this CPU).
H100_BF16_DENSE_PEAK = device_peak_flops("H100")  # FLOP/s, datasheet (dense, no sparsity)
ASSUMED_MFU = 0.40               # issue 7's H100 target for 7B stage B


def seven_b_consumption(max_text_len: int, visual_tokens: int = 256) -> dict:
    """Examples/s one H100 consumes training 7B stage B, from model FLOPs
    (earthgpt_jax/models/flops.py) of an example whose text fills max_text_len: the most an
    example costs, so the least it consumes (shorter texts cost less; MFU counts no padding).
    Divided into 40% of the H100's 989 TFLOP/s bf16 peak. Stage A (q/k/v weight gradients too)
    costs more per example, so it consumes less: stage B is the hungrier case for the pipeline.
    """
    from earthgpt_jax.models import flops
    from earthgpt_jax.models.presets import get_preset

    cfg = get_preset("7b", llm={"adapters": True}, grid_size=int(round(visual_tokens ** 0.5)))
    per_example = flops.train_step_flops(cfg, 1, max_text_len, "b")["total"]
    rate = ASSUMED_MFU * H100_BF16_DENSE_PEAK / per_example
    return {"flops_per_example": per_example, "examples_per_s_per_chip": rate,
            "tokens": 1 + visual_tokens + max_text_len}


def run(workdir: str, sizes=("demo", "7b"), workers=(0, 1, 2), num_batches: int = 30,
        num_train_images: int = 600, source_px: int = 0, train_steps: int = 8,
        num_threads: int = 2, log=print) -> dict:
    from earthgpt_jax.data.pipeline import TrainPreprocess

    source, tokenizer, config = prepare_data(workdir, num_train_images)
    scenarios = [(size, source, tokenizer, "synthetic (56-96 px PNG)") for size in sizes]
    if source_px:
        big_source, big_tok, _ = prepare_data(workdir, num_train_images, source_px)
        scenarios.append(("7b", big_source, big_tok, f"upscaled ({source_px} px PNG)"))
    result = {"records": len(source), "num_threads": num_threads, "scenarios": []}
    for size, src, tok, images in scenarios:
        shape = SIZES[size]
        preprocess = TrainPreprocess(tok.path, shape["image_size"], shape["max_text_len"])
        for w in workers:
            row = measure_pipeline(src, preprocess, batch_size=shape["batch_size"], workers=w,
                                   num_batches=num_batches, visual_tokens=shape["visual_tokens"],
                                   num_threads=num_threads)
            row |= {"size": size, "images": images}
            log(f"{size} {images} workers {w}: {row['examples_per_s']:.1f} examples/s, "
                f"{row['text_tokens_per_s']:.0f} text tok/s, padding efficiency "
                f"{row['text_padding_efficiency']:.3f} (start-up {row['startup_s']:.1f}s)")
            result["scenarios"].append(row)
    if train_steps and "demo" in sizes:
        shape = SIZES["demo"]
        preprocess = TrainPreprocess(tokenizer.path, shape["image_size"], shape["max_text_len"])
        reader = batch_reader(source, preprocess, batch_size=shape["batch_size"], workers=0,
                              num_threads=num_threads)
        batches = [next(reader) for _ in range(4)]
        result["demo_train"] = measure_train_step(config, tokenizer, batches, reader,
                                                  steps=train_steps)
        log(f"demo train step: {result['demo_train']}")
    result["7b_consumption"] = seven_b_consumption(SIZES["7b"]["max_text_len"])
    return result


def result_lines(result: dict, target: float = 3.0) -> list[str]:
    train = result.get("demo_train")
    demo_rate = train["examples_per_s"] if train else None
    b7 = result["7b_consumption"]
    cores = os.cpu_count()
    out = [f"- Data: demo release, {result['records']} training records; batch 16; grain "
           f"ReadOptions num_threads {result['num_threads']} (in each worker); throughput "
           f"after the first batch (start-up apart), the pipeline running alone"]
    if train:
        out.append(f"- Demo train step (configs/mmrs.py:demo, 1 CPU device, batch "
                   f"{train['batch_size']}): {train['step_s']:.3f} s/step fed pre-made batches "
                   f"= {demo_rate:.1f} examples/s consumed; {train.get('live_step_s', 0):.3f} "
                   f"s/step fed live by the pipeline (0 workers) on the same CPU; compile "
                   f"{train['compile_s']:.1f} s")
    out.append(f"- 7B consumption (assumption, not measured): one H100 at {ASSUMED_MFU:.0%} MFU "
               f"of {H100_BF16_DENSE_PEAK / 1e12:.0f} TFLOP/s bf16 training stage B on full "
               f"{b7['tokens']}-token sequences = {b7['flops_per_example'] / 1e12:.1f} TFLOP/"
               f"example -> {b7['examples_per_s_per_chip']:.1f} examples/s per chip")
    out += ["", "| size | source images | workers | examples/s | text tok/s (non-pad) | LLM tok/s "
            "(non-pad, incl. visual) | text padding eff. | LLM padding eff. | start-up s | "
            "pipeline / consumption |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["scenarios"]:
        if row["size"] == "demo" and demo_rate:
            ratio = f"{row['examples_per_s'] / demo_rate:.1f}x demo step"
        elif row["size"] == "7b":
            # This host's rate per core against one chip's appetite.
            per_core = row["examples_per_s"] / cores
            ratio = (f"{row['examples_per_s'] / b7['examples_per_s_per_chip']:.2f}x one H100 "
                     f"({target * b7['examples_per_s_per_chip'] / per_core:.1f} cores/chip "
                     f"for {target:g}x)")
        else:
            ratio = "-"
        out.append(f"| {row['size']} | {row['images']} | {row['workers']} "
                   f"| {row['examples_per_s']:.1f} | {row['text_tokens_per_s']:.0f} "
                   f"| {row['llm_tokens_per_s']:.0f} | {row['text_padding_efficiency']:.3f} "
                   f"| {row['llm_padding_efficiency']:.3f} | {row['startup_s']:.1f} | {ratio} |")
    out.append(results.load_line())
    if demo_rate:
        best = max((r for r in result["scenarios"] if r["size"] == "demo"),
                   key=lambda r: r["examples_per_s"])
        ratio = best["examples_per_s"] / demo_rate
        out += ["", f"Target pipeline >= {target:g}x consumption (demo): "
                f"{'met' if ratio >= target else 'MISSED'} ({ratio:.1f}x with "
                f"{best['workers']} workers)."]
    return out


def main(argv=None) -> int:
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/earthgpt_bench_data",
                        help="release, TFDS build and tokenizer cache")
    parser.add_argument("--sizes", default="demo,7b")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per row")
    parser.add_argument("--num_train_images", type=int, default=600)
    parser.add_argument("--source_px", type=int, default=0,
                        help="also run 7b on a release with images upscaled to this size")
    parser.add_argument("--train_steps", type=int, default=8, help="0: skip the demo step")
    parser.add_argument("--no_append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    header = results.machine_lines(("jax", "flax", "grain", "tensorflow-datasets", "pillow"))
    result = run(args.workdir, sizes=tuple(args.sizes.split(",")),
                 workers=tuple(int(w) for w in args.workers.split(",")),
                 num_batches=args.batches, num_train_images=args.num_train_images,
                 source_px=args.source_px, train_steps=args.train_steps)
    lines = header + result_lines(result)
    print("\n".join(lines))
    if not args.no_append:
        results.append_section("Data pipeline: grain workers vs train-step consumption",
                               results.command_line(__file__, argv), lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
