"""ConvNeXt trunk returning the four stage outputs (strides 4/8/16/32), as CLIP ConvNeXt-L's
timm trunk (and `transformers.ConvNextModel`) computes them.

Numerically matches `transformers.ConvNextModel`'s stage outputs (fp32): stem conv k4s4 +
LayerNorm, stages 1-3 open with LayerNorm + conv k2s2, blocks are depthwise 7x7 conv ->
LayerNorm -> Linear(4C) -> exact GELU -> Linear(C) -> layer scale -> residual. Every LayerNorm
uses eps `cfg.layer_norm_eps` (1e-6, as HF's and timm's; HF's `config.layer_norm_eps` only
applies to its pooled head norm) with two-pass variance. `earthgpt_jax.convert.vision` loads HF
or timm/open_clip checkpoints onto these param names."""

from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from earthgpt_jax.models.layers import logical_param
from earthgpt_jax.models.presets import ConvNeXtConfig


def _layer_norm(eps, dtype, name):
    return nn.LayerNorm(eps, dtype=dtype, use_fast_variance=False, name=name)


def _kernel(axes):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


class ConvNeXtBlock(nn.Module):
    dim: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.dim, (7, 7), padding=3, feature_group_count=self.dim, dtype=self.dtype,
                    kernel_init=_kernel((None, None, None, "conv_out")), name="dwconv")(x)
        h = _layer_norm(self.eps, self.dtype, "norm")(h)
        h = nn.Dense(4 * self.dim, dtype=self.dtype, kernel_init=_kernel(("conv_in", "conv_mlp")),
                     name="pwconv1")(h)
        h = nn.Dense(self.dim, dtype=self.dtype, kernel_init=_kernel(("conv_mlp", "conv_in")),
                     name="pwconv2")(nn.gelu(h, approximate=False))
        gamma = logical_param(self, "gamma", nn.initializers.constant(1e-6), (self.dim,),
                              ("conv_in",))
        return x + h * gamma.astype(self.dtype)


class ConvNeXt(nn.Module):
    cfg: ConvNeXtConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        """images [B, H, W, 3] normalised -> four maps at strides 4, 8, 16, 32."""
        cfg = self.cfg
        x = nn.Conv(cfg.dims[0], (4, 4), strides=(4, 4), padding="VALID", dtype=self.dtype,
                    kernel_init=_kernel((None, None, None, "conv_out")), name="stem_conv")(images)
        x = _layer_norm(cfg.layer_norm_eps, self.dtype, "stem_norm")(x)
        features = []
        for stage, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths)):
            if stage > 0:
                x = _layer_norm(cfg.layer_norm_eps, self.dtype, f"stage{stage}_down_norm")(x)
                x = nn.Conv(dim, (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                            kernel_init=_kernel((None, None, None, "conv_out")),
                            name=f"stage{stage}_down_conv")(x)
            for block in range(depth):
                x = ConvNeXtBlock(dim, cfg.layer_norm_eps, self.dtype,
                                  name=f"stage{stage}_block{block}")(x)
            features.append(x)
        return features
