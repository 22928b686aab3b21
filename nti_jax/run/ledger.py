"""The books of a run folder that any number of workers share (see `claims`): per image, its
record (metrics.json, listing the size and SHA-256 of every file) and whether the files still
match it; the workers' registrations; each worker's rows; results.jsonl merged over all of them.

Under OUT/.nti-run/: `workers/<id>.json` (a live worker's run key and settings: a worker with
other settings is refused), `claims/<name>.<g>`, `stage/<name>.<g>.<nonce>/` (a claim's files
before `writer.ImageWriter.publish` moves them, under `publish.lock`), `rows/<run key>.<epoch>.<worker>.jsonl`
(rows appended as images finish, rewritten whole at the end), `merge.lock` (results.jsonl, the
report and the PIE-Bench files are written by one worker at a time, from every worker's rows of
this epoch: per image the row of the highest claim generation wins, a "skipped" row over the row
that finished that generation; an image with none is "pending"; wall-clock times are never
compared) and `complete.json` (the epochs completed). A run completes when the worker merging
finds no image pending and no other worker registered: it alone finishes the run's files (the
PIE-Bench metrics), prunes the claims, stages, registrations and older epochs' rows, and counts
the epoch complete; a worker started later begins the next epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import json
import os
import shutil
import sys
import time
from typing import Iterator, NamedTuple, Optional, Sequence

from nti_jax.run.claims import Claims, Heartbeat, Watch, Worker, alive
from nti_jax.errors import UsageError, one_line
from nti_jax.io import locked
from nti_jax.run.manifest import Item
from nti_jax.records import damage, file_record, read_json, read_jsonl, write_json, write_jsonl
from nti_jax.run.writer import INPUT, INVERSION, RECONSTRUCTION, RECORD, ImageWriter, edit_file

RUN_DIR = ".nti-run"
COMPLETE = "complete.json"
STATUSES = ("done", "skipped", "failed", "pending")
# write errors after which the run stops (the next image would fail the same way)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
ROW_METRICS = ("psnr", "vae_psnr", "latent_mse", "inner_iterations", "seconds")


def _same_file(a, b: str) -> bool:
    """Whether two image paths name the same file (by path when either is gone)."""
    if not isinstance(a, str):
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


@dataclasses.dataclass(frozen=True)
class State:
    """What an image needs: "done" (nothing), "reuse" (its intact inversion is kept, the rest
    redone), "new", or "taken" (the folder holds another image's finished work). `damage`: why a
    finished image is redone."""

    kind: str
    prev: Optional[dict] = None
    damage: Optional[str] = None


def image_state(folder: str, it: Item, record: Optional[dict], full: bool) -> State:
    """The image's state from its record; `full`: check the files' SHA-256, not only their sizes."""
    m = record
    if m is None:
        return State("new")
    if (m.get("status") == "done" or m.get("inversion_key")) and not _same_file(m.get("image"), it.image):
        return State("taken", m)
    files = m.get("files")
    if isinstance(files, dict):
        kept = {n: files[n] for n in (INVERSION, INPUT) if n in files}
        inv_bad = damage(folder, kept, full) if len(kept) == 2 else f"{INVERSION} is not recorded"
        all_bad = damage(folder, files, full)
    else:  # a record from before checksums: the files' presence only
        names = [INVERSION, RECONSTRUCTION] + [edit_file(k, e) for k, e in enumerate(it.edits)]
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        inv_bad = f"{INVERSION} is missing" if INVERSION in missing else None
        all_bad = f"{missing[0]} is missing" if missing else None
    inv_ok = m.get("inversion_key") == it.inversion_key and inv_bad is None
    if m.get("status") == "done" and m.get("key") == it.key:
        if all_bad is None:
            return State("done", m)
        return State("reuse" if inv_ok and m.get("psnr") is not None else "new", m, all_bad)
    if inv_ok and m.get("psnr") is not None:
        return State("reuse", m)
    return State("new")


def row_rank(row: dict) -> tuple:
    """How a row ranks among an image's rows of one epoch: by claim generation, then a "skipped"
    row (an intact record of that generation, found later) over the row that finished it."""
    gen = row.get("generation")
    return (gen if isinstance(gen, int) else -1, row.get("status") == "skipped")


class Ledger:
    """This worker's view of the books of `out` (see the module docstring). Rows go to this
    worker's rows file as images finish (a crash keeps them); `merged` writes results.jsonl."""

    def __init__(self, out: str, run_key: str, process_index: int = 0, process_count: int = 1,
                 force: bool = False, verify: bool = False, timeout_s: float = 600.0, watch: Optional[Watch] = None):
        self.out = os.path.abspath(out)
        self.dir = os.path.join(self.out, RUN_DIR)
        self.me = Worker.me()
        self.run_key = run_key
        self.pid, self.nproc = process_index, process_count
        self.force, self.verify, self.timeout_s = force, verify, timeout_s
        self.watch = watch or Watch()
        self.claims = Claims(os.path.join(self.dir, "claims"), self.me, timeout_s, self.watch)
        self.epoch = completed_epoch(self.dir) + 1
        self.registration = os.path.join(self.dir, "workers", f"{self.me.id}.json")
        self.rows: dict[str, dict] = {}
        self.counts = {s: 0 for s in STATUSES}
        self.repaired = 0
        self.log = None
        self.bar = None  # a tqdm bar to report on, set by the driver
        self.stop: Optional[str] = None  # why the run must stop (a full disk), set by a failed write
        self.heartbeat: Optional[Heartbeat] = None
        self.completes = False  # set by `merged`: this worker completed the run

    @property
    def path(self) -> str:
        """This worker's rows file."""
        return os.path.join(self.dir, "rows", f"{self.run_key}.{self.epoch}.{self.me.id}.jsonl")

    def folder(self, it: Item) -> str:
        return os.path.join(self.out, it.name)

    def writer(self, it: Item, kept: Optional[dict] = None) -> ImageWriter:
        """The image's writer: files staged in this claim generation's own folder, published
        under the publish lock (see `writer`)."""
        stage = os.path.join(self.dir, "stage", f"{it.name}.{self.claims.generation(it.name)}.{self.me.nonce}")
        return ImageWriter(self.folder(it), kept, stage, os.path.join(self.dir, "publish.lock"),
                           stamp={"generation": self.claims.generation(it.name), "epoch": self.epoch})

    # -- workers ---------------------------------------------------------------------------------

    def _live(self, path: str) -> Optional[dict]:
        """A registration's contents if its worker may still run (and it is not this one)."""
        reg = read_json(path)
        stale = self.watch.look(path, self.timeout_s)
        if stale is None or reg is None or reg.get("nonce") == self.me.nonce or not alive(reg, stale, self.me):
            return None
        return reg

    def _registrations(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.dir, "workers", "*.json")))

    def _known_live(self, paths: Sequence[str]) -> list[dict]:
        """Of the registrations at `paths`, those whose workers are known alive: by their pid in
        this kernel and pid namespace, elsewhere once their heartbeat is seen to change. While
        none is known and some are neither seen beating nor stale, they are watched until they
        are one or the other (at most the timeout)."""
        while True:
            regs = [(p, r) for p, r in ((p, self._live(p)) for p in paths) if r is not None]
            known = [r for p, r in regs if self.me.sees_pids_of(r) or self.watch.beating(p)]
            if known or not regs:
                return known
            time.sleep(min(1.0, self.timeout_s / 8))

    def _conflict(self) -> Optional[dict]:
        """A live worker of another run key (see `_known_live`)."""
        others = [p for p in self._registrations() if (read_json(p) or {}).get("run_key") not in (None, self.run_key)]
        live = self._known_live(others)
        return live[0] if live else None

    def register(self, settings: dict) -> None:
        """Join the folder's workers; UsageError if a live one runs other settings or images
        (`settings`: this run's command-line settings, to name the difference)."""
        try:
            os.makedirs(os.path.dirname(self.registration), exist_ok=True)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot use the output folder {self.out}: {one_line(e)}") from None
        other = self._conflict()
        if other is not None:
            theirs = other.get("settings") or {}
            diff = [f"{k} {theirs.get(k)!r} there, {v!r} here" for k, v in settings.items() if theirs.get(k) != v]
            what = "; ".join(diff) if diff else "other images, edits or model files"
            raise UsageError(f"{self.out} is being run by another worker ({other.get('host')} pid {other.get('pid')}) "
                             f"with other settings ({what}); give every worker the same arguments, or another --out")
        try:
            write_json(self.registration, dict(self.me.to_dict(), run_key=self.run_key, settings=settings))
        except OSError as e:
            raise UsageError(f"cannot use the output folder {self.out}: {one_line(e)}") from None

    def _beat(self) -> None:
        self.claims.touch()
        with contextlib.suppress(OSError):
            os.utime(self.registration)

    def open(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.log = open(self.path, "a")
        self.heartbeat = Heartbeat(self._beat, max(0.5, self.timeout_s / 4)).start()

    def writer_live(self, record: dict) -> bool:
        """Whether the worker that wrote `record` is one of this run's (it finished after this
        worker started, or it still runs)."""
        if (record.get("finished") or 0) >= self.me.started:
            return True
        w = record.get("worker")
        return isinstance(w, str) and self._live(os.path.join(self.dir, "workers", f"{w}.json")) is not None

    def rounds(self, share: Sequence[Item], poll_s: Optional[float] = None) -> Iterator[list[Item]]:
        """The images to plan: the whole share, then, until no other worker holds one unfinished,
        those it holds (each round after a pause): a dead worker's claims go stale and are taken.
        An image whose record is finished is not waited for (its worker may have died before
        marking its claim)."""
        yield list(share)
        poll_s = min(5.0, max(0.2, self.timeout_s / 8)) if poll_s is None else poll_s
        while not self.stop:
            held = [it for it in share if self.claims.waiting(it.name) and self.state(it, full=False).kind not in ("done", "taken")]
            if not held:
                return
            time.sleep(poll_s)
            yield held

    # -- images ----------------------------------------------------------------------------------

    def state(self, it: Item, full: Optional[bool] = None) -> State:
        """The image's state; with --force, records of earlier runs count for nothing."""
        m = read_json(os.path.join(self.folder(it), RECORD))
        if m is not None and self.force and not self.writer_live(m):
            m = None
        return image_state(self.folder(it), it, m, self.verify if full is None else full)

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

    def record(self, it: Item, status: str, error: Optional[str] = None, metrics: Optional[dict] = None,
               repaired: Optional[str] = None) -> None:
        """The image's results row, appended to this worker's rows file at once."""
        row = {"index": it.index, "name": it.name, "image": it.image, "prompt": it.prompt, "status": status}
        if error:
            row["error"] = error
        if repaired:
            row["repaired"] = repaired
            self.repaired += 1
        if metrics:
            row.update({k: metrics[k] for k in ROW_METRICS if k in metrics})
            row["dir"] = self.folder(it)
            row["edits"] = [e.get("file") for e in metrics.get("edits", [])]
            if metrics.get("warnings"):
                row["warnings"] = metrics["warnings"]
        if self.nproc > 1:
            row["process"] = self.pid
        gen = (metrics or {}).get("generation", -1) if status == "skipped" else self.claims.generation(it.name)
        row.update(worker=self.me.id, epoch=self.epoch, generation=gen, time=time.time())
        self.rows[it.name] = row
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

    def close(self) -> None:
        """Rewrite this worker's rows file whole, give up unfinished claims, leave the workers."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.claims.release_all()
        if self.log is not None:
            with contextlib.suppress(OSError):  # a full disk: the rows are rewritten whole just below
                self.log.close()
            self.log = None
        try:
            write_jsonl(self.path, self.rows.values())
        except OSError as e:
            self.write_failed(e)
            print(f"could not write {self.path}: {one_line(e)}", file=sys.stderr)
        with contextlib.suppress(OSError):
            os.remove(self.registration)

    def _latest(self) -> dict[str, dict]:
        """Per image, the winning row of this run key and epoch (`row_rank`) over every worker's rows."""
        latest: dict[str, dict] = {}
        files = glob.glob(os.path.join(self.dir, "rows", f"{self.run_key}.{self.epoch}.*.jsonl"))
        for r in [r for path in files for r in read_jsonl(path)[0]] + list(self.rows.values()):
            name = r.get("name")
            if isinstance(name, str) and r.get("epoch") == self.epoch and (name not in latest or row_rank(r) >= row_rank(latest[name])):
                latest[name] = r
        return latest

    def _complete(self, rows: list[dict]) -> bool:
        """Whether this worker completes the run: nothing pending, no other worker registered,
        this epoch not completed by another; if so the epoch is recorded complete."""
        if any(r.get("status") == "pending" for r in rows) or completed_epoch(self.dir) >= self.epoch:
            return False
        if self._known_live(self._registrations()):
            return False
        write_json(os.path.join(self.dir, COMPLETE), {"epoch": self.epoch, "run_key": self.run_key, "by": self.me.id})
        return True

    @contextlib.contextmanager
    def merged(self, items: Sequence[Item]) -> Iterator[list[dict]]:
        """results.jsonl from every worker's rows of this run, in manifest order; the block (the
        report) runs while no other worker merges, `completes` telling it whether this worker
        completed the run; after it, a completed run's folder is pruned. Yields the rows."""
        os.makedirs(self.dir, exist_ok=True)
        with locked(os.path.join(self.dir, "merge.lock")):
            if completed_epoch(self.dir) > self.epoch:  # a later run has begun: its results are its own
                rows = read_jsonl(os.path.join(self.out, "results.jsonl"))[0]
                self.completes = False
                yield rows
                return
            latest = self._latest()
            rows = [
                dict(latest.get(it.name) or {"name": it.name, "image": it.image, "prompt": it.prompt, "status": "pending"}, index=it.index)
                for it in items
            ]
            try:
                write_jsonl(os.path.join(self.out, "results.jsonl"), rows)
                self.completes = self._complete(rows)
            except OSError as e:
                self.write_failed(e)
                print(f"could not write {self.out}/results.jsonl: {one_line(e)}", file=sys.stderr)
            yield rows
            if self.completes:
                prune(self.dir, self.run_key, self.epoch)


def completed_epoch(run_dir: str) -> int:
    """The last epoch of the run folder counted complete (-1: none)."""
    epoch = (read_json(os.path.join(run_dir, COMPLETE)) or {}).get("epoch")
    return epoch if isinstance(epoch, int) else -1


def prune(run_dir: str, run_key: str, epoch: int) -> None:
    """A completed run's books, pruned: claims, stages and registrations go (every image is
    finished, no worker runs); rows stay for this run key and epoch only (results.jsonl's)."""
    for sub in ("claims", "stage", "workers"):
        shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)
    keep = f"{run_key}.{epoch}."
    for path in glob.glob(os.path.join(run_dir, "rows", "*.jsonl")):
        if not os.path.basename(path).startswith(keep):
            with contextlib.suppress(OSError):
                os.remove(path)


