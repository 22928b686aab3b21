"""What a run shows and hears: the step progress bar, the per-batch log line with the images per
hour and the time left, and SIGINT / SIGTERM held back while an image's record is written."""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
import time
from typing import Callable, Iterator

import numpy as np


class StepProgress:
    """The `progress` callback of the inversion program (one instance per run, so the compiled
    program is reused by every batch). Each device reports every step: the bar shows the furthest."""

    def __init__(self):
        self.bar = None
        self.lock = threading.Lock()

    def __call__(self, i):
        with self.lock:
            if self.bar is not None:
                n = int(np.asarray(i)) + 1
                if n > self.bar.n:
                    self.bar.update(n - self.bar.n)

    @contextlib.contextmanager
    def showing(self, num_steps: int) -> Iterator[None]:
        """A bar over the diffusion steps while the block runs (one batch's inversion)."""
        from tqdm import tqdm

        self.bar = tqdm(total=num_steps, desc="  steps", unit="step", leave=False, dynamic_ncols=True, disable=None)
        try:
            yield
        finally:
            bar, self.bar = self.bar, None
            bar.close()


class Throughput:
    """Images this worker finished per hour: over its last `window` batches (the log line, and
    the time left at that rate: a compiling batch weighs only while in the window) and over the
    whole run (run.json). `clock`: seconds, monotonic."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window: int = 8):
        self.clock, self.window = clock, window
        self.start()

    def start(self) -> None:
        self.t0 = self.t1 = self.clock()
        self.marks = collections.deque([(self.t0, 0)], maxlen=self.window + 1)  # (time, images done) at batch ends

    def batch(self, done: int) -> float:
        """Mark a batch's end, `done` images so far; the images per hour over the last `window` batches."""
        now = self.clock()
        self.marks.append((now, done))
        t, before = self.marks[0]
        return (done - before) * 3600.0 / (now - t) if now > t else 0.0

    def stop(self) -> float:
        """The run's seconds, now fixed."""
        self.t1 = self.clock()
        return self.t1 - self.t0

    def record(self, done: int) -> dict:
        """What run.json says of the run's speed (after `stop`)."""
        seconds = self.t1 - self.t0
        return {"images_done": done, "run_seconds": round(seconds, 1),
                "images_per_hour": round(done * 3600.0 / seconds, 1) if seconds > 0 else 0.0}


def clock_text(seconds: float) -> str:
    """H:MM:SS."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def batch_line(counts: dict, total: int, n: int, seconds: float, per_hour: float) -> str:
    """One line per batch (for logs: no terminal, so no progress bar): progress, the batch's
    time, images done per hour (`Throughput.batch`) and the time left at that rate (the images
    this worker has not seen finished; other workers on the folder may take some)."""
    seen = counts["done"] + counts["skipped"] + counts["failed"]
    left = clock_text((total - seen) * 3600.0 / per_hour) if per_hour > 0 else "?"
    rate = f"{per_hour:.0f}" if per_hour >= 10 else f"{per_hour:.2g}"
    return (f"[{seen}/{total}] batch of {n} in {seconds:.1f} s; done {counts['done']}, skipped {counts['skipped']}, "
            f"failed {counts['failed']}; {rate} images/h, {left} left")


class Interrupts:
    """SIGINT and SIGTERM as KeyboardInterrupt, held back while an image's record, claim and row
    are written (`held`), so an interrupted run never leaves a finished image without its row."""

    def __init__(self):
        self.depth, self.pending = 0, False

    def __call__(self, signum, frame):
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers, in the main thread only (elsewhere signals cannot be set)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
