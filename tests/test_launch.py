"""launch_tpu.sh: the gcloud commands it prints (--dry-run), argument errors, shellcheck, and a
real launch on a stand-in pod: tests/fixtures/fake_tpu/gcloud runs each ssh --command in a local
worker directory, so the setup and the training command the script builds really run."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.fixtures import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch_tpu.sh")
FAKE_BIN = os.path.join(ROOT, "tests", "fixtures", "fake_tpu")
# The environment running these tests (the repository's .venv under `make test`): the stand-in
# uv gives it to the fake workers instead of installing the pins from the network.
VENV = sys.prefix
MAIN_ARGS = ("--config=configs/mmrs.py:size=13b,stage=b", "--workdir=gs://bucket/run")


def _launch(*args, script=SCRIPT, env=None, timeout=60):
    return subprocess.run(["bash", script, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _printed(stdout):
    """The commands --dry-run printed, each unquoted into its argv."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _option(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def _train_argv(command):
    """main.py's argv in the remote training command (`cd DIR && .venv/bin/python main.py ...`)."""
    words = shlex.split(command)
    assert words[:4] == ["cd", "earthgpt-jax", "&&", ".venv/bin/python"], words
    assert words[4] == "main.py" and "&&" not in words[4:], words
    return words[5:]


def test_dry_run_prints_the_whole_multislice_launch():
    proc = _launch("--name=egpt", "--zone=us-east5-a", "--accelerator=v5p-128", "--slices=2",
                   "--project=proj", "--spot", "--dry-run", "--", *MAIN_ARGS)
    assert proc.returncode == 0, proc.stderr
    argvs = _printed(proc.stdout)
    lines = [" ".join(a) for a in argvs]
    assert lines[0].startswith("gcloud compute tpus queued-resources create egpt "
                               "--zone=us-east5-a --project=proj --accelerator-type=v5p-128 "
                               "--runtime-version=v2-alpha-tpuv5 ")
    assert "--node-count=2 --node-prefix=egpt --spot" in lines[0]
    for node in ("egpt-0", "egpt-1"):
        assert any(l.startswith("gcloud compute tpus tpu-vm scp ") and f"{node}:" in l
                   for l in lines)
        ssh = [a for a in argvs if a[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node]]
        assert len(ssh) == 2 and all("--worker=all" in a for a in ssh)
        setup, train = (_option(a, "command") for a in ssh)
        assert "uv venv -q --python 3.11 .venv" in setup
        assert "uv pip install -q --python .venv/bin/python -r requirements.txt" in setup
        assert "'jax[tpu]==0.10.2'" in setup
        # The user's arguments first, then the override (absl needs --config= before it).
        assert _train_argv(train) == [*MAIN_ARGS, "--config.distributed.auto=true"]
    # The queued resource is deleted on the way out.
    assert lines[-1].startswith("gcloud compute tpus queued-resources delete egpt")


