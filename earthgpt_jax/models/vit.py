"""DINOv2-style ViT returning the patch tokens of several blocks (multi-layer features).

Numerically matches `transformers.Dinov2Model` (fp32, max |diff| ~1e-6 in tests): conv patch
embedding, CLS token, learned position embeddings resized with torch's bicubic kernel
(a = -0.75, align_corners=False, no antialias, fp32) when the input grid differs from the
pre-training grid, pre-LN blocks with LayerScale, exact GELU, two-pass LayerNorm statistics.
Selected block outputs go through the final LayerNorm, as HF's `Dinov2Backbone` does for its
feature maps. Param names are ours; `earthgpt_jax.convert.vision` maps HF checkpoints onto them.
"""

from __future__ import annotations

import functools

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

from earthgpt_jax.models.layers import logical_param
from earthgpt_jax.models.presets import ViTConfig


def _dense(features, axes, name, dtype):
    return nn.Dense(features, dtype=dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def _layer_norm(eps, dtype, name):
    # Two-pass variance (torch's formula): the fast E[x^2]-E[x]^2 form loses precision on
    # DINOv2's large-magnitude outlier channels.
    return nn.LayerNorm(eps, dtype=dtype, use_fast_variance=False, name=name)


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix W with W @ x == torch's 1-D bicubic resize of x.

    Reproduces `F.interpolate(mode="bicubic", align_corners=False, antialias=False)` with a
    target `size` (scale = in/out): source index (i + 0.5) * scale - 0.5 (not clamped), cubic
    convolution with A = -0.75 over taps floor(src)-1 .. floor(src)+2, border taps clamped.
    Bicubic 2-D resizing is separable, so rows and columns each get one matrix.
    """
    a = np.float32(-0.75)
    scale = np.float32(in_size) / np.float32(out_size)
    mat = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        src = scale * (np.float32(i) + np.float32(0.5)) - np.float32(0.5)
        idx = min(int(np.floor(src)), in_size - 1)
        t = np.float32(min(max(src - np.float32(idx), np.float32(0.0)), np.float32(1.0)))

        def near(x):  # |x| <= 1
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x):  # 1 < |x| < 2
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
        for k, w in enumerate(weights):
            mat[i, min(max(idx - 1 + k, 0), in_size - 1)] += w
    return mat


def resize_position_grid(grid, out_h: int, out_w: int):
    """[1, h, w, C] -> [1, out_h, out_w, C] exactly as torch bicubic (fp32) resizes it."""
    _, h, w, _ = grid.shape
    my = jnp.asarray(torch_bicubic_matrix(h, out_h))
    mx = jnp.asarray(torch_bicubic_matrix(w, out_w))
    hi = jax.lax.Precision.HIGHEST
    out = jnp.einsum("ph,bhwc->bpwc", my, grid.astype(jnp.float32), precision=hi)
    return jnp.einsum("qw,bpwc->bpqc", mx, out, precision=hi)


class ViTBlock(nn.Module):
    cfg: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        batch, tokens, dim = x.shape
        heads, hd = cfg.num_heads, dim // cfg.num_heads
        h = _layer_norm(cfg.layer_norm_eps, self.dtype, "norm1")(x)
        qkv = [_dense(dim, ("vit_embed", "vit_heads"), n, self.dtype)(h).reshape(
            batch, tokens, heads, hd) for n in ("query", "key", "value")]
        # Scales q by 1/sqrt(head_dim), as HF's `scaling = head_dim ** -0.5`.
        attn = nn.dot_product_attention(*qkv, dtype=self.dtype).reshape(batch, tokens, dim)
        attn = _dense(dim, ("vit_heads", "vit_embed"), "attn_out", self.dtype)(attn)
        lambda1 = logical_param(self, "layer_scale1", nn.initializers.ones, (dim,), ("vit_embed",))
        x = x + attn * lambda1.astype(self.dtype)
        h = _layer_norm(cfg.layer_norm_eps, self.dtype, "norm2")(x)
        h = _dense(cfg.mlp_dim, ("vit_embed", "vit_mlp"), "fc1", self.dtype)(h)
        h = _dense(dim, ("vit_mlp", "vit_embed"), "fc2", self.dtype)(nn.gelu(h, approximate=False))
        lambda2 = logical_param(self, "layer_scale2", nn.initializers.ones, (dim,), ("vit_embed",))
        return x + h * lambda2.astype(self.dtype)


class ViT(nn.Module):
    cfg: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, *, all_hidden_states: bool = False):
        """images [B, H, W, 3] normalised -> list of [B, H//p, W//p, hidden] maps.

        The maps are the final-LayerNormed patch tokens (CLS dropped) of `cfg.feature_layers`.
        Any H, W work (trailing pixels that do not fill a patch are dropped, as by HF's conv).
        With `all_hidden_states=True` returns `(maps, hidden_states)`, hidden_states being
        the `num_layers + 1` un-normalised [B, 1 + gh*gw, hidden] sequences (CLS first):
        the embeddings, then every block's output -- HF's `output_hidden_states`.
        """
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
        if (gh, gw) != (pre, pre):
            # HF resizes whenever the grid differs (at equal grids torch's resize is the
            # identity); in fp32, then back to the parameter dtype.
            patch_pos = resize_position_grid(pos[:, 1:].reshape(1, pre, pre, dim), gh, gw)
            pos = jnp.concatenate([pos[:, :1], patch_pos.reshape(1, gh * gw, dim).astype(
                pos.dtype)], axis=1)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, dim)), x], axis=1)
        x = (x + pos).astype(self.dtype)
        final_norm = _layer_norm(cfg.layer_norm_eps, self.dtype, "layernorm")
        hidden_states = [x]
        features = []
        for i in range(cfg.num_layers):
            x = ViTBlock(cfg, self.dtype, name=f"layer_{i}")(x)
            hidden_states.append(x)
            if i in cfg.feature_layers:
                features.append(final_norm(x)[:, 1:].reshape(batch, gh, gw, dim))
        if all_hidden_states:
            return features, hidden_states
        return features
