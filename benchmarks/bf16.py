"""bf16 against float32 on held-out toy images: null-text reconstruction and a colour swap (issue 31).

    python benchmarks/bf16.py --n 50 --json bf16.json                    # both dtypes, 50 images
    python benchmarks/bf16.py --dtypes float32 --json f32.json           # the reference once
    NTI_JAX_FLOAT32=norms python benchmarks/bf16.py --dtypes bfloat16 --reference f32.json --json norms.json

Each image is inverted alone (the CLI's default batch size, 1), reconstructed, and edited once
with the CLI's default edit settings (Replace 0.8 / 0.4, single-branch guidance, no blend;
`--edit-guidance plain` for the library's) to another colour; the edit's background PSNR (pixels >= 2 px from the object, against the input) is the
edit's figure. `NTI_JAX_FLOAT32` (see nti_jax/models/precision.py) selects which operation
families run in float32 under bf16, for a sweep one family at a time. The CPU's model and its
bf16 flags and `XLA_FLAGS` are recorded: XLA:CPU's bf16 rounding depends on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import nti_jax
from nti_jax.core.controllers import controller_from_settings
from nti_jax.io import psnr, to_uint8
from nti_jax.models import precision
from nti_jax.run.cli import DEFAULT_EDIT_GUIDANCE
from nti_jax.toy.train import EVAL_SEED0

from benchmarks.quality import DEFAULT_MODEL, score_edit, spread, swaps

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu() -> dict:
    """This machine's CPU model and the flags that change XLA:CPU's bf16 code."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model.strip():
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags], "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run(model: str, dtype: str, n: int, edits: bool, guidance: str = DEFAULT_EDIT_GUIDANCE) -> dict:
    """Per image: reconstruction PSNR, Adam steps, and (with `edits`) the colour swap's scores
    with edit-time `guidance` (default: the CLI's)."""
    pipe = nti_jax.load_pipeline(model, dtype=dtype)
    rows, t0 = [], time.time()
    for sw in swaps(range(EVAL_SEED0, EVAL_SEED0 + n)):
        inv = nti_jax.invert(pipe, sw["image"], sw["source"])
        rec = to_uint8(nti_jax.reconstruct(pipe, inv)[0])[0]
        row = {"source": sw["source"], "psnr": psnr(rec, sw["image"]), "adam_steps": int(np.asarray(inv.inner_iterations).sum())}
        if edits:
            c = controller_from_settings(sw["source"], [sw["target"]], {"guidance": guidance})
            scores = score_edit(sw, to_uint8(nti_jax.edit(pipe, inv, [sw["target"]], controller=c)))
            row.update(target=sw["target"], background_psnr=scores["background_psnr"], object_is_target=bool(scores["object_is_target"]))
        rows.append(row)
        print(f"  {dtype}: {len(rows)}/{n} images, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return {"dtype": dtype, "float32_families": sorted(precision.float32_families()), "edit_guidance": guidance, "rows": rows,
            "seconds_per_image": (time.time() - t0) / n}


