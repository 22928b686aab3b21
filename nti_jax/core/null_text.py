"""The inversion program (Mokady et al. 2023, and its faster relatives): the DDIM pivot (w = 1,
lax.scan over timesteps) and, for "null-text", the per-timestep optimisation of the unconditional
embedding (lax.scan over timesteps; inside, a lax.while_loop of optax Adam steps with the paper's
early stop), as one function of a batch's prepared inputs. Images in a batch are independent:
each keeps its own early stop and its own Adam state, so results equal one-at-a-time runs.
`parallel.sharded_program` compiles it over a mesh; `prepare_inputs` encodes its inputs.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from nti_jax.loading import conditioning as cnd
from nti_jax.loading.conditioning import Cond, TextCond
from nti_jax.core.inversion import Inversion
from nti_jax.core.planning import with_remat
from nti_jax.core.sampling import Denoiser, guide, model_schedule
from nti_jax.core.schedule import Schedule, denoise_step, invert_step
from nti_jax.core.settings import InvertSettings
from nti_jax.errors import PromptError
from nti_jax.loading.pipeline import Pipeline

Progress = Optional[Callable[[jax.Array], None]]


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
    latents: jax.Array | None = None  # (B, T+1, h, w, C) null-text's optimised z_bar_0 .. z_bar_T


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
    return (z, out.phi), (out.phi, out.iters, out.loss, bad, z)


def null_text_optimisation(model: Denoiser, pivots: jax.Array, inputs: InvertInputs, progress: Progress = None, *,
                           remat: str = "none"):
    """The paper's per-timestep optimisation of phi: (phi, iters, losses, nonfinite), each (B,T,...),
    and the latents it advanced through, (B, T+1, h, w, C) indexed like the pivots."""
    n = inputs.sched.timesteps.shape[0]
    step = partial(null_text_step, model, inputs.sched, pivots, inputs, progress, remat=remat)
    _, outs = jax.lax.scan(step, (pivots[:, n], inputs.null), jnp.arange(n))
    phi, iters, losses, bad, zs = jax.tree_util.tree_map(lambda a: jnp.moveaxis(a, 0, 1), outs)  # zs[:, i]: z_bar_{n-1-i}
    return phi, iters, losses, bad, jnp.concatenate([zs[:, ::-1], pivots[:, n:]], axis=1)


def invert_core(model: Denoiser, inputs: InvertInputs, *, method: str, progress: Progress = None, remat: str = "none") -> InvertOutputs:
    """The whole inversion of a batch, unjitted (`parallel.sharded_program` compiles it).
    `remat`: one of REMAT_MODES ("auto" is resolved before, by `plan_program`)."""
    pivots = ddim_pivots(model, inputs.sched, inputs.z0, inputs.cond)
    b, n = inputs.z0.shape[0], inputs.sched.timesteps.shape[0]
    if method == "null-text":
        return InvertOutputs(pivots, *null_text_optimisation(model, pivots, inputs, progress, remat=remat))
    source = inputs.cond if method == "negative-prompt" else inputs.null
    phi = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a[:, None], (b, n) + a.shape[1:]), source)
    bad = jnp.broadcast_to(~jnp.all(jnp.isfinite(pivots), axis=(2, 3, 4))[:, 1:], (b, n))
    return InvertOutputs(pivots, phi, jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), jnp.float32), bad)


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


def prepare_inputs(pipe: Pipeline, images: Sequence[np.ndarray], prompts: Sequence[str], settings: InvertSettings) -> InvertInputs:
    """Encode a batch of uint8 square images (already at the model's size) and their prompts."""
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise PromptError(f"the source prompt must be a non-empty caption of the image, got {p!r}")
    # Null-text starts from the "" prompt's embedding, as the notebook does, also where the model's
    # unconditional embedding is zeros (SDXL): from zeros the optimisation reaches 4.3 dB less on
    # the SDXL toy (docs/departures.md, "SDXL").
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
        latents=out.latents,
        settings=settings,
        prompts=tuple(prompts),
        model=pipe.name,
        prediction_type=pipe.scheduler_config.get("prediction_type", "epsilon"),
        image_size=pipe.image_size,
    )
