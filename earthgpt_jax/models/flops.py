"""EarthGPT's accounting, for training logs, AOT reports and benchmarks: parameter counts (of a
params tree, or from the configs alone), model FLOPs of a train step (MFU's numerator), the FLOPs
a jaxpr executes, and peak FLOP/s (MFU's denominator). The formulas need only the configs; jax and
flax are imported by the functions that read params or programs, or run one.

What is counted ("model FLOPs", PaLM-style: what the maths needs, not what a kernel happens to do)

Only matrix products and convolutions; norms, activations, softmax, RoPE, the adapters'
elementwise scale/bias, the embedding gather and the optimizer are left out (each is O(params) or
O(tokens * width), a few percent at most). A multiply-add is 2 FLOPs. N below is a weight count.

* Decoder (LLaMA), per sample of S = 1 + V + T positions (BOS, V visual tokens, T text tokens;
  real tokens only: padding is not model work):
  - forward: 2 * N_layers per position + attention 2 * 2 * (heads * head_dim) per (query, key)
    pair per layer over the causal half, S(S+1)/2 (none of another packed sample's keys)
    + LM head 2 * d * vocab at the T text positions only, whose logits the loss uses (the
    PyTorch reference of benchmarks/ also runs it at the prefix and throws those away).
  - backward, activation gradients: dX = dY W^T per weight matmul (2N) and 2x the attention
    forward. Every stage needs them through the whole decoder: the projector (trainable in
    stages a and b) sits under layer 0.
  - backward, weight gradients: dW = X^T dY (2N) for the stage's trainable matmul weights only
    (STAGE_TRAINED_MATMULS). So a trained weight costs 6N per token, a frozen one 4N.
* Projector, per visual token: forward 2 * C_fused * d, its weight gradient as much (it trains
  in every stage); no input gradient (the fused features are stop_gradient'ed).
* Vision towers (`vit_forward_flops`, `convnext_forward_flops`), per real image (a packed row's
  blank slots are not counted): the forward only when frozen (`freeze_vision`, the default), 3x
  it when trained (activation + weight gradients).

Hardware FLOPs (`executed_train_step_flops`) are what the step runs: padding, blank image slots,
the LM head where the program runs it, the masked half of the scores where the kernel computes
it, flash kernels' score recompute and the remat policy's recompute. MFU = model FLOPs / s /
peak; hardware utilisation = hardware FLOPs / s / peak; the two are reported side by side.

tests/test_flops.py checks, to the FLOP, `executed_train_step_flops` against the train step's
jaxpr (`jaxpr_matmul_flops`) for every remat policy, stages a and b, padded and packed rows;
`model_flops` against it minus padding, blank slots and masked scores; and every committed
result file's model FLOPs against the configuration it stores.
"""

from __future__ import annotations

import timeit

import numpy as np

# Decoder linears a stage trains (mirrors earthgpt_jax.optim.STAGE_TRAINABLE, which is the
# source of truth; tests/test_benchmarks_train.py checks the two agree).
STAGE_TRAINED_MATMULS = {
    "a": ("q_proj", "k_proj", "v_proj"),
    "b": (),  # adapters only: elementwise, no matmul weight gradients
    # LoRA's factors only: their matmuls (rank * (in + out) per token, ~1% of the layers' at
    # rank 16) are left out of these counts, like the adapters' elementwise work.
    "lora": (),
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
            "lm_head"),
}


def _linear_shapes(llm) -> dict[str, tuple[int, int]]:
    """(in, out) features of each per-layer decoder matmul."""
    d, q, kv = llm.hidden_size, llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    i = llm.intermediate_size
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}


def decoder_linears(llm) -> dict[str, int]:
    """Weights of each per-layer decoder matmul ([in * out])."""
    return {name: n_in * n_out for name, (n_in, n_out) in _linear_shapes(llm).items()}


# ----------------------------------------------------------------------------- parameters

PARTS = ("llm", "vit", "convnext", "projector")


