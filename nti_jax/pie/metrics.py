"""PIE-Bench metrics of a run, computed as PnPInversion's `evaluation/evaluate.py` computes them:
PSNR, MSE and SSIM on the unedited part (1 - mask, masked pixels zeroed in both images, the
metric over the whole 512x512 frame; NaN when the region is empty), per editing type and overall;
LPIPS, DINO structure distance and CLIP similarity only where their weights are on disk."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from nti_jax.io import atomic_path
from nti_jax.pie.bench import (
    FRAME,
    PNP_METHODS,
    TYPES,
    finished_record,
    load_mapping,
    mask_decode,
    pnp_image_path,
    strip_brackets,
)

METRICS = ("psnr", "mse", "ssim")  # on the unedited part
MODEL_METRICS = ("lpips", "structure_distance", "clip_whole", "clip_edited")
SCALE = {"psnr": 1.0, "mse": 1e4, "ssim": 1e2, "lpips": 1e3, "structure_distance": 1e3, "clip_whole": 1.0, "clip_edited": 1.0, "recon_psnr": 1.0}
LABEL = {
    "psnr": "PSNR",
    "mse": "MSE x1e4",
    "ssim": "SSIM x1e2",
    "lpips": "LPIPS x1e3",
    "structure_distance": "structure x1e3",
    "clip_whole": "CLIP whole",
    "clip_edited": "CLIP edited",
    "recon_psnr": "recon PSNR",
}

def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    d = np.arange((1 - size) / 2, (1 + size) / 2)
    g = np.exp(-((d / sigma) ** 2) / 2)
    return g / g.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, border: str = "valid") -> float:
    """SSIM of two (H, W, C) float images as torchmetrics' structural_similarity_index_measure
    (gaussian kernel 11, sigma 1.5, k1 0.01, k2 0.03, reflect padding by 5). border "valid":
    the map's 5-pixel border dropped before the mean, as torchmetrics did until 1.5 (PR #2721,
    2024-09), the versions PIE-Bench's published numbers were computed with; "full": the whole
    map, torchmetrics >= 1.5."""
    from scipy.ndimage import correlate1d

    if border not in ("valid", "full"):
        raise ValueError(f"border must be 'valid' or 'full', got {border!r}")
    g = _gaussian()
    pad = len(g) // 2

    def blur(x):  # (H, W, C) -> same; scipy's "mirror" is torch's "reflect"
        return correlate1d(correlate1d(x, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = np.maximum(blur(a * a) - mu_a**2, 0.0)
    var_b = np.maximum(blur(b * b) - mu_b**2, 0.0)
    cov = blur(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    if border == "valid":
        m = m[pad:-pad, pad:-pad]
    return float(m.mean())


def masked_metrics(src: np.ndarray, tgt: np.ndarray, region: np.ndarray, ssim_border: str = "valid") -> dict:
    """PSNR, MSE and SSIM as evaluate.py computes its *_unedit_part / *_edit_part metrics: both
    uint8 (512, 512, 3) images divided by 255, the pixels outside `region` (H, W) of 0/1 set to
    zero in BOTH, the metric over the whole frame; NaN for all three when the region is empty."""
    region = np.asarray(region, np.float64)
    if region.sum() == 0:
        return {k: math.nan for k in METRICS}
    a = np.asarray(src, np.float64) / 255.0 * region[..., None]
    b = np.asarray(tgt, np.float64) / 255.0 * region[..., None]
    mse = float(np.mean((a - b) ** 2))
    return {
        "psnr": math.inf if mse == 0 else float(10 * np.log10(1.0 / mse)),
        "mse": mse,
        "ssim": ssim(a, b, 1.0, ssim_border),
    }


def model_metrics_status() -> dict[str, Optional[str]]:
    """For each weight-based metric of evaluate.py, None when it can run here (packages and
    weights on disk), else what is missing. Nothing is downloaded."""
    status: dict[str, Optional[str]] = {}
    try:
        import torch
        import torchmetrics  # noqa: F401
    except ImportError as e:
        return {k: f"needs torch and torchmetrics ({e.name} is not installed)" for k in MODEL_METRICS}
    hub = torch.hub.get_dir()
    try:
        import torchvision  # noqa: F401

        have_tv = None
    except ImportError:
        have_tv = "torchvision is not installed"
    squeeze = os.path.join(hub, "checkpoints", "squeezenet1_1-b8a52dc0.pth")
    status["lpips"] = have_tv or (None if os.path.isfile(squeeze) else f"the squeezenet weights {squeeze} are not on disk")
    dino_repo = os.path.join(hub, "facebookresearch_dino_main")
    dino_ckpt = os.path.join(hub, "checkpoints", "dino_vitbase8_pretrain.pth")
    status["structure_distance"] = have_tv or (
        None if os.path.isfile(os.path.join(dino_repo, "hubconf.py")) and os.path.isfile(dino_ckpt) else f"DINO ViT-B/8 ({dino_repo}, {dino_ckpt}) is not on disk"
    )
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache("openai/clip-vit-large-patch14", "model.safetensors")
        found = found if isinstance(found, str) else try_to_load_from_cache("openai/clip-vit-large-patch14", "pytorch_model.bin")
        clip = None if isinstance(found, str) else "openai/clip-vit-large-patch14 is not in the Hugging Face cache"
    except ImportError:
        clip = "huggingface_hub is not installed"
    status["clip_whole"] = status["clip_edited"] = clip
    return status


class _ModelMetrics:
    """evaluate.py's weight-based metrics (MetricsCalculator), built only from local files.
    Not exercised in this workplace: no weights can be fetched here."""

    def __init__(self, names: Sequence[str]):
        import torch

        self.torch = torch
        self.names = set(names)
        if "lpips" in self.names:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.lpips = LearnedPerceptualImagePatchSimilarity(net_type="squeeze")
        if self.names & {"clip_whole", "clip_edited"}:
            from torchmetrics.multimodal import CLIPScore

            self.clip = CLIPScore(model_name_or_path="openai/clip-vit-large-patch14")
        if "structure_distance" in self.names:
            from torchvision import transforms

            hub = torch.hub.get_dir()
            self.dino = torch.hub.load(os.path.join(hub, "facebookresearch_dino_main"), "dino_vitb8", source="local").eval()
            self.dino_tf = transforms.Compose(
                [transforms.Resize(224, max_size=480), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
            )

    def _tensor(self, img):  # (H, W, 3) -> (1, 3, H, W) float32
        return self.torch.tensor(np.asarray(img, np.float32)).permute(2, 0, 1).unsqueeze(0)

    def _key_self_sim(self, img):  # LossG / VitExtractor: layer-11 keys' cosine self-similarity
        torch = self.torch
        grabbed = []
        hook = self.dino.blocks[11].attn.qkv.register_forward_hook(lambda m, i, o: grabbed.append(o))
        x = self.dino_tf(self._tensor(img)[0]).unsqueeze(0)
        with torch.no_grad():
            self.dino(x)
        hook.remove()
        t = 1 + (x.shape[2] // 8) * (x.shape[3] // 8)
        k = grabbed[0].reshape(t, 3, 12, 64).permute(1, 2, 0, 3)[1]  # (heads, tokens, 64)
        k = k.transpose(0, 1).reshape(t, -1)
        n = k.norm(dim=1, keepdim=True)
        return (k @ k.T) / torch.clamp(n @ n.T, min=1e-8)

    def __call__(self, src, tgt, mask, prompt) -> dict:
        torch = self.torch
        out = {}
        with torch.no_grad():
            if "lpips" in self.names:
                keep = (1 - mask)[..., None]
                if keep.sum() == 0:
                    out["lpips"] = math.nan
                else:
                    a, b = self._tensor(src / 255.0 * keep), self._tensor(tgt / 255.0 * keep)
                    out["lpips"] = float(self.lpips(a * 2 - 1, b * 2 - 1))
            if "structure_distance" in self.names:
                out["structure_distance"] = float(torch.nn.functional.mse_loss(self._key_self_sim(src), self._key_self_sim(tgt)))
            if "clip_whole" in self.names:
                out["clip_whole"] = float(self.clip(torch.tensor(np.asarray(tgt)).permute(2, 0, 1), prompt))
            if "clip_edited" in self.names:
                edited = np.uint8(np.asarray(tgt) * mask[..., None])
                out["clip_edited"] = math.nan if mask.sum() == 0 else float(self.clip(torch.tensor(edited).permute(2, 0, 1), prompt))
        return out


def _mean(values: list) -> tuple[Optional[float], int]:
    finite = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return (float(np.mean(finite)) if finite else None), len(values) - len(finite)


def _table(per_image: list[dict], columns: list[str]) -> dict:
    groups: dict[str, list[dict]] = {}
    for r in per_image:
        groups.setdefault(r["editing_type_id"], []).append(r)
    out = {}
    for name, rs in [(t, groups[t]) for t in sorted(groups)] + [("all", per_image)]:
        entry: dict[str, Any] = {"images": len(rs)}
        for c in columns:
            mean, nans = _mean([r[c] for r in rs])
            entry[c] = None if mean is None else mean * SCALE[c]
            entry[f"{c}_nan"] = nans
        out[name] = entry
    return out


def _markdown(table: dict, columns: list[str], method: str) -> str:
    head = ["type", "images"] + [LABEL[c] for c in columns] + ["NaN excluded"]
    lines = [f"PIE-Bench metrics, {method} (unedited part; means over images, NaN excluded)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in table.items():
        label = "all" if name == "all" else f"{name} {TYPES[name]}"
        cells = [label, str(e["images"])] + ["-" if e[c] is None else f"{e[c]:.2f}" for c in columns]
        nans = max((e[f"{c}_nan"] for c in columns), default=0)
        lines.append("| " + " | ".join(cells + [str(nans)]) + " |")
    return "\n".join(lines) + "\n"


def _score(data_dir: str, out_dir: str, rows: Sequence[dict], ssim_border: str, models) -> tuple[list, list, set]:
    """Per-image metrics from the PnP layout: (per_image, ids missing an output, methods seen)."""
    mapping = load_mapping(data_dir)
    per_image, missing, methods = [], [], set()
    for row in rows:
        res = finished_record(out_dir, row)
        path = pnp_image_path(out_dir, res["method"], row["image_path"]) if res else None
        if path is None or not os.path.isfile(path):
            missing.append(row["pie_id"])
            continue
        methods.add(res["method"])
        item = mapping[row["pie_id"]]
        src = np.asarray(Image.open(os.path.join(data_dir, "annotation_images", item["image_path"])))
        out = np.asarray(Image.open(path))
        if src.shape != (FRAME, FRAME, 3) or out.shape[0] != FRAME or out.shape[1] < 3 * FRAME:
            raise ValueError(f"PIE-Bench id {row['pie_id']}: expected a 512x512 RGB source and a 2048x512 output, got {src.shape} and {out.shape}")
        edit, recon = out[:, -FRAME:], out[:, -2 * FRAME : -FRAME]
        mask = mask_decode(item["mask"])
        entry = {"pie_id": row["pie_id"], "editing_type_id": item["editing_type_id"], **masked_metrics(src, edit, 1 - mask, ssim_border)}
        entry["recon_psnr"] = masked_metrics(src, recon, 1 - mask, ssim_border)["psnr"]
        if models is not None:
            entry.update(models(src, edit, mask, strip_brackets(item["editing_prompt"])))
        per_image.append(entry)
    return per_image, missing, methods


def evaluate(data_dir: str, out_dir: str, rows: Sequence[dict], ssim_border: str = "valid") -> dict:
    """Metrics of a run from its PnP layout (`write_pnp_layout` first), read as evaluate.py reads
    them: the source image file as it is, the edit = the bottom-right 512x512 of the output,
    mask = mask_decode of the entry. PSNR, MSE, SSIM on the unedited part (1 - mask), and the
    reconstruction panel's PSNR on the same part; the weight-based metrics where
    `model_metrics_status` finds them. Per editing type and overall, means over images with NaN
    excluded and counted, scaled as papers report (MSE x1e4, SSIM x1e2, LPIPS and structure
    x1e3). Writes OUT/pie_bench_metrics.json and OUT/pie_bench_metrics.md; returns the json."""
    status = model_metrics_status()
    runnable = [k for k, v in status.items() if v is None]
    per_image, missing, methods = _score(data_dir, out_dir, rows, ssim_border, _ModelMetrics(runnable) if runnable else None)
    if not per_image:
        raise ValueError(f"no PnP-layout outputs under {out_dir}/pnp (run write_pnp_layout after the run)")
    if len(methods) > 1:
        raise ValueError(f"{out_dir} mixes inversion methods {sorted(methods)}; use one output folder per method")
    method = methods.pop()
    columns = list(METRICS) + [k for k in MODEL_METRICS if k in runnable] + ["recon_psnr"]
    result = _result_json(data_dir, out_dir, method, ssim_border, columns, per_image, missing, status)
    _write_outputs(out_dir, result, columns)
    return result


def _result_json(data_dir, out_dir, method, ssim_border, columns, per_image, missing, status) -> dict:
    """The metrics file's content: the table, per-image rows, what was not run, evaluate.py's command."""
    table = _table(per_image, columns)
    not_run = {k: v for k, v in status.items() if v is not None}
    types = sorted({r["editing_type_id"] for r in per_image})
    result = {
        "method": method,
        "pnp_method": PNP_METHODS[method][1],
        "ssim_border": ssim_border,
        "scale": {c: SCALE[c] for c in columns},
        "table": table,
        "per_image": per_image,
        "missing": missing,
        "not_run": not_run,
        "evaluate_py": (
            f"cd {os.path.join(os.path.abspath(out_dir), 'pnp')} && PYTHONPATH=<PnPInversion> python <PnPInversion>/evaluation/evaluate.py "
            f"--annotation_mapping_file {os.path.join(os.path.abspath(data_dir), 'mapping_file.json')} "
            f"--src_image_folder {os.path.join(os.path.abspath(data_dir), 'annotation_images')} "
            f"--tgt_methods {PNP_METHODS[method][1]} --edit_category_list {' '.join(types)} --result_path evaluation_result.csv"
        ),
    }
    return result


def _write_outputs(out_dir: str, result: dict, columns: list[str]) -> None:
    """OUT/pie_bench_metrics.json and the markdown table OUT/pie_bench_metrics.md."""
    with atomic_path(os.path.join(out_dir, "pie_bench_metrics.json")) as tmp, open(tmp, "w") as f:
        json.dump(result, f, indent=2, allow_nan=True)
    md = _markdown(result["table"], columns, result["method"])
    not_run, missing = result["not_run"], result["missing"]
    if not_run:
        md += "\nNot computed: " + "; ".join(f"{k}: {v}" for k, v in not_run.items()) + "\n"
    if missing:
        md += f"\nNo output for {len(missing)} entr{'y' if len(missing) == 1 else 'ies'}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}\n"
    with atomic_path(os.path.join(out_dir, "pie_bench_metrics.md")) as tmp, open(tmp, "w") as f:
        f.write(md)
