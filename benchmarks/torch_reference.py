"""The PyTorch / Hugging Face stack a user would otherwise train EarthGPT with: the reference of
`train_vs_torch.py`.

`transformers` LlamaForCausalLM + Dinov2Model + ConvNextModel + an `nn.Linear` projector, with
the fusion of `earthgpt_jax/models/earthgpt.py` written again in torch: each tower's own
normalisation, the final-LayerNormed patch tokens of the ViT's feature blocks and the four
ConvNeXt stage maps, each pooled to the grid, concatenated channel-wise, projected, and placed
after BOS. Loss: cross-entropy over the loss-masked text tokens, averaged over them. Optimizer:
AdamW (torch.optim) after global-norm clipping (torch.nn.utils), the learning rate following
the same warmup + cosine schedule as `earthgpt_jax.optim`.

Stage a trains the projector, q/k/v and the RMSNorm scales; stage b the projector and a bias
and scale on every decoder linear (`AdaptedLinear`: y = s * (W x + b_W + b), s = 1, b = 0 at
start). Frozen towers run under `torch.no_grad()`; frozen weights have requires_grad=False, so
autograd computes no gradient for them.

This module imports no jax: the torch side of the benchmark runs in its own process so its
peak memory is its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

# The towers' pre-training normalisations, as in earthgpt_jax/models/earthgpt.py (the test
# checks the values are equal; importing them would pull jax into this process).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_configs(model_cfg, attn_implementation: str = "sdpa"):
    """(LlamaConfig, Dinov2Config, ConvNextConfig) with the shapes of our EarthGPTConfig."""
    llm, vit, cnx = model_cfg.llm, model_cfg.vit, model_cfg.convnext
    if vit.mlp_dim % vit.hidden_size:
        raise ValueError(f"ViT mlp_dim {vit.mlp_dim} must be a multiple of hidden_size "
                         f"{vit.hidden_size} (Dinov2Config has an integer mlp_ratio)")
    llama = transformers.LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
        head_dim=llm.head_dim, rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta,
        max_position_embeddings=llm.max_position_embeddings,
        attention_bias=llm.attention_bias, mlp_bias=llm.mlp_bias, tie_word_embeddings=False,
        bos_token_id=model_cfg.bos_id, attn_implementation=attn_implementation)
    dinov2 = transformers.Dinov2Config(
        hidden_size=vit.hidden_size, num_hidden_layers=vit.num_layers,
        num_attention_heads=vit.num_heads, mlp_ratio=vit.mlp_dim // vit.hidden_size,
        image_size=vit.pretrain_image_size, patch_size=vit.patch_size,
        layer_norm_eps=vit.layer_norm_eps, attn_implementation=attn_implementation)
    convnext = transformers.ConvNextConfig(
        hidden_sizes=list(cnx.dims), depths=list(cnx.depths), patch_size=4,
        layer_scale_init_value=1.0)  # non-negligible blocks, so the fusion check means something
    return llama, dinov2, convnext


class AdaptedLinear(nn.Module):
    """LLaMA-Adapter V2 bias/scale tuning around a frozen linear: y = s * (linear(x) + b)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.adapter_scale = nn.Parameter(torch.ones(linear.out_features))
        self.adapter_bias = nn.Parameter(torch.zeros(linear.out_features))

    def forward(self, x):
        return self.adapter_scale * (self.linear(x) + self.adapter_bias)


def add_adapters(llama: transformers.LlamaForCausalLM) -> None:
    """Wraps every decoder linear (not the LM head, as ours) in an `AdaptedLinear`."""
    for layer in llama.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in DECODER_LINEARS:
                if hasattr(parent, name):
                    setattr(parent, name, AdaptedLinear(getattr(parent, name)))


