"""The `rsvqa_hr` TFDS builder; importing this package registers it with TFDS."""

from tfds_builders.rsvqa_hr.rsvqa_hr import RsvqaHr

__all__ = ["RsvqaHr"]