def parameter_summary(params, labels=None) -> dict[str, int]:
    """{'llm', 'vit', 'convnext', 'projector', 'adapters', 'total'[, 'trainable',
    'trainable_bytes', 'frozen_bytes']} counts of a params tree (`labels`: optim's trainable
    labels). The bytes are of the leaves' own dtypes: a Trainer stores frozen leaves in
    train.frozen_param_dtype, trainable ones in fp32. `llm` leaves out the decoder's adapters
    (stage B's bias/scale or LoRA's factors), which are counted on their own."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params, sep="/")
    counts = dict.fromkeys(PARTS + ("adapters",), 0)
    for path, value in flat.items():
        key = "adapters" if "/adapter_" in path or "/lora_" in path else path.split("/", 1)[0]
        counts[key] = counts.get(key, 0) + int(value.size)
    counts["total"] = sum(int(v.size) for v in flat.values())
    if labels is not None:
        flat_labels = traverse_util.flatten_dict(labels, sep="/")
        nbytes = {p: int(flat[p].size) * np.dtype(flat[p].dtype).itemsize for p in flat_labels}
        trained = [p for p, label in flat_labels.items() if label == "train"]
        counts["trainable"] = sum(int(flat[p].size) for p in trained)
        counts["trainable_bytes"] = sum(nbytes[p] for p in trained)
        counts["frozen_bytes"] = sum(nbytes.values()) - counts["trainable_bytes"]
    return counts


def format_summary(counts: dict[str, int], stage: str | None = None) -> str:
    parts = [f"{k} {v:,}" for k, v in counts.items()
             if k not in ("total", "trainable") and not k.endswith("_bytes")]
    line = "parameters: " + ", ".join(parts) + f"; total {counts['total']:,}"
    if "trainable" in counts:
        line += f"; trainable in stage {stage}: {counts['trainable']:,}"
    if "frozen_bytes" in counts:
        frozen = counts["total"] - counts["trainable"]
        per = f" ({counts['frozen_bytes'] / frozen:g} bytes each)" if frozen else ""
        line += (f"; stored: trainable {counts['trainable_bytes'] / 1e9:.3f} GB, frozen "
                 f"{counts['frozen_bytes'] / 1e9:.3f} GB{per}")
    return line


def parameter_counts(model_cfg) -> dict[str, int]:
    """`parameter_summary`'s counts (no 'trainable') from the configs alone, no params built
    (tests/test_benchmarks_train.py checks the two agree)."""
    llm, vit, cnx = model_cfg.llm, model_cfg.vit, model_cfg.convnext
    d = llm.hidden_size
    shapes = _linear_shapes(llm)
    outs = {name: n_out for name, (_, n_out) in shapes.items()}
    per_layer = sum(decoder_linears(llm).values()) + 2 * d
    if llm.attention_bias:
        per_layer += sum(outs[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    if llm.mlp_bias:
        per_layer += sum(outs[n] for n in ("gate_proj", "up_proj", "down_proj"))
    counts = {"llm": 2 * llm.vocab_size * d + d + llm.num_layers * per_layer,
              "adapters": 2 * llm.num_layers * sum(outs.values()) if llm.adapters else 0}
    counts["adapters"] += llm.num_layers * llm.lora_rank * sum(
        sum(shapes[n]) for n in llm.lora_targets)
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


# ----------------------------------------------------------------------------- model FLOPs

def vit_forward_flops(vit, image_size: int) -> float:
    """One image through every block of the DINOv2-style ViT (attention bidirectional)."""
    h, m, p = vit.hidden_size, vit.mlp_dim, vit.patch_size
    patches = (image_size // p) ** 2
    tokens = 1 + patches
    block = tokens * (2 * (4 * h * h + 2 * h * m) + 2 * 2 * tokens * h)
    return 2.0 * p * p * 3 * h * patches + vit.num_layers * block


def convnext_forward_flops(cnx, image_size: int) -> float:
    """One image through the ConvNeXt trunk: stem k4s4, then per stage a downsampling conv
    (not the first) and blocks of a depthwise 7x7 conv and two 4x-wide linears."""
    res = image_size // 4
    total = 2.0 * 16 * 3 * cnx.dims[0] * res * res
    prev = cnx.dims[0]
    for stage, (c, depth) in enumerate(zip(cnx.dims, cnx.depths)):
        if stage:
            res //= 2
            total += 2.0 * 4 * prev * c * res * res
        total += depth * res * res * (2.0 * 49 * c + 2.0 * 8 * c * c)
        prev = c
    return total


def _step_flops(model_cfg, stage: str, *, positions, attention_pairs, head_positions, images,
                attention_backward: float = 2.0) -> dict[str, float]:
    """The breakdown of one step from its counts: decoder `positions`, (query, key)
    `attention_pairs` per layer, LM-head `head_positions`, `images` through the towers."""
    if stage not in STAGE_TRAINED_MATMULS:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGE_TRAINED_MATMULS)}")
    llm = model_cfg.llm
    linears = decoder_linears(llm)
    trained = STAGE_TRAINED_MATMULS[stage]
    layers_fwd = 2.0 * llm.num_layers * sum(linears.values()) * positions
    attn_fwd = 2.0 * 2 * llm.num_heads * llm.head_dim * llm.num_layers * attention_pairs
    head_fwd = 2.0 * llm.hidden_size * llm.vocab_size * head_positions
    weight_grads = 2.0 * llm.num_layers * sum(linears[n] for n in trained if n in linears)
    weight_grads *= positions
    if "lm_head" in trained:
        weight_grads += head_fwd
    projector = 2.0 * model_cfg.fused_channels * llm.hidden_size * images * \
        model_cfg.num_visual_tokens
    towers = (1.0 if model_cfg.freeze_vision else 3.0) * images
    out = {
        "decoder_forward": layers_fwd,
        "attention_forward": attn_fwd,
        "lm_head_forward": head_fwd,
        "decoder_backward_activations": layers_fwd + attention_backward * attn_fwd + head_fwd,
        "decoder_weight_gradients": weight_grads,
        "projector_forward_and_weight_gradient": 2.0 * projector,
        "vit": towers * vit_forward_flops(model_cfg.vit, model_cfg.image_size),
        "convnext": towers * convnext_forward_flops(model_cfg.convnext, model_cfg.image_size),
    }
    out["total"] = sum(out.values())
    return out


def model_flops(model_cfg, stage: str, text_lengths) -> dict[str, float]:
    """Model FLOPs (MFU's numerator) of one train step over samples of these numbers of text
    tokens, each [BOS] + V visual + t text positions with one image. How the samples sit in rows
    does not matter: padding, blank image slots and masked scores are work a kernel may do, not
    work the model needs (`executed_train_step_flops` counts them)."""
    text = np.asarray(text_lengths, np.float64).reshape(-1)
    seq = 1.0 + model_cfg.num_visual_tokens + text
    return _step_flops(model_cfg, stage, positions=float(seq.sum()),
                       attention_pairs=float((seq * (seq + 1) / 2).sum()),
                       head_positions=float(text.sum()), images=len(text))


def train_step_flops(model_cfg, batch: int, text_len: int, stage: str, *,
                     packed_length: int | None = None, images_per_row: int = 1,
                     samples_per_row: int | None = None) -> dict[str, float]:
    """`model_flops` of `batch` samples of `text_len` text tokens each, or, with
    `packed_length`, of `batch` packed rows of `samples_per_row` such samples each (default: as
    many as fit, at most `images_per_row`). Real batches have mixed lengths: `batch_model_flops`.
    """
    if packed_length is not None:
        if samples_per_row is None:  # as many as fit, at most one per image slot
            samples_per_row = min(images_per_row,
                                  packed_length // (1 + model_cfg.num_visual_tokens + text_len))
        batch *= samples_per_row
    return model_flops(model_cfg, stage, [text_len] * batch)


def batch_model_flops(model_cfg, stage: str, batch: dict) -> dict[str, float]:
    """`model_flops` of a host batch: padded rows (`valid` [B, T]: each row's text tokens) or
    packed rows (`segment_ids` [B, L], 0 = padding: a segment is [BOS] + V visual + text
    positions). numpy only, cheap enough per step."""
    if "segment_ids" in batch:
        seg = np.asarray(batch["segment_ids"])
        lengths = [np.bincount(row[row > 0]) for row in seg]
        seq = np.concatenate([l[l > 0] for l in lengths]) if lengths else np.zeros(0)
        text = seq - 1 - model_cfg.num_visual_tokens
    else:
        text = np.asarray(batch["valid"]).astype(bool).sum(axis=1)
    return model_flops(model_cfg, stage, text)


# Flash kernels skip the score blocks the causal mask hides entirely (the einsum and XLA paths
# compute the whole score matrix and mask it), and recompute the scores in their backward
# pass: 5 matmuls to the forward's 2.
FLASH_IMPLS = ("cudnn", "splash")


def remat_recomputed(model_cfg, stage: str) -> tuple[set, float]:
    """(linears whose matmul a decoder layer runs again in the backward pass, fraction of the
    attention forward run again) under `model_cfg.remat_policy`: what the backward needs (the
    linears' products where an elementwise op or an adapter reads them, the attention's inputs
    and probabilities) minus what the policy keeps (llama.REMAT_POLICIES)."""
    policy = model_cfg.remat_policy
    if policy == "none":
        return set(), 0.0
    from earthgpt_jax.models.llama import REMAT_SAVED_NAMES
    saved = REMAT_SAVED_NAMES[policy]
    trained = STAGE_TRAINED_MATMULS[stage]
    # The product of down_proj only feeds the residual sum: needed only by an adapter's scale.
    needed = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}
    if model_cfg.llm.adapters:
        needed.add("down_proj")
    linears = {n for n in needed if LINEAR_CHECKPOINT_NAMES[n] not in saved}
    if model_cfg.llm.attention_impl in FLASH_IMPLS:
        return linears, 1.0  # the kernel's residuals (softmax statistics) have no name
    # einsum: the probabilities are never kept (scores again); the kernel's output (values
    # again) only where o_proj recomputes from it or trains its weight.
    out_needed = "o_proj" in linears or "o_proj" in trained
    return linears, 0.5 + (0.5 if out_needed and "attention_out" not in saved else 0.0)


LINEAR_CHECKPOINT_NAMES = {"q_proj": "query_proj", "k_proj": "key_proj", "v_proj": "value_proj",
                           "o_proj": "out_proj", "gate_proj": "mlp_gate", "up_proj": "mlp_up",
                           "down_proj": "mlp_out"}


def executed_train_step_flops(model_cfg, batch: int, text_len: int, stage: str, *,
                              packed_length: int | None = None, images_per_row: int = 1,
                              loss_chunk: int = 0) -> dict[str, float]:
    """Hardware FLOPs of one train step of `train_step_flops`'s layout (hardware utilisation's
    numerator): `batch` rows of 1 + V + text_len positions (LM head at the text), or of
    `packed_length` positions (padding included; LM head at all but the last; all
    `images_per_row` slots through the towers, blank or not). Attention: the full score matrix
    (einsum, xla, cudnn given a packed row's mask as a bias) or its causal half (flash
    kernels), backward 2x the forward (2.5x for flash kernels); plus `remat_recompute`. With a
    `loss_chunk` (config.train.loss_chunk) the LM head runs on whole chunks (the last one
    padded) and again in the backward pass: `loss_chunk_recompute`."""
    llm = model_cfg.llm
    impl = llm.attention_impl
    positions, head_positions, image_slots = (
        (1 + model_cfg.num_visual_tokens + text_len, text_len, 1) if packed_length is None
        else (packed_length, packed_length - 1, images_per_row))
    if loss_chunk:
        head_positions = -(-head_positions // loss_chunk) * loss_chunk
    causal = impl in FLASH_IMPLS and not (impl == "cudnn" and packed_length is not None)
    pairs = positions * (positions + 1) / 2 if causal else positions ** 2
    out = _step_flops(model_cfg, stage, positions=batch * positions,
                      attention_pairs=batch * pairs, head_positions=batch * head_positions,
                      images=batch * image_slots,
                      attention_backward=2.5 if impl in FLASH_IMPLS else 2.0)
    linears, attention_part = remat_recomputed(model_cfg, stage)
    weights = decoder_linears(llm)
    out["remat_recompute"] = (2.0 * llm.num_layers * sum(weights[n] for n in linears)
                              * batch * positions
                              + attention_part * out["attention_forward"])
    out["loss_chunk_recompute"] = out["lm_head_forward"] if loss_chunk else 0.0
    out["total"] += out["remat_recompute"] + out["loss_chunk_recompute"]
    return out


def spec_config(spec: dict):
    """The model config a result file's `flops_spec` names (`flops_for_spec`)."""
    from earthgpt_jax.models.presets import get_preset

    return get_preset(spec["size"], llm={"adapters": spec["stage"] == "b",
                                         "attention_impl": spec.get("attention_impl", "einsum")},
                      remat_policy=spec.get("remat_policy", "none"))


def flops_for_spec(spec: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(model FLOPs, hardware FLOPs) of one train step a result file describes. spec: size
    (presets.get_preset), stage, attention_impl, remat_policy, and either text_length_counts
    ({text tokens: samples}: a stream, no hardware figure) or rows, text_len (text tokens per
    sample, all real), pack_length (0: unpacked), images_per_row, samples_per_row and
    loss_chunk."""
    cfg, stage = spec_config(spec), spec["stage"]
    if "text_length_counts" in spec:
        counts = spec["text_length_counts"]
        return model_flops(cfg, stage, np.repeat([int(k) for k in counts],
                                                 list(counts.values()))), None
    layout = {"packed_length": spec.get("pack_length") or None,
              "images_per_row": spec.get("images_per_row", 1)}
    return (train_step_flops(cfg, spec["rows"], spec["text_len"], stage,
                             samples_per_row=spec.get("samples_per_row"), **layout),
            executed_train_step_flops(cfg, spec["rows"], spec["text_len"], stage, **layout,
                                      loss_chunk=spec.get("loss_chunk", 0)))


# ----------------------------------------------------------------------------- executed FLOPs


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    contract = int(np.prod([lhs[d] for d in lhs_contract]))
    return 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * contract


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape  # kernel
    spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
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
        if name == "cond":
            total += max(inner, default=0.0)
        elif name == "scan":
            total += eqn.params["length"] * sum(inner)
        else:
            total += sum(inner)
    return total


# ----------------------------------------------------------------------------- peaks and MFU

# Dense bf16 peak FLOP/s per device, by `jax.Device.device_kind` (first match wins: "TPU v5
# lite" is a v5e, plain "TPU v5" a v5p). Datasheet figures; MFU in the training logs uses them.
PEAK_BF16_FLOPS_BY_DEVICE_KIND = (
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("B200", 2250e12),
)


def device_peak_flops(device_kind: str) -> float | None:
    """Datasheet bf16 peak of one device, or None when the kind is unknown (e.g. CPU)."""
    return next((peak for name, peak in PEAK_BF16_FLOPS_BY_DEVICE_KIND
                 if name.lower() in device_kind.lower()), None)


def measure_matmul_peak(dtype="float32", n: int = 2048, repeats: int = 10,
                        batch: int = 4) -> float:
    """FLOP/s of the fastest of `repeats` jitted [batch, n, n] @ [n, n] products on jax's
    default device (what this software stack reaches; compile and first run excluded). `batch`
    products per call amortise a call's dispatch and synchronisation: with one 8192^3 product
    per call (~1.4 ms on an H100) they hid 10-20% of the card's peak."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((batch, n, n), np.float32), dtype=dtype)
    b = jnp.asarray(rng.standard_normal((n, n), np.float32), dtype=dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = min(timeit.repeat(lambda: matmul(a, b).block_until_ready(), number=1, repeat=repeats))
    return 2.0 * batch * n ** 3 / best


def mfu(step_flops: float, step_seconds: float, peak_flops_per_s: float) -> float:
    return step_flops / step_seconds / peak_flops_per_s
