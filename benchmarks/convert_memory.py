"""Peak host memory of `hf-to-orbax` on a synthetic HF LLaMA checkpoint.

Writes random fp32 LLaMA-shaped tensors (default ~2.1 GB: hidden 2048, intermediate 5504,
8 layers, vocab 32000) as sharded safetensors in a temp dir, runs
`python -m earthgpt_jax.convert hf-to-orbax` in a subprocess, and reports the checkpoint size,
the child's peak RSS (getrusage RUSAGE_CHILDREN ru_maxrss), wall time and the largest single
HF tensor and largest stacked (scanned) tensor.

  JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/convert_memory.py [--layers=8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def write_synthetic(hf_dir: str, hidden: int, inter: int, layers: int, vocab: int, heads: int,
                    shard_bytes: int = 1 << 30) -> dict:
    from safetensors.numpy import save_file

    os.makedirs(hf_dir, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
              "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "torch_dtype": "float32", "rope_scaling": None}
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        for p in ("q", "k", "v", "o"):
            shapes[f"model.layers.{i}.self_attn.{p}_proj.weight"] = (hidden, hidden)
        shapes[f"model.layers.{i}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"model.layers.{i}.mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    rng = np.random.default_rng(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 4
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = shape
        size += nbytes
    shards.append(current)
    weight_map = {}
    for idx, names in enumerate(shards):
        fname = f"model-{idx + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: rng.standard_normal(s, dtype=np.float32) * 0.02 for n, s in names.items()}
        save_file(tensors, os.path.join(hf_dir, fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({n: fname for n in names})
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    largest = max(int(np.prod(s)) * 4 for s in shapes.values())
    per_module = {"gate_proj": inter * hidden, "q_proj": hidden * hidden,
                  "embed": vocab * hidden}
    largest_stacked = max(layers * per_module["gate_proj"], per_module["embed"]) * 4
    return {"largest_tensor": largest, "largest_stacked": largest_stacked}


def add_model_shape_args(ap: argparse.ArgumentParser) -> None:
    """The synthetic decoder's shape flags (about 2.1 GB in fp32 by default), shared with
    benchmarks/init_restore_memory.py so both measure the same model."""
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)


def main():
    ap = argparse.ArgumentParser()
    add_model_shape_args(ap)
    ap.add_argument("--scan_layers", default="true")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="convert_memory_")
    try:
        hf_dir, out_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "orbax")
        t0 = time.time()
        info = write_synthetic(hf_dir, args.hidden, args.intermediate, args.layers, args.vocab,
                               args.heads)
        print(f"synthetic HF checkpoint: {_dir_size(hf_dir) / 1e9:.3f} GB "
              f"(written in {time.time() - t0:.1f}s)")
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
             env.get("PYTHONPATH", "")])
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "earthgpt_jax.convert", "hf-to-orbax",
                        f"--hf_dir={hf_dir}", f"--out_dir={out_dir}",
                        f"--scan_layers={args.scan_layers}"], check=True, env=env)
        elapsed = time.time() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        print(f"orbax checkpoint:        {_dir_size(out_dir) / 1e9:.3f} GB")
        print(f"largest HF tensor:       {info['largest_tensor'] / 1e6:.1f} MB")
        print(f"largest stacked tensor:  {info['largest_stacked'] / 1e6:.1f} MB")
        print(f"hf-to-orbax peak RSS:    {peak / 1e6:.1f} MB (child process, incl. ~interpreter "
              f"+ jax/orbax imports)")
        print(f"hf-to-orbax wall time:   {elapsed:.1f}s")
    finally:
        if args.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
