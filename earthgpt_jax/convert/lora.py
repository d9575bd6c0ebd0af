"""LoRA weights: ours <-> a PEFT adapter directory, and merged into the LLaMA kernels.

Ours (models/layers.Linear): `lora_a` [in, rank] and `lora_b` [rank, out] per adapted linear
(stacked on a leading [layers] axis when scanned), y = x W + (alpha / rank) x A B. PEFT's: in
`adapter_model.safetensors`, `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`
[rank, in] and `...lora_B.weight` [out, rank] (torch Linear layout: our transposes), with
`r` and `lora_alpha` in `adapter_config.json` giving the same alpha / rank.

A stage-B adapter scale s on the same linear (s * (x W + lora + b)) is folded into B's rows
on export, as it is folded into W's, so the base plus the adapter is the model exactly.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Iterator

import numpy as np

from earthgpt_jax import checkpoints as ckpt_lib
from earthgpt_jax.models.presets import LORA_MODULES, LlamaConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What PeftModel wraps around LlamaForCausalLM: every PEFT tensor name starts with it.
PEFT_PREFIX = "base_model.model."
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


class LoraError(ValueError):
    """An adapter that cannot be converted (names the setting or tensor at fault)."""


def peft_name(layer: int, module: str, factor: str) -> str:
    """PEFT's tensor name of lora_A / lora_B ('A' or 'B') of one linear of one layer."""
    group = "self_attn" if module in _ATTN else "mlp"
    return f"{PEFT_PREFIX}model.layers.{layer}.{group}.{module}.lora_{factor}.weight"


def merged_kernel(kernel: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """W + (alpha / rank) A B in fp32, what the linear computes, stored in the wider of W's and
    the factors' dtypes: a training run keeps W frozen in bf16 and A, B in fp32, and a small
    A B added to W in bf16 would round away."""
    scale = alpha / a.shape[-1]
    merged = kernel.astype(np.float32) + scale * (a.astype(np.float32) @ b.astype(np.float32))
    return merged.astype(np.result_type(kernel.dtype, a.dtype, b.dtype))


def peft_factors(a: np.ndarray, b: np.ndarray, adapter_scale: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's (lora_A [rank, in], lora_B [out, rank]) of our factors; a stage-B scale s on
    the output is folded into B's rows."""
    b_t = b.T.astype(np.float32)
    if adapter_scale is not None:
        b_t = adapter_scale.astype(np.float32)[:, None] * b_t
    return np.ascontiguousarray(a.T), np.ascontiguousarray(b_t.astype(b.dtype))


def write_adapter(lora_dir: str, tensors: dict[str, np.ndarray], cfg: LlamaConfig,
                  base_model: str, overwrite: bool) -> None:
    """`lora_dir`/adapter_config.json + adapter_model.safetensors, as PEFT saves a LoRA of a
    LlamaForCausalLM (PeftModel.from_pretrained(base, lora_dir) loads it)."""
    from safetensors.numpy import save_file

    if os.path.exists(os.path.join(lora_dir, ADAPTER_CONFIG)):
        if not overwrite:
            raise FileExistsError(f"{lora_dir} already holds a PEFT adapter; pass --overwrite")
        shutil.rmtree(lora_dir)
    os.makedirs(lora_dir, exist_ok=True)
    rank = next(iter(tensors.values())).shape[0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": int(rank), "lora_alpha": float(cfg.lora_alpha), "lora_dropout": 0.0,
        "target_modules": sorted({name.split(".")[-3] for name in tensors}), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
        "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
    }
    save_file(tensors, os.path.join(lora_dir, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    ckpt_lib.write_json(os.path.join(lora_dir, ADAPTER_CONFIG), config)


def read_adapter(peft_dir: str, cfg: LlamaConfig) -> tuple[dict, dict]:
    """({lora_rank, lora_alpha, lora_targets} for the LlamaConfig, {(layer, module): (a, b)}
    in our layout) of a PEFT LoRA adapter directory for a LLaMA of shape `cfg`. Only what
    y = x W + (alpha / r) x A B expresses converts; anything else is a LoraError naming it."""
    from safetensors.numpy import load_file

    config_path = os.path.join(peft_dir, ADAPTER_CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: not a PEFT adapter directory")
    config = ckpt_lib.read_json(config_path)
    if config.get("peft_type") != "LORA":
        raise LoraError(f"{config_path}: peft_type {config.get('peft_type')!r}, only LORA "
                        f"converts")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none",
                   "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
                   "alpha_pattern": {}}
    for key, plain in unsupported.items():
        if config.get(key, plain) not in (plain, None, {}, [], False):
            raise LoraError(f"{config_path}: {key}={config[key]!r} is not supported (only "
                            f"plain LoRA on every layer: {key}={plain!r})")
    rank = int(config["r"])
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r): the same as alpha' / r
        alpha *= math.sqrt(rank)
    weights_path = os.path.join(peft_dir, ADAPTER_WEIGHTS)
    if not os.path.exists(weights_path):
        raise FileNotFoundError(f"{weights_path} not found (adapters saved as .bin: load and "
                                f"save_pretrained them again with safe_serialization)")
    tensors = load_file(weights_path)
    modules = tuple(m for m in LORA_MODULES if peft_name(0, m, "A") in tensors)
    expected = {peft_name(layer, m, f) for layer in range(cfg.num_layers) for m in modules
                for f in "AB"}
    # PEFT may add the adapter name (".default") before ".weight" in older saves: not ours.
    unknown = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if not modules or unknown or missing:
        raise LoraError(f"{weights_path} does not fit a {cfg.num_layers}-layer LLaMA LoRA on "
                        f"{', '.join(modules) or 'no module'}: unexpected "
                        f"{unknown[:3]}, missing {missing[:3]}")
    factors = {}
    for layer in range(cfg.num_layers):
        for m in modules:
            a, b = tensors[peft_name(layer, m, "A")], tensors[peft_name(layer, m, "B")]
            if a.shape[0] != rank or b.shape[1] != rank:
                raise LoraError(f"{peft_name(layer, m, 'A')}: rank {a.shape[0]}/{b.shape[1]}, "
                                f"the config's r is {rank}")
            factors[(layer, m)] = (np.ascontiguousarray(a.T), np.ascontiguousarray(b.T))
    return {"lora_rank": rank, "lora_alpha": alpha, "lora_targets": modules}, factors


def iter_lora_groups(factors: dict, cfg: LlamaConfig, prefix: tuple = ()
                     ) -> Iterator[list[tuple[tuple, np.ndarray]]]:
    """`read_adapter`'s factors as param groups of our layout (stacked when scanned)."""
    for module in cfg.lora_targets:
        for leaf, index in (("lora_a", 0), ("lora_b", 1)):
            per_layer = [factors[(layer, module)][index] for layer in range(cfg.num_layers)]
            if cfg.scan_layers:
                yield [(prefix + ("layers", module, leaf), np.stack(per_layer))]
            else:
                yield [(prefix + (f"layers_{layer}", module, leaf), value)
                       for layer, value in enumerate(per_layer)]
