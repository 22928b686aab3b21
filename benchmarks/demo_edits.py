"""Score the demo's colour swaps (`make demo` / `python scripts/invert.py --out OUT`): for each
bundled sample, whether the edited object took the target colour and the background PSNR against
the input (pixels at least 2 px from the object), from the renderer's true mask (the samples
carry their scene seed).

    python benchmarks/demo_edits.py outputs [--figure docs/demo.png]

`--figure` also writes the README's picture: per sample, input | reconstruction | edit, and its
attention.png heat maps under them.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nti_jax.io import psnr  # noqa: E402
from nti_jax.run.manifest import DEFAULT_MANIFEST  # noqa: E402
from nti_jax.toy import shapes  # noqa: E402


def score(out: str) -> list[dict]:
    rows = []
    with open(DEFAULT_MANIFEST) as f:
        samples = [json.loads(line) for line in f if line.strip()]
    for s in samples:
        name = os.path.splitext(s["image"])[0]
        metrics = json.load(open(os.path.join(out, name, "metrics.json")))
        _, masks, _ = shapes.render_batch([s["seed"]], 64)
        mask = masks[0]
        source = np.asarray(Image.open(os.path.join(out, name, "input.png")).convert("RGB"))
        for e in metrics["edits"]:
            edited = np.asarray(Image.open(os.path.join(out, name, e["file"])).convert("RGB"))
            target = shapes.parse_caption(e["prompt"])[0]
            bg = shapes.interior(1.0 - mask)
            rows.append({
                "name": name, "edit": e["prompt"], "guidance": e.get("guidance", "plain"),
                "object_color": shapes.dominant_colors(edited, mask)[0], "target_color": target,
                "background_psnr": round(psnr(edited[bg], source[bg]), 2), "reconstruction_psnr": round(metrics["psnr"], 2),
            })
    return rows


def figure(out: str, path: str, cell: int = 128) -> None:
    """Per sample: input | reconstruction | edits (nearest-upscaled to `cell`), then its heat maps."""
    rows = []
    with open(DEFAULT_MANIFEST) as f:
        names = [os.path.splitext(json.loads(line)["image"])[0] for line in f if line.strip()]
    for name in names:
        folder = os.path.join(out, name)
        files = ["input.png", "reconstruction.png"] + [e["file"] for e in json.load(open(os.path.join(folder, "metrics.json")))["edits"]]
        tiles = [np.asarray(Image.open(os.path.join(folder, f)).convert("RGB").resize((cell, cell), Image.NEAREST)) for f in files]
        rows.append(np.concatenate(tiles, axis=1))
        att = os.path.join(folder, "attention.png")
        if os.path.isfile(att):
            rows.append(np.asarray(Image.open(att).convert("RGB")))
    width = max(r.shape[1] for r in rows)
    sheet = np.full((sum(r.shape[0] for r in rows) + 4 * len(rows), width, 3), 255, np.uint8)
    y = 0
    for r in rows:
        sheet[y : y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0] + 4
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(sheet).save(path)


if __name__ == "__main__":
    args = sys.argv[1:]
    out = args[0] if args and not args[0].startswith("--") else "outputs"
    for r in score(out):
        print(json.dumps(r))
    if "--figure" in args:
        figure(out, args[args.index("--figure") + 1])
