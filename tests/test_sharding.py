"""The same forward on an 8-device CPU mesh (fsdp x tensor) as on one device."""

import jax
import numpy as np
import flax.linen as nn
import pytest

from configs import mmrs
from earthgpt_jax import parallel
from earthgpt_jax.models.earthgpt import EarthGPT
from earthgpt_jax.models.presets import get_preset
from earthgpt_jax.models.earthgpt import abstract_params


def _on_mesh(model, params, ici):
    """(mesh, logical rules, params sharded by them) for the demo config's mesh with `ici`."""
    config = mmrs.get_run_config("demo")
    config = config.replace(mesh={"ici": ici})
    mesh = parallel.build_mesh(config.mesh)
    rules = config.mesh.rules
    shardings = parallel.shardings_for(abstract_params(model), mesh, rules)
    return mesh, rules, jax.device_put(params, shardings)


@pytest.mark.parametrize("ici", [{"data": 1, "fsdp": 2, "tensor": 4},
                                 {"data": 2, "fsdp": 4, "tensor": 1}])
def test_sharded_forward_equals_single_device(ici):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    cfg = get_preset("tiny", vocab_size=64)
    model = EarthGPT(cfg)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    tokens = rng.integers(0, 64, (8, 12)).astype(np.int32)
    valid = np.ones((8, 12), bool)
    valid[:, 9:] = False
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), images, tokens, valid))["params"]
    expected = jax.jit(model.apply)({"params": params}, images, tokens, valid)

    mesh, rules, sharded = _on_mesh(model, params, ici)
    batch = parallel.batch_sharding(mesh, 2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = jax.jit(model.apply)({"params": sharded}, jax.device_put(images,
                                   parallel.batch_sharding(mesh, 4)),
                                   jax.device_put(tokens, batch), jax.device_put(valid, batch))
    kernel = sharded["llm"]["layers"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert len(kernel.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=1e-5)


def test_sharded_greedy_decoding_equals_single_device():
    """Decoding runs on the training mesh: fsdp x tensor-sharded weights and KV cache."""
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    from earthgpt_jax.generate import greedy_generate, left_pad

    cfg = get_preset("tiny", vocab_size=64)
    model = EarthGPT(cfg)
    rng = np.random.default_rng(5)
    images = rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    tokens, valid = left_pad([list(rng.integers(3, 64, n)) for n in (3, 6, 4, 5)], 0)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(2), images, tokens, valid))["params"]
    kwargs = dict(max_new_tokens=6, eos_id=-1, pad_id=0)
    expected = greedy_generate(model, params, images, tokens, valid, **kwargs)

    mesh, rules, sharded = _on_mesh(model, params, {"data": 2, "fsdp": 2, "tensor": 2})
    batch = parallel.batch_sharding(mesh, 2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = greedy_generate(model, sharded, jax.device_put(images, parallel.batch_sharding(
            mesh, 4)), jax.device_put(tokens, batch), jax.device_put(valid, batch), **kwargs)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
