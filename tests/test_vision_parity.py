"""Vision towers vs transformers (tiny random models, fp32) and the checkpoint mappers."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from earthgpt_jax.convert import vision  # noqa: E402
from earthgpt_jax.models.convnext import ConvNeXt  # noqa: E402
from earthgpt_jax.models.vit import ViT  # noqa: E402

TOL = 1e-4


def _randomise(model, seed):
    """Non-default values everywhere (layer scales, norms, biases), so a mis-mapped or unused
    tensor changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.02 if "position" in name or "cls" in name else 0.3
            p.copy_(torch.randn(p.shape, generator=gen) * scale
                    + (1.0 if name.endswith(("norm1.weight", "norm2.weight")) else 0.0))
    return model.eval()


def _state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _tree_sig(tree):
    return jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), tree)


def _check_tree_matches_init(params, module, image_shape):
    init = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(image_shape)))
    assert _tree_sig(params) == _tree_sig(nn.meta.unbox(init["params"]))


# ----------------------------------------------------------------------------- DINOv2

@pytest.fixture(scope="module")
def dinov2():
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                    mlp_ratio=2, image_size=42, patch_size=14,
                                    layerscale_value=0.5, attn_implementation="eager")
    model = _randomise(transformers.Dinov2Model(cfg), 0)
    ours = vision.vit_config_from_hf(cfg.to_dict(), feature_layers=(0, 2))
    params = vision.dinov2_params_from_hf(_state(model), ours)
    return model, ours, params


