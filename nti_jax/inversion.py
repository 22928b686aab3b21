"""Null-text inversion (Mokady et al. 2023) and its faster relatives, as one compiled program.

`invert` encodes the images and prompts, then runs ONE jitted program: the DDIM pivot (w = 1,
lax.scan over timesteps) and, for "null-text", the per-timestep optimisation of the
unconditional embedding (lax.scan over timesteps; inside, a lax.while_loop of optax Adam steps
with the paper's early stop). Images in a batch are independent: each keeps its own early stop
and its own Adam state, so results equal one-at-a-time runs.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from .errors import NtiError, PromptError
from .io import ImageLike, atomic_path, load_image
from .pipeline import Pipeline
from .sampling import cfg_eps, cfg_sample
from .schedule import Schedule, ddim_schedule, denoise_step, invert_step, to_eps

METHODS = ("null-text", "negative-prompt", "ddim", "direct")
FORMAT_VERSION = "1"


@struct.dataclass
class Inversion:
    """The result of `invert` for a batch of B images (B = 1 for one image).

    `pivots[:, k]` is the DDIM-inversion latent z*_k (k = 0 is the image's latent, k = T is x_T);
    `null_embeddings[:, i]` is phi used at sampling step i (timesteps[i], descending).
    `inner_iterations`/`final_losses` are the null-text optimisation's Adam steps and last loss per
    step (zero for the other methods); `nonfinite` marks steps whose loss or gradient was NaN/inf
    (optimisation of that step stopped there, keeping the last finite phi).
    """

    x_T: jax.Array  # (B, h, w, C)
    pivots: jax.Array  # (B, T+1, h, w, C)
    null_embeddings: jax.Array  # (B, T, L, D)
    cond_embeddings: jax.Array  # (B, L, D)
    timesteps: jax.Array  # (T,)
    inner_iterations: jax.Array  # (B, T) int32
    final_losses: jax.Array  # (B, T) float32
    nonfinite: jax.Array  # (B, T) bool
    method: str = struct.field(pytree_node=False, default="null-text")
    prompts: tuple = struct.field(pytree_node=False, default=())
    settings: tuple = struct.field(pytree_node=False, default=())  # sorted (key, value) pairs
    model: str = struct.field(pytree_node=False, default="")

    @property
    def num_images(self) -> int:
        return self.x_T.shape[0]

    def __getitem__(self, idx) -> "Inversion":
        """The inversion of image(s) `idx`, still batched (an int gives B = 1)."""
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        rows = np.arange(self.num_images)[idx]
        arrays = {k: getattr(self, k)[rows] for k in BATCHED_FIELDS}
        return self.replace(**arrays, prompts=tuple(self.prompts[i] for i in rows))

    def save(self, path: str) -> None:
        """One safetensors file; settings, prompts and model name go in its metadata."""
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(np.asarray(getattr(self, k))) for k in BATCHED_FIELDS + ("timesteps",)}
        tensors["nonfinite"] = tensors["nonfinite"].astype(np.uint8)
        meta = {
            "format": "nti-jax-inversion",
            "version": FORMAT_VERSION,
            "method": self.method,
            "prompts": json.dumps(list(self.prompts)),
            "settings": json.dumps(dict(self.settings)),
            "model": self.model,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "Inversion":
        from .convert import read_safetensors

        try:
            tensors, meta = read_safetensors(path)
        except (OSError, NtiError) as e:
            raise NtiError(f"cannot read inversion file {path}: {e}") from None
        if meta.get("format") != "nti-jax-inversion":
            raise NtiError(f"{path} is not an nti-jax inversion file")
        arrays = {k: jnp.asarray(np.array(v)) for k, v in tensors.items()}
        arrays["nonfinite"] = arrays["nonfinite"].astype(bool)
        return cls(
            **arrays,
            method=meta["method"],
            prompts=tuple(json.loads(meta["prompts"])),
            settings=tuple(sorted(json.loads(meta["settings"]).items())),
            model=meta.get("model", ""),
        )

    def schedule(self) -> dict:
        return dict(self.settings)


BATCHED_FIELDS = ("x_T", "pivots", "null_embeddings", "cond_embeddings", "inner_iterations", "final_losses", "nonfinite")


def ddim_pivots(unet_fn, prediction_type: str, sched: Schedule, z0: jax.Array, cond: jax.Array) -> jax.Array:
    """DDIM inversion at w = 1 with the conditional embedding: (B, T+1, h, w, C), z*_0 .. z*_T."""
    n = sched.timesteps.shape[0]

    def step(z, k):
        i = n - 1 - k  # ascending timesteps
        t, a_t, a_prev = sched.timesteps[i], sched.alpha_t[i], sched.alpha_prev[i]
        # The latent sits at noise level t - stride: v converts with that level's alpha.
        eps = to_eps(unet_fn(z, t, cond), z, a_prev, prediction_type)
        z = invert_step(eps, z, a_t, a_prev)
        return z, z

    _, zs = jax.lax.scan(step, z0, jnp.arange(n))
    return jnp.concatenate([z0[:, None], jnp.moveaxis(zs, 0, 1)], axis=1)


def null_text_optimisation(
    unet_fn,
    prediction_type: str,
    sched: Schedule,
    pivots: jax.Array,
    cond: jax.Array,
    null: jax.Array,
    guidance: jax.Array,
    num_inner_steps: jax.Array,
    early_stop_epsilon: jax.Array,
    progress: Optional[Callable[[int], None]] = None,
):
    """The paper's per-timestep optimisation of phi; returns (phi (B,T,L,D), iters, losses, nonfinite)."""
    n = sched.timesteps.shape[0]
    b = pivots.shape[0]
    row = lambda m: m.reshape((b,) + (1,) * 2)

    def step(carry, i):
        z, phi = carry
        t, a_t, a_prev = sched.timesteps[i], sched.alpha_t[i], sched.alpha_prev[i]
        target = pivots[:, n - 1 - i]
        eps_c = jax.lax.stop_gradient(to_eps(unet_fn(z, t, cond), z, a_t, prediction_type))
        threshold = early_stop_epsilon + i.astype(jnp.float32) * 2e-5
        opt = optax.adam(1e-2 * (1.0 - i.astype(jnp.float32) / 100.0))

        def losses(p):
            eps_u = to_eps(unet_fn(z, t, p), z, a_t, prediction_type)
            pred = denoise_step(eps_u + guidance * (eps_c - eps_u), z, a_t, a_prev)
            per_image = jnp.mean((pred - target) ** 2, axis=(1, 2, 3))
            return per_image.sum(), per_image

        def body(c):
            j, p, state, last, active, bad, iters = c
            (_, loss), g = jax.value_and_grad(losses, has_aux=True)(p)
            finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(g), axis=(1, 2))
            updates, new_state = opt.update(g, state, p)
            take = active & finite
            p = jnp.where(row(take), p + updates, p)
            # mu/nu are per image; the step count is shared, and equals the steps taken by
            # every image still active (a stopped image never resumes).
            state = jax.tree_util.tree_map(
                lambda new, old: jnp.where(row(take), new, old) if new.ndim == 3 else new, new_state, state
            )
            last = jnp.where(take, loss, last)
            iters = iters + take.astype(jnp.int32)
            bad = bad | (active & ~finite)
            active = take & ~(loss < threshold)
            return j + 1, p, state, last, active, bad, iters

        init = (
            jnp.int32(0),
            phi,
            opt.init(phi),
            jnp.zeros((b,), jnp.float32),
            jnp.ones((b,), bool),
            jnp.zeros((b,), bool),
            jnp.zeros((b,), jnp.int32),
        )
        _, phi, _, last, _, bad, iters = jax.lax.while_loop(
            lambda c: (c[0] < num_inner_steps) & jnp.any(c[4]), body, init
        )
        eps = cfg_eps(unet_fn, prediction_type, z, t, a_t, cond, phi, guidance)
        z = denoise_step(eps, z, a_t, a_prev)
        bad = bad | ~jnp.all(jnp.isfinite(z), axis=(1, 2, 3))
        if progress is not None:
            jax.debug.callback(progress, i)
        return (z, phi), (phi, iters, last, bad)

    _, (phis, iters, last, bad) = jax.lax.scan(step, (pivots[:, n], null), jnp.arange(n))
    swap = lambda a: jnp.moveaxis(a, 0, 1)
    return swap(phis), swap(iters), swap(last), swap(bad)


