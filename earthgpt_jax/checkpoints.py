"""The one owner of the checkpoint layouts: converted weights and training runs, written and
read leaf by leaf (host memory near the largest single tensor, not the whole model) and restored
straight onto the target devices' shardings (training's init, evaluation, chat, serving).

Layouts understood:

* converted checkpoint (written by `hf-to-orbax`)::

    O/model_config.json   LlamaConfig fields (the decoder's shapes)
    O/hf_config.json      the source config.json, kept for token ids and dtype on export
    O/params/             orbax checkpoint; its pytree `state` is {'llm': {...}}

* training workdir (written by `main.py`)::

    W/model_config.json            dataclasses.asdict(EarthGPTConfig)
    W/checkpoints/<step>/state/    TrainState pytree: {'step', 'params', 'opt_state'}

Writing uses orbax's partial saving (`orbax.checkpoint.experimental.v1.partial`): each
`save` call writes one group of leaves to a pending directory and `finalize` merges them into
one ordinary PyTree checkpoint (OCDBT + zarr3) that `ocp.PyTreeCheckpointer` reads. Reading
uses `PyTreeRestore(partial_restore=True)` with a tree holding only the wanted leaf, so a
training checkpoint's optimizer state (2x the parameters) is never read.

`SubtreeCheckpoint.read` gives numpy leaves (the converters); `restore_sharded` restores a
subtree straight into a running model's shardings, each process reading only its own shards:
`restore_part` / `restore_from_workdir` (what `config.init` names) and `restore_params` (params
only, for evaluation and chat). `checkpoint_manager`: the train loop's saves and resume.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from etils import epath
from flax import traverse_util
import orbax.checkpoint as ocp

from earthgpt_jax.models.presets import ConvNeXtConfig, EarthGPTConfig, LlamaConfig, ViTConfig

MODEL_CONFIG = "model_config.json"
HF_CONFIG = "hf_config.json"
PARAMS_DIR = "params"
PYTREE_ITEM = "state"  # orbax v1's name for the pytree item of a partial save
PARTIAL_SUFFIX = ".partial_save"
CHUNK_BYTES = 64 << 20

KeyPath = tuple[str, ...]


# ----------------------------------------------------------------------------- writing


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse to clobber an existing checkpoint unless `overwrite`; clear stale partial saves."""
    existing = [os.path.join(out_dir, name) for name in (PARAMS_DIR, MODEL_CONFIG, HF_CONFIG)
                if os.path.exists(os.path.join(out_dir, name))]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a checkpoint ({PARAMS_DIR}/ or "
                              f"{MODEL_CONFIG}); pass --overwrite to replace it")
    for path in existing:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # an interrupted earlier run's pending directories
        if name.startswith(PARAMS_DIR + PARTIAL_SUFFIX):
            shutil.rmtree(os.path.join(out_dir, name))


def write_params_streaming(out_dir: str, groups: Iterator[Sequence[tuple[KeyPath, np.ndarray]]]
                           ) -> None:
    """Writes `O/params` from an iterator of leaf groups; each group is saved (blocking) and
    dropped before the next one is produced, so only one group is ever in memory."""
    from orbax.checkpoint.experimental import v1 as ocp_v1
    from orbax.checkpoint.experimental.v1 import partial

    path = os.path.join(os.path.abspath(out_dir), PARAMS_DIR)
    wrote = False
    # Saves are blocking and we drop each group afterwards, so orbax's defensive copy of host
    # arrays (which would double the peak) is not needed.
    context = ocp_v1.Context()
    context.memory.deepcopy_host_arrays = False
    # Chunks of <= 64 MB: tensorstore encodes chunk by chunk, so the encoded copy it holds
    # while writing is one chunk, not a second whole stacked tensor.
    context.array.saving.chunk_byte_size = CHUNK_BYTES
    with context:
        for group in groups:
            tree = traverse_util.unflatten_dict(dict(group))
            if tree:
                partial.save(path, tree)
                wrote = True
            del tree, group
            _release_memory()
        if not wrote:
            raise ValueError("no parameters to write")
        partial.finalize(path)


