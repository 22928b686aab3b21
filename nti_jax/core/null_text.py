"""The inversion program (Mokady et al. 2023, and its faster relatives): the DDIM pivot (w = 1,
lax.scan over timesteps) and, for "null-text", the pivots and the per-timestep optimisation of
the unconditional embedding as one loop over its UNet forward calls (inside, a lax.while_loop of
optax Adam steps with the paper's early stop), as one function of a batch's prepared inputs. Images in a batch are independent:
each keeps its own early stop and its own Adam state, so results equal one-at-a-time runs.
`parallel.sharded_program` compiles it over a mesh; `prepare_inputs` encodes its inputs.
"""

from __future__ import annotations

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


def _optimise_step(grad_model: Denoiser, inputs: InvertInputs, i: jax.Array, z: jax.Array, phi: Cond, eps_c: jax.Array,
                   target: jax.Array, *, run: jax.Array) -> _Inner:
    """Timestep i's Adam loop on phi until the paper's early stop (none where `run` is false): the
    loss compares z_bar's guided DDIM step with the pivot `target`, per image."""
    sched = inputs.sched
    t, a_t, a_prev = sched.timesteps[i], sched.alpha_t[i], sched.alpha_prev[i]
    threshold = inputs.early_stop_epsilon + i.astype(jnp.float32) * 2e-5
    opt = optax.adam(1e-2 * (1.0 - i.astype(jnp.float32) / 100.0))

    def losses(p):
        eps_u = grad_model.eps(z, t, a_t, p)
        pred = denoise_step(guide(eps_u, eps_c, inputs.guidance), z, a_t, a_prev)
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
    return jax.lax.while_loop(lambda c: run & (c.j < inputs.num_inner_steps) & jnp.any(c.active), body, init)


class _Slot(NamedTuple):
    """The carry of `null_text_program`'s loop over its UNet forward calls."""

    z: jax.Array  # (B, h, w, C) the latent the next call reads: a pivot, then z_bar
    eps_c: jax.Array  # (B, h, w, C) this timestep's conditional prediction
    phi: Cond  # (B, L, D) phi as optimised so far (after a conditional slot: this timestep's)
    inner: _Inner  # this timestep's Adam loop, as it ended
    out: InvertOutputs  # filled as the loop goes: pivots, then phi, iterations, losses, nonfinite, latents (B, T(+1), ...)


