"""models/flops.py: hardware FLOPs equal, to the FLOP, the matmuls of the train step's jaxpr
for every remat policy (so the recompute accounting is exact); model FLOPs count real samples
only (causal half, no padding, no blank image slots); every committed result file's FLOP
figures equal the formula's for the configuration it stores, so a formula change forces a
rerun or a correction."""

import dataclasses
import json
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from benchmarks import train_vs_torch
from earthgpt_jax import optim, train as train_lib
from earthgpt_jax.models import flops
from earthgpt_jax.models.earthgpt import EarthGPT, abstract_params, dummy_inputs
from earthgpt_jax.models.llama import REMAT_POLICIES

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _config(stage, remat="none", scan=True):
    cfg = train_vs_torch.bench_model_config("tiny", stage)
    return dataclasses.replace(cfg, remat_policy=remat,
                               llm=dataclasses.replace(cfg.llm, scan_layers=scan))


def _step_jaxpr_flops(cfg, stage, inputs, method=None, loss_chunk=0):
    """Matmul FLOPs of loss + gradients w.r.t. the stage's trainable leaves (train.py's split:
    frozen leaves are not differentiated), read off the jaxpr. With `loss_chunk`, the loss is
    train.chunked_cross_entropy's over the hidden states, as the train step computes it."""
    model = EarthGPT(cfg)
    params = traverse_util.flatten_dict(nn.unbox(abstract_params(model)))
    labels = traverse_util.flatten_dict(optim.trainable_labels(
        traverse_util.unflatten_dict(params), stage))
    trained = {k: v for k, v in params.items() if labels[k] == "train"}
    frozen = {k: v for k, v in params.items() if labels[k] != "train"}

    def loss(t, f, *x):
        variables = {"params": traverse_util.unflatten_dict({**t, **f})}
        if not loss_chunk:
            return jnp.sum(model.apply(variables, *x, method=method))
        hidden = model.apply(variables, *x, True, method=method)

        def head(h):
            return model.apply(variables, h, method=EarthGPT.head)
        targets = jnp.zeros(hidden.shape[:2], jnp.int32)
        return jnp.sum(train_lib.chunked_cross_entropy(head, hidden, targets, loss_chunk))

    return flops.jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(loss))(trained, frozen, *inputs))


@pytest.mark.parametrize("stage", ["a", "b"])
@pytest.mark.parametrize("remat", ["none"] + sorted(REMAT_POLICIES))
def test_hardware_flops_are_the_train_steps_matmuls(stage, remat):
    cfg = _config(stage, remat)
    got = _step_jaxpr_flops(cfg, stage, dummy_inputs(cfg, 2, 6))
    assert got == flops.executed_train_step_flops(cfg, 2, 6, stage)["total"]


def test_hardware_flops_of_unrolled_layers_and_packed_rows():
    cfg = _config("b", "save_qkv_proj", scan=False)
    assert _step_jaxpr_flops(cfg, "b", dummy_inputs(cfg, 2, 6)) == \
        flops.executed_train_step_flops(cfg, 2, 6, "b")["total"]
    cfg = _config("b", "full")
    rows, length, slots = 2, 24, 3
    packed = (jnp.zeros((rows, slots, cfg.image_size, cfg.image_size, 3), jnp.uint8),
              jnp.zeros((rows, length), jnp.int32), jnp.ones((rows, length), jnp.int32),
              jnp.zeros((rows, length), jnp.int32))
    assert _step_jaxpr_flops(cfg, "b", packed, EarthGPT.packed_logits) == \
        flops.executed_train_step_flops(cfg, rows, 0, "b", packed_length=length,
                                        images_per_row=slots)["total"]


