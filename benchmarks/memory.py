"""Memory plan of nti-jax at full Stable Diffusion size (issue 13), with no weights downloaded.

    python benchmarks/memory.py plan --json memory.json        # AOT memory table (slow: minutes/point)
    python benchmarks/memory.py plan --models sd15 --dtypes float32 --batches 1,2 --remat none,blocks
    python benchmarks/memory.py residuals                      # bytes one inner-loop gradient keeps
    python benchmarks/memory.py flops                          # XLA FLOPs/bytes per UNet call, per image
    python benchmarks/memory.py quality --n 50                 # toy model: bf16 vs float32 null-text
    python benchmarks/memory.py table memory.json              # the markdown tables of a plan

`plan` builds SD 1.5 (512 px) and SD 2.1 (768 px, v-prediction) from their diffusers configs with
abstract parameters (`jax.ShapeDtypeStruct`, nothing materialised), lowers and compiles the
inversion program (null-text, 50 x 10) and the Prompt-to-Prompt edit program (R = 2 rows) ahead
of time on this machine's backend, and records XLA's memory analysis (arguments, temporaries)
per point; each point runs in its own process. `residuals` is the backend-independent figure:
XLA:CPU computes bf16 in float32 internally, so its analysis understates what bf16 saves on GPU
and TPU. `--tiny` uses a tiny random model (the CI test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nti_jax.core import null_text, parallel, planning  # noqa: E402
from nti_jax.core.costs import cond_spec  # noqa: E402
from nti_jax.loading import pipeline  # noqa: E402
from nti_jax.core.sampling import Denoiser  # noqa: E402
from nti_jax.core.schedule import Schedule  # noqa: E402
from nti_jax.models.unet import REMAT_MODES  # noqa: E402

GIB = 2**30
CHIPS_GIB = (16, 32, 80, 141)
_VAE = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32}
_SD_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "norm_num_groups": 32, "in_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "out_channels": 4,
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "flip_sin_to_cos": True, "freq_shift": 0}
CONFIGS = {
    "sd15": dict(
        unet=dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
        vae=dict(_VAE, sample_size=512), prediction="epsilon",
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"),
    ),
    "sd21": dict(
        unet=dict(_SD_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                  use_linear_projection=True, upcast_attention=True),
        vae=dict(_VAE, sample_size=768), prediction="v_prediction",
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"),
    ),
    # stabilityai/stable-diffusion-xl-base-1.0's configs (1024 px): CLIP ViT-L and OpenCLIP bigG.
    "sdxl": dict(
        unet=dict(block_out_channels=[320, 640, 1280], layers_per_block=2, norm_num_groups=32, in_channels=4, out_channels=4,
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
                  transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
                  flip_sin_to_cos=True, freq_shift=0, sample_size=128),
        vae=dict(_VAE, sample_size=1024, scaling_factor=0.13025), prediction="epsilon",
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu"),
        text_2=dict(architectures=["CLIPTextModelWithProjection"], hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                    num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
    ),
}


def tiny_config() -> dict:
    from nti_jax import testing

    return dict(unet=testing.UNET_MINI, vae=testing.VAE_TINY, prediction="epsilon",
                text=dict(testing.TEXT_TINY, hidden_size=testing.UNET_MINI["cross_attention_dim"]))


def tiny_xl_config() -> dict:
    from nti_jax import testing

    return dict(unet=testing.UNET_XL, vae=testing.VAE_TINY, prediction="epsilon", text=testing.TEXT_XL_1, text_2=testing.TEXT_XL_2)


def config(kind: str) -> dict:
    """A model's configs: CONFIGS' full-size ones, or "tiny" / "tiny-xl" (the CI tests)."""
    return {"tiny": tiny_config, "tiny-xl": tiny_xl_config}.get(kind, lambda: CONFIGS[kind])()


def abstract_pipeline(kind: str, dtype: str) -> pipeline.Pipeline:
    """A Pipeline whose params are ShapeDtypeStructs, stored as `load_pipeline` stores them (no
    tokenizer: nothing here encodes text)."""
    cfg = config(kind)
    unet, vae, text = pipeline.build_modules(cfg["unet"], cfg["vae"], cfg["text"], dtype)
    text_2 = None
    if "text_2" in cfg:
        text, text_2 = pipeline.build_text_encoders_xl(cfg["text"], cfg["text_2"], dtype)
    shapes = pipeline.param_shapes(unet, vae, text, text_2)
    params = {k: pipeline.storage_dtypes(v, dtype if k != "vae" else "float32") for k, v in shapes.items()}
    return pipeline.Pipeline(unet, vae, text, params, None, {"prediction_type": cfg["prediction"]}, name=kind, text_encoder_2=text_2)


def abstract_model(kind: str, dtype: str) -> Denoiser:
    """The UNet as a Denoiser whose params are ShapeDtypeStructs."""
    return Denoiser.of(abstract_pipeline(kind, dtype))


def _dims(model: Denoiser) -> tuple[int, int, int]:
    c = model.module.config
    return c.sample_size, c.in_channels, c.cross_attention_dim


def cond_shapes(model: Denoiser) -> Any:
    """Per-row shapes of the conditioning ((77, D), or a TextCond of shapes)."""
    return jax.tree_util.tree_map(lambda a: a.shape[1:], cond_spec(model, (1,)))


def invert_inputs(model: Denoiser, batch: int, steps: int = 50) -> null_text.InvertInputs:
    s, ch, d = _dims(model)
    f32, spec = jnp.float32, jax.ShapeDtypeStruct
    sched = Schedule(spec((steps,), jnp.int32), spec((steps,), f32), spec((steps,), f32))
    return null_text.InvertInputs(spec((batch, s, s, ch), f32), cond_spec(model, (batch,)), cond_spec(model, (batch,)), sched,
                                  spec((), f32), spec((), jnp.int32), spec((), f32))


def lower_invert(model: Denoiser, batch: int, remat: str, steps: int = 50):
    """The inversion program the library and the command line run (a mesh of one device)."""
    program = parallel.sharded_program(parallel.local_mesh(jax.local_devices()[:1]), "null-text", None, remat)
    return program.lower(model, invert_inputs(model, batch, steps))


def lower_edit(model: Denoiser, rows: int = 2, steps: int = 50, concrete: bool = False, images: int = 1):
    """The Prompt-to-Prompt program for `images` images (one program, as a batch's edits of one
    shape run) of `rows` prompts each (Replace + LocalBlend); with `concrete`, also random
    arguments to call its compiled form with (device_bench.py)."""
    import nti_jax
    from nti_jax.core import p2p
    from nti_jax.loading.pipeline import load_tokenizer

    s, ch, d = _dims(model)
    tok = load_tokenizer(os.path.join(os.path.dirname(nti_jax.__file__), "toy", "model", "tokenizer"))
    fake = SimpleNamespace(tokenizer=tok, max_tokens=77, unet=model.module, truncation=lambda prompt: None)
    source, target = "a red circle on a blue background", "a green circle on a blue background"
    controller = nti_jax.Replace(cross_replace_steps=0.8, self_replace_steps=0.4,
                                 blend=nti_jax.LocalBlend([["red"], ["green"]] + [["green"]] * (rows - 2)))
    static, arr = p2p.compile_controller(fake, controller, source, [target] * (rows - 1), steps, s, False)
    f32, spec = jnp.float32, jax.ShapeDtypeStruct
    sched = Schedule(spec((steps,), jnp.int32), spec((steps,), f32), spec((steps,), f32))
    g = images
    inputs = p2p.EditInputs(sched, spec((g, s, s, ch), f32), cond_spec(model, (g, rows)), cond_spec(model, (g, steps)),
                            spec((g, steps + 1, s, s, ch), f32), spec((g,), f32), cond_spec(model, (g,)))
    arr = jax.tree_util.tree_map(lambda a: np.broadcast_to(np.asarray(a), (g,) + np.shape(a)), arr)  # the program's image axis
    arr_spec = jax.tree_util.tree_map(lambda a: spec(a.shape, a.dtype), arr)
    core = jax.jit(p2p.edit_core, static_argnames=("static", "edit"))  # the edit's sampling loop, without the VAE decode
    lowered = core.lower(model, arr_spec, inputs, static=static, edit=True)
    if not concrete:
        return lowered
    from nti_jax import testing
    from nti_jax.core.schedule import ddim_schedule

    keys = iter(jax.random.split(jax.random.PRNGKey(2), 8))
    normal = lambda a: jax.random.normal(next(keys), a.shape, a.dtype)
    normal_tree = lambda tree: jax.tree_util.tree_map(normal, tree)
    values = p2p.EditInputs(Schedule(*map(jnp.asarray, ddim_schedule(testing.SD1_SCHEDULER, steps))), normal(inputs.x_T),
                            normal_tree(inputs.cond), normal_tree(inputs.phi), normal(inputs.pivots), jnp.full((g,), 7.5, jnp.float32), normal_tree(inputs.empty))
    return lowered, (model, arr, values)


def analyse(lowered) -> dict:
    t = time.time()
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    return {"arguments_gib": m.argument_size_in_bytes / GIB, "temporaries_gib": m.temp_size_in_bytes / GIB,
            "outputs_gib": m.output_size_in_bytes / GIB, "compile_s": time.time() - t}


def point(kind: str, dtype: str, batch: int, remat: str, program: str) -> dict:
    """One AOT measurement (run it in a fresh process: compiles at full size take GBs)."""
    model = abstract_model(kind, dtype)
    lowered = lower_invert(model, batch, remat) if program == "invert" else lower_edit(model, rows=batch)
    return dict(model=kind, dtype=dtype, batch=batch, remat=remat, program=program, backend=jax.default_backend(), **analyse(lowered))


def residuals(kind: str, dtype: str, modes=REMAT_MODES) -> dict:
    """Bytes one inner-loop gradient keeps per image (batch 1 and 2: the difference is per image)."""
    model = abstract_model(kind, dtype)
    s, ch, d = _dims(model)
    out = {}
    for mode in modes:
        one, two = (planning.gradient_residual_bytes(model, b, (s, s, ch), cond_shapes(model), mode) for b in (1, 2))
        out[mode] = {"batch1_gib": one / GIB, "per_image_gib": (two - one) / GIB}
    return out


def largest_batch(rows: list, chip_gib: float) -> int:
    """Largest batch whose arguments + temporaries fit `chip_gib`, from a line through the measured
    batches (temporaries grow linearly with the batch); 0 if batch 1 does not fit."""
    rows = sorted(rows, key=lambda r: r["batch"])
    args = rows[0]["arguments_gib"]
    if len(rows) == 1:
        per, base = rows[0]["temporaries_gib"], 0.0
    else:
        (b0, t0), (b1, t1) = [(r["batch"], r["temporaries_gib"]) for r in (rows[0], rows[-1])]
        per = (t1 - t0) / (b1 - b0)
        base = t0 - per * b0
    if args + base + per > chip_gib:
        return 0
    return int((chip_gib - args - base) // per) if per > 0 else 10**6


def run_plan(args) -> list:
    """Every point of the plan, each in its own process; rows appended to --json as they come."""
    rows = json.load(open(args.json)) if args.json and os.path.exists(args.json) else []
    done = {(r["model"], r["dtype"], r["batch"], r["remat"], r["program"], r.get("label", "")) for r in rows}
    todo = [(m, dt, b, r, "invert") for m in args.models for dt in args.dtypes for b in args.batches for r in args.remat]
    if args.edit:
        todo += [(m, dt, 2, "none", "edit") for m in args.models for dt in args.dtypes]
    for kind, dt, b, remat, prog in todo:
        if (kind, dt, b, remat, prog, args.label) in done:
            continue
        cmd = [sys.executable, __file__, "point", kind, dt, str(b), remat, prog]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{kind} {dt} b{b} {remat} {prog}: failed: {res.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        row = dict(json.loads(res.stdout.strip().splitlines()[-1]), label=args.label)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.json:
            json.dump(rows, open(args.json, "w"), indent=1)
    return rows


def memory_table(rows: list) -> str:
    """Markdown: per (label, model, program, dtype, remat) the batches' arguments + temporaries and
    the largest batch per chip size."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.get("label", ""), r["model"], r["program"], r["dtype"], r["remat"]), []).append(r)
    head = "| code | model | program | dtype | remat | batch: arguments + temporaries GiB | " + " | ".join(
        f"max batch {c} GiB" for c in CHIPS_GIB) + " |"
    lines = [head, "|" + "---|" * (6 + len(CHIPS_GIB))]
    for (label, kind, prog, dt, remat), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["batch"])
        cells = ", ".join(f"{r['batch']}: {r['arguments_gib']:.2f} + {r['temporaries_gib']:.2f}" for r in rs)
        fits = [str(largest_batch(rs, c)) if prog == "invert" else "" for c in CHIPS_GIB]
        lines.append(f"| {label} | {kind} | {prog} | {dt} | {remat} | {cells} | " + " | ".join(fits) + " |")
    return "\n".join(lines)


