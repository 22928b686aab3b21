"""The device benchmark (issue 19): figures from one short accelerator lease, whatever happens.

    python benchmarks/device_bench.py --out bench.jsonl                 # on the device machine
    python benchmarks/device_bench.py --dry-run --out dry.jsonl         # tiny model, any machine (CI)
    python benchmarks/device_bench.py --table bench.jsonl               # the markdown tables

Each point runs in its own process under a deadline (and under what is left of the whole run's
budget), and its JSON line is appended to --out as soon as it ends, so a lease cut short still
returns every finished point. Points, in order of value (`POINTS`): null-text in bf16 at batch
1; the same with each candidate fix as an A/B (the flipped-kernel conv gradient, CUDA-graph
capture of loops); the compile again from the persistent cache; bf16 at batch 8 and 4; a
two-prompt 50-step edit, alone and 8 images in one program (a batch's edits); SDXL (1024 px) null-text in bf16 at batch 1; the toy model's bf16 against float32 null-text on held-out images;
float32 at batch 1; the PyTorch reference.

A null-text point builds random UNet weights from the parameter shapes on the device (no torch,
VAE or text encoder) and random `InvertInputs`, compiles the program ahead of time (compile
seconds, XLA's memory analysis, the count of cuDNN flash-attention calls), skips the point if
XLA says it does not fit the device, warms up with one inner step (a runtime input: the same
executable), then times exactly one execution of `steps` x `inner` with the early stop off.
`steps` may be fewer than 50: every timestep does the same work, so the time is scaled to 50
and the row says so. The first point also writes a profile of one execution as a table of the
top device operations by time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CACHE = os.path.join(ROOT, ".cache", "device_bench")
FULL_STEPS = 50
# (name, kind, settings, deadline s): each point's own environment and arguments.
POINTS = [
    ("bf16-b1", "invert", dict(dtype="bfloat16", batch=1, profile=True), 240),
    ("bf16-b1-flipped-conv-grad", "invert", dict(dtype="bfloat16", batch=1, env={"NTI_JAX_CONV_GRAD": "flipped"}), 180),
    ("bf16-b1-graph-loops", "invert", dict(dtype="bfloat16", batch=1, env={
        "XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"}), 180),
    ("bf16-b1-warm-compile", "invert", dict(dtype="bfloat16", batch=1, compile_only=True), 90),
    ("bf16-b8", "invert", dict(dtype="bfloat16", batch=8), 240),
    ("bf16-b4", "invert", dict(dtype="bfloat16", batch=4), 200),
    ("bf16-edit-2", "edit", dict(dtype="bfloat16", rows=2), 180),
    ("bf16-edit-2-x8", "edit", dict(dtype="bfloat16", rows=2, images=8), 180),
    ("sdxl-bf16-b1", "invert", dict(dtype="bfloat16", batch=1, model="sdxl"), 240),
    ("toy-bf16-vs-f32", "quality", dict(n=10), 180),
    ("f32-b1", "invert", dict(dtype="float32", batch=1), 200),
    ("torch-f32-b1", "torch", dict(), 120),
]
# The dry run's points: one of each kind of code path that the others only parametrise, each on
# the tiny model of its own kind (DRY_MODELS: SDXL's point takes the tiny SDXL, so its path is
# tried before a GPU is).
DRY_POINTS = ("bf16-b1", "bf16-b1-warm-compile", "bf16-edit-2", "sdxl-bf16-b1", "torch-f32-b1")
DRY_MODELS = {"sdxl": "tiny-xl"}


def _emit(path: str, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------
# one point, in its own process


def random_model(kind: str, dtype: str):
    """The UNet as a Denoiser with random weights made on the device from the parameter shapes."""
    import jax
    import jax.numpy as jnp

    from benchmarks import memory

    spec = memory.abstract_model(kind, dtype)
    leaves, tree = jax.tree_util.tree_flatten(spec.params)

    def make(key):  # one program for every tensor
        keys = jax.random.split(key, len(leaves))
        return [(0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype) for k, s in zip(keys, leaves)]

    return spec.replace(params=jax.tree_util.tree_unflatten(tree, jax.jit(make)(jax.random.PRNGKey(0))))


def random_inputs(model, batch: int, steps: int):
    import jax
    import jax.numpy as jnp

    from benchmarks import memory
    from nti_jax.core import null_text
    from nti_jax import testing
    from nti_jax.core.schedule import Schedule, ddim_schedule

    s, ch, _ = memory._dims(model)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 8))
    cond = lambda: jax.tree_util.tree_map(lambda a: jax.random.normal(next(keys), a.shape), memory.cond_spec(model, (batch,)))
    sched = Schedule(*map(jnp.asarray, ddim_schedule(testing.SD1_SCHEDULER, steps)))
    return null_text.InvertInputs(jax.random.normal(next(keys), (batch, s, s, ch)), cond(), cond(), sched, jnp.float32(7.5),
                                  jnp.int32(1), jnp.float32(-1.0))


def _device_free_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)) if "bytes_limit" in stats else None


def _compile(lowered) -> tuple:
    from nti_jax.core import planning

    t = time.time()
    compiled = lowered.compile()
    seconds = time.time() - t
    m = compiled.memory_analysis()
    info = dict(compile_s=seconds, need_gib=planning.program_bytes(compiled) / planning.GIB,
                temporaries_gib=m.temp_size_in_bytes / planning.GIB, cudnn_fmha_calls=compiled.as_text().count("__cudnn$fmha"))
    return compiled, info


def top_ops(trace_dir: str, n: int = 15) -> tuple[list, float]:
    """The device operations of a profile by total time, [(name, ms, share), ...], and their
    total ms, from the Perfetto trace JAX writes: the kernels on a GPU's stream tracks (or its
    XLA-op track); on a CPU, the events that are not Python frames or the executor itself."""
    paths = [os.path.join(r, f) for r, _, fs in os.walk(trace_dir) for f in fs if f.endswith("perfetto_trace.json.gz")]
    if not paths:
        return [], 0.0
    events = json.load(gzip.open(paths[0]))
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    meta = lambda kind: {(e.get("pid"), e.get("tid")) if kind == "thread_name" else e.get("pid"): e.get("args", {}).get("name", "")
                         for e in events if e.get("ph") == "M" and e.get("name") == kind}
    procs, threads = meta("process_name"), meta("thread_name")
    device = {pid for pid, name in procs.items() if "/device:" in name and "CPU" not in name}
    on = lambda e, prefix: e.get("pid") in device and threads.get((e.get("pid"), e.get("tid")), "").startswith(prefix)
    complete = [e for e in events if e.get("ph") == "X"]
    chosen = [e for e in complete if on(e, "Stream")] or [e for e in complete if on(e, "XLA Ops")]
    if not device:
        chosen = [e for e in complete if not str(e.get("name", "")).startswith(("$", "ThunkExecutor"))]
    totals: dict = {}
    for e in chosen:
        totals[e.get("name", "?")] = totals.get(e.get("name", "?"), 0.0) + float(e.get("dur", 0.0)) / 1e3
    whole = sum(totals.values())
    return [(k, v, v / (whole or 1.0)) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:n]], whole


def run_invert(model_kind: str, dtype: str, batch: int, steps: int, inner: int, profile: bool, compile_only: bool,
               trace_dir: str) -> dict:
    import jax
    import jax.numpy as jnp

    from nti_jax.core import parallel

    model = random_model(model_kind, dtype)
    inputs = random_inputs(model, batch, steps)
    lowered = parallel.sharded_program(parallel.local_mesh(jax.local_devices()[:1]), "null-text", None, "none").lower(model, inputs)
    compiled, info = _compile(lowered)
    free = _device_free_bytes()
    row = dict(info, remat="none", free_gib=None if free is None else free / 2**30)
    if compile_only:
        return row
    if free is not None and info["need_gib"] * 2**30 > free:
        return dict(row, skipped=f"XLA needs {info['need_gib']:.1f} GiB, {free / 2**30:.1f} GiB free")
    jax.block_until_ready(compiled(model, inputs))  # warm-up: one inner step
    timed = inputs._replace(num_inner_steps=jnp.int32(inner))
    t = time.time()
    jax.block_until_ready(compiled(model, timed))
    seconds = time.time() - t
    scale = FULL_STEPS / steps
    row.update(run_s=seconds, s_per_image_50=seconds * scale / batch, steps=steps, inner=inner,
               scaled=f"{steps} x {inner} timed, scaled x{scale:g} to {FULL_STEPS} x {inner}")
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    if profile:  # last, and never at the cost of the figures above
        try:
            shutil.rmtree(trace_dir, ignore_errors=True)  # top_ops reads the one trace there
            t = time.time()
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                jax.block_until_ready(compiled(model, timed))
                traced = time.time() - t
            ops, busy = top_ops(trace_dir)
            row.update(profiled_run_ms=1e3 * traced, profiled_ops_ms=busy,
                       top_ops=[dict(op=k[:120], ms=round(ms, 3), share=round(sh, 4)) for k, ms, sh in ops])
        except Exception as e:  # a profiler the machine lacks (CUPTI): the point keeps its timings
            row["profile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return row


def run_edit(model_kind: str, dtype: str, rows: int, steps: int, images: int = 1) -> dict:
    """`rows`-prompt edits of `images` images in one program (the CLI's batch of edits of one shape)."""
    import jax

    from benchmarks import memory

    model = random_model(model_kind, dtype)
    lowered, args = memory.lower_edit(model, rows=rows, steps=steps, concrete=True, images=images)
    compiled, info = _compile(lowered)
    jax.block_until_ready(compiled(*args))
    t = time.time()
    jax.block_until_ready(compiled(*args))
    seconds = time.time() - t
    return dict(info, run_s=seconds, s_per_edit_50=seconds * FULL_STEPS / steps / images, steps=steps, rows=rows, images=images)


def run_quality(n: int, steps: int) -> dict:
    from benchmarks import memory

    return memory.quality(n, n, num_steps=steps)


def run_torch(model_kind: str, steps: int, inner: int) -> dict:
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks import memory
    from benchmarks import torch_reference as tr
    from nti_jax import testing

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**memory.config(model_kind)["unet"]).to(dev).eval()
    s, d = unet.config.sample_size, unet.config.cross_attention_dim
    rng = np.random.default_rng(1)
    z0 = torch.from_numpy(rng.standard_normal((1, 4, s, s)).astype(np.float32))
    cond, null = (torch.from_numpy(rng.standard_normal((1, 77, d)).astype(np.float32)) for _ in range(2))
    sched = tr.DDIMSchedule(testing.SD1_SCHEDULER, steps)
    t = time.time()
    piv = tr.ddim_pivots(unet, sched, z0, cond)
    tr.null_text_optimization(unet, sched, piv, cond, null, num_inner_steps=inner, early_stop_epsilon=-1.0)
    if dev == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t
    return dict(run_s=seconds, s_per_image_50=seconds * FULL_STEPS / steps, steps=steps, inner=inner, torch_device=dev,
                scaled=f"{steps} x {inner} timed, scaled x{FULL_STEPS / steps:g} to {FULL_STEPS} x {inner}")


