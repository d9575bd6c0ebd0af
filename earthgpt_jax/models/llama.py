"""LLaMA-2 decoder: RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU, untied head.

Layers are stacked with `nn.scan` over a leading `layers` axis (training), or unrolled into
`layers_0`, `layers_1`, ... (decoding, `generate.unrolled_for_decoding`). The KV cache is explicit
and functional, so decoding is a pure function the generation loop can carry: one (k, v) pair of
`[layers, B, kv_heads, S, head_dim]` arrays for scanned layers, a (k, v) pair of
`[B, kv_heads, S, head_dim]` per layer for unrolled ones (`init_cache`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from earthgpt_jax.models.layers import Linear, RMSNorm, attention, rotary_embedding, write_cache
from earthgpt_jax.models.presets import LlamaConfig

# Activations a remat policy can keep by name (`checkpoint_name`): the products of q/k/v (before
# any adapter: layers.Linear), the attention kernel's output, and the products of o_proj and
# of the MLP's three linears.
CHECKPOINT_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out", "out_proj",
                    "mlp_gate", "mlp_up", "mlp_out")
_QKV = ("query_proj", "key_proj", "value_proj")
_LINEARS = _QKV + ("out_proj", "mlp_gate", "mlp_up", "mlp_out")

# MaxText-style policies: what a remat'd layer keeps for the backward pass (the rest, but the
# layer's input, is recomputed there); "none" (no remat) keeps everything. models/flops.py
# counts what each recomputes (hardware FLOPs).
REMAT_SAVED_NAMES = {
    "full": (),                                          # recompute the whole layer
    # every dot without batch dims (the linears' products), not the attention's einsums
    "dots_saveable": _LINEARS,
    "save_qkv_proj": _QKV,                               # recompute o_proj, attention, MLP
    "save_attn_out": _QKV + ("attention_out",),          # + keep the attention's output
    "save_dot_except_mlp": _QKV + ("attention_out", "out_proj"),  # recompute the MLP only
    "minimal": CHECKPOINT_NAMES,                         # recompute elementwise ops (+ scores)
}
REMAT_POLICIES = {name: jax.checkpoint_policies.save_only_these_names(*saved)
                  for name, saved in REMAT_SAVED_NAMES.items() if saved}
REMAT_POLICIES["full"] = None  # nn.remat's default: nothing saveable
REMAT_POLICIES["dots_saveable"] = jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims


class DecoderLayer(nn.Module):
    cfg: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    def _linear(self, features, axes, name, use_bias, checkpoint):
        cfg = self.cfg
        rank = cfg.lora_rank if name in cfg.lora_targets else 0
        return Linear(features, axes, use_bias=use_bias, adapter=cfg.adapters,
                      dtype=self.dtype, checkpoint_name=checkpoint, lora_rank=rank,
                      lora_scale=cfg.lora_scale, name=name)

    @nn.compact
    def __call__(self, x, cache, positions, key_valid, cache_index, segment_ids=None):
        cfg = self.cfg
        batch, tq, _ = x.shape
        hd = cfg.head_dim
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        q = self._linear(cfg.num_heads * hd, ("embed", "heads"), "q_proj", cfg.attention_bias,
                         "query_proj")(h)
        k = self._linear(cfg.num_kv_heads * hd, ("embed", "kv_heads"), "k_proj",
                         cfg.attention_bias, "key_proj")(h)
        v = self._linear(cfg.num_kv_heads * hd, ("embed", "kv_heads"), "v_proj",
                         cfg.attention_bias, "value_proj")(h)
        q = rotary_embedding(q.reshape(batch, tq, cfg.num_heads, hd), positions, cfg.rope_theta)
        k = rotary_embedding(k.reshape(batch, tq, cfg.num_kv_heads, hd), positions,
                             cfg.rope_theta)
        v = v.reshape(batch, tq, cfg.num_kv_heads, hd)
        if cache is not None:
            cache = write_cache(cache, k, v, cache_index)
        attn = attention(q, k, v, impl=cfg.attention_impl, key_valid=key_valid,
                         segment_ids=segment_ids, cache=cache, cache_index=cache_index)
        # Unrolled: the layer's written cache. Scanned: only the new slots' k/v, which
        # LlamaDecoder writes into the stacked cache once for all layers (the layer's `cache`
        # is a copied slice of it; returning it whole would rewrite the full cache per token).
        new_kv = cache
        if cache is not None and cfg.scan_layers:
            new_kv = tuple(jax.lax.dynamic_slice_in_dim(c, cache_index, tq, axis=2)
                           for c in cache)
        attn = nn.with_logical_constraint(attn, ("batch", "length", "heads", None))
        attn = checkpoint_name(attn, "attention_out")
        x = x + self._linear(cfg.hidden_size, ("heads", "embed"), "o_proj", cfg.attention_bias,
                             "out_proj")(attn.reshape(batch, tq, -1))
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        gate = self._linear(cfg.intermediate_size, ("embed", "mlp"), "gate_proj", cfg.mlp_bias,
                            "mlp_gate")(h)
        up = self._linear(cfg.intermediate_size, ("embed", "mlp"), "up_proj", cfg.mlp_bias,
                          "mlp_up")(h)
        x = x + self._linear(cfg.hidden_size, ("mlp", "embed"), "down_proj", cfg.mlp_bias,
                             "mlp_out")(nn.silu(gate) * up)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        # Kept only when the caller asks for it (mutable=['intermediates']): layer-by-layer checks.
        self.sow("intermediates", "hidden_state", x)
        return x, new_kv


class LlamaDecoder(nn.Module):
    """Token embedding, scanned decoder layers, final norm and LM head."""
    cfg: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        ("vocab", "embed")))
        layer = DecoderLayer
        if self.remat_policy != "none":
            if self.remat_policy not in REMAT_POLICIES:
                raise ValueError(f"unknown remat_policy {self.remat_policy!r}; "
                                 f"known: none, {', '.join(REMAT_POLICIES)}")
            layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat_policy],
                             prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.dtype, name="layers")
        else:
            self.layers = [layer(cfg, self.dtype, name=f"layers_{i}")
                           for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")
        self.lm_head = Linear(cfg.vocab_size, ("embed", "vocab"), dtype=self.dtype,
                              name="lm_head")

    def embed(self, tokens):
        return self.embed_tokens(tokens)

    def head(self, hidden):
        """Final-norm hidden states [..., E] -> fp32 logits [..., V]."""
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, embeddings, positions, key_valid, cache=None, cache_index=0,
                 head_from: int = 0, head_to: int | None = None, segment_ids=None,
                 return_hidden: bool = False):
        """embeddings [B,T,E] -> (logits [B,head_to-head_from,V] fp32, new cache or None).

        The LM head runs only at positions [head_from, head_to): EarthGPT's training forward
        skips the image prefix, whose next-token predictions no loss reads (6% of a ~100M
        model's step FLOPs). `segment_ids` [B,T] (packed rows, no cache) replace `key_valid`:
        attention stays inside each segment. `return_hidden` returns the final-norm hidden
        states there instead of logits, for a loss that applies `head` a chunk at a time.
        """
        x = nn.with_logical_constraint(embeddings.astype(self.dtype), ("batch", "length", "embed"))
        if self.cfg.scan_layers:
            x, new_kv = self.layers(x, cache, positions, key_valid, cache_index, segment_ids)
            # Only the new slots [cache_index, cache_index + T) of every layer are written: in a
            # decode loop XLA updates the carried cache in place.
            new_cache = None if cache is None else tuple(
                jax.lax.dynamic_update_slice(c, n, (0, 0, 0, cache_index, 0))
                for c, n in zip(cache, new_kv))
        else:
            # Each layer reads and writes its own (k, v) in place: a slice of a stacked cache
            # would be a copy per layer and token (on CPU and GPU alike).
            new_cache = []
            for i, layer in enumerate(self.layers):
                x, layer_cache = layer(x, None if cache is None else cache[i], positions,
                                       key_valid, cache_index, segment_ids)
                new_cache.append(layer_cache)
            new_cache = None if cache is None else tuple(new_cache)
        hidden = self.norm(x[:, head_from:head_to])
        return (hidden if return_hidden else self.head(hidden)), new_cache


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype=jnp.float32):
    """An empty KV cache of `length` slots in the layout `cfg.scan_layers` decodes with."""
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    if cfg.scan_layers:
        shape = (cfg.num_layers,) + shape
        return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                 for _ in range(cfg.num_layers))


def select_cache_rows(cfg: LlamaConfig, cache, rows):
    """The cache of batch rows `rows` (an index array; repeats allowed): beams' parents."""
    axis = 1 if cfg.scan_layers else 0
    return jax.tree.map(lambda c: jnp.take(c, rows, axis=axis), cache)
