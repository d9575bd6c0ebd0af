"""Building blocks shared by the decoder and the vision towers: linears with logical axes, the
stage-B bias/scale adapter and LoRA, RMSNorm, rotary embeddings, and `attention`, the decoder's one
attention entry point (unpacked, packed and cached; kernel chosen by `impl`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from earthgpt_jax.models.presets import resolve_attention_impl

Dtype = jnp.dtype


def logical_param(module: nn.Module, name: str, init, shape, axes, dtype=jnp.float32):
    """A parameter that carries logical axis names, so the config's rules can shard it."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Linear(nn.Module):
    """y = x @ W (+ b), kernel stored [in, out] (torch Linear's transpose).

    With `adapter=True` the output becomes s * (y + b_a), LLaMA-Adapter V2's bias/scale tuning:
    s starts at 1 and b_a at 0, so an adapted model starts as the base model.

    With `lora_rank > 0`, LoRA (Hu et al. 2021, PEFT's form): y = x W + lora_scale * (x A) B,
    A [in, rank] PEFT's kaiming-uniform init (U(+-1/sqrt(in))), B [rank, out] zero, so a fresh
    LoRA model is the base model. The LoRA term joins the product before any bias or adapter
    (as if W itself were W + scale * A B), so merging it into W is exact. Dropout on the LoRA
    input is not implemented (the train step has no rng): config.model.lora.dropout must be 0.

    `checkpoint_name` names the product x @ W for remat policies (llama.REMAT_POLICIES). The
    product, not the output: the adapter's scale gradient needs y + b_a, so a policy that kept
    only s * (y + b_a) would still recompute the matmul in the backward pass. The LoRA
    products are left unnamed: recomputing them costs rank * (in + out) per token, ~1% of x W.
    """
    features: int
    kernel_axes: tuple[str | None, str | None]
    use_bias: bool = False
    adapter: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: callable = nn.initializers.lecun_normal()
    checkpoint_name: str | None = None
    lora_rank: int = 0
    lora_scale: float = 0.0

    @nn.compact
    def __call__(self, x):
        kernel = logical_param(self, "kernel", self.kernel_init, (x.shape[-1], self.features),
                               self.kernel_axes, self.param_dtype)
        # With the adapter the product stays in fp32 until the scale is applied: a bf16 y
        # times a learned scale of 1 + 1e-3 rounds back to y itself (bf16 keeps 8 significant
        # bits), so small stage-B scales would change nothing. MXUs/tensor cores accumulate in
        # fp32 anyway; only the rounding point moves.
        # LoRA likewise: a fresh B is zero and grows slowly, and y + delta rounded to bf16 would
        # drop a delta below y's last bit.
        acc = jnp.float32 if self.adapter or self.lora_rank else None
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=acc)
        if self.checkpoint_name:
            y = checkpoint_name(y, self.checkpoint_name)
        if self.lora_rank:
            y = y + self.lora_scale * self._lora(x)
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

    def _lora(self, x):
        """(x A) B in fp32. A's [in, rank] fan-in is `in`: variance_scaling(1/3, fan_in, uniform)
        is torch's kaiming_uniform_(a=sqrt(5)), PEFT's init of lora_A, bound 1/sqrt(in)."""
        a = logical_param(self, "lora_a", nn.initializers.variance_scaling(
            1 / 3, "fan_in", "uniform"), (x.shape[-1], self.lora_rank),
            (self.kernel_axes[0], None), self.param_dtype)
        b = logical_param(self, "lora_b", nn.initializers.zeros,
                          (self.lora_rank, self.features), (None, self.kernel_axes[1]),
                          self.param_dtype)
        xa = jnp.dot(x.astype(self.dtype), a.astype(self.dtype),
                     preferred_element_type=jnp.float32)
        return jnp.dot(xa.astype(self.dtype), b.astype(self.dtype),
                       preferred_element_type=jnp.float32)


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


