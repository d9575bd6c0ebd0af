"""Sequence packing: how full packed rows are on the MMRS-1M task mix, and whether the packed
pipeline keeps up with the train step.

1. Packing efficiency (non-padding positions / all positions) on the MMRS-1M task mix. Sample
   lengths come from the demo's generated release, whose records follow MMRS-1M's real formats
   per task (detection answers list every box, grounding answers one box, classification one
   word, ...), tokenised with the demo's trained tokenizer and truncated at max_text_len as
   training does; the stream of samples is drawn with MMRS-1M's per-task pair counts as
   weights (paper-digest §4.1: detection 57%, captioning 20%, VQA 14%, grounding and region
   captioning 3% each, classification 3%). Each sample is 1 (BOS) + V visual + text positions.
   The stream goes through grain's first-fit packer exactly as the pipeline packs (same
   `packing.pack`), for the configs' (pack_length, images_per_pack, pack_bins) and variants.
   Padded rows (one sample per row of 1 + V + max_text_len positions) are the baseline.
   Token counts are the demo tokenizer's (640 pieces, digits split like LLaMA-2's), not
   LLaMA-2's own, which is not available offline: words cost it somewhat more tokens.
2. The packed pipeline (decode, pad, resize, tokenise, ToPackable, first-fit packing, batch)
   on the demo release, in samples/s, against what the train step consumes: the packed demo
   train step measured here (1 CPU device), and one H100 training 7B stage B on packed rows at
   an assumed 40% MFU (model FLOPs of `models/flops.py`, samples per row from part 1).

  JAX_PLATFORMS=cpu NPROC=16 PYTHONPATH=. .venv/bin/python benchmarks/packing.py \
      [--samples=20000] [--groups=3] [--source_px=0] [--train_steps=6] [--no_append]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from earthgpt_jax.models import flops  # noqa: E402

# MMRS-1M pairs per task (paper-digest §4.1; the six add up to 1,005,842).
MMRS1M_TASK_PAIRS = {"detection": 575_350, "captioning": 198_883, "vqa": 141_264,
                     "grounding": 30_820, "region_captioning": 30_820,
                     "classification": 28_705}

# (name, visual tokens V, max_text_len, pack_length, images_per_pack, pack_bins): variants
# measured beside configs/mmrs.py's own layouts (`default_layouts`).
VARIANTS = (
    ("demo", 16, 128, 512, 8, 64),
    ("7b", 256, 1024, 2048, 7, 16),
    ("7b", 256, 1024, 2048, 7, 256),
    ("7b", 256, 1024, 2048, 6, 64),
    ("7b", 256, 1024, 4096, 15, 64),
)
# configs/mmrs.py arguments of the two sizes measured.
CONFIG_ARGS = {"demo": "demo", "7b": "size=7b,stage=b"}
H100_BF16_DENSE_PEAK, ASSUMED_MFU = flops.device_peak_flops("H100"), 0.40


def default_layouts() -> dict[str, tuple]:
    """{size: layout} of configs/mmrs.py's demo and 7B configs (the targets are read there)."""
    from configs import mmrs
    from earthgpt_jax.data.packing import max_samples_per_row
    from earthgpt_jax.models.presets import get_preset

    out = {}
    for size, arg in CONFIG_ARGS.items():
        data = mmrs.get_run_config(arg).data
        visual = get_preset(size).num_visual_tokens
        images = data.images_per_pack or max_samples_per_row(data.pack_length, visual)
        out[size] = (size, visual, data.max_text_len, data.pack_length, images, data.pack_bins)
    return out


def text_lengths_by_task(source, tokenizer, max_text_len: int) -> dict[str, np.ndarray]:
    """Text tokens of every record of `source` (as training encodes it), per task."""
    from earthgpt_jax.data.pipeline import conversation_turns
    from earthgpt_jax.data.tokenizer import encode_conversation

    out: dict[str, list[int]] = {}
    for i in range(len(source)):
        record = source[i]
        task = record["task"].decode() if isinstance(record["task"], bytes) else record["task"]
        enc = encode_conversation(tokenizer, conversation_turns(record), max_text_len)
        out.setdefault(task, []).append(int(enc.valid.sum()))
    return {task: np.asarray(v) for task, v in out.items()}


