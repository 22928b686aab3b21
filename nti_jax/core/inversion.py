"""Null-text inversion (Mokady et al. 2023) and its faster relatives, as one compiled program,
and the `Inversion` it returns with its file format.

`invert` encodes the images and prompts, then runs ONE jitted program: the DDIM pivot (w = 1,
lax.scan over timesteps) and, for "null-text", the per-timestep optimisation of the
unconditional embedding (lax.scan over timesteps; inside, a lax.while_loop of optax Adam steps
with the paper's early stop). Images in a batch are independent: each keeps its own early stop
and its own Adam state, so results equal one-at-a-time runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import PartitionSpec as P

from nti_jax.core import conditioning as cnd
from nti_jax.core import planning
from nti_jax.core.conditioning import Cond, TextCond
from nti_jax.errors import NtiError, PromptError
from nti_jax.io import ImageLike, atomic_path, load_image
from nti_jax.models.unet import REMAT_MODES
from nti_jax.loading.pipeline import Pipeline
from nti_jax.core.sampling import Denoiser, guide, model_schedule
from nti_jax.core.schedule import Schedule, denoise_step, invert_step
from nti_jax.core.settings import METHODS, InvertSettings

FORMAT_VERSION = "1"
BATCHED_FIELDS = ("x_T", "pivots", "null_embeddings", "cond_embeddings", "inner_iterations", "final_losses", "nonfinite")
Progress = Optional[Callable[[jax.Array], None]]


@struct.dataclass
class Inversion:
    """The result of `invert` for a batch of B images (B = 1 for one image).

    `pivots[:, k]` is the DDIM-inversion latent z*_k (k = 0 is the image's latent, k = T is x_T);
    `null_embeddings[:, i]` is phi used at sampling step i (timesteps[i], descending). For SDXL
    the two embeddings are `TextCond`s (token and pooled embeddings, `conditioning`).
    `inner_iterations`/`final_losses` are the null-text optimisation's Adam steps and last loss per
    step (zero for the other methods); `nonfinite` marks steps whose loss or gradient was NaN/inf
    (optimisation of that step stopped there, keeping the last finite phi).
    """

    x_T: jax.Array  # (B, h, w, C)
    pivots: jax.Array  # (B, T+1, h, w, C)
    null_embeddings: Cond  # (B, T, L, D); SDXL: TextCond((B, T, L, D), (B, T, P))
    cond_embeddings: Cond  # (B, L, D); SDXL: TextCond((B, L, D), (B, P))
    timesteps: jax.Array  # (T,)
    inner_iterations: jax.Array  # (B, T) int32
    final_losses: jax.Array  # (B, T) float32
    nonfinite: jax.Array  # (B, T) bool
    settings: InvertSettings = struct.field(pytree_node=False, default=InvertSettings())
    prompts: tuple = struct.field(pytree_node=False, default=())
    model: str = struct.field(pytree_node=False, default="")
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    image_size: int = struct.field(pytree_node=False, default=0)

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def num_images(self) -> int:
        return self.x_T.shape[0]

    def __getitem__(self, idx) -> "Inversion":
        """The inversion of image(s) `idx`, still batched (an int gives B = 1)."""
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        rows = np.arange(self.num_images)[idx]
        arrays = {k: cnd.take(getattr(self, k), rows) for k in BATCHED_FIELDS}
        return self.replace(**arrays, prompts=tuple(self.prompts[i] for i in rows))

    def save(self, path: str) -> None:
        """One safetensors file; settings, prompts and model name go in its metadata."""
        from safetensors.numpy import save_file

        tensors = {}
        for k in BATCHED_FIELDS + ("timesteps",):
            value = getattr(self, k)
            if isinstance(value, TextCond):  # SDXL: the pooled part beside the tokens
                tensors[k.replace("embeddings", "pooled")] = np.ascontiguousarray(np.asarray(value.pooled))
                value = value.tokens
            tensors[k] = np.ascontiguousarray(np.asarray(value))
        tensors["nonfinite"] = tensors["nonfinite"].astype(np.uint8)
        settings = self.settings.to_dict()
        method = settings.pop("method")
        settings.update(prediction_type=self.prediction_type, image_size=self.image_size)
        meta = {
            "format": "nti-jax-inversion",
            "version": FORMAT_VERSION,
            "method": method,
            "prompts": json.dumps(list(self.prompts)),
            "settings": json.dumps(settings),
            "model": self.model,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "Inversion":
        from nti_jax.loading.convert import read_safetensors

        try:
            tensors, meta = read_safetensors(path)
        except (OSError, NtiError) as e:
            raise NtiError(f"cannot read inversion file {path}: {e}") from None
        if meta.get("format") != "nti-jax-inversion":
            raise NtiError(f"{path} is not an nti-jax inversion file")
        try:
            stored = json.loads(meta["settings"])
            settings = InvertSettings.from_dict(dict(stored, method=meta["method"]))
            prompts = tuple(json.loads(meta["prompts"]))
            arrays = {k: jnp.asarray(np.array(tensors[k])) for k in BATCHED_FIELDS + ("timesteps",)}
            for k in ("null_embeddings", "cond_embeddings"):
                pooled = k.replace("embeddings", "pooled")
                if pooled in tensors:
                    arrays[k] = TextCond(arrays[k], jnp.asarray(np.array(tensors[pooled])))
        except (KeyError, TypeError, ValueError) as e:
            raise NtiError(f"{path} is a damaged nti-jax inversion file ({type(e).__name__}: {e})") from None
        arrays["nonfinite"] = arrays["nonfinite"].astype(bool)
        return cls(
            **arrays,
            settings=settings,
            prompts=prompts,
            model=meta.get("model", ""),
            prediction_type=stored.get("prediction_type", "epsilon"),
            image_size=int(stored.get("image_size", 0)),
        )


class InvertInputs(NamedTuple):
    """Everything the compiled program reads for a batch, prepared on the host."""

    z0: jax.Array  # (B, h, w, C)
    cond: Cond  # (B, L, D) or SDXL's TextCond
    null: Cond  # (B, L, D), the unconditional embedding per row
    sched: Schedule
    guidance: jax.Array  # () float32
    num_inner_steps: jax.Array  # () int32
    early_stop_epsilon: jax.Array  # () float32

    @staticmethod
    def specs(axis: str) -> "InvertInputs":
        """Partition specs of the fields: the images' rows split over `axis`, the rest replicated."""
        return InvertInputs(P(axis), P(axis), P(axis), P(), P(), P(), P())


class InvertOutputs(NamedTuple):
    pivots: jax.Array  # (B, T+1, h, w, C)
    phi: Cond  # (B, T, L, D) or SDXL's TextCond
    inner_iterations: jax.Array  # (B, T) int32
    final_losses: jax.Array  # (B, T) float32
    nonfinite: jax.Array  # (B, T) bool


def ddim_pivots(model: Denoiser, sched: Schedule, z0: jax.Array, cond: Cond) -> jax.Array:
    """DDIM inversion at w = 1 with the conditional embedding: (B, T+1, h, w, C), z*_0 .. z*_T."""
    n = sched.timesteps.shape[0]

    def step(z, k):
        i = n - 1 - k  # ascending timesteps
        t, a_t, a_prev = sched.timesteps[i], sched.alpha_t[i], sched.alpha_prev[i]
        # The latent sits at noise level t - stride: v converts with that level's alpha.
        z = invert_step(model.eps(z, t, a_prev, cond), z, a_t, a_prev)
        return z, z

    _, zs = jax.lax.scan(step, z0, jnp.arange(n))
    return jnp.concatenate([z0[:, None], jnp.moveaxis(zs, 0, 1)], axis=1)


class _Inner(NamedTuple):
    """The carry of one timestep's Adam loop; every field but `j` and `opt_state`'s count is per image."""

    j: jax.Array  # () int32, iterations run
    phi: Cond  # (B, L, D) or SDXL's TextCond
    opt_state: Any  # optax adam: (ScaleByAdamState, EmptyState)
    loss: jax.Array  # (B,) the last loss of a step taken
    active: jax.Array  # (B,) bool, still optimising
    bad: jax.Array  # (B,) bool, met a non-finite loss or gradient
    iters: jax.Array  # (B,) int32, Adam steps taken


def _take_rows(take: jax.Array, new_state, old_state):
    """Adam's state with the moments of images in `take` advanced; the step count is shared (it
    equals the steps taken by every image still active: a stopped image never resumes)."""
    adam, rest = new_state[0], new_state[1:]
    adam = adam._replace(mu=cnd.where_rows(take, adam.mu, old_state[0].mu), nu=cnd.where_rows(take, adam.nu, old_state[0].nu))
    return (adam,) + tuple(rest)


def null_text_step(model: Denoiser, sched: Schedule, pivots: jax.Array, inputs: InvertInputs, progress: Progress, carry, i,
                   *, remat: str = "none"):
    """One timestep i of the paper's optimisation: Adam on phi until the early stop, then advance
    z_bar with the optimised phi. carry = (z_bar (B,h,w,C), phi (B,L,D) or SDXL's TextCond, whose
    every leaf is optimised, the pooled embedding too). `remat` (REMAT_MODES)
    is what the inner-loop gradient recomputes instead of keeping; it does not change results."""
    z, phi = carry
    grad_model = with_remat(model, remat)
    n = sched.timesteps.shape[0]
    t, a_t, a_prev = sched.timesteps[i], sched.alpha_t[i], sched.alpha_prev[i]
    target = pivots[:, n - 1 - i]
    guidance = inputs.guidance
    eps_c = jax.lax.stop_gradient(model.eps(z, t, a_t, inputs.cond))
    threshold = inputs.early_stop_epsilon + i.astype(jnp.float32) * 2e-5
    opt = optax.adam(1e-2 * (1.0 - i.astype(jnp.float32) / 100.0))

    def losses(p):
        eps_u = grad_model.eps(z, t, a_t, p)
        pred = denoise_step(guide(eps_u, eps_c, guidance), z, a_t, a_prev)
        per_image = jnp.mean((pred - target) ** 2, axis=(1, 2, 3))
        return per_image.sum(), per_image

    def body(c: _Inner) -> _Inner:
        (_, loss), g = jax.value_and_grad(losses, has_aux=True)(c.phi)
        finite = jnp.isfinite(loss) & cnd.finite_rows(g)
        updates, new_state = opt.update(g, c.opt_state, c.phi)
        take = c.active & finite
        return _Inner(
            j=c.j + 1,
            phi=cnd.where_rows(take, optax.apply_updates(c.phi, updates), c.phi),
            opt_state=_take_rows(take, new_state, c.opt_state),
            loss=jnp.where(take, loss, c.loss),
            active=take & ~(loss < threshold),
            bad=c.bad | (c.active & ~finite),
            iters=c.iters + take.astype(jnp.int32),
        )

    b = z.shape[0]
    init = _Inner(
        jnp.int32(0), phi, opt.init(phi), jnp.zeros((b,), jnp.float32), jnp.ones((b,), bool), jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
    )
    out = jax.lax.while_loop(lambda c: (c.j < inputs.num_inner_steps) & jnp.any(c.active), body, init)
    # Advance with the optimised phi: only the unconditional call is new (eps_c is computed above);
    # `Denoiser.cfg_eps` makes the same two calls, so sampling replays this trajectory.
    z = denoise_step(guide(model.eps(z, t, a_t, out.phi), eps_c, guidance), z, a_t, a_prev)
    bad = out.bad | ~jnp.all(jnp.isfinite(z), axis=(1, 2, 3))
    if progress is not None:
        jax.debug.callback(progress, i)
    return (z, out.phi), (out.phi, out.iters, out.loss, bad)


def null_text_optimisation(model: Denoiser, pivots: jax.Array, inputs: InvertInputs, progress: Progress = None, *,
                           remat: str = "none"):
    """The paper's per-timestep optimisation of phi: (phi (B,T,...), iters, losses, nonfinite), each (B,T,...)."""
    n = inputs.sched.timesteps.shape[0]
    step = partial(null_text_step, model, inputs.sched, pivots, inputs, progress, remat=remat)
    _, outs = jax.lax.scan(step, (pivots[:, n], inputs.null), jnp.arange(n))
    return jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1), outs)