def _masked_attention(q, k, v, mask, heads_major: bool = False):
    """softmax(q k^T / sqrt(d) + mask) v, any kv_heads dividing heads: the einsum kernel.

    q: [B, Tq, H, D]; k, v: [B, S, KV, D], or [B, KV, S, D] when `heads_major` (a KV cache's
    layout: both dots then have their batch dims b, k leading, so XLA reads the cache in place
    instead of transposing a copy of it per layer and token); mask: [B, Tq, S] bool, True where
    a query may look.
    """
    batch, tq, heads, dim = q.shape
    kv_heads = k.shape[1 if heads_major else 2]
    keys = "bksd" if heads_major else "bskd"
    q = q.reshape(batch, tq, kv_heads, heads // kv_heads, dim)
    # The 1/sqrt(d) scale is applied here, never folded into weights (DESIGN).
    logits = jnp.einsum(f"btkgd,{keys}->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(dim)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{keys}->btkgd", probs, v)
    return out.reshape(batch, tq, heads, dim)


def write_cache(cache, k, v, cache_index):
    """The cache (cache_k, cache_v) [B, KV, S, D] with the T new keys/values k, v [B, T, KV, D]
    written at slots [cache_index, cache_index + T). Attention reads the written cache, so a
    carried per-layer cache is updated in place (reading the old one beside the write would
    make XLA copy it)."""
    return tuple(jax.lax.dynamic_update_slice(c, n.swapaxes(1, 2).astype(c.dtype),
                                              (0, 0, cache_index, 0))
                 for c, n in zip(cache, (k, v)))


def _attention_mask(tq, key_valid, segment_ids, cache_slots, cache_index):
    """[B, Tq, S] bool, True where a query may look: causal, and
    - segment_ids: inside the query's own segment, never at segment 0 (padding);
    - otherwise key_valid; with a cache of S slots, query t sits at slot cache_index + t and
      sees the valid slots up to its own."""
    if segment_ids is not None:
        causal = jnp.tril(jnp.ones((tq, tq), bool))
        return (causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
                & (segment_ids[:, None, :] > 0))
    slots = tq if cache_slots is None else cache_slots
    query_slot = cache_index + jnp.arange(tq)
    causal = jnp.arange(slots)[None, :] <= query_slot[:, None]                     # [T, S]
    return causal[None] & key_valid[:, None, :]


def _splash_block(length: int) -> int:
    """The splash kernel's tile: the largest of 512/256/128 dividing `length` (a multiple of
    128, the TPU lane width its kv tiles must fill). 512 as MaxText's default on v5e/v5p."""
    return next(b for b in (512, 256, 128) if length % b == 0)


def _splash_local(q, k, v, segment_ids, *, interpret: bool):
    """Splash attention on one device's shard: q [B, T, H, D], k/v [B, T, KV, D], segment_ids
    [B, T], T a multiple of 128. One MQA kernel per kv head (its G = H / KV query heads share
    that head's keys), so GQA reads each kv head once instead of repeating it G times."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    block = _splash_block(length)
    blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                               block_q_dkv=block, block_kv_dkv=block,
                               block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # The causal mask is static (numpy, processed at trace time into the block map that lets
    # the kernel skip blocks above the diagonal); segments are the dynamic part.
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * group)
    kernel = splash.make_splash_mqa_single_device(mask=mask, block_sizes=blocks,
                                                  interpret=interpret)
    # The kernel applies no 1/sqrt(d): scale q here (at run time, never into weights: DESIGN).
    q = (q * dim ** -0.5).reshape(batch, length, kv_heads, group, dim)
    q = q.transpose(0, 2, 3, 1, 4)                                   # [B, KV, G, T, D]
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))                 # [B, KV, T, D]

    def one_row(q_row, k_row, v_row, seg):
        ids = splash.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(
            q_row, k_row, v_row)

    out = jax.vmap(one_row)(q, k, v, segment_ids)                    # [B, KV, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim)


def _splash_attention(q, k, v, segment_ids, *, interpret: bool):
    """Causal attention within segments by the TPU splash kernel (Pallas), packed or not.

    Rows are padded to a multiple of 128 positions as segment 0. Unlike the einsum's mask,
    the kernel lets segment-0 (padding) queries see earlier padding keys: every query then
    sees at least itself, so no softmax row is empty (no NaN) and real queries still never
    see padding, whose outputs no loss reads.

    A Pallas call is opaque to XLA's sharding propagation, so under a mesh it runs in a
    shard_map: each device gets its rows (and heads, under tensor parallelism) whole; the
    sequence axis is never split (the kernel cannot split kv).
    """
    length = q.shape[1]
    padded = -(-length // 128) * 128
    if padded != length:
        pad = lambda x: jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, segment_ids = pad(q), pad(k), pad(v), pad(segment_ids)
    local = lambda *a: _splash_local(*a, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        batch_axes, heads_axes, kv_axes = (nn.logical_to_mesh_axes((name,))[0]
                                           for name in ("batch", "heads", "kv_heads"))
        spec = jax.sharding.PartitionSpec
        local = jax.shard_map(
            local, in_specs=(spec(batch_axes, None, heads_axes, None),
                             spec(batch_axes, None, kv_axes, None),
                             spec(batch_axes, None, kv_axes, None), spec(batch_axes, None)),
            out_specs=spec(batch_axes, None, heads_axes, None), check_vma=False)
    return local(q, k, v, segment_ids.astype(jnp.int32))[:, :length]


def packed_runs(segment_ids, max_runs: int):
    """cuDNN's packed (THD) description of rows whose segments are contiguous runs: (lengths
    [B, M], offsets [B, M + 1]), a row's runs in order, -1 past its last (M = max_runs, at
    least the most runs of any row; more are dropped). Trailing padding (segment 0) is a run
    of its own, so every position belongs to one: cuDNN leaves positions outside all runs
    unwritten (garbage, possibly NaN), while a padding run gives finite outputs no loss reads.
    """
    batch, length = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    run = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1                     # [B, T]
    lengths = jax.vmap(lambda r: jnp.bincount(r, length=max_runs))(run).astype(jnp.int32)
    runs = run[:, -1:] + 1                                                    # [B, 1]
    offsets = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32),
                               jnp.cumsum(lengths, axis=1, dtype=jnp.int32)], axis=1)
    offsets = jnp.where(jnp.arange(max_runs + 1) <= runs, offsets, -1)
    return jnp.where(jnp.arange(max_runs) < runs, lengths, -1), offsets


def _cudnn_packed(q, k, v, segment_ids, max_runs: int | None = None):
    """Packed rows on cuDNN's flash kernel with its packed-sequence (THD) layout: causal
    within each run of `packed_runs`, so the kernel skips whole blocks across samples instead
    of reading a dense [B, 1, T, T] mask as a bias. jax.nn.dot_product_attention takes only
    one length per row, so this calls the cuDNN op beneath it (jax._src: pinned by the
    installed jax; Hopper or newer). max_runs None: T, always enough."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    lengths, offsets = packed_runs(segment_ids, max_runs or q.shape[1])
    return cudnn.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
        scale=1.0 / float(q.shape[-1]) ** 0.5, mask_type=cudnn.MaskType.PADDING_CAUSAL)


