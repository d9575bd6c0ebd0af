"""The `dior_rsvg` TFDS builder; importing this package registers it with TFDS."""

from tfds_builders.dior_rsvg.dior_rsvg import DiorRsvg

__all__ = ["DiorRsvg"]
