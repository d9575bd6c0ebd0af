"""Starting a run from converted Hugging Face weights: LLaMA, DINOv2 and ConvNeXt checkpoints
converted by the CLI load into the sharded train state through config.init.*."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import mmrs
from earthgpt_jax.convert.__main__ import run as convert
from earthgpt_jax.models.presets import get_preset
from tests.fixtures.tiny_hf import tiny_hf_models
from tests.test_train import one_device_trainer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    models = tiny_hf_models(vocab_size=64)
    out = {}
    for name, model in (("llama", models["llama"]), ("dino", models["dinov2"]),
                        ("convnext", models["convnext"])):
        model.save_pretrained(root / f"hf_{name}")
        out[name] = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    convert(["convert", "hf-to-orbax", f"--hf_dir={root / 'hf_llama'}",
             f"--out_dir={root / 'llm'}"])
    convert(["convert", "dinov2-to-orbax", f"--hf_dir={root / 'hf_dino'}",
             f"--out_dir={root / 'vit'}"])
    convert(["convert", "convnext-to-orbax", f"--weights={root / 'hf_convnext'}",
             f"--out_dir={root / 'convnext'}"])
    return root, out


def _state(root, stage, **init):
    config = mmrs.get_run_config("demo")
    config = config.replace(train={"stage": stage})
    config = config.replace(init={part: str(root / path) for part, path in init.items()})
    cfg = get_preset("tiny", vocab_size=64, llm={"adapters": stage == "b"})
    trainer = one_device_trainer(config, cfg)
    return trainer.init_state(0)


def test_converted_weights_become_the_initial_state(converted):
    root, hf = converted
    state = _state(root, "b", llm="llm", vit="vit", convnext="convnext")
    p = state.params

    def stored(leaf, value):  # stage B stores what it freezes in bf16 (frozen_param_dtype)
        assert leaf.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(leaf), value.astype(leaf.dtype))

    stored(p["llm"]["layers"]["q_proj"]["kernel"][1],
           hf["llama"]["model.layers.1.self_attn.q_proj.weight"].T)
    stored(p["llm"]["embed_tokens"]["embedding"], hf["llama"]["model.embed_tokens.weight"])
    # Stage-B adapters are not in LLaMA-2: they start as the identity (fp32, trained).
    assert p["llm"]["layers"]["q_proj"]["adapter_scale"].dtype == np.float32
    assert np.all(np.asarray(p["llm"]["layers"]["q_proj"]["adapter_scale"]) == 1.0)
    assert np.all(np.asarray(p["llm"]["layers"]["q_proj"]["adapter_bias"]) == 0.0)
    stored(p["vit"]["cls_token"].ravel(), hf["dino"]["embeddings.cls_token"].ravel())
    dw = hf["convnext"]["encoder.stages.2.layers.0.dwconv.weight"]  # [C, 1, 7, 7]
    stored(p["convnext"]["stage2_block0"]["dwconv"]["kernel"], dw.transpose(2, 3, 1, 0))
    # The optimizer still starts from zero moments for what stage B trains.
    assert int(state.step) == 0


def test_a_checkpoint_of_another_size_is_refused_with_the_tensor_named(converted, tmp_path):
    root, _ = converted
    torch.manual_seed(1)
    wrong = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    wrong.save_pretrained(tmp_path / "hf")
    convert(["convert", "hf-to-orbax", f"--hf_dir={tmp_path / 'hf'}",
             f"--out_dir={tmp_path / 'llm'}"])
    with pytest.raises(ValueError, match=r"llm/layers/down_proj/kernel has shape \(2, 96, 64\)"
                       r".*expects \(2, 128, 64\)"):
        _state(tmp_path, "a", llm="llm")



def test_a_wrong_init_checkpoint_is_refused_before_any_compile(converted, tmp_path):
    """run.py checks config.init against the model right after building the Trainer: from the
    checkpoint's metadata, before the jitted init (or anything else) compiles."""
    from earthgpt_jax import cli, run as run_lib
    root, _ = converted
    config = mmrs.get_run_config("demo")
    config = config.replace(
        train={"stage": "b"},
        init={"llm": str(root / "llm"), "convnext": str(root / "convnext")})

    def trainer(vocab_size):
        cfg = get_preset("tiny", vocab_size=vocab_size, llm={"adapters": True})
        made = one_device_trainer(config, cfg)
        made._init = None  # an init (a compile) before the check would fail on this
        return made

    # A model with another vocabulary than the converted LLaMA's 64 tokens.
    with pytest.raises(cli.UsageError, match=r"config.init.llm=.*: tensor llm/embed_tokens/"
                       r"embedding has shape \(64, 64\) in .*the model expects \(96, 64\).*"
                       r"config.model.size=demo, a 96-token vocabulary; give config.init"):
        run_lib.check_init_sources(config, str(tmp_path), trainer(96))
    run_lib.check_init_sources(config, str(tmp_path), trainer(64))  # the right ones pass
