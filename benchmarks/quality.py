"""Quality of a model on held-out shapes-world images: the tables of issues 3, 4 and 5.

    python benchmarks/quality.py                      # the shipped toy model, 50 images
    python benchmarks/quality.py --n 8 --edits 4      # a quick look

Sections (each a table on stdout, all figures in --json):
- captions: text-to-image samples (w = 7.5, 50 steps) whose object and background dominant
  colours both match their caption;
- inversion: reconstruction PSNR against the input for the VAE alone (the bound), null-text,
  negative-prompt and ddim (with CFG at w = 7.5), min / median / mean / max;
- edits: colour swaps with Replace + LocalBlend on the shape's word: the edited object's colour
  against the target, and the background PSNR against the input outside the (dilated) object;
- identities on this model: Replace with the source prompt, Reweight by 1, and the source row of
  a batch of three, each against the plain reconstruction (max abs over pixels in [0, 1]);
- seconds per image of each inversion method, and compile / run time of `edit`.
Held-out images come from seeds >= nti_jax.toy.train.EVAL_SEED0 (training never sees them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import nti_jax  # noqa: E402
from nti_jax.io import psnr, to_uint8  # noqa: E402
from nti_jax.toy import shapes  # noqa: E402
from nti_jax.toy.train import EVAL_SEED0  # noqa: E402

DEFAULT_MODEL = os.path.join(os.path.dirname(__file__), "..", "nti_jax", "toy", "model")
METHODS = ("null-text", "negative-prompt", "ddim")


def spread(values) -> dict:
    v = np.asarray(values, np.float64)
    return {"min": float(v.min()), "median": float(np.median(v)), "mean": float(v.mean()), "max": float(v.max()), "n": int(v.size)}


def held_out(n: int):
    return shapes.render_batch(range(EVAL_SEED0, EVAL_SEED0 + n), 64)


def caption_following(pipe, n: int, batch: int) -> dict:
    captions = held_out(n)[2]
    hits, rows = 0, []
    for i in range(0, n, batch):
        caps = captions[i : i + batch]
        imgs = to_uint8(nti_jax.generate(pipe, caps, seed=i))
        for cap, img in zip(caps, imgs):
            color, _, background = shapes.parse_caption(cap)
            got = shapes.scene_colors(img)
            hits += got == (color, background)
            rows.append({"caption": cap, "object": got[0], "background": got[1]})
    obj = np.mean([r["object"] == shapes.parse_caption(r["caption"])[0] for r in rows])
    bg = np.mean([r["background"] == shapes.parse_caption(r["caption"])[2] for r in rows])
    return {"both": hits / n, "object": float(obj), "background": float(bg), "n": n, "samples": rows}


def inversion_table(pipe, n: int, batch: int) -> dict:
    images, _, captions = held_out(n)
    out = {"vae": [], **{m: [] for m in METHODS}}
    iters, seconds = [], {m: 0.0 for m in METHODS}
    for i in range(0, n, batch):
        imgs, caps = images[i : i + batch], captions[i : i + batch]
        vae = np.asarray(pipe.decode_latents(pipe.encode_image(imgs)))
        out["vae"] += [psnr(to_uint8(r), x) for r, x in zip(vae, imgs)]
        for m in METHODS:
            t0 = time.perf_counter()
            inv = nti_jax.invert(pipe, imgs, caps, method=m)
            rec = np.asarray(nti_jax.reconstruct(pipe, inv)[0])
            seconds[m] += time.perf_counter() - t0
            out[m] += [psnr(to_uint8(r), x) for r, x in zip(rec, imgs)]
            if m == "null-text":
                iters += list(np.asarray(inv.inner_iterations).sum(axis=1))
    table = {k: spread(v) for k, v in out.items()}
    table["null-text"]["gap_to_vae_mean"] = table["vae"]["mean"] - table["null-text"]["mean"]
    table["ddim"]["below_null_text_mean"] = table["null-text"]["mean"] - table["ddim"]["mean"]
    table["adam_steps_per_image"] = spread(iters)
    table["seconds_per_image"] = {m: seconds[m] / n for m in METHODS}
    table["per_image"] = {k: [float(x) for x in v] for k, v in out.items()}
    return table


def _masked_psnr(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64))[keep] / 255.0
    return float(10 * np.log10(1.0 / max(np.mean(d**2), 1e-12)))


def edit_table(pipe, n: int) -> dict:
    images, masks, captions = held_out(n)
    rows, times = [], []
    for img, mask, cap in zip(images, masks, captions):
        color, shape, background = shapes.parse_caption(cap)
        others = [c for c in shapes.COLOR_NAMES if c not in (color, background)]
        target = others[len(rows) % len(others)]
        inv = jax.block_until_ready(nti_jax.invert(pipe, img, cap))  # async dispatch: keep it out of the edit's time
        tgt = shapes.caption(target, shape, background)
        ctrl = nti_jax.Replace(blend=nti_jax.LocalBlend([[shape], [shape]]))
        t0 = time.perf_counter()
        out = to_uint8(nti_jax.edit(pipe, inv, [tgt], controller=ctrl))
        times.append(time.perf_counter() - t0)
        plain = to_uint8(nti_jax.edit(pipe, inv, [tgt], controller=nti_jax.Replace()))[1]
        bg = shapes._erode_min(shapes._erode_min(1.0 - mask)) > 0.99  # at least 2 px from the object
        rows.append({
            "source": cap, "target": tgt,
            "object_after": shapes.dominant_colors(out[1], mask)[0],
            "object_after_no_blend": shapes.dominant_colors(plain, mask)[0],
            "background_psnr": _masked_psnr(out[1], img, bg),
            "background_psnr_no_blend": _masked_psnr(plain, img, bg),
            "reconstruction_background_psnr": _masked_psnr(out[0], img, bg),
        })
    hit = lambda key: float(np.mean([shapes.parse_caption(r["target"])[0] == r[key] for r in rows]))
    return {
        "object_is_target": hit("object_after"),
        "object_is_target_no_blend": hit("object_after_no_blend"),
        "background_psnr": spread([r["background_psnr"] for r in rows]),
        "background_psnr_no_blend": spread([r["background_psnr_no_blend"] for r in rows]),
        "reconstruction_background_psnr": spread([r["reconstruction_background_psnr"] for r in rows]),
        "edit_seconds_first": times[0], "edit_seconds_median_after": float(np.median(times[1:])) if len(times) > 1 else None,
        "rows": rows,
    }


def identities(pipe) -> dict:
    img, _, caps = held_out(1)
    inv = nti_jax.invert(pipe, img, caps)
    recon = np.asarray(nti_jax.reconstruct(pipe, inv)[0][0])
    color, shape, background = shapes.parse_caption(caps[0])
    other = [c for c in shapes.COLOR_NAMES if c not in (color, background)]
    same = nti_jax.edit(pipe, inv, caps, controller=nti_jax.Replace())
    rw = nti_jax.edit(pipe, inv, caps, controller=nti_jax.Reweight(equalizer={color: 1.0}))
    three = nti_jax.edit(pipe, inv, [shapes.caption(c, shape, background) for c in other[:2]])
    return {
        "replace_same_prompt_target_vs_reconstruction": float(np.abs(same[1] - recon).max()),
        "replace_same_prompt_source_vs_reconstruction": float(np.abs(same[0] - recon).max()),
        "reweight_1_vs_reconstruction": float(np.abs(rw[1] - recon).max()),
        "batch_of_3_source_row_vs_reconstruction": float(np.abs(three[0] - recon).max()),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=50, help="held-out images for captions and inversion")
    ap.add_argument("--edits", type=int, default=20, help="held-out images for the colour-swap table")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--sections", default="captions,inversion,edits,identities", help="comma-separated")
    ap.add_argument("--json", default=None, help="write all figures here")
    args = ap.parse_args(argv)
    pipe = nti_jax.load_pipeline(args.model)
    sections = args.sections.split(",")
    res = {"model": os.path.relpath(args.model), "n": args.n}
    if "captions" in sections:
        res["captions"] = caption_following(pipe, args.n, args.batch)
        c = res["captions"]
        print(f"captions followed (object and background colour): {c['both']:.0%} of {c['n']} "
              f"(object {c['object']:.0%}, background {c['background']:.0%})", flush=True)
    if "inversion" in sections:
        res["inversion"] = inv = inversion_table(pipe, args.n, args.batch)
        print(f"\nreconstruction PSNR (dB), {args.n} held-out images, w = 7.5, 50 steps")
        print("| method | min | median | mean | max | s/image |\n|---|---|---|---|---|---|")
        for k in ("vae",) + METHODS:
            s = inv[k]
            sec = inv["seconds_per_image"].get(k)
            print(f"| {k} | {s['min']:.2f} | {s['median']:.2f} | {s['mean']:.2f} | {s['max']:.2f} | "
                  f"{'' if sec is None else f'{sec:.2f}'} |")
        print(f"null-text mean {inv['null-text']['gap_to_vae_mean']:.2f} dB below the VAE bound; ddim mean "
              f"{inv['ddim']['below_null_text_mean']:.2f} dB below null-text", flush=True)
    if "edits" in sections and args.edits:
        res["edits"] = e = edit_table(pipe, args.edits)
        print(f"\ncolour swap, Replace + LocalBlend on the shape word, {args.edits} held-out images")
        print(f"object turned to the target colour: {e['object_is_target']:.0%} (without the blend "
              f"{e['object_is_target_no_blend']:.0%})")
        for k in ("background_psnr", "background_psnr_no_blend", "reconstruction_background_psnr"):
            s = e[k]
            print(f"{k}: min {s['min']:.2f} median {s['median']:.2f} mean {s['mean']:.2f} max {s['max']:.2f} dB")
        print(f"edit call: first {e['edit_seconds_first']:.2f} s (compile + run), then median "
              f"{e['edit_seconds_median_after']} s", flush=True)
    if "identities" in sections:
        res["identities"] = ids = identities(pipe)
        print("\nidentities (max abs difference, pixels in [0, 1])")
        for k, v in ids.items():
            print(f"  {k}: {v:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
