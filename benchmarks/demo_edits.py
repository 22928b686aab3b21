"""Score the demo's colour swaps (`make demo` / `python scripts/invert.py --out OUT`): for each
bundled sample, whether the edited object took the target colour and the background PSNR against
the input (pixels at least 2 px from the object), from the renderer's true mask (the samples
carry their scene seed).

    python benchmarks/demo_edits.py outputs
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nti_jax.io import psnr  # noqa: E402
from nti_jax.manifest import DEFAULT_MANIFEST  # noqa: E402
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


if __name__ == "__main__":
    for r in score(sys.argv[1] if len(sys.argv) > 1 else "outputs"):
        print(json.dumps(r))
