"""LLaMA weights: HF transformers layout <-> our `LlamaDecoder` params.

HF `nn.Linear.weight` is [out, in]; our `kernel` is [in, out] (a transpose, nothing else: our
RoPE is HF's rotate-half, so q/k need no permutation). With `scan_layers` the per-layer tensors
are stacked on a leading [num_layers] axis. Dtypes are kept tensor by tensor (bf16 stays bf16).

Export merges stage-B adapters (y = s * (x W + b + b_a)) into plain HF linears:
W_hf' = diag(s) W_hf and b' = s * (b + b_a); LoRA factors are merged into W first
(W + alpha/r A B), or written beside the base as a PEFT adapter (convert/lora.py).
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import os
import re
import shutil
from typing import Callable, Iterator, Sequence

import numpy as np
from flax import traverse_util

from earthgpt_jax import checkpoints as ckpt_lib
from earthgpt_jax.convert import lora as lora_lib
from earthgpt_jax.models.presets import LlamaConfig

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
# Buffers some old checkpoints carry; recomputed, never loaded.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

KeyPath = tuple[str, ...]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted (names the tensor or setting at fault)."""


# ----------------------------------------------------------------------------- configs


def llama_config_from_hf(hf: dict, scan_layers: bool = True) -> LlamaConfig:
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if list(archs) != ["LlamaForCausalLM"] or hf.get("model_type", "llama") != "llama":
        raise ConversionError(
            f"unsupported architecture {archs} (model_type {hf.get('model_type')!r}): only "
            f"LlamaForCausalLM / model_type 'llama' converts")
    rope_params = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling") is not None or rope_params.get("rope_type", "default") != "default":
        raise ConversionError(
            f"unsupported rope_scaling {hf.get('rope_scaling') or rope_params}: only plain "
            f"RoPE (rope_scaling null) converts")
    if hf.get("tie_word_embeddings", False):
        raise ConversionError("unsupported tie_word_embeddings: true: LlamaDecoder has an "
                              "untied lm_head")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"unsupported hidden_act {hf['hidden_act']!r}: only silu")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise ConversionError(f"unsupported head_dim {hf['head_dim']}: must be "
                              f"hidden_size / num_attention_heads")
    theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), adapters=False, scan_layers=scan_layers)


def hf_config_from_llama(cfg: LlamaConfig, *, dtype: str, attention_bias: bool, mlp_bias: bool,
                         bos_id: int | None = 1, eos_id: int | None = 2,
                         pad_id: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "attention_bias": attention_bias, "attention_dropout": 0.0, "mlp_bias": mlp_bias,
        "initializer_range": 0.02, "pretraining_tp": 1, "tie_word_embeddings": False,
        "use_cache": True, "torch_dtype": dtype, "bos_token_id": bos_id,
        "eos_token_id": eos_id, "pad_token_id": pad_id,
    }


# ----------------------------------------------------------------------------- HF reading


