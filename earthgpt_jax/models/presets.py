"""Model shapes in one place: the toy `demo` size and LLaMA-2's real 7B/13B shapes, whose
vision towers are DINOv2 ViT-L/14 and CLIP ConvNeXt-L at 448 px with a 16x16 perception grid
(256 visual tokens). `demo` keeps the architecture at a size a laptop CPU trains in minutes.
"""

from __future__ import annotations

import dataclasses
import re


ATTENTION_IMPLS = ("einsum", "xla", "cudnn", "splash", "auto")

# The decoder linears LoRA can adapt (LlamaConfig.lora_targets), by their HF/PEFT module names.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_modules_matching(targets: str) -> tuple[str, ...]:
    """The LORA_MODULES that comma-separated regexes full-match (e.g. "q_proj,v_proj" or
    ".*_proj"). A regex that selects nothing is a ValueError: a typo would otherwise train fewer
    linears than asked for."""
    patterns = [t.strip() for t in targets.split(",") if t.strip()]
    if not patterns:
        raise ValueError(f"LoRA targets {targets!r} name no module; use regexes over "
                         f"{', '.join(LORA_MODULES)}")
    for pattern in patterns:
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"LoRA target {pattern!r} is not a regex: {e}") from None
        if not any(compiled.fullmatch(m) for m in LORA_MODULES):
            raise ValueError(f"LoRA target {pattern!r} matches none of {', '.join(LORA_MODULES)}")
    return tuple(m for m in LORA_MODULES if any(re.fullmatch(p, m) for p in patterns))


# "auto": the flash kernel of the platform the program runs on (TPU: Pallas splash; NVIDIA:
# cuDNN), the einsum elsewhere (CPU, where it is the fastest and the reference).
PLATFORM_ATTENTION = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}


