"""The batch driver: images in batches through `ShardedInverter.invert`, reconstruction and edits on
every device, each image's files and results row through `runs.RunLog`.

Reruns skip finished images; an image that failed is retried; an image whose inversion was saved
but whose edits failed is only edited again. A failing image is recorded and the run goes on.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

from . import heatmaps, p2p
from .errors import PromptError, PromptTruncatedWarning
from .inversion import Inversion
from .io import load_image
from .manifest import Item
from .parallel import FileBarrier, ShardedInverter, host_share, per_device_batch
from .pipeline import Pipeline
from .runs import RunLog, add_reconstruction, edit_file, image_metrics, item_keys, one_line
from .settings import InvertSettings


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What the driver needs besides the items: the inversion settings and the run's options."""

    settings: InvertSettings
    model: str  # the folder or hub id, as recorded in metrics.json
    dtype: str = "float32"
    batch_size: int = 1  # images per device per batch
    force: bool = False
    step_progress: bool = False
    attention: bool = False  # a heat-map PNG per edit too (attention.png per image always)
    remat: str = "auto"  # the null-text gradient's memory mode (inversion.REMAT_MODES or auto)
    max_device_memory: Optional[float] = None  # GiB an inversion may use per device (None: the free memory)


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


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class Driver:
    """Runs this process's share of the items; `run()` returns the exit status."""

    def __init__(self, cfg: RunConfig, pipe: Pipeline, items: list[Item], inverter: ShardedInverter, log: RunLog, model_fp: list):
        self.cfg, self.pipe, self.items, self.inverter, self.log = cfg, pipe, items, inverter, log
        self.model_fp = model_fp
        self.per_device = 1
        self.total = 0
        self.step_progress = StepProgress() if cfg.step_progress and cfg.settings.method == "null-text" else None

    # -- one image ------------------------------------------------------------------------------

    def prepare(self, it: Item) -> None:
        """Load the image and check the prompts on the host (a failure here costs no device time)."""
        p = it.prompt
        if not isinstance(p, str) or not p.strip():
            raise PromptError(f"the source prompt must be a non-empty caption of the image, got {p!r}")
        cut = self.pipe.truncation(p)
        if cut is not None:  # recorded in metrics.json and results.jsonl instead of printed
            it.warnings.append(f"the prompt is longer than the model's {self.pipe.max_tokens} tokens; cut: {cut!r}")
        it.pixels = load_image(it.image, self.pipe.image_size, it.crop)
        it.controllers = [self.controller(it, e) for e in it.edits]

    @staticmethod
    def controller(it: Item, edit: dict):
        settings = {k: v for k, v in edit.items() if k != "prompt"}
        return p2p.controller_from_settings(it.prompt, [edit["prompt"]], settings)

    def run_edits(self, pipe: Pipeline, inv: Inversion, it: Item) -> list:
        """The item's edited images, one `edit` program per edit; their cross-attention maps become
        the image's heat maps (`it.heatmaps`: attention.png, and one per edit with --attention)."""
        out, maps = [], []
        for e, c in zip(it.edits, it.controllers):
            latents, m = p2p.edit_latents(pipe, inv, [e["prompt"]], controller=c)
            out.append(np.asarray(pipe.decode_latents(latents)))
            maps.append(np.asarray(m))
        first = maps[0][:1] if maps else p2p.attention_maps(pipe, inv)
        it.heatmaps = {"attention.png": heatmaps.attention_sheet(pipe, inv.prompts[:1], it.pixels[None], first)}
        if self.cfg.attention:
            for k, (e, images, m) in enumerate(zip(it.edits, out, maps)):
                sheet = heatmaps.attention_sheet(pipe, [inv.prompts[0], e["prompt"]], images, m)
                it.heatmaps["attention-" + edit_file(k, e)] = sheet
        return out

    def edit_one(self, it: Item, inv: Inversion) -> tuple[Optional[list], Optional[str], float]:
        """(edited images or None, error or None, seconds) for one inverted image."""
        bad = np.asarray(inv.nonfinite[0])
        if bad.any():
            first = int(np.argmax(bad))
            return None, f"non-finite loss or latents at {int(bad.sum())} of {bad.size} steps (first: step {first})", 0.0
        t = time.time()
        try:
            edits = [np.asarray(x) for x in self.run_edits(self.inverter.replica(self.pipe, inv), inv, it)]
            return edits, None, time.time() - t
        except Exception as e:  # noqa: BLE001 - recorded per image
            return None, one_line(e), time.time() - t

    def edit_batch(self, batch: list[Item], invs: list[Inversion]) -> list[tuple]:
        """`edit_one` for every image; with several devices, one thread per device."""
        jobs = list(zip(batch, invs))
        if self.inverter.num_devices == 1 or not any(it.edits for it in batch):
            return [self.edit_one(it, inv) for it, inv in jobs]
        devices = [inv.x_T.devices().pop() for inv in invs]

        def device_jobs(device):
            return [(k, self.edit_one(it, inv)) for k, (it, inv) in enumerate(jobs) if devices[k] == device]

        with ThreadPoolExecutor(max_workers=self.inverter.num_devices, thread_name_prefix="nti-edit") as pool:
            futures = [pool.submit(device_jobs, d) for d in dict.fromkeys(devices)]
            done = dict(kv for f in futures for kv in f.result())
        return [done[k] for k in range(len(jobs))]

    def redo_edits(self, it: Item, prev: dict) -> None:
        """The inversion is on disk from an earlier run; only the edits are (re)made."""
        t1 = time.time()
        metrics = dict(prev, key=it.key, status="running", edits=[])
        metrics.pop("error", None)
        error = None
        try:
            inv = Inversion.load(os.path.join(self.log.folder(it), "inversion.safetensors"))
            it.controllers = [self.controller(it, e) for e in it.edits]
            it.pixels = load_image(os.path.join(self.log.folder(it), "input.png"), self.pipe.image_size)
            metrics["edits"] = self.log.save_edits(it, self.run_edits(self.pipe, inv, it))
            self.log.save_heatmaps(it)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            error = self.log.write_failed(e)  # a full disk also stops the run
        self.log.close_image(it, metrics, error, prev.get("inversion_seconds", 0.0), t1)

    # -- a batch --------------------------------------------------------------------------------

    def run_batch(self, batch: list[Item]) -> None:
        import jax

        t0 = time.time()
        step_bar = self._step_bar()
        try:
            with warnings.catch_warnings():  # long prompts: recorded per image by `prepare`
                warnings.simplefilter("ignore", PromptTruncatedWarning)
                invs = self.inverter.invert(self.pipe, [it.pixels for it in batch], [it.prompt for it in batch], self.cfg.settings, self.step_progress, remat=self.cfg.remat,
                                             max_device_memory=self.cfg.max_device_memory)
            recon = self.inverter.reconstruct(self.pipe, invs)
            jax.block_until_ready(recon)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # the whole batch failed (e.g. out of memory): record, go on
            for it in batch:
                self.log.record(it, "failed", f"batch failed: {one_line(e)}")
            return
        finally:
            if step_bar is not None:
                self.step_progress.bar = None
                step_bar.close()
        t_inv = time.time() - t0
        for it, inv, (edits, error, edit_seconds), rec in zip(batch, invs, self.edit_batch(batch, invs), recon):
            t1 = time.time() - edit_seconds
            metrics = image_metrics(it, inv, self.cfg, t_inv / len(batch))
            if not add_reconstruction(metrics, it.pixels, inv, *rec) and error is None:
                error = "the reconstruction is not finite"
            self.log.finish(it, inv, np.asarray(rec[0]) if metrics["psnr"] is not None else None, edits, error, metrics, t1)
        self._batch_line(len(batch), t_inv)

    def _step_bar(self):
        if self.step_progress is None:
            return None
        from tqdm import tqdm

        bar = tqdm(total=self.cfg.settings.num_steps, desc="  steps", unit="step", leave=False, dynamic_ncols=True, disable=None)
        self.step_progress.bar = bar
        return bar

    def _batch_line(self, n: int, seconds: float) -> None:
        bar = self.log.bar
        if bar is not None and bar.disable:  # no terminal: one line per batch for the logs
            c = self.log.counts
            print(
                f"[{c['done'] + c['skipped'] + c['failed']}/{self.total}] batch of {n} in {seconds:.1f} s; "
                f"done {c['done']}, skipped {c['skipped']}, failed {c['failed']}",
                file=sys.stderr, flush=True,
            )

    # -- the run --------------------------------------------------------------------------------

    def triage(self, share: list[Item]) -> tuple[list[Item], list[tuple[Item, dict]]]:
        """Images to invert, and images whose saved inversion only needs its edits (re)made;
        finished images are recorded as skipped."""
        new, reuse = [], []
        for it in share:
            it.inversion_key, it.key = item_keys(it, self.cfg.settings, self.cfg.dtype, self.model_fp)
            st, prev = self.log.state(it)
            if st == "done":
                self.log.record(it, "skipped", metrics=prev)
            elif st == "taken":
                self.log.record(it, "failed", self.log.taken(it, prev))
            elif st == "reuse":
                reuse.append((it, prev))
            else:
                new.append(it)
        return new, reuse

    def loop(self, new: list[Item], reuse: list[tuple[Item, dict]]) -> None:
        """Every image in batches; stops (the rest stay "pending") once a write found the disk full."""
        for it, prev in reuse:
            if self.log.stop:
                return
            self.redo_edits(it, prev)
        cap = self.per_device * self.inverter.num_devices
        batch: list[Item] = []
        for it in new:
            if self.log.stop:
                return
            try:
                self.prepare(it)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                self.log.record(it, "failed", one_line(e))
                continue
            batch.append(it)
            if len(batch) == cap:
                self.run_batch(batch)
                batch = []
        if batch and not self.log.stop:
            self.run_batch(batch)

    def run(self, barrier: Optional[FileBarrier] = None, on_done: Optional[Callable[[], None]] = None) -> int:
        from tqdm import tqdm

        log = self.log
        share = [self.items[i] for i in host_share(len(self.items), log.pid, log.nproc)]
        self.total = len(share)
        log.open()
        new, reuse = self.triage(share)
        self.per_device = per_device_batch(self.cfg.batch_size, len(new), self.inverter.num_devices)
        desc = "images" if log.nproc == 1 else f"images [process {log.pid}/{log.nproc}]"
        log.bar = tqdm(total=len(share), desc=desc, unit="img", dynamic_ncols=True, disable=None)
        log.bar.update(log.counts["skipped"])
        t0 = time.time()
        interrupted = False
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if threading.current_thread() is threading.main_thread() else None
        try:
            self.loop(new, reuse)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            elapsed = time.time() - t0
            log.bar.close()
            log.bar = None
            rows = log.close(share)
        return summary(self.log, rows, elapsed, interrupted, barrier, on_done)


