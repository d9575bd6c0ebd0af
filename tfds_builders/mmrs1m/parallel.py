"""Worker processes for the per-image work of a local preparation, fed in ordered chunks.

`ChunkPool.map_chunks` cuts a stream of items into chunks, turns each item into a job (or
None: nothing to do), runs the jobs of a chunk in one worker call and hands the chunks back in
input order, with a bounded number of chunks in flight: the main process keeps the order (so
example keys and the bad-record report equal a sequential build's) and never reads the input
far ahead. One worker means no pool at all: the jobs run in this process, by the same function.

Workers are spawned (no fork of a process that may hold threads or open files), so the job
function must be a picklable top-level function, and a script that prepares data must guard its
entry point with `if __name__ == "__main__":` (each spawned worker runs the script's top level
again: unguarded, every worker would start a build of its own and die). A pool started from a
script file without that guard (`unguarded_entry_script`) runs in one process instead, with a
warning saying how to get the workers back. A worker exits when the main process dies (even
by `kill -9`), so a crashed preparation leaves no orphans behind.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import multiprocessing
import multiprocessing.connection
import os
import re
import sys
import threading
from typing import Callable, Iterable, Iterator, Sequence

from absl import logging

# Items per worker call: large enough to amortise the round trip, small enough that a chunk
# of ~1 MB images is cheap to hold and a kill loses little.
DEFAULT_CHUNKSIZE = 16


def default_num_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_MAIN_GUARD = re.compile(r"""__name__\s*==\s*['"]__main__['"]|['"]__main__['"]\s*==\s*__name__""")


def unguarded_entry_script() -> str | None:
    """The script this process runs when it has no `if __name__ == "__main__":` guard (spawned
    workers would run its top level again), else None. Interactive sessions and `python -c`
    have no script file; spawn does not re-run them."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
    except OSError:
        return None
    return None if _MAIN_GUARD.search(source) else path


def _exit_with_parent() -> None:
    """Pool initializer: end this worker when the process that spawned it is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class ChunkPool:
    """Runs `fn(jobs) -> results` (a top-level function, one result per job) over chunks."""

    def __init__(self, fn: Callable[[list], list], num_workers: int,
                 chunksize: int = DEFAULT_CHUNKSIZE, chunks_in_flight: int | None = None):
        if num_workers < 1 or chunksize < 1:
            raise ValueError(f"num_workers and chunksize must be >= 1, got {num_workers}, "
                             f"{chunksize}")
        self.fn = fn
        self.num_workers = num_workers
        self.chunksize = chunksize
        # Two chunks per worker keep every worker busy while the main process consumes.
        self.chunks_in_flight = chunks_in_flight or (2 * num_workers if num_workers > 1 else 1)
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> "ChunkPool":
        script = unguarded_entry_script() if self.num_workers > 1 else None
        if script:
            logging.warning(
                "%s has no `if __name__ == \"__main__\":` guard, so worker processes cannot "
                "start (each would run the script again); preparing in one process instead of "
                "%d. Put the script's preparation call under that guard to use the workers.",
                script, self.num_workers)
            self.num_workers = 1
            self.chunks_in_flight = 1
        if self.num_workers > 1:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent)
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map_chunks(self, items: Iterable, job_of: Callable[[object], object | None]
                   ) -> Iterator[list[tuple]]:
        """Yields chunks of (item, job, result), in input order; job and result are None
        where `job_of` gave no job.

        `job_of` runs in this process when the chunk is sent, before the results of earlier
        chunks still in flight are back."""
        pending: collections.deque = collections.deque()
        iterator = iter(items)
        while chunk := list(itertools.islice(iterator, self.chunksize)):
            jobs = [job_of(item) for item in chunk]
            todo = [job for job in jobs if job is not None]
            future = (self._executor.submit(self.fn, todo) if self._executor and todo
                      else None)
            pending.append((chunk, jobs, todo, future))
            while len(pending) >= self.chunks_in_flight:
                yield self._collect(*pending.popleft())
        while pending:
            yield self._collect(*pending.popleft())

    def _collect(self, chunk: list, jobs: Sequence, todo: list, future) -> list[tuple]:
        if future is not None:
            try:
                done = iter(future.result())
            except concurrent.futures.process.BrokenProcessPool as e:
                # A decoder that kills its process (a C-level crash): say which images it had.
                raise RuntimeError(
                    f"a worker process died while checking one of {[str(j) for j in todo]} "
                    "(a crash inside a decoder?): fix or remove that file, or list it in "
                    "exclude_images, and rerun; the work done so far is kept in the resume "
                    "cache. (A script whose preparation call is not under `if __name__ == "
                    "\"__main__\":` kills its workers the same way.)") from e
        else:
            done = iter(self.fn(todo) if todo else ())
        return [(item, job, None if job is None else next(done))
                for item, job in zip(chunk, jobs)]
