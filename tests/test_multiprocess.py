"""Real multi-process JAX on localhost: 2 processes x 4 CPU devices train data-parallel like 1
process x 8 devices under FSDP, each reading only its slice of the data, evaluate, and a
1-process run restores their checkpoint onto its FSDP mesh.
"""

import json
import os
import subprocess

import numpy as np
import portpicker

from tests.fixtures import xla_flags
from tests.test_train import ROOT, _losses, _main_cmd  # `data`: tests/conftest.py


def _env(devices):
    return dict(os.environ, JAX_PLATFORMS="cpu", NPROC="16",
                XLA_FLAGS=xla_flags.for_devices(devices))


def _run(cmds, devices):
    procs = [subprocess.Popen(c, cwd=ROOT, env=_env(devices), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [p.communicate(timeout=400)[1] for p in procs]
    for p, err in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_two_processes_match_one_process_and_hand_over_their_checkpoint(data, tmp_path):
    # One schedule for all runs, so stopping at 4 and going on to 6 changes no learning rate.
    common = {"train.batch_size": 8, "train.num_steps": 4, "checkpoint.every_steps": 4,
              "train.lr_decay_steps": 6}
    one = str(tmp_path / "one")
    _run([_main_cmd(data, one, **common | {"train.num_steps": 6})], devices=8)

    two = str(tmp_path / "two")
    port = portpicker.pick_unused_port()
    # Evaluation after training too: each process decodes every question (no process can read
    # the others' shards of the answers) and process 0 alone writes the report. With a device
    # memory size, mesh.layout=auto trains data-parallel (the 1-process runs: FSDP), decided
    # once for both processes.
    cmds = [_main_cmd(data, two, **common | {
        "distributed.coordinator_address": f"127.0.0.1:{port}",
        "distributed.num_processes": 2, "distributed.process_id": i,
        "eval.at_end": True, "eval.max_examples": 4, "mesh.memory_limit_gib": 4})
        for i in range(2)]
    errs = _run(cmds, devices=4)
    assert "joined 2 processes as process 1" in errs[1]
    for err in errs:
        assert "mesh {'data': 8, 'fsdp': 1, 'tensor': 1} over 8 devices" in err
    assert "plain data parallelism fits" in errs[0]
    assert "Evaluation of" in errs[0] and "Evaluation of" not in errs[1]
    with open(os.path.join(two, "eval", "results.json")) as f:
        assert json.load(f)
    expected, got = _losses(one), _losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    # Same global batches, summed in another order: equal to float32 rounding.
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [expected[s] for s in range(1, 5)],
                               rtol=2e-5)

    # One process with 8 devices picks up the 2-process checkpoint and goes on.
    errs = _run([_main_cmd(data, two, **common | {"train.num_steps": 6})], devices=8)
    assert "Resuming from the checkpoint of step 4" in errs[0]
    got = _losses(two)
    np.testing.assert_allclose([got[5], got[6]], [expected[5], expected[6]], rtol=2e-5)
