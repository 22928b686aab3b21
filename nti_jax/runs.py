"""Resumable bookkeeping of a batch run: what each image's output is keyed by, whether a previous
run finished it, its metrics.json, and the results files (one row per image, JSON lines).

Per image, under OUT/<name>/: inversion.safetensors, input.png, reconstruction.png, one PNG per
edit and metrics.json (written last, atomically: it marks the image finished). Finished work is
never rewritten by another image (a folder that holds one fails the newcomer unless --force), and
a write that finds the disk full fails its image and stops the run (`RunLog.stop`).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import sys
import time
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import OptimisationError
from .io import atomic_path, psnr, save_png
from .manifest import Item
from .settings import InvertSettings

STATUSES = ("done", "skipped", "failed", "pending")
# write errors after which the run stops (the next image would fail the same way)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
ROW_METRICS = ("psnr", "vae_psnr", "latent_mse", "inner_iterations", "seconds")


def one_line(e: BaseException) -> str:
    """An exception as one line for the user, without Python's class names (an exception with no
    message says only what kind of failure it was)."""
    msg = " ".join(str(e).split())
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in msg:
        return "out of memory" + (f" ({msg})" if msg else "") + "; use a smaller --batch-size"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return msg or f"unexpected failure ({type(e).__name__})"


def _same_file(a, b: str) -> bool:
    """Whether two image paths name the same file (by path when either is gone)."""
    if not isinstance(a, str):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(text: str, n: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "edit"


def edit_file(k: int, edit: dict) -> str:
    return f"edit-{k + 1}-{_slug(edit['prompt'])}.png"


def model_fingerprint(model: str) -> list:
    """The model as it is on disk: weight files' sizes and times (a hub id: the id)."""
    if not os.path.isdir(model):
        return [model]
    out = [os.path.abspath(model)]
    for f in sorted(glob.glob(os.path.join(model, "*", "*"))):
        if f.endswith((".safetensors", ".bin", ".json")):
            st = os.stat(f)
            out.append([os.path.relpath(f, model), st.st_size, st.st_mtime_ns])
    return out


def item_keys(it: Item, settings: InvertSettings, dtype: str, model_fp: list) -> tuple[str, str]:
    """(inversion key, whole-output key): what the inversion and the image's outputs depend on."""
    try:
        st = os.stat(it.image)
        stamp = [st.st_size, st.st_mtime_ns]
    except OSError:
        stamp = None
    s = settings
    inv = {
        "image": os.path.abspath(it.image), "stamp": stamp, "crop": it.crop, "prompt": it.prompt,
        "method": s.method, "steps": s.num_steps, "guidance": s.guidance_scale, "inner_steps": s.num_inner_steps,
        "early_stop_eps": s.early_stop_epsilon, "dtype": dtype, "model": model_fp,
    }
    inversion_key = _hash(inv)
    return inversion_key, _hash([inversion_key, it.edits])


def image_metrics(it: Item, inv, cfg, inv_seconds: float) -> dict:
    """metrics.json of an inverted image before its files are written (`cfg`: the driver's RunConfig)."""
    iters = np.asarray(inv.inner_iterations[0])
    s = cfg.settings
    return {
        "name": it.name, "image": it.image, "prompt": it.prompt, "status": "running",
        "method": s.method, "num_steps": s.num_steps, "guidance_scale": s.guidance_scale,
        "num_inner_steps": s.num_inner_steps, "early_stop_epsilon": s.early_stop_epsilon, "dtype": cfg.dtype,
        "model": os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model,
        "inner_iterations": int(iters.sum()),
        "inner_iterations_per_step": iters.tolist(),
        "final_losses": np.asarray(inv.final_losses[0]).tolist(),
        "nonfinite_steps": int(np.asarray(inv.nonfinite[0]).sum()),
        "inversion_seconds": round(inv_seconds, 4),
        "key": it.key,
        "inversion_key": None,
        "warnings": list(it.warnings),
    }


