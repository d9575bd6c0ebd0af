"""EarthGPT's accounting, for training logs, AOT reports and benchmarks: parameter counts
(of a params tree, and from the configs alone), model FLOPs of a train step (MFU's numerator),
the FLOPs a jaxpr executes, and peak FLOP/s (MFU's denominator: the datasheet table, or a
measured matmul). The formulas need nothing but the configs; jax and flax are imported only
by the functions that read params or programs, or run one.

What is counted ("model FLOPs", PaLM-style: what the maths needs, not what a kernel happens to do)

Only matrix products and convolutions; norms, activations, softmax, RoPE, the adapters'
elementwise scale/bias, the embedding gather and the optimizer are left out (each is O(params) or
O(tokens * width), a few percent at most). A multiply-add is 2 FLOPs. N below is a weight count.

* Decoder (LLaMA), per sample of S = 1 + V + T positions (BOS, V visual tokens, T text tokens;
  real tokens only: padding is not model work, `model_flops`):
  - forward: 2 * N_layers per position (q, k, v, o, gate, up, down of every layer)
    + attention 2 * 2 * (heads * head_dim) per (query, key) pair per layer, with the causal
    half of the pairs, S(S+1)/2 (a sample's keys, none of another packed sample's)
    + LM head 2 * d * vocab, only at the T text positions, whose logits the loss uses (ours
    runs the head there alone on padded rows; the PyTorch reference of benchmarks/ also
    computes it at the 1 + V prefix positions and throws those away).
  - backward, activation gradients: one matmul per weight matmul (dX = dY W^T, as many FLOPs as
    its forward: 2N) and two per attention matmul (dS = dO V^T and dQ, dK, dV: 2x the
    attention forward). Every stage needs them through the whole decoder, because the
    projector (trainable in stages a and b) sits under layer 0.
  - backward, weight gradients: 2 * N (dW = X^T dY) for trainable matmul weights only (stage a:
    q/k/v; stage b: none, the adapters are elementwise; stage all: every decoder matmul incl.
    the LM head). So a trained weight costs 6N per token, a frozen one 4N (stage b ~ 4N).
* Projector, per visual token: forward 2 * C_fused * d; weight gradient 2 * C_fused * d (it is
  trainable in every stage); no input gradient (the fused features are stop_gradient'ed).
* Vision towers, per real image (a packed row's blank slots are not counted), forward only
  when frozen (`freeze_vision`, the default):
  - ViT: patch embedding 2 * p^2 * 3 * d per patch; per block and token 2 * (4 d^2 + 2 d m)
    + attention 2 * 2 * n * d (n = 1 + patches, bidirectional); every block runs.
  - ConvNeXt: stem 2 * 16 * 3 * d0 per stride-4 pixel; per stage at r x r: downsampling conv
    2 * 4 * d_prev * d per output pixel, per block 2 * 49 * d (depthwise 7x7) + 2 * 8 d^2.
  Trainable towers (freeze_vision=False) cost 3x their forward: activation + weight gradients.

Hardware FLOPs (`executed_step_flops`, hardware utilisation's numerator) are what the step
runs: padding, blank image slots, the LM head where the program runs it, the masked half of
the score matrix where the kernel computes it (einsum, xla), flash kernels' score recompute,
and the remat policy's recompute (`remat_recomputed`). MFU = model FLOPs / s / peak; hardware
utilisation = hardware FLOPs / s / peak; the two are reported side by side.

Checked in tests/test_flops.py: `executed_step_flops` equals, to the FLOP, the dot/conv FLOPs of
the jitted train step's jaxpr (`jaxpr_matmul_flops`) for every remat policy, stages a and b,
padded and packed rows; `model_flops` equals it minus padding, blank slots and the masked half
of the scores; every committed result file's model FLOPs equal the formula's for the
configuration it stores. `parameter_counts` equals `parameter_summary` of the model's params
(tests/test_benchmarks_train.py).

Peaks: `device_peak_flops` reads one datasheet table (by `jax.Device.device_kind`; aot.py looks
TPU generations up in it too); `measure_matmul_peak` times the best large matmul XLA runs on
this machine, so benchmarks can give MFU against what this software stack reaches.
"""

