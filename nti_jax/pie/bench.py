"""PIE-Bench (Ju et al., "PnP Inversion", ICLR 2024) runs, set up as its authors' harness.

The benchmark folder holds `mapping_file.json` and `annotation_images/`. `read_benchmark` turns
each entry into a manifest row for `nti-invert --manifest` exactly as cure-lab/PnPInversion's
`run_editing_p2p.py` sets up an edit: brackets stripped; Refine (P2P's refinement mapper);
with a blended word "src tgt", Reweight x2 on the target word on top and a LocalBlend on
(src, tgt) (threshold 0.3, start 0.2); cross-attention replaced for 40% of the steps,
self-attention for 60% (in layers of at most 32x32 queries on SD at 512 px, i.e. latent/2,
this package's default); guidance 7.5, 50 DDIM steps (the CLI defaults). The harness also
passes proximal-guidance settings (proximal "l0", quantile 0.75, use_inversion_guidance True,
recon_lr 1, recon_t 400); its ddim, null-text and direct-inversion + P2P methods never read
them, and for negative-prompt inversion + P2P they have no effect (prox is forced to None and
the inversion-guidance flag is not forwarded), so nothing here models them.

After a run, `write_pnp_layout` writes the harness's own output layout
(`OUT/pnp/output/<method>/annotation_images/<image_path>`: one 2048x512 image of the panels
[text, gt, reconstruction, edit]) so that PnPInversion's `evaluation/evaluate.py` runs on it
unchanged, and `evaluate` computes the metrics that need no model weights (PSNR, MSE, SSIM on
the unedited part, masked as evaluate.py masks) per editing type and overall.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from nti_jax.io import atomic_path, load_image
from nti_jax.records import read_json, write_jsonl

FRAME = 512  # PIE-Bench images and masks are 512x512
TYPES = {
    "0": "random",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change content",
    "5": "change pose",
    "6": "change color",
    "7": "change material",
    "8": "change background",
    "9": "change style",
}
FIELDS = ("image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id", "blended_word", "mask")
EDIT_SETTINGS = {"kind": "refine", "cross_replace_steps": 0.4, "self_replace_steps": 0.6}
BLEND_SETTINGS = {"blend_threshold": 0.3, "blend_start": 0.2}
REWEIGHT = 2.0
RUN_SETTINGS = {"steps": 50, "guidance": 7.5}  # the CLI's defaults; the harness's values
# our inversion method -> (folder under output/, the key evaluate.py's all_tgt_image_folders
# knows it by). evaluate.py has no plain "null-text-inversion+p2p" entry: its null-text rows are
# the authors' A800 and 3090 runs, so the null-text folder takes the A800 name to be readable.
PNP_METHODS = {
    "ddim": ("ddim+p2p", "1_ddim+p2p"),
    "null-text": ("null-text-inversion+p2p_a800", "1_null-text-inversion+p2p_a800"),
    "negative-prompt": ("negative-prompt-inversion+p2p", "1_negative-prompt-inversion+p2p"),
    "direct": ("directinversion+p2p", "1_directinversion+p2p"),
}


# ----------------------------------------------------------------------------------------------
# masks


def mask_decode(encoded: Sequence[int], shape: tuple[int, int] = (FRAME, FRAME)) -> np.ndarray:
    """PIE-Bench's mask, float64 (H, W) of 0/1, exactly as PnPInversion's `mask_decode`: pairs
    [start, length] mark runs of ones in the flat row-major array (a run is cut at the end, a
    start past the end marks nothing), then the one-pixel border is set to 1."""
    n = shape[0] * shape[1]
    flat = np.zeros((n,))
    for i in range(0, len(encoded), 2):
        start = int(encoded[i])
        run = min(int(encoded[i + 1]), n - start)
        if run > 0:
            flat[start : start + run] = 1
    out = flat.reshape(shape[0], shape[1])
    out[0, :] = 1
    out[-1, :] = 1
    out[:, 0] = 1
    out[:, -1] = 1
    return out


def mask_encode(mask: np.ndarray) -> list[int]:
    """The run-length pairs [start, length, ...] of the nonzero pixels of a 2-D mask, row-major
    (the inverse of `mask_decode` up to its border)."""
    flat = np.asarray(mask).reshape(-1) != 0
    edges = np.diff(np.concatenate([[False], flat, [False]]).astype(np.int8))
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


# ----------------------------------------------------------------------------------------------
# the benchmark -> manifest rows


def strip_brackets(prompt: str) -> str:
    """The harness's prompt: "[" and "]" removed, nothing else."""
    return prompt.replace("[", "").replace("]", "")


