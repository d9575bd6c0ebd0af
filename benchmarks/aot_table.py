"""Which TPU slice fits EarthGPT-7B/13B, stage A and B: the README's AOT table.

Compiles the real train step with `main.py --mode=compile` (libtpu's topology description, no
TPU needed) for every size x stage x topology x remat policy x per-chip batch, one subprocess
each (a compile holds a few GB of host memory), and writes per-chip HBM, FLOPs and the step time
at 50% MFU as a markdown table, and every report (with its `flops_spec`) as JSON.

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/aot_table.py \
        [--sizes=7b,13b] [--stages=a,b] [--topologies=v4-8,v5p-8,v5e-16] \
        [--per_chip_batches=1] [--remats=full] [--frozen_dtype=bfloat16] [--pack_length=0] \
        [--layout=manual] \
        [--out=benchmarks/results/aot_table.md] [--json_out=benchmarks/results/DATE_aot_NAME.json]

Rows are padded single samples of 1 + 256 + text_len positions (the README's table), or with
--pack_length=N packed rows of N positions with --images_per_pack image slots (the real configs'
default: 2048 and 7, the most a 2048-position row can hold). --remats takes names of
earthgpt_jax/models/llama.REMAT_POLICIES (or none); --frozen_dtype is
config.train.frozen_param_dtype, the storage dtype of the weights the stage freezes.

Each compile takes 1-9 minutes on a 2-core host; progress and an ETA are printed as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from earthgpt_jax.aot import parse_topology  # noqa: E402


def compile_one(size: str, stage: str, topology: str, per_chip_batch: int, text_len: int,
                remat: str, workdir: str, pack_length: int = 0, images_per_pack: int = 7,
                frozen_dtype: str = "bfloat16", attention_impl: str = "",
                loss_chunk: int = 0, layout: str = "manual") -> dict:
    topo = parse_topology(topology)
    report_json = os.path.join(workdir, f"{size}_{stage}_{topology}_{remat}_{per_chip_batch}_"
                                        f"{frozen_dtype}_{attention_impl}_{loss_chunk}.json")
    cmd = [sys.executable, "main.py", f"--config=configs/mmrs.py:size={size},stage={stage}",
           f"--workdir={workdir}", "--mode=compile",
           f"--config.compile.topology={topology}",
           f"--config.compile.report_json={report_json}",
           f"--config.train.batch_size={per_chip_batch * topo.chips}",
           f"--config.train.frozen_param_dtype={frozen_dtype}",
           f"--config.data.max_text_len={text_len}", f"--config.model.remat_policy={remat}",
           f"--config.train.loss_chunk={loss_chunk}", f"--config.mesh.layout={layout}",
           f"--config.data.packing={bool(pack_length)}"]
    if attention_impl:
        cmd.append(f"--config.model.attention_impl={attention_impl}")
    if pack_length:
        cmd += [f"--config.data.pack_length={pack_length}",
                f"--config.data.images_per_pack={images_per_pack}"]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.time() - start
    if proc.returncode != 0 or not os.path.exists(report_json):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"fits": None, "error": " / ".join(tail)[:300], "compile_s": elapsed,
                "command": cmd[1:]}
    with open(report_json) as f:
        return json.load(f) | {"compile_s": elapsed, "command": cmd[1:]}


def row(size, stage, topology, r, remat="full", per_chip_batch=1) -> str:
    """One table row; remat, per-chip batch and frozen dtype come last, so the columns before
    them keep the README table's order (tests/test_flops.py reads the TFLOP column)."""
    head = f"| {size} | {stage.upper()} | {topology} ({r.get('chips', '?')} chips) |"
    tail = f" {remat} | {per_chip_batch} | {r.get('frozen_param_dtype', '?')} |"
    if r.get("fits") is None:
        return head + f" error: {r['error']} | | | | | {r['compile_s']:.0f} |" + tail
    if not r["fits"]:
        return head + f" **no**: {r['error'][:120]} | | | | | {r['compile_s']:.0f} |" + tail
    m = r["per_chip"]
    return (head + f" yes | {m['arguments_gib']:.1f} | {m['temporaries_gib']:.1f} | "
            f"{r['xla_peak_gib']:.1f} / {r['hbm_gib_per_chip']} | "
            f"{r['model_tflops_per_step']:.0f} | {r['step_seconds_at_50pct_mfu']:.2f} | "
            f"{r['compile_s']:.0f} |" + tail)