from __future__ import annotations

import time

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
    labels, 'train' where a stage trains a leaf). The bytes are those of the leaves' own dtypes
    (arrays or ShapeDtypeStructs): a Trainer's frozen leaves are stored in
    train.frozen_param_dtype (2 bytes each in bf16), its trainable ones in fp32.

    `llm` counts the decoder without its adapters (stage B's bias/scale or LoRA's factors),
    which are reported on their own.
    """
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params, sep="/")
    counts = dict.fromkeys(PARTS + ("adapters",), 0)
    for path, value in flat.items():
        part = path.split("/", 1)[0]
        key = "adapters" if "/adapter_" in path or "/lora_" in path else part
        counts[key] = counts.get(key, 0) + int(value.size)
    counts["total"] = sum(int(v.size) for v in flat.values())
    if labels is not None:
        flat_labels = traverse_util.flatten_dict(labels, sep="/")
        counts["trainable"] = sum(int(flat[p].size) for p, l in flat_labels.items()
                                  if l == "train")
        nbytes = lambda p: int(flat[p].size) * np.dtype(flat[p].dtype).itemsize
        counts["trainable_bytes"] = sum(nbytes(p) for p, l in flat_labels.items()
                                        if l == "train")
        counts["frozen_bytes"] = sum(nbytes(p) for p, l in flat_labels.items() if l != "train")
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
    """`parameter_summary`'s counts (no 'trainable') from the configs alone, no params built."""
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
    """One image through every block of the DINOv2-style ViT."""
    h, m, p = vit.hidden_size, vit.mlp_dim, vit.patch_size
    patches = (image_size // p) ** 2
    tokens = 1 + patches
    block = tokens * (2 * (4 * h * h + 2 * h * m) + 2 * 2 * tokens * h)
    return 2.0 * p * p * 3 * h * patches + vit.num_layers * block


def convnext_forward_flops(cnx, image_size: int) -> float:
    """One image through the ConvNeXt trunk (stem + 4 stages)."""
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
    tower_mult = 1.0 if model_cfg.freeze_vision else 3.0
    out = {
        "decoder_forward": layers_fwd,
        "attention_forward": attn_fwd,
        "lm_head_forward": head_fwd,
        "decoder_backward_activations": layers_fwd + attention_backward * attn_fwd + head_fwd,
        "decoder_weight_gradients": weight_grads,
        "projector_forward_and_weight_gradient": 2.0 * projector,
        "vit": tower_mult * images * vit_forward_flops(model_cfg.vit, model_cfg.image_size),
        "convnext": tower_mult * images * convnext_forward_flops(model_cfg.convnext,
                                                                 model_cfg.image_size),
    }
    out["total"] = sum(out.values())
    return out


def model_flops(model_cfg, stage: str, text_lengths) -> dict[str, float]:
    """Model FLOPs (MFU's numerator) of one train step over samples with these numbers of text
    tokens (padding excluded): each sample is [BOS] + V visual + t text positions, attends
    causally within itself (S(S+1)/2 query-key pairs), runs the LM head at its t text
    positions and one image through the towers. How the samples sit in rows (padded or
    packed) does not matter: padding, blank image slots and the masked half of a score matrix
    are work a kernel may do, not work the model needs (`executed_step_flops` counts them)."""
    text = np.asarray(text_lengths, np.float64).reshape(-1)
    seq = 1.0 + model_cfg.num_visual_tokens + text
    return _step_flops(model_cfg, stage, positions=float(seq.sum()),
                       attention_pairs=float((seq * (seq + 1) / 2).sum()),
                       head_positions=float(text.sum()), images=len(text))


def train_step_flops(model_cfg, batch: int, text_len: int, stage: str, *,
                     packed_length: int | None = None, images_per_row: int = 1,
                     samples_per_row: int | None = None) -> dict[str, float]:
    """Model FLOPs (`model_flops`) of one train step of `batch` samples with `text_len` text
    tokens each, all of them real (no padding); 'total' is the sum of the parts.

    Packed rows (`packed_length` given): `batch` rows, each holding `samples_per_row` such
    samples (default: as many as fit, at most `images_per_row`); the rest of the row and the
    blank image slots are padding, which model FLOPs leave out. A training run's real
    batches have mixed lengths: count them with `batch_model_flops`.
    """
    if packed_length is not None:
        if samples_per_row is None:  # as many as fit, at most one per image slot
            samples_per_row = min(images_per_row,
                                  packed_length // (1 + model_cfg.num_visual_tokens + text_len))
        batch *= samples_per_row
    return model_flops(model_cfg, stage, [text_len] * batch)


def batch_model_flops(model_cfg, stage: str, batch: dict) -> dict[str, float]:
    """`model_flops` of a host batch as the pipeline delivers it: padded rows (`valid` [B, T]:
    each row's text tokens) or packed rows (`segment_ids` [B, L], 0 = padding: each segment is
    one sample of [BOS] + V visual + text positions). numpy only, cheap enough per step."""
    if "segment_ids" in batch:
        seg = np.asarray(batch["segment_ids"])
        lengths = [np.bincount(row[row > 0]) for row in seg]
        seq = np.concatenate([l[l > 0] for l in lengths]) if lengths else np.zeros(0)
        text = seq - 1 - model_cfg.num_visual_tokens
    else:
        text = np.asarray(batch["valid"]).astype(bool).sum(axis=1)
    return model_flops(model_cfg, stage, text)


# Attention kernels that skip the score blocks the causal mask hides entirely (flash kernels);
# the einsum and XLA paths compute the whole score matrix and mask it. Flash kernels recompute
# the scores in their backward pass: 5 matmuls to the forward's 2.
CAUSAL_SKIPPING_IMPLS = ("cudnn", "splash")
FLASH_IMPLS = ("cudnn", "splash")


def remat_recomputed(model_cfg, stage: str) -> tuple[set, float]:
    """What a decoder layer recomputes in the backward pass under `model_cfg.remat_policy`:
    (names of the linears whose matmul runs again, fraction of the attention forward run
    again). Derived from what the backward needs (the linears' products where an elementwise
    op or an adapter reads them, the attention's inputs and probabilities) minus what the
    policy keeps (llama.REMAT_POLICIES); tests/test_flops.py checks it against the jaxpr."""
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


def executed_step_flops(model_cfg, stage: str, *, rows: int, row_positions: int,
                        head_positions: int, image_slots: int = 1,
                        packed: bool = False) -> dict[str, float]:
    """Hardware FLOPs of one train step: the matmuls the step runs, what the model needs or
    not (hardware utilisation's numerator; `model_flops` is MFU's). `rows` rows of
    `row_positions` positions, padding included; the LM head at `head_positions` per row;
    every one of `image_slots` per row through the towers, blank or not. Attention: the full
    score matrix (einsum, xla, cudnn given a `packed` row's mask as a bias), or its causal
    half (flash kernels that skip masked blocks), backward 2x the forward (2.5x for flash kernels, which
    recompute the scores); plus `remat_recompute`, the forward work the remat policy does
    again in the backward pass (`remat_recomputed`)."""
    llm = model_cfg.llm
    impl = llm.attention_impl
    causal = impl in CAUSAL_SKIPPING_IMPLS and not (impl == "cudnn" and packed)
    pairs = row_positions * (row_positions + 1) / 2 if causal else row_positions ** 2
    out = _step_flops(model_cfg, stage, positions=rows * row_positions,
                      attention_pairs=rows * pairs, head_positions=rows * head_positions,
                      images=rows * image_slots,
                      attention_backward=2.5 if impl in FLASH_IMPLS else 2.0)
    linears, attention_part = remat_recomputed(model_cfg, stage)
    weights = decoder_linears(llm)
    out["remat_recompute"] = (2.0 * llm.num_layers * sum(weights[n] for n in linears)
                              * rows * row_positions
                              + attention_part * out["attention_forward"])
    out["total"] += out["remat_recompute"]
    return out


def executed_train_step_flops(model_cfg, batch: int, text_len: int, stage: str, *,
                              packed_length: int | None = None,
                              images_per_row: int = 1) -> dict[str, float]:
    """`executed_step_flops` of `train_step_flops`'s layouts: `batch` rows of 1 + V + text_len
    positions (LM head at the text_len), or of `packed_length` positions (LM head at all but
    the last, `images_per_row` slots)."""
    if packed_length is None:
        return executed_step_flops(model_cfg, stage, rows=batch,
                                   row_positions=1 + model_cfg.num_visual_tokens + text_len,
                                   head_positions=text_len)
    return executed_step_flops(model_cfg, stage, rows=batch, row_positions=packed_length,
                               head_positions=packed_length - 1, image_slots=images_per_row,
                               packed=True)


def spec_config(spec: dict):
    """The model config a result file's `flops_spec` names (`flops_for_spec`)."""
    from earthgpt_jax.models.presets import get_preset

    return get_preset(spec["size"], llm={"adapters": spec["stage"] == "b",
                                         "attention_impl": spec.get("attention_impl", "einsum")},
                      remat_policy=spec.get("remat_policy", "none"))


def flops_for_spec(spec: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(model FLOPs, hardware FLOPs) of one train step a result file describes.

    spec: size (presets.get_preset), stage, and either text_length_counts ({text tokens:
    samples}: model FLOPs of that stream, no hardware figure) or rows, text_len (text tokens
    per sample, all real),
    pack_length (0: one sample per row of 1 + V + text_len positions), images_per_row and
    samples_per_row (packed rows), attention_impl, remat_policy. Benchmarks write it beside
    their figures; tests/test_flops.py recomputes every committed result file with it.
    """
    cfg = spec_config(spec)
    if "text_length_counts" in spec:  # a stream of samples ({text tokens: count}), no layout
        lengths = np.repeat([int(k) for k in spec["text_length_counts"]],
                            list(spec["text_length_counts"].values()))
        return model_flops(cfg, spec["stage"], lengths), None
    stage, rows, text_len = spec["stage"], spec["rows"], spec["text_len"]
    pack = spec.get("pack_length") or None
    images = spec.get("images_per_row", 1)
    model = train_step_flops(cfg, rows, text_len, stage, packed_length=pack,
                             images_per_row=images, samples_per_row=spec.get("samples_per_row"))
    hardware = executed_train_step_flops(cfg, rows, text_len, stage, packed_length=pack,
                                         images_per_row=images)
    return model, hardware


# ----------------------------------------------------------------------------- executed FLOPs


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    contract = int(np.prod([lhs[d] for d in lhs_contract]))
    return 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * contract


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


# ----------------------------------------------------------------------------- peaks and MFU

# Dense bf16 peak FLOP/s per device, by `jax.Device.device_kind` (first match wins: "TPU v5
# lite" is a v5e, plain "TPU v5" a v5p). Datasheet figures; MFU in the training logs uses them.
PEAK_BF16_FLOPS_BY_DEVICE_KIND = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("B200", 2250e12),
)


def device_peak_flops(device_kind: str) -> float | None:
    """Datasheet bf16 peak of one device, or None when the kind is unknown (e.g. CPU)."""
    for name, peak in PEAK_BF16_FLOPS_BY_DEVICE_KIND:
        if name.lower() in device_kind.lower():
            return peak
    return None


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
