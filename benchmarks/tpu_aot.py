"""Ahead-of-time compiles of the programs the CLI runs, for one TPU chip, from any machine (issue 28).

    pip install -r requirements-tpu.txt
    python benchmarks/tpu_aot.py                          # the required points on a v5e, a JSON line each
    python benchmarks/tpu_aot.py --tiny --jobs 2          # the CI form: tiny models, seconds a point
    python benchmarks/tpu_aot.py --only sd15-invert-b8 --deadline 900 --json points.jsonl
    python benchmarks/tpu_aot.py layers --batches 1,8     # per attention layer: XLA's kernels vs flash
    python benchmarks/tpu_aot.py unet --models sd15 --batches 1,8   # per UNet call only (no program)
    python benchmarks/tpu_aot.py point '{"name": "slice", "model": "sd15", "program": "invert", "batch": 1,
        "slice": "v5e:2x4"}'                              # over a slice's chips: memory per chip, collectives

libtpu's compile-only client gives the chip (`jax.experimental.topologies`); nothing runs on a
TPU. The programs are `core.parallel`'s, lowered over a one-chip mesh with abstract weights
(bf16), so they get the TPU's kernels (`models.backend`). Each point compiles in its own process
under `--deadline` seconds. A point's line: `memory_analysis` (arguments, outputs, temporaries,
aliased, generated code; "fits" = arguments + outputs + temporaries - aliased + code <= HBM less
`--reserve-gib`), compile seconds (informative: this machine is shared), FLOPs and bytes per UNet
call and a roofline estimate per image. XLA's `cost_analysis` counts a loop body once and a
Pallas kernel only as far as the kernel declares, so per-call figures come from separately
compiled UNet calls (and decodes), with each flash kernel's count replaced by one from its tiling
(`flash.traffic`), multiplied by the calls the program makes in the worst case (every inner loop
runs all its steps; a batch runs until its slowest image stops). Roofline: the sum over calls of
max(FLOPs / peak, bytes / HBM bandwidth), per image. All of it is an estimate, not a speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # several processes may hold libtpu's compiler

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import memory  # noqa: E402
from nti_jax.core import null_text, oom, p2p, parallel  # noqa: E402
from nti_jax.core.chips import CHIPS  # noqa: E402
from nti_jax.core.costs import cond_spec, costs, flash_correction, placed, roofline_s, unet_call, xla_cost  # noqa: E402
from nti_jax.core.sampling import Denoiser  # noqa: E402
from nti_jax.core.schedule import Schedule  # noqa: E402
from nti_jax.core.settings import InvertSettings  # noqa: E402
from nti_jax.loading.pipeline import decode_with  # noqa: E402
from nti_jax.models import flash  # noqa: E402
from nti_jax.models.unet import REMAT_MODES  # noqa: E402

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Point:
    name: str
    model: str  # memory.CONFIGS' name, or "tiny" / "tiny-xl"
    program: str  # "invert" (null-text) | "reconstruct" | "edit" (Replace + LocalBlend, `batch` prompts)
    batch: int  # images per chip; prompts per image for "edit"
    remat: str = "auto"  # "auto": the planner's order (REMAT_MODES), the first that fits
    steps: int = 50
    inner: int = 10
    slice: str = ""  # (invert) a TPU topology, e.g. "v5e:2x4": the program over its chips, `batch` images each
    host: int = -1  # with `slice`: only this host's chips, the program one host of the slice runs


def required_points(tiny: bool) -> list[Point]:
    """Issue 28's points: SD 1.5 null-text at batches 1, 4, 8, 16, a reconstruction, a two-prompt
    edit, SDXL null-text at batch 1 (tiny: the same programs on tiny models)."""
    sd, xl = ("tiny", "tiny-xl") if tiny else ("sd15", "sdxl")
    batches = (2,) if tiny else (1, 4, 8, 16)
    return ([Point(f"{sd}-invert-b{b}", sd, "invert", b) for b in batches]
            + [Point(f"{sd}-reconstruct-b1", sd, "reconstruct", 1, "none"), Point(f"{sd}-edit-r2", sd, "edit", 2, "none"),
               Point(f"{xl}-invert-b1", xl, "invert", 1)])


def chip_mesh(chip: str) -> jax.sharding.Mesh:
    """A one-chip mesh (axis "batch") of compile-only TPU devices."""
    from jax.experimental import topologies

    return parallel.local_mesh(topologies.get_topology_desc(CHIPS[chip].topology, "tpu").devices[:1])


def slice_mesh(pt: Point) -> jax.sharding.Mesh:
    """The mesh of a slice point: every chip of `pt.slice`, or host `pt.host`'s chips only."""
    from jax.experimental import topologies

    chips = topologies.get_topology_desc(pt.slice, "tpu").devices
    return parallel.local_mesh([d for d in chips if pt.host < 0 or d.process_index == pt.host])


COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all", "reduce-scatter")


def collectives(hlo: str) -> int:
    """Collective operations (sync or async start) in compiled HLO text."""
    return sum(len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in COLLECTIVES)


def memory_figures(lowered, hbm_gib: float, reserve_gib: float) -> tuple[Any, dict]:
    """Compile; XLA's memory analysis in GiB, whether it fits, compile seconds."""
    t = time.time()
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    out = {"compile_s": round(time.time() - t, 1), "code_gib": m.generated_code_size_in_bytes / GIB,
           "arguments_gib": m.argument_size_in_bytes / GIB, "outputs_gib": m.output_size_in_bytes / GIB,
           "temporaries_gib": m.temp_size_in_bytes / GIB, "aliased_gib": m.alias_size_in_bytes / GIB}
    out["total_gib"] = out["arguments_gib"] + out["outputs_gib"] + out["temporaries_gib"] - out["aliased_gib"] + out["code_gib"]
    out["fits"] = out["total_gib"] <= hbm_gib - reserve_gib
    text = compiled.as_text()  # which kernels it got: CPU's conv gradient is a conditional, flash a custom call
    out.update(hlo_conditionals=text.count(" conditional("), tpu_custom_calls=text.count('custom_call_target="tpu_custom_call"'))
    return compiled, out


def decode_call(pipe, mesh, batch: int) -> dict:
    s, ch = pipe.image_size // pipe.latent_factor, pipe.unet.config.in_channels
    z = placed(jax.ShapeDtypeStruct((batch, s, s, ch), jnp.float32), mesh)
    fn = lambda params, z: decode_with(pipe.vae, pipe.scaling_factor, params, z)
    return costs(fn, (placed(pipe.params["vae"], mesh), z), mesh)


def invert_inputs(pipe, mesh, pt: Point) -> null_text.InvertInputs:
    """The sharded null-text program's inputs for `pt.batch` images per chip of `mesh`."""
    specs = null_text.abstract_inputs(pipe, InvertSettings(num_steps=pt.steps), pt.batch * mesh.size)
    return null_text.InvertInputs(*[placed(a, mesh, s) for a, s in zip(specs, null_text.InvertInputs.specs(parallel.AXIS))])