def attention(q, k, v, *, impl: str = "einsum", key_valid=None, segment_ids=None, cache=None,
              cache_index=0):
    """The decoder's causal grouped-query attention: every LLaMA forward comes through here.

    q: [B, T, H, D]; k, v: [B, T, KV, D], the T new keys/values (KV divides H). Besides
    causality, a query sees
    - unpacked rows: the keys where key_valid [B, T] (or [B, S] with a cache) is True;
    - packed rows: segment_ids [B, T] int instead of key_valid, only keys of its own segment
      (0 = padding, which no query sees), so no sample sees another's tokens;
    - decoding: cache = (cache_k, cache_v) [B, KV, S, D] holding the new keys/values already
      at slots [cache_index, cache_index + T) (`write_cache`); a query sees the slots up to
      its own that key_valid [B, S] marks (the new ones included). k and v are not read again.

    impl picks the kernel (presets.ATTENTION_IMPLS): "einsum" (ours, the reference: masks the
    full score matrix); `jax.nn.dot_product_attention`'s "xla"/"cudnn"; "splash", the TPU
    Pallas flash kernel (segments and causality as block sparsity; unpacked rows become one
    segment per row, padding segment 0); "auto", the platform's best
    (presets.resolve_attention_impl). Unpacked rows hand dot_product_attention the padding as
    key lengths with its built-in causal mask (cuDNN's flash kernel), so each row's valid keys
    must be a prefix (right padding); packed rows hand "xla" the mask and "cudnn" the segments
    as cuDNN's packed (THD) lengths and offsets (`_cudnn_packed`). A decode step's mask
    (earlier slots, then the new keys causally) is none of these, so the cached path is
    always the einsum's.
    """
    if (key_valid is None) == (segment_ids is None):
        raise ValueError("attention: give key_valid (padding) or segment_ids (packed rows)")
    if cache is not None and segment_ids is not None:
        raise ValueError("segment_ids (packed rows) are for training; decode without them")
    impl = resolve_attention_impl(impl, _platform())
    if impl == "splash" and cache is None:
        if segment_ids is None:  # a right-padded row: its valid prefix is segment 1
            segment_ids = key_valid.astype(jnp.int32)
        # Off TPU the kernel runs in Pallas' interpret mode: slow, for tests only.
        return _splash_attention(q, k, v, segment_ids, interpret=_platform() != "tpu")
    if impl in ("xla", "cudnn") and cache is None and segment_ids is None:
        lengths = jnp.sum(key_valid, axis=1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            key_value_seq_lengths=lengths, implementation=impl)
    if impl == "cudnn" and cache is None:
        return _cudnn_packed(q, k, v, segment_ids)
    mask = _attention_mask(q.shape[1], key_valid, segment_ids,
                           None if cache is None else cache[0].shape[2], cache_index)
    if cache is not None:
        return _masked_attention(q, *(c.astype(q.dtype) for c in cache), mask, heads_major=True)
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)
    return _masked_attention(q, k, v, mask)


def _platform() -> str:
    """The platform the traced program runs on: the mesh's (an AOT compile for TPU traces on a
    CPU host under the TPU topology's mesh), else the default device's."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return (device or jax.devices()[0]).platform