@pytest.mark.parametrize("hw", [(42, 42), (28, 28), (28, 56), (70, 42)])
def test_dinov2_matches_hf(dinov2, hw):
    model, cfg, params = dinov2
    rng = np.random.default_rng(hw[0] * 100 + hw[1])
    images = rng.standard_normal((2, *hw, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
    maps, hidden = jax.jit(lambda p, x: ViT(cfg).apply({"params": p}, x, all_hidden_states=True))(
        params, images)
    assert len(hidden) == len(ref.hidden_states) == cfg.num_layers + 1
    errs = [float(np.abs(np.asarray(h) - r.numpy()).max())
            for h, r in zip(hidden, ref.hidden_states)]
    gh, gw = hw[0] // 14, hw[1] // 14
    final = ref.last_hidden_state.numpy()[:, 1:].reshape(2, gh, gw, -1)
    errs.append(float(np.abs(np.asarray(maps[-1]) - final).max()))
    # feature layer 0: HF's final layernorm applied to block 0's output
    with torch.no_grad():
        ln0 = model.layernorm(ref.hidden_states[1]).numpy()[:, 1:].reshape(2, gh, gw, -1)
    errs.append(float(np.abs(np.asarray(maps[0]) - ln0).max()))
    print(f"dinov2 {hw}: max|diff| per output {['%.1e' % e for e in errs]}")
    assert max(errs) <= TOL, errs
    assert [m.shape for m in maps] == [(2, gh, gw, cfg.hidden_size)] * 2


def test_dinov2_params_tree_and_prefixed_names(dinov2):
    model, cfg, params = dinov2
    _check_tree_matches_init(params, ViT(cfg), (1, 42, 42, 3))
    # hub checkpoint names (attention.attention.query, attention.output.dense) + `dinov2.`
    # prefix of models with heads + a head tensor that is ignored.
    hub = {}
    for k, v in _state(model).items():
        k = re.sub(r"attention\.([qkv])_proj", lambda m: "attention.attention." + {
            "q": "query", "k": "key", "v": "value"}[m.group(1)], k)
        hub["dinov2." + k.replace("attention.o_proj", "attention.output.dense")] = v
    hub["classifier.weight"] = np.zeros((5, 64), np.float32)
    assert any("attention.attention.query" in k for k in hub)
    again = vision.dinov2_params_from_hf(hub, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
    # torch [out, in] -> flax [in, out]
    np.testing.assert_array_equal(params["layer_1"]["fc1"]["kernel"],
                                  model.state_dict()["encoder.layer.1.mlp.fc1.weight"].numpy().T)


def test_dinov2_errors(dinov2):
    model, cfg, _ = dinov2
    state = _state(model)
    missing = dict(state)
    del missing["encoder.layer.2.layer_scale2.lambda1"]
    with pytest.raises(vision.VisionConversionError, match=r"missing tensor "
                       r"'encoder\.layer\.2\.layer_scale2\.lambda1'"):
        vision.dinov2_params_from_hf(missing, cfg)
    bad = dict(state)
    bad["encoder.layer.1.mlp.fc2.weight"] = np.zeros((32, 48), np.float32)
    with pytest.raises(vision.VisionConversionError,
                       match=r"'encoder\.layer\.1\.mlp\.fc2\.weight': expected shape \(32, 64\), "
                             r"found \(32, 48\)"):
        vision.dinov2_params_from_hf(bad, cfg)
    # a 4-layer checkpoint loaded with a 3-layer config: leftover block 3 is an error
    extra = dict(state)
    extra["encoder.layer.3.norm1.weight"] = np.ones(32, np.float32)
    with pytest.raises(vision.VisionConversionError, match=r"encoder\.layer\.3\.norm1\.weight"):
        vision.dinov2_params_from_hf(extra, cfg)
    with pytest.raises(vision.VisionConversionError, match="use_swiglu_ffn"):
        vision.vit_config_from_hf({"model_type": "dinov2", "use_swiglu_ffn": True})
    assert vision.vit_config_from_hf({"num_hidden_layers": 24}).feature_layers == (5, 11, 17, 23)


# ----------------------------------------------------------------------------- ConvNeXt

@pytest.fixture(scope="module")
def convnext():
    cfg = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[2, 1, 2, 1])
    model = _randomise(transformers.ConvNextModel(cfg), 1)
    ours = vision.convnext_config_from_hf(cfg.to_dict())
    params = vision.convnext_params_from_state(_state(model), ours)
    return model, ours, params


def _to_timm(state, prefix="visual.trunk."):
    """HF ConvNextModel names -> timm/open_clip ConvNeXt names."""
    out = {}
    for k, v in state.items():
        t = k.replace("embeddings.patch_embeddings", "stem.0").replace("embeddings.layernorm",
                                                                        "stem.1")
        t = t.replace("encoder.stages.", "stages.").replace("downsampling_layer", "downsample")
        t = t.replace(".layers.", ".blocks.").replace("dwconv", "conv_dw")
        t = t.replace("pwconv1", "mlp.fc1").replace("pwconv2", "mlp.fc2")
        t = t.replace("layer_scale_parameter", "gamma").replace(".layernorm.", ".norm.")
        t = t.replace("layernorm.", "head.norm.")  # the pooled norm -> timm's head norm
        out[prefix + t] = v
    return out


@pytest.mark.parametrize("hw", [(64, 64), (96, 64)])
def test_convnext_matches_hf(convnext, hw):
    model, cfg, params = convnext
    images = np.random.default_rng(hw[0]).standard_normal((2, *hw, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True)
    maps = jax.jit(lambda p, x: ConvNeXt(cfg).apply({"params": p}, x))(params, images)
    assert len(ref.hidden_states) == 5 and len(maps) == 4
    errs = [float(np.abs(np.asarray(m) - r.numpy().transpose(0, 2, 3, 1)).max())
            for m, r in zip(maps, ref.hidden_states[1:])]
    print(f"convnext {hw}: max|diff| per stage {['%.1e' % e for e in errs]}")
    assert max(errs) <= TOL, errs


def test_convnext_timm_names_load_identically(convnext):
    model, cfg, params = convnext
    _check_tree_matches_init(params, ConvNeXt(cfg), (1, 64, 64, 3))
    timm = _to_timm(_state(model))
    assert "visual.trunk.stages.2.blocks.1.mlp.fc2.weight" in timm
    timm["visual.head.proj.weight"] = np.zeros((4, 32), np.float32)  # outside the trunk
    timm["text.token_embedding.weight"] = np.zeros((7, 4), np.float32)
    assert vision.detect_convnext_naming(timm) == ("timm", "visual.trunk.")
    assert vision.convnext_config_from_state(timm) == cfg
    again = vision.convnext_params_from_state(timm, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
    hf_prefixed = {"convnext." + k: v for k, v in _state(model).items()}
    assert vision.detect_convnext_naming(hf_prefixed) == ("hf", "convnext.")
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           vision.convnext_params_from_state(hf_prefixed, cfg), params)
    # depthwise torch [C, 1, 7, 7] -> flax [7, 7, 1, C]
    dw = model.state_dict()["encoder.stages.2.layers.1.dwconv.weight"].numpy()
    np.testing.assert_array_equal(params["stage2_block1"]["dwconv"]["kernel"],
                                  dw.transpose(2, 3, 1, 0))


def test_convnext_errors(convnext):
    model, cfg, _ = convnext
    timm = _to_timm(_state(model))
    del timm["visual.trunk.stages.3.downsample.1.bias"]
    with pytest.raises(vision.VisionConversionError,
                       match=r"missing tensor 'visual\.trunk\.stages\.3\.downsample\.1\.bias'"):
        vision.convnext_params_from_state(timm, cfg)
    bad = _state(model)
    bad["encoder.stages.1.layers.0.dwconv.weight"] = np.zeros((16, 1, 5, 5), np.float32)
    with pytest.raises(vision.VisionConversionError,
                       match=r"'encoder\.stages\.1\.layers\.0\.dwconv\.weight': expected shape "
                             r"\(16, 1, 7, 7\), found \(16, 1, 5, 5\)"):
        vision.convnext_params_from_state(bad, cfg)
    # checkpoint deeper than the config: the extra block is reported, not silently dropped
    shallow = vision.convnext_config_from_hf({"hidden_sizes": [8, 16, 24, 32],
                                              "depths": [2, 1, 1, 1]})
    with pytest.raises(vision.VisionConversionError, match=r"encoder\.stages\.2\.layers\.1\."):
        vision.convnext_params_from_state(_state(model), shallow)
    with pytest.raises(vision.VisionConversionError, match="no ConvNeXt found"):
        vision.convnext_params_from_state({"foo.weight": np.zeros(3)}, cfg)


@pytest.mark.parametrize("layout", ["timm", "open_clip"])
def test_convnext_download_folders_convert(convnext, layout, tmp_path):
    """The folders users download: timm's (config.json with `architecture`/`pretrained_cfg`,
    model.safetensors) and open_clip's (open_clip_config.json, open_clip_pytorch_model.bin
    holding the whole CLIP model)."""
    import json

    from earthgpt_jax import checkpoints as ckpt_lib
    from earthgpt_jax.convert import vision_io
    model, cfg, params = convnext
    folder = tmp_path / layout
    folder.mkdir()
    if layout == "timm":
        from safetensors.numpy import save_file
        state = _to_timm(_state(model), prefix="")
        state["head.fc.weight"] = np.zeros((5, 32), np.float32)
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(
            {"architecture": "convnext_large_mlp", "num_classes": 5, "num_features": 32,
             "pretrained_cfg": {"tag": "clip_laion2b", "input_size": [3, 64, 64]}}))
    else:
        state = _to_timm(_state(model))
        state["visual.head.proj.weight"] = np.zeros((4, 32), np.float32)
        state["text.token_embedding.weight"] = np.zeros((7, 4), np.float32)
        torch.save({k: torch.from_numpy(v) for k, v in state.items()},
                   folder / "open_clip_pytorch_model.bin")
        (folder / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": {"vision_cfg": {"timm_model_name": "convnext_large"}}}))
    got = vision_io.convnext_to_orbax(str(folder), str(tmp_path / "out"))
    assert got == cfg
    stored = ckpt_lib.open_converted_part(str(tmp_path / "out"), "convnext").read_all()
    jax.tree_util.tree_map(np.testing.assert_array_equal, stored, params)


def test_a_folder_without_weights_says_what_it_looked_for(tmp_path):
    from earthgpt_jax.convert import vision_io
    with pytest.raises(FileNotFoundError, match="no weights recognised.*open_clip_pytorch_model"):
        vision_io.read_state_dict(str(tmp_path))
