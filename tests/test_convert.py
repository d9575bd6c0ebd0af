"""Weight conversion: HF LLaMA <-> orbax round trips bit for bit, logits parity with
transformers, stage-B adapter export, clear errors, .bin loading."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from earthgpt_jax.convert import llama as conv  # noqa: E402
from earthgpt_jax.convert.__main__ import run as cli  # noqa: E402
from earthgpt_jax.models.llama import LlamaDecoder  # noqa: E402
from earthgpt_jax.models.presets import LlamaConfig  # noqa: E402

VOCAB = 128


def _hf_config(**kw):
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
                                    max_position_embeddings=64, tie_word_embeddings=False, **kw)


def _make_hf(path, dtype=torch.float32, shard=None, seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_hf_config(**kw)).eval().to(dtype)
    extra = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **extra)
    return model


def _read_hf(path):
    out = {}
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="numpy") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models = {}
    models["fp32_sharded"] = (_make_hf(root / "fp32", shard="20KB"), root / "fp32")
    models["bf16_single"] = (_make_hf(root / "bf16", torch.bfloat16, seed=1), root / "bf16")
    assert os.path.exists(root / "fp32" / "model.safetensors.index.json")
    assert os.path.exists(root / "bf16" / "model.safetensors")
    return models


@pytest.mark.parametrize("kind", ["fp32_sharded", "bf16_single"])
@pytest.mark.parametrize("scan", [True, False])
def test_hf_orbax_hf_round_trip_is_bit_exact(hf_models, tmp_path, kind, scan):
    _, hf_dir = hf_models[kind]
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf_out"
    cli(["prog", "hf-to-orbax", f"--hf_dir={hf_dir}", f"--out_dir={ckpt}",
         f"--scan_layers={str(scan).lower()}"])
    params, cfg = conv.load_llm_params(str(ckpt))
    assert cfg.scan_layers == scan and ("layers" in params) == scan
    want_dtype = np.float32 if kind.startswith("fp32") else jnp.bfloat16
    assert all(x.dtype == want_dtype for x in jax.tree.leaves(params))
    if scan:
        assert params["layers"]["q_proj"]["kernel"].shape == (2, 32, 32)
    cli(["prog", "orbax-to-hf", f"--ckpt_dir={ckpt}", f"--out_dir={out}",
         "--max_shard_size=20KB"])
    _assert_same_tensors(_read_hf(hf_dir), _read_hf(out))
    config = json.load(open(out / "config.json"))
    assert config["torch_dtype"] == ("float32" if kind.startswith("fp32") else "bfloat16")
    assert json.load(open(out / "generation_config.json"))["eos_token_id"] == 2
    assert os.path.exists(out / "model.safetensors.index.json")


def test_logits_verb_matches_transformers(hf_models, tmp_path):
    model, hf_dir = hf_models["fp32_sharded"]
    ckpt = tmp_path / "ckpt"
    cli(["prog", "hf-to-orbax", f"--hf_dir={hf_dir}", f"--out_dir={ckpt}"])
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    cli(["prog", "logits", f"--ckpt_dir={ckpt}", f"--ids={tmp_path / 'ids.npy'}",
         f"--out={tmp_path / 'logits.npy'}"])
    ours = np.load(tmp_path / "logits.npy")
    with torch.no_grad():
        expected = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert ours.dtype == np.float32 and ours.shape == (2, 9, VOCAB)
    assert np.abs(ours - expected).max() <= 1e-4


def _save_workdir(workdir, llm_params, llm_cfg):
    """A training workdir as train.py/run.py write it: model_config.json and a
    CheckpointManager step with items `state` (TrainState) and `data`."""
    import dataclasses
    import optax
    import orbax.checkpoint as ocp
    from earthgpt_jax.models.presets import get_preset
    from earthgpt_jax.train import TrainState

    cfg = dataclasses.replace(get_preset("tiny"), llm=llm_cfg)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f)
    params = {"vit": {"w": jnp.ones((3, 3))}, "llm": jax.tree.map(jnp.asarray, llm_params)}
    state = TrainState(step=jnp.array(7, jnp.int32), params=params,
                       opt_state=optax.adam(1e-3).init(params))
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mngr:
        for step in (3, 7):
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     data=ocp.args.JsonSave({"i": step})))
        mngr.wait_until_finished()


def test_stage_b_adapters_export_to_plain_hf_llama(tmp_path):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=500.0,
                      max_position_embeddings=64, attention_bias=True, adapters=True)
    dec = LlamaDecoder(cfg)
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 9)).astype(np.int32)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    valid = jnp.ones((2, 9), bool)
    params = dec.init(jax.random.key(0), jnp.asarray(ids),
                      method=lambda m, t: m(m.embed(t), pos, valid))["params"]
    import flax.linen as nn
    params = jax.tree.map(np.asarray, nn.unbox(params))
    rng = np.random.default_rng(2)
    for module, leaves in params["layers"].items():
        if "adapter_scale" in leaves:
            leaves["adapter_scale"] = rng.uniform(0.5, 1.5, leaves["adapter_scale"].shape
                                                  ).astype(np.float32)
            leaves["adapter_bias"] = rng.normal(0, 0.1, leaves["adapter_bias"].shape
                                                ).astype(np.float32)
        if "bias" in leaves:
            leaves["bias"] = rng.normal(0, 0.1, leaves["bias"].shape).astype(np.float32)
    workdir = tmp_path / "work"
    _save_workdir(str(workdir), params, cfg)
    # Only the llm leaves of the latest step are read.
    loaded, loaded_cfg = conv.load_llm_params(str(workdir))
    assert loaded_cfg.adapters and loaded_cfg.scan_layers
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    ours = conv.text_logits(params, cfg, ids)

    tok = tmp_path / "tokenizer.model"
    tok.write_bytes(b"not really sentencepiece")
    out = tmp_path / "hf"
    cli(["prog", "orbax-to-hf", f"--ckpt_dir={workdir}", f"--out_dir={out}",
         f"--tokenizer={tok}"])
    config = json.load(open(out / "config.json"))
    assert config["attention_bias"] is True and config["mlp_bias"] is True
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    # The logits verb reads a training workdir too.
    np.save(tmp_path / "ids.npy", ids)
    cli(["prog", "logits", f"--ckpt_dir={workdir}", f"--ids={tmp_path / 'ids.npy'}",
         f"--out={tmp_path / 'l.npy'}"])
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), ours, atol=1e-6)


def _single_file_copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = _read_hf(dst)
        edit_tensors(tensors)
        save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if edit_config:
        config = json.load(open(os.path.join(dst, "config.json")))
        edit_config(config)
        json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    return dst


def test_errors_name_the_problem(hf_models, tmp_path):
    _, src = hf_models["bf16_single"]
    bad = _single_file_copy(src, tmp_path / "missing",
                            lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(conv.ConversionError, match=r"missing tensor.*layers\.1\.mlp\.up_proj"):
        conv.hf_to_orbax(str(bad), str(tmp_path / "o1"))
    assert not os.path.exists(tmp_path / "o1")

    def reshape(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
    bad = _single_file_copy(src, tmp_path / "shape", reshape)
    with pytest.raises(conv.ConversionError,
                       match=r"k_proj\.weight.*shape \(8, 32\), expected \(16, 32\)"):
        conv.hf_to_orbax(str(bad), str(tmp_path / "o2"))

    for name, edit, pattern in [
            ("arch", lambda c: c.update(architectures=["MistralForCausalLM"]),
             "unsupported architecture.*MistralForCausalLM"),
            ("rope", lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0}),
             "unsupported rope_scaling"),
            ("tied", lambda c: c.update(tie_word_embeddings=True),
             "unsupported tie_word_embeddings")]:
        bad = _single_file_copy(src, tmp_path / name, edit_config=edit)
        with pytest.raises(conv.ConversionError, match=pattern):
            conv.hf_to_orbax(str(bad), str(tmp_path / f"o_{name}"))

    ckpt = tmp_path / "ckpt"
    conv.hf_to_orbax(str(src), str(ckpt))
    with pytest.raises(FileExistsError, match=f"{ckpt}.*already holds a checkpoint.*overwrite"):
        cli(["prog", "hf-to-orbax", f"--hf_dir={src}", f"--out_dir={ckpt}"])
    cli(["prog", "hf-to-orbax", f"--hf_dir={src}", f"--out_dir={ckpt}", "--overwrite"])
    out = tmp_path / "hf_out"
    conv.orbax_to_hf(str(ckpt), str(out))
    with pytest.raises(FileExistsError, match="already holds a HF checkpoint"):
        conv.orbax_to_hf(str(ckpt), str(out))


def test_pytorch_bin_is_loaded_with_weights_only(hf_models, tmp_path, monkeypatch):
    model, src = hf_models["fp32_sharded"]
    bin_dir = tmp_path / "bin"
    os.makedirs(bin_dir)
    shutil.copy(src / "config.json", bin_dir / "config.json")
    state = {k: v.to(torch.bfloat16) if "mlp" in k else v for k, v in model.state_dict().items()}
    torch.save(state, bin_dir / "pytorch_model.bin")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    params, cfg = conv.hf_to_params(str(bin_dir))
    assert calls and all(c.get("weights_only") is True for c in calls)
    np.testing.assert_array_equal(params["lm_head"]["kernel"],
                                  state["lm_head.weight"].numpy().T)
    gate = params["layers"]["gate_proj"]["kernel"]
    assert gate.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        gate[1].astype(np.float32),
        state["model.layers.1.mlp.gate_proj.weight"].float().numpy().T)
    # ... and back: the in-memory export gives the same tensors.
    back = dict(conv.params_to_hf_state(params, cfg))
    for k, v in state.items():
        v = v.float().numpy()
        np.testing.assert_array_equal(back[k].astype(np.float32), v)


def test_cli_keeps_orbax_logs_out(hf_models, tmp_path):
    """`python -m earthgpt_jax.convert hf-to-orbax` prints its own lines, not orbax's INFO."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "earthgpt_jax.convert", "hf-to-orbax",
         f"--hf_dir={hf_models['bf16_single'][1]}", f"--out_dir={tmp_path / 'out'}"],
        cwd=root, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert any("wrote" in line for line in lines), proc.stderr
    assert len(lines) <= 5, proc.stderr
