"""The `mmrs1m` TFDS builder; importing this package registers it with TFDS."""

from tfds_builders.mmrs1m.mmrs1m import (SENSOR_BY_SOURCE_PREFIX, SENSORS, TASKS, BadRecordsError,
                                         Mmrs1m, Mmrs1mConfig, build, sensor_for_source)
from tfds_builders.mmrs1m.report import BadRecord, SplitReport, read_report
from tfds_builders.mmrs1m.selection import ExclusionList, in_validation
from tfds_builders.mmrs1m.sources import SOURCE_DATASETS

__all__ = ["Mmrs1m", "Mmrs1mConfig", "build", "BadRecordsError", "BadRecord", "SplitReport",
           "read_report", "ExclusionList", "in_validation", "SENSOR_BY_SOURCE_PREFIX", "SENSORS",
           "SOURCE_DATASETS", "TASKS", "sensor_for_source"]