def run_point(name: str, kind: str, settings: dict, a) -> dict:
    import jax

    from nti_jax.run import hosts

    hosts.enable_compilation_cache(os.path.join(a.cache, "jax-cache"))
    model = DRY_MODELS.get(settings.get("model"), "tiny") if a.dry_run else settings.get("model", a.model)
    row = dict(point=name, model=model, backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
               jax=jax.__version__)
    dtype = settings.get("dtype")
    if kind == "invert":
        row.update(dtype=dtype, batch=settings["batch"], **run_invert(
            model, dtype, settings["batch"], a.steps, a.inner, settings.get("profile", False),
            settings.get("compile_only", False), os.path.join(a.cache, "trace", name)))
    elif kind == "edit":
        row.update(dtype=dtype, **run_edit(model, dtype, settings["rows"], a.edit_steps, settings.get("images", 1)))
    elif kind == "quality":
        row.update(run_quality(settings["n"] if not a.dry_run else 2, a.steps if a.dry_run else FULL_STEPS))
    else:
        row.update(run_torch(a.model, a.steps, a.inner))
    return row


# ----------------------------------------------------------------------------------------------
# the driver


def run_all(a) -> int:
    """Every selected point in its own process, in order, within the run's budget."""
    os.makedirs(a.cache, exist_ok=True)
    start, failures = time.time(), 0
    selected = a.points or (DRY_POINTS if a.dry_run else [pt[0] for pt in POINTS])
    for name, kind, settings, deadline in POINTS:
        if name not in selected:
            continue
        left = a.budget - (time.time() - start)
        limit = min(deadline, left)
        if limit < 20:
            _emit(a.out, dict(point=name, skipped=f"{left:.0f} s of the run's budget left"))
            continue
        env = dict(os.environ, **settings.get("env", {}))
        if "XLA_FLAGS" in settings.get("env", {}) and os.environ.get("XLA_FLAGS"):
            env["XLA_FLAGS"] = os.environ["XLA_FLAGS"] + " " + settings["env"]["XLA_FLAGS"]
        cmd = [sys.executable, __file__, "--point", name] + a.forward
        t = time.time()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            failures += 1
            _emit(a.out, dict(point=name, error=f"deadline: not finished in {limit:.0f} s"))
            continue
        lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
        if p.returncode != 0 or not lines:
            failures += 1
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:400]
            _emit(a.out, dict(point=name, error=f"exit {p.returncode}: {tail}", wall_s=time.time() - t))
            continue
        _emit(a.out, dict(json.loads(lines[-1]), wall_s=time.time() - t))
    print(table([json.loads(x) for x in open(a.out)]))
    return 1 if failures and a.strict else 0


