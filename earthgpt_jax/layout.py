"""Choosing the mesh layout of a run: plain data parallelism where the train step fits a device,
FSDP otherwise (config.mesh.layout=auto).

Stage B freezes the whole decoder and the towers. Under FSDP every step all-gathers each frozen
weight in the forward pass and again in the backward pass (remat recomputes the forward), to
update a few dozen million adapter parameters. Under plain data parallelism each device holds the
whole (bf16) model and the step all-reduces only the trainable parameters' gradients, so where
it fits a device, the weights' traffic goes away. Whether it fits is what XLA says of the
compiled step (arguments, temporaries and code), not an estimate of ours; the compile is not
wasted when it fits, since the run's first step reuses the executable.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np

from earthgpt_jax import parallel

GIB = 1024 ** 3
# Share of a device's memory the chosen layout may plan for: what XLA's analysis leaves out
# (fragmentation, the input pipeline's device buffers, checkpoint copies) lives in the rest.
HEADROOM = 0.9


def compiled_memory(compiled) -> dict:
    """Per-device GiB of a compiled program, from XLA's memory analysis. `peak_gib` is XLA's
    own peak where the backend reports one (TPU): lower than the sum, since donated inputs'
    buffers are reused."""
    mem = compiled.memory_analysis()
    out = {
        "arguments_gib": mem.argument_size_in_bytes / GIB,
        "outputs_gib": mem.output_size_in_bytes / GIB,
        "aliased_gib": mem.alias_size_in_bytes / GIB,
        "temporaries_gib": mem.temp_size_in_bytes / GIB,
        "code_gib": mem.generated_code_size_in_bytes / GIB,
    }
    out["total_gib"] = (out["arguments_gib"] + out["outputs_gib"] - out["aliased_gib"]
                        + out["temporaries_gib"] + out["code_gib"])
    out["peak_gib"] = getattr(mem, "peak_memory_in_bytes", 0) / GIB or out["total_gib"]
    return out


def device_memory_gib(device, override_gib: float = 0.0) -> float | None:
    """The memory one device gives XLA (GPU/TPU report it); None where unknown (CPU)."""
    if override_gib:
        return float(override_gib)
    stats = device.memory_stats() or {}
    return stats["bytes_limit"] / GIB if "bytes_limit" in stats else None


def data_parallel(mesh_config):
    """`mesh_config` with the FSDP fill inside each slice turned into plain data parallelism
    (tensor parallelism and the slices' DCN axes as they were); None when the user set the ICI
    axes themselves, which auto then respects."""
    ici = dict(mesh_config.ici)
    if int(ici["data"]) != 1 or int(ici["fsdp"]) != -1:
        return None
    return dataclasses.replace(mesh_config, ici={**ici, "data": -1, "fsdp": 1})


def _state_gib_per_device(trainer) -> float:
    """Bytes of the train state on one device under the trainer's shardings: what data
    parallelism must hold before any activation, known without compiling."""
    total = 0
    for leaf in jax.tree.leaves(trainer.abstract_state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard)) * leaf.dtype.itemsize
    return total / GIB


def compile_or_refusal(trainer):
    """(the trainer's compiled step, None), or (None, XLA's one-line refusal) where XLA cannot
    fit it (TPU compiles refuse with RESOURCE_EXHAUSTED and the bytes needed); any other error
    propagates."""
    try:
        return trainer.compile_step(), None
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, str(e).splitlines()[0]


def _fits(trainer, limit_gib: float) -> tuple[bool, dict]:
    """Whether the trainer's step fits `limit_gib` x HEADROOM per device, and why."""
    budget = HEADROOM * limit_gib
    state_gib = _state_gib_per_device(trainer)
    facts = {"mesh": dict(trainer.mesh.shape), "state_gib": state_gib, "budget_gib": budget}
    if state_gib > budget:  # no compile needed to know
        return False, facts | {"reason": "the train state alone exceeds the budget"}
    compiled, refusal = compile_or_refusal(trainer)
    if compiled is None:
        return False, facts | {"reason": refusal[:300]}
    memory = compiled_memory(compiled)
    facts["peak_gib"] = memory["peak_gib"]
    return memory["peak_gib"] <= budget, facts


def choose_trainer(config, configured, memory_gib: float | None = None):
    """The Trainer of this run on the mesh config.mesh.layout picks, and a record of the choice.

    `configured` is the trainer on config.mesh as given (FSDP by default), returned under
    `manual`, with ICI axes the user set, or when data parallelism does not fit. `auto` builds
    the data-parallel trainer and keeps it if its compiled step fits a device: `memory_gib`,
    else config.mesh.memory_limit_gib, else what the device reports. Every process takes
    process 0's decision.
    """
    from earthgpt_jax.train import Trainer

    devices = list(configured.mesh.devices.flat)
    mesh_config = config.mesh
    candidate = data_parallel(mesh_config) if mesh_config.layout == "auto" else None
    limit = memory_gib or device_memory_gib(devices[0], mesh_config.memory_limit_gib)
    record = {"layout": mesh_config.layout, "memory_gib": limit, "chosen": "as configured"}
    if candidate is None or len(devices) == 1:
        return configured, record
    if limit is None:
        logging.info("mesh layout auto: %s devices report no memory size; keeping "
                     "config.mesh.ici (config.mesh.memory_limit_gib=GiB lets auto choose)",
                     devices[0].platform)
        return configured, record
    trainer = Trainer(configured.model.cfg, parallel.build_mesh(candidate, devices),
                      config.train, config.data, config.init, candidate.rules)
    fits, facts = _fits(trainer, limit)
    if jax.process_count() > 1:  # one decision for all, whatever each host measured
        from jax.experimental import multihost_utils
        fits = bool(multihost_utils.broadcast_one_to_all(np.asarray(fits)))
    record |= {"data_parallel": facts, "chosen": "data parallel" if fits else "as configured"}
    needs = (f"peak {facts['peak_gib']:.4g} GiB" if "peak_gib" in facts else facts["reason"])
    logging.info("mesh layout auto: plain data parallelism %s %s: state %.4g GiB, %s, budget "
                 "%.4g GiB (%.0f%% of %.4g); using %s", "fits" if fits else "does not fit",
                 facts["mesh"], facts["state_gib"], needs, facts["budget_gib"], HEADROOM * 100,
                 limit, "it" if fits else f"config.mesh.ici {dict(mesh_config.ici)}")
    return (trainer if fits else configured), record
