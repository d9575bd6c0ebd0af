"""A user's mistake on `main.py` is one `error:` line on stderr and a nonzero exit, said before
anything slow (data generation, TFDS build, compile) starts; the train loop says it compiles."""

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import mmrs
from earthgpt_jax import cli, run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=120):
    start = time.time()
    proc = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
    return proc, time.time() - start


def _one_error_line(proc, status) -> str:
    assert proc.returncode == status, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_config_mistakes_are_one_line_before_main(tmp_path):
    """A mistyped override key, an unknown preset and a missing config file are refused while
    the flags are parsed: no JAX import, nothing written."""
    workdir = tmp_path / "w"
    cases = [
        (["--config=configs/mmrs.py:demo", "--config.train.num_stepz=3"],
         ["--config.train.num_stepz", "did you mean --config.train.num_steps?"]),
        (["--config=configs/mmrs.py:dmeo"],
         ["--config=configs/mmrs.py:dmeo", "unknown config argument 'dmeo'", "'demo'"]),
        (["--config=configs/mmrs.pyy:demo"], ["config file configs/mmrs.pyy not found"]),
    ]
    for args, wanted in cases:
        proc, seconds = _main(*args, f"--workdir={workdir}")
        line = _one_error_line(proc, 1)  # absl's status for a flag error
        for text in wanted:
            assert text in line, line
        assert seconds < 30, (args, seconds)  # flag parsing only (a JAX import is not needed)
    assert not workdir.exists()


@pytest.mark.parametrize("override,wanted", [
    ("--config.train.stage=c", "config.train.stage='c' is not one of all, a, b"),
    ("--config.model.remat_policy=some", "config.model.remat_policy='some' is not one of none"),
])
def test_a_value_the_config_refuses_is_one_line_before_any_work(tmp_path, override, wanted):
    """Checked by the typed config (earthgpt_jax/config.py) or run.py's first lines."""
    proc, _ = _main("--config=configs/mmrs.py:demo", override, f"--workdir={tmp_path / 'w'}")
    assert wanted in _one_error_line(proc, 2)
    assert not (tmp_path / "w").exists()


def test_eval_without_a_checkpoint_fails_before_any_data(tmp_path):
    proc, _ = _main("--config=configs/mmrs.py:demo", f"--workdir={tmp_path}", "--mode=eval")
    line = _one_error_line(proc, 2)
    assert f"found no checkpoint in {tmp_path / 'checkpoints'}" in line
    assert "--mode=train" in line
    # The demo's release would be generated and built first otherwise.
    assert os.listdir(tmp_path) == []


@pytest.fixture
def compile_spy(monkeypatch):
    """aot.compile_train_step replaced by a recorder: the checks must run before it."""
    from earthgpt_jax import aot
    calls = []

    def fake(config, cfg, topology, num_slices=1):
        calls.append(topology)
        return {"topology": topology, "num_slices": num_slices, "chips": 4, "mesh": {},
                "global_batch": config.train.batch_size, "fits": False, "error": "stand-in",
                "remat_policy": config.model.remat_policy,
                "frozen_param_dtype": config.train.frozen_param_dtype}

    monkeypatch.setattr(aot, "compile_train_step", fake)
    return calls


@pytest.mark.parametrize("topology,wanted", [
    ("", "--mode=compile needs --config.compile.topology=NAME"),
    ("tpu", "--config.compile.topology=tpu: unknown TPU topology 'tpu'"),
    ("v9-8", "unknown TPU generation 'v9'"),
])
def test_compile_without_a_usable_topology_is_refused_first(topology, wanted, compile_spy,
                                                            tmp_path):
    config = mmrs.get_run_config("demo")
    config = config.replace(compile={"topology": topology})
    with pytest.raises(cli.UsageError, match=re.escape(wanted)):
        run_lib.run(config, str(tmp_path), "compile")
    assert compile_spy == []


