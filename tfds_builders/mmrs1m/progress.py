"""Progress of a split's preparation: records done of the total, good and bad so far, rate, ETA.

On a terminal: a tqdm bar on stderr. Elsewhere (pod logs, CI, a file): one log line at every
`log_every` fraction of the total (5% by default) but at most one per `min_interval_s`, and at
the end, with the same figures, so a long preparation shows where it is without filling the log.
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

# The standard logger, as the rest of the project logs: main.py keeps absl's own logger (TFDS,
# orbax) at warnings, which would hide these lines.
logger = logging.getLogger(__name__)

_FORMAT = ("{desc}: {n_fmt}/{total_fmt} records ({percentage:.0f}%) "
           "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")


class Progress:
    def __init__(self, desc: str, total: int, *, log_every: float = 0.05,
                 min_interval_s: float = 30.0, tty: bool | None = None):
        self.desc = desc
        self.total = total
        self.n = self.good = self.bad = 0
        self.start = time.monotonic()
        self._step = max(1, int(total * log_every))
        self._next_log = self._step
        self._logged_n = -1
        self._min_interval_s = min_interval_s
        self._logged_at = self.start
        if tty is None:
            tty = sys.stderr.isatty()
        self._bar = (tqdm(total=total, desc=desc, unit="rec", file=sys.stderr,
                          bar_format=_FORMAT, mininterval=0.5) if tty else None)

    def update(self, status: str) -> None:
        """One record done; `status` is its outcome: good, bad or excluded."""
        self.n += 1
        self.good += status == "good"
        self.bad += status == "bad"
        if self._bar is not None:
            self._bar.update()
            if self._bar.n == self._bar.last_print_n:  # tqdm just redrew: refresh the counts
                self._bar.set_postfix_str(self._postfix(), refresh=False)
        elif self.n >= self._next_log:
            self._next_log += self._step
            if time.monotonic() - self._logged_at >= self._min_interval_s:
                self._log()

    def _postfix(self) -> str:
        return f"good {self.good}, bad {self.bad}"

    def _log(self) -> None:
        self._logged_n, self._logged_at = self.n, time.monotonic()
        logger.info("%s", self.line())

    def line(self) -> str:
        return tqdm.format_meter(self.n, self.total or None, time.monotonic() - self.start,
                                 prefix=self.desc, unit="rec", bar_format=_FORMAT,
                                 postfix=self._postfix())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=True)
            self._bar.close()
        elif self._logged_n != self.n:
            self._log()