def resolve_attention_impl(impl: str, platform: str) -> str:
    """The kernel `impl` means on `platform` (a jax Device.platform)."""
    return PLATFORM_ATTENTION.get(platform, "einsum") if impl == "auto" else impl


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    mlp_bias: bool = False
    # Stage-B bias/scale adapters (LLaMA-Adapter V2 form) on every decoder linear.
    adapters: bool = False
    # Layers stacked under nn.scan (params `layers/...` with a leading [num_layers] axis) or
    # unrolled (params `layers_0/...`, `layers_1/...`).
    scan_layers: bool = True
    # Attention kernel of cache-less passes, one of ATTENTION_IMPLS: see layers.attention.
    attention_impl: str = "einsum"
    # LoRA on the decoder linears named in lora_targets (a subset of LORA_MODULES): rank 0 is
    # none. y = x W + (alpha / rank) * x A B with A [in, rank], B [rank, out] (PEFT's form).
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_MODULES

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} is not one of "
                             f"{', '.join(ATTENTION_IMPLS)}")
        # model_config.json stores the tuple as a JSON list; jit needs the config hashable.
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        unknown = set(self.lora_targets) - set(LORA_MODULES)
        if unknown or self.lora_rank < 0:
            raise ValueError(f"lora_rank {self.lora_rank} (>= 0) / lora_targets "
                             f"{sorted(unknown)} not in {', '.join(LORA_MODULES)}")

    @property
    def lora_scale(self) -> float:
        """PEFT's `scaling`: the LoRA product's factor."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """DINOv2-style ViT: CLS token, learned position embeddings, pre-LN blocks with LayerScale."""
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    # Blocks whose outputs feed the fusion (DESIGN: 4 evenly spaced blocks).
    feature_layers: tuple[int, ...]
    pretrain_image_size: int = 518
    layer_norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """ConvNeXt trunk (timm/open_clip layout): stem k4s4, four stages at strides 4/8/16/32."""
    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    layer_norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class EarthGPTConfig:
    llm: LlamaConfig
    vit: ViTConfig
    convnext: ConvNeXtConfig
    image_size: int
    grid_size: int  # each feature map is pooled to grid_size x grid_size visual tokens
    grid_pooling: str = "mean"  # mean | max over the cells of that grid
    bos_id: int = 1
    dtype: str = "float32"  # compute dtype; parameters keep their stored dtype
    freeze_vision: bool = True
    remat_policy: str = "none"  # none or a key of llama.REMAT_POLICIES
    # Bands of the images the model reads (uint8 [.., S, S, input_bands]); band_init: how the
    # band adapter (models/bands.py, see `band_adapter`) starts, see `band_init_rows`.
    input_bands: int = 3
    band_init: str = ""

    def __post_init__(self):
        band_init_rows(self.band_init, self.input_bands)  # refuses a bad pair at construction

    @property
    def band_adapter(self) -> bool:
        """Whether a learned 1x1 band projection runs before the towers."""
        return self.input_bands != 3 or bool(self.band_init)

    @property
    def num_visual_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def fused_channels(self) -> int:
        return len(self.vit.feature_layers) * self.vit.hidden_size + sum(self.convnext.dims)


def band_init_rows(band_init: str, input_bands: int) -> tuple[int, int, int] | None:
    """The input band each tower channel (R, G, B) starts from, or None for "mean" (each the
    average of all bands). `band_init` is "mean", "i,j,k" (0-based band indices), or "" for the
    decoder's own 3-band rule (data/images.py): the first three bands, or the first as grey
    below three. ValueError names the config key."""
    if input_bands < 1:
        raise ValueError(f"config.model.input_bands={input_bands} must be >= 1")
    spec = band_init.strip()
    if spec == "mean":
        return None
    if not spec:
        return (0, 1, 2) if input_bands >= 3 else (0, 0, 0)
    try:
        rows = tuple(int(part) for part in spec.split(","))
    except ValueError:
        rows = ()
    if len(rows) != 3 or not all(0 <= r < input_bands for r in rows):
        raise ValueError(f"config.model.band_init={band_init!r} must be 'mean' or three band "
                         f"indices 'r,g,b' in 0..{input_bands - 1} (config.model.input_bands="
                         f"{input_bands})")
    return rows


def get_preset(size: str, *, vocab_size: int | None = None, llm: dict | None = None,
               **overrides) -> EarthGPTConfig:
    """Named model shapes. `vocab_size` overrides the LLM's (the demo trains its own tokenizer),
    `llm` replaces LlamaConfig fields (e.g. {"adapters": True}), `overrides` EarthGPTConfig's."""
    llm_overrides = llm or {}
    if size == "tiny":  # unit tests: the real architecture at the smallest useful size
        llm = LlamaConfig(vocab_size=vocab_size or 512, hidden_size=64, intermediate_size=128,
                          num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=512)
        vit = ViTConfig(patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
                        feature_layers=(0, 1), pretrain_image_size=32)
        convnext = ConvNeXtConfig(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))
        cfg = EarthGPTConfig(llm=llm, vit=vit, convnext=convnext, image_size=32, grid_size=2,
                             freeze_vision=False)
    elif size == "demo":
        llm = LlamaConfig(vocab_size=vocab_size or 512, hidden_size=192, intermediate_size=512,
                          num_layers=4, num_heads=6, num_kv_heads=2, max_position_embeddings=512)
        vit = ViTConfig(patch_size=8, hidden_size=96, num_layers=4, num_heads=4, mlp_dim=256,
                        feature_layers=(0, 1, 2, 3), pretrain_image_size=64)
        convnext = ConvNeXtConfig(dims=(24, 48, 96, 144), depths=(1, 1, 1, 1))
        # Max pooling: the demo's 4x4 grid cells are 16 pixels wide and its targets 3-6.
        cfg = EarthGPTConfig(llm=llm, vit=vit, convnext=convnext, image_size=64, grid_size=4,
                             grid_pooling="max", freeze_vision=False)
    elif size in ("7b", "13b"):
        hidden, inter, layers, heads = {"7b": (4096, 11008, 32, 32),
                                        "13b": (5120, 13824, 40, 40)}[size]
        llm = LlamaConfig(vocab_size=vocab_size or 32000, hidden_size=hidden,
                          intermediate_size=inter, num_layers=layers, num_heads=heads,
                          num_kv_heads=heads)
        vit = ViTConfig(patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                        mlp_dim=4096, feature_layers=(5, 11, 17, 23))  # DINOv2 ViT-L/14
        convnext = ConvNeXtConfig(dims=(192, 384, 768, 1536), depths=(3, 3, 27, 3))  # CLIP L
        cfg = EarthGPTConfig(llm=llm, vit=vit, convnext=convnext, image_size=448, grid_size=16,
                             dtype="bfloat16", remat_policy="full")
    else:
        raise ValueError(f"unknown model size {size!r}; known sizes: tiny, demo, 7b, 13b")
    if llm_overrides:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **llm_overrides))
    return dataclasses.replace(cfg, **overrides)