def invert_point(pt: Point, pipe, model, mesh, chip: str, reserve: float, emit: Callable) -> dict:
    """Null-text, remat as the planner would choose (the first of REMAT_MODES that fits), then
    its per-call costs: 3 forwards per step (pivot, eps_c, the step) and `inner` gradients."""
    inputs, hbm = invert_inputs(pipe, mesh, pt), CHIPS[chip].hbm_gib
    modes = REMAT_MODES if pt.remat == "auto" else (pt.remat,)
    for mode in modes:
        lowered = parallel.sharded_program(mesh, "null-text", None, mode).lower(model, inputs)
        try:
            _, fig = memory_figures(lowered, hbm, reserve)
        except Exception as e:  # the TPU's compiler refuses temporaries beyond the chip's HBM
            if not oom.is_out_of_memory(e):
                raise
            fig = {"fits": False, "refused": str(e).strip().splitlines()[0][:300]}
        emit(dict(fig, remat=mode, partial=True))
        if fig["fits"]:
            break
    if not fig["fits"]:
        return dict(fig, remat=mode)
    fwd, grad = unet_call(model, mesh, pt.batch), unet_call(model, mesh, pt.batch, mode)
    calls = {"forward": 3 * pt.steps, "gradient": pt.steps * pt.inner}
    return dict(fig, remat=mode, per_call={"forward": fwd, "gradient": grad}, calls=calls,
                **per_image([(fwd, calls["forward"]), (grad, calls["gradient"])], pt.batch, chip))


def slice_point(pt: Point, pipe, model, mesh, chip: str, reserve: float, emit: Callable) -> dict:
    """Null-text over a slice's chips (remat `pt.remat`, "auto" read as "none"): each chip's memory,
    and the collectives and loops in the compiled program (none expected: each chip runs its own
    images and early stop). Per-call costs are the one-chip point's."""
    mode = "none" if pt.remat == "auto" else pt.remat
    lowered = parallel.sharded_program(mesh, "null-text", None, mode).lower(model, invert_inputs(pipe, mesh, pt))
    compiled, fig = memory_figures(lowered, CHIPS[chip].hbm_gib, reserve)
    hlo = compiled.as_text()
    return dict(fig, remat=mode, chips=mesh.size, processes=sorted({d.process_index for d in mesh.devices.flat}),
                collectives=collectives(hlo), loops=hlo.count(" while("))


def per_image(parts: list, images: int, chip: str) -> dict:
    """Totals per image of (cost, calls) pairs and the roofline seconds per image."""
    return {"flops_per_image": sum(c["flops"] * n for c, n in parts) / images,
            "bytes_per_image": sum(c["bytes"] * n for c, n in parts) / images,
            "roofline_s_per_image": sum(roofline_s(c, CHIPS[chip]) * n for c, n in parts) / images}


def loop_point(pt: Point, pipe, model, mesh, chip: str, reserve: float, emit: Callable) -> dict:
    """Reconstruction (two UNet calls of B rows per step, two decodes) or a P2P edit (one call of
    2 x prompts rows per step with its hooks, one decode of the prompts' images): the program's
    count less its decodes is one UNet call (XLA counts a loop body once: the step, and in it the
    guided step's loop of two calls, `Denoiser.cfg_eps`)."""
    lowered, args = reconstruct_lowered(pipe, model, mesh, pt) if pt.program == "reconstruct" else edit_lowered(pipe, model, mesh, pt)
    compiled, fig = memory_figures(lowered, CHIPS[chip].hbm_gib, reserve)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lowered_fn(pt, pipe, mesh))(*args).jaxpr
    corr = flash_correction(jaxpr, mesh)
    once = {k: xla_cost(compiled)[k] + corr[k] for k in ("flops", "bytes")}
    decodes, rows = (2, pt.batch) if pt.program == "reconstruct" else (1, pt.batch)
    dec = decode_call(pipe, mesh, rows)
    per_call = {k: once[k] - decodes * dec[k] for k in ("flops", "bytes")}
    unet_per_step = 2 if pt.program == "reconstruct" else 1
    return dict(fig, per_call={"unet": per_call, "decode": dec}, calls={"unet": unet_per_step * pt.steps, "decode": decodes},
                **per_image([(per_call, unet_per_step * pt.steps), (dec, decodes)], 1, chip))


def lowered_fn(pt: Point, pipe, mesh):
    """The jitted program of a loop point (as `core.parallel` builds it)."""
    if pt.program == "reconstruct":
        return parallel.reconstruct_program(mesh, False, pipe.vae, pipe.scaling_factor)
    return parallel.edit_program(mesh, _edit_static(pipe, pt)[0], True, pipe.vae, pipe.scaling_factor)


