"""What a run does: the items (image, caption, edits) from a manifest, image files or a folder.

A manifest is one JSON object a line: {"image": path relative to the file, "prompt": caption,
"edits": [{"prompt": target, <edit settings>}], "name": output folder, "crop": [l, r, t, b]}.
Other keys are the row's own data and are ignored, except one that looks like a misspelt row key
("edit", "Prompt"), which is an error; so are two rows naming the same output folder and edit
settings that make no controller. Every error names the line and stops the run (exit 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import json
import os
import re
from typing import Optional, Sequence

from nti_jax.errors import UsageError
from nti_jax.core.controllers import SETTINGS_KEYS, controller_from_settings

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # nti_jax/
DEFAULT_MANIFEST = os.path.join(PACKAGE_DIR, "toy", "samples", "samples.jsonl")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EDIT_KEYS = ("prompt",) + SETTINGS_KEYS


@dataclasses.dataclass(frozen=True)
class Item:
    """One image's request, immutable: the image, its caption and edits, its output folder; and,
    once the run is set up, the keys of its outputs (`runs.item_keys`). What a run makes of it is
    the driver's `Work`."""

    index: int
    image: str
    prompt: object
    edits: tuple
    name: str = ""
    crop: Optional[tuple] = None
    where: str = ""  # "manifest:line" of a manifest row
    key: str = ""
    inversion_key: str = ""

    @property
    def label(self) -> str:
        return self.name or os.path.basename(self.image)


ROW_KEYS = ("image", "prompt", "edits", "name", "crop")


def _check_edits(edits, where: str, source: str) -> tuple:
    """The row's edits as {prompt, settings} dicts, each turned into a controller once so a bad
    setting stops the run here, naming the line (words are checked per image, with the tokenizer)."""
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
        check_edit(source, e, f"{where}: edit {k + 1}")
        out.append(dict(e))
    return tuple(out)


def check_edit(source: str, edit: dict, where: str) -> None:
    """UsageError naming `where` if the edit's settings make no controller (p2p's own checks)."""
    try:
        controller_from_settings(source, [edit["prompt"]], {n: v for n, v in edit.items() if n != "prompt"})
    except (ValueError, TypeError) as err:
        raise UsageError(f"{where}: {' '.join(str(err).split())}") from None


def check_items(items: list[Item]) -> None:
    """`check_edit` on every item's edits: for edits changed after reading (command-line defaults)."""
    for it in items:
        for k, e in enumerate(it.edits):
            check_edit(it.prompt if isinstance(it.prompt, str) else "", e, f"{it.where or it.image}: edit {k + 1}")


def _check_keys(row: dict, where: str) -> None:
    """A key that looks like a misspelt row key ("edit", "Prompt", "crops") is an error: it would
    be ignored silently. Other keys are the row's own data (a sample's seed, a benchmark id)."""
    for key in row:
        if key in ROW_KEYS:
            continue
        near = difflib.get_close_matches(str(key).lower(), ROW_KEYS, n=1, cutoff=0.75)
        if near:
            raise UsageError(f"{where}: unknown key {key!r}; did you mean {near[0]!r}? (row keys: {', '.join(ROW_KEYS)})")


def _row_item(row, where: str, base: str) -> Item:
    """One manifest row (`where`: "file:line") as an Item; UsageError for a malformed one."""
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object")
    _check_keys(row, where)
    image = row.get("image")
    if not isinstance(image, str) or not image.strip():
        raise UsageError(f"{where}: missing \"image\" (a path)")
    if not isinstance(row.get("prompt"), str):
        raise UsageError(f"{where}: missing \"prompt\" (the image's caption)")
    crop = row.get("crop")
    if crop is not None and (
        not isinstance(crop, list) or len(crop) != 4 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in crop)
    ):
        raise UsageError(f"{where}: \"crop\" must be [left, right, top, bottom] pixel counts")
    name = row.get("name")
    if name is not None and not isinstance(name, str):
        raise UsageError(f"{where}: \"name\" must be a string")
    image = os.path.expanduser(image)
    return Item(
        index=0,
        image=os.path.normpath(os.path.join(base, image)),  # an absolute `image` stays as it is
        prompt=row["prompt"],
        edits=_check_edits(row.get("edits", []), where, row["prompt"]),
        name=name or "",
        crop=tuple(crop) if crop else None,
        where=where,
    )


def read_manifest(path: str) -> list[Item]:
    """The manifest's items (image paths relative to its folder); UsageError naming the line for a
    malformed row, a bad edit setting or a "name" given twice."""
    if os.path.isdir(path):
        raise UsageError(f"manifest {path} is a folder, not a JSON-lines file")
    if not os.path.isfile(path):
        raise UsageError(f"manifest {path} not found")
    base = os.path.dirname(os.path.abspath(path))
    items = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not a syntax error
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read manifest {path}: {' '.join(str(e).split())}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg})") from None
        items.append(dataclasses.replace(_row_item(row, where, base), index=len(items)))
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
    if images and manifest:
        raise UsageError("give --image or --manifest, not both")
    if prompt is not None and not prompt.strip():
        raise UsageError("--prompt is empty; give the image's caption")
    if any(not e.strip() for e in edits):
        raise UsageError("--edit is empty; give a target caption")
    extra = tuple({"prompt": e, "kind": "auto"} for e in edits)
    if images:
        files = expand_images(images)
        items = []
        for k, f in enumerate(files):
            caption = prompt if prompt is not None else _sidecar_caption(f)
            if caption is None:
                raise UsageError(f"--prompt is required with --image (or a caption in {os.path.splitext(f)[0]}.txt)")
            items.append(Item(index=k, image=f, prompt=caption, edits=extra))
    else:
        if prompt is not None:
            raise UsageError("--prompt goes with --image; a manifest carries its own prompts")
        items = [dataclasses.replace(it, edits=it.edits + extra) for it in read_manifest(manifest or DEFAULT_MANIFEST)]
    if no_edits:
        items = [dataclasses.replace(it, edits=()) for it in items]
    return assign_names(items)


def _folder_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def assign_names(items: list[Item]) -> list[Item]:
    """The items with their output folder names: the row's "name" (two rows naming the same
    folder: UsageError), else the image's file stem made unique in manifest order (a suffix -2,
    -3, ...; never a name a row gave)."""
    given: dict[str, Item] = {}
    for it in items:
        if it.name:
            name = _folder_name(it.name)
            if name in given:
                first = given[name]
                raise UsageError(f"{it.where or it.image}: \"name\" {it.name!r} is also the output folder of {first.where or first.image} ({name!r}); give each row its own name")
            given[name] = it
    seen = set(given)
    out = []
    for it in items:
        if it.name:
            out.append(dataclasses.replace(it, name=_folder_name(it.name)))
            continue
        base = _folder_name(os.path.splitext(os.path.basename(it.image))[0])
        name, k = base, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        out.append(dataclasses.replace(it, name=name))
    return out