class Check(NamedTuple):
    """What `check_folder` found: one line per damaged image, how many finished images it
    checked, and the finished images whose records list no checksums (written before they were)."""

    lines: list
    checked: int
    unrecorded: list


def check_folder(out: str) -> Check:
    """Check a run folder: every file a finished image's record lists, by size and SHA-256, and
    every image results.jsonl calls finished has a finished record. Records from before checksums
    are not damage: they are listed apart (`record_checksums` adds them)."""
    lines, checked, unrecorded = [], 0, []
    names = sorted(d for d in os.listdir(out) if not d.startswith(".") and os.path.isdir(os.path.join(out, d)))
    rows, _ = read_jsonl(os.path.join(out, "results.jsonl"))
    finished_rows = {r.get("name") for r in rows if r.get("status") in ("done", "skipped") and isinstance(r.get("name"), str)}
    for name in sorted(set(names) | finished_rows):
        m = read_json(os.path.join(out, name, RECORD))
        if m is None or m.get("status") != "done":
            if name in finished_rows:
                checked += 1
                lines.append(f"{name}: {RECORD} is missing or does not say done, but results.jsonl does")
            continue
        checked += 1
        files = m.get("files")
        if not isinstance(files, dict):
            unrecorded.append(name)
            continue
        bad = damage(os.path.join(out, name), files, True)
        if bad:
            lines.append(f"{name}: {bad}")
    return Check(lines, checked, unrecorded)


def _record_files(folder: str, m: dict) -> dict:
    """The files an image's record from before checksums speaks of, as they are now."""
    names = [INVERSION, INPUT, RECONSTRUCTION, "attention.png"]
    for e in m.get("edits") or []:
        if isinstance(e, dict) and isinstance(e.get("file"), str):
            names += [e["file"], "attention-" + e["file"]]
    return {n: file_record(os.path.join(folder, n)) for n in names if os.path.isfile(os.path.join(folder, n))}


def record_checksums(out: str, names: Sequence[str]) -> None:
    """Add the size and SHA-256 of their files as they are now to the records of `names` (finished
    images written before checksums were recorded): a migration, under the publish lock."""
    with locked(os.path.join(out, RUN_DIR, "publish.lock")):
        for name in names:
            folder = os.path.join(out, name)
            m = read_json(os.path.join(folder, RECORD))
            if m is not None and not isinstance(m.get("files"), dict):
                write_json(os.path.join(folder, RECORD), dict(m, files=_record_files(folder, m)))