class InvertInputs(NamedTuple):
    """Everything the compiled program needs for a batch, prepared on the host."""

    z0: jax.Array  # (B, h, w, C)
    cond: jax.Array  # (B, L, D)
    null: jax.Array  # (B, L, D), the "" embedding per row
    sched: Schedule


class InvertSettings(NamedTuple):
    method: str
    num_steps: int
    guidance_scale: float
    num_inner_steps: int
    early_stop_epsilon: float
    prediction_type: str


def invert_core(unet, params, prediction_type: str, method: str, progress, sched, z0, cond, null, guidance, num_inner_steps, early_stop_epsilon):
    """The whole inversion of a batch, unjitted (`invert_program` jits it; parallel.py shards it).

    Returns (pivots, phi, inner_iterations, final_losses, nonfinite).
    """
    unet_fn = lambda x, t, c, hook=None: unet.apply({"params": params}, x, t, c, hook)
    pivots = ddim_pivots(unet_fn, prediction_type, sched, z0, cond)
    b, n = z0.shape[0], sched.timesteps.shape[0]
    if method == "null-text":
        return (pivots,) + null_text_optimisation(
            unet_fn, prediction_type, sched, pivots, cond, null, guidance, num_inner_steps, early_stop_epsilon, progress
        )
    source = cond if method == "negative-prompt" else null
    phi = jnp.broadcast_to(source[:, None], (b, n) + source.shape[1:])
    bad = jnp.broadcast_to(~jnp.all(jnp.isfinite(pivots), axis=(2, 3, 4))[:, 1:], (b, n))
    return pivots, phi, jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32), bad