def mix_stream(lengths: dict[str, np.ndarray], n: int, seed: int = 0) -> np.ndarray:
    """`n` text lengths drawn with MMRS-1M's task weights (tasks the release lacks dropped)."""
    rng = np.random.default_rng(seed)
    tasks = [t for t in MMRS1M_TASK_PAIRS if t in lengths]
    weights = np.asarray([MMRS1M_TASK_PAIRS[t] for t in tasks], float)
    picks = rng.choice(len(tasks), size=n, p=weights / weights.sum())
    return np.asarray([rng.choice(lengths[tasks[k]]) for k in picks])


def pack_lengths(text_lengths: np.ndarray, visual: int, pack_length: int, images: int,
                 bins: int) -> dict:
    """Packs samples of the given lengths with the pipeline's packer (positions only)."""
    import grain
    from earthgpt_jax.data import packing

    samples = [{"tokens": np.ones(1 + visual + n, np.int32), "loss_mask": np.ones(1, np.float32),
                "image": np.zeros((1, 1), np.uint8), "truncated": np.zeros(1, np.int32),
                "example_id": np.asarray(["x"], object)} for n in text_lengths]
    options = packing.PackingOptions(length=pack_length, images_per_row=images,
                                     visual_tokens=visual, bos_id=1, bins_per_batch=bins)
    rows = packing.pack(grain.MapDataset.source(samples).to_iter_dataset(), options, seed=0)
    used = total = placed = count = 0
    for row in rows:
        used += int((row["segment_ids"] > 0).sum())
        total += row["segment_ids"].size
        placed += int(row["segment_ids"].max())
        count += 1
    return {"rows": count, "position_efficiency": used / total,
            "samples_per_row": placed / count, "image_slot_use": placed / count / images}


def measure_packed_pipeline(source, preprocess, options, rows: int, groups: int) -> dict:
    """Steady-state rate over `groups` whole packing groups. The packer fills
    `options.bins_per_batch` rows at once and then hands them out without work, so the clock
    starts after the first group and covers whole groups only (a window inside one group would
    time a buffer, not the pipeline)."""
    from earthgpt_jax.data import packing, pipeline

    if options.bins_per_batch % rows:
        raise ValueError(f"rows per batch ({rows}) must divide pack_bins "
                         f"({options.bins_per_batch}) to time whole groups")
    per_group = options.bins_per_batch // rows
    num_batches = groups * per_group
    start = time.perf_counter()
    it = pipeline.iterate(pipeline.train_dataset(source, preprocess, batch_size=rows, seed=0,
                                                 packing=options))
    for _ in range(per_group):
        next(it)
    startup = time.perf_counter() - start
    samples, eff = 0, []
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(it)
        e = packing.efficiency(batch)
        samples += round(e["samples_per_row"] * rows)
        eff.append(e["positions"])
    seconds = time.perf_counter() - start
    return {"samples_per_s": samples / seconds, "rows_per_s": rows * num_batches / seconds,
            "position_efficiency": float(np.mean(eff)), "startup_s": startup}


def seven_b_packed_consumption(text_lengths: np.ndarray, samples_per_row: float) -> dict:
    """Samples/s one H100 consumes training 7B stage B at ASSUMED_MFU: model FLOPs per sample
    of the stream (causal attention within the sample; a packed row's padding and blank slots
    are not model FLOPs)."""
    from earthgpt_jax.models.presets import get_preset

    cfg = get_preset("7b", llm={"adapters": True})
    sample_flops = flops.model_flops(cfg, "b", text_lengths)["total"] / len(text_lengths)
    samples_per_s = ASSUMED_MFU * H100_BF16_DENSE_PEAK / sample_flops
    return {"sample_tflops": sample_flops / 1e12, "rows_per_s": samples_per_s / samples_per_row,
            "samples_per_s": samples_per_s}


