"""grain pipelines over `tfds.data_source`: shuffle, per-process slice, decode, pad-to-square,
resize, tokenise with the chat template and loss mask, pack (optional: `packing.py`), batch.

Training reads a random-access `MapDataset` (or a weighted mixture of `config.data.sources`,
`sources.py`: random-access sources and webdataset streams), so the iterator's state is one small
JSON dict that the checkpoint stores beside the model: a resumed run sees exactly the batches it
would have.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from earthgpt_jax.data import packing as packing_lib
from earthgpt_jax.data import sources as sources_lib
from earthgpt_jax.data.images import decode_image, square_and_resize, to_bands_uint8
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
    """Record -> {'image', 'tokens', 'valid', 'loss_mask'} of fixed shapes; 'image' is uint8
    [image_size, image_size, input_bands] (the model's config.model.input_bands)."""
    tokenizer_path: str
    image_size: int
    max_text_len: int
    input_bands: int = 3

    def __post_init__(self):
        self._tok = None

    def map(self, record: dict) -> dict[str, Any]:
        if self._tok is None:  # loaded lazily so the transform pickles into grain workers
            self._tok = Tokenizer(self.tokenizer_path)
        name = _text(record.get("image_path", "<image>"))
        pixels = record["image"]
        if not (isinstance(pixels, np.ndarray) and pixels.ndim == 3):  # caption sources decode
            pixels = decode_image(pixels, name, bands=self.input_bands)  # (and check) up front
        elif pixels.shape[-1] != self.input_bands:  # decoded as RGB: the same band rule applies
            pixels = to_bands_uint8(pixels, self.input_bands, name)
        image = square_and_resize(pixels, self.image_size)
        enc = encode_conversation(self._tok, conversation_turns(record), self.max_text_len)
        return {"image": image, "tokens": enc.tokens, "valid": enc.valid,
                "loss_mask": enc.loss_mask, "truncated": np.int32(enc.truncated),
                "example_id": name}


def train_dataset(source, preprocess: TrainPreprocess, *, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                  num_workers: int = 0, packing: packing_lib.PackingOptions | None = None
                  ) -> grain.IterDataset:
    """Endless, globally shuffled batches of this process's slice of `source`: a random-access
    source (`len`, `[i]`: the `mmrs1m` split) or a list of `sources.TrainSource`
    (`config.data.sources`) mixed before packing and batching (`mixed_samples`); the mixture's
    state (each source's state and the position in the interleaving) is part of the iterator's
    state. One random-access source without caption conversion gives exactly the batches (and
    state) it gives alone.

    `batch_size` is per process: examples, or packed rows with `packing`. `num_threads` read and
    preprocess records ahead of the consumer; `num_workers` > 0 runs the whole pipeline in that
    many worker processes (grain's mp_prefetch: each reads every num_workers-th record of this
    process's slice, and batches are taken from them in turn, so the order is still fixed by
    the seed and the state still checkpoints)."""
    if num_workers < 0:
        raise ValueError(f"config.data.num_workers must be >= 0, got {num_workers}")
    if packing is not None:
        packing.check_fits(preprocess.max_text_len)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    mixture = _is_source_list(source)
    if mixture and len(source) == 1 and source[0].records is not None and (
            source[0].to_record is None):
        source, mixture = source[0].records, False  # exactly the single-source pipeline
    if mixture:
        samples = mixed_samples(source, preprocess, seed=seed, process_index=process_index,
                                process_count=process_count, num_threads=num_threads,
                                batch_size=batch_size)
    else:
        _check_enough(len(source), process_count, batch_size, "the training split")
        # Shuffle before repeat: each epoch is a fresh permutation of the whole split. Slicing
        # after the global shuffle gives each process a disjoint share of every epoch.
        samples = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
        samples = samples[process_index::process_count].map(preprocess)
    if packing is not None:
        samples = samples.map(packing_lib.ToPackable(packing.visual_tokens, packing.bos_id))
        if isinstance(samples, grain.MapDataset):
            samples = samples.to_iter_dataset(options)
        samples = packing_lib.pack(samples, packing, seed=seed)
    batches = samples.batch(batch_size, drop_remainder=True)
    if isinstance(batches, grain.MapDataset):  # one split, unpacked: batched before the threads
        batches = batches.to_iter_dataset(options)
    if num_workers:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                                      worker_init_fn=sources_lib.note_worker)
    return batches


def _is_source_list(source) -> bool:
    return (isinstance(source, (list, tuple)) and bool(source)
            and all(isinstance(s, sources_lib.TrainSource) for s in source))


def _check_enough(records: int, process_count: int, batch_size: int, what: str) -> None:
    if records < process_count * batch_size:
        raise ValueError(
            f"{what} has {records} records, fewer than one global batch "
            f"({process_count} processes x {batch_size}); lower config.train.batch_size")


def mixed_samples(sources, preprocess: TrainPreprocess | None = None, *, seed: int,
                  process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                  batch_size: int = 1, raw: bool = False) -> grain.IterDataset:
    """This process's endless stream of samples from `sources` (a list of
    `sources.TrainSource`), interleaved in proportion to their weights by `IterDataset.mix`.

    Each source: random-access ones are shuffled (seed + its index in the list), repeated and
    sliced per process as the single-source pipeline does; webdataset streams take their
    per-process shards. Caption samples become records (bad ones dropped and counted), then
    `preprocess` (if given) runs. `raw=True` yields the sources' raw samples instead (no image
    decoding: for checking the mixture itself). The mixture's state is keyed by source name."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    parts = {}
    for i, src in enumerate(sources):
        if src.records is not None:
            _check_enough(len(src.records), process_count, batch_size, src.spec.entry)
            ds = grain.MapDataset.source(src.records).shuffle(seed=seed + i).repeat(None)
            ds = ds[process_index::process_count]
        else:
            ds = src.stream.for_process(process_index, process_count)
        if src.to_record is not None and not raw:
            ds = ds.map(src.to_record.for_process(process_index)).filter(sources_lib.is_record)
        if preprocess is not None and not raw:
            ds = ds.map(preprocess)
        parts[src.name] = ds.to_iter_dataset(options) if src.records is not None else ds
    if len(parts) == 1:
        return next(iter(parts.values()))
    return grain.IterDataset.mix(parts, {src.name: src.weight for src in sources})


def iterate(dataset: grain.IterDataset):
    """A checkpointable iterator (`get_state`/`set_state`)."""
    return iter(dataset)
