"""Workers sharing a run folder: who they are, whether they still run, and their claims on images.

A claim on image NAME is `CLAIMS/NAME.<g>` (g = 0, 1, ...), a JSON object with the worker's host,
pid and start time, made by hard-linking a finished temporary file to that name, which succeeds
for exactly one worker. The highest generation is the image's holder. A holder that has finished
the image marks its claim "finished"; one that died (kill -9, a preempted VM) is replaced by the
next generation: at once when its pid is gone on this host, else once its claim has not been
touched (`heartbeat`) for the timeout. The generations are the image's history of attempts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
import uuid
from typing import Optional

from nti_jax.records import read_json, write_json

HOST = socket.gethostname()


@dataclasses.dataclass(frozen=True)
class Worker:
    """One process working on a run folder; `nonce` tells two runs of one process apart."""

    host: str
    pid: int
    nonce: str
    started: float

    @classmethod
    def me(cls) -> "Worker":
        return cls(HOST, os.getpid(), uuid.uuid4().hex[:12], time.time())

    @property
    def id(self) -> str:
        return f"{self.host}-{self.pid}-{self.nonce}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def alive(holder: Optional[dict], touched: float, me: Worker, timeout_s: float, now: Optional[float] = None) -> bool:
    """Whether the worker described by `holder` (a claim's or registration's JSON, last touched at
    `touched`) may still be working: not if it has not been touched for `timeout_s`, nor if it ran
    on this host and its pid is gone (or is this process, from an earlier run)."""
    now = time.time() if now is None else now
    if holder is not None and holder.get("nonce") == me.nonce:
        return True
    if now - touched > timeout_s:
        return False
    if holder is None or holder.get("host") != me.host:
        return True  # another host (or a claim being written): only the timeout tells
    pid = holder.get("pid")
    return isinstance(pid, int) and pid != me.pid and _pid_running(pid)


def _mtime(path: str) -> Optional[float]:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


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

    def __init__(self, folder: str, me: Worker, timeout_s: float):
        self.folder, self.me, self.timeout_s = folder, me, timeout_s
        self.held: dict[str, str] = {}  # image name -> this worker's claim file
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

    def acquire(self, name: str) -> bool:
        """Claim the image unless a live worker holds an unfinished claim on it."""
        while True:
            gens = self.generations(name)
            if gens:
                top = self._path(name, gens[-1])
                holder, touched = read_json(top), _mtime(top)
                if touched is None:
                    continue  # released just now: look again
                finished = (holder or {}).get("finished")
                if finished and finished >= self.me.started:
                    return False  # tried in this run already (a failure is retried by the next run)
                if not finished and alive(holder, touched, self.me, self.timeout_s):
                    return False
            path = self._path(name, gens[-1] + 1 if gens else 0)
            if _link_new(path, dict(self.me.to_dict(), claimed=time.time())):
                self.held[name] = path
                return True

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