def unet_costs(kind: str, dtype: str) -> dict:
    """XLA's cost analysis (lowered HLO, this backend) of one UNet call: forward at B = 1 and 2,
    and forward + backward w.r.t. the context at B = 1 (what one inner-loop iteration runs)."""
    model = abstract_model(kind, dtype)
    s, ch, d = _dims(model)
    spec = jax.ShapeDtypeStruct

    def fwd(m, x, c):
        return m(x, jnp.int32(500), c)

    def grad(m, x, c):
        return jax.grad(lambda c: jnp.sum(m(x, jnp.int32(500), c)))(c)

    def cost(fn, b):
        c = jax.jit(fn).lower(model, spec((b, s, s, ch), jnp.float32), cond_spec(model, (b,))).cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}

    return {"forward_b1": cost(fwd, 1), "forward_b2": cost(fwd, 2), "grad_b1": cost(grad, 1)}


def per_image(costs: dict, steps: int = 50, inner: int = 10) -> dict:
    """FLOPs and bytes per image of null-text steps x inner at batch 1, before and after the
    duplicate conditional call was removed, and the floor (the calls the algorithm needs)."""
    f, g, f2 = costs["forward_b1"], costs["grad_b1"], costs["forward_b2"]
    out = {}
    for key in ("flops", "bytes"):
        before = 2 * steps * f[key] + steps * inner * g[key] + steps * f2[key]  # pivot, eps_c, grads, CFG pair
        after = 3 * steps * f[key] + steps * inner * g[key]  # pivot, eps_c, grads, eps_u(phi_t)
        out[key] = {"before": before, "after": after, "floor": after}
    return out


