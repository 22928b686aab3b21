"""Workers sharing a run folder: who they are, whether they still run, and their claims on images.

A claim on image NAME is `CLAIMS/NAME.<g>` (g = 0, 1, ...), a JSON object with the worker's host,
pid, boot id and pid namespace, made by hard-linking a finished temporary file to that name, which
succeeds for exactly one worker. The highest generation is the image's holder. A holder that has
finished the image marks its claim "finished"; one that died (kill -9, a preempted VM) is replaced
by the next generation: at once when it ran in this kernel and pid namespace (same boot id and
namespace, not the same hostname) and its pid is gone, else once its claim's heartbeat (`touch`)
has not changed for the timeout, as this worker's own monotonic clock measures it (no other
host's clock is read). The generations are the image's history of attempts, and order its rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

from nti_jax.records import read_json, write_json

HOST = socket.gethostname()
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
PID_NAMESPACE = "/proc/self/ns/pid"


def boot_id() -> str:
    """This kernel's boot id ("" where the system has none): one per machine and boot."""
    try:
        with open(BOOT_ID_FILE, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """The inode of this process's pid namespace ("" where unknown): containers differ here."""
    try:
        return str(os.stat(PID_NAMESPACE).st_ino)
    except OSError:
        return ""


@dataclasses.dataclass(frozen=True)
class Worker:
    """One process working on a run folder; `nonce` tells two runs of one process apart, and
    `boot` / `pidns` whether another worker's pid means anything here."""

    host: str
    pid: int
    nonce: str
    started: float
    boot: str = ""
    pidns: str = ""

    @classmethod
    def me(cls) -> "Worker":
        return cls(HOST, os.getpid(), uuid.uuid4().hex[:12], time.time(), boot_id(), pid_namespace())

    @property
    def id(self) -> str:
        return f"{self.host}-{self.pid}-{self.nonce}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def sees_pids_of(self, holder: dict) -> bool:
        """Whether `holder`'s pid names a process of this kernel and pid namespace."""
        return bool(self.boot and self.pidns) and holder.get("boot") == self.boot and holder.get("pidns") == self.pidns


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def alive(holder: Optional[dict], stale: bool, me: Worker) -> bool:
    """Whether the worker described by `holder` (a claim's or registration's JSON) may still be
    working: not if its heartbeat is `stale`, nor if it ran in this kernel and pid namespace and
    its pid is gone (or is this process's pid, from an earlier run)."""
    if holder is not None and holder.get("nonce") == me.nonce:
        return True
    if stale:
        return False
    if holder is None or not me.sees_pids_of(holder):
        return True  # another machine or container (or a claim being written): only the heartbeat tells
    pid = holder.get("pid")
    return isinstance(pid, int) and pid != me.pid and _pid_running(pid)


class Watch:
    """When each watched file's heartbeat (its stat: touched files change) last changed, by this
    process's monotonic clock: a file is stale once unchanged for the timeout since first seen."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.seen: dict[str, tuple[tuple, float, bool]] = {}  # path -> (beat, since, changed once)

    def look(self, path: str, timeout_s: float) -> Optional[bool]:
        """Whether `path` is stale now (None: it is gone)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        beat = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size)
        now = self.clock()
        prev = self.seen.get(path)
        if prev is None or prev[0] != beat:
            self.seen[path] = (beat, now, prev is not None)
            return False
        return now - prev[1] > timeout_s

    def beating(self, path: str) -> bool:
        """Whether `path`'s heartbeat was seen to change (a worker seen alive, not just assumed)."""
        return self.seen.get(path, ((), 0.0, False))[2]


def _link_new(path: str, obj: dict) -> bool:
    """Create `path` holding `obj` if it does not exist (atomic: write, then hard-link)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    write_json(tmp, obj)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


class Claims:
    """This worker's claims in `folder` (OUT/.nti-run/claims)."""

    def __init__(self, folder: str, me: Worker, timeout_s: float, watch: Optional[Watch] = None):
        self.folder, self.me, self.timeout_s = folder, me, timeout_s
        self.watch = watch or Watch()
        self.held: dict[str, str] = {}  # image name -> this worker's claim file
        self.taken: dict[str, int] = {}  # image name -> the generation this worker last claimed
        os.makedirs(folder, exist_ok=True)

    def _path(self, name: str, gen: int) -> str:
        return os.path.join(self.folder, f"{name}.{gen}")

    def generations(self, name: str) -> list[int]:
        """The image's claim generations 0, 1, ... (probed one by one: the folder may hold millions)."""
        g = 0
        while os.path.exists(self._path(name, g)):
            g += 1
        return list(range(g))

    def history(self, name: str) -> list[dict]:
        """The image's claims, oldest first (a claim being written reads as {})."""
        return [read_json(self._path(name, g)) or {} for g in self.generations(name)]

    def generation(self, name: str) -> int:
        """The generation of this worker's latest claim on the image (-1: none)."""
        return self.taken.get(name, -1)

    def acquire(self, name: str) -> bool:
        """Claim the image unless a live worker holds an unfinished claim on it."""
        while True:
            gens = self.generations(name)
            if gens:
                top = self._path(name, gens[-1])
                holder, stale = read_json(top), self.watch.look(top, self.timeout_s)
                if stale is None:
                    continue  # released just now: look again
                finished = (holder or {}).get("finished")
                if finished and finished >= self.me.started:
                    return False  # tried in this run already (a failure is retried by the next run)
                if not finished and alive(holder, stale, self.me):
                    return False
            gen = gens[-1] + 1 if gens else 0
            path = self._path(name, gen)
            if _link_new(path, dict(self.me.to_dict(), claimed=time.time())):
                self.held[name], self.taken[name] = path, gen
                return True

    def waiting(self, name: str) -> bool:
        """Whether another worker holds an unfinished claim on the image (it may finish it, or die)."""
        gens = self.generations(name)
        if not gens or self.held.get(name) == self._path(name, gens[-1]):
            return False
        return not (read_json(self._path(name, gens[-1])) or {}).get("finished")

    def mine(self, name: str) -> bool:
        """Whether this worker still holds the image (no one took it over as dead)."""
        gens = self.generations(name)
        return name in self.held and bool(gens) and self._path(name, gens[-1]) == self.held[name]

    def finish(self, name: str) -> None:
        """Mark this worker's claim finished (the image's record is written)."""
        path = self.held.pop(name, None)
        if path is not None:
            claim = read_json(path) or self.me.to_dict()
            with contextlib.suppress(OSError):  # a full disk: the image's record is what counts
                write_json(path, dict(claim, finished=time.time()))

    def release(self, name: str) -> None:
        """Give the image up unworked (it needed nothing, or the run was interrupted); a claim
        another worker has taken over since stays, as the history below theirs."""
        mine = self.mine(name)
        path = self.held.pop(name, None)
        if path is not None and mine:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass

    def release_all(self) -> None:
        for name in list(self.held):
            self.release(name)

    def touch(self) -> None:
        """The heartbeat: every held claim touched now."""
        for path in list(self.held.values()):
            try:
                os.utime(path)
            except OSError:
                pass


class Heartbeat:
    """A daemon thread calling `beat` every `period_s` seconds until `stop`."""

    def __init__(self, beat, period_s: float):
        self.beat, self.period_s = beat, period_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nti-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.done.wait(self.period_s):
            self.beat()

    def start(self) -> "Heartbeat":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.done.set()
