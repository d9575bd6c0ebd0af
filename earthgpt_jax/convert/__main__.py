"""Weight conversion CLI.

  python -m earthgpt_jax.convert hf-to-orbax --hf_dir=D --out_dir=O [--overwrite]
      [--scan_layers=true]
  python -m earthgpt_jax.convert orbax-to-hf --ckpt_dir=O --out_dir=D [--tokenizer=PATH]
      [--max_shard_size=5GB] [--overwrite] [--step=N] [--bos_id=1] [--eos_id=2] [--peft]
  python -m earthgpt_jax.convert peft-to-orbax --hf_dir=D --peft_dir=A --out_dir=O
      [--overwrite] [--scan_layers=true]
  python -m earthgpt_jax.convert logits --ckpt_dir=O --ids=IDS.npy --out=LOGITS.npy [--step=N]
  python -m earthgpt_jax.convert dinov2-to-orbax --hf_dir=D --out_dir=O [--overwrite]
  python -m earthgpt_jax.convert convnext-to-orbax --weights=D_OR_FILE --out_dir=O [--overwrite]

`--ckpt_dir` is a converted checkpoint (hf-to-orbax's --out_dir) or a training workdir (its
latest checkpoint unless --step). LoRA (stage lora) is merged into the exported weights, or
with --peft the base goes to --out_dir and a PEFT adapter to OUT_DIR/lora. peft-to-orbax
converts a HF LLaMA plus a PEFT LoRA adapter of it, for --config.init.llm of a stage-lora run
that continues training the adapter (it prints the LoRA flags that run needs).
"""

from __future__ import annotations

import logging
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
VERBS = ("hf-to-orbax", "orbax-to-hf", "peft-to-orbax", "logits", "dinov2-to-orbax",
         "convnext-to-orbax")

flags.DEFINE_string("hf_dir", None, "HF LLaMA directory (hf-to-orbax input).")
flags.DEFINE_string("out_dir", None, "Output directory.")
flags.DEFINE_boolean("overwrite", False, "Replace an existing checkpoint in --out_dir.")
flags.DEFINE_boolean("scan_layers", True, "Stack decoder layers (params layers/...) or not "
                     "(layers_0/...).")
flags.DEFINE_string("ckpt_dir", None, "Converted checkpoint or training workdir.")
flags.DEFINE_integer("step", None, "Training step to read from a workdir (default latest).")
flags.DEFINE_string("tokenizer", None, "Tokenizer file (or directory) copied next to the HF "
                    "weights.")
flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors shard (e.g. 5GB, 500MB).")
flags.DEFINE_integer("bos_id", None, "BOS id for the exported configs (default: the source's "
                     "or 1).")
flags.DEFINE_integer("eos_id", None, "EOS id for the exported configs (default: the source's "
                     "or 2).")
flags.DEFINE_string("weights", None, "ConvNeXt weights: a HF ConvNext directory, a timm or "
                    "open_clip folder as downloaded, or a .safetensors/.bin file "
                    "(convnext-to-orbax).")
flags.DEFINE_boolean("peft", False, "orbax-to-hf: write LoRA as a PEFT adapter in OUT_DIR/lora "
                     "instead of merging it into the weights.")
flags.DEFINE_string("peft_dir", None, "PEFT LoRA adapter directory (peft-to-orbax input).")
flags.DEFINE_string("ids", None, "int [batch, length] .npy of token ids (logits).")
flags.DEFINE_string("out", None, "Where the float32 [batch, length, vocab] logits .npy goes.")


def _require(*names):
    missing = [n for n in names if not getattr(FLAGS, n)]
    if missing:
        raise app.UsageError(f"missing {', '.join('--' + n for n in missing)}")


def main(argv):
    if len(argv) != 2 or argv[1] not in VERBS:
        raise app.UsageError(f"usage: python -m earthgpt_jax.convert {{{'|'.join(VERBS)}}} "
                             f"--flags...; got {argv[1:]}")
    from earthgpt_jax.convert import llama

    verb = argv[1]
    start = time.time()
    if verb in ("hf-to-orbax", "peft-to-orbax"):
        _require("hf_dir", "out_dir", *(("peft_dir",) if verb == "peft-to-orbax" else ()))
        cfg = llama.hf_to_orbax(FLAGS.hf_dir, FLAGS.out_dir, scan_layers=FLAGS.scan_layers,
                                overwrite=FLAGS.overwrite,
                                peft_dir=FLAGS.peft_dir if verb == "peft-to-orbax" else None)
        logging.info("wrote %s (%d layers, scan_layers=%s) in %.1fs", FLAGS.out_dir,
                     cfg.num_layers, cfg.scan_layers, time.time() - start)
        if cfg.lora_rank:  # the run that continues it needs the adapter's own LoRA shape
            print(f"continue training with --config.train.stage=lora "
                  f"--config.init.llm={FLAGS.out_dir} --config.model.lora.rank={cfg.lora_rank} "
                  f"--config.model.lora.alpha={cfg.lora_alpha:g} "
                  f"--config.model.lora.targets={','.join(cfg.lora_targets)}")
    elif verb == "orbax-to-hf":
        _require("ckpt_dir", "out_dir")
        llama.orbax_to_hf(FLAGS.ckpt_dir, FLAGS.out_dir, tokenizer=FLAGS.tokenizer,
                          max_shard_size=FLAGS.max_shard_size, overwrite=FLAGS.overwrite,
                          step=FLAGS.step, bos_id=FLAGS.bos_id, eos_id=FLAGS.eos_id,
                          peft=FLAGS.peft)
        logging.info("wrote %s in %.1fs", FLAGS.out_dir, time.time() - start)
    elif verb in ("dinov2-to-orbax", "convnext-to-orbax"):
        from earthgpt_jax.convert import vision_io
        if verb == "dinov2-to-orbax":
            _require("hf_dir", "out_dir")
            cfg = vision_io.dinov2_to_orbax(FLAGS.hf_dir, FLAGS.out_dir,
                                            overwrite=FLAGS.overwrite)
        else:
            _require("weights", "out_dir")
            cfg = vision_io.convnext_to_orbax(FLAGS.weights, FLAGS.out_dir,
                                              overwrite=FLAGS.overwrite)
        logging.info("wrote %s (%s) in %.1fs", FLAGS.out_dir, cfg, time.time() - start)
    else:
        _require("ckpt_dir", "ids", "out")
        import numpy as np
        ids = np.load(FLAGS.ids)
        logits = llama.checkpoint_logits(FLAGS.ckpt_dir, ids, step=FLAGS.step)
        np.save(FLAGS.out, logits)
        logging.info("wrote logits %s to %s", logits.shape, FLAGS.out)


def run(argv: list[str]) -> None:
    """In-process entry point (tests, notebooks): parses `argv` fresh and runs `main`."""
    FLAGS.unparse_flags()
    main(FLAGS(list(argv)))


def _quiet_main(argv):
    """`main` with libraries that log through absl kept to warnings, as main.py does: orbax
    writes ~150 INFO lines per checkpoint. (After app.run, which sets the levels itself.)"""
    from earthgpt_jax import cli
    cli.quiet_library_logs()
    main(argv)


def _entry():
    try:
        app.run(_quiet_main)
    except Exception as e:  # a clear one-line error, not a traceback, for conversion errors
        from earthgpt_jax.convert.llama import ConversionError
        from earthgpt_jax.convert.lora import LoraError
        from earthgpt_jax.convert.vision import VisionConversionError
        if isinstance(e, (ConversionError, LoraError, VisionConversionError, FileExistsError,
                          FileNotFoundError)):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        raise


if __name__ == "__main__":
    _entry()