# Peak dense bf16 TFLOP/s, HBM TB/s (vendor figures) of the chips in the cost model.
CHIPS = {"H100 SXM": (989.0, 3.35), "H200": (989.0, 4.8), "TPU v5e": (197.0, 0.819), "TPU v5p": (459.0, 2.765)}


def bytes_per_image(param_bytes: float, residual_bytes: float, steps: int = 50, inner: int = 10) -> float:
    """HBM traffic per image, lower estimate: every UNet pass reads the weights once (3 forwards
    per step; a gradient is a forward and a backward pass) and every gradient writes and reads
    its residuals once; activations inside fused kernels are not counted."""
    return (3 * steps + 2 * steps * inner) * param_bytes + steps * inner * 2 * residual_bytes


def cost_model(flops: float, bytes_moved: float, utilisation: float = 0.4) -> list:
    """Estimated seconds per image = max(FLOPs / (utilisation x peak), bytes / bandwidth)."""
    rows = []
    for chip, (tflops, tbs) in CHIPS.items():
        sec = max(flops / (utilisation * tflops * 1e12), bytes_moved / (tbs * 1e12))
        rows.append({"chip": chip, "utilisation": utilisation, "s_per_image": sec, "images_per_hour": 3600 / sec})
    v5e = rows[2]
    rows.append({"chip": "TPU v5e-256 slice", "utilisation": utilisation, "s_per_image": v5e["s_per_image"] / 256,
                 "images_per_hour": 256 * v5e["images_per_hour"]})
    return rows