CORE_STATIC = ("unet", "prediction_type", "method", "progress")
invert_program = jax.jit(invert_core, static_argnames=CORE_STATIC)


def core_args(pipe: Pipeline, inputs: InvertInputs, settings: InvertSettings, progress=None) -> dict:
    """Keyword arguments of `invert_core` for a prepared batch."""
    return dict(
        unet=pipe.unet,
        params=pipe.params["unet"],
        prediction_type=settings.prediction_type,
        method=settings.method,
        progress=progress,
        sched=inputs.sched,
        z0=inputs.z0,
        cond=inputs.cond,
        null=inputs.null,
        guidance=jnp.float32(settings.guidance_scale),
        num_inner_steps=jnp.int32(settings.num_inner_steps),
        early_stop_epsilon=jnp.float32(settings.early_stop_epsilon),
    )


def _as_list(x, what: str) -> list:
    if isinstance(x, np.ndarray) and x.ndim == 4:  # a uint8 batch (B, H, W, 3)
        return list(x)
    if isinstance(x, (str, np.ndarray)) or not isinstance(x, Sequence):
        return [x]
    if len(x) == 0:
        raise ValueError(f"no {what} given")
    return list(x)


def check_settings(
    pipe: Pipeline, method: str, num_steps: int, guidance_scale: float, num_inner_steps: int, early_stop_epsilon: float
) -> InvertSettings:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if num_inner_steps < 0:
        raise ValueError(f"num_inner_steps must be >= 0, got {num_inner_steps}")
    pred = pipe.scheduler_config.get("prediction_type", "epsilon")
    return InvertSettings(method, int(num_steps), float(guidance_scale), int(num_inner_steps), float(early_stop_epsilon), pred)


def model_schedule(pipe: Pipeline, num_steps: int) -> Schedule:
    """The model's DDIM schedule with `num_steps` steps, as device arrays."""
    return Schedule(*map(jnp.asarray, ddim_schedule(pipe.scheduler_config, num_steps)))


def prepare_inputs(pipe: Pipeline, images: Sequence[np.ndarray], prompts: Sequence[str], num_steps: int) -> InvertInputs:
    """Encode a batch of uint8 square images (already at the model's size) and their prompts."""
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise PromptError(f"the source prompt must be a non-empty caption of the image, got {p!r}")
    emb = pipe.encode_prompt(list(prompts) + [""])
    cond, null = emb[:-1], jnp.broadcast_to(emb[-1:], emb[:-1].shape)
    z0 = pipe.encode_image(np.stack(images))
    return InvertInputs(z0, cond, null, model_schedule(pipe, num_steps))


def assemble(pipe: Pipeline, inputs: InvertInputs, settings: InvertSettings, prompts: Sequence[str], outputs) -> Inversion:
    """An `Inversion` from the program's outputs."""
    pivots, phi, iters, losses, bad = outputs
    meta = settings._asdict()
    method = meta.pop("method")
    meta["image_size"] = pipe.image_size
    return Inversion(
        x_T=pivots[:, -1],
        pivots=pivots,
        null_embeddings=phi,
        cond_embeddings=inputs.cond,
        timesteps=inputs.sched.timesteps,
        inner_iterations=iters,
        final_losses=losses,
        nonfinite=bad,
        method=method,
        prompts=tuple(prompts),
        settings=tuple(sorted(meta.items())),
        model=pipe.name,
    )


