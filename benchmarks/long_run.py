"""Long runs of the command line (issue 29): resident memory, time per batch, compiles, live
executables and the final merge and report, over a few hundred toy images with varied edits.

    python benchmarks/long_run.py --images 200 --runs 2 --json long_run.json
    python benchmarks/long_run.py --images 16 --runs 1            # a quick look

The images are a toy PIE-Bench folder (`nti_jax.toy.pie_layout`: held-out shapes-world scenes
with colour, object and background edits, set up as PIE-Bench's Refine, or Reweight x2 plus
LocalBlend). Each run is a fresh process (`--child`) that runs `cli.main` in process on it with
`--cache-dir none` (every compile is a real one) and records, per batch (`Driver.run_batch`,
edits and files included): wall and CPU seconds, JAX's compiles (its monitoring events), the
process's resident memory (/proc/self/status) and XLA's live executables; a thread samples the
resident memory every `--sample-s` too. After the last batch: the time of `driver.summary` (the
merge of results.jsonl, the PIE-Bench layout and metrics, the report), with its parts.

Figures per run: the growth of resident memory after the last compiling batch (its peak over the
later batches minus its value at that batch's end), its slope over the full non-compiling
batches (MB per 100 images), and the median seconds of the last `--window` full non-compiling
batches over that of the first `--window` (wall and CPU); the median over the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Iterator, Optional

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

FLAGS = ["--steps", "10", "--inner-steps", "3", "--batch-size", "4", "--cache-dir", "none"]
TYPES = ("0", "1", "6", "8")


def rss_mb() -> float:
    """This process's resident memory (VmRSS), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def live_executables() -> Optional[int]:
    """XLA's live executables on the first device's client (None where the client cannot say)."""
    import jax

    try:
        return len(jax.devices()[0].client.live_executables())
    except Exception:  # noqa: BLE001 - an API of the client, not of JAX: absent in some versions
        return None


class Sampler:
    """A daemon thread appending (seconds since start, RSS MB) every `period_s`."""

    def __init__(self, period_s: float):
        self.period_s, self.t0, self.samples = period_s, time.perf_counter(), []
        self.done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.done.wait(self.period_s):
            self.samples.append((round(time.perf_counter() - self.t0, 2), round(rss_mb(), 1)))


