"""Lets TFDS 4.9.10 write a split larger than 1 GB without TensorFlow installed.

TFDS's writer shuffles a split's serialized examples in memory up to 1 GB
(`shuffle.MAX_MEM_BUFFER_SIZE`); past that it spills them into 1000 bucket files, and it opens,
reads and deletes those through `tf.io.gfile`, which imports TensorFlow: a local build of the
real MMRS-1M (124 GB) stops with `No module named 'tensorflow'` once 1 GB is generated,
though nothing else in preparing or reading needs TensorFlow. Where TensorFlow is not
importable, `spill_without_tensorflow()` gives TFDS's shuffle module the four file operations
it uses, through `etils.epath` (local folders and the object stores epath reaches), and raises
the open-file limit as TFDS would (the 1000 buckets stay open while a split is generated).
"""

from __future__ import annotations

import importlib.util
import logging
import types

from etils import epath


class _NeverRaised(Exception):
    """Stands for tf.errors.ResourceExhaustedError: epath raises OSError instead."""


_GFILE_ONLY = types.SimpleNamespace(
    io=types.SimpleNamespace(gfile=types.SimpleNamespace(
        GFile=lambda path, mode="r": epath.Path(path).open(mode),
        exists=lambda path: epath.Path(path).exists(),
        remove=lambda path: epath.Path(path).unlink(),
    )),
    errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised),
)


# TFDS tries to raise the open-file limit for every split it writes and logs an ERROR through
# absl when the soft limit already equals the hard one (the usual case in containers). Nothing
# is wrong then: a split under 1 GB never opens the 1000 bucket files.
_FD_LIMIT_NOTICE = "Soft and hard limits for the maximum number of open file descriptors"


class _DropFdLimitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_FD_LIMIT_NOTICE)


def quiet_fd_limit_notice() -> None:
    """Drops that one absl ERROR line (every other record passes); idempotent."""
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropFdLimitNotice) for f in absl_logger.filters):
        absl_logger.addFilter(_DropFdLimitNotice())


def spill_without_tensorflow() -> bool:
    """Installs the epath file operations in TFDS's shuffler unless TensorFlow is importable;
    returns whether it did."""
    if importlib.util.find_spec("tensorflow") is not None:
        return False
    from tensorflow_datasets.core import shuffle

    if shuffle.tf is not _GFILE_ONLY:
        shuffle.tf = _GFILE_ONLY
        shuffle._increase_open_files_limit()  # pylint: disable=protected-access
    return True
