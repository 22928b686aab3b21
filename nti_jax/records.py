"""The run folder's file formats, one reader and one writer each: JSON objects (metrics.json,
run.json, claims), JSON lines (results.jsonl, a worker's rows), and a file's size and SHA-256
(what an image's record says each of its files is)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

from nti_jax.io import atomic_path

CHUNK = 1 << 20


def read_json(path: str) -> Optional[dict]:
    """The JSON object in `path`; None if it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: str, obj: dict) -> None:
    """Write `obj` to `path` atomically (a temporary file renamed)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """(the JSON objects of a JSON-lines file, how many lines were not one): a torn last line (a
    crash mid-write) counts as not one. A missing file has no rows; other read errors raise."""
    rows, bad = [], 0
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return rows, bad
    with f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write all rows at once, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def file_record(path: str) -> dict:
    """{"size", "sha256"} of the file at `path`."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
            size += len(block)
    return {"size": size, "sha256": h.hexdigest()}


def damage(folder: str, files: dict, full: bool) -> Optional[str]:
    """What is wrong with the files an image's record lists (name -> {"size", "sha256"}), or None
    if they are intact: the size always, the SHA-256 too when `full`. One line, first fault only."""
    for name, want in sorted(files.items()):
        path = os.path.join(folder, name)
        try:
            size = os.path.getsize(path)
        except OSError:
            return f"{name} is missing"
        if size != want.get("size"):
            return f"{name} is {size} bytes, recorded {want.get('size')}"
        if full and file_record(path)["sha256"] != want.get("sha256"):
            return f"{name} does not match its recorded SHA-256"
    return None
