"""The `nwpu_captions` TFDS builder; importing this package registers it with TFDS."""

from tfds_builders.nwpu_captions.nwpu_captions import NwpuCaptions

__all__ = ["NwpuCaptions"]
