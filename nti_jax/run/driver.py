"""The batch driver: images in batches through `ShardedInverter`: inversion, reconstruction and
edits on the devices that hold each call's images, its arrays brought to the host once; each image
claimed, its files written and its row kept through `ledger.Ledger`.

Reruns skip finished images whose files match their record; an image that failed, or whose files
are damaged, is redone; an image whose inversion was saved intact but whose edits failed or were
damaged is only edited again. A failing image is recorded and the run goes on. Several workers on
one folder each take the images no one holds.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from typing import Callable, Optional

import numpy as np

from nti_jax.errors import DeviceMemoryError, NtiError, PromptTruncatedWarning, one_line
from nti_jax.core.inversion import Inversion
from nti_jax.core.null_text import check_source_prompt
from nti_jax.io import load_image
from nti_jax.run.ledger import Ledger, State
from nti_jax.run.manifest import Item
from nti_jax.core.parallel import Batch, ShardedInverter, per_device_batch
from nti_jax.run.hosts import FileBarrier, host_share, kernels
from nti_jax.loading.pipeline import Pipeline
from nti_jax.records import damage
from nti_jax.run.config import RunConfig
from nti_jax.run.console import Interrupts, StepProgress, Throughput, batch_line
from nti_jax.run.edits import Work, controller, edit_images
from nti_jax.run.keys import add_reconstruction, image_metrics
from nti_jax.run.writer import INPUT, INVERSION, RECONSTRUCTION, ImageWriter, plan_record


class Driver:
    """Runs this process's share of the items; `run()` returns the exit status."""

    def __init__(self, cfg: RunConfig, pipe: Pipeline, items: list[Item], inverter: ShardedInverter, log: Ledger):
        self.cfg, self.pipe, self.items, self.inverter, self.log = cfg, pipe, items, inverter, log
        self.per_device = 1
        self.total = 0
        self.interrupts = Interrupts()
        self.speed = Throughput()  # images per hour: the batch lines, run.json
        self.step_progress = StepProgress() if cfg.step_progress and cfg.settings.method == "null-text" else None

    # -- one image ------------------------------------------------------------------------------

    def prepare(self, it: Item, repaired: Optional[str]) -> Work:
        """Load the image and check the prompts on the host (a failure here costs no device time)."""
        p = it.prompt
        check_source_prompt(p)
        job = Work(it, repaired)
        cut = self.pipe.truncation(p)
        if cut is not None:  # recorded in metrics.json and results.jsonl instead of printed
            job.warnings.append(f"the prompt is longer than the model's {self.pipe.max_tokens} tokens; cut: {cut!r}")
        job.pixels = load_image(it.image, self.pipe.image_size, it.crop)
        job.controllers = [controller(it, e) for e in it.edits]
        return job

    def redo_edits(self, it: Item, st: State) -> None:
        """The inversion is on disk, intact, from an earlier run; the rest is (re)made."""
        t1 = time.time()
        prev = st.prev
        files = prev.get("files") if isinstance(prev.get("files"), dict) else {}
        metrics = dict(prev, key=it.key, status="running", edits=[])
        for k in ("error", "files"):
            metrics.pop(k, None)
        w = self.log.writer(it, {n: files[n] for n in (INVERSION, INPUT, RECONSTRUCTION) if n in files})
        job = Work(it, st.damage)
        error = None
        try:
            inv = Inversion.load(os.path.join(w.folder, INVERSION))
            job.controllers = [controller(it, e) for e in it.edits]
            job.pixels = load_image(os.path.join(w.folder, INPUT), self.pipe.image_size)
            recon = files.get(RECONSTRUCTION)
            if recon is not None and damage(w.folder, {RECONSTRUCTION: recon}, self.log.verify):
                w.png(RECONSTRUCTION, np.asarray(self.inverter.reconstruct(self.pipe, inv).images[0]))
            ((edits, edit_error),) = edit_images(self.pipe, self.inverter, self.cfg.attention, inv, [job], [inv])
            if edit_error is not None:
                raise NtiError(edit_error)
            metrics["edits"] = w.edits(it.edits, edits)
            w.heatmaps(job.heatmaps)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            error = self.log.write_failed(e)  # a full disk also stops the run
        self.close_image(job, w, metrics, error, prev.get("inversion_seconds", 0.0), t1)

    def finish(self, job: Work, inv, recon_img, edits, error: Optional[str], metrics: dict, t1: float) -> None:
        """Write the image's files, its record last, and its row. A finite inversion (`recon_img`
        given) is kept even if its edits failed."""
        it = job.item
        w = self.log.writer(it)
        try:
            os.makedirs(w.folder, exist_ok=True)
            metrics["edits"] = []
            w.png(INPUT, job.pixels)
            if recon_img is not None:
                w.inversion(inv)
                metrics["inversion_key"] = it.inversion_key
                w.png(RECONSTRUCTION, recon_img)
                if error is None and edits:
                    metrics["edits"] = w.edits(it.edits, edits)
                if error is None:
                    w.heatmaps(job.heatmaps)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            error = error or self.log.write_failed(e)
        self.close_image(job, w, metrics, error, metrics["inversion_seconds"], t1)

    def close_image(self, job: Work, w: ImageWriter, metrics: dict, error: Optional[str], inv_seconds: float, t1: float) -> None:
        """Timings and status into the image's record (unless another worker took the image over
        meanwhile: the record is then theirs), then its row."""
        metrics["edit_seconds"] = round(time.time() - t1, 4)
        metrics["seconds"] = round(inv_seconds + metrics["edit_seconds"], 4)
        metrics["status"] = "failed" if error else "done"
        if error:
            metrics["error"] = error
        metrics.update(worker=self.log.me.id, finished=time.time())
        it = job.item
        with self.interrupts.held():
            try:
                if not w.publish(metrics, lambda: self.log.claims.mine(it.name)):  # fenced: see writer.py
                    self._say(f"dropped: {it.label}: another worker took it over (no heartbeat for --claim-timeout)")
                    return
            except OSError as e:
                error, metrics["status"] = error or self.log.write_failed(e), "failed"
            self.log.claims.finish(it.name)
            self.log.record(it, metrics["status"], error, metrics, job.repaired)

    def fail(self, it: Item, error: str) -> None:
        """An image that failed before it had files: its row, and its claim closed."""
        self.log.claims.finish(it.name)
        self.log.record(it, "failed", error)

    def _say(self, line: str) -> None:
        (print if self.log.bar is None else self.log.bar.write)(line, file=sys.stderr)

    # -- a batch --------------------------------------------------------------------------------

    def run_batch(self, batch: list[Work]) -> None:
        """Invert and reconstruct the batch on the devices; then, per call of the program, its
        edits there, its arrays to the host once, and every image's files and row. A call that
        runs out of device memory runs again with fewer images (`ShardedInverter`); if one image
        per device does not fit, the calls finished before it are kept and the rest fail."""
        import jax

        t0, retries, error = time.time(), self.inverter.oom_retries, None
        try:
            steps = self.step_progress.showing(self.cfg.settings.num_steps) if self.step_progress else contextlib.nullcontext()
            with warnings.catch_warnings(), steps:  # long prompts: recorded per image by `prepare`
                warnings.simplefilter("ignore", PromptTruncatedWarning)
                try:
                    calls = self.inverter.invert(self.pipe, [it.pixels for it in batch], [it.prompt for it in batch], self.cfg.settings, self.step_progress,
                                                  remat=self.cfg.remat, max_device_memory=self.cfg.max_device_memory)
                except DeviceMemoryError as e:
                    calls, error = e.done, one_line(e)
            recons = jax.block_until_ready([self.inverter.reconstruct(self.pipe, call.inv) for call in calls])
        except KeyboardInterrupt:
            raise
        except Exception as e:  # the whole batch failed: record, go on
            for it in batch:
                self.fail(it.item, f"batch failed: {one_line(e)}")
            return
        t_inv = time.time() - t0
        start = 0
        for call, recon in zip(calls, recons):
            jobs, start = batch[start : start + call.n], start + call.n
            self.finish_call(jobs, call, recon, t_inv / len(batch), retries)
        for it in batch[start:]:
            self.fail(it.item, error)
        self._batch_line(len(batch), time.time() - t0)

    def finish_call(self, jobs: list[Work], call: Batch, recon: tuple, inv_seconds: float, retries: int) -> None:
        """The edits of one call's images, then their files and rows (`retries`: the inverter's
        out-of-memory retries before the batch began; the record counts those since)."""
        t1 = time.time()
        invs = call.host()
        images, latents, vae = (np.asarray(a)[: call.n] for a in recon)
        results = edit_images(self.pipe, self.inverter, self.cfg.attention, call.inv, jobs, invs)
        edit_seconds = (time.time() - t1) / len(jobs)
        for k, (it, inv, (edits, error)) in enumerate(zip(jobs, invs, results)):
            metrics = image_metrics(it.item, inv, self.cfg, inv_seconds, it.warnings)
            metrics["plan"] = plan_record(call.remat, call.inv.num_images // self.inverter.num_devices, self.inverter.num_devices,
                                          kernels(self.inverter.devices[0].platform), self.inverter.oom_retries - retries)
            if not add_reconstruction(metrics, it.pixels, inv, images[k], latents[k], vae[k]) and error is None:
                error = "the reconstruction is not finite"
            self.finish(it, inv, images[k] if metrics["psnr"] is not None else None, edits, error, metrics, time.time() - edit_seconds)

    def _batch_line(self, n: int, seconds: float) -> None:
        per_hour = self.speed.batch(self.log.counts["done"])
        if self.log.bar is not None and self.log.bar.disable:  # no terminal: one line per batch for the logs
            print(batch_line(self.log.counts, self.total, n, seconds, per_hour), file=sys.stderr, flush=True)

    # -- the run --------------------------------------------------------------------------------

    def plan(self, it: Item) -> Optional[State]:
        """What this worker does with the image, claimed; None when it does nothing: the image is
        finished (a row "skipped" if an earlier run finished it), fails, or another worker has it."""
        st = self.log.state(it)
        if st.kind == "done" or st.kind == "taken":
            return self._settled(it, st)
        try:
            if not self.log.claims.acquire(it.name):
                return None
        except OSError as e:  # the claim cannot be written (a full disk also stops the run)
            self.log.record(it, "failed", self.log.write_failed(e))
            return None
        st = self.log.state(it)  # another worker may have finished it since
        if st.kind in ("done", "taken"):
            self.log.claims.release(it.name)
            return self._settled(it, st)
        if st.damage:
            self._say(f"redoing {it.label}: {st.damage}")
        return st

    def _settled(self, it: Item, st: State) -> None:
        if st.kind == "done" and not self.log.writer_live(st.prev):
            self.log.record(it, "skipped", metrics=st.prev)
        elif st.kind == "taken":
            self.log.record(it, "failed", self.log.taken(it, st.prev))
        return None

    def loop(self, share: list[Item]) -> None:
        """Every image this worker can claim, in rounds until no other worker holds one (`Ledger.rounds`)."""
        for todo in self.log.rounds(share):
            self._pass(todo)

    def _pass(self, share: list[Item]) -> None:
        """Every image of `share` this worker can claim, in batches; stops (the rest stay
        "pending") once a write found the disk full."""
        cap = self.per_device * self.inverter.num_devices
        batch: list[Work] = []
        for it in share:
            if self.log.stop:
                return
            st = self.plan(it)
            if st is None:
                continue
            if st.kind == "reuse":
                self.redo_edits(it, st)
                continue
            try:
                batch.append(self.prepare(it, st.damage))
            except KeyboardInterrupt:
                raise
            except Exception as e:
                self.fail(it, one_line(e))
                continue
            if len(batch) == cap:
                self.run_batch(batch)
                batch = []
        if batch and not self.log.stop:
            self.run_batch(batch)

    def run(self, barrier: Optional[FileBarrier] = None, on_done: Optional[Callable[[list[dict]], None]] = None) -> int:
        """This worker's part of the run, then results.jsonl merged and `on_done(rows)` (the
        report) while no other worker merges; the exit status."""
        from tqdm import tqdm

        log = self.log
        share = [self.items[i] for i in host_share(len(self.items), log.pid, log.nproc)]
        self.total = len(share)
        log.open()
        todo = sum(log.state(it, full=False).kind not in ("done", "taken") for it in share)
        self.per_device = per_device_batch(self.cfg.batch_size, todo, self.inverter.num_devices)
        desc = "images" if log.nproc == 1 else f"images [process {log.pid}/{log.nproc}]"
        log.bar = tqdm(total=len(share), desc=desc, unit="img", dynamic_ncols=True, disable=None)
        self.speed.start()
        interrupted = False
        try:
            with self.interrupts.installed():
                self.loop(share)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            elapsed = self.speed.stop()
            log.bar.close()
            log.bar = None
            log.close()
        return summary(self.log, self.items, elapsed, interrupted, barrier, on_done)


