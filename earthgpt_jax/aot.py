"""Ahead-of-time compilation of the real train step for a TPU topology, on any host.

libtpu describes a TPU topology without the chips being there, so the train step compiles for,
say, a v5p-128 from a laptop: XLA then tells how much HBM each chip needs and whether the
configuration fits, before any TPU time is paid for (MaxText's `train_compile` idea).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax

from earthgpt_jax.models.flops import device_peak_flops, train_step_flops


# Cloud TPU accelerator types count TensorCores for v4/v5p (2 per chip) and chips for v5e/v6e.
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
# HBM per chip (GiB); each generation's `jax.Device.device_kind`, the key of flops.py's peaks.
HBM_GIB = {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}
DEVICE_KIND = {"v4": "TPU v4", "v5p": "TPU v5", "v5e": "TPU v5 lite", "v6e": "TPU v6 lite"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str
    chips: int
    shape: tuple[int, ...]   # chip grid of one slice
    num_slices: int

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """The most cube-like power-of-two grid with `chips` chips (Cloud TPU slice shapes)."""
    if chips & (chips - 1):
        raise ValueError(f"{chips} chips is not a power of two; give the shape, e.g. v5p:4x4x8")
    shape = [1] * dims
    for i in range(chips.bit_length() - 1):
        shape[i % dims] *= 2
    # Ascending like Cloud TPU's names (v4-32 is 2x2x4), but a unit axis goes last: a 4-chip
    # slice is 2x2x1, which is what libtpu's 2x2x1 chips-per-host bounds divide.
    return tuple(sorted(shape, key=lambda d: (d == 1, d)))


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """'v5p-128' (an accelerator type) or 'v5e:4x4' (an explicit chip grid) -> Topology."""
    name = name.strip().lower()
    explicit = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)*)", name)
    typed = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
    if not (explicit or typed):
        raise ValueError(f"unknown TPU topology {name!r}: use an accelerator type such as "
                         f"v4-32, v5e-64, v5p-128, or a chip grid such as v5e:4x4")
    generation = (explicit or typed).group(1)
    generation = _ALIASES.get(generation, generation)
    if generation not in CORES_PER_CHIP:
        raise ValueError(f"unknown TPU generation {generation!r}; known: "
                         f"{', '.join(CORES_PER_CHIP)}")
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if explicit:
        shape = tuple(int(d) for d in explicit.group(2).split("x"))
    else:
        chips = int(typed.group(2)) // CORES_PER_CHIP[generation]
        shape = _grid(max(chips, 1), 2 if generation in ("v5e", "v6e") else 3)
    return Topology(generation, math.prod(shape), shape, num_slices)


LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"


class LibtpuBusyError(RuntimeError):
    """Another live process on this host holds libtpu (its lock file)."""


def _lock_holders(path: str = LIBTPU_LOCKFILE) -> list[str]:
    """'PID (command)' of each process with `path` open, from /proc (Linux; [] elsewhere)."""
    holders = []
    pids = os.listdir("/proc") if os.path.isdir("/proc") else []
    # This process opened the file too, before failing to lock it.
    for pid in (p for p in pids if p.isdigit() and int(p) != os.getpid()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in fds):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                holders.append(f"{pid} ({command[:80]})")
        except OSError:  # gone, or not ours to read
            continue
    return holders


def topology_devices(topo: Topology):
    from jax.experimental import topologies
    bounds = (2, 2, 1) if len(topo.shape) == 3 or topo.chips >= 4 else (1, 1, 1)
    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.name,
            # Two-core chips (v4, v5p) run as one device per chip ("megacore"), as on Cloud TPU.
            chip_config_name="megacore" if CORES_PER_CHIP[topo.generation] == 2 else "default",
            chips_per_host_bounds=bounds, num_slices=topo.num_slices)
    except jax.errors.JaxRuntimeError as e:
        if "libtpu_lockfile" not in str(e):
            raise
        # libtpu's own advice ("sudo rm /tmp/libtpu_lockfile") is wrong while the holder lives.
        holders = _lock_holders()
        who = (f"held by {', '.join(holders)}" if holders else
               "no process this user can see holds it; if none does, remove it")
        raise LibtpuBusyError(
            f"libtpu is in use by another process on this host ({LIBTPU_LOCKFILE}: {who}); "
            f"wait for it to finish, or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 when it only compiles "
            f"too (no TPU chips in use)") from None
    return desc.devices


def compile_train_step(config, model_cfg, topology: str, num_slices: int = 1) -> dict:
    """Compiles the train step for `topology`; returns the per-chip memory/FLOP report. The
    mesh is the one a run on that slice would take (config.mesh.layout, layout.py)."""
    from earthgpt_jax import layout, parallel, train as trainer_lib

    topo = parse_topology(topology, num_slices)
    # auto's data-parallel candidate is compiled (and kept if it fits the chip's HBM) first.
    configured = trainer_lib.Trainer.for_run(
        config, model_cfg, parallel.build_mesh(config.mesh, topology_devices(topo)))
    trainer, choice = layout.choose_trainer(config, configured, HBM_GIB[topo.generation])
    mesh = trainer.mesh
    batch, data = config.train.batch_size, config.data
    parallel.check_batch_divides(batch, mesh)
    images_per_row = trainer_lib.images_per_pack(data, model_cfg) if data.packing else 1
    packed_length = data.pack_length if data.packing else None
    attention_impl = trainer.model.cfg.llm.attention_impl
    report = {"topology": topo.name, "num_slices": topo.num_slices,
              "chips": topo.chips * topo.num_slices, "mesh": dict(mesh.shape),
              "layout": choice,
              "global_batch": batch, "hbm_gib_per_chip": HBM_GIB[topo.generation],
              "remat_policy": model_cfg.remat_policy, "attention_impl": attention_impl,
              "frozen_param_dtype": config.train.frozen_param_dtype,
              "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", ""),
              "parameters": trainer.summary,
              # What the FLOP figures below are of (models/flops.flops_for_spec recomputes
              # them; tests/test_flops.py does for every committed result file).
              "flops_spec": {"size": config.model.size, "stage": config.train.stage,
                             "rows": batch, "text_len": data.max_text_len,
                             "pack_length": packed_length or 0, "images_per_row": images_per_row,
                             "attention_impl": attention_impl,
                             "remat_policy": model_cfg.remat_policy,
                             "loss_chunk": config.train.loss_chunk}}
    compiled, refusal = layout.compile_or_refusal(trainer)
    if compiled is None:
        return report | {"fits": False, "error": refusal[:400]}
    memory = layout.compiled_memory(compiled)
    peak = memory.pop("peak_gib")
    # Model FLOPs of a step whose samples all have max_text_len text tokens (as many per packed
    # row as fit): the real mix of lengths is unknown here. Hardware FLOPs beside it.
    flops = train_step_flops(model_cfg, batch, data.max_text_len, config.train.stage,
                             packed_length=packed_length,
                             images_per_row=images_per_row)["total"]
    chip_peak = device_peak_flops(DEVICE_KIND[topo.generation])
    return report | {
        "fits": True, "per_chip": memory, "xla_peak_gib": peak,
        "model_tflops_per_step": flops / 1e12,
        "hardware_tflops_per_step": trainer.executed_flops / 1e12,
        "step_seconds_at_50pct_mfu": flops / (0.5 * chip_peak * report["chips"]),
    }


def format_report(r: dict) -> str:
    head = (f"{r['topology']} x{r['num_slices']} slice(s), {r['chips']} chips, mesh {r['mesh']}, "
            f"global batch {r['global_batch']}, remat {r['remat_policy']}, frozen weights in "
            f"{r['frozen_param_dtype']}")
    if not r["fits"]:
        return f"{head}\n  DOES NOT FIT: {r['error']}"
    m = r["per_chip"]
    return (f"{head}\n  per chip: arguments {m['arguments_gib']:.2f} GiB, temporaries "
            f"{m['temporaries_gib']:.2f} GiB, code {m['code_gib']:.3f} GiB, total "
            f"{m['total_gib']:.2f} GiB of {r['hbm_gib_per_chip']} GiB HBM (XLA peak "
            f"{r['xla_peak_gib']:.2f} GiB)\n  model FLOPs per step "
            f"{r['model_tflops_per_step']:.1f} TFLOP; {r['step_seconds_at_50pct_mfu']:.3f} s/step "
            f"at 50% MFU")
