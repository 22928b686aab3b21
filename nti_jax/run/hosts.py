"""Processes and hosts: distributed set-up, the persistent compilation cache, each host's share
of the manifest, and a barrier in the shared output folder.

* Several hosts (`jax.distributed`): every process takes the manifest items i with
  i % num_processes == process_index (`host_share`) and inverts them on its own devices (no
  cross-host collectives); the driver then meets the other processes at `FileBarrier` in the
  shared output folder (a process that died is named there, not waited for), and each merges
  their results files.
* `enable_compilation_cache`: JAX's persistent compilation cache. Only process 0 writes entries;
  on GPU the key ignores device ids, so with the cache on a shared filesystem every process
  reuses them; on CPU and TPU the key holds the device ids of the process-local program, so
  processes other than 0 compile on every run.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from nti_jax.records import read_json, write_json
from nti_jax.run.claims import HOST, Heartbeat, Watch

# what run.json records the versions of, where installed
VERSIONED = ("jaxlib", "libtpu", "libtpu-nightly", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt")


def cache_dir_from_env(explicit: Optional[str] = None) -> Optional[str]:
    """The persistent compilation cache folder: `explicit` (a path, or "" / "none" / "off" to
    disable), else $NTI_JAX_CACHE_DIR, else $JAX_COMPILATION_CACHE_DIR, else
    $XDG_CACHE_HOME/nti-jax/jax-cache (~/.cache/nti-jax/jax-cache)."""
    value = explicit
    if value is None:
        value = os.environ.get("NTI_JAX_CACHE_DIR", os.environ.get("JAX_COMPILATION_CACHE_DIR"))
    if value is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        value = os.path.join(base, "nti-jax", "jax-cache")
    if value.strip().lower() in ("", "none", "off", "0", "false"):
        return None
    return os.path.abspath(os.path.expanduser(value))


def enable_compilation_cache(path: Optional[str], min_compile_time_secs: float = 0.0) -> None:
    """Turn on JAX's persistent compilation cache in `path` (None turns it off).

    Every compiled program is stored (`min_compile_time_secs` 0 by default), so a second run of
    the same job on the same machine compiles nothing. JAX never stores programs that contain
    host callbacks (the inversion program with a step-progress callback is such a program).
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    current = jax.config.jax_compilation_cache_dir
    if path is not None:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", path is not None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor
    if path != current:
        jax.config.update("jax_compilation_cache_dir", path)
        cc.reset_cache()  # a cache opened earlier in this process at another path is closed


def distributed_env() -> dict:
    """`jax.distributed.initialize` arguments from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID (each None where unset: JAX then detects TPU pods, SLURM, Open MPI, k8s)."""
    num = os.environ.get("JAX_NUM_PROCESSES")
    pid = os.environ.get("JAX_PROCESS_ID")
    return {
        "coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
        "num_processes": int(num) if num else None,
        "process_id": int(pid) if pid else None,
    }


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, timeout_s: int = 300) -> None:
    """`jax.distributed.initialize`, with arguments left None detected from the environment.

    Must run before anything else touches a JAX backend. (On CPU the barrier's collective runs on
    JAX's default gloo implementation.)
    """
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
    )


def process_info() -> tuple[int, int]:
    """(process_index, process_count)."""
    return jax.process_index(), jax.process_count()


def host_share(n_items: int, process_index: int, process_count: int) -> list[int]:
    """The manifest indices this process inverts: i % process_count == process_index."""
    return [i for i in range(n_items) if i % process_count == process_index]


def versions(devices: Sequence = ()) -> dict:
    """What run.json says the run ran on: the versions of jax, jaxlib, libtpu and the CUDA plugin
    where installed, and the devices' runtime (e.g. its CUDA version) where they have one."""
    from importlib import metadata

    out = {"jax": jax.__version__}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    if devices:
        d = devices[0]
        out["platform"] = d.platform
        runtime = getattr(getattr(d, "client", None), "platform_version", None)
        if runtime:
            out["platform_version"] = str(runtime)
    return out


