"""Building blocks shared by the decoder and the vision towers: linears with logical axes and
the stage-B bias/scale adapter, RMSNorm, rotary embeddings, and `attention`, the decoder's one
attention entry point (unpacked, packed and cached; kernel chosen by `impl`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = jnp.dtype


def logical_param(module: nn.Module, name: str, init, shape, axes, dtype=jnp.float32):
    """A parameter that carries logical axis names, so the config's rules can shard it."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Linear(nn.Module):
    """y = x @ W (+ b), kernel stored [in, out] (torch Linear's transpose).

    With `adapter=True` the output becomes s * (y + b_a), LLaMA-Adapter V2's bias/scale tuning:
    s starts at 1 and b_a at 0, so an adapted model starts as the base model.
    """
    features: int
    kernel_axes: tuple[str | None, str | None]
    use_bias: bool = False
    adapter: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = logical_param(self, "kernel", self.kernel_init, (x.shape[-1], self.features),
                               self.kernel_axes, self.param_dtype)
        # With the adapter the product stays in fp32 until the scale is applied: a bf16 y
        # times a learned scale of 1 + 1e-3 rounds back to y itself (bf16 keeps 8 significant
        # bits), so small stage-B scales would change nothing. MXUs/tensor cores accumulate in
        # fp32 anyway; only the rounding point moves.
        acc = jnp.float32 if self.adapter else None
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=acc)
        out_axis = (self.kernel_axes[1],)
        if self.use_bias:
            bias = logical_param(self, "bias", nn.initializers.zeros, (self.features,), out_axis,
                                 self.param_dtype)
            y = y + bias.astype(y.dtype)
        if self.adapter:
            a_bias = logical_param(self, "adapter_bias", nn.initializers.zeros, (self.features,),
                                   out_axis, self.param_dtype)
            a_scale = logical_param(self, "adapter_scale", nn.initializers.ones,
                                    (self.features,), out_axis, self.param_dtype)
            y = a_scale.astype(jnp.float32) * (y + a_bias.astype(jnp.float32))
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],),
                              (self.axis_name,))
        # Statistics in fp32, as HF's LlamaRMSNorm does, then back to the compute dtype.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed.astype(self.dtype)) * scale.astype(self.dtype)


def rotary_embedding(x, positions, theta: float):
    """Rotate-half RoPE (HF layout), so HF q/k weights load with no permutation.

    x: [B, T, heads, head_dim]; positions: [B, T] integer positions.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def _masked_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v, any kv_heads dividing heads: the einsum kernel.

    q: [B, Tq, H, D]; k, v: [B, S, KV, D]; mask: [B, Tq, S] bool, True where a query may look.
    """
    batch, tq, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, tq, kv_heads, heads // kv_heads, dim)
    # The 1/sqrt(d) scale is applied here, never folded into weights (DESIGN).
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(dim)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, tq, heads, dim)


def _attention_mask(batch, tq, key_valid, segment_ids, cache_slots, cache_index):
    """[B, Tq, S] bool, True where a query may look: causal, and
    - segment_ids: inside the query's own segment, never at segment 0 (padding);
    - otherwise key_valid, and with a cache (S = cache_slots + Tq) the cache's written slots
      before cache_index, then the new keys causally."""
    causal = jnp.tril(jnp.ones((tq, tq), bool))
    if segment_ids is not None:
        return (causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
                & (segment_ids[:, None, :] > 0))
    if cache_slots is None:
        return causal[None] & key_valid[:, None, :]
    earlier = key_valid & (jnp.arange(cache_slots) < cache_index)[None]             # [B, S]
    new_valid = jax.lax.dynamic_slice_in_dim(key_valid, cache_index, tq, axis=1)   # [B, T]
    return jnp.concatenate([jnp.broadcast_to(earlier[:, None], (batch, tq, cache_slots)),
                            causal[None] & new_valid[:, None, :]], axis=2)


def attention(q, k, v, *, impl: str = "einsum", key_valid=None, segment_ids=None, cache=None,
              cache_index=0):
    """The decoder's causal grouped-query attention: every LLaMA forward comes through here.

    q: [B, T, H, D]; k, v: [B, T, KV, D], the T new keys/values (KV divides H). Besides
    causality, a query sees
    - unpacked rows: the keys where key_valid [B, T] (or [B, S] with a cache) is True;
    - packed rows: segment_ids [B, T] int instead of key_valid, only keys of its own segment
      (0 = padding, which no query sees), so no sample sees another's tokens;
    - decoding: cache = (cache_k, cache_v) [B, S, KV, D] too, its slots before cache_index that
      key_valid [B, S] marks (the new slots included). The cache is only read: its slots
      [cache_index, cache_index + T) are stale (the new keys come in as extra columns
      instead), so the caller writes just the T new slots afterwards (one in-place
      dynamic_update_slice for all layers), not a fresh copy of every layer's cache per token.

    impl picks the kernel: "einsum" (ours, the reference: masks the full score matrix) or
    `jax.nn.dot_product_attention`'s "xla"/"cudnn". Unpacked rows hand that one the padding as
    key lengths with its built-in causal mask (cuDNN's flash kernel), so each row's valid keys
    must be a prefix (right padding); packed rows hand it the mask (on cuDNN applied as a bias).
    A decode step's mask (earlier slots, then the new keys causally) is neither, so the cached
    path is always the einsum's.
    """
    if (key_valid is None) == (segment_ids is None):
        raise ValueError("attention: give key_valid (padding) or segment_ids (packed rows)")
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids (packed rows) are for training; decode without them")
    if impl != "einsum" and cache is None and segment_ids is None:
        lengths = jnp.sum(key_valid, axis=1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            key_value_seq_lengths=lengths, implementation=impl)
    batch, tq = q.shape[:2]
    mask = _attention_mask(batch, tq, key_valid, segment_ids,
                           None if cache is None else cache[0].shape[1], cache_index)
    if cache is not None:
        k = jnp.concatenate([cache[0].astype(k.dtype), k], axis=1)
        v = jnp.concatenate([cache[1].astype(v.dtype), v], axis=1)
    if impl == "einsum" or cache is not None:
        return _masked_attention(q, k, v, mask)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)