def table(rows: list) -> str:
    """Markdown: one line per point, then the profile's top operations."""
    out = ["| point | dtype | batch | compile s | XLA needs GiB | cuDNN fmha | s/image (50 x inner) | peak GiB | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, p=2: "" if v is None else f"{v:.{p}f}"
    size = lambda r: r.get("batch", f"{r['images']} x {r['rows']}" if r.get("images", 1) > 1 else r.get("rows", ""))
    for r in rows:
        per = r.get("s_per_image_50", r.get("s_per_edit_50"))
        note = r.get("error") or r.get("skipped") or r.get("scaled") or ""
        if "float32" in r and "bfloat16" in r:
            note = f"PSNR f32 {r['float32']['psnr_mean']:.2f} / bf16 {r['bfloat16']['psnr_mean']:.2f} dB (n={r['float32']['n']})"
        out.append(f"| {r['point']} | {r.get('dtype', '')} | {size(r)} | {f(r.get('compile_s'), 1)} | "
                   f"{f(r.get('need_gib'))} | {r.get('cudnn_fmha_calls', '')} | {f(per, 3)} | {f(r.get('peak_gib'))} | {note} |")
    for r in rows:
        if r.get("top_ops"):
            out += ["", f"Top device operations, {r['point']}: one execution of {r['profiled_run_ms']:.0f} ms under the profiler, "
                    f"{r['profiled_ops_ms']:.0f} ms of operations", "", "| op | ms | share |", "|---|---|---|"]
            out += [f"| `{o['op']}` | {o['ms']:.2f} | {100 * o['share']:.1f}% |" for o in r["top_ops"]]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="device_bench.jsonl", help="JSON lines, appended as each point ends")
    p.add_argument("--dry-run", action="store_true", help="the tiny model, 2 x 2 steps, short deadlines (CI)")
    p.add_argument("--points", type=lambda s: [x for x in s.split(",") if x], default=[], help="only these points (names in POINTS)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default %(default)s)")
    p.add_argument("--steps", type=int, help="timesteps timed per null-text point (default 10; dry run 2)")
    p.add_argument("--inner", type=int, help="inner steps (default 10; dry run 2)")
    p.add_argument("--cache", default=CACHE, help="compilation cache, traces")
    p.add_argument("--strict", action="store_true", help="exit 1 if a point failed (CI)")
    p.add_argument("--table", metavar="JSONL", help="print the tables of an earlier run and exit")
    p.add_argument("--point", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.table:
        print(table([json.loads(x) for x in open(a.table)]))
        return 0
    a.model = "tiny" if a.dry_run else "sd15"
    a.steps = a.steps or (2 if a.dry_run else 10)
    a.inner = a.inner or (2 if a.dry_run else 10)
    a.edit_steps = a.steps if a.dry_run else FULL_STEPS
    a.forward = ["--steps", str(a.steps), "--inner", str(a.inner), "--cache", a.cache] + (["--dry-run"] if a.dry_run else [])
    if a.point:
        name, kind, settings, _ = next(pt for pt in POINTS if pt[0] == a.point)
        print(json.dumps(run_point(name, kind, settings, a)), flush=True)
        return 0
    unknown = set(a.points) - {pt[0] for pt in POINTS}
    if unknown:
        p.error(f"unknown points: {', '.join(sorted(unknown))}")
    return run_all(a)


if __name__ == "__main__":
    sys.exit(main())