def run(args, log=print) -> list[str]:
    from benchmarks import data_pipeline
    from configs import mmrs
    from earthgpt_jax import train as train_lib
    from earthgpt_jax.models.presets import get_preset
    from earthgpt_jax.data.pipeline import TrainPreprocess
    from earthgpt_jax.run import model_config

    source, tokenizer, config = data_pipeline.prepare_data(args.workdir, args.num_train_images)
    lines = [f"- Lengths: {len(source)} records of the demo release (tokenizer "
             f"{tokenizer.vocab_size} pieces); a stream of {args.samples} samples drawn with "
             f"MMRS-1M's task weights"]
    table = ["", "| size | V | max text | pack length | images/row | bins | padded eff. | "
             "packed eff. | samples/row | image slots used |", "|---|---|---|---|---|---|---|---|---|---|"]
    results = {}
    by_max_text = {}
    defaults = default_layouts()
    for layout in dict.fromkeys([*defaults.values(), *VARIANTS]):
        size, visual, max_text, length, images, bins = layout
        if max_text not in by_max_text:
            lengths = text_lengths_by_task(source, tokenizer, max_text)
            by_max_text[max_text] = mix_stream(lengths, args.samples)
            means = {t: float(v.mean()) for t, v in lengths.items()}
            lines.append(f"- Mean text tokens per task (max {max_text}): "
                         + ", ".join(f"{t} {m:.0f}" for t, m in sorted(means.items())))
        stream = by_max_text[max_text]
        padded = float(np.mean((1 + visual + stream) / (1 + visual + max_text)))
        start = time.perf_counter()
        r = pack_lengths(stream, visual, length, images, bins)
        results[layout] = r
        log(f"{size} L={length} K={images} bins={bins}: {r} ({time.perf_counter() - start:.1f} s)")
        table.append(f"| {size} | {visual} | {max_text} | {length} | {images} | {bins} | "
                     f"{padded:.3f} | {r['position_efficiency']:.3f} | "
                     f"{r['samples_per_row']:.2f} | {r['image_slot_use']:.3f} |")
    lines += table

    # The packed pipeline and what consumes it.
    demo_key, b7_key = defaults["demo"], defaults["7b"]
    lines += ["", "| pipeline | images | samples/s | rows/s | position eff. | start-up s | "
              "consumer samples/s | pipeline / consumer |", "|---|---|---|---|---|---|---|---|"]
    # The demo config's own pack_length and images_per_pack.
    demo_cfg = config.replace(data={"packing": True})
    cfg = model_config(demo_cfg, tokenizer.vocab_size, tokenizer.bos_id)
    demo_options = train_lib.packing_options(demo_cfg.data, cfg)
    pre = TrainPreprocess(tokenizer.path, cfg.image_size, demo_cfg.data.max_text_len)
    demo = measure_packed_pipeline(source, pre, demo_options, 16, args.groups)
    consumer = None
    if args.train_steps:
        from earthgpt_jax.data import pipeline
        it = pipeline.iterate(pipeline.train_dataset(source, pre, batch_size=16, seed=1,
                                                     packing=demo_options))
        batches = [next(it) for _ in range(4)]
        step = data_pipeline.measure_train_step(demo_cfg, tokenizer, batches,
                                                steps=args.train_steps)
        consumer = step["examples_per_s"] * mean_samples_per_row(batches)
        lines.insert(1, f"- Packed demo train step (configs/mmrs.py:demo + packing, 1 CPU "
                        f"device, 16 rows x {demo_options.length}): {step['step_s']:.3f} "
                        f"s/step, compile {step['compile_s']:.1f} s")
    lines.append(_pipeline_row(f"demo ({cfg.image_size} px, 16 rows x {demo_options.length})",
                               "synthetic 56-96 px", demo, consumer, "demo step"))
    config_7b = mmrs.get_run_config(CONFIG_ARGS["7b"])
    b7_length, b7_images = config_7b.data.pack_length, b7_key[4]
    b7 = seven_b_packed_consumption(by_max_text[b7_key[2]], results[b7_key]["samples_per_row"])
    sources = [(source, tokenizer, "synthetic 56-96 px")]
    if args.source_px:
        big, big_tok, _ = data_pipeline.prepare_data(args.workdir, args.num_train_images,
                                                     args.source_px)
        sources.append((big, big_tok, f"upscaled {args.source_px} px PNG"))
    for src, tok, label in sources:
        model_7b = dataclasses.replace(get_preset("7b"), bos_id=tok.bos_id)
        options = train_lib.packing_options(config_7b.data, model_7b)
        pre7 = TrainPreprocess(tok.path, model_7b.image_size, config_7b.data.max_text_len)
        r = measure_packed_pipeline(src, pre7, options, 4, args.groups)
        lines.append(_pipeline_row(f"7b ({model_7b.image_size} px, 4 rows x {b7_length})",
                                   label, r, b7["samples_per_s"], "one H100 (derived)"))
    lines.append(f"- 7B consumption (assumption, not measured): one H100 at {ASSUMED_MFU:.0%} "
                 f"MFU of {H100_BF16_DENSE_PEAK / 1e12:.0f} TFLOP/s training stage B on packed "
                 f"rows of {b7_length} positions with {b7_images} image slots: "
                 f"{b7['sample_tflops']:.2f} model TFLOP per sample of the mix "
                 f"-> {b7['samples_per_s']:.1f} samples/s = {b7['rows_per_s']:.2f} rows/s of "
                 f"{results[b7_key]['samples_per_row']:.2f} samples")
    lines.append(f"- Cores on this host: {os.cpu_count()}; load average at end: "
                 f"{os.getloadavg()[0]:.1f}")
    eff = results[b7_key]["position_efficiency"]
    lines += ["", f"Target packing efficiency >= 90% on the MMRS-1M mix (7B default layout): "
              f"{'met' if eff >= 0.9 else 'MISSED'} ({eff:.1%}; demo layout "
              f"{results[demo_key]['position_efficiency']:.1%})."]
    return lines


