"""The `mmrs1m` TFDS builder; importing this package registers it with TFDS."""

from tfds_builders.mmrs1m.mmrs1m import (SENSOR_BY_SOURCE_PREFIX, BadRecordsError, Mmrs1m, build,
                                         sensor_for_source)

__all__ = ["Mmrs1m", "build", "BadRecordsError", "SENSOR_BY_SOURCE_PREFIX", "sensor_for_source"]