@pytest.mark.parametrize("stage", ["a", "b"])
def test_hardware_flops_of_a_chunked_loss(stage):
    """train.loss_chunk: the LM head over whole chunks (6 text positions in chunks of 4: 8),
    and once more in the backward pass."""
    cfg = _config(stage, "full")
    got = _step_jaxpr_flops(cfg, stage, dummy_inputs(cfg, 2, 6), loss_chunk=4)
    counted = flops.executed_train_step_flops(cfg, 2, 6, stage, loss_chunk=4)
    assert got == counted["total"]
    llm = cfg.llm
    assert counted["loss_chunk_recompute"] == 2.0 * llm.hidden_size * llm.vocab_size * 2 * 8


def test_model_flops_count_real_samples_causally():
    cfg = _config("b")
    llm, visual = cfg.llm, cfg.num_visual_tokens
    one = flops.model_flops(cfg, "b", [5])
    seq = 1 + visual + 5
    assert one["attention_forward"] == 2 * 2 * llm.num_heads * llm.head_dim * llm.num_layers \
        * seq * (seq + 1) / 2
    # additive over samples, however they sit in rows
    two = flops.model_flops(cfg, "b", [5, 9])
    assert two["total"] == pytest.approx(one["total"] + flops.model_flops(cfg, "b", [9])["total"])
    # padded rows: only the valid text tokens count
    valid = np.zeros((2, 12), bool)
    valid[0, :5], valid[1, :9] = True, True
    assert flops.batch_model_flops(cfg, "b", {"valid": valid})["total"] == two["total"]
    # packed rows: each segment is a sample; padding (0) and blank slots are not counted
    seg = np.zeros((1, 40), np.int32)
    seg[0, :seq], seg[0, seq:seq + 1 + visual + 9] = 1, 2
    assert flops.batch_model_flops(cfg, "b", {"segment_ids": seg})["total"] == two["total"]
    packed = flops.train_step_flops(cfg, 3, 5, "b", packed_length=40, images_per_row=7)
    per_row = 40 // seq  # samples of `seq` positions a 40-position row holds (< 7 slots)
    assert packed["total"] == pytest.approx(
        flops.train_step_flops(cfg, 3 * per_row, 5, "b")["total"])
    # the step runs more than the model needs: the masked half of the scores (einsum), the
    # padding of a packed row and its blank slots, remat's recompute
    run = flops.executed_train_step_flops(cfg, 3, 5, "b", packed_length=40, images_per_row=7)
    assert run["total"] > packed["total"]
    unpadded = flops.executed_train_step_flops(cfg, 2, 5, "b")
    model = flops.train_step_flops(cfg, 2, 5, "b")
    masked_half = 2 * 2 * llm.num_heads * llm.head_dim * llm.num_layers * 2 * seq * (seq - 1) / 2
    assert unpadded["total"] - model["total"] == pytest.approx(3 * masked_half)


def _walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _check_json(path: pathlib.Path) -> int:
    record = json.loads(path.read_text())
    checked = 0
    for where, node in _walk(record):
        figures = [k for k in node if re.search(r"tflops|mfu|utilisation", k)
                   and k not in ("flops_breakdown_tflops", "hardware_flops_breakdown_tflops")]
        if where.endswith(("/as_first_reported", "/assumptions")):
            continue  # superseded figures kept beside their correction; assumed inputs
        if not figures:
            continue
        assert "flops_spec" in node, f"{path.name}{where}: FLOP figures {figures} without a " \
                                     "flops_spec to recompute them from"
        spec = dict(node["flops_spec"])
        if "text_length_counts_from" in spec:
            source = record
            for key in spec.pop("text_length_counts_from").split("."):
                source = source[key]
            spec["text_length_counts"] = source
        model, hardware = flops.flops_for_spec(spec)
        if "model_tflops_per_step" in node:
            assert node["model_tflops_per_step"] == pytest.approx(model["total"] / 1e12,
                                                                  rel=1e-9), (path.name, where)
        if "hardware_tflops_per_step" in node:
            assert node["hardware_tflops_per_step"] == pytest.approx(
                hardware["total"] / 1e12, rel=1e-9), (path.name, where)
        if "model_tflops_per_sample" in node:
            samples = sum(spec["text_length_counts"].values())
            assert node["model_tflops_per_sample"] == pytest.approx(
                model["total"] / samples / 1e12, rel=1e-9), (path.name, where)
        step = node.get("step_s_median")
        for key in figures:
            peak = None
            if key.endswith("_vs_datasheet_bf16"):
                peak = flops.device_peak_flops(record["env"]["device"])
            elif key.endswith("_vs_measured_bf16_matmul"):
                peak = record["peak"]["matmul_bf16_flops"]
            if peak and step:
                numerator = model if key.startswith("mfu") else hardware
                assert node[key] == pytest.approx(numerator["total"] / step / peak, rel=1e-9)
        checked += 1
    return checked