def summary(log: Ledger, items: list[Item], elapsed: float, interrupted: bool, barrier, on_done) -> int:
    """After this worker's part: meet the other processes of a multi-host run, merge results.jsonl
    and finish the run's files (`on_done`) while no other worker merges, print the summary; the
    exit status."""
    results = os.path.join(log.out, "results.jsonl")
    meet_error = None
    if log.nproc > 1 and not interrupted:
        try:
            barrier.wait("results")
        except Exception as e:  # another process died: the merge below has what it wrote
            meet_error = one_line(e)
    with log.merged(items) as rows:
        if on_done is not None and not interrupted:
            try:
                on_done(rows)
            except OSError as e:  # run.json's finish time, the report: the images are written already
                print(f"could not finish the run's files: {one_line(e)}", file=sys.stderr)
    count = lambda s: sum(r.get("status") == s for r in rows)
    done, skipped, failed, pending = count("done"), count("skipped"), count("failed"), count("pending")
    others = sum(r.get("worker") != log.me.id and r.get("epoch") == log.epoch for r in rows if r.get("status") != "pending")
    rate = log.counts["done"] / elapsed if elapsed > 0 else 0.0
    line = f"{done} done, {skipped} skipped, {failed} failed"
    if log.repaired:
        line += f" ({log.repaired} redone: their files were damaged)"
    if pending:
        line += f", {pending} not reached"
    if log.nproc > 1:
        line += " (all processes)"
    elif others:
        line += f" ({others} by other workers)"
    line += f"; {elapsed:.1f} s, {rate:.3g} images/s"
    if log.nproc > 1:
        line += f" on process {log.pid}"
    print(("interrupted: " if interrupted else "") + line)
    if log.stop:
        print(f"stopped: {log.stop}; every later image would fail the same way: make room and rerun (finished images are kept)", file=sys.stderr)
    if meet_error:
        print(f"could not wait for the other processes ({meet_error}); {results} has what they wrote so far", file=sys.stderr)
    print(f"outputs in {log.out} (per image: <name>/; index: {results})")
    if interrupted:
        return 130
    return 1 if failed or meet_error or log.stop else 0
