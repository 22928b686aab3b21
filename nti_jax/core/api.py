"""The library's calls: `invert`, `reconstruct`, `edit`, `edit_latents`, `attention_maps` and
`generate`. Each runs the compiled programs the command line runs (`parallel.ShardedInverter`
over a mesh of the first local device): one road, one compile per program and shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nti_jax.loading import conditioning as cnd
from nti_jax.core.controllers import Controller
from nti_jax.core.inversion import BATCHED_FIELDS, Inversion
from nti_jax.core.null_text import Progress, check_source_prompt
from nti_jax.core.p2p import edit_spec
from nti_jax.core.parallel import EditJob, EditResult, ShardedInverter, inverter_on, local_mesh
from nti_jax.core.sampling import Denoiser, model_schedule, sample_core
from nti_jax.core.settings import InvertSettings
from nti_jax.errors import NtiError
from nti_jax.io import ImageLike, load_image
from nti_jax.loading.pipeline import Pipeline


def library_inverter() -> ShardedInverter:
    """The inverter the library calls share: a mesh of this process's first device."""
    return inverter_on(local_mesh(jax.local_devices()[:1]))


def as_list(x, what: str) -> list:
    """One item or a sequence of them as a non-empty list (a (B,H,W,3) array is B images)."""
    if isinstance(x, np.ndarray) and x.ndim == 4:
        return list(x)
    if isinstance(x, (str, np.ndarray)) or not isinstance(x, Sequence):
        return [x]
    if len(x) == 0:
        raise ValueError(f"no {what} given")
    return list(x)


def invert(
    pipe: Pipeline,
    image: ImageLike | Sequence[ImageLike],
    prompt: str | Sequence[str],
    settings: Optional[InvertSettings] = None,
    *,
    crop: Optional[Sequence[int]] = None,
    progress: Progress = None,
    remat: str = "auto",
    max_device_memory: Optional[float] = None,
    **overrides: Any,
) -> Inversion:
    """Invert one image or a batch (each with its own prompt) into an `Inversion`.

    `image`: a path, PIL image or uint8 HxWx3 array (or a list of them, or a (B,H,W,3) array),
    centre-cropped to a square and resized to the model's size; `crop` = (left, right, top,
    bottom) pixels trimmed first. Settings: an `InvertSettings` and/or its fields as keywords
    (`method`, `num_steps`, `guidance_scale`, `num_inner_steps`, `early_stop_epsilon`; see
    `InvertSettings`). `progress(i)` is called from the device after each null-text step (a
    program with a host callback: JAX's persistent cache does not keep it).
    `remat`: what the null-text gradient recomputes instead of keeping ("none", "blocks", "full",
    see `models.unet.REMAT_MODES`), or "auto": the fastest whose compiled program fits the
    device's free memory, or `max_device_memory` GiB (`planning`); a batch that fits in no mode
    runs in several calls of fewer images, and so does one whose call runs out of device memory
    all the same (`oom`). They change memory and time, not the result (in bf16 a row's rounding
    depends on its call's batch).
    """
    if settings is None or overrides:
        settings = dataclasses.replace(settings or InvertSettings(), **overrides)
    images = as_list(image, "images")
    prompts = as_list(prompt, "prompts")
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    for p in prompts:
        check_source_prompt(p)
    pixels = [load_image(im, pipe.image_size, crop) for im in images]
    batches = library_inverter().invert(pipe, pixels, prompts, settings, progress, remat=remat, max_device_memory=max_device_memory)
    if len(batches) == 1 and batches[0].n == batches[0].inv.num_images:
        return batches[0].inv
    whole = [b.inv[: b.n] for b in batches]
    arrays = {k: cnd.concat([getattr(w, k) for w in whole]) for k in BATCHED_FIELDS}
    return whole[0].replace(**arrays, prompts=tuple(prompts))


def reconstruct(pipe: Pipeline, inv: Inversion) -> tuple[jax.Array, jax.Array]:
    """CFG sampling from x_T with phi_t per step: (images (B,H,W,3) in [0,1], latents (B,h,w,C))."""
    out = library_inverter().reconstruct(pipe, inv)
    return out.images, out.latents


def _one(pipe: Pipeline, inv: Inversion, targets: Sequence[str], controller: Controller | None, edit: bool) -> EditResult:
    if inv.num_images != 1:
        raise NtiError(f"edit one image at a time: this inversion holds {inv.num_images} (use inv[i])")
    spec = edit_spec(pipe, inv, targets, controller=controller, edit=edit)
    (result,) = library_inverter().edit(pipe, inv, [EditJob(0, spec)])
    if isinstance(result, Exception):
        raise result
    return result


def edit_latents(pipe: Pipeline, inv: Inversion, targets: Sequence[str], *, controller: Controller | None = None,
                 edit: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The edit's final latents (1 + n, h, w, C) and its stored cross-attention maps (1 + n, s, s, L)
    (see `attention_maps`); `edit=False` samples the rows without a controller."""
    result = _one(pipe, inv, targets, controller, edit)
    return result.latents, result.maps


def edit(pipe: Pipeline, inv: Inversion, target_prompts: Sequence[str], *, controller: Controller | None = None) -> np.ndarray:
    """Edit an inverted image: float32 (1 + n, H, W, 3) in [0, 1], the source reconstruction
    first, then one image per target prompt, from one compiled batched sampling loop."""
    return _one(pipe, inv, target_prompts, controller, True).images


def attention_maps(pipe: Pipeline, inv: Inversion, prompts: Sequence[str] = (), *, controller: Controller | None = None) -> np.ndarray:
    """Per-token cross-attention maps (R, s, s, 77) of the conditional rows, averaged over heads,
    steps and the down/up layers at the smallest non-mid cross-attention resolution s (16 for SD
    at 512 px, the notebook's aggregate_attention); rows: the source, then `prompts` when given,
    edited by `controller` (or the automatic one): target rows hold the edited maps, as stored by
    the original's AttentionStore."""
    return _one(pipe, inv, list(prompts), controller, bool(prompts)).maps


_generate_program = jax.jit(sample_core, static_argnames=("direct",))


def generate(
    pipe: Pipeline, prompts: Sequence[str], *, num_steps: int = InvertSettings.num_steps,
    guidance_scale: float = InvertSettings.guidance_scale, seed: int = 0, x_T=None,
) -> np.ndarray:
    """Text-to-image CFG DDIM sampling with the "" embedding as the unconditional one, from `x_T`
    (B, h, w, C) or Gaussian noise drawn from `seed`: float32 (B, H, W, 3) in [0, 1]. The
    sampling loop of `reconstruct` without an inversion (the command line has no counterpart)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    settings = InvertSettings(method="ddim", num_steps=num_steps, guidance_scale=guidance_scale)
    s = pipe.unet.config
    shape = (len(prompts), s.sample_size, s.sample_size, s.in_channels)
    x_T = jax.random.normal(jax.random.PRNGKey(seed), shape) if x_T is None else jnp.asarray(x_T, jnp.float32)
    if x_T.shape != shape:
        raise ValueError(f"x_T must have shape {shape}, got {x_T.shape}")
    cond, null = pipe.encode_with_null(prompts)
    uncond = cnd.broadcast(null, (len(prompts), settings.num_steps), drop=1)
    z = _generate_program(
        Denoiser.of(pipe), model_schedule(pipe, settings.num_steps), x_T, cond, uncond, None,
        jnp.float32(settings.guidance_scale), direct=False,
    )
    return np.asarray(pipe.decode_latents(z))
