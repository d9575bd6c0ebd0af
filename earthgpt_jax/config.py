"""The run configuration, typed: one dataclass per part (model, data, tokenizer, train, init,
checkpoint, mesh, distributed, compile, eval), each field with its type, its default and why.

The defaults are the paper's run (EarthGPT-13B, stage B, on MMRS-1M). `configs/mmrs.py` turns
them into the ConfigDict that `--config.<key>=<value>` overrides (its presets replace a few
fields); `from_config_dict` turns that back into these types once, at the entry point. Imports
nothing heavy (no JAX, no ml_collections): `main.py` validates a config before anything slow.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from earthgpt_jax.models.presets import (ATTENTION_IMPLS, LORA_MODULES, band_init_rows,
                                         lora_modules_matching)

# Training stages (optim.STAGE_TRAINABLE says what each trains): `all` (the demo from scratch),
# `a` (cross-modal mutual comprehension), `b` (unified instruction tuning), `lora` (LoRA on the
# decoder linears, config.model.lora; everything else frozen).
STAGES = ("all", "a", "b", "lora")
MODEL_SIZES = ("tiny", "demo", "7b", "13b")
DTYPES = ("float32", "bfloat16")

# Logical parameter/activation axes -> mesh axes. FSDP shards the embedding dimension inside a
# slice; tensor parallelism splits heads and MLP; the vision towers are replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")), ("length", None), ("embed", "fsdp"),
    ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
    ("layers", None), ("fused", None),
)

# Caption sources' prompts (stage A): one picked per sample by a hash of its key and the seed.
# The paper's are unknown; these are ours, in the style of LLaVA's brief-description prompts.
CAPTION_PROMPTS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Write a short caption for the image.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the image.",
    "Describe this image briefly.",
)

PAPER_SUITES = "clrs,nasc_tg2,nwpu_captions,crsvqa,rsvqa_hr,dior_rsvg,ssdd,hrsid,hit_uav"


def _one_of(section: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"config.{section}.{name}={value!r} is not one of "
                         f"{', '.join(map(str, allowed))}")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA of stage `lora` (train.stage=lora; other stages have none and ignore this)."""
    rank: int = 16  # must be > 0 with stage lora
    alpha: float = 32.0  # the product is scaled by alpha / rank, as PEFT's lora_alpha
    dropout: float = 0.0  # only 0: the train step has no random key to draw a dropout mask
    # Comma-separated regexes, each full-matched against the decoder linears' names (q_proj,
    # k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj); default: attention + MLP.
    targets: str = ",".join(LORA_MODULES)

    def __post_init__(self):
        if self.rank < 0 or self.alpha <= 0:
            raise ValueError(f"config.model.lora.rank={self.rank} must be >= 0 and "
                             f"config.model.lora.alpha={self.alpha} > 0")
        if self.dropout != 0:
            raise ValueError(f"config.model.lora.dropout={self.dropout}: only 0 is supported "
                             f"(the train step has no random key for dropout masks)")
        try:
            lora_modules_matching(self.targets)
        except ValueError as e:
            raise ValueError(f"config.model.lora.targets={self.targets!r}: {e}") from None

    @property
    def modules(self) -> tuple[str, ...]:
        return lora_modules_matching(self.targets)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    size: str = "13b"  # a preset of earthgpt_jax/models/presets.py: tiny, demo, 7b, 13b
    # What the decoder layers keep for the backward pass: none (no remat), full, or a named
    # policy of earthgpt_jax/models/llama.REMAT_POLICIES (checked there, by run.py at start).
    remat_policy: str = "full"
    dtype: str = "bfloat16"  # compute dtype
    # Attention kernel of training and teacher-forced passes: see models/layers.attention.
    attention_impl: str = "einsum"
    lora: LoraConfig = LoraConfig()
    # Bands the model reads: 3 = RGB as the towers were trained; other counts (e.g. 4 for
    # R,G,B,NIR) add a learned 1x1 band adapter before the towers (models/bands.py), trained in
    # stages all, a and b. band_init: the bands it starts from, "r,g,b" 0-based indices or
    # "mean"; "" = the first three (grey below three); set, it adds the adapter to 3 bands too
    # (e.g. "2,1,0" for BGR files).
    input_bands: int = 3
    band_init: str = ""

    def __post_init__(self):
        if isinstance(self.lora, dict):  # RunConfig.replace(model={"lora": {...}})
            object.__setattr__(self, "lora", _build(LoraConfig, self.lora, "model.lora"))
        _one_of("model", "size", self.size, MODEL_SIZES)
        _one_of("model", "attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _one_of("model", "dtype", self.dtype, DTYPES)
        band_init_rows(self.band_init, self.input_bands)  # ValueError naming config.model.*


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Where the MMRS-1M release (the directory holding `data/`) lives. For the demo, empty means
    # <workdir>/mini_mmrs1m, generated on first use.
    manual_dir: str = "~/tensorflow_datasets/downloads/manual/mmrs1m"
    synthetic: bool = False  # the generated miniature release (the demo)
    # Training sources mixed by weight, KIND:PATH[:WEIGHT],...: see data/sources.py.
    sources: str = ""
    caption_prompts: tuple[str, ...] = CAPTION_PROMPTS
    synthetic_train_images: int = 2400  # images per split of the generated miniature release
    synthetic_test_images: int = 400
    tfds_dir: str = ""  # empty: <workdir>/tfds
    seed: int = 0
    max_text_len: int = 1024
    num_threads: int = 2
    # Worker processes running the input pipeline (decode, resize, tokenise, pack), each with
    # num_threads threads; 0 = threads in the training process only. The 448 px pipeline makes
    # ~60-470 samples/s per 2 cores (benchmarks/), against ~34 one H100 consumes at 7B stage B.
    num_workers: int = 4
    max_bad_fraction: float = 0.01
    validation_fraction: float = 0.01  # held out by a hash of the image path
    # File listing evaluation-test images to keep out of training (overlap removal); "" = none.
    exclude_images: str = ""
    # Sequence packing (data/packing.py): whole samples, each with its image, share rows of
    # pack_length positions; attention stays inside each sample; train.batch_size counts rows.
    # images_per_pack: samples (image slots the towers encode) per row at most; 0: as many as a
    # row can hold, pack_length // (BOS + visual tokens + 1 text token): 7 for 2048 positions
    # and 256 visual tokens. pack_bins: rows filled at once (first fit).
    packing: bool = True
    pack_length: int = 2048
    images_per_pack: int = 0
    pack_bins: int = 64

    def __post_init__(self):
        if self.num_workers < 0:
            raise ValueError(f"config.data.num_workers must be >= 0, got {self.num_workers}")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    # A LLaMA-2 tokenizer.model for real runs; the demo trains its own of vocab_size pieces.
    path: str = ""
    vocab_size: int = 640


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    stage: str = "b"
    num_steps: int = 20000
    batch_size: int = 256
    learning_rate: float = 2e-5
    warmup_steps: int = 500
    end_lr_fraction: float = 0.05
    # Length of warmup + cosine; 0 means num_steps. Fix it to extend a run without changing
    # the schedule of the steps already taken.
    lr_decay_steps: int = 0
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.05
    grad_clip_norm: float = 1.0
    grad_accum_steps: int = 1  # microbatches per step: the same update, 1/N of the activations
    # Stop after this many non-finite steps in a row (each one is skipped and counted).
    max_nonfinite_steps_in_row: int = 10
    # 'tokens': mean over all answer tokens of the batch; 'examples': mean of per-conversation
    # means, so short answers (classes, yes/no) weigh as much as long detection answers.
    loss_normalization: str = "tokens"
    # Positions per chunk of the LM head + cross-entropy (0: whole rows at once). Chunks keep
    # only [batch, chunk, vocab] fp32 logits alive instead of [batch, length, vocab] and its
    # gradient; the backward pass recomputes each chunk's LM head (executed, not model, FLOPs).
    # Off: with LLaMA-2's vocabulary it barely lowers the peak (README, "Will it fit?").
    loss_chunk: int = 0
    seed: int = 0
    log_every_steps: int = 10
    # Datasheet bf16 FLOP/s of one device for the logged MFU; 0 = known from the device kind
    # (TPU v4/v5e/v5p/v6e, H100/H200/A100/B200), no MFU where unknown (CPU).
    peak_flops_per_device: float = 0.0
    # Storage dtype of the weights the stage freezes (created, restored and checkpointed in
    # it): bfloat16 halves their memory (they are read in the compute dtype anyway, and
    # LLaMA-2/DINOv2 ship in 16 bits). Trainable leaves always keep fp32 masters.
    frozen_param_dtype: str = "bfloat16"

    def __post_init__(self):
        _one_of("train", "stage", self.stage, STAGES)
        _one_of("train", "loss_normalization", self.loss_normalization, ("tokens", "examples"))
        _one_of("train", "frozen_param_dtype", self.frozen_param_dtype, DTYPES)
        if self.loss_chunk < 0:
            raise ValueError(f"config.train.loss_chunk={self.loss_chunk} must be >= 0 "
                             "(0: no chunking)")
        if self.grad_accum_steps < 1 or self.batch_size % self.grad_accum_steps:
            raise ValueError(f"config.train.batch_size={self.batch_size} must divide by "
                             f"grad_accum_steps={self.grad_accum_steps} (>= 1)")

    @property
    def decay_steps(self) -> int:
        return max(self.lr_decay_steps or self.num_steps, self.warmup_steps + 1)


@dataclasses.dataclass(frozen=True)
class InitConfig:
    # Converted weights to start from (python -m earthgpt_jax.convert ...): a LLaMA-2 checkpoint
    # from hf-to-orbax, DINOv2 from dinov2-to-orbax, CLIP ConvNeXt from convnext-to-orbax.
    llm: str = ""
    vit: str = ""
    convnext: str = ""
    # A training workdir to start from (stage B: stage A's): all of its latest params, a fresh
    # optimizer at step 0; parameters it lacks (stage B's adapters) start as the identity.
    # llm/vit/convnext, when also set, replace their part. A checkpoint in this run's own
    # workdir wins over both (a restarted run resumes).
    from_workdir: str = ""

    def named(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v}


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Axis sizes inside a slice (ICI) and across slices (DCN); -1 fills the remaining devices.
    ici: dict = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    dcn: dict = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    rules: tuple = DEFAULT_RULES
    # auto: plain data parallelism inside each slice when the compiled train step fits a device
    # (only trainable gradients cross devices), else `ici` as given (layout.py); it applies
    # while `ici` keeps its FSDP fill (data 1, fsdp -1). manual: `ici` as given, always.
    layout: str = "auto"
    # Device memory auto plans for, GiB; 0: what the device reports (GPU/TPU; a CPU reports
    # none, so there auto keeps `ici` unless this is set).
    memory_limit_gib: float = 0.0

    def __post_init__(self):
        _one_of("mesh", "layout", self.layout, ("auto", "manual"))
        if self.memory_limit_gib < 0:
            raise ValueError(f"config.mesh.memory_limit_gib={self.memory_limit_gib} must be >= 0 "
                             "(0: what the device reports)")
        # JAX wants hashable rules: tuples all the way down.
        object.__setattr__(self, "rules", tuple(
            (name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
            for name, axes in self.rules))


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    # auto: jax.distributed.initialize() finds the cluster itself (TPU pods; launch_tpu.sh sets
    # it). Otherwise a coordinator address joins a CPU/GPU multi-process run.
    auto: bool = False
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    # --mode=compile: AOT-compile the train step for a TPU topology on this host (needs libtpu).
    topology: str = ""  # e.g. v4-32, v5e-64, v5p-128, or a chip grid v5e:4x4
    num_slices: int = 1
    report_json: str = ""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    at_end: bool = True
    split: str = "test"
    batch_size: int = 64
    max_new_tokens: int = 256
    max_examples: int = 0  # 0: the whole split
    # Decoding: greedy (the paper's tables), beam search with beam_width > 1, or top-p sampling
    # with temperature > 0 (seeded by eval.seed and the batch, so a rerun gives the same text).
    beam_width: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    num_pictures: int = 4
    # The paper's evaluation suites (earthgpt_jax/evaluate/suites.py), comma-separated; empty:
    # the mmrs1m `eval.split` instead. --mode=eval writes the paper's tables beside ours.
    suites: str = PAPER_SUITES
    # Where the suites' TFDS sets are prepared; empty: data.tfds_dir (or <workdir>/tfds).
    suites_data_dir: str = ""
    # Optional folder of each suite's raw download as <suite name>/, to prepare it from.
    suites_manual_dir: str = ""
    # Largest fraction of skipped records per split when preparing a suite (the builders' 1%).
    suites_max_bad_fraction: float = 0.01
    # False: a suite that is neither prepared nor preparable stops the run with the command
    # that prepares it. True: it is skipped and listed in results.md.
    skip_missing_suites: bool = False
    # METEOR and SPICE need Java (pycocoevalcap's jars); skipped with a note when it is absent.
    java_metrics: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    train: TrainConfig = TrainConfig()
    init: InitConfig = InitConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    compile: CompileConfig = CompileConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        if self.train.stage == "lora" and self.model.lora.rank <= 0:
            raise ValueError(f"config.train.stage=lora needs config.model.lora.rank > 0, got "
                             f"{self.model.lora.rank}")

    def replace(self, **sections: dict) -> "RunConfig":
        """A copy with fields of some sections replaced: replace(train={'num_steps': 3})."""
        return dataclasses.replace(self, **{
            name: dataclasses.replace(getattr(self, name), **fields)
            for name, fields in sections.items()})


def to_dict(run: RunConfig) -> dict:
    """The nested dict configs/mmrs.py hands ml_collections."""
    return dataclasses.asdict(run)


def _plain(value: Any) -> Any:
    """ConfigDict -> dict, lists -> tuples: the types the dataclasses hold."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    return value


def from_config_dict(config) -> RunConfig:
    """The typed RunConfig of an (overridden) ConfigDict or nested dict. A key no section has,
    or a value a section refuses, is a ValueError naming `config.<section>.<key>`."""
    config = _plain(config)
    sections = {f.name: type(f.default) for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(config) - set(sections))
    if unknown:
        raise ValueError(f"config.{unknown[0]}: no such section; the sections are "
                         f"{', '.join(sections)}")
    return RunConfig(**{name: _build(cls, config.get(name, {}), name)
                        for name, cls in sections.items()})


def _build(cls, given: dict, where: str):
    """cls(**given), its nested sections (fields whose default is a dataclass, such as
    model.lora) built from their dicts the same way; an unknown key names the closest field."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key in given:
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)
            hint = f"; did you mean {where}.{close[0]}?" if close else ""
            raise ValueError(f"config.{where}.{key}: no such field{hint}")
    return cls(**{key: _build(type(defaults[key]), value, f"{where}.{key}")
                  if dataclasses.is_dataclass(defaults[key]) and isinstance(value, dict)
                  else value for key, value in given.items()})