def quality(n: int, batch: int, num_steps: int = 50) -> dict:
    """bf16 against float32 null-text (num_steps x 10, early stop 1e-5) on the toy model's held-out images."""
    import nti_jax
    from nti_jax.io import psnr, to_uint8
    from nti_jax.toy import shapes
    from nti_jax.toy.train import EVAL_SEED0

    folder = os.path.join(os.path.dirname(nti_jax.__file__), "toy", "model")
    images, _, captions = shapes.render_batch(range(EVAL_SEED0, EVAL_SEED0 + n), 64)
    out = {}
    for dtype in ("float32", "bfloat16"):
        pipe = nti_jax.load_pipeline(folder, dtype=dtype)
        psnrs, steps, t = [], [], time.time()
        for i in range(0, n, batch):
            inv = nti_jax.invert(pipe, list(images[i : i + batch]), list(captions[i : i + batch]), num_steps=num_steps)
            rec = to_uint8(nti_jax.reconstruct(pipe, inv)[0])
            psnrs += [psnr(r, im) for r, im in zip(rec, images[i : i + batch])]
            steps += np.asarray(inv.inner_iterations).sum(axis=1).tolist()
        out[dtype] = {"psnr_mean": float(np.mean(psnrs)), "psnr_min": float(np.min(psnrs)), "adam_steps_mean": float(np.mean(steps)),
                      "adam_steps_min": int(np.min(steps)), "adam_steps_max": int(np.max(steps)), "seconds": time.time() - t, "n": n}
    out["psnr_gap_db"] = out["float32"]["psnr_mean"] - out["bfloat16"]["psnr_mean"]
    return out


