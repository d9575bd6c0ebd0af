"""Orbax I/O for converted weights: leaf-by-leaf writes and reads, so host memory stays near
the largest single (stacked) tensor rather than the whole model.

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
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import shutil
from typing import Any, Iterator, Sequence

import numpy as np
from etils import epath
import orbax.checkpoint as ocp

from earthgpt_jax.models.presets import LlamaConfig

MODEL_CONFIG = "model_config.json"
HF_CONFIG = "hf_config.json"
PARAMS_DIR = "params"
PYTREE_ITEM = "state"  # orbax v1's name for the pytree item of a partial save
PARTIAL_SUFFIX = ".partial_save"
CHUNK_BYTES = 64 << 20

KeyPath = tuple[str, ...]


# ----------------------------------------------------------------------------- writing


def checkpoint_exists(out_dir: str) -> bool:
    return any(os.path.exists(os.path.join(out_dir, p))
               for p in (PARAMS_DIR, MODEL_CONFIG, HF_CONFIG))


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse to clobber an existing checkpoint unless `overwrite`; clear stale partial saves."""
    if checkpoint_exists(out_dir):
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} already holds a checkpoint ({PARAMS_DIR}/ or {MODEL_CONFIG}); "
                f"pass --overwrite to replace it")
        for name in (PARAMS_DIR, MODEL_CONFIG, HF_CONFIG):
            path = os.path.join(out_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # an interrupted earlier run's pending directories
        if name.startswith(PARAMS_DIR + PARTIAL_SUFFIX):
            shutil.rmtree(os.path.join(out_dir, name))


def _nest(path: KeyPath, value) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


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
            tree = _tree_of(group)
            if tree:
                partial.save(path, tree)
                wrote = True
            del tree, group
            _release_memory()
        if not wrote:
            raise ValueError("no parameters to write")
        partial.finalize(path)


def _tree_of(group) -> dict:
    tree: dict = {}
    for keypath, value in group:
        _merge(tree, _nest(keypath, value))
    return tree


def _release_memory() -> None:
    """Drops freed buffers now: tensorstore's writer threads free into glibc arenas that
    otherwise keep the pages, so resident memory would creep up group after group."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def save_llama_config(out_dir: str, cfg: LlamaConfig, hf_config: dict | None = None) -> None:
    with open(os.path.join(out_dir, MODEL_CONFIG), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    if hf_config is not None:
        with open(os.path.join(out_dir, HF_CONFIG), "w") as f:
            json.dump(hf_config, f, indent=2)


# ----------------------------------------------------------------------------- reading


def _llama_config_from_dict(d: dict) -> LlamaConfig:
    names = {f.name for f in dataclasses.fields(LlamaConfig)}
    return LlamaConfig(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass
class SubtreeCheckpoint:
    """One subtree of the params inside an orbax PyTree checkpoint, read leaf by leaf."""
    pytree_dir: str          # the directory holding _METADATA
    prefix: KeyPath          # path of the subtree inside that pytree

    _metadata: Any = dataclasses.field(default=None, init=False, repr=False)

    def metadata_tree(self) -> dict:
        """{name: ...} nested dict of ArrayMetadata of the llm subtree (no array data read)."""
        if self._metadata is None:
            meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.pytree_dir))
            tree = getattr(meta, "tree", meta)
            for key in self.prefix:
                if not isinstance(tree, dict) or key not in tree:
                    raise KeyError(f"{'/'.join(self.prefix)} not found in {self.pytree_dir}")
                tree = tree[key]
            self._metadata = tree
        return self._metadata

    def leaf_paths(self) -> list[KeyPath]:
        out = []

        def walk(node, path):
            if isinstance(node, dict):
                for k in node:
                    walk(node[k], path + (k,))
            else:
                out.append(path)
        walk(self.metadata_tree(), ())
        return out

    def has(self, path: KeyPath) -> bool:
        node = self.metadata_tree()
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return True

    def read(self, paths: Sequence[KeyPath]) -> dict[KeyPath, np.ndarray]:
        """Restores only the given leaves (paths relative to the llm subtree) as numpy."""
        item: dict = {}
        args: dict = {}
        for p in paths:
            full = self.prefix + tuple(p)
            _merge(item, _nest(full, 0))
            _merge(args, _nest(full, ocp.RestoreArgs(restore_type=np.ndarray)))
        restored = ocp.PyTreeCheckpointHandler().restore(
            epath.Path(self.pytree_dir), args=ocp.args.PyTreeRestore(item=item, restore_args=args,
                                                         partial_restore=True))
        out = {}
        for p in paths:
            node = restored
            for key in self.prefix + tuple(p):
                node = node[key]
            out[tuple(p)] = np.asarray(node)
        return out

    def read_all(self) -> dict:
        tree: dict = {}
        for path, value in self.read(self.leaf_paths()).items():
            _merge(tree, _nest(path, value))
        return tree


@dataclasses.dataclass(kw_only=True)
class LlmCheckpoint(SubtreeCheckpoint):
    """Where a decoder's parameters live inside an orbax checkpoint."""
    cfg: LlamaConfig
    extra: dict              # token ids / dtype hints (bos_id, eos_id, hf_config)
    step: int | None = None


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
    with open(config_path) as f:
        config = json.load(f)
    if os.path.isdir(os.path.join(ckpt_dir, PARAMS_DIR)):  # converted
        hf_config = {}
        if os.path.exists(os.path.join(ckpt_dir, HF_CONFIG)):
            with open(os.path.join(ckpt_dir, HF_CONFIG)) as f:
                hf_config = json.load(f)
        return LlmCheckpoint(pytree_dir=os.path.join(ckpt_dir, PARAMS_DIR, PYTREE_ITEM),
                             prefix=("llm",), cfg=_llama_config_from_dict(config),
                             extra={"hf_config": hf_config,
                                    "bos_id": hf_config.get("bos_token_id"),
                                    "eos_id": hf_config.get("eos_token_id")})
    checkpoints = os.path.join(ckpt_dir, "checkpoints")
    if not os.path.isdir(checkpoints):
        raise FileNotFoundError(f"{ckpt_dir} has {MODEL_CONFIG} but neither {PARAMS_DIR}/ "
                                f"(converted checkpoint) nor checkpoints/ (training workdir)")
    step = latest_step(checkpoints) if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint found in {checkpoints}")
    llm = config.get("llm", config)
    return LlmCheckpoint(pytree_dir=os.path.join(checkpoints, str(step), "state"),
                         prefix=("params", "llm"), cfg=_llama_config_from_dict(llm),
                         extra={"bos_id": config.get("bos_id"), "eos_id": None}, step=step)