def _torch_to_numpy(t) -> np.ndarray:
    import torch
    import ml_dtypes
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class HFCheckpoint:
    """Tensor-by-tensor access to a HF checkpoint directory (config.json plus
    model.safetensors, sharded model-*.safetensors with an index, or pytorch_model*.bin)."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        config_path = os.path.join(hf_dir, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{config_path} not found")
        self.config = ckpt_lib.read_json(config_path)
        self._files: dict[str, str] = {}  # tensor name -> file
        self._shapes: dict[str, tuple] = {}
        self._torch_state: dict = {}
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.exists(index) or os.path.exists(os.path.join(hf_dir, "model.safetensors")):
            self.kind = "safetensors"
            files = ["model.safetensors"]
            if os.path.exists(index):
                files = sorted(set(ckpt_lib.read_json(index)["weight_map"].values()))
            from safetensors import safe_open
            for name in files:
                path = os.path.join(hf_dir, name)
                if not os.path.exists(path):
                    raise FileNotFoundError(f"shard {path} named in the index is missing")
                with safe_open(path, framework="numpy") as handle:  # header only
                    for key in handle.keys():
                        self._files[key] = path
                        self._shapes[key] = tuple(handle.get_slice(key).get_shape())
        else:
            bins = sorted(glob.glob(os.path.join(hf_dir, "pytorch_model*.bin")))
            if not bins:
                raise FileNotFoundError(f"no model.safetensors, model-*.safetensors index or "
                                        f"pytorch_model*.bin in {hf_dir}")
            self.kind = "bin"
            import torch
            for path in bins:
                # weights_only: never unpickle code; mmap: tensors are read when touched.
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                for key, value in state.items():
                    self._files[key] = path
                    self._shapes[key] = tuple(value.shape)
                    self._torch_state[key] = value

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple:
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        if name not in self._files:
            raise ConversionError(f"missing tensor {name!r} in {self.dir}")
        if self.kind == "bin":
            return _torch_to_numpy(self._torch_state[name])
        # A fresh handle per tensor: safe_open memory-maps the file, and a long-lived handle
        # would leave every page it touched mapped (and counted in RSS) until the end.
        from safetensors import safe_open
        with safe_open(self._files[name], framework="numpy") as handle:
            return handle.get_tensor(name)

    def get_transposed(self, name: str, block_bytes: int = 64 << 20) -> np.ndarray:
        """`get(name).T` made contiguous without holding both layouts: rows are read in
        blocks straight into the transposed output."""
        if self.kind == "bin" or len(self.shape(name)) != 2:
            return np.ascontiguousarray(self.get(name).T)
        from safetensors import safe_open
        with safe_open(self._files[name], framework="numpy") as handle:
            tensor = handle.get_slice(name)
            rows, cols = self.shape(name)
            first = tensor[0:1]
            out = np.empty((cols, rows), first.dtype)
            step = max(1, block_bytes // max(1, cols * first.dtype.itemsize))
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                out[:, start:stop] = tensor[start:stop].T
        return out


def expected_hf_shapes(cfg: LlamaConfig) -> dict[str, tuple]:
    e, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, e), "model.norm.weight": (e,),
              "lm_head.weight": (cfg.vocab_size, e)}
    out_in = {"q_proj": (q, e), "k_proj": (kv, e), "v_proj": (kv, e), "o_proj": (e, q),
              "gate_proj": (i, e), "up_proj": (i, e), "down_proj": (e, i)}
    for layer in range(cfg.num_layers):
        for module, leaf in _layer_leaves(cfg):
            shape = (e,) if module in NORMS else out_in[module]
            shapes[_layer_hf_name(layer, module, leaf)] = shape[:1] if leaf == "bias" else shape
    return shapes


def check_hf_tensors(reader: HFCheckpoint, cfg: LlamaConfig) -> None:
    """All names and shapes checked from headers before any data is read or written."""
    expected = expected_hf_shapes(cfg)
    for name, shape in expected.items():
        if name not in reader._files:
            raise ConversionError(f"missing tensor {name!r} in {reader.dir} (expected shape "
                                  f"{shape} from config.json)")
        if tuple(reader.shape(name)) != shape:
            raise ConversionError(f"tensor {name!r} has shape {tuple(reader.shape(name))}, "
                                  f"expected {shape} from config.json")
    extra = [k for k in reader.keys() if k not in expected and not IGNORED.fullmatch(k)]
    if extra:
        raise ConversionError(f"unexpected tensors in {reader.dir} (not part of a LLaMA with "
                              f"this config.json): {', '.join(sorted(extra)[:8])}")


def _layer_hf_name(layer: int, module: str, leaf: str) -> str:
    if module in NORMS:
        return f"model.layers.{layer}.{module}.weight"
    group = "self_attn" if module in ATTN else "mlp"
    return f"model.layers.{layer}.{group}.{module}.{'weight' if leaf == 'kernel' else 'bias'}"


def _layer_leaves(cfg: LlamaConfig) -> list[tuple[str, str]]:
    """(module, leaf) of one decoder layer, in HF's order."""
    biased = (ATTN if cfg.attention_bias else ()) + (MLP if cfg.mlp_bias else ())
    return ([(m, leaf) for m in ATTN + MLP for leaf in ("kernel", "bias")
             if leaf == "kernel" or m in biased] + [(norm, "scale") for norm in NORMS])


