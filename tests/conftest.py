"""Shared pytest setup: CPU-only JAX and parsed absl flags (grain reads flags in its workers)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
