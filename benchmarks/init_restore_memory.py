"""Peak host memory of `config.init.llm`: the sharded restore against the old numpy path.

Writes a synthetic converted LLaMA checkpoint (default ~2.1 GB fp32: hidden 2048, intermediate
5504, 8 layers, vocab 32000, as benchmarks/convert_memory.py) with the converter's own writer
(`checkpoint.write_params_streaming` + `save_llama_config`) in a temp dir, then restores its
decoder onto an 8-device CPU mesh (8-way FSDP, configs/mmrs.py's rules), each way in a fresh
subprocess that reports its peak RSS (VmHWM):

  baseline       imports, the 8 CPU devices and the decoder's abstract sharded state; no data
  new            `checkpoints.restore_part('llm', ...)`: `checkpoints.restore_sharded`, each leaf
                 restored by orbax straight into its sharding; host bytes in flight capped at
                 max(largest stored tensor, 4 GB), the default
  new_one_tensor the same, capped at the largest stored tensor (in whole chunks)
  new_uncapped   the same, capped at orbax's own default (96 GB)
  old            the code path before: `SubtreeCheckpoint.read_all()` (the whole decoder as
                 numpy) then `jax.device_put` leaf by leaf (re-implemented here, for comparison)

On one host with 8 CPU "devices", device memory is host memory: every shard of every leaf
lives in this process, so the sharded path's floor is the model once (plus baseline). The old
path holds the full numpy copy and the device copy at once. On a pod (or a GPU host) the new
path's host share is that host's shards plus about one tensor; the old one's is the full model.

  JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/init_restore_memory.py \
      [--layers=8] [--stored_dtype=float32|bfloat16] [--modes=baseline,new,new_uncapped,old]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("baseline", "new", "new_one_tensor", "new_uncapped", "old")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _llama_config(args):
    from earthgpt_jax.models.presets import LlamaConfig
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_layers=args.layers,
                       num_heads=args.heads, num_kv_heads=args.heads)


def abstract_decoder(args):
    """(mesh, {path: ShapeDtypeStruct with its FSDP sharding}) of the decoder, no memory."""
    import flax.linen as nn
    import jax

    from configs import mmrs
    from earthgpt_jax import parallel
    from earthgpt_jax.models.earthgpt import EarthGPT
    from earthgpt_jax.models.presets import get_preset
    from earthgpt_jax.models.earthgpt import abstract_params

    config = mmrs.get_run_config("demo").replace(mesh={"ici": {"data": 1, "fsdp": -1, "tensor": 1}})
    mesh = parallel.build_mesh(config.mesh)
    cfg = dataclasses.replace(get_preset("tiny"), llm=_llama_config(args))
    boxed = abstract_params(EarthGPT(cfg))
    shardings = parallel.shardings_for(boxed, mesh, config.mesh.rules)
    targets = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           nn.unbox(boxed), shardings)
    return mesh, targets["llm"]


def write_checkpoint(out_dir: str, args) -> int:
    import numpy as np
    from flax import traverse_util

    from earthgpt_jax import checkpoints as ckpt_lib

    _, targets = abstract_decoder(args)
    flat = traverse_util.flatten_dict(targets)
    import ml_dtypes
    dtype = np.dtype({"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[args.stored_dtype])
    rng = np.random.default_rng(0)

    def groups():
        for path, t in flat.items():  # one leaf per group: one tensor in memory at a time
            yield [(("llm",) + path,
                    (rng.standard_normal(t.shape, dtype=np.float32) * 0.02).astype(dtype))]

    ckpt_lib.write_params_streaming(out_dir, groups())
    ckpt_lib.save_llama_config(out_dir, _llama_config(args))
    return sum(int(np.prod(t.shape)) * dtype.itemsize for t in flat.values())


def old_restore(ckpt_dir: str, targets: dict) -> dict:
    """The pre-sharded-restore `load_part('llm')`: the whole decoder read as numpy on this host,
    then each leaf cast and `device_put` into its sharding (kept here only for comparison)."""
    import jax
    import numpy as np
    from flax import traverse_util

    from earthgpt_jax import checkpoints as ckpt_lib

    loaded = ckpt_lib.open_llm_checkpoint(ckpt_dir).read_all()
    source = traverse_util.flatten_dict(loaded)
    return {path: jax.device_put(np.asarray(source[path]).astype(t.dtype), t.sharding)
            for path, t in traverse_util.flatten_dict(targets).items()}


def child(mode: str, ckpt_dir: str, args) -> dict:
    import jax
    import numpy as np

    from earthgpt_jax import checkpoints as ckpt_lib

    mesh, targets = abstract_decoder(args)
    jax.block_until_ready(jax.numpy.zeros(8) + 1)  # devices up, as in every mode
    t0 = time.perf_counter()
    if mode == "baseline":
        restored = {}
    elif mode == "old":
        restored = old_restore(ckpt_dir, targets)
    elif mode == "new":
        restored = ckpt_lib.restore_part("llm", ckpt_dir, targets)
    else:
        from flax import traverse_util

        ck = ckpt_lib.open_llm_checkpoint(ckpt_dir)
        restored, _ = ckpt_lib.restore_sharded(
            ck.pytree_dir, ck.prefix, traverse_util.flatten_dict(targets),
            inflight_bytes={"new_one_tensor": 0, "new_uncapped": 96 * 10**9}[mode])
    jax.block_until_ready(restored)
    seconds = time.perf_counter() - t0
    leaves = jax.tree.leaves(restored)
    on_target = all(len(x.sharding.device_set) == mesh.size for x in leaves
                    if x.ndim >= 2 and x.size >= mesh.size * 1024)
    return {"mode": mode, "peak_rss_bytes": _status_bytes("VmHWM"),
            "rss_after_bytes": _status_bytes("VmRSS"), "seconds": seconds,
            "restored_bytes": int(sum(x.nbytes for x in leaves)),
            "leaves": len(leaves), "large_leaves_sharded_over_all_devices": on_target,
            "checksum": float(sum(np.float64(np.asarray(x.addressable_shards[0].data).sum())
                                  for x in leaves)) if leaves else 0.0}


def main():
    sys.path.insert(0, ROOT)
    from benchmarks.convert_memory import add_model_shape_args

    ap = argparse.ArgumentParser()
    add_model_shape_args(ap)
    ap.add_argument("--stored_dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "write":
        _write_child(args)
        return
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.ckpt, args)), flush=True)
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu", NPROC=os.environ.get("NPROC", "16"),
               XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    tmp = tempfile.mkdtemp(prefix="init_restore_memory_", dir=args.tmp)
    flags = [f"--{k}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "vocab",
                                                    "heads", "stored_dtype")]
    runs = []
    try:
        ckpt_dir = os.path.join(tmp, "llm")
        t0 = time.time()
        proc = subprocess.run([sys.executable, __file__, "--child=write", f"--ckpt={ckpt_dir}"]
                              + flags, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-4000:])
        stored = json.loads(proc.stdout.split("RESULT ", 1)[1])
        print(f"synthetic converted checkpoint: {stored['disk_bytes'] / 1e9:.3f} GB on disk, "
              f"{stored['stored_bytes'] / 1e9:.3f} GB of {args.stored_dtype} tensors "
              f"(written in {time.time() - t0:.0f}s)", flush=True)
        for mode in args.modes.split(","):
            proc = subprocess.run([sys.executable, __file__, f"--child={mode}",
                                   f"--ckpt={ckpt_dir}"] + flags, env=env,
                                  capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
            row = json.loads(proc.stdout.split("RESULT ", 1)[1])
            runs.append(row)
            print(f"{mode:13s} peak RSS {row['peak_rss_bytes'] / 1e9:6.2f} GB  "
                  f"(RSS after {row['rss_after_bytes'] / 1e9:5.2f} GB, restored "
                  f"{row['restored_bytes'] / 1e9:.2f} GB in {row['seconds']:.1f}s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _report(args, stored, runs)


def _report(args, stored: dict, runs: list[dict]) -> None:
    import jax
    import orbax.checkpoint as ocp

    by_mode = {r["mode"]: r for r in runs}
    base = by_mode.get("baseline", {}).get("peak_rss_bytes")
    model = max((r["restored_bytes"] for r in runs), default=0)
    summary = {}
    for mode, r in by_mode.items():
        if mode != "baseline" and base:
            summary[mode] = {"peak_over_baseline_gb": (r["peak_rss_bytes"] - base) / 1e9,
                             "peak_over_baseline_in_models": (r["peak_rss_bytes"] - base)
                             / max(model, 1)}
    if "old" in by_mode:
        summary["same_checksum_as_old"] = {m: r["checksum"] == by_mode["old"]["checksum"]
                                           for m, r in by_mode.items()
                                           if m not in ("old", "baseline")}
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "env": {"platform": "cpu", "device_count": 8, "host_cpus": os.cpu_count(),
                "versions": {"jax": jax.__version__, "orbax.checkpoint": ocp.__version__},
                "date": now.strftime("%Y-%m-%d %H:%M:%S UTC")},
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "ckpt")},
        "checkpoint": stored, "model_bytes_in_memory": model, "runs": runs,
        "summary": summary,
        "explanation": (
            "One host, 8 CPU devices: every shard lives in this one process, so device memory "
            "is host memory and the sharded path cannot go below baseline + the model once. "
            "'new' restores each leaf with orbax ArrayRestoreArgs(sharding, global_shape, "
            "dtype) straight into its shards, host bytes in flight capped at max(largest "
            "stored tensor, 4 GB) (new_one_tensor: at the largest tensor; new_uncapped: at "
            "orbax's 96 GB); 'old' reads the whole decoder as numpy, then device_puts it, so "
            "it holds the numpy copy and the device copy together. On a multi-host pod or a "
            "GPU host the new path's host share is only this host's shards plus the in-flight "
            "cap, the old one's is always the whole model (26 GB at 13B bf16) per host. The "
            "one-tensor cap is slower because the converter's chunks (split along the layers "
            "axis) do not line up with FSDP shards: orbax charges every shard read with the "
            "whole leaf, so the reads of one leaf run one at a time."),
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{now:%Y-%m-%d}_init_restore_memory_cpu.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(summary, indent=1))
    print("wrote", path)


def _write_child(args) -> None:
    """--child=write: the synthetic checkpoint, in its own process (its memory is not ours)."""
    bytes_ = write_checkpoint(args.ckpt, args)
    disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.ckpt)
               for f in fs)
    print("RESULT " + json.dumps({"stored_bytes": bytes_, "disk_bytes": disk}), flush=True)


if __name__ == "__main__":
    main()