def _first_slot(inputs: InvertInputs) -> _Slot:
    """The loop's carry before its first call: z = z*_0, phi = the null embedding, outputs empty."""
    z0, phi, n = inputs.z0, inputs.null, inputs.sched.timesteps.shape[0]
    b = z0.shape[0]
    steps = lambda a, extra=0: jnp.zeros((b, n + extra) + a.shape[1:], a.dtype)  # (B, T(+1), ...) of a row's shape
    inner = _Inner(jnp.int32(0), phi, optax.adam(0.0).init(phi), jnp.zeros((b,), jnp.float32), jnp.zeros((b,), bool),
                   jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    out = InvertOutputs(
        pivots=steps(z0, 1).at[:, 0].set(z0),
        phi=jax.tree_util.tree_map(steps, phi),
        inner_iterations=steps(jnp.zeros((b,), jnp.int32)),
        final_losses=steps(jnp.zeros((b,), jnp.float32)),
        nonfinite=steps(jnp.zeros((b,), bool)),
        latents=steps(z0, 1),
    )
    return _Slot(z0, jnp.zeros_like(z0), phi, inner, out)


def null_text_program(model: Denoiser, inputs: InvertInputs, progress: Progress = None, *, remat: str = "none") -> InvertOutputs:
    """DDIM pivots, then the paper's per-timestep optimisation of phi (Adam until the early stop,
    then z_bar advances with the optimised phi), as one loop over the program's 3T UNet forward
    calls: T pivot calls (conditional, w = 1), then per timestep i a conditional call followed by
    its Adam loop (the gradient's UNet instance; `remat`: what it recomputes instead of keeping)
    and an unconditional call with the optimised phi. Each slot selects its call's inputs, so the
    compiled program holds one forward instance where a straight-line program holds three (on a
    TPU, ~130 MiB of code each at SD 1.5); the calls, their batches and their arithmetic are
    those of the straight-line program. The conditional prediction is computed once per
    timestep, before the Adam loop, and reused to advance (docs/departures.md)."""
    sched, n = inputs.sched, inputs.sched.timesteps.shape[0]
    grad_model = with_remat(model, remat)

    def slot(s, c: _Slot) -> _Slot:
        pivot = s < n  # pivot call s (ascending timesteps); then per timestep i, conditional and final
        i = jnp.maximum(s - n, 0) // 2
        final = ~pivot & ((s - n) % 2 == 1)
        conditional = ~pivot & ~final
        idx = jnp.where(pivot, n - 1 - s, i)
        t, a_t, a_prev = sched.timesteps[idx], sched.alpha_t[idx], sched.alpha_prev[idx]
        context = jax.tree_util.tree_map(lambda p, q: jnp.where(final, p, q), c.phi, inputs.cond)
        # A pivot latent sits at noise level t - stride: v converts with that level's alpha.
        e = model.eps(c.z, t, jnp.where(pivot, a_prev, a_t), context)
        eps_c = jnp.where(conditional, jax.lax.stop_gradient(e), c.eps_c)
        target = jax.lax.dynamic_index_in_dim(c.out.pivots, n - 1 - i, axis=1, keepdims=False)
        ran = _optimise_step(grad_model, inputs, i, c.z, c.phi, eps_c, target, run=conditional)
        inner = jax.tree_util.tree_map(lambda new, old: jnp.where(conditional, new, old), ran, c.inner)
        z_pivot = invert_step(e, c.z, a_t, a_prev)
        z_bar = denoise_step(guide(e, eps_c, inputs.guidance), c.z, a_t, a_prev)

        def put(buf, value, at, when):
            """`value` (B, ...) into step `at` of `buf` (B, T(+1), ...) where `when` holds."""
            old = jax.lax.dynamic_index_in_dim(buf, at, axis=1, keepdims=False)
            return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(when, value, old), at, axis=1)

        bad = inner.bad | ~jnp.all(jnp.isfinite(z_bar), axis=(1, 2, 3))
        o = c.out
        out = InvertOutputs(
            pivots=put(o.pivots, z_pivot, jnp.minimum(s + 1, n), pivot),
            phi=jax.tree_util.tree_map(lambda buf, v: put(buf, v, i, final), o.phi, inner.phi),
            inner_iterations=put(o.inner_iterations, inner.iters, i, final),
            final_losses=put(o.final_losses, inner.loss, i, final),
            nonfinite=put(o.nonfinite, bad, i, final),
            latents=put(o.latents, z_bar, n - 1 - i, final),  # z_bar_k, k = n - 1 - i
        )
        if progress is not None:
            jax.lax.cond(final, lambda: jax.debug.callback(progress, i), lambda: None)
        z = jnp.where(pivot, z_pivot, jnp.where(final, z_bar, c.z))
        return _Slot(z, eps_c, jax.tree_util.tree_map(lambda p, q: jnp.where(conditional, p, q), inner.phi, c.phi), inner, out)

    out = jax.lax.fori_loop(0, 3 * n, slot, _first_slot(inputs)).out
    return out._replace(latents=out.latents.at[:, n].set(out.pivots[:, n]))


def invert_core(model: Denoiser, inputs: InvertInputs, *, method: str, progress: Progress = None, remat: str = "none") -> InvertOutputs:
    """The whole inversion of a batch, unjitted (`parallel.sharded_program` compiles it).
    `remat`: one of REMAT_MODES ("auto" is resolved before, by `plan_program`)."""
    if method == "null-text":
        return null_text_program(model, inputs, progress, remat=remat)
    pivots = ddim_pivots(model, inputs.sched, inputs.z0, inputs.cond)
    b, n = inputs.z0.shape[0], inputs.sched.timesteps.shape[0]
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


def check_source_prompt(prompt: Any) -> None:
    """A PromptError unless `prompt` is a non-empty caption: checked on the host before any
    program is planned or compiled, so a bad prompt costs no compile."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptError(f"the source prompt must be a non-empty caption of the image, got {prompt!r}")


def prepare_inputs(pipe: Pipeline, images: Sequence[np.ndarray], prompts: Sequence[str], settings: InvertSettings) -> InvertInputs:
    """Encode a batch of uint8 square images (already at the model's size) and their prompts."""
    for p in prompts:
        check_source_prompt(p)
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