def kernels(platform: str) -> dict:
    """The kernels the layers choose for `platform` (attention, convolution gradients)."""
    from nti_jax.models import attention, resnet
    from nti_jax.models.backend import kernel_choice

    return {"attention": kernel_choice("attention", attention.ATTENTION, attention.ATTENTION_CHOICES, platform),
            "conv_grad": kernel_choice("conv_grad", resnet.CONV_GRAD, resnet.CONV_GRAD_CHOICES, platform)}


def exit_now(code: int) -> None:
    """End this process with `code` at once, output flushed: after a process of a jax.distributed
    run died, JAX's own shutdown would wait for it at exit and then abort this one (SIGABRT)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class PeerLost(RuntimeError):
    """A process of a multi-host run stopped before a barrier (its heartbeat went stale)."""


class FileBarrier:
    """Processes meeting in a folder they all share (the run's output folder), with no device
    collective and no private JAX API: each process writes `<folder>/.nti-sync/<token>.<name>.<pid>`
    and waits until every process's file is there. `token` (process 0's, broadcast at start with
    `new_token`) keeps a rerun from meeting a previous run's files. Every process heartbeats
    (`<token>.alive.<pid>`, touched every `timeout_s`/4): a process whose heartbeat does not change
    for `timeout_s` by the waiter's monotonic clock (or never appears) has died, and `wait` raises
    PeerLost naming it instead of waiting for it."""

    def __init__(self, folder: str, token: str, process_index: int, process_count: int, timeout_s: float = 600.0):
        self.dir = os.path.join(folder, ".nti-sync")
        self.token, self.pid, self.nproc, self.timeout_s = token, process_index, process_count, timeout_s
        self.watch = Watch()
        self.heartbeat: Optional[Heartbeat] = None
        self.lost: Optional[str] = None  # why a process was given up for dead, set by `wait`
        if process_count > 1:
            os.makedirs(self.dir, exist_ok=True)
            write_json(self._path("alive", process_index), {"host": HOST, "pid": os.getpid(), "process": process_index})
            self.heartbeat = Heartbeat(self._beat, max(0.5, timeout_s / 4)).start()

    def _path(self, name: str, p: int) -> str:
        return os.path.join(self.dir, f"{self.token}.{name}.{p}")

    def _beat(self) -> None:
        with contextlib.suppress(OSError):
            os.utime(self._path("alive", self.pid))

    @staticmethod
    def new_token() -> str:
        """One token for the run, the same on every process (process 0's clock, broadcast)."""
        from jax.experimental import multihost_utils

        mine = np.int64(time.time_ns() % (2**62))
        return format(int(multihost_utils.broadcast_one_to_all(mine)), "x") if jax.process_count() > 1 else format(int(mine), "x")

    def _lost(self, p: int, since: float) -> Optional[str]:
        """Why process `p` is taken for dead, or None while it may still come."""
        alive = self._path("alive", p)
        stale = self.watch.look(alive, self.timeout_s)
        if stale is None and time.monotonic() - since <= self.timeout_s:
            return None
        if stale is False:
            return None
        who = read_json(alive) or {}
        where = f" ({who.get('host')} pid {who.get('pid')})" if who else ""
        return f"process {p}{where} did not arrive: no heartbeat for {self.timeout_s:g} s"

    def wait(self, name: str, poll_s: float = 0.2) -> None:
        """Arrive at barrier `name` and wait for the others (a no-op with one process); PeerLost
        (one line naming the first process missing) once a missing one's heartbeat is stale."""
        if self.nproc == 1:
            return
        with open(self._path(name, self.pid), "w") as f:
            f.write("arrived\n")
        since = time.monotonic()
        while True:
            missing = [p for p in range(self.nproc) if not os.path.exists(self._path(name, p))]
            if not missing:
                return
            lost = [why for why in (self._lost(p, since) for p in missing) if why]
            if lost:
                self.lost = lost[0]
                raise PeerLost(lost[0])
            time.sleep(poll_s)

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