def invert_core(model: Denoiser, inputs: InvertInputs, *, method: str, progress: Progress = None, remat: str = "none") -> InvertOutputs:
    """The whole inversion of a batch, unjitted (`invert_program` jits it; parallel.py shards it).
    `remat`: one of REMAT_MODES ("auto" is resolved before, by `plan_program`)."""
    pivots = ddim_pivots(model, inputs.sched, inputs.z0, inputs.cond)
    b, n = inputs.z0.shape[0], inputs.sched.timesteps.shape[0]
    if method == "null-text":
        return InvertOutputs(pivots, *null_text_optimisation(model, pivots, inputs, progress, remat=remat))
    source = inputs.cond if method == "negative-prompt" else inputs.null
    phi = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a[:, None], (b, n) + a.shape[1:]), source)
    bad = jnp.broadcast_to(~jnp.all(jnp.isfinite(pivots), axis=(2, 3, 4))[:, 1:], (b, n))
    return InvertOutputs(pivots, phi, jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32), bad)


invert_program = jax.jit(invert_core, static_argnames=("method", "progress", "remat"))


def with_remat(model: Denoiser, remat: str) -> Denoiser:
    """`model` whose gradients recompute what `remat` (REMAT_MODES) says; the same results."""
    return model if remat == "none" else model.replace(module=model.module.clone(remat=remat))