def iter_param_groups(reader: HFCheckpoint, cfg: LlamaConfig, prefix: KeyPath = ()
                      ) -> Iterator[list[tuple[KeyPath, np.ndarray]]]:
    """Our params in groups (paths under `prefix`): one stacked tensor per group when
    scanned, one layer's tensors per group when not. Nothing is kept between groups: a
    consumer that drops each group before asking for the next holds one group at a time."""
    yield [(prefix + ("embed_tokens", "embedding"), reader.get("model.embed_tokens.weight"))]
    if cfg.scan_layers:
        for module, leaf in _layer_leaves(cfg):
            first = _to_ours(reader.get(_layer_hf_name(0, module, leaf)), leaf)
            stacked = np.empty((cfg.num_layers,) + first.shape, first.dtype)
            stacked[0] = first
            del first
            for layer in range(1, cfg.num_layers):
                name = _layer_hf_name(layer, module, leaf)
                value = reader.get(name)
                if value.dtype != stacked.dtype:
                    raise ConversionError(f"tensor {name!r} is {value.dtype} but layer 0's is "
                                          f"{stacked.dtype}: scanned layers need one dtype")
                stacked[layer] = _to_ours(value, leaf)
                del value
            yield [(prefix + ("layers", module, leaf), stacked)]
            del stacked
    else:
        for layer in range(cfg.num_layers):
            yield [(prefix + (f"layers_{layer}", module, leaf),
                    np.ascontiguousarray(_to_ours(reader.get(_layer_hf_name(layer, module, leaf)),
                                                  leaf)))
                   for module, leaf in _layer_leaves(cfg)]
    yield [(prefix + ("norm", "scale"), reader.get("model.norm.weight"))]
    yield [(prefix + ("lm_head", "kernel"), reader.get_transposed("lm_head.weight"))]


def _to_ours(value: np.ndarray, leaf: str) -> np.ndarray:
    return value.T if leaf == "kernel" else value


def open_hf(hf_dir: str, scan_layers: bool = True) -> tuple[HFCheckpoint, LlamaConfig]:
    reader = HFCheckpoint(hf_dir)
    cfg = llama_config_from_hf(reader.config, scan_layers)
    check_hf_tensors(reader, cfg)
    return reader, cfg


def hf_to_params(hf_dir: str, scan_layers: bool = True) -> tuple[dict, LlamaConfig]:
    """The whole decoder in memory: {'embed_tokens': ..., 'layers': ..., ...} (numpy)."""
    reader, cfg = open_hf(hf_dir, scan_layers)
    flat = {path: value for group in iter_param_groups(reader, cfg) for path, value in group}
    return traverse_util.unflatten_dict(flat), cfg


def hf_to_orbax(hf_dir: str, out_dir: str, *, scan_layers: bool = True,
                overwrite: bool = False, peft_dir: str | None = None) -> LlamaConfig:
    """Streams a HF checkpoint into `out_dir` ({'llm': params} + model_config.json): one
    stacked tensor (or, unscanned, one layer) in memory at a time. `peft_dir`: a PEFT LoRA
    adapter of that LLaMA, added as our lora_a/lora_b leaves (LoRA rank/alpha/targets in
    model_config.json), for `--config.init.llm` of a stage-lora run that continues it."""
    reader, cfg = open_hf(hf_dir, scan_layers)  # validates before touching out_dir
    groups = iter_param_groups(reader, cfg, ("llm",))
    if peft_dir:
        fields, factors = lora_lib.read_adapter(peft_dir, cfg)
        cfg = dataclasses.replace(cfg, **fields)
        groups = itertools.chain(groups, lora_lib.iter_lora_groups(factors, cfg, ("llm",)))
    ckpt_lib.prepare_out_dir(out_dir, overwrite)
    ckpt_lib.write_params_streaming(out_dir, groups)
    ckpt_lib.save_llama_config(out_dir, cfg, reader.config)
    return cfg


# ----------------------------------------------------------------------------- export


Getter = Callable[[Sequence[KeyPath]], dict]  # paths -> {path: array}


def _dict_getter(params: dict) -> tuple[Getter, Callable[[KeyPath], bool]]:
    flat = traverse_util.flatten_dict(params)
    return (lambda paths: {tuple(p): np.asarray(flat[tuple(p)]) for p in paths},
            lambda path: tuple(path) in flat)


def _is_scanned(has) -> bool:
    return has(("layers", "q_proj", "kernel"))