def _release_memory() -> None:
    """Drops freed buffers now: tensorstore's writer threads free into glibc arenas that
    otherwise keep the pages, so resident memory would creep up group after group."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def save_llama_config(out_dir: str, cfg: LlamaConfig, hf_config: dict | None = None) -> None:
    write_json(os.path.join(out_dir, MODEL_CONFIG), dataclasses.asdict(cfg))
    if hf_config is not None:
        write_json(os.path.join(out_dir, HF_CONFIG), hf_config)


# ----------------------------------------------------------------------------- reading


def _tuples(d: dict) -> dict:
    """JSON lists back to the tuples the (hashable) config dataclasses hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _llama_config_from_dict(d: dict) -> LlamaConfig:
    names = {f.name for f in dataclasses.fields(LlamaConfig)}
    return LlamaConfig(**_tuples({k: v for k, v in d.items() if k in names}))


def _subtree(tree, path: Sequence[str]):
    """The node at `path` in a nested dict, or None where there is none."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _partial_restore(pytree_dir: str, restore_args: dict[KeyPath, Any],
                     concurrent_gb: float | None = None) -> dict:
    """Restores only the leaves named in `restore_args` ({full path: RestoreArgs}); flat."""
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=concurrent_gb)
    try:
        restored = handler.restore(epath.Path(pytree_dir), args=ocp.args.PyTreeRestore(
            item=traverse_util.unflatten_dict(dict.fromkeys(restore_args, 0)),
            restore_args=traverse_util.unflatten_dict(restore_args), partial_restore=True))
    finally:
        handler.close()
    return traverse_util.flatten_dict(restored)


@dataclasses.dataclass
class SubtreeCheckpoint:
    """One subtree of the params inside an orbax PyTree checkpoint, read leaf by leaf."""
    pytree_dir: str          # the directory holding _METADATA
    prefix: KeyPath          # path of the subtree inside that pytree
    step: int | None = None  # the training step, for a training run's checkpoint

    _metadata: Any = dataclasses.field(default=None, init=False, repr=False)

    def metadata_tree(self) -> dict:
        """The subtree's nested dict of ArrayMetadata (no array data read)."""
        if self._metadata is None:
            meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.pytree_dir))
            self._metadata = _subtree(getattr(meta, "tree", meta), self.prefix)
            if self._metadata is None:
                raise KeyError(f"{'/'.join(self.prefix)} not found in {self.pytree_dir}")
        return self._metadata

    def has(self, path: KeyPath) -> bool:
        return _subtree(self.metadata_tree(), path) is not None

    def read(self, paths: Sequence[KeyPath]) -> dict[KeyPath, np.ndarray]:
        """Restores only the given leaves (paths below the prefix) as numpy."""
        flat = _partial_restore(self.pytree_dir, {
            self.prefix + tuple(p): ocp.RestoreArgs(restore_type=np.ndarray) for p in paths})
        return {tuple(p): np.asarray(flat[self.prefix + tuple(p)]) for p in paths}

    def read_all(self) -> dict:
        return traverse_util.unflatten_dict(
            self.read(list(traverse_util.flatten_dict(self.metadata_tree()))))


@dataclasses.dataclass(kw_only=True)
class LlmCheckpoint(SubtreeCheckpoint):
    """Where a decoder's parameters live inside an orbax checkpoint."""
    cfg: LlamaConfig
    extra: dict              # token ids / dtype hints (bos_id, eos_id, hf_config)


def open_converted_part(ckpt_dir: str, part: str) -> SubtreeCheckpoint:
    """The `part` ('llm', 'vit', 'convnext') subtree of a converted checkpoint."""
    pytree_dir = os.path.join(os.path.abspath(ckpt_dir), PARAMS_DIR, PYTREE_ITEM)
    if not os.path.isdir(pytree_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a converted checkpoint: {pytree_dir} is "
                                f"missing (write one with python -m earthgpt_jax.convert)")
    return SubtreeCheckpoint(pytree_dir, (part,))


def latest_step(checkpoints_dir: str) -> int | None:
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(os.path.abspath(checkpoints_dir), options=options) as mngr:
        return mngr.latest_step()


