"""The typed run config is the one source: configs/mmrs.py's ConfigDict (what --config.<key>
overrides) goes back to the same types, and a value a field refuses is one ValueError naming
`config.<section>.<field>`."""

import dataclasses

import pytest

from configs import mmrs
from earthgpt_jax import config as run_config


@pytest.mark.parametrize("arg", ["", "demo", "size=7b,stage=a", "size=13b,stage=b", "size=7b"])
def test_every_preset_round_trips_through_the_config_dict(arg):
    typed = mmrs.get_run_config(arg)
    assert run_config.from_config_dict(mmrs.get_config(arg)) == typed
    # Every field of every section is a key --config can override, and nothing else is.
    flat = mmrs.get_config(arg)
    for section in dataclasses.fields(run_config.RunConfig):
        names = {f.name for f in dataclasses.fields(getattr(typed, section.name))}
        assert set(flat[section.name].keys()) == names


def test_presets_differ_where_they_say():
    a, b, demo = (mmrs.get_run_config(arg) for arg in ("size=7b,stage=a", "", "demo"))
    assert (a.model.size, a.train.stage, b.model.size, b.train.stage) == ("7b", "a", "13b", "b")
    assert a.data.sources.startswith("coco:") and b.data.sources == ""
    assert demo.data.synthetic and not demo.data.packing and demo.model.size == "demo"


def test_overrides_keep_their_types_and_rules_become_tuples():
    config = mmrs.get_config("demo")
    config.train.num_steps = 3
    config.mesh.rules = [["batch", ["data", "fsdp"]], ["embed", None]]
    typed = run_config.from_config_dict(config)
    assert typed.train.num_steps == 3
    assert typed.mesh.rules == (("batch", ("data", "fsdp")), ("embed", None))
    hash(typed.mesh.rules)  # jax's logical-axis rules must be hashable


@pytest.mark.parametrize("section, fields, message", [
    ("train", {"stage": "c"}, r"config.train.stage='c' is not one of all, a, b"),
    ("train", {"loss_normalization": "mean"}, r"config.train.loss_normalization='mean'"),
    ("train", {"batch_size": 15, "grad_accum_steps": 2}, r"batch_size=15 must divide"),
    ("train", {"loss_chunk": -1}, r"config.train.loss_chunk=-1 must be >= 0 \(0: no chunking\)"),
    ("model", {"size": "70b"}, r"config.model.size='70b' is not one of tiny, demo, 7b, 13b"),
    ("data", {"num_workers": -1}, r"config.data.num_workers must be >= 0"),
    ("mesh", {"layout": "fsdp"}, r"config.mesh.layout='fsdp' is not one of auto, manual"),
    ("mesh", {"memory_limit_gib": -1.0}, r"config.mesh.memory_limit_gib=-1.0 must be >= 0"),
])
def test_a_value_a_field_refuses_names_it(section, fields, message):
    with pytest.raises(ValueError, match=message):
        run_config.RunConfig().replace(**{section: fields})


def test_an_unknown_key_names_the_closest_field():
    with pytest.raises(ValueError, match=r"config.train.num_stepz: no such field; did you mean "
                                         r"train.num_steps\?"):
        run_config.from_config_dict({"train": {"num_stepz": 3}})
    with pytest.raises(ValueError, match=r"config.trian: no such section"):
        run_config.from_config_dict({"trian": {}})


def test_model_lora_is_a_nested_section_of_the_config_dict():
    config = mmrs.get_config("size=7b,stage=lora")
    config.model.lora.rank = 8
    config.model.lora.targets = "q_proj,v_proj"
    typed = run_config.from_config_dict(config)
    assert isinstance(typed.model.lora, run_config.LoraConfig)
    assert (typed.train.stage, typed.model.lora.rank, typed.model.lora.modules) == (
        "lora", 8, ("q_proj", "v_proj"))
    assert typed == mmrs.get_run_config("size=7b,stage=lora").replace(
        model={"lora": {"rank": 8, "targets": "q_proj,v_proj"}})
    with pytest.raises(ValueError, match=r"config.model.lora.rnak: no such field; did you mean "
                                         r"model.lora.rank\?"):
        run_config.from_config_dict({"model": {"lora": {"rnak": 8}}})
