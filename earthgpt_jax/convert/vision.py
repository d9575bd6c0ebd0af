"""Vision-tower weight import: HF / timm / open_clip state dicts -> our Flax param trees.

Pure numpy. A state dict is a mapping name -> array (`safetensors.numpy.load_file`, or a torch
`state_dict()` with `.numpy()` applied). The mappers return nested dicts shaped exactly like
`ViT(cfg).init(...)["params"]` / `ConvNeXt(cfg).init(...)["params"]` (unboxed).

Layout rules: torch Conv2d [out, in, kh, kw] -> Flax [kh, kw, in, out] (a depthwise [C, 1, 7, 7]
becomes [7, 7, 1, C]); Linear [out, in] -> [in, out]; LayerNorm weight -> `scale`.

Every missing tensor, shape mismatch (expected vs found, in the checkpoint's own layout) and
unexpected leftover tensor under the model's prefix raises `VisionConversionError` naming it.
Tensors that do not take part in the features we compute (DINOv2's mask token, classification
heads, ConvNeXt's pooled-output norm, timm's `head.*` / `norm_pre.*`) are ignored, as is
anything outside the detected prefix (e.g. open_clip's text tower).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Mapping

import numpy as np

from earthgpt_jax.models.presets import ConvNeXtConfig, ViTConfig


class VisionConversionError(ValueError):
    """A checkpoint does not fit the config: names the offending tensor(s)."""


# ----------------------------------------------------------------------------- helpers


def _find_prefix(state: Mapping[str, np.ndarray], anchors: tuple[str, ...], what: str):
    """The prefix P such that P + anchor is a key, for exactly one (anchor, P)."""
    hits = [(anchor, key[: len(key) - len(anchor)]) for key in state for anchor in anchors
            if key == anchor or key.endswith("." + anchor)]
    if not hits:
        raise VisionConversionError(
            f"no {what} found: expected a tensor named like {' or '.join(map(repr, anchors))} "
            f"(optionally prefixed); first keys: {sorted(state)[:8]}")
    if len(set(hits)) > 1:
        raise VisionConversionError(
            f"ambiguous {what} checkpoint: candidates {sorted(set(hits))}; pass prefix=")
    return hits[0]


class _Reader:
    """Takes tensors by (prefix-relative) name, checking shapes and recording what was used."""

    def __init__(self, state, prefix, dtype):
        self.state, self.prefix, self.dtype = state, prefix, dtype
        self.used: set[str] = set()

    def has(self, name):
        return self.prefix + name in self.state

    def take(self, name, shape):
        full = self.prefix + name
        if full not in self.state:
            raise VisionConversionError(f"missing tensor {full!r} (expected shape {tuple(shape)})")
        arr = np.asarray(self.state[full])
        if tuple(arr.shape) != tuple(shape):
            raise VisionConversionError(
                f"tensor {full!r}: expected shape {tuple(shape)}, found {tuple(arr.shape)}")
        self.used.add(full)
        return arr.astype(self.dtype) if self.dtype is not None else arr

    # torch layouts -> flax layouts
    def linear(self, name, d_in, d_out):
        return {"kernel": self.take(f"{name}.weight", (d_out, d_in)).T.copy(),
                "bias": self.take(f"{name}.bias", (d_out,))}

    def conv(self, name, d_in, d_out, k, groups=1):
        w = self.take(f"{name}.weight", (d_out, d_in // groups, k, k))
        return {"kernel": w.transpose(2, 3, 1, 0).copy(),
                "bias": self.take(f"{name}.bias", (d_out,))}

    def pointwise(self, name, d_in, d_out):  # a 1x1 conv [out, in, 1, 1] as a linear
        w = self.take(f"{name}.weight", (d_out, d_in, 1, 1))
        return {"kernel": w[:, :, 0, 0].T.copy(), "bias": self.take(f"{name}.bias", (d_out,))}

    def norm(self, name, dim):
        return {"scale": self.take(f"{name}.weight", (dim,)),
                "bias": self.take(f"{name}.bias", (dim,))}

    def check_leftovers(self, ignore: tuple[str, ...], what: str):
        patterns = [re.compile(p) for p in ignore]
        left = sorted(
            k for k in self.state
            if k.startswith(self.prefix) and k not in self.used
            and not any(p.search(k[len(self.prefix):]) for p in patterns))
        if left:
            more = f" (+{len(left) - 10} more)" if len(left) > 10 else ""
            raise VisionConversionError(
                f"unexpected {what} tensors not covered by the config: {left[:10]}{more}")


def _require_settings(config: Mapping, model: str, **wanted) -> None:
    """Each setting at its wanted value (which is also its default when absent)."""
    for key, want in wanted.items():
        found = config.get(key, want)
        if found != want:
            raise VisionConversionError(f"{model} config {key}={found!r} unsupported "
                                        f"(need {want!r})")


# ----------------------------------------------------------------------------- DINOv2 ViT

_DINOV2_ANCHOR = "embeddings.patch_embeddings.projection.weight"
_DINOV2_IGNORE = (r"^embeddings\.mask_token$",)


def _default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """4 evenly spaced blocks ending with the last (24 layers -> 5, 11, 17, 23)."""
    return tuple(sorted({max(0, math.ceil((k + 1) * num_layers / 4) - 1) for k in range(4)}))


def vit_config_from_hf(config_json: Mapping, feature_layers=None) -> ViTConfig:
    """ViTConfig from an HF `Dinov2Config` dict (config.json). Rejects variants we do not
    implement (SwiGLU FFN, register tokens, approximate GELU, no qkv bias, non-RGB)."""
    c = dict(config_json)
    model_type = c.get("model_type", "dinov2")
    if model_type not in ("dinov2",):
        raise VisionConversionError(f"expected a dinov2 config, got model_type={model_type!r}")
    _require_settings(c, "Dinov2", use_swiglu_ffn=False, hidden_act="gelu", qkv_bias=True,
                      num_register_tokens=0, num_channels=3)
    image_size, patch = c.get("image_size", 224), c.get("patch_size", 14)
    for what, value in (("pre-training image_size", image_size), ("patch_size", patch)):
        if isinstance(value, (list, tuple)) and len(set(value)) != 1:
            raise VisionConversionError(f"non-square {what} {value}")
    image_size, patch = (v[0] if isinstance(v, (list, tuple)) else v for v in (image_size, patch))
    hidden, layers = c.get("hidden_size", 768), c.get("num_hidden_layers", 12)
    if feature_layers is None:
        feature_layers = _default_feature_layers(layers)
    feature_layers = tuple(int(i) for i in feature_layers)
    if any(not 0 <= i < layers for i in feature_layers):
        raise VisionConversionError(f"feature_layers {feature_layers} outside 0..{layers - 1}")
    return ViTConfig(patch_size=int(patch), hidden_size=int(hidden), num_layers=int(layers),
                     num_heads=int(c.get("num_attention_heads", 12)),
                     mlp_dim=int(hidden * c.get("mlp_ratio", 4)), feature_layers=feature_layers,
                     pretrain_image_size=int(image_size),
                     layer_norm_eps=float(c.get("layer_norm_eps", 1e-6)))


def dinov2_params_from_hf(state: Mapping[str, np.ndarray], cfg: ViTConfig, *, prefix=None,
                          dtype=None) -> dict:
    """HF Dinov2 state dict (`Dinov2Model`, or `dinov2.`-prefixed from models with heads;
    hub names `attention.attention.query` / `attention.output.dense` or transformers-5
    in-memory names `attention.q_proj` / `attention.o_proj`) -> `ViT(cfg)` params."""
    if prefix is None:
        _, prefix = _find_prefix(state, (_DINOV2_ANCHOR,), "Dinov2")
    r = _Reader(state, prefix, dtype)
    d, p = cfg.hidden_size, cfg.patch_size
    n_pos = 1 + (cfg.pretrain_image_size // p) ** 2
    params = {
        "patch_embed": r.conv("embeddings.patch_embeddings.projection", 3, d, p),
        "cls_token": r.take("embeddings.cls_token", (1, 1, d)),
        "position_embeddings": r.take("embeddings.position_embeddings", (1, n_pos, d)),
        "layernorm": r.norm("layernorm", d),
    }
    for i in range(cfg.num_layers):
        b = f"encoder.layer.{i}."
        if r.has(b + "attention.q_proj.weight"):
            q, k, v, o = (b + f"attention.{n}_proj" for n in "qkvo")
        else:
            q, k, v = (b + f"attention.attention.{n}" for n in ("query", "key", "value"))
            o = b + "attention.output.dense"
        params[f"layer_{i}"] = {
            "norm1": r.norm(b + "norm1", d),
            "query": r.linear(q, d, d), "key": r.linear(k, d, d), "value": r.linear(v, d, d),
            "attn_out": r.linear(o, d, d),
            "layer_scale1": r.take(b + "layer_scale1.lambda1", (d,)),
            "norm2": r.norm(b + "norm2", d),
            "fc1": r.linear(b + "mlp.fc1", d, cfg.mlp_dim),
            "fc2": r.linear(b + "mlp.fc2", cfg.mlp_dim, d),
            "layer_scale2": r.take(b + "layer_scale2.lambda1", (d,)),
        }
    r.check_leftovers(_DINOV2_IGNORE, "Dinov2")
    return params


# ----------------------------------------------------------------------------- ConvNeXt

_HF_ANCHOR = "embeddings.patch_embeddings.weight"
_TIMM_ANCHOR = "stem.0.weight"
_CONVNEXT_IGNORE = {
    "hf": (r"^layernorm\.", r"^classifier\."),
    "timm": (r"^head\.", r"^norm_pre\.", r"^fc\.", r"\.num_batches_tracked$"),
}
# Names relative to the prefix: (stem conv, stem norm, downsample norm/conv of stage s,
# block b of stage s, and the block's dwconv / norm / fc1 / fc2 / layer scale).
_NAMES = {
    "hf": dict(stem_conv="embeddings.patch_embeddings", stem_norm="embeddings.layernorm",
               down_norm="encoder.stages.{s}.downsampling_layer.0",
               down_conv="encoder.stages.{s}.downsampling_layer.1",
               block="encoder.stages.{s}.layers.{b}.", dw="dwconv", norm="layernorm",
               fc1="pwconv1", fc2="pwconv2", gamma="layer_scale_parameter"),
    "timm": dict(stem_conv="stem.0", stem_norm="stem.1", down_norm="stages.{s}.downsample.0",
                 down_conv="stages.{s}.downsample.1", block="stages.{s}.blocks.{b}.",
                 dw="conv_dw", norm="norm", fc1="mlp.fc1", fc2="mlp.fc2", gamma="gamma"),
}


def detect_convnext_naming(state: Mapping[str, np.ndarray], prefix=None):
    """("hf" | "timm", prefix). HF: optional `convnext.`; timm/open_clip: e.g. `visual.trunk.`."""
    if prefix is not None:
        for naming, anchor in (("hf", _HF_ANCHOR), ("timm", _TIMM_ANCHOR)):
            if prefix + anchor in state:
                return naming, prefix
        raise VisionConversionError(
            f"no ConvNeXt stem under prefix {prefix!r} ({prefix + _HF_ANCHOR!r} or "
            f"{prefix + _TIMM_ANCHOR!r})")
    anchor, prefix = _find_prefix(state, (_HF_ANCHOR, _TIMM_ANCHOR), "ConvNeXt")
    return ("hf" if anchor == _HF_ANCHOR else "timm"), prefix


def convnext_config_from_hf(config_json: Mapping) -> ConvNeXtConfig:
    """ConvNeXtConfig from an HF `ConvNextConfig` dict. HF hard-codes eps 1e-6 in every
    LayerNorm of the trunk (`config.layer_norm_eps` is only its pooled head norm's)."""
    c = dict(config_json)
    _require_settings(c, "ConvNext", num_stages=4, patch_size=4, hidden_act="gelu",
                      num_channels=3)
    if c.get("layer_scale_init_value", 1e-6) <= 0:
        raise VisionConversionError("ConvNext without layer scale (layer_scale_init_value <= 0) "
                                    "is unsupported")
    dims = tuple(int(x) for x in c.get("hidden_sizes", (96, 192, 384, 768)))
    depths = tuple(int(x) for x in c.get("depths", (3, 3, 9, 3)))
    if len(dims) != 4 or len(depths) != 4:
        raise VisionConversionError(f"need 4 stages, got hidden_sizes={dims} depths={depths}")
    return ConvNeXtConfig(dims=dims, depths=depths, layer_norm_eps=1e-6)


def convnext_config_from_state(state: Mapping[str, np.ndarray], *,
                               prefix=None) -> ConvNeXtConfig:
    """Infer dims/depths from the tensors (for timm/open_clip checkpoints without an HF config)."""
    naming, prefix = detect_convnext_naming(state, prefix)
    names = _NAMES[naming]

    def dwconv(s, b):
        return prefix + names["block"].format(s=s, b=b) + names["dw"] + ".weight"

    dims, depths = [], []
    for s in range(4):
        if dwconv(s, 0) not in state:
            raise VisionConversionError(f"missing tensor {dwconv(s, 0)!r} (stage {s} block 0)")
        dims.append(int(np.shape(state[dwconv(s, 0)])[0]))
        depths.append(next(b for b in itertools.count() if dwconv(s, b) not in state))
    return ConvNeXtConfig(dims=tuple(dims), depths=tuple(depths), layer_norm_eps=1e-6)


def convnext_params_from_state(state: Mapping[str, np.ndarray], cfg: ConvNeXtConfig, *,
                               prefix=None, dtype=None) -> dict:
    """HF (`ConvNextModel`, optional `convnext.` prefix) or timm/open_clip (optional
    `visual.trunk.` prefix) ConvNeXt state dict -> `ConvNeXt(cfg)` params. Naming detected."""
    naming, prefix = detect_convnext_naming(state, prefix)
    n = _NAMES[naming]
    r = _Reader(state, prefix, dtype)
    params = {"stem_conv": r.conv(n["stem_conv"], 3, cfg.dims[0], 4),
              "stem_norm": r.norm(n["stem_norm"], cfg.dims[0])}
    prev = cfg.dims[0]
    for s, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths)):
        if s > 0:
            params[f"stage{s}_down_norm"] = r.norm(n["down_norm"].format(s=s), prev)
            params[f"stage{s}_down_conv"] = r.conv(n["down_conv"].format(s=s), prev, dim, 2)
        for b in range(depth):
            blk = n["block"].format(s=s, b=b)
            fc1, fc2 = blk + n["fc1"], blk + n["fc2"]
            conv_mlp = naming == "timm" and np.ndim(state.get(prefix + fc1 + ".weight", ())) == 4
            linear = r.pointwise if conv_mlp else r.linear  # timm conv_mlp=True: 1x1 convs
            params[f"stage{s}_block{b}"] = {
                "dwconv": r.conv(blk + n["dw"], dim, dim, 7, groups=dim),
                "norm": r.norm(blk + n["norm"], dim),
                "pwconv1": linear(fc1, dim, 4 * dim), "pwconv2": linear(fc2, 4 * dim, dim),
                "gamma": r.take(blk + n["gamma"], (dim,)),
            }
        prev = dim
    r.check_leftovers(_CONVNEXT_IGNORE[naming], f"ConvNeXt ({naming} naming)")
    return params