def add_reconstruction(metrics: dict, pixels: np.ndarray, inv, image, latent, vae_image) -> bool:
    """Add PSNR (reconstruction and VAE bound) and latent MSE to `metrics`; False when the
    inversion or its reconstruction is not finite (its PSNR is then None)."""
    image, z, vae = np.asarray(image), np.asarray(latent), np.asarray(vae_image)
    z0 = np.asarray(inv.pivots[0, 0])
    finite = bool(metrics["nonfinite_steps"] == 0 and np.isfinite(z).all() and np.isfinite(image).all())
    metrics.update(
        psnr=psnr(image, pixels) if finite else None,
        vae_psnr=psnr(vae, pixels) if np.isfinite(vae).all() else None,
        latent_mse=float(np.mean((z.astype(np.float64) - z0) ** 2)) if finite else None,
    )
    return finite


def results_file(out_dir: str, process_index: int, process_count: int) -> str:
    """This process's results file: results.jsonl alone, results.<process>.jsonl on several hosts."""
    name = "results.jsonl" if process_count == 1 else f"results.{process_index}.jsonl"
    return os.path.join(out_dir, name)


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (a crash mid-write) is ignored."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write all rows at once, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def merge_jsonl(out_path: str, parts: Sequence[str], key: str = "index") -> list[dict]:
    """Merge per-process results files into `out_path`, ordered by `key` (manifest order)."""
    rows = [r for p in parts for r in read_jsonl(p)]
    rows.sort(key=lambda r: r.get(key, 0))
    write_jsonl(out_path, rows)
    return rows