def _check_entry(key: Any, item: Any) -> None:
    if not isinstance(key, str) or not re.fullmatch(r"\d{12}", key):
        raise ValueError(f"PIE-Bench id {key!r}: ids are 12-digit strings")
    if not isinstance(item, dict):
        raise ValueError(f"PIE-Bench id {key}: the entry must be an object, got {type(item).__name__}")
    missing = [f for f in FIELDS if f not in item]
    if missing:
        raise ValueError(f"PIE-Bench id {key}: missing field(s) {', '.join(missing)}")
    for f in FIELDS[:-1]:
        if not isinstance(item[f], str):
            raise ValueError(f"PIE-Bench id {key}: {f} must be a string, got {type(item[f]).__name__}")
    if item["editing_type_id"] not in TYPES:
        raise ValueError(f"PIE-Bench id {key}: editing_type_id {item['editing_type_id']!r} is not one of 0-9")
    path = item["image_path"]
    if not path or os.path.isabs(path) or ".." in path.replace("\\", "/").split("/"):
        raise ValueError(f"PIE-Bench id {key}: image_path {path!r} must be a path inside annotation_images/")
    for f in ("original_prompt", "editing_prompt"):
        if not strip_brackets(item[f]).strip():
            raise ValueError(f"PIE-Bench id {key}: {f} is empty")
    if item["blended_word"] != "" and len(item["blended_word"].split(" ")) < 2:
        raise ValueError(f"PIE-Bench id {key}: blended_word {item['blended_word']!r} must be \"source_word target_word\" or empty")
    mask = item["mask"]
    if not isinstance(mask, list) or len(mask) % 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in mask):
        raise ValueError(f"PIE-Bench id {key}: mask must be a list of [start, length] integer pairs")
    if any(v < 0 for v in mask) or any(s >= FRAME * FRAME for s in mask[::2]):
        raise ValueError(f"PIE-Bench id {key}: mask has a negative value or a start outside the 512x512 frame")


def _words(prompt: str) -> list[str]:
    return prompt.split(" ")


def edit_settings(original: str, editing: str, blended_word: str) -> dict:
    """One manifest edit as `run_editing_p2p.py` sets it up. A blended word missing from its
    prompt is a no-op there (its token list is empty); so it is here: an empty LocalBlend word
    list, no reweight."""
    src, tgt = strip_brackets(original), strip_brackets(editing)
    edit = {"prompt": tgt, **EDIT_SETTINGS}
    if blended_word:
        w_src, w_tgt = blended_word.split(" ")[:2]
        if w_tgt in _words(tgt):
            edit["equalizer"] = {w_tgt: REWEIGHT}
        edit["blend_words"] = [[w_src] if w_src in _words(src) else [], [w_tgt] if w_tgt in _words(tgt) else []]
        edit.update(BLEND_SETTINGS)
    return edit


def parse_types(text: Optional[str]) -> Optional[set[str]]:
    """"0,6" -> {"0", "6"}; None or "" -> None (every type)."""
    if not text:
        return None
    out = {t.strip() for t in text.split(",") if t.strip()}
    bad = sorted(out - set(TYPES))
    if bad:
        raise ValueError(f"unknown PIE-Bench editing type(s) {', '.join(bad)} (known: 0-9)")
    return out


def load_mapping(data_dir: str) -> dict:
    """`DATA_DIR/mapping_file.json`, every entry checked (one-line ValueError on the first bad one)."""
    path = os.path.join(data_dir, "mapping_file.json")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found (a PIE-Bench folder holds mapping_file.json and annotation_images/)")
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{path}: expected a non-empty object keyed by 12-digit ids")
    for key, item in mapping.items():
        _check_entry(key, item)
    return mapping


def read_benchmark(data_dir: str, types: Optional[set[str]] = None) -> list[dict]:
    """Manifest rows for the entries of the chosen editing types (all when None), in file order:
    {"image", "prompt", "name" (the id), "crop": None, "edits": [one edit], "pie_id",
    "editing_type_id", "image_path"}. Every entry is checked; a bad one raises ValueError
    naming its id."""
    if types is not None:
        bad = sorted(set(types) - set(TYPES))
        if bad:
            raise ValueError(f"unknown PIE-Bench editing type(s) {', '.join(bad)} (known: 0-9)")
    mapping = load_mapping(data_dir)
    images = os.path.join(os.path.abspath(data_dir), "annotation_images")
    rows = []
    for key, item in mapping.items():
        if types is not None and item["editing_type_id"] not in types:
            continue
        image = os.path.join(images, item["image_path"])
        if not os.path.isfile(image):
            raise ValueError(f"PIE-Bench id {key}: image {image} not found")
        rows.append(
            {
                "image": image,
                "prompt": strip_brackets(item["original_prompt"]),
                "name": key,
                "crop": None,
                "edits": [edit_settings(item["original_prompt"], item["editing_prompt"], item["blended_word"])],
                "pie_id": key,
                "editing_type_id": item["editing_type_id"],
                "image_path": item["image_path"],
            }
        )
    if not rows:
        raise ValueError(f"no PIE-Bench entries of type(s) {', '.join(sorted(types or []))} in {data_dir}")
    return rows