def batch_effect(rows: int = 10) -> dict:
    """How much the toy UNet's eps for the same rows changes between a call of `rows` rows and one
    of 2 x `rows` ([uncond; cond], as a one-call CFG step makes), per dtype: max and mean abs."""
    import nti_jax

    folder = os.path.join(os.path.dirname(nti_jax.__file__), "toy", "model")
    out = {}
    for dtype in ("float32", "bfloat16"):
        pipe = nti_jax.load_pipeline(folder, dtype=dtype)
        model, s = Denoiser.of(pipe), pipe.unet.config
        x = jax.random.normal(jax.random.PRNGKey(0), (rows, s.sample_size, s.sample_size, s.in_channels))
        uncond, cond = pipe.encode_prompt([""] * rows), pipe.encode_prompt(["a red circle on a blue background"] * rows)
        eps = jax.jit(lambda x, c: model.eps(x, jnp.int32(500), jnp.float32(0.5), c))
        diff = jnp.abs(eps(x, uncond) - eps(jnp.concatenate([x, x]), jnp.concatenate([uncond, cond]))[:rows])
        out[dtype] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "rows": rows}
    return out


def remat_times(channels, sample: int, steps: int, inner: int, repeats: int) -> dict:
    """Seconds of null-text steps x inner (no early stop), per remat mode, on a random SD-layout
    UNet (`channels` per level, `sample` x `sample` latents), modes alternating, medians."""
    from nti_jax.models import UNet2DConditionModel, UNetConfig

    from benchmarks.bench_inversion import _sd_unet

    module = UNet2DConditionModel(UNetConfig.from_diffusers(_sd_unet(channels, 256, sample)))
    rng = np.random.default_rng(0)
    x, ctx = jnp.zeros((1, sample, sample, 4)), jnp.zeros((1, 77, 256))
    params = jax.tree_util.tree_map(lambda a: a + 0.02 * jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                                    module.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), ctx)["params"])
    model = Denoiser(params, module, "epsilon")
    from nti_jax import testing
    from nti_jax.core.schedule import ddim_schedule

    sched = Schedule(*map(jnp.asarray, ddim_schedule(testing.SD1_SCHEDULER, steps)))
    emb = lambda seed: jnp.asarray(np.random.default_rng(seed).standard_normal((1, 77, 256)), jnp.float32)
    inputs = null_text.InvertInputs(jnp.asarray(rng.standard_normal((1, sample, sample, 4)), jnp.float32), emb(1), emb(2),
                                    sched, jnp.float32(7.5), jnp.int32(inner), jnp.float32(-1.0))
    times: dict = {m: [] for m in REMAT_MODES}
    mesh = parallel.local_mesh(jax.local_devices()[:1])
    for m in times:  # compile
        jax.block_until_ready(parallel.sharded_program(mesh, "null-text", None, m)(model, inputs))
    for _ in range(repeats):
        for m in times:
            t = time.time()
            jax.block_until_ready(parallel.sharded_program(mesh, "null-text", None, m)(model, inputs))
            times[m].append(time.time() - t)
    med = {m: float(np.median(v)) for m, v in times.items()}
    return {"channels": list(channels), "sample": sample, "steps": steps, "inner": inner, "seconds": times,
            "median_s": med, "ratio_to_none": {m: med[m] / med["none"] for m in med}}