def export_bias_flags(get: Getter, has, cfg: LlamaConfig) -> tuple[bool, bool]:
    """(attention_bias, mlp_bias) the HF model needs: true where any bias of the group is
    configured or an adapter bias is non-zero (reads only the small bias vectors)."""
    prefixes = ([("layers",)] if _is_scanned(has)
                else [(f"layers_{i}",) for i in range(cfg.num_layers)])

    def nonzero(modules):
        paths = [p + (m, leaf) for p in prefixes for m in modules
                 for leaf in ("bias", "adapter_bias") if has(p + (m, leaf))]
        return any(np.any(v != 0) for v in get(paths).values()) if paths else False

    return (cfg.attention_bias or nonzero(ATTN), cfg.mlp_bias or nonzero(MLP))


def _merged_linear(module_leaves: dict, want_bias: bool):
    """HF weight [out,in] (and bias) of one linear from our kernel [in,out] + bias/adapters."""
    kernel = module_leaves["kernel"]
    scale, bias, a_bias = (module_leaves.get(k) for k in ("adapter_scale", "bias", "adapter_bias"))
    width = kernel.shape[-1]
    if scale is None and a_bias is None:
        if bias is None and want_bias:
            bias = np.zeros(width, kernel.dtype)
        return np.ascontiguousarray(kernel.T), bias
    s = np.ones(width, np.float32) if scale is None else scale.astype(np.float32)
    total = sum((x.astype(np.float32) for x in (bias, a_bias) if x is not None),
                np.zeros(width, np.float32))
    # In the wider of the kernel's and the adapters' dtypes: a training run stores a frozen
    # kernel in bf16 beside fp32 adapters, and s * W rounded to bf16 would lose a scale of
    # 1 + 1e-3 (bf16 keeps 8 significant bits).
    wide = np.result_type(kernel.dtype, *(x.dtype for x in (scale, a_bias) if x is not None))
    weight = (s[:, None] * kernel.T.astype(np.float32)).astype(wide)
    b = (s * total).astype(np.result_type(wide, bias.dtype) if bias is not None else wide)
    return weight, (b if want_bias else None)


def iter_hf_tensors(get: Getter, has, cfg: LlamaConfig, *, attention_bias: bool,
                    mlp_bias: bool, peft: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) pairs, module by module: for scanned params one stacked module is read
    at a time and all its layers emitted before the next is read. LoRA factors are merged into
    the kernels, or with `peft` emitted under PEFT's names (lora.PEFT_PREFIX) instead."""
    def read_one(path):
        return get([path])[path]

    def read_module(parent, module):  # {leaf name: array} of one module
        names = ("scale",) if module in NORMS else (
            "kernel", "bias", "adapter_scale", "adapter_bias", "lora_a", "lora_b")
        paths = [(parent, module, n) for n in names if has((parent, module, n))]
        return {p[-1]: v for p, v in get(paths).items()}

    def emit(layer, module, leaves):
        if module in NORMS:
            yield _layer_hf_name(layer, module, "scale"), leaves["scale"]
            return
        if "lora_a" in leaves:
            a, b = leaves.pop("lora_a"), leaves.pop("lora_b")
            if peft:
                factors = lora_lib.peft_factors(a, b, leaves.get("adapter_scale"))
                for factor, value in zip("AB", factors):
                    yield lora_lib.peft_name(layer, module, factor), value
            else:
                leaves["kernel"] = lora_lib.merged_kernel(leaves["kernel"], a, b, cfg.lora_alpha)
        want_bias = attention_bias if module in ATTN else mlp_bias
        if not want_bias and any(
                np.any(leaves[k] != 0) for k in ("bias", "adapter_bias") if k in leaves):
            raise ConversionError(f"layer {layer} {module} has a non-zero bias but the export "
                                  f"config has no bias for it")
        weight, bias = _merged_linear(leaves, want_bias)
        yield _layer_hf_name(layer, module, "kernel"), weight
        if bias is not None:
            yield _layer_hf_name(layer, module, "bias"), bias

    yield "model.embed_tokens.weight", read_one(("embed_tokens", "embedding"))
    modules = ATTN + MLP + NORMS
    if _is_scanned(has):
        for module in modules:
            stacked = read_module("layers", module)
            for layer in range(cfg.num_layers):
                yield from emit(layer, module, {k: v[layer] for k, v in stacked.items()})
            del stacked
    else:
        for layer in range(cfg.num_layers):
            for module in modules:
                yield from emit(layer, module, read_module(f"layers_{layer}", module))
    yield "model.norm.weight", read_one(("norm", "scale"))
    yield "lm_head.weight", np.ascontiguousarray(read_one(("lm_head", "kernel")).T)


