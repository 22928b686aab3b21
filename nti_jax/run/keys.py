"""What a run's outputs are keyed by, and an image's metrics.

An image's output is keyed by its request and everything the inversion and edits depend on (the
image file's size and time, the settings, the model files); a run by its images' keys and the
options that change outputs (`run_key`): workers with one run key share a folder.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Sequence

import numpy as np

from nti_jax.io import psnr
from nti_jax.run.manifest import Item
from nti_jax.run.config import RunConfig
from nti_jax.core.settings import InvertSettings


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(model: str) -> list:
    """The model as it is on disk: weight files' sizes and times (a hub id: the id)."""
    if not os.path.isdir(model):
        return [model]
    out = [os.path.abspath(model)]
    for f in sorted(glob.glob(os.path.join(model, "*", "*"))):
        if f.endswith((".safetensors", ".bin", ".json")):
            st = os.stat(f)
            out.append([os.path.relpath(f, model), st.st_size, st.st_mtime_ns])
    return out


def item_keys(it: Item, settings: InvertSettings, dtype: str, model_fp: list) -> tuple[str, str]:
    """(inversion key, whole-output key): what the inversion and the image's outputs depend on."""
    try:
        st = os.stat(it.image)
        stamp = [st.st_size, st.st_mtime_ns]
    except OSError:
        stamp = None
    s = settings
    inv = {
        "image": os.path.abspath(it.image), "stamp": stamp, "crop": it.crop, "prompt": it.prompt,
        "method": s.method, "steps": s.num_steps, "guidance": s.guidance_scale, "inner_steps": s.num_inner_steps,
        "early_stop_eps": s.early_stop_epsilon, "dtype": dtype, "model": model_fp,
    }
    inversion_key = _hash(inv)
    return inversion_key, _hash([inversion_key, it.edits])


def image_metrics(it: Item, inv, cfg: RunConfig, inv_seconds: float, warnings: Sequence[str] = ()) -> dict:
    """metrics.json of an inverted image before its files are written."""
    iters = np.asarray(inv.inner_iterations[0])
    s = cfg.settings
    return {
        "name": it.name, "image": it.image, "prompt": it.prompt, "status": "running",
        "method": s.method, "num_steps": s.num_steps, "guidance_scale": s.guidance_scale,
        "num_inner_steps": s.num_inner_steps, "early_stop_epsilon": s.early_stop_epsilon, "dtype": cfg.dtype,
        "model": os.path.abspath(cfg.model) if os.path.isdir(cfg.model) else cfg.model,
        "inner_iterations": int(iters.sum()),
        "inner_iterations_per_step": iters.tolist(),
        "final_losses": np.asarray(inv.final_losses[0]).tolist(),
        "nonfinite_steps": int(np.asarray(inv.nonfinite[0]).sum()),
        "inversion_seconds": round(inv_seconds, 4),
        "key": it.key,
        "inversion_key": None,
        "warnings": list(warnings),
    }


def add_reconstruction(metrics: dict, pixels: np.ndarray, inv, image, latent, vae_image) -> bool:
    """Add PSNR (reconstruction and VAE bound) and latent MSE to `metrics`; False when the
    inversion or its reconstruction is not finite (its PSNR is then None)."""
    image, z, vae = np.asarray(image), np.asarray(latent), np.asarray(vae_image)
    z0 = np.asarray(inv.pivots[0, 0])
    finite = bool(metrics["nonfinite_steps"] == 0 and np.isfinite(z).all() and np.isfinite(image).all())
    metrics.update(
        psnr=psnr(image, pixels) if finite else None,
        vae_psnr=psnr(vae, pixels) if np.isfinite(vae).all() else None,
        latent_mse=float(np.mean((z.astype(np.float64) - z0) ** 2)) if finite else None,
    )
    return finite


def run_key(items: Sequence[Item], cfg: RunConfig) -> str:
    """One key for the whole run (images with their keys, and the options that change outputs)."""
    return _hash([[it.name, it.key] for it in items] + [cfg.outputs()])
