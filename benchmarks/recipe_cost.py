"""What the paper's recipe costs: the slice each stage needs and chip-hours per epoch.

For EarthGPT-7B/13B, stage A (caption data) and stage B (MMRS-1M), on the real configs' packed
rows (configs/mmrs.py: 2048 positions, image slots derived from it):

1. Samples per packed row, from the pipeline's own packer (`benchmarks/packing.py`):
   - stage B: text lengths of the generated release's records per task, drawn with MMRS-1M's
     task counts (the same stream as the packing benchmark);
   - stage A: caption samples. Real LAION/COCO text is not available offline, so their text
     length is an assumption, stated in the output: uniform in [CAPTION_TEXT_TOKENS] tokens
     (chat template + prompt + one-sentence caption + EOS; COCO captions average ~10.5 words).
2. Model FLOPs per sample (`earthgpt_jax/models/flops.py`: frozen weights cost no weight
   gradients; causal attention within each sample; neither the rows' padding nor their blank
   image slots count), the mean over the same sample stream; the stream's text lengths are
   stored in the JSON (`flops_spec`), so tests/test_flops.py recomputes the figure.
3. chip-hours per epoch = samples x model FLOPs per sample / (chip bf16 peak x MFU) / 3600, at
   a stated MFU (an assumption, not a measurement: `--mfu`; MFU counts model FLOPs, so the
   packing's padding is part of what it leaves out).
4. The smallest slice that fits each (size, stage), read from the AOT table's raw result
   (`benchmarks/results/aot_table.md`, written by `benchmarks/aot_table.py`).

  JAX_PLATFORMS=cpu NPROC=16 PYTHONPATH=. .venv/bin/python benchmarks/recipe_cost.py \
      [--mfu=0.4] [--samples=20000] [--out=benchmarks/results/recipe_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Epoch sizes (samples). MMRS-1M: paper-digest §4.1. COCO Captions train2017: 591,753 captions
# of 118,287 images. LAION-400M: the paper trains on a subset of unknown size; a full epoch is
# the upper bound, and 10M samples a unit to scale by.
EPOCHS = {
    "b": {"MMRS-1M": 1_005_842},
    "a": {"COCO Captions train2017": 591_753, "10M LAION samples": 10_000_000,
          "LAION-400M (all)": 400_000_000},
}
CAPTION_TEXT_TOKENS = (30, 60)
# Datasheet dense bf16 FLOP/s per chip (the same figures as models/flops.py's table).
CHIPS = {"TPU v5p": "TPU v5", "TPU v4": "TPU v4", "TPU v5e": "TPU v5e", "H100": "H100"}
AOT_TABLE = os.path.join(ROOT, "benchmarks", "results", "aot_table.md")


def smallest_fitting_slices(path: str = AOT_TABLE) -> dict[str, dict[str, str]]:
    """{size: {stage: 'topology (N chips)'}}: the fewest chips among the rows that fit."""
    best: dict[tuple[str, str], tuple[int, str]] = {}
    row = re.compile(r"^\| (7b|13b) \| ([AB]) \| ([^|]+?) \((\d+) chips\) \| (yes|no) \|")
    with open(path) as f:
        for line in f:
            m = row.match(line)
            if m and m.group(5) == "yes":
                key, chips = (m.group(1), m.group(2).lower()), int(m.group(4))
                if key not in best or chips < best[key][0]:
                    best[key] = (chips, f"{m.group(3)} ({chips} chips)")
    out: dict[str, dict[str, str]] = {}
    for (size, stage), (_, name) in sorted(best.items()):
        out.setdefault(size, {})[stage] = name
    return out


def samples_per_row(args, layout) -> dict[str, dict]:
    """Packing of a stage-B (MMRS-1M mix) and a stage-A (caption) stream at `layout`."""
    from benchmarks import data_pipeline, packing

    _, visual, max_text, length, images, bins = layout
    source, tokenizer, _ = data_pipeline.prepare_data(args.workdir, args.num_train_images)
    lengths = packing.text_lengths_by_task(source, tokenizer, max_text)
    stream_b = packing.mix_stream(lengths, args.samples)
    rng = np.random.default_rng(0)
    captions = rng.integers(CAPTION_TEXT_TOKENS[0], CAPTION_TEXT_TOKENS[1] + 1, args.samples)
    out = {}
    for stage, stream in (("a", captions), ("b", stream_b)):
        out[stage] = packing.pack_lengths(stream, visual, length, images, bins)
        values, counts = np.unique(stream, return_counts=True)
        out[stage]["text_length_counts"] = {str(int(v)): int(c) for v, c in zip(values, counts)}
    return out


def cost_table(per_row: dict[str, dict], layout, mfu: float) -> list[dict]:
    from earthgpt_jax.models import flops

    rows = []
    for size in ("7b", "13b"):
        for stage in ("a", "b"):
            spec = {"size": size, "stage": stage,
                    "text_length_counts": per_row[stage]["text_length_counts"]}
            model, _ = flops.flops_for_spec(spec)
            sample_flops = model["total"] / sum(spec["text_length_counts"].values())
            spec = {k: v for k, v in spec.items() if k != "text_length_counts"}
            spec["text_length_counts_from"] = f"packing.{stage}.text_length_counts"
            for epoch, samples in EPOCHS[stage].items():
                n_rows = samples / per_row[stage]["samples_per_row"]
                hours = {chip: samples * sample_flops / (flops.device_peak_flops(kind) * mfu)
                         / 3600 for chip, kind in CHIPS.items()}
                rows.append({"size": size, "stage": stage, "epoch": epoch, "samples": samples,
                             "rows": n_rows, "flops_spec": spec,
                             "model_tflops_per_sample": sample_flops / 1e12,
                             "chip_hours": hours})
    return rows


def main(argv=None) -> dict:
    from benchmarks import packing

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--samples", type=int, default=20000)
    # The packing benchmark's release and tokenizer (same cache, same defaults): the same
    # stage-B samples per row as its table.
    p.add_argument("--num_train_images", type=int, default=600)
    p.add_argument("--workdir", default="/tmp/earthgpt_bench_data")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                 "recipe_cost.json"))
    args = p.parse_args(argv)
    layout = packing.default_layouts()["7b"]
    per_row = samples_per_row(args, layout)
    result = {
        "command": "python benchmarks/recipe_cost.py " + " ".join(argv or sys.argv[1:]),
        "assumptions": {
            "mfu": args.mfu,
            "caption_text_tokens": list(CAPTION_TEXT_TOKENS),
            "stage_b_lengths": "generated release's records per task (demo tokenizer), drawn "
                               "with MMRS-1M's task counts",
        },
        "layout": {"pack_length": layout[3], "images_per_row": layout[4],
                   "visual_tokens": layout[1], "pack_bins": layout[5]},
        "packing": per_row,
        "smallest_fitting_slice": smallest_fitting_slices(),
        "cost": cost_table(per_row, layout, args.mfu),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(format_markdown(result))
    return result


def format_markdown(result: dict) -> str:
    chips = list(CHIPS)
    lines = ["| model | stage | epoch | samples | samples/row | rows | model TFLOP/sample | "
             + " | ".join(f"{c} chip-h" for c in chips) + " |",
             "|---" * (7 + len(chips)) + "|"]
    for r in result["cost"]:
        per_row = result["packing"][r["stage"]]["samples_per_row"]
        lines.append(f"| {r['size']} | {r['stage'].upper()} | {r['epoch']} | {r['samples']:,} | "
                     f"{per_row:.2f} | {r['rows']:,.0f} | {r['model_tflops_per_sample']:.2f} | "
                     + " | ".join(f"{r['chip_hours'][c]:,.0f}" for c in chips) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
