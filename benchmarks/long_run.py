"""Long runs of the command line (issue 29): resident memory, time per batch, compiles, live
executables and the final merge and report, over a few hundred toy images with varied edits.

    python benchmarks/long_run.py --images 200 --runs 2 --json long_run.json
    python benchmarks/long_run.py --images 200 --runs 2 --edits varied
    python benchmarks/long_run.py --images 16 --runs 1            # a quick look

The images are a toy PIE-Bench folder (`nti_jax.toy.pie_layout`: held-out shapes-world scenes
with colour, object and background edits, set up as PIE-Bench's Refine, or Reweight x2 plus
LocalBlend; every edit is one program shape), or with `--edits varied` a manifest of held-out
scenes whose edits have five program shapes (Replace, Replace + LocalBlend, Refine, Reweight,
plain guidance), so the edit programs of each shape and group size are compiled as they first
occur over the run. Each run is a fresh process (`--child`) that runs `cli.main` in process on
it with `--cache-dir none` (every compile is a real one) and records, per batch (`Recorder`: the
batch's cycle from the previous batch's end, its images' claims, records and loading included,
then `Driver.run_batch`, edits and files included): wall and CPU seconds and their parts, the
cores other processes kept busy meanwhile (the machine's load, from /proc/stat), JAX's compiles
(its monitoring events), the process's resident memory (/proc/self/status), XLA's live
executables and a fixed XLA probe's seconds; a thread samples the resident memory every
`--sample-s` too. After the last batch: the time of `driver.summary` (the merge of
results.jsonl, the PIE-Bench layout and metrics, the report), with its parts.

Figures per run: the growth of resident memory after the last compiling batch (its peak over the
later batches minus its value at that batch's end), its slope over the last half of those later
batches (MB per 100 images: the allocator's first steps aside), and the median seconds of the last `--window` full non-compiling
batches over that of the first `--window` (wall and CPU; and, for the machine's own drift, of a
fixed XLA probe timed after each batch); the median over the runs.
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
VARIED_SEED = 2_100_500_000  # held-out shapes scenes (past the toy PIE-Bench's seeds)


def _edits(scene, new: str) -> list[dict]:
    """The `--edits varied` kinds of one scene: five controllers of different program shapes."""
    swap = f"a {new} {scene.shape} on a {scene.background} background"
    return [{"prompt": swap, "kind": "replace"},
            {"prompt": swap, "kind": "replace", "blend_words": [[scene.shape], [scene.shape]]},
            {"prompt": swap, "kind": "refine", "cross_replace_steps": 0.4, "self_replace_steps": 0.6},
            {"prompt": scene.caption, "equalizer": {scene.color: 2.0}},
            {"prompt": swap, "kind": "replace", "guidance": "plain"}]


def varied_manifest(folder: str, n: int, seed: int = 0) -> str:
    """`n` held-out shapes scenes, each with one edit drawn from `_edits` (colour swaps by Replace,
    Replace + LocalBlend, Refine, plain guidance; Reweight x2 of the colour): edit programs of
    five keys, in groups of 1 to 4 per batch. Returns the manifest's path."""
    import numpy as np
    from PIL import Image

    from nti_jax.toy import shapes

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    path = os.path.join(folder, "manifest.jsonl")
    with open(path, "w") as f:
        for k in range(n):
            scene = shapes.render(VARIED_SEED + k, 64)
            Image.fromarray(scene.image).save(os.path.join(folder, f"img{k:04d}.png"))
            new = str(rng.choice([c for c in shapes.COLOR_NAMES if c not in (scene.color, scene.background)]))
            edit = _edits(scene, new)[int(rng.integers(5))]
            f.write(json.dumps({"image": f"img{k:04d}.png", "prompt": scene.caption, "edits": [edit]}) + "\n")
    return path