def open_llm_checkpoint(ckpt_dir: str, step: int | None = None) -> LlmCheckpoint:
    """A converted checkpoint, a training workdir (latest or given step) or its checkpoints/."""
    ckpt_dir = os.path.abspath(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    if os.path.basename(ckpt_dir) == "checkpoints" and not os.path.exists(
            os.path.join(ckpt_dir, MODEL_CONFIG)):
        ckpt_dir = os.path.dirname(ckpt_dir)
    config_path = os.path.join(ckpt_dir, MODEL_CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: {ckpt_dir} is neither a converted "
                                f"checkpoint nor a training workdir")
    config = read_json(config_path)
    if os.path.isdir(os.path.join(ckpt_dir, PARAMS_DIR)):  # converted
        hf_path = os.path.join(ckpt_dir, HF_CONFIG)
        hf_config = read_json(hf_path) if os.path.exists(hf_path) else {}
        return LlmCheckpoint(pytree_dir=os.path.join(ckpt_dir, PARAMS_DIR, PYTREE_ITEM),
                             prefix=("llm",), cfg=_llama_config_from_dict(config),
                             extra={"hf_config": hf_config,
                                    "bos_id": hf_config.get("bos_token_id"),
                                    "eos_id": hf_config.get("eos_token_id")})
    if not os.path.isdir(os.path.join(ckpt_dir, "checkpoints")):
        raise FileNotFoundError(f"{ckpt_dir} has {MODEL_CONFIG} but neither {PARAMS_DIR}/ "
                                f"(converted checkpoint) nor checkpoints/ (training workdir)")
    run = open_workdir_params(ckpt_dir, step)
    llm = config.get("llm", config)
    return LlmCheckpoint(pytree_dir=run.pytree_dir, prefix=run.prefix + ("llm",),
                         cfg=_llama_config_from_dict(llm),
                         extra={"bos_id": config.get("bos_id"), "eos_id": None}, step=run.step)


def save_model_config(cfg: EarthGPTConfig, workdir: str) -> None:
    """A training run's W/model_config.json (its EarthGPTConfig), written beside the
    checkpoints so that evaluation, chat and serving load them with no flags."""
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, MODEL_CONFIG), dataclasses.asdict(cfg))


def load_model_config(path: str) -> EarthGPTConfig:
    """The EarthGPTConfig a `save_model_config` file holds (JSON lists back to tuples)."""
    raw = read_json(path)
    top = {k: v for k, v in raw.items() if k not in ("llm", "vit", "convnext")}
    return EarthGPTConfig(llm=LlamaConfig(**_tuples(raw["llm"])),
                          vit=ViTConfig(**_tuples(raw["vit"])),
                          convnext=ConvNeXtConfig(**_tuples(raw["convnext"])), **top)


def open_workdir_params(workdir: str, step: int | None = None) -> SubtreeCheckpoint:
    """The `params` subtree of a training workdir's latest (or given) checkpoint,
    `W/checkpoints/<step>/state` (its optimizer state is never read through this). `workdir`
    may also be that run's `checkpoints/` folder."""
    workdir = os.path.abspath(workdir)
    if os.path.basename(workdir) == "checkpoints" and not os.path.isdir(
            os.path.join(workdir, "checkpoints")):
        workdir = os.path.dirname(workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints):
        raise FileNotFoundError(f"no checkpoint found in {workdir}: it is not a training "
                                f"workdir ({checkpoints} is missing)")
    step = latest_step(checkpoints) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint found in {checkpoints} (has that run saved one?)")
    pytree_dir = os.path.join(checkpoints, str(step), "state")
    if not os.path.isdir(pytree_dir):
        raise FileNotFoundError(f"{pytree_dir} is missing: checkpoint {step} of {workdir} holds "
                                f"no train state")
    return SubtreeCheckpoint(pytree_dir, ("params",), step=step)


def _names(paths: Sequence[KeyPath], prefix: KeyPath, limit: int = 6) -> str:
    shown = ", ".join("/".join(prefix + tuple(p)) for p in paths[:limit])
    return shown + (f" ... ({len(paths) - limit} more)" if len(paths) > limit else "")


INFLIGHT_FLOOR = 4 << 30  # restore_sharded's default cap on host bytes in flight, at least