def test_compile_needs_libtpu_and_says_it_compiles(compile_spy, tmp_path, monkeypatch, capsys):
    config = mmrs.get_run_config("demo")
    config = config.replace(
        model={"size": "tiny"},
        compile={"topology": "v5e:2x2"})
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
    with pytest.raises(cli.UsageError, match=r"needs libtpu .*: pip install libtpu==\d"):
        run_lib.run(config, str(tmp_path), "compile")
    assert compile_spy == []
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    if find_spec("libtpu") is None:
        return
    run_lib.run(config, str(tmp_path), "compile")
    out = capsys.readouterr().out
    assert compile_spy == ["v5e:2x2"]
    assert out.index("compiling the train step for v5e:2x2 (4 chips; several minutes)...") \
        < out.index("DOES NOT FIT: stand-in")


_LIBTPU_HOLDER = """
import sys
from earthgpt_jax import aot
aot.topology_devices(aot.parse_topology("v5e:2x2"))  # takes libtpu's lock file
print("holding", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_compile_while_another_process_holds_libtpu_names_it(tmp_path):
    """libtpu's own message says to delete its lock file, wrong advice while the holder lives."""
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    holder = subprocess.Popen([sys.executable, "-c", _LIBTPU_HOLDER], cwd=ROOT, text=True,
                              env=dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "holding"
        proc = subprocess.run(
            [sys.executable, "main.py", "--config=configs/mmrs.py:demo", f"--workdir={tmp_path}",
             "--mode=compile", "--config.model.size=tiny", "--config.compile.topology=v5e:2x2"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env=dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    line = _one_error_line(proc, 2)
    assert "libtpu is in use by another process" in line
    assert f"held by {holder.pid} (" in line and "wait for it to finish" in line


def test_unknown_suite_in_the_config_is_refused_first(tmp_path):
    config = mmrs.get_run_config("demo")
    config = config.replace(eval={"suites": "clrs,clrz"})
    with pytest.raises(cli.UsageError, match=r"unknown evaluation suite\(s\) clrz in "
                                             r"--config.eval.suites; known: clrs"):
        run_lib.run(config, str(tmp_path / "w"), "train")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- train loop


class _SlowFirstStep:
    """Stands in for the Trainer in the loop: the first step "compiles" for a second."""

    def __init__(self):
        self.calls = 0

    def model_flops(self, batch):
        return 1e9

    def train_step(self, state, batch, step):
        self.calls += 1
        time.sleep(1.0 if self.calls == 1 else 0.02)
        return state, {"loss": np.float32(1.0), "grad_norm": np.float32(1.0),
                       "tokens": np.float32(10.0), "learning_rate": np.float32(1e-3),
                       "skipped": np.int32(0)}


class _Manager:
    def latest_step(self):
        return 4


@pytest.mark.parametrize("log_every", [1, 2])
def test_first_step_compile_is_announced_and_left_out_of_the_rates(tmp_path, caplog, log_every):
    from earthgpt_jax import train as train_lib
    config = mmrs.get_run_config("demo")
    config = config.replace(train={"num_steps": 4, "log_every_steps": log_every})
    log = train_lib.MetricsLog(str(tmp_path), 4)
    batches = iter([{"image": np.zeros(1)}] * 4)
    with caplog.at_level(logging.INFO):
        train_lib._loop(config, _SlowFirstStep(), None, 0, batches, log,
                        lambda *a, **k: None, _Manager())
    log.close()
    messages = [r.getMessage() for r in caplog.records]
    compiling = [i for i, m in enumerate(messages) if m.startswith("Compiling the train step")]
    first_line = [i for i, m in enumerate(messages) if m.startswith("step ")][0]
    assert compiling and compiling[0] < first_line
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    # Steps after the first take 0.02 s: ~50 steps/s; with the compile in, under 2 per s.
    assert all(r["steps_per_s"] > 5 for r in rows if r["step"] > 1), rows
    assert rows[-1]["step"] == 4


# ----------------------------------------------------------------------------- TFDS log noise


def test_the_open_file_limit_notice_of_tfds_is_dropped_and_other_errors_are_not(
        monkeypatch, caplog):
    import resource

    from absl import logging as absl_logging
    from tensorflow_datasets.core import shuffle

    import tfds_builders  # noqa: F401  (installs the filter)
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (1024, 1024))
    with caplog.at_level(logging.WARNING):
        shuffle._increase_open_files_limit()
        absl_logging.error("a real TFDS error")
    messages = [r.getMessage() for r in caplog.records]
    assert not any("open file descriptors" in m for m in messages), messages
    assert "a real TFDS error" in messages
