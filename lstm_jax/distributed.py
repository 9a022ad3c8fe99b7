"""Joining a multi-host job: the one place that calls `jax.distributed.initialize`.

Every host of a TPU slice runs the same command; JAX's distributed runtime connects them, and
from then on `jax.process_index()` / `jax.process_count()` say who is who. It must run before
anything touches a device, so `lstm_jax.main` calls `initialize` first.

Modes (`--distributed`):
  auto  the default. With --coordinator_address, join that job. Otherwise join only on a Cloud
        TPU VM (libtpu installed, or GKE's TPU variables set), letting JAX read the slice's
        hosts from the VM metadata; anywhere else run as one process. Auto-detection is kept to
        TPUs because on a laptop, a GPU box or inside a Slurm allocation a surprise attempt to
        join a cluster either waits minutes for a coordinator or fails.
  on    always join: explicit flags, or whatever JAX auto-detects (Cloud TPU, Slurm, Open MPI,
        Kubernetes); failing to join is an error.
  off   never join: one process on the local devices.

Process 0 runs the coordinator, which by JAX's default listens on every interface; whoever
reaches its port can join the job. `--coordinator_bind_address` narrows that: launch/local.sh
binds it to 127.0.0.1, launch/tpu.sh to worker 0's internal address.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket

import jax
from absl import logging

from lstm_jax.config import setting
from lstm_jax.errors import UsageError, UserError
from lstm_jax.settings import NON_NEGATIVE, Range

MODES = ("auto", "on", "off")
# GKE's TPU node pools set these; a Cloud TPU VM has libtpu (from `jax[tpu]`) instead.
_TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """multi-host: where this process is in the job (every host runs the same command)"""

    distributed: str = setting(
        "auto",
        "Join a multi-process job with jax.distributed. auto: with --coordinator_address, or "
        "on a Cloud TPU VM (detected); on: always (JAX detects Cloud TPU, Slurm, Open MPI); "
        "off: never.",
        choices=MODES,
    )
    coordinator_address: str = setting(
        "", "HOST:PORT of process 0, for clusters JAX does not detect (and tests). Empty: detect."
    )
    num_processes: int = setting(
        0, "Processes in the job, with --coordinator_address. 0: detect.", within=NON_NEGATIVE
    )
    process_id: int = setting(
        -1, "This process's index in [0, --num_processes). -1: detect.", within=Range(-1)
    )
    coordinator_bind_address: str = setting(
        "",
        "HOST:PORT that process 0's coordinator listens on, e.g. 127.0.0.1:PORT so that only "
        "this machine can join. Empty: JAX's default, every interface ([::]:PORT).",
    )


def on_cloud_tpu() -> bool:
    """Whether this looks like a Cloud TPU host, without touching a device or the network."""
    return importlib.util.find_spec("libtpu") is not None or any(
        os.environ.get(name) for name in _TPU_ENV_VARS
    )


def initialize(options: DistributedOptions = DistributedOptions()) -> bool:
    """Join the multi-process job described by the flags; True if this process joined one.

    `num_processes=0` and `process_id=-1` mean "not given" (JAX detects them on Cloud TPU).
    """
    mode, coordinator_address = options.distributed, options.coordinator_address
    num_processes, process_id = options.num_processes, options.process_id
    if mode not in MODES:
        raise UsageError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}.")
    bind_address = _checked_bind_address(options.coordinator_bind_address)
    explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
    if mode == "off":
        if explicit:
            raise UsageError(
                "--distributed=off contradicts --coordinator_address/--num_processes/"
                "--process_id; drop one or the other."
            )
        return False
    if explicit and not (coordinator_address and num_processes > 0 and process_id >= 0):
        raise UsageError(
            "Give all three of --coordinator_address=HOST:PORT, --num_processes and "
            "--process_id (or none of them, on Cloud TPU, to let JAX detect them)."
        )
    if explicit and not 0 <= process_id < num_processes:
        raise UsageError(
            f"--process_id={process_id} must be in [0, {num_processes}) for "
            f"--num_processes={num_processes}."
        )
    if mode == "auto" and not explicit and not on_cloud_tpu():
        return False
    if bind_address:  # JAX crashes (SIGSEGV) where its coordinator cannot listen.
        _check_can_listen(bind_address, with_port=explicit and process_id == 0)
    try:
        if explicit:
            jax.distributed.initialize(
                coordinator_address,
                num_processes,
                process_id,
                coordinator_bind_address=bind_address,
            )
        else:
            jax.distributed.initialize(coordinator_bind_address=bind_address)
    except ValueError as e:
        if mode == "auto":  # A TPU VM that JAX does not see as part of a slice: run alone.
            logging.warning("Running as a single process: JAX found no TPU slice to join (%s).", e)
            return False
        raise UserError(
            f"Could not join a multi-process job ({e}); pass --coordinator_address, "
            "--num_processes and --process_id, or --distributed=off."
        ) from None
    except RuntimeError as e:
        raise UserError(
            f"Could not join the multi-process job at {coordinator_address or 'auto'}: "
            f"{str(e).splitlines()[0][:300]}. Are all processes started, with the same "
            "--coordinator_address and distinct --process_id values?"
        ) from None
    return True


def _checked_bind_address(address: str) -> str | None:
    """--coordinator_bind_address as JAX takes it: HOST:PORT, or None for JAX's default."""
    if not address:
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(
            f"--coordinator_bind_address must be HOST:PORT with a port in 1..65535 "
            f"(e.g. 127.0.0.1:8482), got {address!r}."
        )
    return address


def _check_can_listen(address: str, with_port: bool) -> None:
    """Refuse a bind address that is not this machine's (and, for process 0, a port in use)."""
    host, _, port = address.rpartition(":")
    try:
        family, kind, _, _, sockaddr = socket.getaddrinfo(
            host.strip("[]"), int(port) if with_port else 0, type=socket.SOCK_STREAM
        )[0]
        with socket.socket(family, kind) as probe:
            probe.bind(sockaddr)
    except OSError as e:
        raise UserError(
            f"The coordinator cannot listen on --coordinator_bind_address={address} "
            f"({e.strerror or e}): give an address of this machine and a free port."
        ) from None


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Wait until every process gets here (no-op for one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(ok: bool) -> bool:
    """Process 0's verdict, known to every process (a collective: all of them must call it), so
    that a check made by process 0 alone stops the whole job, not just process 0."""
    if not is_multiprocess():
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
