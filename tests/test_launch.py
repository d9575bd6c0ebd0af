"""launch_tpu.sh: the gcloud commands it would run (--dry-run), argument errors, shellcheck."""

import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch_tpu.sh")


def _launch(*args):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60)


def test_dry_run_prints_the_whole_multislice_launch():
    proc = _launch("--name=egpt", "--zone=us-east5-a", "--accelerator=v5p-128", "--slices=2",
                   "--project=proj", "--spot", "--dry-run", "--",
                   "--config=configs/mmrs.py:size=13b,stage=b", "--workdir=gs://bucket/run")
    assert proc.returncode == 0, proc.stderr
    # Each printed command is shell-quoted; unquote it to read it.
    lines = [" ".join(shlex.split(l[2:])) for l in proc.stdout.splitlines() if l.startswith("+ ")]
    assert lines[0].startswith("gcloud compute tpus queued-resources create egpt "
                               "--zone=us-east5-a --project=proj --accelerator-type=v5p-128")
    assert "--node-count=2 --node-prefix=egpt --spot" in lines[0]
    for node in ("egpt-0", "egpt-1"):
        assert any(l.startswith(f"gcloud compute tpus tpu-vm scp ") and f"{node}:" in l
                   for l in lines)
        runs = [l for l in lines if l.startswith(f"gcloud compute tpus tpu-vm ssh {node} ")
                and "main.py" in l]
        assert len(runs) == 1 and "--worker=all" in runs[0]
        assert "--config.distributed.auto=true" in runs[0] and "gs://bucket/run" in runs[0]
    assert any("pip install" in l and "requirements.txt" in l for l in lines)
    # The queued resource is deleted on the way out.
    assert lines[-1].startswith("gcloud compute tpus queued-resources delete egpt")


def test_missing_arguments_are_named():
    proc = _launch("--zone=z", "--", "--workdir=w")
    assert proc.returncode == 2
    assert "missing --name --accelerator" in proc.stderr
    proc = _launch("--name=n", "--zone=z", "--accelerator=v4-8", "--slices=0", "--", "x")
    assert proc.returncode == 2 and "--slices" in proc.stderr


def test_shellcheck_is_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/run installs it)")
    scripts = [SCRIPT, os.path.join(ROOT, "benchmarks", "gpu.sh"), os.path.join(ROOT, ".ci", "run")]
    proc = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