class RunLog:
    """The run's outputs folder and results rows: per-image state, metrics.json, results.jsonl.

    Rows are appended to this process's results file as images finish (a crash keeps them) and
    the file is rewritten whole, in manifest order, at the end (`close`)."""

    def __init__(self, out: str, process_index: int = 0, process_count: int = 1, force: bool = False):
        self.out = os.path.abspath(out)
        self.pid, self.nproc = process_index, process_count
        self.force = force
        self.rows: dict[int, dict] = {}
        self.counts = {s: 0 for s in STATUSES}
        self.path = results_file(self.out, process_index, process_count)
        self.log = None
        self.bar = None  # a tqdm bar to report on, set by the driver
        self.stop: Optional[str] = None  # why the run must stop (a full disk), set by a failed write

    def folder(self, it: Item) -> str:
        return os.path.join(self.out, it.name)

    def open(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        self.log = open(self.path, "w")

    def previous(self, it: Item) -> Optional[dict]:
        try:
            with open(os.path.join(self.folder(it), "metrics.json")) as f:
                m = json.load(f)
        except (OSError, ValueError):
            return None
        return m if isinstance(m, dict) else None

    def state(self, it: Item) -> tuple[str, Optional[dict]]:
        """"done" (skip), "reuse" (inversion saved, edits to do), "new", or "taken" (the folder holds
        another image's finished work: never overwritten without --force)."""
        m = None if self.force else self.previous(it)
        if m is None:
            return "new", None
        if (m.get("status") == "done" or m.get("inversion_key")) and not _same_file(m.get("image"), it.image):
            return "taken", m
        d = self.folder(it)
        inv_ok = m.get("inversion_key") == it.inversion_key and os.path.isfile(os.path.join(d, "inversion.safetensors"))
        files = ["reconstruction.png"] + [edit_file(k, e) for k, e in enumerate(it.edits)]
        if m.get("status") == "done" and m.get("key") == it.key and inv_ok and all(os.path.isfile(os.path.join(d, f)) for f in files):
            return "done", m
        if inv_ok and m.get("psnr") is not None:
            return "reuse", m
        return "new", None

    def taken(self, it: Item, prev: dict) -> str:
        """The error of an image whose output folder holds another image's results."""
        return (f"the output folder {self.folder(it)} holds the results of another image ({prev.get('image')}); "
                "give this row its own \"name\" or rerun with --force to replace them")

    def write_failed(self, e: BaseException) -> str:
        """One line for a failed write; a full disk (or a file-size limit, a read-only disk) also
        stops the run, since every later image would fail the same way."""
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS and self.stop is None:
            self.stop = one_line(e)
        return one_line(e)

    def write_metrics(self, it: Item, metrics: dict) -> None:
        with atomic_path(os.path.join(self.folder(it), "metrics.json")) as tmp:
            with open(tmp, "w") as f:
                json.dump(metrics, f, indent=2)

    def save_edits(self, it: Item, results: list) -> list[dict]:
        """Each edit's target image as a PNG; the edits' settings with their file names."""
        out = []
        for k, (e, images) in enumerate(zip(it.edits, results)):
            images = np.asarray(images)
            if images.shape[0] != 2 or not np.all(np.isfinite(images)):
                raise OptimisationError(f"edit {k + 1} ({e['prompt']!r}) gave no finite image")
            fn = edit_file(k, e)
            save_png(images[1], os.path.join(self.folder(it), fn))
            out.append(dict(e, file=fn))
        return out

    def save_heatmaps(self, it: Item) -> None:
        """The image's cross-attention heat maps (attention.png, and per edit with --attention)."""
        for name, image in it.heatmaps.items():
            save_png(image, os.path.join(self.folder(it), name))

    def finish(self, it: Item, inv, recon_img, edits, error: Optional[str], metrics: dict, t1: float) -> None:
        """Write the image's files, metrics.json last (atomic), and its results row. A finite
        inversion (`recon_img` given) is kept even if its edits failed."""
        folder = self.folder(it)
        try:
            os.makedirs(folder, exist_ok=True)
            metrics["edits"] = []
            save_png(it.pixels, os.path.join(folder, "input.png"))
            if recon_img is not None:
                inv.save(os.path.join(folder, "inversion.safetensors"))
                metrics["inversion_key"] = it.inversion_key
                save_png(recon_img, os.path.join(folder, "reconstruction.png"))
                if error is None and edits:
                    metrics["edits"] = self.save_edits(it, edits)
                if error is None:
                    self.save_heatmaps(it)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            error = error or self.write_failed(e)
        self.close_image(it, metrics, error, metrics["inversion_seconds"], t1)

    def close_image(self, it: Item, metrics: dict, error: Optional[str], inv_seconds: float, t1: float) -> None:
        """Timings and status into metrics.json, then the results row."""
        metrics["edit_seconds"] = round(time.time() - t1, 4)
        metrics["seconds"] = round(inv_seconds + metrics["edit_seconds"], 4)
        metrics["status"] = "failed" if error else "done"
        if error:
            metrics["error"] = error
        try:
            self.write_metrics(it, metrics)
        except OSError as e:
            error, metrics["status"] = error or self.write_failed(e), "failed"
        self.record(it, metrics["status"], error, metrics)

    def record(self, it: Item, status: str, error: Optional[str] = None, metrics: Optional[dict] = None) -> None:
        """The image's results row (appended to the results file at once)."""
        row = {"index": it.index, "name": it.name, "image": it.image, "prompt": it.prompt, "status": status}
        if error:
            row["error"] = error
        if metrics:
            row.update({k: metrics[k] for k in ROW_METRICS if k in metrics})
            row["dir"] = self.folder(it)
            row["edits"] = [e.get("file") for e in metrics.get("edits", [])]
            if metrics.get("warnings"):
                row["warnings"] = metrics["warnings"]
        if self.nproc > 1:
            row["process"] = self.pid
        self.rows[it.index] = row
        self.counts[status] = self.counts.get(status, 0) + 1
        if self.log is not None:
            try:
                self.log.write(json.dumps(row) + "\n")
                self.log.flush()
            except OSError as e:  # the row is kept in memory and written whole by `close`
                self.write_failed(e)
        if self.bar is not None:
            if status == "failed":
                self.bar.write(f"failed: {it.label}: {error}", file=sys.stderr)
            c = self.counts
            self.bar.set_postfix(done=c["done"], skipped=c["skipped"], failed=c["failed"], refresh=False)
            self.bar.update(1)

    def close(self, share: Sequence[Item]) -> list[dict]:
        """Rewrite this process's results file whole: one row per image of its share, in order
        (images not reached are "pending")."""
        if self.log is not None:
            try:
                self.log.close()
            except OSError:
                pass  # a full disk: the rows are rewritten whole just below
            self.log = None
        rows = [
            self.rows.get(it.index) or {"index": it.index, "name": it.name, "image": it.image, "prompt": it.prompt, "status": "pending"}
            for it in share
        ]
        if self.nproc > 1:
            for r in rows:
                r["process"] = self.pid
        try:
            write_jsonl(self.path, rows)
        except OSError as e:
            self.write_failed(e)
            print(f"could not write {self.path}: {one_line(e)}", file=sys.stderr)
        return rows

    def merge(self) -> list[dict]:
        """Process 0, after every process closed its file: OUT/results.jsonl over all of them."""
        parts = [results_file(self.out, p, self.nproc) for p in range(self.nproc)]
        return merge_jsonl(os.path.join(self.out, "results.jsonl"), parts)
