"""Vision weights on disk -> orbax: `dinov2-to-orbax` and `convnext-to-orbax`.

A converted vision checkpoint is laid out like a converted LLaMA one: `O/params/` holds the
pytree `{'vit': ...}` or `{'convnext': ...}`, and `O/model_config.json` the tower's config (with
`"tower"` naming which), so `config.init.vit` / `config.init.convnext` load it with no flags.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from flax import traverse_util

from earthgpt_jax import checkpoints as ckpt_lib
from earthgpt_jax.convert import vision
from earthgpt_jax.convert.llama import HFCheckpoint, _torch_to_numpy


# The weights file of a downloaded folder that is not a HF transformers one, in order of
# preference: open_clip's (open_clip_config.json beside it) and timm's (its config.json holds
# `architecture` and `pretrained_cfg`, not a transformers config).
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                  "model.safetensors", "pytorch_model.bin")


def _is_hf_folder(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.exists(config):
        return False
    c = ckpt_lib.read_json(config)
    return not ("architecture" in c and "pretrained_cfg" in c)  # timm's config.json


def _folder_weights(path: str) -> str:
    for name in FOLDER_WEIGHTS:
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    found = sorted(n for n in os.listdir(path)
                   if n.endswith((".safetensors", ".bin", ".pt", ".pth")))
    if len(found) == 1:
        return os.path.join(path, found[0])
    raise FileNotFoundError(
        f"{path}: no weights recognised: neither a HF folder (config.json + model.safetensors "
        f"or pytorch_model.bin) nor one weights file of {', '.join(FOLDER_WEIGHTS)}"
        + (f"; several candidates, pass one as --weights: {', '.join(found)}" if found else ""))


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict | None]:
    """(tensors, config.json or None) from a HF directory, an open_clip or timm download folder
    (its weights file; config None, so the shapes tell the sizes), a .safetensors file, or a
    torch .bin/.pt/.pth file (read with weights_only=True: no code is ever unpickled)."""
    if os.path.isdir(path):
        if not _is_hf_folder(path):
            return read_state_dict(_folder_weights(path))
        reader = HFCheckpoint(path)
        return {k: reader.get(k) for k in reader.keys()}, reader.config
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return load_file(path), None
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    # open_clip / training checkpoints often wrap the weights.
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k: _torch_to_numpy(v) for k, v in state.items() if hasattr(v, "detach")}, None


def _write(out_dir: str, tower: str, params: dict, cfg, overwrite: bool) -> None:
    ckpt_lib.prepare_out_dir(out_dir, overwrite)
    flat = traverse_util.flatten_dict(params)
    ckpt_lib.write_params_streaming(out_dir, iter([[((tower,) + k, v) for k, v in flat.items()]]))
    ckpt_lib.write_json(os.path.join(out_dir, ckpt_lib.MODEL_CONFIG),
                        {"tower": tower} | dataclasses.asdict(cfg))


def dinov2_to_orbax(hf_dir: str, out_dir: str, *, overwrite: bool = False,
                    feature_layers=None):
    state, config = read_state_dict(hf_dir)
    if config is None:
        raise vision.VisionConversionError(f"{hf_dir}: a HF Dinov2 directory with config.json "
                                           f"is needed")
    cfg = vision.vit_config_from_hf(config, feature_layers)
    _write(out_dir, "vit", vision.dinov2_params_from_hf(state, cfg), cfg, overwrite)
    return cfg


def convnext_to_orbax(weights: str, out_dir: str, *, overwrite: bool = False):
    """HF ConvNext directory, or a timm / open_clip download folder or state dict file (config
    read off the tensors' shapes)."""
    state, config = read_state_dict(weights)
    cfg = (vision.convnext_config_from_hf(config) if config is not None
           else vision.convnext_config_from_state(state))
    _write(out_dir, "convnext", vision.convnext_params_from_state(state, cfg), cfg, overwrite)
    return cfg