@functools.lru_cache(maxsize=64)
def _residual_bytes(model: Denoiser, z: jax.ShapeDtypeStruct, context: Cond, remat: str) -> int:
    grad_model = with_remat(model, remat)

    def vjp(params, z, phi):
        (params, time_ids) = params
        f = lambda p: grad_model.replace(params=params, time_ids=time_ids).eps(z, jnp.int32(500), jnp.float32(0.5), p)
        return jax.vjp(f, phi)[1]

    jaxpr = jax.make_jaxpr(vjp)(model.params.tree, z, context).jaxpr
    inputs = set(jaxpr.invars)
    kept = {v for v in jaxpr.outvars if isinstance(v, jax.extend.core.Var) and v not in inputs}
    return sum(v.aval.size * np.dtype(v.aval.dtype).itemsize for v in kept)


def gradient_residual_bytes(model: Denoiser, batch: int, latent: Sequence[int], context: Any, remat: str = "none") -> int:
    """Bytes autodiff keeps between the forward and backward pass of one inner-loop gradient
    (w.r.t. phi) for `batch` images of latents (h, w, C) and conditioning of per-row shape
    `context` ((L, D), or SDXL's TextCond of shapes, `conditioning.row_shapes`), in the program's
    own dtypes: the residuals of `jax.vjp` that are not its inputs (parameters aside). Traced
    abstractly (nothing runs); the same figure on every backend."""
    spec = jax.ShapeDtypeStruct
    params = jax.tree_util.tree_map(lambda a: spec(a.shape, a.dtype), (model.params, model.time_ids))
    key = model.replace(params=_Hashable(params), time_ids=None)
    ctx = jax.tree_util.tree_map(lambda shape: spec((batch, *shape), jnp.float32), context, is_leaf=lambda x: isinstance(x, tuple))
    return _residual_bytes(key, spec((batch, *latent), jnp.float32), ctx, remat)


