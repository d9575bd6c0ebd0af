"""The `hrsc2016` TFDS builder; importing this package registers it with TFDS."""

from tfds_builders.hrsc2016.hrsc2016 import Hrsc2016

__all__ = ["Hrsc2016"]