@pytest.mark.parametrize("accelerator, runtime", [
    ("v5p-8", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5e-4", "v2-alpha-tpuv5-lite"), ("v6e-8", "v2-alpha-tpuv6e"),
    ("v4-32", "tpu-ubuntu2204-base")])
def test_runtime_follows_the_accelerator_family(accelerator, runtime):
    proc = _launch("--name=n", "--zone=z", f"--accelerator={accelerator}", "--dry-run", "--",
                   *MAIN_ARGS)
    assert proc.returncode == 0, proc.stderr
    assert _option(_printed(proc.stdout)[0], "runtime-version") == runtime
    proc = _launch("--name=n", "--zone=z", f"--accelerator={accelerator}", "--runtime=custom-rt",
                   "--dry-run", "--", *MAIN_ARGS)
    assert _option(_printed(proc.stdout)[0], "runtime-version") == "custom-rt"


def test_unknown_family_needs_a_runtime():
    proc = _launch("--name=n", "--zone=z", "--accelerator=v3-8", "--dry-run", "--", *MAIN_ARGS)
    assert proc.returncode == 2 and not _printed(proc.stdout)
    assert "--accelerator=v3-8" in proc.stderr and "--runtime=" in proc.stderr
    for family in ("v4-*", "v5p-*", "v5litepod-*", "v6e-*"):
        assert family in proc.stderr
    proc = _launch("--name=n", "--zone=z", "--accelerator=v3-8", "--runtime=tpu-vm-base",
                   "--dry-run", "--", *MAIN_ARGS)
    assert proc.returncode == 0 and "--runtime-version=tpu-vm-base" in proc.stdout


def test_remote_train_command_is_accepted_by_absl(monkeypatch):
    """Parses the printed command's main.py argv with main.py's flags (the config file is loaded,
    the overrides applied), as the workers will."""
    from absl import flags
    from ml_collections import config_flags

    proc = _launch("--name=n", "--zone=z", "--accelerator=v5p-8", "--dry-run", "--", *MAIN_ARGS,
                   "--config.train.num_steps=7", "--mode=train")
    assert proc.returncode == 0, proc.stderr
    train = _option(_printed(proc.stdout)[-2], "command")
    argv = ["main.py", *_train_argv(train)]
    fv = flags.FlagValues()
    # The overrides (--config.*) are read from this argv, as from sys.argv in main.py.
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    flags.DEFINE_enum("mode", "train", ["train", "eval", "compile"], "", flag_values=fv)
    monkeypatch.chdir(ROOT)  # the remote command runs main.py from the copied checkout
    fv(argv)
    assert fv.config.distributed.auto is True
    assert fv.config.train.num_steps == 7 and fv.config.model.size == "13b"
    assert fv.workdir == "gs://bucket/run"


def _fake_pod_env(tmp_path):
    with socket.socket() as s:  # a free port for the one-process JAX coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=FAKE_BIN + os.pathsep + env["PATH"], FAKE_TPU_ROOT=str(tmp_path / "pod"),
               FAKE_TPU_LOG=str(tmp_path / "calls.log"), FAKE_TPU_COORDINATOR_PORT=str(port),
               FAKE_UV_VENV=VENV, EARTHGPT_POLL_SECONDS="0",
               JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.for_devices(2))
    return env


def _calls(env):
    if not os.path.exists(env["FAKE_TPU_LOG"]):
        return []
    with open(env["FAKE_TPU_LOG"]) as f:
        return [shlex.split(line) for line in f]


def test_missing_arguments_are_named(tmp_path):
    proc = _launch("--help")
    assert proc.returncode == 0 and "v2-alpha-tpuv5-lite" in proc.stdout
    proc = _launch("--zone=z", "--", "--workdir=w")
    assert proc.returncode == 2
    assert "missing --name --accelerator" in proc.stderr
    proc = _launch("--name=n", "--zone=z", "--accelerator=v4-8", "--slices=0", "--", "x")
    assert proc.returncode == 2 and "--slices" in proc.stderr
    # main.py's required flags are checked before anything is created (no gcloud call at all).
    env = _fake_pod_env(tmp_path)
    for args, flag in [(("--workdir=gs://b/r",), "--config="),
                       (("--config=configs/mmrs.py",), "--workdir="),
                       (("--config", "configs/mmrs.py", "--workdir=gs://b/r"), "--config=")]:
        proc = _launch("--name=n", "--zone=z", "--accelerator=v4-8", "--", *args, env=env)
        assert proc.returncode == 2 and f"need {flag}" in proc.stderr, proc.stderr
    assert _calls(env) == []


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """This working tree committed in a scratch repository: the launcher copies `git archive
    HEAD`, so the run below ships exactly the files under test, edits not yet committed
    included. Returns that repository's launch_tpu.sh."""
    repo = tmp_path_factory.mktemp("snapshot")
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = os.path.join(ROOT, name)
        if os.path.isfile(src):  # tracked files deleted in the working tree stay out
            os.makedirs(os.path.dirname(os.path.join(repo, name)), exist_ok=True)
            shutil.copy2(src, os.path.join(repo, name))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
           "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A", "-f"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run(git + cmd, cwd=repo, check=True, capture_output=True)
    return str(repo / "launch_tpu.sh")


