"""The `dota` TFDS builder; importing this package registers it with TFDS."""

from tfds_builders.dota.dota import Dota

__all__ = ["Dota"]
