"""Shared pytest setup: CPU-only JAX, a per-session persistent compilation cache, and parsed
absl flags (grain reads flags in its workers)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Most of the suite's time is XLA compiling the same small programs again: every Trainer, every
# `main.py` / `chat` / `convert` subprocess compiles its init, train step and decode afresh. JAX's
# persistent compilation cache shares them across the session, in this process and (through
# the environment, which subprocess tests copy) in the processes the tests start. It is set
# through environment variables before anything imports JAX. The key covers the program, the
# jax/jaxlib version, XLA_FLAGS (so other device counts get their own entries) and the
# compile options, and a hit loads the very executable a compile would have produced, so a
# test sees the same numbers either way. The directory is new for each session and deleted at
# its end: nothing carries over between runs. To keep one across runs while iterating locally,
# set JAX_COMPILATION_CACHE_DIR yourself (e.g. to .pytest_cache/jax); it is then left alone.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache_dir = tempfile.mkdtemp(prefix="earthgpt-jax-compile-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    _owner = os.getpid()  # a forked child (grain workers) must not delete it on its way out
    atexit.register(lambda: os.getpid() == _owner and shutil.rmtree(_cache_dir, True))
# The defaults only cache programs that took >= 1 s to compile; the tiny CPU models' many small
# programs add up, so cache everything.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
try:  # a size limit makes JAX guard each read and write with a file lock: safe across processes
    import filelock  # noqa: F401
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))
except ImportError:
    pass

# The tests run a few steps of tiny models, where XLA's optimisation passes cost far more than
# they save: a tiny Trainer's init + first train step compiled in 130 s with them and 37 s
# without on this 2-core machine (under load), while a step ran ~20% slower. Off for the whole
# session, through the environment so subprocess tests (main.py, chat, convert) inherit it; the
# tests whose assertions need the optimised programs (training long enough to learn, TPU memory
# figures from AOT compiles) opt back in with @pytest.mark.optimized.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

# Cheaper CPU codegen for every compile of the session (tests/fixtures/xla_flags.py says why);
# subprocess tests inherit it through the environment.
from tests.fixtures.xla_flags import with_fast_compile  # noqa: E402

os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
    config.addinivalue_line("markers", "optimized: compile with XLA's optimisation passes on "
                                       "(the session turns most of them off)")


@pytest.fixture(autouse=True)
def _xla_optimizations(request):
    """The `optimized` marker's switch, for the test's own compiles (and, through the
    environment, its subprocesses')."""
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    import jax
    previous = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"]
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "false"
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous == "true")
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = previous


def pytest_report_header(config):
    return f"JAX compilation cache: {os.environ['JAX_COMPILATION_CACHE_DIR']}"


def pytest_terminal_summary(terminalreporter):
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if path and os.path.isdir(path):
        sizes = [e.stat().st_size for e in os.scandir(path) if e.name.endswith("-cache")]
        terminalreporter.write_line(f"JAX compilation cache: {len(sizes)} programs, "
                                    f"{sum(sizes) / 2**20:.0f} MiB in {path}")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """test_train.py's generated release, TFDS build and tokenizer, built once a session for it
    and test_multiprocess.py (see `tests.test_train.build_data`). Read-only: do not change it."""
    from tests.test_train import build_data
    return build_data(tmp_path_factory)
