"""A PIE-Bench-layout folder built from the toy shapes world (true masks, known edits).

    from nti_jax.toy.pie_layout import build_toy_pie_bench
    build_toy_pie_bench("toy_pie", n_per_type=3, seed=0)   # -> toy_pie/mapping_file.json, annotation_images/

Types, each entry a caption edit of one rendered scene "a {color} {shape} on a {background}
background", written as PIE-Bench writes them (the changed word in [brackets] in both prompts):

- 6 change color: "a [red] circle ..." -> "a [green] circle ...", blended_word "circle circle"
  (PIE-Bench's attribute edits name the edited object twice, e.g. "bicycle bicycle");
  edited region: every pixel the object covers.
- 1 change object: "a red [circle] ..." -> "a red [square] ...", blended_word "circle square"
  (source object, target object); edited region: the union of both shapes (same bounding box).
- 8 change background: "... on a [blue] background" -> "... on a [green] background",
  blended_word "background background"; edited region: every pixel the background shows in.
  (PIE-Bench's own convention for background edits could not be checked here.)
- 0 random: one of the three above, drawn per image.

Scenes are rendered natively at 512 px (`shapes.render(seed, 512)`: the same scene as at 64 px,
since geometry is drawn as fractions of the side), so images and masks are exact at PIE-Bench's
size rather than upsampled; the model sees them through `load_image` (bicubic down to 64).
Images are saved as .jpg like PIE-Bench's, at quality 95 without chroma subsampling (JPEG is
lossy: 0.4-0.9 grey levels RMS on these flat scenes; the inversion and the metrics both read
the same decoded file). Seeds start at 2,100,000,000: never seen in the toy model's training.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from nti_jax.pie import bench as pie_bench
from nti_jax.io import atomic_path
from nti_jax.toy import shapes

FOLDERS = {"0": "0_random_140", "1": "1_change_object_80", "6": "6_change_attribute_color_40", "8": "8_change_background_80"}
SEED_BASE = 2_100_000_000
KINDS = {"1": "object", "6": "color", "8": "background"}


def _entry(scene_seed: int, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The 512-px image and the mapping entry (without image_path/type) of one edit."""
    s = shapes.render(scene_seed, pie_bench.FRAME)
    color, shape, bg = s.color, s.shape, s.background
    if kind == "color":
        new = str(rng.choice([c for c in shapes.COLOR_NAMES if c not in (color, bg)]))
        prompts = (f"a [{color}] {shape} on a {bg} background", f"a [{new}] {shape} on a {bg} background")
        blended, instruction = f"{shape} {shape}", f"make the {shape} {new}"
        edited = s.mask > 0
    elif kind == "object":
        new = str(rng.choice([x for x in shapes.SHAPES if x != shape]))
        prompts = (f"a {color} [{shape}] on a {bg} background", f"a {color} [{new}] on a {bg} background")
        blended, instruction = f"{shape} {new}", f"change the {shape} to a {new}"
        target = shapes.render(scene_seed, pie_bench.FRAME, color=color, shape=new, background=bg)
        edited = (s.mask > 0) | (target.mask > 0)
    else:
        new = str(rng.choice([c for c in shapes.COLOR_NAMES if c not in (color, bg)]))
        prompts = (f"a {color} {shape} on a [{bg}] background", f"a {color} {shape} on a [{new}] background")
        blended, instruction = "background background", f"make the background {new}"
        edited = s.mask < 1
    entry = {
        "original_prompt": prompts[0],
        "editing_prompt": prompts[1],
        "editing_instruction": instruction,
        "blended_word": blended,
        "mask": pie_bench.mask_encode(edited),
    }
    return s.image, entry


def build_toy_pie_bench(folder: str, n_per_type: int = 3, seed: int = 0, types: Sequence[str] = ("0", "1", "6", "8")) -> str:
    """Write `folder/mapping_file.json` and `folder/annotation_images/<type folder>/<id>.jpg`;
    ids are 12 digits, the first the editing type. Returns `folder`."""
    types = [str(t) for t in types]
    bad = sorted(set(types) - set(FOLDERS))
    if bad:
        raise ValueError(f"the toy PIE-Bench has editing types {', '.join(FOLDERS)}; not {', '.join(bad)}")
    if n_per_type < 1:
        raise ValueError(f"n_per_type must be >= 1, got {n_per_type}")
    mapping = {}
    for t in types:
        rng = np.random.default_rng([seed, int(t)])
        for k in range(n_per_type):
            scene_seed = SEED_BASE + seed * 10_000 + int(t) * 1_000 + k
            kind = KINDS[t] if t in KINDS else str(rng.choice(list(KINDS.values())))
            image, entry = _entry(scene_seed, kind, rng)
            key = f"{t}{k:011d}"
            rel = f"{FOLDERS[t]}/{key}.jpg"
            path = os.path.join(folder, "annotation_images", rel)
            with atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="JPEG", quality=95, subsampling=0)
            mapping[key] = {"image_path": rel, **entry, "editing_type_id": t}
    with atomic_path(os.path.join(folder, "mapping_file.json")) as tmp, open(tmp, "w") as f:
        json.dump(mapping, f)
    return folder