def inputs(kind: str, work: str, images: int) -> list[str]:
    """The command line's inputs for `--edits` `kind` ("pie" or "varied"), built under `work`."""
    if kind == "varied":
        return ["--manifest", varied_manifest(os.path.join(work, "data"), images)]
    from nti_jax.toy.pie_layout import build_toy_pie_bench

    data = build_toy_pie_bench(os.path.join(work, "data"), -(-images // len(TYPES)), seed=0, types=TYPES)
    return ["--pie-bench", data, "--pie-types", ",".join(TYPES)]


def rss_mb() -> float:
    """This process's resident memory (VmRSS), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds every process of the machine has used, of which this process's), from /proc:
    their difference over a batch is the other jobs' load on the cores."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    with open("/proc/self/stat") as f:
        utime, stime = map(int, f.read().rsplit(")", 1)[1].split()[11:13])
    return (user + nice + system + irq + softirq + steal) / tick, (utime + stime) / tick


def live_executables() -> Optional[int]:
    """XLA's live executables on the first device's client (None where the client cannot say)."""
    import jax

    try:
        return len(jax.devices()[0].client.live_executables())
    except Exception:  # noqa: BLE001 - an API of the client, not of JAX: absent in some versions
        return None


class Probe:
    """A fixed XLA computation (about 0.2 s on 2 cores), timed after each batch: the machine's
    speed then (other jobs on the cores slow it as they slow the run). Compiled at construction."""

    def __init__(self, n: int = 384, steps: int = 120):
        import jax
        import jax.numpy as jnp

        self.f = jax.jit(lambda x: jax.lax.fori_loop(0, steps, lambda i, y: jnp.tanh(y @ x), x))
        self.x = jnp.full((n, n), 1.0 / n, jnp.float32)
        self.f(self.x).block_until_ready()

    def seconds(self) -> float:
        t0 = time.perf_counter()
        self.f(self.x).block_until_ready()
        return round(time.perf_counter() - t0, 4)


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


class Recorder:
    """Wrappers of `Driver.loop`, `run_batch` and `finish_call` recording one entry per batch in
    `batches`: its cycle from the previous batch's end (claims, records and image loading of its
    images, then `run_batch`), in wall and CPU seconds, with its parts."""

    def __init__(self, compiles: Callable[[], int], probe: Probe):
        self.compiles, self.probe, self.batches, self.t0 = compiles, probe, [], time.perf_counter()
        self.files = 0.0
        self.mark()

    def mark(self) -> None:
        self.c0, self.w0, self.p0, self.busy0 = self.compiles(), time.perf_counter(), time.process_time(), busy_seconds()

    def loop(self, fn):
        def loop(driver, share):
            self.mark()
            return fn(driver, share)

        return loop

    def finish_call(self, fn):
        def finish_call(driver, *a, **kw):
            t = time.perf_counter()
            try:
                return fn(driver, *a, **kw)
            finally:
                self.files += time.perf_counter() - t

        return finish_call

    def run_batch(self, fn):
        def run_batch(driver, batch):
            t, self.files = time.perf_counter(), 0.0
            fn(driver, batch)
            self.batches.append(self._entry(driver, len(batch), time.perf_counter() - t))
            self.mark()

        return run_batch

    def _entry(self, driver, images: int, batch_s: float) -> dict:
        (all1, own1), wall = busy_seconds(), time.perf_counter() - self.w0
        return {"images": images, "seconds": round(wall, 3), "cpu_seconds": round(time.process_time() - self.p0, 3),
                "before_batch_s": round(wall - batch_s, 3), "edits_files_s": round(self.files, 3),
                "other_cores": round(((all1 - self.busy0[0]) - (own1 - self.busy0[1])) / wall, 2),
                "compiles": self.compiles() - self.c0, "rss_mb": round(rss_mb(), 1), "live_executables": live_executables(),
                "done": driver.log.counts["done"], "at": round(time.perf_counter() - self.t0, 2), "probe_s": self.probe.seconds()}


def child(data: list[str], out: str, json_path: str, sample_s: float) -> int:
    """One run of the command line in this process, measured; its record into `json_path`."""
    from nti_jax import testing
    from nti_jax.pie import bench, metrics
    from nti_jax.report import html
    from nti_jax.run import cli, driver, ledger

    sampler, phases, probe = Sampler(sample_s), {}, Probe()
    with testing.compile_log() as log, contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        rec = Recorder(lambda: log.compiles, probe)
        for name in ("loop", "run_batch", "finish_call"):
            stack.enter_context(patched(driver.Driver, name, getattr(rec, name)))
        for owner, name, key in ((driver, "summary", "finish"), (ledger.Ledger, "_latest", "merge_read"),
                                 (html, "write_report", "report"), (bench, "write_pnp_layout", "pie_layout"),
                                 (metrics, "evaluate", "pie_metrics")):
            stack.enter_context(patched(owner, name, timer(phases, key)))
        code = cli.main([*data, "--out", out, *FLAGS])
        wall = time.perf_counter() - t0
    sampler.done.set()
    record = {"exit": code, "wall_seconds": round(wall, 2), "compiles": log.compiles, "batches": rec.batches,
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
    later = [x for x in b[last + 1 :] if x["images"] == batch_size]
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
        "rss_slope_mb_per_100_images": _slope_per_100([(x["done"], x["rss_mb"]) for x in later[len(later) // 2 :]]),
        "window": w, "early_median_s": _median_of([x["seconds"] for x in steady[:w]]),
        "late_median_s": _median_of([x["seconds"] for x in steady[-w:]]), "late_over_early": ratio("seconds"),
        "late_over_early_cpu": ratio("cpu_seconds"), "probe_late_over_early": ratio("probe_s"),
        "other_cores_early": _median_of([x.get("other_cores", 0.0) for x in steady[:w]]),
        "other_cores_late": _median_of([x.get("other_cores", 0.0) for x in steady[-w:]]), "wall_seconds": run["wall_seconds"], **{f"{k}_s": v for k, v in run["phases"].items()},
    }


ROWS = (("images", "images"), ("batches", "batches"), ("compiling batches", "compiling_batches"), ("compiles", "compiles"),
        ("live executables at the end", "live_executables_end"), ("RSS after batch 1 (MB)", "rss_first_batch_mb"),
        ("RSS after the last compiling batch (MB)", "rss_after_compiles_mb"), ("RSS at the end (MB)", "rss_end_mb"),
        ("RSS peak (MB)", "rss_peak_mb"), ("**RSS growth after the compiling batches (MB)**", "rss_growth_after_compiles_mb"),
        ("RSS slope, last half of the batches after the last compiling one (MB / 100 images)", "rss_slope_mb_per_100_images"),
        ("median s/batch, first non-compiling", "early_median_s"), ("median s/batch, last non-compiling", "late_median_s"),
        ("**last / first (wall)**", "late_over_early"), ("last / first (CPU seconds)", "late_over_early_cpu"),
        ("a fixed XLA probe after each batch: last / first", "probe_late_over_early"),
        ("cores busy with other jobs, first / last batches (median)", "other_cores"),
        ("final merge + metrics + report (s)", "finish_s"), ("of which: reading the rows (s)", "merge_read_s"),
        ("of which: PIE-Bench layout + metrics (s)", None), ("of which: report (s)", "report_s"), ("run wall time (s)", "wall_seconds"))


def _cell(figs: dict, key: Optional[str]):
    if key is None:  # the two PIE-Bench parts together
        return round(figs.get("pie_layout_s", 0.0) + figs.get("pie_metrics_s", 0.0), 3)
    if key == "other_cores":
        return f"{figs.get('other_cores_early')} / {figs.get('other_cores_late')}"
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
    keys = ("done", "seconds", "before_batch_s", "edits_files_s", "cpu_seconds", "probe_s", "other_cores", "compiles", "rss_mb", "live_executables")
    lines = ["| batch | images done | s | of which: claims, records, loading | edits, files, rows | CPU s | probe s | other jobs' cores "
             "| compiles | RSS MB | live executables |", "|---" * (len(keys) + 1) + "|"]
    lines += ["| " + " | ".join([str(k + 1)] + [str(b[k].get(key, "-")) for key in keys]) + " |" for k in picks]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="toy images (pie: a multiple of 4, four editing types)")
    p.add_argument("--edits", choices=("pie", "varied"), default="pie", help="a toy PIE-Bench (default) or a manifest of five edit kinds")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--window", type=int, default=10, help="full non-compiling batches at each end compared")
    p.add_argument("--sample-s", type=float, default=1.0, help="seconds between resident-memory samples")
    p.add_argument("--work", help="folder for the data and the runs (default: a temporary one)")
    p.add_argument("--json", help="write every run's record and figures here")
    p.add_argument("--child", nargs=2, metavar=("OUT", "JSON"), help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)  # the child's inputs, as JSON
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.inputs), *args.child, args.sample_s)
    work = args.work or tempfile.mkdtemp(prefix="nti-long-run-")
    data = inputs(args.edits, work, args.images)
    runs = []
    for r in range(args.runs):
        out, rec = os.path.join(work, f"out{r}"), os.path.join(work, f"run{r}.json")
        with open(os.path.join(work, f"run{r}.log"), "w") as log:
            code = subprocess.call([sys.executable, __file__, "--child", out, rec, "--inputs", json.dumps(data), "--sample-s", str(args.sample_s)],
                                   stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            print(f"run {r + 1} exited {code}: see {log.name}", file=sys.stderr)
            return 1
        with open(rec) as f:
            runs.append(json.load(f))
    per_run = [figures(run, int(FLAGS[FLAGS.index("--batch-size") + 1]), args.window) for run in runs]
    print(f"nti-invert {' '.join([data[0], 'DATA', *data[2:], *FLAGS])}  ({args.images} toy images; work in {work})\n")
    print(table(per_run) + "\n\nrun 1 over time:\n\n" + timeline(runs[0]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": [*data, *FLAGS], "images": args.images, "figures": per_run, "runs": runs}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