def mean_samples_per_row(batches) -> float:
    """Mean samples per row of pre-made packed batches."""
    from earthgpt_jax.data import packing
    return float(np.mean([packing.efficiency(b)["samples_per_row"] for b in batches]))


def _pipeline_row(name, images, r, consumer, consumer_name) -> str:
    ratio = f"{r['samples_per_s'] / consumer:.1f}x {consumer_name}" if consumer else "-"
    consumed = f"{consumer:.1f}" if consumer else "-"
    return (f"| {name} | {images} | {r['samples_per_s']:.1f} | {r['rows_per_s']:.2f} | "
            f"{r['position_efficiency']:.3f} | {r['startup_s']:.1f} | {consumed} | {ratio} |")


def main(argv=None) -> int:
    from absl import flags
    from benchmarks import results

    flags.FLAGS.mark_as_parsed()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/earthgpt_bench_data",
                        help="release, TFDS build and tokenizer cache (shared with "
                             "data_pipeline.py)")
    parser.add_argument("--num_train_images", type=int, default=600)
    parser.add_argument("--samples", type=int, default=20000, help="samples in the mix stream")
    parser.add_argument("--groups", type=int, default=3,
                        help="timed packing groups (pack_bins rows each) per pipeline row")
    parser.add_argument("--source_px", type=int, default=0,
                        help="also time the 7b pipeline on images upscaled to this size")
    parser.add_argument("--train_steps", type=int, default=6, help="0: skip the demo step")
    parser.add_argument("--no_append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    lines = results.machine_lines(("jax", "grain", "sentencepiece")) + run(args)
    print("\n".join(lines))
    if not args.no_append:
        results.append_section("Sequence packing: efficiency on the MMRS-1M mix, packed "
                               "pipeline vs consumption", results.command_line(__file__, argv),
                               lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
