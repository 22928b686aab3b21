"""An image's files in the run folder, with the size and SHA-256 of the bytes written; metrics.json,
the image's record, last, listing them all.

Fenced: a claim generation writes its files into its own staging folder
(OUT/.nti-run/stage/<name>.<g>.<nonce>/), and `publish` moves them into OUT/<name>/ only while holding the
run folder's publish lock and only if the worker still holds the image's claim (checked under that
lock). A worker that stalled past --claim-timeout and lost the claim therefore never changes the
files another worker finished: its check fails, or (stalled between check and rename) it holds
the lock, and the newer holder's publish waits and lands after it. Check and rename are one step
for every publisher, so neither can slip between the other's. (A crash between the renames
leaves files that do not match the old record: the next run redoes the image.)
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
from typing import Callable, Optional

import numpy as np

from nti_jax.errors import OptimisationError
from nti_jax.io import atomic_path, locked, save_png
from nti_jax.records import file_record, write_json

INVERSION = "inversion.safetensors"
INPUT = "input.png"
RECONSTRUCTION = "reconstruction.png"
RECORD = "metrics.json"
# fault tests only: a worker publishing this image stops itself (SIGSTOP) between check and rename
STOP_BEFORE_RENAME = "NTI_JAX_FAULT_STOP_BEFORE_RENAME"


def _slug(text: str, n: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "edit"


def edit_file(k: int, edit: dict) -> str:
    return f"edit-{k + 1}-{_slug(edit['prompt'])}.png"


def plan_record(remat: str, rows_per_call: int, devices: int, kernels: dict, oom_retries: Optional[int] = None) -> dict:
    """What an image's record says about the plan it ran with: the remat mode its program ran with
    (the planner's choice under --remat auto), the images per device per call of the program, the
    devices, the kernels chosen for their platform, and the out-of-memory retries of its batch
    (calls run again with fewer rows: its inversion, reconstruction and edits so far)."""
    return {"remat": remat, "rows_per_call": rows_per_call, "devices": devices, "kernels": dict(kernels),
            "oom_retries": oom_retries}


class ImageWriter:
    """The files of one image: written into `stage` (this claim generation's own folder), moved
    into `folder` by `publish`. `files` (name -> {"size", "sha256"}) is what its record lists.
    `kept`: files of an earlier run in `folder` that stay (an intact inversion that is reused).
    Without `stage` (a library call, no claims) files are written straight into `folder`.
    `stamp`: what the record says of the attempt (its claim generation and epoch)."""

    def __init__(self, folder: str, kept: Optional[dict] = None, stage: Optional[str] = None, lock: Optional[str] = None,
                 stamp: Optional[dict] = None):
        self.folder, self.stage, self.lock, self.stamp = folder, stage or folder, lock, dict(stamp or {})
        self.files: dict[str, dict] = dict(kept or {})
        self.new: list[str] = []

    def write(self, name: str, save: Callable[[str], None]) -> None:
        """`save(path)` to a temporary path in the stage, then renamed to `name` there."""
        with atomic_path(os.path.join(self.stage, name)) as tmp:
            save(tmp)
            record = file_record(tmp)
        self.files[name] = record
        if name not in self.new:
            self.new.append(name)

    def png(self, name: str, image) -> None:
        self.write(name, functools.partial(save_png, image))

    def inversion(self, inv) -> None:
        self.write(INVERSION, inv.save)

    def edits(self, edits: list, results: list) -> list[dict]:
        """Each edit's target image as a PNG; the edits' settings with their file names."""
        out = []
        for k, (e, images) in enumerate(zip(edits, results)):
            images = np.asarray(images)
            if images.shape[0] != 2 or not np.all(np.isfinite(images)):
                raise OptimisationError(f"edit {k + 1} ({e['prompt']!r}) gave no finite image")
            fn = edit_file(k, e)
            self.png(fn, images[1])
            out.append(dict(e, file=fn))
        return out

    def heatmaps(self, maps: dict) -> None:
        """The image's cross-attention heat maps (file name -> uint8 image)."""
        for name, image in maps.items():
            self.png(name, image)

    def publish(self, metrics: dict, still_mine: Callable[[], bool]) -> bool:
        """Move the staged files into the image folder and write metrics.json last, listing every
        file (it marks the image finished), if `still_mine()` under the publish lock; False (and
        nothing moved) if not. The stage is removed either way."""
        try:
            with locked(self.lock) if self.lock else contextlib.nullcontext():
                if not still_mine():
                    return False
                if os.environ.get(STOP_BEFORE_RENAME) == os.path.basename(self.folder):
                    os.kill(os.getpid(), signal.SIGSTOP)
                os.makedirs(self.folder, exist_ok=True)
                for name in self.new:
                    if self.stage != self.folder:
                        os.replace(os.path.join(self.stage, name), os.path.join(self.folder, name))
                write_json(os.path.join(self.folder, RECORD), dict(metrics, **self.stamp, files=dict(self.files)))
                return True
        finally:
            self.discard()

    def discard(self) -> None:
        """Remove the stage (files not published are another attempt's, now history)."""
        if self.stage != self.folder:
            shutil.rmtree(self.stage, ignore_errors=True)
