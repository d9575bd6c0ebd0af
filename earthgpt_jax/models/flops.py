"""Model FLOPs of an EarthGPT train step: MFU's numerator, for training logs, AOT reports and
benchmarks (so it needs nothing but the configs).

What is counted ("model FLOPs", PaLM-style: what the maths needs, not what a kernel happens to do)

Only matrix products and convolutions; norms, activations, softmax, RoPE, the adapters'
elementwise scale/bias, the embedding gather and the optimizer are left out (each is O(params) or
O(tokens * width), a few percent at most). A multiply-add is 2 FLOPs. N below is a weight count.

* Decoder (LLaMA), per sequence position (S = 1 + V + T: BOS, V visual tokens, T text tokens,
  padding included because the step computes on it):
  - forward: 2 * N_layers (q, k, v, o, gate, up, down of every layer)
    + attention 2 * 2 * S * (heads * head_dim) per layer (QK^T and AV against all S keys: the
    causal mask is applied to a full score matrix, not exploited, by the einsum attention
    and the reference, so it is counted in full, not halved)
    + LM head 2 * d * vocab, only at the T text positions, whose logits the loss uses (ours
    runs the head there alone; the PyTorch reference of benchmarks/ also computes it at the
    1 + V prefix positions and throws those away: `prefix_logits_flops`, not model FLOPs).
  - backward, activation gradients: one matmul per weight matmul (dX = dY W^T, as many FLOPs as
    its forward: 2N) and two per attention matmul (dS = dO V^T and dQ, dK, dV: 2x the
    attention forward). Every stage needs them through the whole decoder, because the
    projector (trainable in stages a and b) sits under layer 0.
  - backward, weight gradients: 2 * N (dW = X^T dY) for trainable matmul weights only (stage a:
    q/k/v; stage b: none, the adapters are elementwise; stage all: every decoder matmul incl.
    the LM head). So a trained weight costs 6N per token, a frozen one 4N (stage b ~ 4N).
* Projector, per visual token: forward 2 * C_fused * d; weight gradient 2 * C_fused * d (it is
  trainable in every stage); no input gradient (the fused features are stop_gradient'ed).
* Vision towers, per image, forward only when frozen (`freeze_vision`, the default):
  - ViT: patch embedding 2 * p^2 * 3 * d per patch; per block and token 2 * (4 d^2 + 2 d m)
    + attention 2 * 2 * n * d (n = 1 + patches, bidirectional); every block runs.
  - ConvNeXt: stem 2 * 16 * 3 * d0 per stride-4 pixel; per stage at r x r: downsampling conv
    2 * 4 * d_prev * d per output pixel, per block 2 * 49 * d (depthwise 7x7) + 2 * 8 d^2.
  Trainable towers (freeze_vision=False) cost 3x their forward: activation + weight gradients.

Checked in tests/test_benchmarks_train.py: `train_step_flops` equals, to the FLOP, the dot/conv
FLOPs of our jitted train step's jaxpr, stages a and b.
"""

from __future__ import annotations

# Decoder linears a stage trains (mirrors earthgpt_jax.optim.STAGE_TRAINABLE, which is the
# source of truth; tests/test_benchmarks_train.py checks the two agree).
STAGE_TRAINED_MATMULS = {
    "a": ("q_proj", "k_proj", "v_proj"),
    "b": (),  # adapters only: elementwise, no matmul weight gradients
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
            "lm_head"),
}


def decoder_linears(llm) -> dict[str, int]:
    """Weights of each per-layer decoder matmul ([in * out])."""
    d, q, kv = llm.hidden_size, llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    i = llm.intermediate_size
    return {"q_proj": d * q, "k_proj": d * kv, "v_proj": d * kv, "o_proj": q * d,
            "gate_proj": d * i, "up_proj": d * i, "down_proj": i * d}


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


def train_step_flops(model_cfg, batch: int, text_len: int, stage: str, *,
                     packed_length: int | None = None, images_per_row: int = 1
                     ) -> dict[str, float]:
    """Model FLOPs of one train step of `batch` examples with `text_len` text tokens each,
    broken down by part; 'total' is their sum. See the module docstring for the formula.

    Packed rows (`packed_length` positions, `images_per_row` image slots each; `text_len` is
    then unused): S = packed_length, every slot's image runs through the towers and the
    projector, and the LM head runs at S - 1 positions (which of them are answers is data).
    """
    if stage not in STAGE_TRAINED_MATMULS:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGE_TRAINED_MATMULS)}")
    llm = model_cfg.llm
    d, vocab = llm.hidden_size, llm.vocab_size
    visual = model_cfg.num_visual_tokens
    if packed_length is None:
        seq, head_positions, images = 1 + visual + text_len, text_len, 1
    else:
        seq, head_positions, images = packed_length, packed_length - 1, images_per_row
    positions = batch * seq
    linears = decoder_linears(llm)
    trained = STAGE_TRAINED_MATMULS[stage]
    layers_fwd = 2.0 * llm.num_layers * sum(linears.values()) * positions
    attn_fwd = 2.0 * 2 * seq * llm.num_heads * llm.head_dim * llm.num_layers * positions
    head_fwd = 2.0 * d * vocab * batch * head_positions
    weight_grads = 2.0 * llm.num_layers * sum(linears[n] for n in trained if n in linears)
    weight_grads *= positions
    if "lm_head" in trained:
        weight_grads += head_fwd
    projector = 2.0 * model_cfg.fused_channels * d * batch * images * visual
    tower_mult = 1.0 if model_cfg.freeze_vision else 3.0
    batch_images = batch * images
    out = {
        "decoder_forward": layers_fwd,
        "attention_forward": attn_fwd,
        "lm_head_forward": head_fwd,
        "decoder_backward_activations": layers_fwd + 2.0 * attn_fwd + head_fwd,
        "decoder_weight_gradients": weight_grads,
        "projector_forward_and_weight_gradient": 2.0 * projector,
        "vit": tower_mult * batch_images * vit_forward_flops(model_cfg.vit,
                                                             model_cfg.image_size),
        "convnext": tower_mult * batch_images * convnext_forward_flops(model_cfg.convnext,
                                                                       model_cfg.image_size),
    }
    out["total"] = sum(out.values())
    return out


def prefix_logits_flops(model_cfg, batch: int, stage: str) -> float:
    """FLOPs the PyTorch reference (benchmarks/torch_reference.py) spends on LM-head logits at
    the 1 + V prefix positions, which no loss uses: forward, input gradient, and the weight
    gradient when the head trains. Ours runs the head at the text positions only."""
    per_position = 2.0 * model_cfg.llm.hidden_size * model_cfg.llm.vocab_size
    passes = 3 if "lm_head" in STAGE_TRAINED_MATMULS[stage] else 2
    return passes * per_position * batch * (1 + model_cfg.num_visual_tokens)


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