def test_launch_runs_its_commands_on_a_fake_pod(snapshot, tmp_path):
    """The non-dry path end to end: create, poll, archive, scp, setup (tar, uv) and the training
    command, which runs main.py for real (two steps of the tiny model, CPU, the bare
    jax.distributed.initialize() resolving to one local process), then delete."""
    assert os.path.exists(os.path.join(VENV, "bin", "python")), VENV
    env = _fake_pod_env(tmp_path)
    workdir = tmp_path / "run"
    overrides = {"model.size": "tiny", "data.synthetic_train_images": 16,
                 "data.synthetic_test_images": 4, "tokenizer.vocab_size": 400,
                 "train.num_steps": 2, "train.batch_size": 4, "train.warmup_steps": 1,
                 "train.log_every_steps": 1, "checkpoint.every_steps": 2, "eval.at_end": False}
    start = time.time()
    proc = _launch("--name=egpt", "--zone=us-east5-a", "--accelerator=v5litepod-8", "--",
                   "--config=configs/mmrs.py:demo", f"--workdir={workdir}",
                   *(f"--config.{k}={v}" for k, v in overrides.items()),
                   script=snapshot, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    print(f"launch took {time.time() - start:.1f}s")

    calls = _calls(env)
    verbs = [" ".join(c[1:5]) if c[0] == "gcloud" else " ".join(c[:2]) for c in calls]
    assert verbs == ["compute tpus queued-resources create",
                     "compute tpus queued-resources describe",  # PROVISIONING: polled again
                     "compute tpus queued-resources describe",  # ACTIVE
                     "compute tpus tpu-vm scp", "compute tpus tpu-vm ssh",
                     "uv venv", "uv pip",
                     "compute tpus tpu-vm ssh", "compute tpus queued-resources delete"]
    assert _option(calls[0], "runtime-version") == "v2-alpha-tpuv5-lite"
    assert {"-r", "requirements.txt", "jax[tpu]==0.10.2"} <= set(calls[6])
    assert _train_argv(_option(calls[7], "command"))[-1] == "--config.distributed.auto=true"
    assert "PROVISIONING" in proc.stderr and "ACTIVE" in proc.stderr

    # The worker's copy is the committed snapshot, unpacked by the setup command.
    home = tmp_path / "pod" / "egpt"
    with open(home / "earthgpt-jax" / "launch_tpu.sh") as a, open(snapshot) as b:
        assert a.read() == b.read()
    assert os.path.islink(home / "earthgpt-jax" / ".venv")

    # main.py trained: one process joined through jax.distributed, two steps, a checkpoint.
    assert "joined 1 processes as process 0" in output
    with open(workdir / "metrics.jsonl") as f:
        assert [row["step"] for row in map(json.loads, f)] == [1, 2]
    assert (workdir / "checkpoints" / "2").is_dir()
    assert (tmp_path / "pod" / ".queued" / "egpt.deleted").exists()


def test_failed_training_still_deletes_the_queued_resource(snapshot, tmp_path):
    env = _fake_pod_env(tmp_path)
    proc = _launch("--name=egpt", "--zone=z", "--accelerator=v6e-4", "--",
                   "--config=configs/mmrs.py:demo", f"--workdir={tmp_path / 'run'}",
                   "--config.no_such_key=1", script=snapshot, env=env, timeout=120)
    assert proc.returncode == 1  # main.py's exit status
    assert "no_such_key" in proc.stderr
    verbs = [" ".join(c[1:5]) for c in _calls(env) if c[0] == "gcloud"]
    assert verbs[-3:] == ["compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh",
                          "compute tpus queued-resources delete"]
    assert (tmp_path / "pod" / ".queued" / "egpt.deleted").exists()


def test_shellcheck_is_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (.ci/run installs it)")
    scripts = [SCRIPT, os.path.join(ROOT, "benchmarks", "gpu.sh"), os.path.join(ROOT, ".ci", "run"),
               os.path.join(FAKE_BIN, "gcloud"), os.path.join(FAKE_BIN, "uv")]
    proc = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