def build_sd(folder: str, kind: str) -> str:
    """A random-weight diffusers folder of `kind` ("sd15", or "tiny": the CI dry run), built with torch."""
    from nti_jax import testing

    if os.path.exists(os.path.join(folder, "model_index.json")):
        return folder
    cfg = config(kind)
    sched = dict(testing.SD1_SCHEDULER, prediction_type=cfg["prediction"])
    text = dict(testing.TEXT_TINY, **cfg["text"])
    return testing.save_sd_folder(folder, testing.tiny_unet(cfg["unet"]), testing.tiny_vae(cfg["vae"] if kind == "tiny" else dict(
        _VAE, in_channels=3, out_channels=3, sample_size=cfg["vae"]["sample_size"])), testing.tiny_text_encoder(text), sched)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plan")
    pl.add_argument("--models", default="sd15,sd21", type=lambda s: s.split(","))
    pl.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: s.split(","))
    pl.add_argument("--batches", default="1,2,4,8", type=lambda s: [int(x) for x in s.split(",")])
    pl.add_argument("--remat", default="none,blocks,full", type=lambda s: s.split(","))
    pl.add_argument("--edit", action=argparse.BooleanOptionalAction, default=True)
    pl.add_argument("--label", default="", help="a name for this code version in the table (e.g. before/after)")
    pl.add_argument("--json")
    pt = sub.add_parser("point")
    pt.add_argument("kind"), pt.add_argument("dtype"), pt.add_argument("batch", type=int), pt.add_argument("remat")
    pt.add_argument("program", choices=("invert", "edit"))
    for name in ("residuals", "flops"):
        s = sub.add_parser(name)
        s.add_argument("--models", default="sd15,sd21", type=lambda s: s.split(","))
        s.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: s.split(","))
    q = sub.add_parser("quality")
    q.add_argument("--n", type=int, default=50)
    q.add_argument("--batch", type=int, default=10)
    r = sub.add_parser("remat-time", help="CPU time of each remat mode on a mid-size random UNet")
    r.add_argument("--channels", default="128,256,512", type=lambda s: [int(x) for x in s.split(",")])
    r.add_argument("--sample", type=int, default=32)
    r.add_argument("--steps", type=int, default=4)
    r.add_argument("--inner", type=int, default=10)
    r.add_argument("--repeats", type=int, default=3)
    bs = sub.add_parser("build-sd", help="a random-weight SD 1.5 diffusers folder (the full-size CLI smoke run)")
    bs.add_argument("folder")
    sub.add_parser("batch-effect", help="bf16 and float32 eps of the same rows in calls of B and 2B rows (toy model)")
    t = sub.add_parser("table")
    t.add_argument("json")
    a = p.parse_args(argv)
    if a.cmd == "point":
        print(json.dumps(point(a.kind, a.dtype, a.batch, a.remat, a.program)))
    elif a.cmd == "plan":
        print(memory_table(run_plan(a)))
    elif a.cmd == "residuals":
        print(json.dumps({f"{m} {d}": residuals(m, d) for m in a.models for d in a.dtypes}, indent=1))
    elif a.cmd == "flops":
        for m in a.models:
            for d in a.dtypes:
                c = unet_costs(m, d)
                img = per_image(c)
                bf16 = abstract_model(m, "bfloat16")
                params = sum(a.size * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(bf16.params))
                s, ch, dim = _dims(bf16)
                moved = bytes_per_image(params, planning.gradient_residual_bytes(bf16, 1, (s, s, ch), cond_shapes(bf16), "none"))
                print(json.dumps({"model": m, "dtype": d, "per_call": c, "per_image": img, "bf16_bytes_per_image": moved,
                                  "cost_model": [r for u in (1.0, 0.4) for r in cost_model(img["flops"]["after"], moved, u)]}))
    elif a.cmd == "build-sd":
        print(build_sd(a.folder, "sd15"))
    elif a.cmd == "remat-time":
        print(json.dumps(remat_times(a.channels, a.sample, a.steps, a.inner, a.repeats), indent=1))
    elif a.cmd == "batch-effect":
        print(json.dumps(batch_effect(), indent=1))
    elif a.cmd == "quality":
        print(json.dumps(quality(a.n, a.batch), indent=1))
    else:
        print(memory_table(json.load(open(a.json))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
