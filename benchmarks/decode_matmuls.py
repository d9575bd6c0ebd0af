"""The floor under a CPU decode step: the step's matmuls alone, XLA against torch.

One decode step of decode_vs_hf.py's 134M LLaMA reads every linear once: per layer q/k/v/o
(768 x 768), gate/up (768 x 2048) and down (2048 x 768), then the LM head (768 x 32000). This
times exactly those products at `--batch` rows, fp32, in one jitted XLA function and in eager
torch (the kernels `generate` runs), best of `--repeats`, alternating. Attention, norms and
RoPE are left out: what remains is the part neither side can skip, so the ratio says how much
of the gap to `generate` is the matmul library's.

  JAX_PLATFORMS=cpu PYTHONPATH=. .venv/bin/python benchmarks/decode_matmuls.py \
      [--batch=8] [--repeats=20] [--layers=12] [--json=PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as decode_vs_hf.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import results  # noqa: E402

HIDDEN, MLP, VOCAB = 768, 2048, 32000


def weights(rng, layers: int):
    """Per layer: 4 attention matrices, gate, up, down; then the head."""
    def draw(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    layers = [([draw(HIDDEN, HIDDEN) for _ in range(4)], draw(HIDDEN, MLP), draw(HIDDEN, MLP),
               draw(MLP, HIDDEN)) for _ in range(layers)]
    return layers, draw(HIDDEN, VOCAB)


def step(x, layers, head, silu):
    """The step's products in order (the residual keeps each layer's input dependent)."""
    for attn, gate, up, down in layers:
        h = x @ attn[0] + x @ attn[1] + x @ attn[2]
        x = x + h @ attn[3]
        x = x + (silu(x @ gate) * (x @ up)) @ down
    return x @ head


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--layers", type=int, default=12, help="12: decode_vs_hf.py's model")
    p.add_argument("--json", default="", help="write the figures here and append them to "
                   "--results_md")
    p.add_argument("--results_md", default=results.RESULTS)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(os.cpu_count())
    layers, head = weights(np.random.default_rng(0), args.layers)
    x = np.random.default_rng(1).standard_normal((args.batch, HIDDEN), np.float32)

    jx = jax.jit(lambda x, layers, head: step(x, layers, head, jax.nn.silu))
    j_args = (jnp.asarray(x), jax.tree.map(jnp.asarray, layers), jnp.asarray(head))
    t_args = (torch.from_numpy(x), jax.tree.map(torch.from_numpy, layers),
              torch.from_numpy(head))
    run_xla = lambda: jx(*j_args).block_until_ready()  # noqa: E731

    def run_torch():
        with torch.inference_mode():
            return step(*t_args, torch.nn.functional.silu)

    want = np.asarray(run_xla())  # warm-up (compile) and the check
    np.testing.assert_allclose(run_torch().numpy(), want, rtol=2e-3, atol=2e-3)
    xla_s, torch_s = [], []
    for _ in range(2):  # alternate, so load falls on both
        xla_s.append(best_of(run_xla, args.repeats // 2))
        torch_s.append(best_of(run_torch, args.repeats // 2))
    command = results.command_line(__file__, argv)
    out = {"command": command, "machine": results.machine(("jax", "jaxlib", "torch")),
           "batch": args.batch, "layers": args.layers,
           "weights_mb": 4 * (args.layers * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP)
                              + HIDDEN * VOCAB) / 1e6,
           "xla_ms": 1e3 * min(xla_s), "torch_ms": 1e3 * min(torch_s)}
    out["xla_over_torch"] = out["xla_ms"] / out["torch_ms"]
    line = (f"batch {args.batch}: the decode step's matmuls ({out['weights_mb']:.0f} MB of "
            f"weights) XLA {out['xla_ms']:.1f} ms, torch {out['torch_ms']:.1f} ms "
            f"(XLA/torch {out['xla_over_torch']:.2f}x)")
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        results.append_section("Decode step matmuls: XLA vs torch", command,
                               results.machine_lines(("jax", "jaxlib", "torch"))
                               + [results.load_line(), "", line, "", f"Raw JSON: {args.json}"],
                               args.results_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