@contextlib.contextmanager
def patched(owner, name: str, wrap: Callable) -> Iterator[None]:
    """`owner.name` replaced by `wrap(original)` inside the block."""
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def timer(phases: dict, key: str) -> Callable:
    """A wrapper adding each call's seconds to `phases[key]`."""

    def wrap(fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[key] = round(phases.get(key, 0.0) + time.perf_counter() - t0, 3)

        return timed

    return wrap


def batch_recorder(batches: list, compiles: Callable[[], int], t0: float) -> Callable:
    """A wrapper of `Driver.run_batch` appending one record per batch to `batches`."""

    def wrap(fn):
        def run_batch(self, batch):
            c0, w0, p0 = compiles(), time.perf_counter(), time.process_time()
            fn(self, batch)
            batches.append({"images": len(batch), "seconds": round(time.perf_counter() - w0, 3),
                            "cpu_seconds": round(time.process_time() - p0, 3), "compiles": compiles() - c0,
                            "rss_mb": round(rss_mb(), 1), "live_executables": live_executables(),
                            "done": self.log.counts["done"], "at": round(time.perf_counter() - t0, 2)})

        return run_batch

    return wrap


def child(data: str, out: str, json_path: str, sample_s: float) -> int:
    """One run of the command line in this process, measured; its record into `json_path`."""
    from nti_jax import testing
    from nti_jax.pie import bench, metrics
    from nti_jax.report import html
    from nti_jax.run import cli, driver, ledger

    sampler, batches, phases = Sampler(sample_s), [], {}
    with testing.compile_log() as log, contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        stack.enter_context(patched(driver.Driver, "run_batch", batch_recorder(batches, lambda: log.compiles, t0)))
        for owner, name, key in ((driver, "summary", "finish"), (ledger.Ledger, "_latest", "merge_read"),
                                 (html, "write_report", "report"), (bench, "write_pnp_layout", "pie_layout"),
                                 (metrics, "evaluate", "pie_metrics")):
            stack.enter_context(patched(owner, name, timer(phases, key)))
        code = cli.main(["--pie-bench", data, "--pie-types", ",".join(TYPES), "--out", out, *FLAGS])
        wall = time.perf_counter() - t0
    sampler.done.set()
    record = {"exit": code, "wall_seconds": round(wall, 2), "compiles": log.compiles, "batches": batches,
              "phases": phases, "rss_samples": sampler.samples, "rss_end_mb": round(rss_mb(), 1)}
    with open(json_path, "w") as f:
        json.dump(record, f)
    return code


def _median_of(xs: list[float]) -> Optional[float]:
    return round(statistics.median(xs), 3) if xs else None


def _slope_per_100(points: list[tuple[float, float]]) -> Optional[float]:
    """Least-squares slope of (images done, MB), times 100."""
    if len(points) < 3:
        return None
    mx, my = statistics.fmean(p[0] for p in points), statistics.fmean(p[1] for p in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return round(100 * sum((x - mx) * (y - my) for x, y in points) / den, 2) if den else None


def figures(run: dict, batch_size: int, window: int) -> dict:
    """The summary figures of one run (see the module docstring)."""
    b = run["batches"]
    compiling = [k for k, x in enumerate(b) if x["compiles"]]
    last = compiling[-1] if compiling else -1
    after = [x["rss_mb"] for x in b[last + 1 :]]
    base = b[last]["rss_mb"] if last >= 0 else b[0]["rss_mb"]
    steady = [x for x in b if not x["compiles"] and x["images"] == batch_size]
    w = max(1, min(window, len(steady) // 3))
    ratio = lambda key: (round(_median_of([x[key] for x in steady[-w:]]) / _median_of([x[key] for x in steady[:w]]), 3)
                         if len(steady) >= 2 else None)
    return {
        "images": sum(x["images"] for x in b), "done": b[-1]["done"] if b else 0, "batches": len(b),
        "compiling_batches": [k + 1 for k in compiling], "compiles": run["compiles"],
        "live_executables_end": b[-1]["live_executables"] if b else None,
        "rss_first_batch_mb": b[0]["rss_mb"], "rss_after_compiles_mb": base, "rss_end_mb": b[-1]["rss_mb"],
        "rss_peak_mb": max([s[1] for s in run["rss_samples"]] + [x["rss_mb"] for x in b]),
        "rss_growth_after_compiles_mb": round(max(after) - base, 1) if after else 0.0,
        "rss_slope_mb_per_100_images": _slope_per_100([(x["done"], x["rss_mb"]) for x in steady]),
        "window": w, "early_median_s": _median_of([x["seconds"] for x in steady[:w]]),
        "late_median_s": _median_of([x["seconds"] for x in steady[-w:]]), "late_over_early": ratio("seconds"),
        "late_over_early_cpu": ratio("cpu_seconds"), "wall_seconds": run["wall_seconds"], **{f"{k}_s": v for k, v in run["phases"].items()},
    }


ROWS = (("images", "images"), ("batches", "batches"), ("compiling batches", "compiling_batches"), ("compiles", "compiles"),
        ("live executables at the end", "live_executables_end"), ("RSS after batch 1 (MB)", "rss_first_batch_mb"),
        ("RSS after the last compiling batch (MB)", "rss_after_compiles_mb"), ("RSS at the end (MB)", "rss_end_mb"),
        ("RSS peak (MB)", "rss_peak_mb"), ("**RSS growth after the compiling batches (MB)**", "rss_growth_after_compiles_mb"),
        ("RSS slope, full non-compiling batches (MB / 100 images)", "rss_slope_mb_per_100_images"),
        ("median s/batch, first non-compiling", "early_median_s"), ("median s/batch, last non-compiling", "late_median_s"),
        ("**last / first (wall)**", "late_over_early"), ("last / first (CPU seconds)", "late_over_early_cpu"),
        ("final merge + metrics + report (s)", "finish_s"), ("of which: reading the rows (s)", "merge_read_s"),
        ("of which: PIE-Bench layout + metrics (s)", None), ("of which: report (s)", "report_s"), ("run wall time (s)", "wall_seconds"))


def _cell(figs: dict, key: Optional[str]):
    if key is None:  # the two PIE-Bench parts together
        return round(figs.get("pie_layout_s", 0.0) + figs.get("pie_metrics_s", 0.0), 3)
    v = figs.get(key)
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "none"
    return "-" if v is None else v


def table(per_run: list[dict]) -> str:
    """Markdown: one column per run and the median."""
    head = "| | " + " | ".join(f"run {k + 1}" for k in range(len(per_run))) + " | median |"
    lines = [head, "|" + "---|" * (len(per_run) + 2)]
    for label, key in ROWS:
        cells = [_cell(f, key) for f in per_run]
        nums = [c for c in cells if isinstance(c, (int, float)) and not isinstance(c, bool)]
        med = _median_of(nums) if len(nums) == len(cells) else ""
        lines.append(f"| {label} | " + " | ".join(str(c) for c in cells) + f" | {med} |")
    return "\n".join(lines)


def timeline(run: dict, points: int = 10) -> str:
    """Markdown: about `points` batches spread over the run (RSS, seconds, compiles)."""
    b = run["batches"]
    picks = sorted({round(k * (len(b) - 1) / max(1, points - 1)) for k in range(points)})
    lines = ["| batch | images done | s | CPU s | compiles | RSS MB | live executables |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {k + 1} | {b[k]['done']} | {b[k]['seconds']} | {b[k]['cpu_seconds']} | {b[k]['compiles']} | {b[k]['rss_mb']} | "
              f"{b[k]['live_executables']} |" for k in picks]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="toy images (a multiple of 4: four editing types)")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--window", type=int, default=10, help="full non-compiling batches at each end compared")
    p.add_argument("--sample-s", type=float, default=1.0, help="seconds between resident-memory samples")
    p.add_argument("--work", help="folder for the data and the runs (default: a temporary one)")
    p.add_argument("--json", help="write every run's record and figures here")
    p.add_argument("--child", nargs=3, metavar=("DATA", "OUT", "JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child, args.sample_s)
    from nti_jax.toy.pie_layout import build_toy_pie_bench

    work = args.work or tempfile.mkdtemp(prefix="nti-long-run-")
    data = build_toy_pie_bench(os.path.join(work, "data"), -(-args.images // len(TYPES)), seed=0, types=TYPES)
    runs = []
    for r in range(args.runs):
        out, rec = os.path.join(work, f"out{r}"), os.path.join(work, f"run{r}.json")
        with open(os.path.join(work, f"run{r}.log"), "w") as log:
            code = subprocess.call([sys.executable, __file__, "--child", data, out, rec, "--sample-s", str(args.sample_s)],
                                   stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            print(f"run {r + 1} exited {code}: see {log.name}", file=sys.stderr)
            return 1
        with open(rec) as f:
            runs.append(json.load(f))
    per_run = [figures(run, int(FLAGS[FLAGS.index("--batch-size") + 1]), args.window) for run in runs]
    print(f"nti-invert --pie-bench DATA --pie-types {','.join(TYPES)} {' '.join(FLAGS)}  ({args.images} toy images; work in {work})\n")
    print(table(per_run) + "\n\nrun 1 over time:\n\n" + timeline(runs[0]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": FLAGS, "images": args.images, "figures": per_run, "runs": runs}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
