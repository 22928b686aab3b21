"""What a run does: the items (image, caption, edits) from a manifest, image files or a folder.

A manifest is one JSON object a line: {"image": path relative to the file, "prompt": caption,
"edits": [{"prompt": target, <edit settings>}], "name": output folder, "crop": [l, r, t, b]}.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Optional, Sequence

import numpy as np

from .p2p import SETTINGS_KEYS

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MANIFEST = os.path.join(PACKAGE_DIR, "toy", "samples", "samples.jsonl")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EDIT_KEYS = ("prompt",) + SETTINGS_KEYS


class UsageError(Exception):
    """A bad argument or input file: one line on stderr, exit status 2."""


@dataclasses.dataclass
class Item:
    index: int
    image: str
    prompt: object
    edits: list
    name: str = ""
    crop: Optional[tuple] = None
    # filled while running
    key: str = ""
    inversion_key: str = ""
    pixels: Optional[np.ndarray] = None
    controllers: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or os.path.basename(self.image)


def _check_edits(edits, where: str) -> list:
    if not isinstance(edits, list):
        raise UsageError(f"{where}: \"edits\" must be a list of {{prompt, settings}} objects")
    out = []
    for k, e in enumerate(edits):
        if isinstance(e, str):
            e = {"prompt": e}
        if not isinstance(e, dict) or not isinstance(e.get("prompt"), str):
            raise UsageError(f"{where}: edit {k + 1} must be an object with a \"prompt\" string")
        unknown = sorted(set(e) - set(EDIT_KEYS))
        if unknown:
            raise UsageError(f"{where}: edit {k + 1} has unknown setting(s) {', '.join(unknown)} (known: {', '.join(EDIT_KEYS[1:])})")
        out.append(dict(e))
    return out


def read_manifest(path: str) -> list[Item]:
    if not os.path.isfile(path):
        raise UsageError(f"manifest {path} not found")
    base = os.path.dirname(os.path.abspath(path))
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read manifest {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object")
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            raise UsageError(f"{where}: missing \"image\" (a path)")
        if not isinstance(row.get("prompt"), str):
            raise UsageError(f"{where}: missing \"prompt\" (the image's caption)")
        crop = row.get("crop")
        if crop is not None and (
            not isinstance(crop, list) or len(crop) != 4 or not all(isinstance(c, int) and c >= 0 for c in crop)
        ):
            raise UsageError(f"{where}: \"crop\" must be [left, right, top, bottom] pixel counts")
        name = row.get("name")
        if name is not None and not isinstance(name, str):
            raise UsageError(f"{where}: \"name\" must be a string")
        image = os.path.expanduser(image)
        items.append(
            Item(
                index=len(items),
                image=image if os.path.isabs(image) else os.path.join(base, image),
                prompt=row["prompt"],
                edits=_check_edits(row.get("edits", []), where),
                name=name or "",
                crop=tuple(crop) if crop else None,
            )
        )
    if not items:
        raise UsageError(f"manifest {path} lists no images")
    return items


def expand_images(patterns: list[str]) -> list[str]:
    files = []
    for pat in patterns:
        p = os.path.expanduser(pat)
        if os.path.isdir(p):
            found = sorted(
                os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(p, f))
            )
            if not found:
                raise UsageError(f"no images ({', '.join(IMAGE_EXTS)}) in folder {pat}")
        elif os.path.isfile(p):
            found = [p]
        elif glob.has_magic(p):
            found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not found:
                raise UsageError(f"no file matches {pat}")
        else:
            raise UsageError(f"image {pat} not found")
        files.extend(found)
    return files


def _sidecar_caption(image: str) -> Optional[str]:
    txt = os.path.splitext(image)[0] + ".txt"
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8") as f:
            return f.read().strip()
    return None


def collect_items(
    images: Optional[list[str]], prompt: Optional[str], manifest: Optional[str], edits: Sequence[str] = (), no_edits: bool = False
) -> list[Item]:
    """The run's items from --image patterns (+ --prompt or caption files) or a manifest, with the
    --edit prompts added to every item's edits."""
    extra = [{"prompt": e, "kind": "auto"} for e in edits]
    if images and manifest:
        raise UsageError("give --image or --manifest, not both")
    if images:
        files = expand_images(images)
        items = []
        for k, f in enumerate(files):
            caption = prompt if prompt is not None else _sidecar_caption(f)
            if caption is None:
                raise UsageError(f"--prompt is required with --image (or a caption in {os.path.splitext(f)[0]}.txt)")
            items.append(Item(index=k, image=f, prompt=caption, edits=list(extra)))
    else:
        if prompt is not None:
            raise UsageError("--prompt goes with --image; a manifest carries its own prompts")
        items = read_manifest(manifest or DEFAULT_MANIFEST)
        for it in items:
            it.edits = it.edits + list(extra)
    if no_edits:
        for it in items:
            it.edits = []
    assign_names(items)
    return items


def assign_names(items: list[Item]) -> None:
    """Output folder names: the row's name or the image's file stem, made unique in manifest order."""
    seen = set()
    for it in items:
        base = it.name or os.path.splitext(os.path.basename(it.image))[0]
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "image"
        name, k = base, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        it.name = name