def params_to_hf_state(llm_params: dict, cfg: LlamaConfig, *, attention_bias: bool | None = None,
                       mlp_bias: bool | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Our decoder params (in memory) -> HF (name, array), adapters merged. Bias flags default
    to what the params need (`export_bias_flags`)."""
    get, has = _dict_getter(llm_params)
    if attention_bias is None or mlp_bias is None:
        need_attn, need_mlp = export_bias_flags(get, has, cfg)
        attention_bias = need_attn if attention_bias is None else attention_bias
        mlp_bias = need_mlp if mlp_bias is None else mlp_bias
    return iter_hf_tensors(get, has, cfg, attention_bias=attention_bias, mlp_bias=mlp_bias)


def parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base ** power)


def write_hf_shards(tensors: Iterator[tuple[str, np.ndarray]], out_dir: str,
                    max_shard_size: int) -> tuple[dict, str]:
    """Writes tensors into shards of at most `max_shard_size` bytes (a single larger tensor
    gets its own shard) plus model.safetensors.index.json. Returns (weight_map, dtype of the
    embedding)."""
    from safetensors.numpy import save_file

    shards: list[tuple[str, list[str]]] = []  # (temporary file, its tensor names)
    pending: dict[str, np.ndarray] = {}
    total = 0
    dtype = None

    def flush():
        if pending:
            tmp = f"shard-{len(shards):05d}.tmp.safetensors"
            save_file(pending, os.path.join(out_dir, tmp), metadata={"format": "pt"})
            shards.append((tmp, list(pending)))
            pending.clear()

    for name, value in tensors:
        value = np.ascontiguousarray(value)
        dtype = dtype or str(value.dtype)
        if pending and sum(v.nbytes for v in pending.values()) + value.nbytes > max_shard_size:
            flush()
        pending[name] = value
        total += value.nbytes
    flush()
    n = len(shards)
    weight_map: dict[str, str] = {}
    for idx, (tmp, names) in enumerate(shards):
        final = "model.safetensors" if n == 1 else f"model-{idx + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        weight_map.update(dict.fromkeys(names, final))
    if n > 1:
        ckpt_lib.write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                            {"metadata": {"total_size": total}, "weight_map": weight_map})
    return weight_map, dtype


def _prepare_hf_out(out_dir: str, overwrite: bool) -> None:
    existing = [n for n in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
                if n in ("config.json", "model.safetensors.index.json")
                or n.endswith(".safetensors")]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a HF checkpoint "
                              f"({', '.join(sorted(existing)[:3])}); pass --overwrite")
    for n in existing:
        os.remove(os.path.join(out_dir, n))
    os.makedirs(out_dir, exist_ok=True)


def load_llm_params(ckpt_dir: str, step: int | None = None) -> tuple[dict, LlamaConfig]:
    """Decoder params (numpy, stored dtypes) and LlamaConfig of a converted checkpoint or a
    training workdir (latest step unless given); only the llm leaves are read."""
    ck = ckpt_lib.open_llm_checkpoint(ckpt_dir, step)
    params = ck.read_all()
    layer = params.get("layers") or params.get("layers_0") or {}
    lora = [m for m in ATTN + MLP if "lora_a" in layer.get(m, {})]
    cfg = dataclasses.replace(ck.cfg, scan_layers="layers" in params,
                              adapters="adapter_scale" in layer.get("q_proj", {}),
                              lora_rank=layer[lora[0]]["lora_a"].shape[-1] if lora else 0,
                              lora_targets=tuple(lora))
    return params, cfg


def orbax_to_hf(ckpt_dir: str, out_dir: str, *, tokenizer: str | None = None,
                max_shard_size="5GB", overwrite: bool = False, step: int | None = None,
                bos_id: int | None = None, eos_id: int | None = None,
                peft: bool = False) -> dict:
    """Exports the decoder of a converted checkpoint or training workdir as a HF LLaMA
    (sharded safetensors, index, config.json, generation_config.json). Returns config.json.
    LoRA factors are merged into the weights, or with `peft` left out of them and written as a
    PEFT adapter in `out_dir`/lora (PeftModel.from_pretrained(base, out_dir/lora))."""
    ck = ckpt_lib.open_llm_checkpoint(ckpt_dir, step)
    get, has = ck.read, ck.has
    cfg = dataclasses.replace(ck.cfg, scan_layers=_is_scanned(has))
    if peft and not cfg.lora_rank:  # before anything is written
        raise lora_lib.LoraError(f"--peft: {ckpt_dir} has no LoRA factors (lora_a/lora_b); "
                                 f"train with --config.train.stage=lora, or export without "
                                 f"--peft")
    attention_bias, mlp_bias = export_bias_flags(get, has, cfg)
    _prepare_hf_out(out_dir, overwrite)
    # One dtype for the whole export, the widest stored: a training run stores what it froze
    # in bf16 (config.train.frozen_param_dtype) and what it trained in fp32; the merged linears
    # are fp32 then (_merged_linear), and the rest follows them.
    stored = [np.dtype(m.dtype) for m in traverse_util.flatten_dict(ck.metadata_tree()).values()]
    export = np.result_type(*stored) if stored else None
    adapter: dict[str, np.ndarray] = {}  # LoRA tensors are small: kept, written after the base

    def base_only():
        for name, value in iter_hf_tensors(get, has, cfg, attention_bias=attention_bias,
                                           mlp_bias=mlp_bias, peft=peft):
            if export is not None:
                value = value.astype(export, copy=False)
            if name.startswith(lora_lib.PEFT_PREFIX):
                adapter[name] = value
            else:
                yield name, value

    _, dtype = write_hf_shards(base_only(), out_dir, parse_size(max_shard_size))
    if peft:
        lora_lib.write_adapter(os.path.join(out_dir, "lora"), adapter, cfg,
                               os.path.abspath(out_dir), overwrite)
    hf_src = ck.extra.get("hf_config") or {}
    bos = next(i for i in (bos_id, ck.extra.get("bos_id"), 1) if i is not None)
    eos = next(i for i in (eos_id, ck.extra.get("eos_id"), 2) if i is not None)
    pad = hf_src.get("pad_token_id")
    hf_config = hf_config_from_llama(cfg, dtype=dtype, attention_bias=attention_bias,
                                     mlp_bias=mlp_bias, bos_id=bos, eos_id=eos, pad_id=pad)
    ckpt_lib.write_json(os.path.join(out_dir, "config.json"), hf_config)
    generation = {"bos_token_id": bos, "eos_token_id": eos}
    if pad is not None:
        generation["pad_token_id"] = pad
    ckpt_lib.write_json(os.path.join(out_dir, "generation_config.json"), generation)
    if tokenizer:
        if not os.path.exists(tokenizer):
            raise FileNotFoundError(f"tokenizer not found: {tokenizer}")
        if os.path.isdir(tokenizer):
            for n in os.listdir(tokenizer):
                if n.startswith(("tokenizer", "special_tokens_map")):
                    shutil.copy(os.path.join(tokenizer, n), out_dir)
        else:
            shutil.copy(tokenizer, os.path.join(out_dir, os.path.basename(tokenizer)))
    return hf_config


# ----------------------------------------------------------------------------- forward


def text_logits(params: dict, cfg: LlamaConfig, ids: np.ndarray) -> np.ndarray:
    """fp32 text-only forward: embed -> decoder, positions arange, every token valid."""
    import jax
    import jax.numpy as jnp
    from earthgpt_jax.models.llama import LlamaDecoder

    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be int [batch, length], got shape {ids.shape}")
    dec = LlamaDecoder(cfg, dtype=jnp.float32)
    batch, length = ids.shape

    @jax.jit
    def forward(p, tokens):
        embeds = dec.apply({"params": p}, tokens, method=LlamaDecoder.embed)
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        logits, _ = dec.apply({"params": p}, embeds, positions, jnp.ones((batch, length), bool))
        return logits

    params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return np.asarray(forward(params32, jnp.asarray(ids, jnp.int32)), np.float32)


def checkpoint_logits(ckpt_dir: str, ids: np.ndarray, step: int | None = None) -> np.ndarray:
    params, cfg = load_llm_params(ckpt_dir, step)
    return text_logits(params, cfg, ids)
