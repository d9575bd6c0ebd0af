"""Device mesh from the config, logical-axis sharding rules, and multi-host start-up.

The mesh has three axes, `data`, `fsdp`, `tensor`, each with an ICI size (inside a slice) and a
DCN size (across slices); -1 fills the remaining devices. Parameters and activations name
logical axes; the config's `rules` table maps them onto mesh axes.
"""

from __future__ import annotations

import logging
import math
import os

import jax
import numpy as np
import flax.linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# libtpu flags that overlap collectives with compute, as MaxText sets them for FSDP training:
# FSDP's per-layer all-gathers run asynchronously, fused into the compute they feed, and so does
# the data-parallel all-reduce of the gradients. Several are libtpu defaults already; stating
# them keeps a run's behaviour from depending on the libtpu release.
TPU_OVERLAP_FLAGS = (
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
)


def set_tpu_flags(environ=os.environ) -> str:
    """LIBTPU_INIT_ARGS as libtpu will read it: TPU_OVERLAP_FLAGS unless the user set it. Must
    run before libtpu loads (a TPU run's first device query, or --mode=compile's topology)."""
    return environ.setdefault("LIBTPU_INIT_ARGS", " ".join(TPU_OVERLAP_FLAGS))


def maybe_initialize_distributed(dist) -> None:
    """Joins a multi-process run when `dist` (config.distributed) or the environment describes
    one."""
    coordinator = dist.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if dist.auto:  # Cloud TPU (and SLURM/MPI clusters JAX knows): every parameter is discovered
        jax.distributed.initialize()
    elif coordinator:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=int(dist.num_processes),
                                   process_id=int(dist.process_id))
    else:
        return
    logging.info("joined %d processes as process %d", jax.process_count(), jax.process_index())


def resolve_axis_sizes(sizes: dict, total: int, what: str) -> tuple[int, ...]:
    """Fills one -1 entry so the product equals `total`; explains any clash."""
    values = [int(sizes[a]) for a in MESH_AXES]
    given = dict(zip(MESH_AXES, values))
    if values.count(-1) > 1:
        raise ValueError(f"{what}: at most one axis may be -1, got {given}")
    known = math.prod(v for v in values if v != -1)
    if -1 in values:
        if total % known:
            raise ValueError(f"{what}: {total} devices do not divide by the fixed axes' product "
                             f"{known} ({given})")
        values[values.index(-1)] = total // known
    if math.prod(values) != total:
        raise ValueError(f"{what}: axis sizes {dict(zip(MESH_AXES, values))} multiply to "
                         f"{math.prod(values)}, but there are {total} devices")
    return tuple(values)


def build_mesh(mesh_config, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    dcn = resolve_axis_sizes(mesh_config.dcn, num_slices, "config.mesh.dcn")
    ici = resolve_axis_sizes(mesh_config.ici, len(devices) // num_slices, "config.mesh.ici")
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    elif devices[0].platform == "cpu":
        grid = np.asarray(devices).reshape(ici)
    else:
        grid = mesh_utils.create_device_mesh(ici, devices)
    return Mesh(grid, MESH_AXES)


def shardings_for(boxed_tree, mesh: Mesh, rules):
    """NamedShardings for a tree of (possibly abstract) `nn.Partitioned` values."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch dimension split over `data` and `fsdp`, everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def check_batch_divides(global_batch: int, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % shards or global_batch % jax.process_count():
        raise ValueError(
            f"config.train.batch_size={global_batch} must divide by the batch shards "
            f"data*fsdp={mesh.shape['data']}*{mesh.shape['fsdp']}={shards} and by the "
            f"{jax.process_count()} processes")