def main() -> None:
    from benchmarks import results

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="7b,13b")
    p.add_argument("--stages", default="a,b")
    p.add_argument("--topologies", default="v4-8,v5p-8,v5e-16")
    p.add_argument("--per_chip_batches", default="1",
                   help="ascending; after one that does not fit, the larger ones are skipped")
    p.add_argument("--text_len", type=int, default=767, help="1 + 256 + 767 = 1024 positions")
    p.add_argument("--remats", default="full", help="llama.REMAT_POLICIES names, or none")
    p.add_argument("--frozen_dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--attention_impl", default="", help="empty: the config's default")
    p.add_argument("--pack_length", type=int, default=0, help="0: padded rows")
    p.add_argument("--loss_chunk", type=int, default=0,
                   help="config.train.loss_chunk: LM head + cross-entropy positions per chunk")
    p.add_argument("--images_per_pack", type=int, default=7)
    p.add_argument("--layout", default="manual", choices=("manual", "auto"),
                   help="config.mesh.layout: manual is FSDP over all chips, as every committed "
                        "table was compiled; auto keeps plain data parallelism where it fits")
    p.add_argument("--out", default="benchmarks/results/aot_table.md")
    p.add_argument("--json_out", default="", help="every report, as JSON (none if empty)")
    args = p.parse_args()
    batches = [int(b) for b in args.per_chip_batches.split(",")]
    jobs = [(s, st, t, r) for s in args.sizes.split(",") for st in args.stages.split(",")
            for t in args.topologies.split(",") for r in args.remats.split(",")]
    rows = (f"packed rows of {args.pack_length} positions with {args.images_per_pack} image "
            f"slots" if args.pack_length else f"{1 + 256 + args.text_len} positions (BOS + 256 "
            f"visual + {args.text_len} text)")
    lines = [f"Per-chip batch {args.per_chip_batches}, {rows}, remat {args.remats}, trainable "
             f"weights fp32, frozen weights {args.frozen_dtype}, bf16 compute, "
             + ("FSDP over all chips" if args.layout == "manual" else
                "data parallel where XLA says it fits a chip, else FSDP")
             + ". GiB per chip from XLA's memory analysis.", "",
             "| model | stage | topology | fits | arguments GiB | temporaries GiB | "
             "XLA peak / HBM GiB | model TFLOP/step | s/step at 50% MFU | compile s | remat | "
             "batch per chip | frozen weights |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    record = {"command": results.command_line(__file__),
              "machine": results.machine(("jax", "jaxlib", "flax", "libtpu")),
              "reports": []}
    start, done_jobs, total = time.time(), 0, len(jobs) * len(batches)
    with tempfile.TemporaryDirectory() as workdir:
        for size, stage, topology, remat in jobs:
            for batch in batches:
                r = compile_one(size, stage, topology, batch, args.text_len, remat, workdir,
                                args.pack_length, args.images_per_pack, args.frozen_dtype,
                                args.attention_impl, args.loss_chunk, args.layout)
                done_jobs += 1
                lines.append(row(size, stage, topology, r, remat, batch))
                record["reports"].append({"size": size, "stage": stage, "topology": topology,
                                          "remat": remat, "per_chip_batch": batch} | r)
                eta = (time.time() - start) / done_jobs * (total - done_jobs)
                print(f"[{done_jobs}/{total}] {lines[-1]}  (ETA {eta / 60:.0f} min)",
                      flush=True)
                # Rewritten each time: a crash keeps what was done.
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    f.write("\n".join(lines) + "\n")
                if args.json_out:
                    with open(args.json_out, "w") as f:
                        json.dump(record, f, indent=1)
                if not r.get("fits"):
                    break  # a larger batch will not fit either
    print(f"table in {args.out}" + (f", reports in {args.json_out}" if args.json_out else ""))


if __name__ == "__main__":
    main()