def reconstruct_lowered(pipe, model, mesh, pt: Point):
    s, ch = pipe.image_size // pipe.latent_factor, pipe.unet.config.in_channels
    f32, spec, n, b = jnp.float32, jax.ShapeDtypeStruct, pt.steps, pt.batch
    rows = lambda tree: placed(tree, mesh, P(parallel.AXIS))
    sched = placed(Schedule(spec((n,), jnp.int32), spec((n,), f32), spec((n,), f32)), mesh)
    args = (model, placed(pipe.params["vae"], mesh), sched, rows(spec((b, s, s, ch), f32)), rows(cond_spec(model, (b,))),
            rows(cond_spec(model, (b, n))), rows(spec((b, n + 1, s, s, ch), f32)), placed(spec((), f32), mesh))
    with jax.set_mesh(mesh):
        return lowered_fn(pt, pipe, mesh).lower(*args), args


@functools.lru_cache(maxsize=4)
def _edit_static(pipe, pt: Point):
    """(static, arrays) of Replace + LocalBlend for one source and `pt.batch - 1` target prompts."""
    import nti_jax
    from types import SimpleNamespace
    from nti_jax.loading.pipeline import load_tokenizer

    tok = load_tokenizer(os.path.join(os.path.dirname(nti_jax.__file__), "toy", "model", "tokenizer"))
    fake = SimpleNamespace(tokenizer=tok, max_tokens=77, unet=pipe.unet, truncation=lambda prompt: None)
    blend = nti_jax.LocalBlend([["red"], ["green"]] + [["green"]] * (pt.batch - 2))
    controller = nti_jax.Replace(cross_replace_steps=0.8, self_replace_steps=0.4, blend=blend)
    s = pipe.image_size // pipe.latent_factor
    return p2p.compile_controller(fake, controller, "a red circle on a blue background",
                                  ["a green circle on a blue background"] * (pt.batch - 1), pt.steps, s, False)


def edit_lowered(pipe, model, mesh, pt: Point):
    """The sharded edit program for one image on the chip, `pt.batch` prompts."""
    s, ch = pipe.image_size // pipe.latent_factor, pipe.unet.config.in_channels
    f32, spec, n, r = jnp.float32, jax.ShapeDtypeStruct, pt.steps, pt.batch
    _, arr = _edit_static(pipe, pt)
    arr = placed(jax.tree_util.tree_map(lambda a: spec((1,) + np.shape(a), np.asarray(a).dtype), arr), mesh, P(parallel.AXIS))
    fields = p2p.EditInputs(Schedule(spec((n,), jnp.int32), spec((n,), f32), spec((n,), f32)), spec((1, s, s, ch), f32),
                            cond_spec(model, (1, r)), cond_spec(model, (1, n)), spec((1, n + 1, s, s, ch), f32),
                            spec((1,), f32), cond_spec(model, (1,)))
    inputs = p2p.EditInputs(*[placed(a, mesh, sp) for a, sp in zip(fields, p2p.EditInputs.specs(parallel.AXIS))])
    inputs = inputs._replace(sched=placed(fields.sched, mesh))
    args = (model, placed(pipe.params["vae"], mesh), arr, inputs)
    with jax.set_mesh(mesh):
        return lowered_fn(pt, pipe, mesh).lower(*args), args


def run_point(pt: Point, chip: str, reserve: float) -> None:
    """One point in this process: a JSON line per compiled candidate ("partial": true), then the
    point's line."""
    emit = lambda row: print(json.dumps(dict(point=pt.name, chip=chip, **row)), flush=True)
    mesh = slice_mesh(pt) if pt.slice else chip_mesh(chip)
    pipe = memory.abstract_pipeline(pt.model, "bfloat16")
    model = placed(Denoiser.of(pipe), mesh)
    run = slice_point if pt.slice else invert_point if pt.program == "invert" else loop_point
    emit(dict(dataclasses.asdict(pt), reserve_gib=reserve, **run(pt, pipe, model, mesh, chip, reserve, emit)))