def summary(log: RunLog, rows: list[dict], elapsed: float, interrupted: bool, barrier, on_done) -> int:
    """After this process's share: meet the other processes, merge (process 0), finish the run's
    files (`on_done`), print the summary; the exit status."""
    results = os.path.join(log.out, "results.jsonl")
    merge_error = None
    if log.nproc > 1 and not interrupted:
        try:
            barrier.wait("results")
            if log.pid == 0:
                rows = log.merge()
        except Exception as e:  # another process died: this one's rows stay in its own file
            merge_error = one_line(e)
    if on_done is not None and (log.nproc == 1 or log.pid == 0) and merge_error is None:
        try:
            on_done()
        except OSError as e:  # run.json's finish time, the report: the images are written already
            print(f"could not finish the run's files: {one_line(e)}", file=sys.stderr)
    count = lambda s: sum(r.get("status") == s for r in rows)
    done, skipped, failed, pending = count("done"), count("skipped"), count("failed"), count("pending")
    rate = log.counts["done"] / elapsed if elapsed > 0 else 0.0
    scope = "" if log.nproc == 1 else (" (all processes)" if log.pid == 0 else f" (process {log.pid})")
    line = f"{done} done, {skipped} skipped, {failed} failed"
    if pending:
        line += f", {pending} not reached"
    line += f"{scope}; {elapsed:.1f} s, {rate:.3g} images/s"
    if log.nproc > 1:
        line += f" on process {log.pid}"
    print(("interrupted: " if interrupted else "") + line)
    if log.stop:
        print(f"stopped: {log.stop}; every later image would fail the same way: make room and rerun (finished images are kept)", file=sys.stderr)
    if merge_error:
        print(f"could not merge the processes' results ({merge_error}); see {log.out}/results.<process>.jsonl", file=sys.stderr)
    elif log.nproc == 1 or log.pid == 0:
        print(f"outputs in {log.out} (per image: <name>/; index: {results})")
    else:
        print(f"outputs in {log.out}; process 0 merges {results}")
    if interrupted:
        return 130
    return 1 if failed or merge_error or log.stop else 0
