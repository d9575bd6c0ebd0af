"""What `main.py` runs: data -> tokenizer -> mesh -> train and/or evaluate, per --mode."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os

import jax

from earthgpt_jax import checkpoints, cli, layout, parallel
from earthgpt_jax.config import RunConfig
from earthgpt_jax.data import prepare, sources
from earthgpt_jax.data.pipeline import TrainPreprocess
from earthgpt_jax.models.presets import EarthGPTConfig, get_preset

MODES = ("train", "eval", "compile")


def model_config(config: RunConfig, vocab_size: int | None = None,
                 bos_id: int = 1) -> EarthGPTConfig:
    """config.model's preset with this vocabulary (None: the preset's, LLaMA-2's 32000 for
    7b/13b), stage B's bias/scale adapters and stage lora's LoRA, which those stages train."""
    lora = config.model.lora if config.train.stage == "lora" else None
    return get_preset(config.model.size, vocab_size=vocab_size, bos_id=bos_id,
                      dtype=config.model.dtype, remat_policy=config.model.remat_policy,
                      input_bands=config.model.input_bands, band_init=config.model.band_init,
                      llm={"adapters": config.train.stage == "b",
                           "attention_impl": config.model.attention_impl,
                           "lora_rank": lora.rank if lora else 0,
                           "lora_alpha": lora.alpha if lora else 32.0,
                           "lora_targets": lora.modules if lora else ()})


def _needs_release(config: RunConfig, workdir: str, mode: str, evaluates_suites: bool) -> bool:
    """Training on MMRS-1M (config.data.sources empty or listing mmrs1m), the demo and the
    mmrs1m test split read MMRS-1M. The paper's suites use it only for the blind baselines'
    training answers, so without it they are evaluated anyway (baselines from their own
    references)."""
    if config.data.synthetic or (mode == "train" and sources.reads_release(config.data.sources)):
        return True
    if mode == "train" and not config.eval.at_end:
        return False  # caption sources only (stage A), no evaluation after training
    if not evaluates_suites:
        return True
    return os.path.isdir(os.path.join(prepare.release_dir(config, workdir), "data", "json"))


def run(config: RunConfig, workdir: str, mode: str) -> dict | None:
    from earthgpt_jax import train as train_lib
    from earthgpt_jax.evaluate import suites
    from earthgpt_jax.evaluate.runner import run_eval, run_suites
    from earthgpt_jax.generate import unrolled_for_decoding
    from earthgpt_jax.inference import InferenceSession

    if mode not in MODES:
        raise ValueError(f"unknown --mode={mode}; choose one of {', '.join(MODES)}")
    parallel.set_tpu_flags()
    check_model(config)
    if mode == "compile":
        return compile_only(config)
    if mode == "eval":  # before any data is generated or built
        check_checkpoint(workdir)
    # An mmrs1m entry of config.data.sources names the release (for training and evaluation).
    config = sources.with_release_dir(config)
    if mode == "train":  # bad entries and missing directories stop the run within seconds
        sources.parse_sources(config.data.sources, allow_missing=("mmrs1m",))
    evaluates_suites = bool(config.eval.suites) and (mode == "eval" or config.eval.at_end)
    if evaluates_suites:
        try:
            suites.selected_suites(config.eval.suites, "--config.eval.suites")
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
    needs_release = _needs_release(config, workdir, mode, evaluates_suites)
    # Fail within seconds when the release is missing, before any compile.
    if needs_release and not config.data.synthetic:
        prepare.check_release(prepare.release_dir(config, workdir))
    parallel.maybe_initialize_distributed(config.distributed)
    os.makedirs(workdir, exist_ok=True)
    opened, skipped = [], {}
    if evaluates_suites:
        # Before any compile (and before training): an unprepared suite costs seconds, not a
        # run. Training never stops for one; its end-of-run evaluation lists it as skipped.
        opened, skipped = suites.open_suites(
            config, workdir, skip_missing=config.eval.skip_missing_suites or mode == "train",
            may_prepare=jax.process_count() == 1)
    train_source = None
    if needs_release:
        data_dir = prepare.prepare_tfds(config, workdir)
        train_source = prepare.data_source(data_dir, "train")
    trains_on_captions = any(s.kind in sources.CAPTION_KINDS for s in
                             sources.parse_sources(config.data.sources, check_paths=False))
    # The demo's own tokenizer is trained on MMRS-1M text only; caption data needs LLaMA-2's.
    tokenizer = prepare.prepare_tokenizer(config, workdir,
                                          None if trains_on_captions else train_source)
    cfg = model_config(config, tokenizer.vocab_size, tokenizer.bos_id)
    checkpoints.save_model_config(cfg, workdir)
    trainer = train_lib.Trainer.for_run(config, cfg, parallel.build_mesh(config.mesh))
    if mode == "train":
        check_init_sources(config, workdir, trainer)
        # config.mesh.layout=auto: plain data parallelism where the compiled step fits a device.
        trainer, _ = layout.choose_trainer(config, trainer)
    mesh = trainer.mesh
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size,
                 jax.devices()[0].platform)
    if mode == "train":
        preprocess = TrainPreprocess(tokenizer.path, cfg.image_size, config.data.max_text_len,
                                     input_bands=cfg.input_bands)
        train_data = (sources.open_sources(config, workdir, train_source)
                      if config.data.sources.strip() else train_source)
        state = train_lib.train(config, workdir, trainer, train_data, preprocess)
        if not config.eval.at_end:
            return None
        params, step = state.params, int(jax.device_get(state.step))
        del state  # saved; the optimizer state is not needed to decode
    else:
        params, step = checkpoints.restore_params(workdir, trainer.abstract_state.params)
        logging.info("Evaluating the checkpoint of step %d", step)
    # Decoding reads unrolled layers, as sessions from a workdir do (generate.py says why); the
    # stacked arrays are dropped once split.
    model, params = unrolled_for_decoding(trainer.model, params)
    session = InferenceSession(model, params, tokenizer, mesh, trainer.rules, step=step)
    if evaluates_suites:
        return run_suites(config, workdir, session, opened, skipped, train_source=train_source)
    eval_source = prepare.data_source(data_dir, config.eval.split)
    return run_eval(config, workdir, session, eval_source, train_source=train_source)


def check_model(config: RunConfig) -> None:
    """config.model's remat policy, checked before any data work (the config checks the rest)."""
    from earthgpt_jax.models.llama import REMAT_POLICIES

    if config.model.remat_policy not in ("none", *REMAT_POLICIES):
        raise cli.UsageError(f"config.model.remat_policy={config.model.remat_policy!r} is not "
                             f"one of none, {', '.join(REMAT_POLICIES)}")


