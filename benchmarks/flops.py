"""Model FLOPs of an EarthGPT train step, and the measured matmul peak of this machine: MFU.

Shared by the CPU benchmark (`train_vs_torch.py`) and the GPU one (`gpu_bench.py`), so it only
needs numpy and jax (no torch, grain, tfds or ml_collections).

The formula (what is counted, and why) lives in `earthgpt_jax/models/flops.py`; this module
adds what only benchmarks need: parameter counts, FLOPs counted from a jaxpr, the measured
matmul peak.

Checked in tests/test_benchmarks_train.py: `train_step_flops` equals, to
the FLOP, the dot/conv FLOPs of our jitted train step's jaxpr (`jaxpr_matmul_flops`), stages a
and b, and the forward part equals those of the jitted forward.

Peak: the best time of a large square matmul jitted by XLA on the default device
(`measure_matmul_peak`), so MFU is against what this software stack can reach on this machine,
not a datasheet number.
"""

from __future__ import annotations

import time

import numpy as np

from earthgpt_jax.models.flops import (  # noqa: F401  (re-exported for the benchmarks)
    STAGE_TRAINED_MATMULS, convnext_forward_flops, decoder_linears, prefix_logits_flops,
    train_step_flops, vit_forward_flops)

def parameter_counts(model_cfg) -> dict[str, int]:
    """Analytic parameter counts per part, as `earthgpt_jax.models.summary` reports them
    (`llm` without adapters; `adapters` on their own)."""
    llm, vit, cnx = model_cfg.llm, model_cfg.vit, model_cfg.convnext
    d = llm.hidden_size
    linears = decoder_linears(llm)
    outs = {"q_proj": llm.num_heads * llm.head_dim, "k_proj": llm.num_kv_heads * llm.head_dim,
            "v_proj": llm.num_kv_heads * llm.head_dim, "o_proj": d,
            "gate_proj": llm.intermediate_size, "up_proj": llm.intermediate_size,
            "down_proj": d}
    per_layer = sum(linears.values()) + 2 * d
    if llm.attention_bias:
        per_layer += sum(outs[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if llm.mlp_bias:
        per_layer += sum(outs[n] for n in ("gate_proj", "up_proj", "down_proj"))
    counts = {"llm": 2 * llm.vocab_size * d + d + llm.num_layers * per_layer,
              "adapters": 2 * llm.num_layers * sum(outs.values()) if llm.adapters else 0}
    h, m, p = vit.hidden_size, vit.mlp_dim, vit.patch_size
    vit_block = 4 * (h * h + h) + (h * m + m) + (m * h + h) + 2 * 2 * h + 2 * h
    counts["vit"] = (p * p * 3 * h + h + h + (1 + (vit.pretrain_image_size // p) ** 2) * h
                     + vit.num_layers * vit_block + 2 * h)
    conv = 16 * 3 * cnx.dims[0] + cnx.dims[0] + 2 * cnx.dims[0]
    prev = cnx.dims[0]
    for stage, (c, depth) in enumerate(zip(cnx.dims, cnx.depths)):
        if stage:
            conv += 2 * prev + 4 * prev * c + c
        conv += depth * (49 * c + c + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c) + c)
        prev = c
    counts["convnext"] = conv
    counts["projector"] = model_cfg.fused_channels * d + d
    counts["total"] = sum(counts.values())
    return counts


def _dot_flops(eqn) -> float:
    (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    contract = int(np.prod([lhs[d] for d in lhs_contract]))
    return 2.0 * float(np.prod(out)) * contract


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape  # kernel
    dn = eqn.params["dimension_numbers"]
    spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial dims...)
    per_output = float(rhs[spec[1]]) * float(np.prod([rhs[d] for d in spec[2:]]))
    return 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * per_output


def _sub_jaxprs(value):
    from jax.extend import core
    if isinstance(value, core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def jaxpr_matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general and convolution a (closed) jaxpr executes, nested calls
    included: scan bodies count `length` times, `cond` its most expensive branch. What the
    program computes, whether or not the model needs it: compare with `train_step_flops`.
    Opaque kernels (custom calls such as cuDNN attention) are not seen."""
    from jax.extend import core
    if isinstance(jaxpr, core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "while":
            raise ValueError("jaxpr_matmul_flops: a while loop has no static trip count")
        inner = [jaxpr_matmul_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if not inner:
            continue
        if name == "cond":
            total += max(inner)
        elif name == "scan":
            total += eqn.params["length"] * sum(inner)
        else:
            total += sum(inner)
    return total


def measure_matmul_peak(dtype="float32", n: int = 2048, repeats: int = 10,
                        batch: int = 4) -> float:
    """FLOP/s of the fastest of `repeats` jitted [batch, n, n] @ [n, n] products on jax's
    default device (inputs already on the device; compile and first run excluded).

    `batch` products per call amortise the dispatch and synchronisation of a call: with one
    8192^3 product per call (~1.4 ms on an H100) they hid 10-20% of the card's peak.
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((batch, n, n), np.float32), dtype=dtype)
    b = jnp.asarray(rng.standard_normal((n, n), np.float32), dtype=dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * batch * n ** 3 / best


def mfu(step_flops: float, step_seconds: float, peak_flops_per_s: float) -> float:
    return step_flops / step_seconds / peak_flops_per_s
