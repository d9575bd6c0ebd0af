"""Stage B starts from stage A: `config.init.from_workdir` carries every part of a training
run's latest params onto the sharded state (fresh optimizer, step 0), restoring each leaf
straight into its sharding; a run's own checkpoint still wins (resume)."""

import logging
import os

import flax.linen as nn
import grain
import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import mmrs
from earthgpt_jax import parallel, train as train_lib
from earthgpt_jax import checkpoints as ckpt_lib
from earthgpt_jax.config import InitConfig
from earthgpt_jax.checkpoints import save_model_config
from earthgpt_jax.run import model_config

VOCAB, LENGTH, BATCH = 64, 16, 8

pytestmark = pytest.mark.skipif(jax.device_count() < 8,
                                reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _config(stage, **train):
    return mmrs.get_run_config("demo").replace(
        model={"size": "tiny"},
        data={"max_text_len": LENGTH},
        train={"stage": stage, "batch_size": BATCH, "num_steps": 3, "warmup_steps": 0,
               "learning_rate": 1e-2, "log_every_steps": 1, **train},
        checkpoint={"every_steps": 100},
        mesh={"ici": {"data": 1, "fsdp": -1, "tensor": 1}})  # 8-way FSDP


def _batch(seed):
    rng = np.random.default_rng(seed)
    loss_mask = np.zeros((BATCH, LENGTH), np.float32)
    loss_mask[:, 6:] = 1.0
    return {"image": rng.integers(0, 255, (BATCH, 32, 32, 3), np.uint8),
            "tokens": rng.integers(3, VOCAB, (BATCH, LENGTH)).astype(np.int32),
            "valid": np.ones((BATCH, LENGTH), bool), "loss_mask": loss_mask}


class _Example(grain.transforms.Map):
    """Record i -> row i of a fixed random batch: train()'s real pipeline, no dataset needed."""

    def map(self, i):
        return {k: v[i % BATCH] for k, v in _batch(0).items()}


def _trainer(config):
    cfg = model_config(config, VOCAB, 1)
    return train_lib.Trainer.for_run(config, cfg, parallel.build_mesh(config.mesh)), cfg


class _Records:
    """A random-access source of 2 batches of record ids."""

    def __len__(self):
        return 2 * BATCH

    def __getitem__(self, i):
        return i


def _run(config, trainer, workdir):
    return train_lib.train(config, workdir, trainer, _Records(), _Example())


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _logits(trainer, params, batch):
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        return np.asarray(jax.jit(trainer.model.apply)(
            {"params": params}, batch["image"], batch["tokens"], batch["valid"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-step stage-A run (nonzero LR: its projector and q/k/v moved off their init), and a
    stage-B trainer (LR 0) configured to start from it."""
    root = tmp_path_factory.mktemp("from_workdir")
    config_a = _config("a")
    trainer_a, cfg_a = _trainer(config_a)
    workdir_a = str(root / "stage_a")
    os.makedirs(workdir_a)
    save_model_config(cfg_a, workdir_a)
    state_a = _run(config_a, trainer_a, workdir_a)
    config_b = _config("b", learning_rate=0.0)
    config_b = config_b.replace(init={"from_workdir": workdir_a})
    trainer_b, _ = _trainer(config_b)
    return {"root": root, "workdir_a": workdir_a, "trainer_a": trainer_a,
            "params_a": state_a.params, "config_b": config_b, "trainer_b": trainer_b,
            "init_a": _flat(trainer_a.init_state(0).params)}


def _stored_dtypes(trainer):
    """{path: dtype} of the trainer's state params: what restores cast to."""
    return {"/".join(k): v.dtype for k, v in
            traverse_util.flatten_dict(trainer.abstract_state.params).items()}


def test_stage_b_carries_every_part_of_stage_a(runs, caplog):
    trainer = runs["trainer_b"]
    with caplog.at_level(logging.INFO):
        state = trainer.init_state(0)
    a, b = _flat(runs["params_a"]), _flat(state.params)
    assert not np.array_equal(a["projector/kernel"], runs["init_a"]["projector/kernel"])
    adapters = sorted(set(b) - set(a))
    assert set(a) <= set(b) and adapters and all("/adapter_" in p for p in adapters)
    # Each stage stores what it freezes in bf16 (train.frozen_param_dtype) and trains fp32
    # masters: A's q/k/v were fp32 masters, B freezes them.
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert a["llm/layers/q_proj/kernel"].dtype == np.float32
    assert a["llm/layers/o_proj/kernel"].dtype == bf16 == b["llm/layers/q_proj/kernel"].dtype
    assert b["projector/kernel"].dtype == np.float32 == b["llm/layers/q_proj/adapter_scale"].dtype
    dtypes = _stored_dtypes(trainer)
    for path in a:  # every tensor of A, as B stores it
        assert b[path].dtype == dtypes[path], path
        np.testing.assert_array_equal(b[path], a[path].astype(dtypes[path]), err_msg=path)
    for path in adapters:
        assert np.all(b[path] == (1.0 if path.endswith("scale") else 0.0)), path
    assert int(state.step) == 0
    assert all(not np.any(x) for x in jax.tree.leaves(jax.device_get(state.opt_state)))
    log = caplog.text
    assert (f"lacks {len(adapters)} parameters; they keep their usual init: llm/layers/"
            "{down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj}/"
            "{adapter_bias,adapter_scale}") in log
    # Every leaf, restored or initialised, already sits on the state's sharding.
    for leaf, sharding in zip(jax.tree.leaves(state.params),
                              jax.tree.leaves(trainer.state_shardings.params)):
        assert isinstance(leaf, jax.Array) and leaf.sharding == sharding


def test_init_state_compiles_once(runs):
    trainer = runs["trainer_b"]
    trainer.init_state(0)
    trainer.init_state(1)
    assert trainer._init._cache_size() == 1


def test_orbax_restores_into_the_target_shardings(runs, monkeypatch):
    """No numpy copy of the whole tree: every leaf is asked of orbax with its sharding."""
    trainer, calls = runs["trainer_b"], []
    real = ocp.PyTreeCheckpointHandler.restore

    def spy(self, directory, args=None):
        calls.append(args)
        return real(self, directory, args=args)

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", spy)
    targets = traverse_util.flatten_dict(trainer.abstract_state.params)
    ckpt_lib.restore_from_workdir(runs["workdir_a"], trainer.abstract_state.params)
    (args,) = calls
    requested = traverse_util.flatten_dict(args.restore_args)
    assert args.partial_restore and all(k[0] == "params" for k in requested)  # no opt_state
    assert len(requested) == len(targets) - sum("adapter_" in k[-1] for k in targets)
    for key, restore_arg in requested.items():
        assert isinstance(restore_arg, ocp.ArrayRestoreArgs)
        assert restore_arg.sharding == targets[key[1:]].sharding


def test_stage_b_with_lr_0_gives_stage_a_logits(runs):
    """Every part carried and the adapters at identity: stage B's forward is stage A's on the
    same weights (A's fp32 q/k/v and norm scales rounded to bf16, as B stores what it freezes).
    Equal to fp32 rounding, not bitwise: the identity adapters' ops change XLA's fusion of the
    linears."""
    trainer_b = runs["trainer_b"]
    start = trainer_b.init_state(0)
    before = _flat(start.params)
    state, _ = trainer_b.train_step(start, _batch(1), 0)
    for path, value in _flat(state.params).items():  # LR 0: the step moved nothing
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    batch = _batch(2)
    dtypes = _stored_dtypes(trainer_b)
    as_b_stores = jax.tree_util.tree_map_with_path(
        lambda path, x: x.astype(dtypes["/".join(k.key for k in path)]), runs["params_a"])
    expected = _logits(runs["trainer_a"], as_b_stores, batch)
    np.testing.assert_allclose(_logits(trainer_b, state.params, batch), expected,
                               rtol=1e-5, atol=1e-5)


def test_a_restarted_stage_b_run_resumes_its_own_checkpoint(runs, tmp_path, monkeypatch):
    config, trainer = runs["config_b"], runs["trainer_b"]
    config = config.replace(train={"num_steps": 1})
    workdir = str(tmp_path / "stage_b")
    _run(config, trainer, workdir)

    def no_init(seed):
        raise AssertionError("init_state called although the run has a checkpoint")

    monkeypatch.setattr(trainer, "init_state", no_init)
    state = _run(config, trainer, workdir)
    assert int(state.step) == 1


def _fake_workdir(path, params: dict, opt_state=None):
    """A workdir whose latest checkpoint holds these numpy params (flat, '/'-keyed)."""
    tree = {"step": np.int32(7), "params": traverse_util.unflatten_dict(params, sep="/"),
            "opt_state": opt_state if opt_state is not None else {"mu": np.zeros(3)}}
    with ocp.CheckpointManager(os.path.join(path, "checkpoints")) as mngr:
        mngr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
        mngr.wait_until_finished()
    return str(path)


def test_mismatches_are_named(runs, tmp_path):
    targets = runs["trainer_b"].abstract_state.params
    a = _flat(runs["params_a"])

    wrong = dict(a, **{"projector/kernel": np.zeros((7, 64), np.float32)})
    with pytest.raises(ValueError, match=r"tensor params/projector/kernel has shape \(7, 64\) in "
                                         r".* the model expects \(144, 64\)"):
        ckpt_lib.restore_from_workdir(_fake_workdir(tmp_path / "size", wrong), targets)
    extra = dict(a, **{"llm/norm/bias": np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected 1 \[params/llm/norm/bias\]"):
        ckpt_lib.restore_from_workdir(_fake_workdir(tmp_path / "extra", extra), targets)
    missing = {k: v for k, v in a.items() if k != "llm/norm/scale"}
    with pytest.raises(ValueError, match=r"missing 1 \[params/llm/norm/scale\]"):
        ckpt_lib.restore_from_workdir(_fake_workdir(tmp_path / "missing", missing), targets)
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        ckpt_lib.restore_from_workdir(str(tmp_path / "empty"), targets)
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        ckpt_lib.restore_from_workdir(str(tmp_path), targets)


def test_leaves_restore_in_the_state_dtypes_and_init_parts_override(runs, tmp_path):
    """Stored dtype -> the state's dtype on restore (bf16 -> fp32 for what stage B trains, fp32
    -> bf16 for what it freezes); init.llm replaces the workdir's decoder; an optimizer state of
    a foreign layout is never read."""
    trainer = runs["trainer_b"]
    a = _flat(runs["params_a"])
    half = {k: v.astype(ml_dtypes.bfloat16) for k, v in a.items()}
    workdir = _fake_workdir(tmp_path / "bf16", half, opt_state={"odd": np.zeros((5, 5))})
    converted = str(tmp_path / "llm")
    os.makedirs(converted)
    llm = {k: v + 1.0 for k, v in a.items() if k.startswith("llm/")}
    ckpt_lib.write_params_streaming(converted, iter([[(tuple(k.split("/")), v)
                                                      for k, v in llm.items()]]))
    ckpt_lib.save_llama_config(converted, trainer.model.cfg.llm)
    before = trainer.init_cfg
    try:
        trainer.init_cfg = InitConfig(from_workdir=workdir, llm=converted)
        state = trainer.init_state(0)
    finally:
        trainer.init_cfg = before
    b = _flat(state.params)
    dtypes = _stored_dtypes(trainer)
    assert dtypes["projector/kernel"] == np.float32  # trained by B: bf16 on disk, fp32 master
    assert dtypes["llm/layers/q_proj/kernel"] == ml_dtypes.bfloat16  # frozen by B
    for path in a:
        expected = (llm[path] if path.startswith("llm/") else half[path]).astype(dtypes[path])
        assert b[path].dtype == dtypes[path], path
        np.testing.assert_array_equal(b[path], expected, err_msg=path)


def test_stage_b_export_keeps_its_fp32_scales_on_bf16_frozen_kernels(runs, tmp_path):
    """orbax-to-hf of a stage-B run (decoder frozen in bf16, adapters trained in fp32): the
    merged linears and the whole export are fp32, so transformers gives our logits; a bf16
    product s * W would round a scale of 1 + 1e-3 away (bf16 keeps 8 significant bits)."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from earthgpt_jax.convert import llama as conv

    trainer = runs["trainer_b"]
    params = _flat(trainer.init_state(0).params)
    rng = np.random.default_rng(0)
    for path in [p for p in params if "/adapter_" in p]:
        shape = params[path].shape
        params[path] = ((1.0 if path.endswith("scale") else 0.0)
                        + rng.normal(0, 2e-3, shape)).astype(np.float32)
    assert params["llm/layers/q_proj/kernel"].dtype == ml_dtypes.bfloat16
    workdir = _fake_workdir(tmp_path / "stage_b", params)
    save_model_config(trainer.model.cfg, workdir)
    conv.orbax_to_hf(workdir, str(tmp_path / "hf"))
    ids = np.random.default_rng(1).integers(3, VOCAB, (2, 12))
    llm, cfg = conv.load_llm_params(workdir)
    ours = conv.text_logits(llm, cfg, ids)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=1e-5)
    identity = {k: np.ones_like(v) if k.endswith("adapter_scale") else np.zeros_like(v)
                for k, v in traverse_util.flatten_dict(llm, sep="/").items() if "/adapter_" in k}
    plain = traverse_util.unflatten_dict(
        traverse_util.flatten_dict(llm, sep="/") | identity, sep="/")
    assert np.abs(conv.text_logits(plain, cfg, ids) - ours).max() > 1e-4  # the scales matter


def test_serving_restores_each_leaf_in_the_dtype_it_was_saved_in(runs):
    """What eval, chat and the web chat read (InferenceSession: stored_dtypes): a run's
    bf16-frozen weights stay bf16, half their fp32 size; fp32 targets would double them."""
    from earthgpt_jax.models.earthgpt import abstract_params
    fp32 = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, np.float32,
                                       sharding=jax.sharding.SingleDeviceSharding(
                                           jax.devices()[0])),
        nn.unbox(abstract_params(runs["trainer_a"].model)))
    params, step = ckpt_lib.restore_params(runs["workdir_a"], fp32, stored_dtypes=True)
    got, want = _flat(params), _flat(runs["params_a"])
    assert step == 3 and set(got) == set(want)
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    assert got["llm/layers/o_proj/kernel"].dtype == np.dtype(ml_dtypes.bfloat16)
    cast, _ = ckpt_lib.restore_params(runs["workdir_a"], fp32)
    assert _flat(cast)["llm/layers/o_proj/kernel"].dtype == np.float32
