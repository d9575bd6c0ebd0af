"""Sequence packing: several preprocessed samples, each with its image, in one training row.

MMRS-1M answers are short (a class name, "yes", a few boxes) while a row holds 1 + V + T
positions sized for the longest conversation, so unpacked rows are mostly padding (measured on
the demo mix: 52% useful positions; 25% at the 7B sizes). Packing fills a row of `length`
positions with whole samples laid out as each is laid out alone:

    [BOS] [IMAGE x V] [text tokens ...] [BOS] [IMAGE x V] [text ...] ... [padding]

- `segment_ids` number the samples of a row 1, 2, ... (0 = padding): attention never crosses a
  sample (`models/earthgpt.py` masks on equal segment ids, causally).
- `positions` restart at 0 for every sample, so RoPE sees each exactly as it would alone.
- `image` holds `images_per_row` image slots in the order of the samples; the k-th run of
  IMAGE_TOKEN placeholders in the row is filled with image k's visual tokens. A row takes at
  most `images_per_row` samples (each sample has one image), so the vision towers' work per row
  is bounded; unused slots are zero images whose tokens no position reads.
- `loss_mask` marks the answer tokens (and their EOS) as the unpacked mask does.

Samples are placed first-fit into `bins_per_batch` rows at a time (grain's
`FirstFitPackIterDataset`); its iterator state (the parent's state where the current group of rows
began, and the next row to emit) goes into the checkpoint like the unpacked pipeline's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from earthgpt_jax.data.tokenizer import IMAGE_TOKEN


def max_samples_per_row(length: int, visual_tokens: int) -> int:
    """Most samples a row of `length` positions can hold: each needs BOS, its visual tokens and
    at least one text token."""
    return length // (1 + visual_tokens + 1)


@dataclasses.dataclass(frozen=True)
class PackingOptions:
    length: int             # positions per packed row: BOS, visual and text tokens, padding
    images_per_row: int     # image slots per row = most samples per row
    visual_tokens: int      # V: placeholders per image
    bos_id: int
    bins_per_batch: int = 64  # rows filled at once; more rows, fuller rows

    def __post_init__(self):
        if self.images_per_row < 1:
            raise ValueError(f"images_per_row must be >= 1, got {self.images_per_row}")
        most = max_samples_per_row(self.length, self.visual_tokens)
        if self.images_per_row > most:
            # Slots no row can fill are still encoded by both towers every step, for nothing.
            raise ValueError(
                f"config.data.images_per_pack={self.images_per_row} can never be filled: a sample "
                f"takes at least 1 (BOS) + {self.visual_tokens} visual + 1 text positions, so a "
                f"row of {self.length} holds at most {most}; use <= {most} (0 = {most})")
        if self.bins_per_batch < 1:
            raise ValueError(f"bins_per_batch must be >= 1, got {self.bins_per_batch}")

    def check_fits(self, max_text_len: int) -> None:
        """A sample of the longest text must fit one row, or packing could never place it."""
        longest = 1 + self.visual_tokens + max_text_len
        if self.length < longest:
            raise ValueError(
                f"config.data.pack_length={self.length} is shorter than one sample of the longest "
                f"text: 1 (BOS) + {self.visual_tokens} visual + {max_text_len} "
                f"(config.data.max_text_len) = {longest}; raise pack_length or lower "
                f"max_text_len")


@dataclasses.dataclass
class ToPackable(grain.transforms.Map):
    """Unpacked sample (TrainPreprocess's output) -> its variable-length packed layout."""
    visual_tokens: int
    bos_id: int

    def map(self, example: dict[str, Any]) -> dict[str, Any]:
        n = int(np.sum(example["valid"]))
        prefix = np.concatenate([[self.bos_id], np.full(self.visual_tokens, IMAGE_TOKEN)])
        tokens = np.concatenate([prefix, example["tokens"][:n]]).astype(np.int32)
        loss_mask = np.concatenate([np.zeros(prefix.size, np.float32),
                                    example["loss_mask"][:n]]).astype(np.float32)
        return {"tokens": tokens, "loss_mask": loss_mask, "image": example["image"][None],
                "truncated": np.asarray([example["truncated"]], np.int32),
                "example_id": np.asarray([example["example_id"]], dtype=object)}


def _to_rows(packed: dict[str, Any]) -> dict[str, Any]:
    """grain's packed element -> the train step's names."""
    used_slots = packed["example_id_segment_ids"] > 0
    return {"image": packed["image"], "tokens": packed["tokens"],
            "segment_ids": packed["tokens_segment_ids"],
            "positions": packed["tokens_positions"], "loss_mask": packed["loss_mask"],
            "truncated": packed["truncated"],
            # The image path of each slot ("" when unused): a failing step names its samples.
            "example_id": np.where(used_slots, packed["example_id"], "").astype(str)}


def pack(dataset: grain.IterDataset, options: PackingOptions, seed: int) -> grain.IterDataset:
    """Packed rows of `options.length` positions from a dataset of `ToPackable` samples."""
    lengths = {"tokens": options.length, "loss_mask": options.length,
               "image": options.images_per_row, "truncated": options.images_per_row,
               "example_id": options.images_per_row}
    packed = grain.experimental.FirstFitPackIterDataset(
        dataset, length_struct=lengths, num_packing_bins=options.bins_per_batch, seed=seed,
        shuffle_bins=True, max_sequences_per_bin=options.images_per_row)
    return packed.map(_to_rows)


def efficiency(batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of positions that hold a sample (not padding), and of image slots that are used."""
    samples = int(batch["segment_ids"].max(axis=1).sum())  # a row's ids run 1..n
    return {"positions": float((batch["segment_ids"] > 0).mean()),
            "image_slots": samples / batch["image"].shape[0] / batch["image"].shape[1],
            "samples_per_row": samples / batch["segment_ids"].shape[0]}