def _normalise(images_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 NHWC -> float NCHW normalised with the tower's statistics."""
    x = images_uint8.float() / 255.0
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.permute(0, 3, 1, 2).contiguous()


def pool_to_grid(feature_map: torch.Tensor, grid: int, mode: str, what: str) -> torch.Tensor:
    """[B, h, w, C] -> [B, grid, grid, C], mean or max over equal blocks (ours resizes when the
    grid does not divide the map; the benchmark picks sizes where it does)."""
    batch, h, w, c = feature_map.shape
    if h % grid or w % grid:
        raise ValueError(f"{what}: a {h}x{w} map does not divide into a {grid}x{grid} grid; "
                         f"choose image/patch sizes where every map does")
    blocks = feature_map.reshape(batch, grid, h // grid, grid, w // grid, c)
    return blocks.amax(dim=(2, 4)) if mode == "max" else blocks.mean(dim=(2, 4))


class EarthGPTTorch(nn.Module):
    """EarthGPT as a user of the HF stack would assemble it."""

    def __init__(self, model_cfg, *, adapters: bool = False, llm=None, vit=None, convnext=None):
        super().__init__()
        self.cfg = model_cfg
        llama_cfg, dinov2_cfg, convnext_cfg = hf_configs(model_cfg)
        self.llm = llm if llm is not None else transformers.LlamaForCausalLM(llama_cfg)
        self.vit = vit if vit is not None else transformers.Dinov2Model(dinov2_cfg)
        self.convnext = convnext if convnext is not None else transformers.ConvNextModel(
            convnext_cfg)
        self.projector = nn.Linear(model_cfg.fused_channels, model_cfg.llm.hidden_size)
        if adapters:
            add_adapters(self.llm)

    def fused_features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> the concatenated grid features [B, grid*grid, C_fused]."""
        cfg = self.cfg
        grid, mode = cfg.grid_size, cfg.grid_pooling
        vit_out = self.vit(_normalise(images_uint8, IMAGENET_MEAN, IMAGENET_STD),
                           output_hidden_states=True)
        batch = images_uint8.shape[0]
        gh = images_uint8.shape[1] // cfg.vit.patch_size
        gw = images_uint8.shape[2] // cfg.vit.patch_size
        maps = []
        for i in cfg.vit.feature_layers:  # hidden_states[0] is the embeddings, [i+1] block i
            tokens = self.vit.layernorm(vit_out.hidden_states[i + 1])[:, 1:]
            maps.append((f"vit block {i}", tokens.reshape(batch, gh, gw, -1)))
        cnx_out = self.convnext(_normalise(images_uint8, CLIP_MEAN, CLIP_STD),
                                output_hidden_states=True)
        for s, stage_map in enumerate(cnx_out.hidden_states[1:]):
            maps.append((f"convnext stage {s}", stage_map.permute(0, 2, 3, 1)))
        fused = torch.cat([pool_to_grid(m, grid, mode, what) for what, m in maps], dim=-1)
        return fused.reshape(batch, grid * grid, -1)

    def forward(self, images_uint8, tokens, text_valid):
        """Teacher-forced logits [B, T, vocab]: entry t predicts tokens[:, t]."""
        cfg = self.cfg
        if cfg.freeze_vision:
            with torch.no_grad():
                fused = self.fused_features(images_uint8)
        else:
            fused = self.fused_features(images_uint8)
        visual = self.projector(fused)
        batch, text_len = tokens.shape
        embed = self.llm.get_input_embeddings()
        bos = embed(torch.full((batch, 1), cfg.bos_id, dtype=torch.long))
        x = torch.cat([bos, visual.to(bos.dtype), embed(tokens)], dim=1)
        prefix = torch.ones((batch, 1 + cfg.num_visual_tokens), dtype=torch.bool)
        valid = torch.cat([prefix, text_valid.bool()], dim=1)
        positions = torch.cumsum(valid.long(), dim=1) - 1
        logits = self.llm(inputs_embeds=x, attention_mask=valid.long(),
                          position_ids=positions).logits
        v = cfg.num_visual_tokens
        return logits[:, v:v + text_len]


def load_reference(model_cfg, paths: dict) -> EarthGPTTorch:
    """The reference from Hugging Face checkpoint directories (`from_pretrained`, fp32, SDPA
    attention) and the projector's safetensors file: paths 'hf_llm', 'hf_vit', 'hf_convnext',
    'projector'. Adapters (stage b) are added when `model_cfg.llm.adapters`."""
    from safetensors.torch import load_file

    kwargs = dict(dtype=torch.float32, attn_implementation="sdpa")
    llm = transformers.LlamaForCausalLM.from_pretrained(paths["hf_llm"], **kwargs)
    vit = transformers.Dinov2Model.from_pretrained(paths["hf_vit"], **kwargs)
    convnext = transformers.ConvNextModel.from_pretrained(paths["hf_convnext"],
                                                          dtype=torch.float32)
    model = EarthGPTTorch(model_cfg, adapters=model_cfg.llm.adapters, llm=llm, vit=vit,
                          convnext=convnext)
    model.projector.load_state_dict(load_file(paths["projector"]))
    return model


def masked_cross_entropy(logits, tokens, loss_mask):
    """Mean cross-entropy over the loss-masked tokens (ours: loss_normalization='tokens')."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1),
                         reduction="none").reshape(tokens.shape)
    weights = loss_mask.float()
    return (ce * weights).sum() / weights.sum().clamp(min=1.0)


def trainable_parameters(model: EarthGPTTorch, stage: str) -> list[tuple[str, nn.Parameter]]:
    """Sets requires_grad for `stage` (ours: earthgpt_jax.optim.STAGE_TRAINABLE) and returns
    the trainable (name, parameter) pairs."""
    def trains(name: str) -> bool:
        if name.startswith("projector."):
            return True
        if stage == "a":
            return (name.startswith("llm.") and ("norm.weight" in name or any(
                f"self_attn.{p}." in name for p in ("q_proj", "k_proj", "v_proj"))))
        if stage == "b":
            return name.startswith("llm.") and ".adapter_" in name
        if stage == "all":
            return True
        raise ValueError(f"unknown stage {stage!r}; known: a, b, all")

    chosen = []
    for name, param in model.named_parameters():
        param.requires_grad_(trains(name))
        if param.requires_grad:
            chosen.append((name, param))
    return chosen


def learning_rate(step: int, hp: dict) -> float:
    """optax.warmup_cosine_decay_schedule(0, lr, warmup, decay, lr * end_fraction) at `step`,
    as earthgpt_jax.optim.learning_rate_schedule builds it from the same `config.train` keys."""
    peak, warmup = hp["learning_rate"], hp["warmup_steps"]
    decay = max(hp.get("lr_decay_steps") or hp["num_steps"], warmup + 1)
    end = peak * hp["end_lr_fraction"]
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, decay - warmup) / (decay - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


class TorchTrainer:
    """One train step = forward, masked CE, backward, clip, AdamW, as a HF user writes it."""

    def __init__(self, model: EarthGPTTorch, hp: dict, stage: str):
        """`hp`: the `config.train` keys of our Trainer (a plain dict; see learning_rate)."""
        if hp.get("loss_normalization", "tokens") != "tokens":
            raise ValueError("the reference implements loss_normalization='tokens' only")
        self.model, self.hp = model, hp
        self.params = [p for _, p in trainable_parameters(model, stage)]
        # fused: torch's single-kernel AdamW (CPU supported), its fastest implementation.
        self.opt = torch.optim.AdamW(self.params, lr=learning_rate(0, hp),
                                     betas=(hp["b1"], hp["b2"]), eps=1e-8,
                                     weight_decay=hp["weight_decay"], fused=True)
        self.step_count = 0
        model.train()

    def _loss(self, host_batch: dict):
        batch = {k: torch.from_numpy(np.asarray(v)) for k, v in host_batch.items()}
        logits = self.model(batch["image"], batch["tokens"].long(), batch["valid"])
        return masked_cross_entropy(logits, batch["tokens"].long(), batch["loss_mask"])

    def count_flops(self, host_batch: dict) -> float:
        """FLOPs torch's FlopCounterMode sees in one forward + backward (no update)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            self._loss(host_batch).backward()
        self.opt.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())

    def train_step(self, host_batch: dict) -> float:
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(self.step_count, self.hp)
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(host_batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.hp["grad_clip_norm"])
        self.opt.step()
        self.step_count += 1
        return float(loss.detach())


def measure_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 10) -> float:
    """torch's best FLOP/s on an [n, n] @ [n, n] product with its current thread setting."""
    import time

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(getattr(torch, dtype))
    b = torch.randn(n, n, generator=gen).to(getattr(torch, dtype))
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best
