"""The `crsvqa` TFDS builder; importing this package registers it with TFDS."""

from tfds_builders.crsvqa.crsvqa import Crsvqa

__all__ = ["Crsvqa"]
