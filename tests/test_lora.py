"""LoRA (stage lora): a fresh LoRA model is the base model; the stage trains exactly the LoRA
factors; export merged and as a PEFT adapter gives transformers' and peft's logits; a PEFT
adapter imports (peft-to-orbax) and training continues from it."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from configs import mmrs  # noqa: E402
from earthgpt_jax import checkpoints as ckpt_lib, parallel, train as train_lib  # noqa: E402
from earthgpt_jax.convert import llama as conv  # noqa: E402
from earthgpt_jax.convert.__main__ import run as cli  # noqa: E402
from earthgpt_jax.models.llama import LlamaDecoder  # noqa: E402
from earthgpt_jax.models.presets import LlamaConfig  # noqa: E402
from earthgpt_jax.run import model_config  # noqa: E402
from tests.fixtures.tiny_hf import tiny_hf_models  # noqa: E402

LENGTH = 512  # the parity length the issue asks for
VOCAB = 64    # tiny_hf_models' vocabulary (and the tiny preset's shapes)


def _tiny_llama(**kw):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, **kw)


def _init(cfg, length=8):
    dec = LlamaDecoder(cfg)
    ids = jnp.zeros((1, length), jnp.int32)
    pos = jnp.arange(length)[None]
    params = dec.init(jax.random.key(0), ids, method=lambda m, t: m(
        m.embed(t), pos, jnp.ones((1, length), bool)))["params"]
    return jax.tree.map(np.asarray, nn.unbox(params))


@pytest.mark.parametrize("scan", [True, False])
def test_a_fresh_lora_model_is_the_base_model(scan):
    cfg = _tiny_llama(scan_layers=scan, lora_rank=4, lora_alpha=8.0,
                      lora_targets=("q_proj", "v_proj", "down_proj"))
    params = _init(cfg)
    flat = traverse_util.flatten_dict(params, sep="/")
    lora = {p for p in flat if "/lora_" in p}
    layer = "layers" if scan else "layers_1"
    assert {p for p in lora if p.startswith(layer + "/")} == {
        f"{layer}/{m}/lora_{f}" for m in ("q_proj", "v_proj", "down_proj") for f in "ab"}
    a, b = flat[f"{layer}/down_proj/lora_a"], flat[f"{layer}/down_proj/lora_b"]
    # PEFT's init: A ~ U(+-1/sqrt(in)) (kaiming_uniform_, a=sqrt(5)); B = 0.
    assert a.shape[-2:] == (48, 4) and b.shape[-2:] == (4, 32) and not b.any()
    assert 0.5 / np.sqrt(48) < np.abs(a).max() <= 1 / np.sqrt(48)
    base = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in lora}, sep="/")
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
    base_cfg = _tiny_llama(scan_layers=scan)
    np.testing.assert_array_equal(conv.text_logits(params, cfg, ids),
                                  conv.text_logits(base, base_cfg, ids))


def _write_converted(out_dir, params, cfg):
    """A converted checkpoint ({'llm': params} + model_config.json), as hf-to-orbax writes."""
    ckpt_lib.prepare_out_dir(str(out_dir), overwrite=False)
    flat = traverse_util.flatten_dict(params)
    ckpt_lib.write_params_streaming(str(out_dir), [[(("llm",) + k, v) for k, v in flat.items()]])
    ckpt_lib.save_llama_config(str(out_dir), cfg)


def _random_lora(params, cfg, seed):
    rng = np.random.default_rng(seed)
    for layer in ([params["layers"]] if cfg.scan_layers else
                  [params[f"layers_{i}"] for i in range(cfg.num_layers)]):
        for module in cfg.lora_targets:
            kernel = layer[module]["kernel"]
            lead, (n_in, n_out) = kernel.shape[:-2], kernel.shape[-2:]
            # A as initialised, B as trained to a delta the size of the base weights (0.02)
            layer[module]["lora_a"] = rng.uniform(-1, 1, lead + (n_in, cfg.lora_rank)
                                                  ).astype(np.float32) / np.sqrt(n_in)
            layer[module]["lora_b"] = rng.normal(0, 0.05, lead + (cfg.lora_rank, n_out)
                                                 ).astype(np.float32)
    return params


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_base")
    model = tiny_hf_models(vocab_size=VOCAB)["llama"].eval()
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.mark.parametrize("scan", [True, False])
def test_merged_and_peft_exports_give_transformers_and_peft_logits(hf_base, tmp_path, scan):
    import dataclasses
    base_model, base_dir = hf_base
    params, cfg = conv.hf_to_params(str(base_dir), scan_layers=scan)
    cfg = dataclasses.replace(cfg, lora_rank=4, lora_alpha=8.0)
    params = _random_lora(params, cfg, seed=2)
    ckpt = tmp_path / "ckpt"
    _write_converted(ckpt, params, cfg)
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, LENGTH))
    ours = conv.text_logits(params, cfg, ids)
    # The LoRA moves the logits well beyond the tolerance: the parity below is not vacuous.
    assert np.abs(ours - _hf_logits(base_model, ids)).max() > 1e-2

    merged = tmp_path / "merged"
    cli(["prog", "orbax-to-hf", f"--ckpt_dir={ckpt}", f"--out_dir={merged}"])
    hf = transformers.LlamaForCausalLM.from_pretrained(merged).eval()
    assert np.abs(ours - _hf_logits(hf, ids)).max() <= 1e-4

    out = tmp_path / "peft"
    cli(["prog", "orbax-to-hf", f"--ckpt_dir={ckpt}", f"--out_dir={out}", "--peft"])
    base = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    # The base is the LLaMA the LoRA was trained on, bit for bit.
    for name, value in base.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), base_model.state_dict()[name].numpy())
    adapter = json.load(open(out / "lora" / "adapter_config.json"))
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8.0
    model = peft.PeftModel.from_pretrained(base, out / "lora").eval()
    assert np.abs(ours - _hf_logits(model, ids)).max() <= 1e-4


def test_peft_adapter_imports_and_stage_lora_trains_exactly_its_factors(hf_base, tmp_path):
    base_model, base_dir = hf_base
    targets = ["q_proj", "v_proj", "down_proj"]
    model = peft.get_peft_model(
        tiny_hf_models(vocab_size=VOCAB)["llama"].eval(),
        peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval().save_pretrained(tmp_path / "adapter")
    ids = np.random.default_rng(4).integers(0, VOCAB, (1, LENGTH))
    expected = _hf_logits(model, ids)

    ckpt = tmp_path / "ckpt"
    cli(["prog", "peft-to-orbax", f"--hf_dir={base_dir}", f"--peft_dir={tmp_path / 'adapter'}",
         f"--out_dir={ckpt}"])
    params, cfg = conv.load_llm_params(str(ckpt))
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) == (4, 16.0, tuple(targets))
    assert np.abs(conv.text_logits(params, cfg, ids) - expected).max() <= 1e-4

    # Continue training it: stage lora starting from the converted checkpoint.
    config = mmrs.get_run_config("demo").replace(
        model={"size": "tiny", "lora": {"rank": 4, "alpha": 16.0, "targets": ",".join(targets)}},
        train={"stage": "lora", "batch_size": 4, "num_steps": 2, "warmup_steps": 0},
        init={"llm": str(ckpt)}, mesh={"ici": {"data": 1, "fsdp": -1, "tensor": 1}})
    trainer = train_lib.Trainer.for_run(config, model_config(config, VOCAB),
                                        parallel.build_mesh(config.mesh, jax.devices()[:1]))
    state = trainer.init_state(0)
    before = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    np.testing.assert_array_equal(before["llm/layers/v_proj/lora_b"],
                                  params["layers"]["v_proj"]["lora_b"])
    rng = np.random.default_rng(0)
    for step in range(2):
        loss_mask = np.zeros((4, 16), np.float32)
        loss_mask[:, 4:] = 1.0
        batch = {"image": rng.integers(0, 255, (4, 32, 32, 3), np.uint8),
                 "tokens": rng.integers(3, VOCAB, (4, 16)).astype(np.int32),
                 "valid": np.ones((4, 16), bool), "loss_mask": loss_mask}
        state, _ = trainer.train_step(state, batch, step)
    after = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    trained = {p for p in before if not np.array_equal(before[p], after[p])}
    assert trained == {f"llm/layers/{m}/lora_{f}" for m in targets for f in "ab"}
    # Optimizer state (Adam's two moments) exists for the LoRA factors alone.
    lora_size = sum(before[p].size for p in trained)
    state_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert state_size == 2 * lora_size


def test_bad_lora_settings_are_one_line_errors(hf_base, tmp_path):
    from earthgpt_jax.config import LoraConfig, RunConfig
    with pytest.raises(ValueError, match=r"lora.targets='q_proj,qk_proj'.*'qk_proj' matches "
                                         r"none of q_proj"):
        LoraConfig(targets="q_proj,qk_proj")
    with pytest.raises(ValueError, match=r"lora.dropout=0.1: only 0 is supported"):
        LoraConfig(dropout=0.1)
    with pytest.raises(ValueError, match=r"stage=lora needs config.model.lora.rank > 0"):
        RunConfig().replace(model={"lora": {"rank": 0}}, train={"stage": "lora"})
    assert LoraConfig(targets=".*_proj").modules == LoraConfig().modules
    assert LoraConfig(targets="q_proj|v_proj").modules == ("q_proj", "v_proj")
    # --peft on a checkpoint without LoRA, before anything is written.
    ckpt = tmp_path / "plain"
    conv.hf_to_orbax(str(hf_base[1]), str(ckpt))
    with pytest.raises(ValueError, match="has no LoRA factors"):
        conv.orbax_to_hf(str(ckpt), str(tmp_path / "out"), peft=True)
    assert not os.path.exists(tmp_path / "out")


def test_lora_starts_on_weights_without_it(hf_base, tmp_path):
    """config.init.llm / from_workdir of a LLaMA or a stage-A run (no LoRA factors): the
    factors keep their fresh init (B = 0: the run starts as those weights); anything else
    missing is still an error."""
    import dataclasses
    ckpt = tmp_path / "plain"
    cfg = conv.hf_to_orbax(str(hf_base[1]), str(ckpt))
    lora_cfg = dataclasses.replace(cfg, lora_rank=4, lora_targets=("q_proj", "up_proj"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    targets = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                           _init(lora_cfg))
    restored = ckpt_lib.restore_part("llm", str(ckpt), targets)
    assert ("layers", "q_proj", "kernel") in restored
    assert not any(path[-1].startswith("lora_") for path in restored)
    del targets["layers"]["down_proj"]["kernel"]
    with pytest.raises(ValueError, match=r"unexpected 1 \[llm/layers/down_proj/kernel\]"):
        ckpt_lib.restore_part("llm", str(ckpt), targets, check_only=True)
