"""Getting a run's data ready: the release (generated for the demo), the TFDS build, and the
tokenizer. Each step is skipped when its output already exists, so reruns start fast."""

from __future__ import annotations

import logging
import os

import tensorflow_datasets as tfds

from earthgpt_jax.data import pipeline, synthetic
from earthgpt_jax.data.tokenizer import USER_TEMPLATE, Tokenizer, train_tokenizer


class ReleaseNotFoundError(FileNotFoundError):
    pass


def release_dir(config, workdir: str) -> str:
    return os.path.abspath(os.path.expanduser(config.data.manual_dir or
                                              os.path.join(workdir, "mini_mmrs1m")))


def check_release(root: str) -> None:
    """Stops early with what is missing and what to do, before anything heavy starts."""
    json_dir = os.path.join(root, "data", "json")
    if not os.path.isdir(json_dir):
        raise ReleaseNotFoundError(
            f"MMRS-1M release not found: no {json_dir} (config.data.manual_dir={root}); extract "
            f"the release's data.tar.gz.* parts there, or try EarthGPT without it: make demo")


def prepare_release(config, workdir: str) -> str:
    root = release_dir(config, workdir)
    if config.data.synthetic and not os.path.isdir(os.path.join(root, "data", "json")):
        logging.info("Writing the miniature MMRS-1M release to %s", root)
        synthetic.write_release(root, seed=config.data.seed,
                                num_train_images=config.data.synthetic_train_images,
                                num_test_images=config.data.synthetic_test_images)
    check_release(root)
    return root


def prepare_tfds(config, workdir: str) -> str:
    """Builds `mmrs1m` (array_record) from the release unless already built; returns data_dir."""
    from tfds_builders.mmrs1m import build  # registers the builder with TFDS

    root = prepare_release(config, workdir)
    data_dir = os.path.abspath(config.data.tfds_dir or os.path.join(workdir, "tfds"))
    build(root, data_dir, max_bad_fraction=config.data.max_bad_fraction,
          validation_fraction=config.data.validation_fraction,
          exclude_images=config.data.exclude_images or None)
    return data_dir


def data_source(data_dir: str, split: str):
    import tfds_builders.mmrs1m  # noqa: F401  (registers the builder)
    return tfds.data_source("mmrs1m", data_dir=data_dir, split=split)


def prepare_tokenizer(config, workdir: str, train_source) -> Tokenizer:
    """The configured tokenizer, or for the demo one trained on the training conversations."""
    if config.tokenizer.path:
        return Tokenizer(os.path.expanduser(config.tokenizer.path))
    path = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(path):
        return Tokenizer(path)
    if not config.data.synthetic or train_source is None:  # None: training reads captions
        raise ValueError("config.tokenizer.path is empty: point it at LLaMA-2's tokenizer.model")
    texts = [USER_TEMPLATE]
    for i in range(len(train_source)):
        texts += [turn["value"] for turn in pipeline.conversation_turns(train_source[i])]
    logging.info("Training a %d-piece tokenizer on %d strings", config.tokenizer.vocab_size,
                 len(texts))
    return train_tokenizer(texts, path, config.tokenizer.vocab_size)
