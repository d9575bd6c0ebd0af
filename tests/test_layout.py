"""config.mesh.layout=auto: plain data parallelism where XLA says the compiled train step fits a
device, the configured (FSDP) mesh otherwise. The 2-process run of test_multiprocess.py trains
on the data-parallel mesh this picks and matches a 1-process FSDP run."""

import math

import jax
import pytest

from configs import mmrs
from earthgpt_jax import layout, parallel, train as train_lib
from earthgpt_jax.run import model_config


def _configured(**mesh):
    config = mmrs.get_run_config("demo").replace(
        model={"size": "tiny"}, train={"stage": "b", "batch_size": 8},
        data={"packing": False, "max_text_len": 16}, mesh=mesh)
    trainer = train_lib.Trainer.for_run(config, model_config(config),
                                        parallel.build_mesh(config.mesh))
    return config, trainer


def _embedding_shards(trainer):
    """How many pieces the (frozen) token embedding is cut into on this mesh."""
    leaf = trainer.abstract_state.params["llm"]["embed_tokens"]["embedding"]
    return leaf.size // math.prod(leaf.sharding.shard_shape(leaf.shape))


def test_data_parallelism_is_chosen_where_the_compiled_step_fits():
    config, fsdp = _configured()
    assert dict(fsdp.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert _embedding_shards(fsdp) == 8
    trainer, record = layout.choose_trainer(config, fsdp, memory_gib=4.0)
    assert dict(trainer.mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert record["chosen"] == "data parallel"
    # Every device holds the whole frozen model: nothing to gather in the step.
    assert _embedding_shards(trainer) == 1
    facts = record["data_parallel"]
    assert 0 < facts["state_gib"] < facts["peak_gib"] <= facts["budget_gib"]
    assert facts["budget_gib"] == pytest.approx(layout.HEADROOM * 4.0)


def test_the_configured_mesh_stays_when_data_parallelism_does_not_fit():
    config, fsdp = _configured()
    _, fitting = layout.choose_trainer(config, fsdp, memory_gib=4.0)
    state, peak = fitting["data_parallel"]["state_gib"], fitting["data_parallel"]["peak_gib"]
    # The state fits, the compiled step (activations, gradients, optimizer update) does not:
    # only XLA's analysis can tell.
    between = (state + peak) / 2 / layout.HEADROOM
    trainer, record = layout.choose_trainer(config, fsdp, memory_gib=between)
    assert trainer is fsdp and record["chosen"] == "as configured"
    assert record["data_parallel"]["peak_gib"] > record["data_parallel"]["budget_gib"]
    # Below the state itself nothing is compiled.
    trainer, record = layout.choose_trainer(config, fsdp, memory_gib=state / 2)
    assert trainer is fsdp
    assert record["data_parallel"]["reason"] == "the train state alone exceeds the budget"
    assert "peak_gib" not in record["data_parallel"]


@pytest.mark.parametrize("mesh", [
    {"layout": "manual"},  # asked for
    {"ici": {"data": 2, "fsdp": 4, "tensor": 1}},  # axes the user set
], ids=["manual", "user_axes"])
def test_a_layout_the_user_chose_is_kept(mesh):
    config, configured = _configured(**mesh)
    trainer, record = layout.choose_trainer(config, configured, memory_gib=4.0)
    assert trainer is configured and record["chosen"] == "as configured"
    assert "data_parallel" not in record


def test_without_a_memory_size_auto_keeps_the_configured_mesh(caplog):
    config, fsdp = _configured()
    assert layout.device_memory_gib(jax.devices()[0]) is None  # CPU reports none
    with caplog.at_level("INFO"):
        trainer, _ = layout.choose_trainer(config, fsdp)
    assert trainer is fsdp
    assert "memory_limit_gib" in caplog.text
    # config.mesh.memory_limit_gib stands in for the device's own figure.
    config = config.replace(mesh={"memory_limit_gib": 4.0})
    trainer, _ = layout.choose_trainer(config, fsdp)
    assert dict(trainer.mesh.shape)["data"] == 8


def test_the_run_reuses_the_step_auto_compiled(caplog):
    """Keeping data parallelism costs no second compile: the first step runs the executable
    that choose_trainer compiled to measure it."""
    import numpy as np
    config, fsdp = _configured()
    step_compiled = "Finished XLA compilation of jit(_step)"
    with caplog.at_level("WARNING", logger="jax._src.dispatch"), jax.log_compiles():
        trainer, _ = layout.choose_trainer(config, fsdp, memory_gib=4.0)
        assert step_compiled in caplog.text  # the measuring compile, logged as such
        state = trainer.init_state(0)
        caplog.clear()
        batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in trainer.batch_shapes.items()}
        state, metrics = trainer.train_step(state, batch, 0)
        jax.block_until_ready(metrics)
    assert step_compiled not in caplog.text
    assert int(state.step) == 1