def invert(
    pipe: Pipeline,
    image: ImageLike | Sequence[ImageLike],
    prompt: str | Sequence[str],
    *,
    method: str = "null-text",
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    num_inner_steps: int = 10,
    early_stop_epsilon: float = 1e-5,
    crop: Optional[Sequence[int]] = None,
    progress: Optional[Callable[[int], None]] = None,
) -> Inversion:
    """Invert one image or a batch (each with its own prompt) into an `Inversion`.

    `image`: a path, PIL image or uint8 HxWx3 array (or a list of them, or a (B,H,W,3) array),
    centre-cropped to a square and resized to the model's size; `crop` = (left, right, top,
    bottom) pixels trimmed first. `method`: "null-text" (the paper), "negative-prompt" (phi_t = the
    prompt's embedding), "ddim" (phi_t = the "" embedding; the paper's failing baseline at w > 1)
    or "direct" (the "ddim" embeddings, with the source branch pinned to the pivots while sampling,
    as PnP Inversion). The early stop is exactly `loss < early_stop_epsilon + i * 2e-5` (negative
    disables it). `progress(i)` is called from the device after each null-text step.
    """
    settings = check_settings(pipe, method, num_steps, guidance_scale, num_inner_steps, early_stop_epsilon)
    images = _as_list(image, "images")
    prompts = _as_list(prompt, "prompts")
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    pixels = [load_image(im, pipe.image_size, crop) for im in images]
    inputs = prepare_inputs(pipe, pixels, prompts, num_steps)
    outputs = invert_program(**core_args(pipe, inputs, settings, progress))
    return assemble(pipe, inputs, settings, prompts, outputs)


@partial(jax.jit, static_argnames=("pipe_unet", "prediction_type", "direct"))
def _reconstruct_program(pipe_unet, params, prediction_type: str, direct: bool, sched, x_T, cond, phi, pivots, guidance):
    unet_fn = lambda x, t, c, hook=None: pipe_unet.apply({"params": params}, x, t, c, hook)
    if direct:
        return pivots[:, 0]  # pinning the source branch to the pivots returns z*_0 exactly
    return cfg_sample(unet_fn, prediction_type, sched, x_T, cond, phi, guidance)


def inversion_schedule(pipe: Pipeline, inv: Inversion) -> Schedule:
    """The DDIM schedule an inversion was made with (checked against its stored timesteps)."""
    sched = model_schedule(pipe, inv.timesteps.shape[0])
    if not np.array_equal(np.asarray(sched.timesteps), np.asarray(inv.timesteps)):
        raise NtiError("this inversion was made with another scheduler config than the model's")
    return sched


def reconstruct(pipe: Pipeline, inv: Inversion) -> tuple[jax.Array, jax.Array]:
    """CFG sampling from x_T with phi_t per step: (images (B,H,W,3) in [0,1], latents (B,h,w,C))."""
    s = inv.schedule()
    z = _reconstruct_program(
        pipe.unet,
        pipe.params["unet"],
        s.get("prediction_type", "epsilon"),
        inv.method == "direct",
        inversion_schedule(pipe, inv),
        inv.x_T,
        inv.cond_embeddings,
        inv.null_embeddings,
        inv.pivots,
        jnp.float32(s.get("guidance_scale", 7.5)),
    )
    return pipe.decode_latents(z), z


def generate(
    pipe: Pipeline, prompts: Sequence[str], *, num_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0, x_T=None
) -> np.ndarray:
    """Text-to-image CFG DDIM sampling with the "" embedding as the unconditional one, from `x_T`
    (B, h, w, C) or Gaussian noise drawn from `seed`: float32 (B, H, W, 3) in [0, 1]. The same
    compiled program as `reconstruct`."""
    prompts = _as_list(prompts, "prompts")
    settings = check_settings(pipe, "ddim", num_steps, guidance_scale, 0, -1.0)
    s = pipe.unet.config
    shape = (len(prompts), s.sample_size, s.sample_size, s.in_channels)
    x_T = jax.random.normal(jax.random.PRNGKey(seed), shape) if x_T is None else jnp.asarray(x_T, jnp.float32)
    if x_T.shape != shape:
        raise ValueError(f"x_T must have shape {shape}, got {x_T.shape}")
    cond = pipe.encode_prompt(prompts)
    uncond = jnp.broadcast_to(pipe.encode_prompt([""])[:, None], (len(prompts), num_steps, *cond.shape[1:]))
    z = _reconstruct_program(
        pipe.unet, pipe.params["unet"], settings.prediction_type, False,
        model_schedule(pipe, num_steps), x_T, cond, uncond, None, jnp.float32(settings.guidance_scale),
    )
    return np.asarray(pipe.decode_latents(z))
