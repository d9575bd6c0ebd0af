"""EarthGPT in JAX: train or evaluate from one config file.

  python main.py --config=configs/mmrs.py:demo --workdir=/tmp/earthgpt_demo
  python main.py --config=configs/mmrs.py:size=13b,stage=b --workdir=gs://bucket/run --mode=train
"""

from absl import app, flags
from ml_collections import config_flags

from earthgpt_jax import cli

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mmrs.py:demo.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, logs, metrics and evaluation go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "compile"],
                  "train (then eval if config.eval.at_end), eval the latest checkpoint, or "
                  "compile the train step for config.compile.topology (a TPU pod) and report "
                  "its memory per chip.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from earthgpt_jax.config import from_config_dict
    from earthgpt_jax.data.prepare import ReleaseNotFoundError
    from earthgpt_jax.run import run

    cli.quiet_library_logs()
    try:
        config = from_config_dict(flags.FLAGS.config)
    except (ValueError, TypeError) as e:  # a value a field refuses, e.g. an unknown stage
        cli.fail(str(e))
    try:
        run(config, flags.FLAGS.workdir, flags.FLAGS.mode)
    except (ReleaseNotFoundError, cli.UsageError) as e:
        cli.fail(str(e))


if __name__ == "__main__":
    # A mistyped --config.key or preset is one line, before main() imports anything heavy.
    app.run(main, flags_parser=cli.parse_flags)