def eps_errors(model: str, n: int, families: list) -> dict:
    """Per family setting ("none", each family, "all"): the relative error against float32 of
    the guided eps (w = 7.5) and of null-text's gradient w.r.t. phi, over `n` held-out images
    noised to three timesteps: the UNet's own bf16 error, free of the optimisation's chaos.
    Each setting is traced afresh ($NTI_JAX_FLOAT32 is read at trace time)."""
    import jax
    import jax.numpy as jnp

    from nti_jax.core.sampling import Denoiser, guide
    from nti_jax.core.schedule import train_alphas_cumprod
    from nti_jax.toy import shapes

    images, _, captions = shapes.render_batch(range(EVAL_SEED0, EVAL_SEED0 + n), 64)
    f32 = nti_jax.load_pipeline(model)
    z0 = f32.encode_image(np.asarray(images)).astype(jnp.float32)
    cond, uncond = f32.encode_prompt(list(captions)), f32.encode_prompt([""] * n)
    ac = train_alphas_cumprod(f32.scheduler_config)
    noise = jax.random.normal(jax.random.PRNGKey(0), z0.shape)

    def outputs(pipe) -> list:
        m, out = Denoiser.of(pipe), []
        guided = lambda u, x, c, t, a: guide(m.eps(x, t, a, u), m.eps(x, t, a, c), 7.5)
        eps = jax.jit(guided)
        grad = jax.jit(jax.grad(lambda u, x, c, t, a: jnp.mean((guided(u, x, c, t, a) - noise) ** 2)))
        for t in (901, 501, 101):
            a = jnp.float32(ac[t])
            x = jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * noise
            out += [np.asarray(eps(uncond, x, cond, jnp.int32(t), a)), np.asarray(grad(uncond, x, cond, jnp.int32(t), a))]
        return out

    ref = outputs(f32)
    rel = lambda a, b: float(np.abs(a - b).mean() / np.abs(b).mean())
    res = {}
    for fam in families:
        os.environ["NTI_JAX_FLOAT32"] = fam
        got = outputs(nti_jax.load_pipeline(model, dtype="bfloat16"))
        res[fam] = {"eps_rel_err": float(np.mean([rel(g, r) for g, r in zip(got[::2], ref[::2])])),
                    "grad_rel_err": float(np.mean([rel(g, r) for g, r in zip(got[1::2], ref[1::2])]))}
        print(f"  float32 {fam}: guided eps {res[fam]['eps_rel_err']:.2e}, gradient {res[fam]['grad_rel_err']:.2e} (relative to float32)", flush=True)
    os.environ.pop("NTI_JAX_FLOAT32")
    bf16 = nti_jax.load_pipeline(model, dtype="bfloat16")  # the text encoder's own error (its cond feeds every call)
    res["text_encoder_rel_err"] = rel(np.asarray(bf16.encode_prompt(list(captions))), np.asarray(cond))
    return res


def compare(ref: dict, other: dict) -> dict:
    """`other` (bf16) against `ref` (float32), image by image."""
    gap = [a["psnr"] - b["psnr"] for a, b in zip(ref["rows"], other["rows"])]
    out = {"psnr_f32": spread([r["psnr"] for r in ref["rows"]]), "psnr": spread([r["psnr"] for r in other["rows"]]),
           "gap_db": spread(gap), "worst_image": int(np.argmax(gap))}
    if "background_psnr" in other["rows"][0] and "background_psnr" in ref["rows"][0]:
        bg = [a["background_psnr"] - b["background_psnr"] for a, b in zip(ref["rows"], other["rows"])]
        out.update(background_f32=spread([r["background_psnr"] for r in ref["rows"]]),
                   background=spread([r["background_psnr"] for r in other["rows"]]), background_gap_db=spread(bg),
                   turned=float(np.mean([r["object_is_target"] for r in other["rows"]])),
                   turned_f32=float(np.mean([r["object_is_target"] for r in ref["rows"]])))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=50, help="held-out images")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-edits", action="store_true", help="reconstruction only")
    ap.add_argument("--edit-guidance", default=DEFAULT_EDIT_GUIDANCE, help="the swaps' edit-time guidance (default: the CLI's)")
    ap.add_argument("--reference", default=None, help="a float32 run's --json to compare against instead of running it")
    ap.add_argument("--json", default=None)
    ap.add_argument("--eps", action="store_true", help="only the UNet's bf16 error per float32 family (eps_errors)")
    args = ap.parse_args(argv)
    res = {"cpu": cpu(), "n": args.n, "runs": {}}
    if args.eps:
        res["eps"] = eps_errors(args.model, args.n, ["none", *precision.FAMILIES, ",".join(precision.FAMILIES)])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    for dtype in args.dtypes.split(","):
        res["runs"][dtype] = run(args.model, dtype, args.n, not args.no_edits, args.edit_guidance)
    ref = json.load(open(args.reference))["runs"]["float32"] if args.reference else res["runs"].get("float32")
    if ref is not None and "bfloat16" in res["runs"]:
        res["compare"] = c = compare(ref, res["runs"]["bfloat16"])
        line = (f"bf16 {','.join(res['runs']['bfloat16']['float32_families']) or 'no family'} in float32: reconstruction "
                f"{c['psnr']['mean']:.3f} dB against {c['psnr_f32']['mean']:.3f}, gap mean {c['gap_db']['mean']:.3f} "
                f"max {c['gap_db']['max']:.3f} (image {c['worst_image']})")
        if "background_gap_db" in c:
            line += f"; swap background {c['background']['mean']:.2f} against {c['background_f32']['mean']:.2f} dB"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