class _Hashable:
    """A pytree of ShapeDtypeStructs that hashes by its structure (the residual cache's key)."""

    def __init__(self, tree):
        self.tree, self.key = tree, str(jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), tree))

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self.key == other.key


def abstract_inputs(pipe: Pipeline, settings: InvertSettings, rows: int, sharding=None) -> InvertInputs:
    """The shapes and dtypes `prepare_inputs` gives for `rows` images (nothing encoded); the
    batched fields take `sharding` (e.g. a mesh's batch sharding), the rest are left unplaced."""
    latent = pipe.image_size // pipe.latent_factor
    cfg, f32, spec = pipe.unet.config, jnp.float32, jax.ShapeDtypeStruct
    batched = lambda shape: spec((rows, *shape), f32, sharding=sharding)
    t = settings.num_steps
    sched = Schedule(spec((t,), jnp.int32), spec((t,), f32), spec((t,), f32))
    cond = lambda: jax.tree_util.tree_map(batched, cond_shapes(pipe), is_leaf=lambda x: isinstance(x, tuple))
    return InvertInputs(batched((latent, latent, cfg.in_channels)), cond(), cond(), sched, spec((), f32), spec((), jnp.int32), spec((), f32))


def cond_shapes(pipe: Pipeline) -> Any:
    """The per-row shapes of a pipeline's conditioning: (L, D), or SDXL's TextCond((L, D), (P,))."""
    cfg = pipe.unet.config
    tokens = (pipe.max_tokens, cfg.cross_attention_dim)
    if pipe.is_sdxl:
        return TextCond(tokens, (cfg.pooled_dim,))
    return tokens


def param_bytes(model: Denoiser) -> int:
    """Bytes of the UNet's parameters."""
    return sum(a.size * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(model.params))


def check_remat(remat: str) -> None:
    if remat != "auto" and remat not in REMAT_MODES:
        raise ValueError(f"remat must be auto or one of {', '.join(REMAT_MODES)}, got {remat!r}")


def plan_program(model: Denoiser, method: str, remat: str, batch: int, lower: Callable[[int, str], Any], key: tuple,
                 max_device_memory: Optional[float] = None, latent: Sequence[int] = (), context: Any = ()) -> planning.Choice:
    """Remat mode and rows per call for `batch` images per device, from the compiled candidates
    (`planning.choose`): every mode for null-text under "auto", else the one given ("none" for
    the methods with no gradient). The gradient's residual bytes order the candidates."""
    check_remat(remat)
    modes = ("none",) if method != "null-text" else REMAT_MODES if remat == "auto" else (remat,)
    budget = planning.budget_bytes(max_device_memory, param_bytes(model))
    estimate = None
    if method == "null-text" and latent:
        estimate = lambda rows, mode: gradient_residual_bytes(model, rows, latent, context, mode)
    return planning.choose((method,) + key, batch, modes, lower, budget, estimate)


