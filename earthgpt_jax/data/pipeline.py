"""grain pipelines over `tfds.data_source`: shuffle, per-process slice, decode, pad-to-square,
resize, tokenise with the chat template and loss mask, pack (optional: `packing.py`), batch.

Training reads a random-access `MapDataset`, so the iterator's state is one small JSON dict that
the checkpoint stores beside the model: a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from earthgpt_jax.data import packing as packing_lib
from earthgpt_jax.data.images import decode_image, square_and_resize
from earthgpt_jax.data.tokenizer import Tokenizer, encode_conversation


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def conversation_turns(record: dict) -> list[dict]:
    """The record's turns as [{'from', 'value'}] whether TFDS gave a dict of lists or a list."""
    conv = record["conversations"]
    if isinstance(conv, dict):
        return [{"from": _text(f), "value": _text(v)} for f, v in zip(conv["from"], conv["value"])]
    return [{"from": _text(t["from"]), "value": _text(t["value"])} for t in conv]


def record_metadata(record: dict) -> dict:
    return {key: _text(record[key]) for key in ("task", "sensor", "source", "image_path")
            } | {"width": int(record["width"]), "height": int(record["height"])}


@dataclasses.dataclass
class TrainPreprocess(grain.transforms.Map):
    """Record -> {'image', 'tokens', 'valid', 'loss_mask'} of fixed shapes."""
    tokenizer_path: str
    image_size: int
    max_text_len: int

    def __post_init__(self):
        self._tok = None

    def map(self, record: dict) -> dict[str, Any]:
        if self._tok is None:  # loaded lazily so the transform pickles into grain workers
            self._tok = Tokenizer(self.tokenizer_path)
        name = _text(record.get("image_path", "<image>"))
        image = square_and_resize(decode_image(record["image"], name), self.image_size)
        enc = encode_conversation(self._tok, conversation_turns(record), self.max_text_len)
        return {"image": image, "tokens": enc.tokens, "valid": enc.valid,
                "loss_mask": enc.loss_mask, "truncated": np.int32(enc.truncated),
                "example_id": name}


def train_dataset(source, preprocess: TrainPreprocess, *, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                  num_workers: int = 0, packing: packing_lib.PackingOptions | None = None
                  ) -> grain.IterDataset:
    """Endless, globally shuffled batches of this process's slice of `source`.

    `batch_size` is per process: examples, or packed rows with `packing`. `num_threads` read and
    preprocess records ahead of the consumer; `num_workers` > 0 runs the whole pipeline in that
    many worker processes (grain's mp_prefetch: each reads every num_workers-th record of this
    process's slice, and batches are taken from them in turn, so the order is still fixed by
    the seed and the state still checkpoints).
    """
    if num_workers < 0:
        raise ValueError(f"config.data.num_workers must be >= 0, got {num_workers}")
    if len(source) < process_count * batch_size:
        raise ValueError(
            f"the training split has {len(source)} records, fewer than one global batch "
            f"({process_count} processes x {batch_size}); lower config.train.batch_size")
    # Shuffle before repeat: each epoch is a fresh permutation of the whole split. Slicing after
    # the global shuffle gives each process a disjoint share of every epoch.
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count].map(preprocess)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    if packing is None:
        batches = ds.batch(batch_size, drop_remainder=True).to_iter_dataset(options)
    else:
        packing.check_fits(preprocess.max_text_len)
        ds = ds.map(packing_lib.ToPackable(packing.visual_tokens, packing.bos_id))
        rows = packing_lib.pack(ds.to_iter_dataset(options), packing, seed=seed)
        batches = rows.batch(batch_size, drop_remainder=True)
    if num_workers:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return batches


def iterate(dataset: grain.IterDataset):
    """A checkpointable iterator (`get_state`/`set_state`)."""
    return iter(dataset)