def write_manifest(rows: Iterable[dict], path: str) -> str:
    """The rows as a JSONL manifest for `nti-invert --manifest` (absolute image paths)."""
    write_jsonl(path, rows)
    return path


# ----------------------------------------------------------------------------------------------
# the harness's output layout


def text_panel(source: str, target: str, size: int = FRAME) -> np.ndarray:
    """uint8 (size, size, 3): the harness's text panel "source prompt: ...\\ntarget prompt: ...",
    black on white. The authors draw it with matplotlib (utils.txt_draw); matplotlib is no
    dependency here, so PIL draws the same two wrapped lines. evaluate.py never reads it."""
    from PIL import ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    y = 8
    for text in (f"source prompt: {source}", f"target prompt: {target}"):
        line = ""
        for word in text.split(" "):
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > size - 16:
                draw.text((8, y), line, fill="black", font=font)
                y, line = y + 22, word
            else:
                line = trial
        draw.text((8, y), line, fill="black", font=font)
        y += 30
    return np.asarray(img)


def to_frame(image: np.ndarray) -> np.ndarray:
    """uint8 (512, 512, 3): an output of another size resized with PIL's bicubic filter, the
    filter `load_512` used to bring the source down to the model's size (nearest would leave
    8x8 blocks at the toy model's 64 px and charge that to every metric)."""
    arr = np.asarray(image)
    if arr.shape[:2] == (FRAME, FRAME):
        return arr
    return np.asarray(Image.fromarray(arr).resize((FRAME, FRAME), Image.BICUBIC))


def finished_record(out_dir: str, row: dict) -> Optional[dict]:
    """The image's metrics.json when the run finished it with its edits, else None."""
    m = read_json(os.path.join(out_dir, row["name"], "metrics.json"))
    return m if m is not None and m.get("status") == "done" and m.get("edits") else None


def pnp_image_path(out_dir: str, method: str, image_path: str) -> str:
    """Where the harness keeps an entry's output: OUT/pnp/output/<method>/annotation_images/<image_path>."""
    if method not in PNP_METHODS:
        raise ValueError(f"method {method!r} has no PnPInversion counterpart (known: {', '.join(PNP_METHODS)})")
    return os.path.join(out_dir, "pnp", "output", PNP_METHODS[method][0], "annotation_images", image_path)


def write_pnp_layout(out_dir: str, data_dir: str, rows: Sequence[dict]) -> dict:
    """For every finished row of a run in OUT, the harness's 2048x512 image [text, gt (the source
    through load_512), reconstruction, edit], saved as the harness saves it (PIL, format and
    default quality from the extension of image_path: JPEG quality 75 for PIE-Bench's .jpg).
    Returns {"written": n, "missing": [ids without a finished result], "method": name}."""
    written, missing, methods = 0, [], set()
    for row in rows:
        res = finished_record(out_dir, row)
        if res is None:
            missing.append(row["pie_id"])
            continue
        methods.add(res.get("method"))
        folder = os.path.join(out_dir, row["name"])
        recon = np.asarray(Image.open(os.path.join(folder, "reconstruction.png")).convert("RGB"))
        edit = np.asarray(Image.open(os.path.join(folder, res["edits"][0]["file"])).convert("RGB"))
        gt = load_image(os.path.join(data_dir, "annotation_images", row["image_path"]), FRAME)
        panels = [text_panel(row["prompt"], row["edits"][0]["prompt"]), gt, to_frame(recon), to_frame(edit)]
        path = pnp_image_path(out_dir, res.get("method"), row["image_path"])
        with atomic_path(path) as tmp:
            fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
            Image.fromarray(np.concatenate(panels, axis=1)).save(tmp, format=fmt)
        written += 1
    if len(methods) > 1:
        raise ValueError(f"{out_dir} mixes inversion methods {sorted(methods)}; use one output folder per method")
    return {"written": written, "missing": missing, "method": methods.pop() if methods else None}