def _read_bound(meta) -> int:
    """Bytes orbax may estimate for reading any part of this stored leaf: the whole leaf
    rounded up to whole stored chunks."""
    shape = tuple(meta.shape)
    chunks = getattr(getattr(meta, "storage", None), "chunk_shape", None) or shape
    rounded = [-(-n // max(c, 1)) * max(c, 1) for n, c in zip(shape, chunks)]
    return math.prod(rounded) * np.dtype(meta.dtype).itemsize


def restore_sharded(pytree_dir: str, prefix: Sequence[str],
                    targets: Mapping[KeyPath, jax.ShapeDtypeStruct], *,
                    may_lack: Callable[[KeyPath], bool] = lambda path: False,
                    skip: Sequence[KeyPath] = (), label: str = "",
                    inflight_bytes: int | None = None, check_only: bool = False
                    ) -> tuple[dict[KeyPath, jax.Array], list[KeyPath]]:
    """Restores the subtree `prefix` of the PyTree checkpoint in `pytree_dir` straight into
    `targets` ({path below prefix: ShapeDtypeStruct carrying the target sharding}). Returns
    ({path: jax.Array on its sharding, in its target dtype}, [target paths the checkpoint lacks]).

    Names and shapes are checked from the metadata before any data is read: a stored leaf with
    no target, a target the checkpoint lacks (unless `may_lack(path)`) or a differing shape is a
    ValueError naming the tensor. Subtrees in `skip` are neither read nor checked, on either
    side; `check_only`: the checks alone (returns ({}, lacking)).

    Memory: each process reads only the shards its devices hold, and the host bytes in flight
    are capped at `inflight_bytes`, by default the larger of the largest stored tensor and 4 GB
    (`INFLIGHT_FLOOR`). A cap of exactly one tensor can serialise the reads: orbax charges each
    shard read with every stored chunk it touches, and a converted checkpoint's chunks (split
    along the layers axis) rarely line up with FSDP shards (benchmarks/init_restore_memory.py
    measures both). A training checkpoint's optimizer state stays on disk.
    """
    prefix = tuple(prefix)
    where = f"{label}: " if label else ""
    try:
        stored = traverse_util.flatten_dict(SubtreeCheckpoint(pytree_dir, prefix).metadata_tree())
    except KeyError:
        raise ValueError(f"{where}{'/'.join(prefix)} not found in {pytree_dir}") from None
    skipped = lambda path: any(tuple(path[:len(s)]) == tuple(s) for s in skip)
    stored = {p: m for p, m in stored.items() if not skipped(p)}
    targets = {tuple(p): t for p, t in targets.items() if not skipped(p)}
    extra = sorted(set(stored) - set(targets))
    lacking = sorted(set(targets) - set(stored))
    missing = [p for p in lacking if not may_lack(p)]
    if extra or missing:
        raise ValueError(
            f"{where}{pytree_dir} does not fit the model: missing {len(missing)} "
            f"[{_names(missing, prefix)}], unexpected {len(extra)} [{_names(extra, prefix)}] "
            f"(scan_layers, adapters or size differ?)")
    wrong = [p for p in sorted(targets) if p in stored
             and tuple(stored[p].shape) != tuple(targets[p].shape)]
    if wrong:
        name = "/".join(prefix + wrong[0])
        more = f" (and {len(wrong) - 1} more tensors of another shape)" if len(wrong) > 1 else ""
        raise ValueError(f"{where}tensor {name} has shape {tuple(stored[wrong[0]].shape)} in "
                         f"{pytree_dir}, the model expects {tuple(targets[wrong[0]].shape)}{more}")
    wanted = [p for p in targets if p in stored]
    if check_only or not wanted:
        return {}, lacking
    for p in wanted:
        if not isinstance(getattr(targets[p], "sharding", None), jax.sharding.Sharding):
            raise ValueError(f"{where}the target of {'/'.join(prefix + p)} carries no sharding")
    # orbax refuses a single read larger than its in-flight cap, and estimates a read by the
    # stored chunks it touches: the cap is at least the largest leaf in whole chunks.
    largest = max(_read_bound(stored[p]) for p in wanted) + (16 << 20)
    cap = max(largest, INFLIGHT_FLOOR if inflight_bytes is None else inflight_bytes)
    flat = _partial_restore(pytree_dir, {prefix + p: ocp.ArrayRestoreArgs(
        sharding=targets[p].sharding, global_shape=tuple(targets[p].shape),
        dtype=targets[p].dtype) for p in wanted}, concurrent_gb=cap / 1e9)
    return {p: flat[prefix + p] for p in wanted}, lacking


# ----------------------------------------------------------------------------- training runs


def _is_adapter(path: tuple) -> bool:
    """Stage B's bias/scale adapters, LoRA's factors and the band adapter (an RGB run's
    checkpoint starting a model.input_bands run): absent from LLaMA-2 and from stage-A runs,
    they start as the identity (LoRA: B = 0; the band adapter picking its bands) wherever a
    checkpoint lacks them."""
    return path[-1] in ("adapter_scale", "adapter_bias", "lora_a", "lora_b", "band_weights",
                        "band_bias")


def abbreviate_paths(paths) -> str:
    """Parameter paths, with the modules and leaves that share a parent folded into braces:
    'llm/layers/{k_proj,q_proj}/{adapter_bias,adapter_scale}'."""
    modules: dict = {}
    for path in paths:
        parent, module, leaf = path[:-2], path[-2:-1], path[-1]
        modules.setdefault((parent, leaf), []).extend(module)
    leaves: dict = {}
    for (parent, leaf), names in modules.items():
        leaves.setdefault((parent, tuple(sorted(names))), []).append(leaf)
    brace = lambda names: names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
    return ", ".join("/".join(list(parent) + ([brace(list(names))] if names else [])
                              + [brace(sorted(leaf))])
                     for (parent, names), leaf in sorted(leaves.items()))


def _log_fresh(source: str, lacking: list[tuple], prefix: tuple = ()) -> None:
    if lacking:
        logging.info("%s lacks %d parameters; they keep their usual init: %s", source,
                     len(lacking), abbreviate_paths([prefix + tuple(p) for p in lacking]))


def restore_part(part: str, ckpt_dir: str, targets: dict, check_only: bool = False) -> dict:
    """`config.init.<part>`: the `part` ('llm', 'vit', 'convnext') of a converted checkpoint
    (or, for 'llm', of a training workdir too), restored onto `targets` (that part's abstract
    params, with shardings). Returns {path below part: sharded jax.Array}. Only the adapters
    may be missing (they start as the identity); any other mismatch is an error naming it."""
    ck = open_llm_checkpoint(ckpt_dir) if part == "llm" else open_converted_part(ckpt_dir, part)
    restored, lacking = restore_sharded(
        ck.pytree_dir, ck.prefix, traverse_util.flatten_dict(targets), may_lack=_is_adapter,
        label=f"config.init.{part}={ckpt_dir}", check_only=check_only)
    if check_only:
        return {}
    logging.info("Loaded %s weights (%d tensors) from %s", part, len(restored), ckpt_dir)
    _log_fresh(f"config.init.{part}={ckpt_dir}", lacking, (part,))
    return restored


def restore_from_workdir(workdir: str, targets: dict, skip=(),
                         check_only: bool = False) -> dict:
    """`config.init.from_workdir`: every param of a training run's latest checkpoint restored
    onto `targets` (the abstract params, with shardings), except the parts in `skip` (neither
    read nor checked). Returns {full param path: sharded jax.Array}. As in `restore_part`, only
    the adapters may be missing (a stage-A run has none); they are listed in the log."""
    ck = open_workdir_params(workdir)
    label = f"config.init.from_workdir={workdir}"
    restored, lacking = restore_sharded(
        ck.pytree_dir, ck.prefix, traverse_util.flatten_dict(targets), may_lack=_is_adapter,
        skip=[(part,) for part in skip], label=label, check_only=check_only)
    if check_only:
        return {}
    logging.info("Started from %s (%d tensors of %s)%s", workdir, len(restored), ck.pytree_dir,
                 "".join(f"; its {p} is replaced by config.init.{p}" for p in skip))
    _log_fresh(label, lacking)
    return restored


def checkpoint_manager(workdir: str, checkpoint) -> ocp.CheckpointManager:
    """The training run's manager; `checkpoint` is config.checkpoint (how often, how many)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=checkpoint.keep, save_interval_steps=checkpoint.every_steps,
        enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def restore_params(workdir: str, targets, step: int | None = None, *,
                   stored_dtypes: bool = False):
    """(params, step): the params of a training workdir's latest (or given) checkpoint restored
    onto `targets` (the abstract params, with shardings), for evaluation and the chats.
    `stored_dtypes`: each leaf in the dtype it was saved in (a run's frozen weights in
    train.frozen_param_dtype) instead of its target's, so serving holds bf16-frozen weights at
    half their fp32 size."""
    ck = open_workdir_params(workdir, step)
    flat = traverse_util.flatten_dict(targets)
    if stored_dtypes:
        stored = traverse_util.flatten_dict(ck.metadata_tree())
        flat = {p: t.update(dtype=stored[p].dtype) if p in stored else t
                for p, t in flat.items()}
    restored, _ = restore_sharded(ck.pytree_dir, ck.prefix, flat,
                                  label=f"the checkpoint in {workdir}")
    return traverse_util.unflatten_dict(restored), ck.step