def _checkpoints_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _has_checkpoint(workdir: str) -> bool:
    folder = _checkpoints_dir(workdir)
    return os.path.isdir(folder) and checkpoints.latest_step(folder) is not None


def check_checkpoint(workdir: str) -> None:
    """--mode=eval reads the workdir's latest checkpoint: without one, stop in seconds."""
    if not _has_checkpoint(workdir):
        raise cli.UsageError(
            f"--mode=eval found no checkpoint in {_checkpoints_dir(workdir)}: train first (the "
            f"same command with --mode=train) or point --workdir at a training run")


def check_init_sources(config: RunConfig, workdir: str, trainer) -> None:
    """config.init's checkpoints checked against the model (names and shapes, from their
    metadata) before anything compiles, unless the run resumes its own checkpoint."""
    if not config.init.named() or _has_checkpoint(workdir):
        return
    try:
        trainer.check_init_sources()
    except (ValueError, FileNotFoundError) as e:
        raise cli.UsageError(
            f"{e} (this run's model: config.model.size={config.model.size}, a "
            f"{trainer.model.cfg.llm.vocab_size}-token vocabulary; give config.init weights of "
            f"that model, converted with python -m earthgpt_jax.convert, or fix the path)") from e


def _pip_install(package: str) -> str:
    """`pip install PACKAGE==PIN`, pinned as requirements-dev.txt pins it."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "requirements-dev.txt")
    pins = []
    with contextlib.suppress(OSError), open(path) as f:
        pins = [line.split("#")[0].strip() for line in f if line.startswith(package + "==")]
    return f"pip install {pins[0] if pins else package}"


def compile_only(config: RunConfig) -> dict:
    """--mode=compile: the real train step compiled for config.compile.topology; no data, no
    TPU. The vocabulary is the preset's (LLaMA-2's 32000 for 7b/13b)."""
    from earthgpt_jax import aot

    topology = config.compile.topology
    if not topology:
        raise cli.UsageError("--mode=compile needs --config.compile.topology=NAME: a TPU "
                             "accelerator type such as v5p-128 or a chip grid such as v5e:4x4")
    try:
        topo = aot.parse_topology(topology, config.compile.num_slices)
    except ValueError as e:
        raise cli.UsageError(f"--config.compile.topology={topology}: {e}") from None
    if importlib.util.find_spec("libtpu") is None:
        raise cli.UsageError(f"--mode=compile needs libtpu (it describes TPU topologies to XLA "
                             f"on this host): {_pip_install('libtpu')}")
    cfg = model_config(config)
    print(f"compiling the train step for {topology} ({topo.chips * topo.num_slices} chips; "
          f"several minutes)...", flush=True)
    try:
        report = aot.compile_train_step(config, cfg, topology, config.compile.num_slices)
    except aot.LibtpuBusyError as e:
        raise cli.UsageError(str(e)) from None
    print(aot.format_report(report), flush=True)
    if jax.process_index() == 0 and config.compile.report_json:
        with open(config.compile.report_json, "w") as f:
            json.dump(report, f, indent=2)
    return report
