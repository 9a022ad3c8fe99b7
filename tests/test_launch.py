"""The launch scripts, without a TPU: their --dry-run commands, their help, and shellcheck.

No Cloud TPU is reachable from tests, so the dry runs stand in for one: each gcloud command is
checked for the flags it must carry, and, where the Cloud SDK is installed, every flag it uses
is looked up in that command's own `gcloud ... --help`.
"""

import os
import re
import shlex
import shutil
import subprocess
import time

import pytest
from subprocesses import ROOT

LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
SLICE = ["--name=dracula", "--zone=europe-west4-a", "--project=my-proj"]
WORKDIR = "--workdir=gs://my-bucket/dracula"


# Should a dry run ever reach gcloud, it must not reach a real project: no credentials, and the
# TPU API at a closed local port.
SAFE_ENV = {
    "CLOUDSDK_AUTH_DISABLE_CREDENTIALS": "true",
    "CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU": "http://127.0.0.1:9/",
    "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
}


def _script(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", *args],
        cwd=ROOT,
        env={**os.environ, **SAFE_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _tpu(*args: str) -> list[list[str]]:
    """`launch/tpu.sh COMMAND --dry-run OPTIONS`, as the commands it prints (no comments)."""
    command, *options = args
    out = _script(str(LAUNCH / "tpu.sh"), command, "--dry-run", *options).stdout
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def _gcloud(commands: list[list[str]], *words: str) -> list[list[str]]:
    return [c for c in commands if c[: len(words) + 1] == ["gcloud", *words]]


def test_create_requests_a_queued_resource_with_the_options_given():
    commands = _tpu(
        "create",
        *SLICE,
        "--spot",
        "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
    )
    (create,) = _gcloud(commands, "compute", "tpus", "queued-resources", "create")
    assert create[5] == "dracula" and "--node-id=dracula" in create
    for flag in (
        "--zone=europe-west4-a",
        "--project=my-proj",
        "--spot",
        "--tags=lstm-jax",  # For the firewall rules in docs/tpu.md.
        "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
    ):
        assert flag in create
    assert _gcloud(commands, "compute", "tpus", "queued-resources", "describe")  # waits for ACTIVE
    (on_demand,) = _gcloud(_tpu("create"), "compute", "tpus", "queued-resources", "create")
    assert "--spot" not in on_demand
    tagged = _tpu("create", "--network-tag=dracula-pod")[0]
    assert "--tags=dracula-pod" in tagged and "--tags=lstm-jax" not in tagged


def test_setup_copies_the_checkout_and_installs_it_on_every_host():
    commands = _tpu("setup", *SLICE)
    (scp,) = _gcloud(commands, "compute", "tpus", "tpu-vm", "scp")
    (ssh,) = _gcloud(commands, "compute", "tpus", "tpu-vm", "ssh")
    assert "--worker=all" in scp and "--worker=all" in ssh
    assert scp[5].endswith("lstm_jax.tar.gz") and scp[6] == "dracula:lstm_jax.tar.gz"
    remote = _flag_value(ssh, "--command")
    assert (
        "python3.11 -m venv" in remote and 'pip install -q -e "$HOME/lstm_jax[tpu,gcs]"' in remote
    )
    pack = next(c for c in commands if c[0] == "git")
    assert "ls-files" in pack and "tar" in pack


def test_run_starts_the_same_training_command_on_every_host_with_the_gs_workdir():
    commands = _tpu("run", *SLICE, WORKDIR, "--", "--hidden=512", "--prompt=Count Dracula")
    (ssh,) = commands
    assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and ssh[5] == "dracula"
    assert "--worker=all" in ssh and "--zone=europe-west4-a" in ssh
    remote = _flag_value(ssh, "--command")
    main = remote[remote.index("lstm_jax_venv/bin/python -m lstm_jax.main") :].split(" &")[0]
    assert shlex.split(main)[3:] == [
        "--coordinator_bind_address=$ip:8482",  # Worker 0's internal IP, on the host.
        "--hidden=512",
        "--prompt=Count Dracula",
        "--workdir=gs://my-bucket/dracula",
    ]
    assert "tee -a $HOME/lstm_jax_train.log" in remote  # Streamed here and kept on the host.
    detached = _flag_value(_tpu("run", *SLICE, WORKDIR, "--detach")[0], "--command")
    assert "nohup" in detached and "tee" not in detached


# GCE's metadata server: this host's internal IP (of its first network interface).
METADATA_IP_QUERY = (
    "-sf -H Metadata-Flavor:Google "
    "http://metadata.google.internal/computeMetadata/v1/instance/network-interfaces/0/ip"
)


def _fake_host(tmp_path, internal_ip: str) -> dict[str, str]:
    """A TPU host for the remote scripts: $HOME with the venv's python (which prints what it
    got) and a `curl` that answers as the metadata server (nothing: it is down)."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "lstm_jax").mkdir(parents=True)
    (home / "lstm_jax_venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    scripts = {
        home / "lstm_jax_venv" / "bin" / "python": 'echo "port=$JAX_COORDINATOR_PORT args=$*"',
        bin_dir / "curl": f'[ -n "{internal_ip}" ] && [ "$*" = "{METADATA_IP_QUERY}" ] '
        f'&& echo "{internal_ip}" || exit 22',
    }
    for path, body in scripts.items():
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("detach", [False, True], ids=["run", "detach"])
def test_run_binds_the_coordinator_to_the_hosts_internal_ip_only(tmp_path, detach):
    """The remote script, run by bash on a fake host: the metadata server's address reaches
    --coordinator_bind_address, and JAX_COORDINATOR_PORT the port JAX's detection dials."""
    options = [*SLICE, WORKDIR, "--coordinator-port=8600", *(["--detach"] if detach else [])]
    remote = _flag_value(_tpu("run", *options, "--", "--hidden=512")[0], "--command")
    env = _fake_host(tmp_path, "10.164.0.7")
    result = subprocess.run(["bash", "-c", remote], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if detach:  # The background process writes the log.
        log = tmp_path / "home" / "lstm_jax_train.log"
        deadline = time.monotonic() + 10
        while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        out = log.read_text()
    else:
        out = result.stdout
    assert out.strip() == (
        "port=8600 args=-m lstm_jax.main --coordinator_bind_address=10.164.0.7:8600 "
        "--hidden=512 --workdir=gs://my-bucket/dracula"
    )
    # No address from the metadata server: refused, rather than listening everywhere.
    (tmp_path / "home" / "lstm_jax_train.pid").unlink()
    result = subprocess.run(
        ["bash", "-c", remote],
        env=_fake_host(tmp_path / "down", ""),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "no internal IP" in result.stderr
    assert "args=" not in result.stdout


def test_logs_stop_status_and_delete():
    (logs,) = _tpu("logs", *SLICE, "--worker=1")
    assert "--worker=1" in logs and "tail -n 200 -F" in _flag_value(logs, "--command")
    (stop,) = _tpu("stop", *SLICE)
    assert "--worker=all" in stop and "kill -TERM" in _flag_value(stop, "--command")
    (status,) = _tpu("status", *SLICE)
    assert status[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "dracula"]
    (delete,) = _tpu("delete", *SLICE)
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "dracula"]
    assert "--force" in delete and "--quiet" in delete


def test_supervise_shows_the_whole_recovery_cycle():
    out = _script(str(LAUNCH / "tpu.sh"), "supervise", "--dry-run", *SLICE, "--spot", WORKDIR)
    text = out.stdout
    order = [
        "queued-resources describe",
        "queued-resources delete",
        "queued-resources create",
        "tpu-vm scp",
        "tpu-vm ssh",
        "-m lstm_jax.main",
    ]
    positions = [text.index(phrase) for phrase in order]
    assert positions == sorted(positions), text
    assert "--spot" in text and "gs://my-bucket/dracula" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--workdir=/tmp/local"], "gs://"),
        (["run"], "gs://"),
        (["supervise", WORKDIR, "--", "--restart"], "--restart"),
        (["run", WORKDIR, "--", "--workdir=gs://other/x"], "tpu.sh --workdir"),
        (["create", "--hidden=512"], "training flags go after --"),
        (["launch"], "unknown command"),
        (["run", WORKDIR, "--", "--dry-run"], "--dry-run goes before --"),
        (["create", "--name=Bad_Name"], "--name"),
        (["create", "--zone=us-central2"], "--zone must be a zone"),
        (["create", "--project=My Project"], "--project must be a project ID"),
        (["create", "--accelerator-type=v4_16"], "--accelerator-type must be a TPU type"),
        (["create", "--runtime-version="], "--runtime-version must be"),
        (["setup", "--python=python3; rm -rf ~"], "--python must be python3 or python3.X"),
        (["run", WORKDIR, "--coordinator-port=0"], "--coordinator-port must be a port number"),
        (["run", WORKDIR, "--coordinator-port=65536"], "--coordinator-port must be a port"),
        (["create", "--network-tag=Lstm_Jax"], "--network-tag must be lower-case letters"),
    ],
)
def test_tpu_sh_refuses_what_would_go_wrong_on_the_pod(args, message):
    command, *options = args
    result = _script(str(LAUNCH / "tpu.sh"), command, "--dry-run", *options, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "env, message",
    [
        ({"TPU_ZONE": "us central"}, "--zone must be a zone"),
        ({"TPU_PYTHON": "python3.11 && curl x | sh"}, "--python must be"),
        ({"TPU_COORDINATOR_PORT": "8482x"}, "--coordinator-port must be a port number"),
        ({"TPU_ACCELERATOR_TYPE": "v4"}, "--accelerator-type must be a TPU type"),
    ],
)
def test_tpu_sh_checks_its_environment_variables_like_its_options(env, message):
    result = _script(str(LAUNCH / "tpu.sh"), "run", "--dry-run", WORKDIR, check=False, env=env)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("tpu.sh: ") and message in line


def test_local_sh_dry_run_gives_each_process_its_place_in_the_job():
    env = {
        **os.environ,
        **SAFE_ENV,
        "DEVICES_PER_PROCESS": "2",
        "PORT": "12345",
        "LOG_DIR": "/tmp/logs",
    }
    result = subprocess.run(
        ["bash", str(LAUNCH / "local.sh"), "3", "--dry-run", "--hidden=32"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for process_id, line in enumerate(lines):
        words = shlex.split(line.rstrip(" &"))
        for word in (
            "JAX_NUM_CPU_DEVICES=2",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo",
            "--coordinator_address=127.0.0.1:12345",
            "--coordinator_bind_address=127.0.0.1:12345",  # Only this machine can join.
            "--num_processes=3",
            f"--process_id={process_id}",
            "--hidden=32",
        ):
            assert word in words, line
        assert ("/tmp/logs/process-" in line) == (process_id > 0)


def _local_sh(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LAUNCH / "local.sh"), "2", *args],
        cwd=ROOT,
        env={**os.environ, **SAFE_ENV, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DEVICES_PER_PROCESS": "x2"}, "DEVICES_PER_PROCESS must be a positive number"),
        ({"DEVICES_PER_PROCESS": "0"}, "DEVICES_PER_PROCESS must be a positive number"),
        ({"DEVICES_PER_PROCESS": "-1"}, "DEVICES_PER_PROCESS must be a positive number"),
        ({"PORT": "0"}, "PORT must be a port number in 1..65535, got '0'"),
        ({"PORT": "65536"}, "PORT must be a port number in 1..65535"),
        ({"PORT": "80a"}, "PORT must be a port number in 1..65535"),
        ({"PYTHON": "/no/such/python3"}, "PYTHON must be an interpreter"),
        ({"PYTHON": "no-such-python3"}, "PYTHON must be an interpreter"),
        ({"LOG_DIR": "/etc/hostname/logs"}, "LOG_DIR must be a folder this script can create"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
def test_local_sh_refuses_a_bad_environment_in_one_line_before_starting(
    env, message, dry_run, tmp_path
):
    if "LOG_DIR" in env and not os.path.isfile("/etc/hostname"):
        pytest.skip("needs a file at /etc/hostname to stand for a folder")
    # A PORT, so that nothing (not even the free-port probe) runs Python before the checks; a
    # tiny run in tmp_path, should a check fail to stop it.
    args = ["--dry-run"] if dry_run else [f"--workdir={tmp_path}", "--num_steps=1"]
    result = _local_sh({"PORT": "12345", **env}, *args)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("local.sh: ") and message in line
    assert result.stdout == ""


def test_local_sh_refuses_a_log_dir_it_cannot_create(tmp_path):
    if not os.path.isdir("/proc/self"):
        pytest.skip("uses /proc, where no one (root included) can create a folder")
    result = _local_sh({"PORT": "12345", "LOG_DIR": "/proc/lstm_jax_logs"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "local.sh: LOG_DIR must be a folder this script can create or write to, "
        "got '/proc/lstm_jax_logs'\n"
    )
    # A folder to be created under a writable one is fine: the dry run goes through.
    result = _local_sh({"LOG_DIR": str(tmp_path / "new" / "logs")}, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "new").exists()  # A dry run creates nothing.


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_have_help(script):
    out = _script(str(script), "--help").stdout
    assert out.startswith("Usage: launch/") and "--dry-run" in out


def test_scripts_are_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is missing; .ci/run installs it (apt-get install shellcheck)")
        pytest.skip("shellcheck not installed (apt-get install shellcheck)")
    result = subprocess.run(
        ["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(
    shutil.which("gcloud") is None,
    reason="optional: CI does not install the Cloud SDK (gcloud); install it and put gcloud "
    "on PATH to run this test",
)
def test_every_gcloud_flag_used_exists_in_that_commands_help():
    commands = []
    for args in (
        ["create", "--spot"],
        ["setup"],
        ["run", WORKDIR],
        ["logs"],
        ["stop"],
        ["status"],
        ["delete"],
    ):
        commands += _gcloud(_tpu(*args, *SLICE), "compute")
    # The firewall rules docs/tpu.md recommends.
    docs = (ROOT / "docs" / "tpu.md").read_text().replace("\\\n", " ")
    firewall = [
        shlex.split(line) for line in docs.splitlines() if line.startswith("gcloud compute f")
    ]
    assert len(firewall) == 2
    checked = set()
    for command in commands + firewall:
        words = [w for w in command if not w.startswith("-")]
        # gcloud compute tpus GROUP VERB, or gcloud compute firewall-rules VERB
        group = words[: words.index("gcloud") + (4 if "firewall-rules" in words else 5)]
        flags = {w.split("=")[0] for w in command if w.startswith("--")}
        # Documented at gcloud's top level rather than per command.
        flags -= {"--project", "--quiet", "--format"}
        help_text = _gcloud_help(tuple(group))
        for flag in flags:
            assert re.search(rf"\n\s+{re.escape(flag)}\b", help_text), (group, flag)
            checked.add((tuple(group), flag))
    assert len(checked) >= 10


def _gcloud_help(group: tuple[str, ...]) -> str:
    result = subprocess.run(
        [*group, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **SAFE_ENV, "PAGER": "cat", "TERM": "dumb"},
    )
    assert result.returncode == 0, result.stderr
    return re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)


def _flag_value(command: list[str], flag: str) -> str:
    (value,) = [w.split("=", 1)[1] for w in command if w.startswith(flag + "=")]
    return value
