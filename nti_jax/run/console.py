"""What a run shows and hears: the step progress bar, the per-batch log line, and SIGINT /
SIGTERM held back while an image's record is written."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

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


def batch_line(counts: dict, total: int, n: int, seconds: float) -> None:
    """One line per batch on stderr, for logs (no terminal, so no progress bar)."""
    print(
        f"[{counts['done'] + counts['skipped'] + counts['failed']}/{total}] batch of {n} in {seconds:.1f} s; "
        f"done {counts['done']}, skipped {counts['skipped']}, failed {counts['failed']}",
        file=sys.stderr, flush=True,
    )


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
