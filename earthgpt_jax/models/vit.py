"""DINOv2-style ViT returning the patch tokens of several blocks (multi-layer features).

Matches the layout of `transformers.Dinov2Model`: conv patch embedding, CLS token, learned
position embeddings (bicubically resized when the input grid differs from pre-training),
pre-LN blocks with LayerScale; selected block outputs go through the final LayerNorm, as
HF's `Dinov2Backbone` does for its feature maps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from earthgpt_jax.models.layers import logical_param
from earthgpt_jax.models.presets import ViTConfig


def _dense(features, axes, name, dtype):
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


class ViTBlock(nn.Module):
    cfg: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        batch, tokens, dim = x.shape
        heads, hd = cfg.num_heads, dim // cfg.num_heads
        h = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm1")(x)
        qkv = [_dense(dim, ("vit_embed", "vit_heads"), n, self.dtype)(h).reshape(
            batch, tokens, heads, hd) for n in ("query", "key", "value")]
        attn = nn.dot_product_attention(*qkv, dtype=self.dtype).reshape(batch, tokens, dim)
        attn = _dense(dim, ("vit_heads", "vit_embed"), "attn_out", self.dtype)(attn)
        lambda1 = logical_param(self, "layer_scale1", nn.initializers.ones, (dim,), ("vit_embed",))
        x = x + attn * lambda1.astype(self.dtype)
        h = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="norm2")(x)
        h = _dense(cfg.mlp_dim, ("vit_embed", "vit_mlp"), "fc1", self.dtype)(h)
        h = _dense(dim, ("vit_mlp", "vit_embed"), "fc2", self.dtype)(nn.gelu(h, approximate=False))
        lambda2 = logical_param(self, "layer_scale2", nn.initializers.ones, (dim,), ("vit_embed",))
        return x + h * lambda2.astype(self.dtype)


class ViT(nn.Module):
    cfg: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        """images [B, H, W, 3] normalised -> list of [B, H/p, W/p, hidden] maps."""
        cfg = self.cfg
        p = cfg.patch_size
        x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    name="patch_embed",
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), (None, None, None, "vit_embed")))(images)
        batch, gh, gw, dim = x.shape
        x = x.reshape(batch, gh * gw, dim)
        cls = logical_param(self, "cls_token", nn.initializers.normal(0.02), (1, 1, dim),
                            (None, None, "vit_embed"))
        pre = cfg.pretrain_image_size // p
        pos = logical_param(self, "position_embeddings", nn.initializers.normal(0.02),
                            (1, 1 + pre * pre, dim), (None, None, "vit_embed"))
        patch_pos = pos[:, 1:].reshape(1, pre, pre, dim)
        if (gh, gw) != (pre, pre):
            patch_pos = jax.image.resize(patch_pos, (1, gh, gw, dim), method="bicubic")
        pos = jnp.concatenate([pos[:, :1], patch_pos.reshape(1, gh * gw, dim)], axis=1)
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, dim)), x], axis=1)
        x = (x + pos).astype(self.dtype)
        final_norm = nn.LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="layernorm")
        features = []
        for i in range(cfg.num_layers):
            x = ViTBlock(cfg, self.dtype, name=f"layer_{i}")(x)
            if i in cfg.feature_layers:
                features.append(final_norm(x)[:, 1:].reshape(batch, gh, gw, dim))
        return features