def rows_of(inputs: InvertInputs, rows: Sequence[int]) -> InvertInputs:
    """The inputs of images `rows` (the batched fields indexed, the rest as they are)."""
    idx = np.asarray(rows)
    return inputs._replace(z0=inputs.z0[idx], cond=cnd.take(inputs.cond, idx), null=cnd.take(inputs.null, idx))


def prepare_inputs(pipe: Pipeline, images: Sequence[np.ndarray], prompts: Sequence[str], settings: InvertSettings) -> InvertInputs:
    """Encode a batch of uint8 square images (already at the model's size) and their prompts."""
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise PromptError(f"the source prompt must be a non-empty caption of the image, got {p!r}")
    # Null-text starts from the "" prompt's embedding, as the notebook does, also where the model's
    # unconditional embedding is zeros (SDXL): from zeros the optimisation reaches 4.3 dB less on
    # the SDXL toy (README, "SDXL: what the authors' code leaves open").
    cond, null = cnd.as_float32(pipe.encode_with_null(prompts, zeros=False if settings.method == "null-text" else None))
    null = cnd.broadcast(null, (len(prompts),), drop=1)
    z0 = pipe.encode_image(np.stack(images)).astype(jnp.float32)
    return InvertInputs(
        z0, cond, null, model_schedule(pipe, settings.num_steps), jnp.float32(settings.guidance_scale),
        jnp.int32(settings.num_inner_steps), jnp.float32(settings.early_stop_epsilon),
    )


def assemble(pipe: Pipeline, settings: InvertSettings, prompts: Sequence[str], cond: Cond, timesteps: jax.Array, out: InvertOutputs) -> Inversion:
    """An `Inversion` from the program's outputs for rows with conditional embeddings `cond`."""
    return Inversion(
        x_T=out.pivots[:, -1],
        pivots=out.pivots,
        null_embeddings=out.phi,
        cond_embeddings=cond,
        timesteps=timesteps,
        inner_iterations=out.inner_iterations,
        final_losses=out.final_losses,
        nonfinite=out.nonfinite,
        settings=settings,
        prompts=tuple(prompts),
        model=pipe.name,
        prediction_type=pipe.scheduler_config.get("prediction_type", "epsilon"),
        image_size=pipe.image_size,
    )


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
    `InvertSettings`). `progress(i)` is called from the device after each null-text step.
    `remat`: what the null-text gradient recomputes instead of keeping ("none", "blocks", "full",
    see `models.unet.REMAT_MODES`), or "auto": the fastest whose compiled program fits the
    device's free memory, or `max_device_memory` GiB (`planning`); a batch that fits in no mode
    runs in several calls of fewer images. They change memory and time, not the result (in bf16
    a row's rounding depends on its call's batch).
    """
    if settings is None or overrides:
        settings = dataclasses.replace(settings or InvertSettings(), **overrides)
    images = as_list(image, "images")
    prompts = as_list(prompt, "prompts")
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    pixels = [load_image(im, pipe.image_size, crop) for im in images]
    inputs = prepare_inputs(pipe, pixels, prompts, settings)
    model = Denoiser.of(pipe)
    check_remat(remat)
    if remat != "auto" and max_device_memory is None:
        out = invert_program(model, inputs, method=settings.method, progress=progress, remat=remat)
        return assemble(pipe, settings, prompts, inputs.cond, inputs.sched.timesteps, out)
    b = len(images)
    spec = lambda rows: abstract_inputs(pipe, settings, rows)
    lower = lambda rows, mode: invert_program.lower(model, spec(rows), method=settings.method, progress=progress, remat=mode)
    key = (progress, model.module, model.prediction_type, planning.shape_key(model.params, spec(1)))
    choice = plan_program(model, settings.method, remat, b, lower, key, max_device_memory, inputs.z0.shape[1:], cond_shapes(pipe))
    outs = []
    for start in range(0, b, choice.rows):
        n = min(choice.rows, b - start)
        out = choice.compiled(model, rows_of(inputs, [start + r for r in planning.pad_rows(n, choice.rows)]))
        outs.append(cnd.take(out, slice(0, n)))
    out = cnd.concat(outs)
    return assemble(pipe, settings, prompts, inputs.cond, inputs.sched.timesteps, out)


__all__ = ["METHODS", "REMAT_MODES", "Inversion", "InvertInputs", "InvertOutputs", "InvertSettings", "invert", "invert_core", "invert_program", "gradient_residual_bytes", "plan_program"]