def run_one(pt: Point, args) -> dict:
    """One point in its own process under the deadline: its last JSON line, or why none came."""
    cmd = [sys.executable, os.path.abspath(__file__), "point", json.dumps(dataclasses.asdict(pt)),
           "--chip", args.chip, "--reserve-gib", str(args.reserve_gib)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.deadline)
        out, err, why = res.stdout, res.stderr, None if res.returncode == 0 else f"exit {res.returncode}"
    except subprocess.TimeoutExpired as e:
        out, err, why = _text(e.stdout), _text(e.stderr), f"deadline {args.deadline} s"
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    row = lines[-1] if lines else {"point": pt.name, "chip": args.chip}
    if why:
        row = dict(row, error=why, stderr_tail=(err.strip().splitlines() or [""])[-1][-300:])
    return row


def run_all(points: list[Point], args) -> list[dict]:
    """Every point (`--jobs` processes at a time), a line each as it ends, appended to --json."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    rows = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for done in as_completed([pool.submit(run_one, pt, args) for pt in points]):
            row = done.result()
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


# SD 1.5 at 512 px and SDXL at 1024 px: (name, queries, keys, heads, head size) per attention layer kind.
LAYERS = {
    "sd15": [("self 64x64", 4096, 4096, 8, 40), ("cross 64x64", 4096, 77, 8, 40), ("self 32x32", 1024, 1024, 8, 80),
             ("cross 32x32", 1024, 77, 8, 80), ("self 16x16", 256, 256, 8, 160), ("cross 16x16", 256, 77, 8, 160),
             ("self 8x8", 64, 64, 8, 160), ("cross 8x8", 64, 77, 8, 160)],
    "sdxl": [("self 64x64", 4096, 4096, 10, 64), ("cross 64x64", 4096, 77, 10, 64), ("self 32x32", 1024, 1024, 20, 64),
             ("cross 32x32", 1024, 77, 20, 64)],
    "tiny": [("self 32x32", 1024, 1024, 2, 8)],  # the CI's check of the flash counts
}


def layer_row(mesh, chip: str, layer: tuple, batch: int, kind: str) -> dict:
    """One attention layer's forward + backward (w.r.t. q, k, v) in bf16 with kernel `kind`
    ($NTI_JAX_ATTENTION), compiled for the chip: memory and traffic."""
    from nti_jax.models import attention

    name, lq, lk, h, d = layer
    os.environ["NTI_JAX_ATTENTION"] = kind
    qs, ks = (batch, lq, h, d), (batch, lk, h, d)
    f = jax.grad(lambda q, k, v: jnp.sum(attention.fused_attention(q, k, v, d**-0.5).astype(jnp.float32)), argnums=(0, 1, 2))
    args = placed([jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in (qs, ks, ks)], mesh)
    with jax.set_mesh(mesh):
        _, fig = memory_figures(jax.jit(f).lower(*args), CHIPS[chip].hbm_gib, 0.0)
    c = costs(f, tuple(args), mesh)
    counted = kind != "chunked"  # XLA counts one chunk of a chunked layer (a loop body once)
    return {"layer": name, "batch": batch, "kernel": kind, "temporaries_mib": fig["temporaries_gib"] * 1024,
            "code_mib": fig["code_gib"] * 1024, "gflop": c["flops"] / 1e9 if counted else None,
            "gbytes": c["bytes"] / 1e9 if counted else None, "roofline_us": roofline_s(c, CHIPS[chip]) * 1e6 if counted else None,
            "flash_calls": c["flash_calls"], "compile_s": fig["compile_s"]}


def run_layers(args) -> None:
    """The per-layer table (markdown after the JSON lines): XLA's attention, chunked, and flash
    where the layer allows it (`flash.unsupported`)."""
    from nti_jax.models import attention

    mesh, rows = chip_mesh(args.chip), []
    attention.FLASH_MIN_TOKENS = 0  # "flash" here means the kernel wherever its shapes allow
    for model in args.models:
        for layer in LAYERS[model]:
            for batch in args.batches:
                kinds = ["xla", "chunked"] + ([] if flash.unsupported((batch,) + layer[1:2] + layer[3:], (batch, layer[2])) else ["flash"])
                for kind in kinds:
                    row = dict(model=model, **layer_row(mesh, args.chip, layer, batch, kind))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    print("| model | layer | batch | kernel | temporaries MiB | code MiB | GFLOP | GB moved | roofline us |")
    print("|---|---|---|---|---|---|---|---|---|")
    num = lambda x, fmt: "(one chunk)" if x is None else format(x, fmt)
    for r in rows:
        print(f"| {r['model']} | {r['layer']} | {r['batch']} | {r['kernel']} | {r['temporaries_mib']:.1f} | {r['code_mib']:.2f} | "
              f"{num(r['gflop'], '.2f')} | {num(r['gbytes'], '.3f')} | {num(r['roofline_us'], '.0f')} |")


def run_unet(args) -> None:
    """Per-call figures alone: a UNet forward and its gradient (`--remat`), a JSON line each;
    with --hlo-dir, each compiled program's HLO (for benchmarks/hlo_bytes.py)."""
    mesh = chip_mesh(args.chip)
    for kind in args.models:
        model = placed(Denoiser.of(memory.abstract_pipeline(kind, "bfloat16")), mesh)
        for batch in args.batches:
            for grad in ("", args.remat):
                call = f"gradient ({grad})" if grad else "forward"
                hlo = os.path.join(args.hlo_dir, f"{kind}_{'gradient' if grad else 'forward'}_b{batch}.hlo") if args.hlo_dir else ""
                t, c = time.time(), unet_call(model, mesh, batch, grad, hlo)
                print(json.dumps(dict(model=kind, batch=batch, call=call, seconds=round(time.time() - t, 1), roofline_ms=1e3 * roofline_s(c, CHIPS[args.chip]), **c)), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", default="run", choices=("run", "point", "layers", "unet"))
    ap.add_argument("point", nargs="?", help="(point) the point as JSON")
    ap.add_argument("--tiny", action="store_true", help="tiny models (the CI test)")
    ap.add_argument("--only", default="", help="comma-separated point names")
    ap.add_argument("--chip", default="v5e", choices=sorted(CHIPS))
    ap.add_argument("--reserve-gib", type=float, default=1.0, help="HBM kept back from 'fits' (runtime, fragmentation)")
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds per point's process")
    ap.add_argument("--json", default="", help="append each point's line to this file")
    ap.add_argument("--jobs", type=int, default=1, help="points compiled at once (each its own process)")
    ap.add_argument("--models", default="sd15,sdxl", help="(layers, unet) models")
    ap.add_argument("--batches", default="1,8", help="(layers, unet) batches")
    ap.add_argument("--remat", default="none", choices=REMAT_MODES, help="(unet) the gradient's remat mode")
    ap.add_argument("--hlo-dir", default="", help="(unet) write each compiled program's HLO text here")
    args = ap.parse_args(argv)
    if args.command == "point":
        return run_point(Point(**json.loads(args.point)), args.chip, args.reserve_gib)
    if args.command in ("layers", "unet"):
        args.models, args.batches = args.models.split(","), [int(b) for b in args.batches.split(",")]
        return run_layers(args) if args.command == "layers" else run_unet(args)
    points = required_points(args.tiny)
    if args.only:
        points = [p for p in points if p.name in args.only.split(",")]
    rows = run_all(points, args)
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
