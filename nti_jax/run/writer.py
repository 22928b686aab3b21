"""An image's files in the run folder, each written to a temporary name and renamed, with the
size and SHA-256 of the bytes written; metrics.json, the image's record, last, listing them all."""

from __future__ import annotations

import functools
import os
import re
from typing import Callable, Optional

import numpy as np

from nti_jax.errors import OptimisationError
from nti_jax.io import atomic_path, save_png
from nti_jax.records import file_record, write_json

INVERSION = "inversion.safetensors"
INPUT = "input.png"
RECONSTRUCTION = "reconstruction.png"
RECORD = "metrics.json"


def _slug(text: str, n: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "edit"


def edit_file(k: int, edit: dict) -> str:
    return f"edit-{k + 1}-{_slug(edit['prompt'])}.png"


class ImageWriter:
    """The files of one image folder; `files` (name -> {"size", "sha256"}) is what its record
    lists. `kept`: files of an earlier run that stay (an intact inversion that is reused)."""

    def __init__(self, folder: str, kept: Optional[dict] = None):
        self.folder = folder
        self.files: dict[str, dict] = dict(kept or {})

    def write(self, name: str, save: Callable[[str], None]) -> None:
        """`save(path)` to a temporary path, then renamed to `name`."""
        with atomic_path(os.path.join(self.folder, name)) as tmp:
            save(tmp)
            record = file_record(tmp)
        self.files[name] = record

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

    def record(self, metrics: dict) -> None:
        """metrics.json, listing every file written (atomic; it marks the image finished)."""
        write_json(os.path.join(self.folder, RECORD), dict(metrics, files=dict(self.files)))