def _check_aot_table(path: pathlib.Path) -> int:
    """aot_table.md: per-chip batch 1 over every chip, 1024 positions (767 text tokens)."""
    from earthgpt_jax.models.presets import get_preset
    checked = 0
    for line in path.read_text().splitlines():
        m = re.match(r"^\| (7b|13b) \| ([AB]) \| [^|]+\((\d+) chips\) \| yes \|"
                     r"(?:[^|]*\|){3} ([\d.]+) \|", line)
        if not m:
            continue
        size, stage, chips = m.group(1), m.group(2).lower(), int(m.group(3))
        cfg = get_preset(size, llm={"adapters": stage == "b"})
        model = flops.train_step_flops(cfg, chips, 767, stage)["total"] / 1e12
        assert float(m.group(4)) == pytest.approx(model, abs=0.5), line
        checked += 1
    return checked


def test_every_committed_result_matches_the_formula():
    """A FLOP formula change fails here until each result is rerun or corrected."""
    checked = {}
    for path in sorted(RESULTS.iterdir()):
        if path.suffix == ".json":
            checked[path.name] = _check_json(path)
        elif path.name == "aot_table.md":
            checked[path.name] = _check_aot_table(path)
            assert checked[path.name] >= 12
        elif path.suffix == ".log":  # a run's console output: its figures are in its .json
            assert path.with_suffix(".json").exists(), path.name
        else:
            pytest.fail(f"{path.name}: no check for this kind of result file; add one here")
    assert checked["2026-11-27_gpu_h100_run1.json"] == 1
    assert checked["2026-11-27_gpu_h200_run2.json"] == 1
    assert checked["recipe_cost.json"] == 8  # 2 sizes x (3 stage-A epochs + 1 stage-B)
    # 7B and 13B stage B on v5e:2x2, one report per per-chip batch that compiled
    assert checked["2026-12-05_aot_v5e_2x2_stage_b.json"] >= 6
    # stage A on v5e, stage B with the overlap flags, splash, and plain data parallelism
    assert checked["2026-12-05_aot_stage_a_dp_splash.json"] == 8
    # 7B stage B with and without loss_chunk: v5e:2x2 batch 9 (batch 12 chunked: no fit), v5p-8
    assert checked["2026-12-05_aot_loss_chunk.json"] == 4
    # mesh.layout=auto, 7B stage B: data parallel on v5p-8, FSDP on v5e:2x2
    assert checked["2026-12-05_aot_layout_auto.json"] == 2


def test_remat_policies_give_no_remats_gradients():
    """Every named-checkpoint policy changes what is recomputed, never the numbers (the
    decoder with stage-B adapters: every named product is read by an adapter)."""
    from earthgpt_jax.models.llama import LlamaDecoder
    llm = _config("b").llm
    x = jax.random.normal(jax.random.key(1), (2, 12, llm.hidden_size))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    valid = jnp.ones((2, 12), bool)
    params = nn.unbox(LlamaDecoder(llm).init(jax.random.key(0), x, positions, valid)["params"])

    def grads(policy):
        decoder = LlamaDecoder(llm, remat_policy=policy)
        def loss(p, x):
            return jnp.mean(decoder.apply({"params": p}, x, positions, valid)[0] ** 2)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    reference = grads("none")
    for policy in REMAT_POLICIES:
        # fp32, summed in another order where a product is recomputed: 1e-4 relative
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     grads(policy), reference)
