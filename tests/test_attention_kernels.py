"""Flash-attention paths for packed rows, checked against the einsum reference on CPU: TPU splash
(Pallas interpret mode), cuDNN's packed layout (its segment description; cuDNN itself needs a
GPU), and fully padded rows giving no NaN."""

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
import pytest

from earthgpt_jax.models import layers
from earthgpt_jax.models.presets import resolve_attention_impl

# Segments 1..3 then padding; a row of padding only (an empty pack slot). 200 positions: not
# a multiple of the kernel's 128-wide tiles, so the padding to 256 is exercised too.
LENGTH = 200


def _segments():
    row = np.zeros(LENGTH, np.int32)
    row[:70], row[70:71], row[71:150] = 1, 2, 3
    return np.stack([row, np.zeros(LENGTH, np.int32)])


def _qkv(heads=4, kv_heads=2, dim=16):
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = [(2, LENGTH, heads, dim), (2, LENGTH, kv_heads, dim), (2, LENGTH, kv_heads, dim)]
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]


def _loss(impl, seg, real):
    """Output and q/k/v gradients of a loss that reads only real (non-padding) positions."""
    def f(q, k, v):
        out = layers.attention(q, k, v, impl=impl, segment_ids=seg)
        return jnp.sum(jnp.where(real[..., None, None], out, 0.0) ** 2), out
    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)


def test_splash_matches_einsum_on_packed_rows_with_gqa():
    seg = _segments()
    real = seg > 0
    q, k, v = _qkv()
    (_, ref), ref_grads = _loss("einsum", seg, real)(q, k, v)
    (_, out), grads = _loss("splash", seg, real)(q, k, v)
    assert np.isfinite(np.asarray(out)).all()  # the padding row included
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)
    for g, r in zip(grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, r, atol=5e-5)


def test_splash_shards_rows_under_a_mesh():
    """Under a mesh the kernel runs per device in a shard_map (rows split over fsdp)."""
    seg = _segments()
    q, k, v = _qkv()
    ref = layers.attention(q, k, v, impl="einsum", segment_ids=seg)
    # Auto axes, as parallel.build_mesh's: sharding propagation leaves the shard_map to us.
    mesh = jax.make_mesh((2,), ("fsdp",), devices=jax.devices()[:2],
                         axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", "fsdp")]):
        out = jax.jit(lambda *a: layers.attention(*a, impl="splash", segment_ids=seg))(q, k, v)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)


def test_splash_on_unpacked_rows_reads_key_valid_as_one_segment():
    q, k, v = _qkv()
    valid = np.arange(LENGTH)[None] < np.array([[LENGTH], [37]])
    ref = layers.attention(q, k, v, impl="einsum", key_valid=valid)
    out = layers.attention(q, k, v, impl="splash", key_valid=valid)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=2e-5)


def test_packed_runs_describe_the_segment_mask():
    """cuDNN's packed layout (lengths, offsets per run, padding its own run) means the same
    mask as the segment ids on real positions; runs past a row's last are -1."""
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0] * 8], np.int32)
    lengths, offsets = jax.jit(layers.packed_runs, static_argnums=1)(seg, 5)
    np.testing.assert_array_equal(lengths, [[3, 2, 1, 2, -1], [8, -1, -1, -1, -1],
                                            [8, -1, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, 8, -1], [0, 8, -1, -1, -1, -1],
                                            [0, 8, -1, -1, -1, -1]])
    # The mask those runs give (causal inside a run) against the segment ids'.
    pos = np.arange(8)
    for b in range(3):
        run = np.searchsorted(offsets[b][offsets[b] >= 0], pos, side="right") - 1
        from_runs = (run[:, None] == run[None]) & (pos[None] <= pos[:, None])
        from_ids = np.asarray(layers._attention_mask(8, None, seg[b:b + 1], None, 0))[0]
        real = seg[b] > 0
        np.testing.assert_array_equal(from_runs[real], from_ids[real])


def test_xla_packed_padding_rows_give_no_nan():
    """The dense-mask path (xla; cuDNN's fallback form) on a row no query may look into."""
    seg = _segments()
    q, k, v = _qkv()
    (_, out), grads = _loss("xla", seg, seg > 0)(q, k, v)
    (_, ref), _ = _loss("einsum", seg, seg > 0)(q, k, v)
    assert all(np.isfinite(np.asarray(x)).all() for x in (out, *grads))
    real = seg > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=2e-5)


@pytest.mark.parametrize("platform,impl", [("tpu", "splash"), ("gpu", "cudnn"),
                                           ("cpu", "einsum")])
def test_auto_picks_the_platforms_kernel(platform, impl):
    assert resolve_attention_impl("auto", platform) == impl
    assert resolve_attention_impl("xla", platform) == "xla"
