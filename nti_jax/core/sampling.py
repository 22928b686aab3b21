"""The model call, the DDIM schedules and classifier-free-guided sampling that inversion,
reconstruction, generation and editing share."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nti_jax.core import conditioning as cnd
from nti_jax.core.conditioning import Cond, TextCond
from nti_jax.errors import NtiError
from nti_jax.models import AttentionHook, UNet2DConditionModel
from nti_jax.loading.pipeline import Pipeline
from nti_jax.core.schedule import Schedule, ddim_schedule, denoise_step, to_eps
from nti_jax.core.settings import InvertSettings

if TYPE_CHECKING:  # the type only: inversion imports this module
    from nti_jax.core.inversion import Inversion


@struct.dataclass
class Denoiser:
    """The UNet as a pytree handed to every compiled program: params a leaf, the module and the
    prediction type static (a new model of the same architecture never recompiles)."""

    params: Any
    module: UNet2DConditionModel = struct.field(pytree_node=False)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    time_ids: Optional[jax.Array] = None  # (6,) SDXL's size and crop numbers, the same for every row

    @classmethod
    def of(cls, pipe: Pipeline) -> "Denoiser":
        return cls(pipe.params["unet"], pipe.unet, pipe.scheduler_config.get("prediction_type", "epsilon"), pipe.time_ids)

    def __call__(self, x: jax.Array, t: jax.Array, context: Cond, hook: Optional[AttentionHook] = None) -> jax.Array:
        """The raw UNet output (eps or v) for latents (B,h,w,C) and conditioning (`conditioning`;
        token embeddings (B,L,D) or SDXL's `TextCond`), float32."""
        if isinstance(context, TextCond):
            ids = jnp.broadcast_to(self.time_ids, (x.shape[0], self.time_ids.shape[0]))
            return self.module.apply({"params": self.params}, x, t, context.tokens, hook, added=(context.pooled, ids))
        return self.module.apply({"params": self.params}, x, t, context, hook)

    def eps(self, x: jax.Array, t: jax.Array, a: jax.Array, context: Cond, hook: Optional[AttentionHook] = None) -> jax.Array:
        """The prediction as epsilon; `a` is the alpha of the latent's noise level (v conversion)."""
        return to_eps(self(x, t, context, hook), x, a, self.prediction_type)

    def cfg_eps(self, x, t, a_t, cond, uncond, guidance) -> jax.Array:
        """Guided eps from two UNet calls of B rows, conditional then unconditional: the calls that
        null-text's optimisation makes (`inversion.null_text_step`), so sampling with its phi
        replays the trajectory it optimised. The original notebook's one call on [uncond; cond]
        is the same in float32 but not in bf16, where a row's result depends on its call's batch
        and guidance amplifies that over the steps (README, "Inversion and sampling: departures")."""
        return guide(self.eps(x, t, a_t, uncond), self.eps(x, t, a_t, cond), guidance)


def guide(eps_u: jax.Array, eps_c: jax.Array, guidance: jax.Array) -> jax.Array:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u)."""
    return eps_u + guidance * (eps_c - eps_u)


def model_schedule(pipe: Pipeline, num_steps: int) -> Schedule:
    """The model's DDIM schedule with `num_steps` steps, as device arrays."""
    return Schedule(*map(jnp.asarray, ddim_schedule(pipe.scheduler_config, num_steps)))


def inversion_schedule(pipe: Pipeline, inv: "Inversion") -> Schedule:
    """The DDIM schedule an inversion was made with (checked against its stored timesteps)."""
    sched = model_schedule(pipe, inv.timesteps.shape[0])
    if not np.array_equal(np.asarray(sched.timesteps), np.asarray(inv.timesteps)):
        raise NtiError("this inversion was made with another scheduler config than the model's")
    return sched


def cfg_sample(model: Denoiser, sched: Schedule, x_T: jax.Array, cond: jax.Array, uncond: jax.Array, guidance: jax.Array) -> jax.Array:
    """DDIM sampling from x_T (B,h,w,C) with per-step unconditional conditioning (B,T,...).

    Returns the final latents (B,h,w,C). One lax.scan over the steps.
    """

    def step(x, k):
        t, a_t, a_prev = sched.timesteps[k], sched.alpha_t[k], sched.alpha_prev[k]
        return denoise_step(model.cfg_eps(x, t, a_t, cond, cnd.take(uncond, (slice(None), k)), guidance), x, a_t, a_prev), None

    x, _ = jax.lax.scan(step, x_T, jnp.arange(sched.timesteps.shape[0]))
    return x


def sample_core(model: Denoiser, sched: Schedule, x_T, cond, uncond, pivots, guidance, *, direct: bool) -> jax.Array:
    """Reconstruction's final latents (B, h, w, C): `cfg_sample`, or for a direct inversion z*_0."""
    if direct:
        return pivots[:, 0]  # pinning the source branch to the pivots returns z*_0 exactly
    return cfg_sample(model, sched, x_T, cond, uncond, guidance)


_sample_program = jax.jit(sample_core, static_argnames=("direct",))


def reconstruct(pipe: Pipeline, inv: "Inversion") -> tuple[jax.Array, jax.Array]:
    """CFG sampling from x_T with phi_t per step: (images (B,H,W,3) in [0,1], latents (B,h,w,C))."""
    z = _sample_program(
        Denoiser.of(pipe), inversion_schedule(pipe, inv), inv.x_T, inv.cond_embeddings, inv.null_embeddings,
        inv.pivots, jnp.float32(inv.settings.guidance_scale), direct=inv.method == "direct",
    )
    return pipe.decode_latents(z), z


def generate(
    pipe: Pipeline, prompts: Sequence[str], *, num_steps: int = InvertSettings.num_steps,
    guidance_scale: float = InvertSettings.guidance_scale, seed: int = 0, x_T=None,
) -> np.ndarray:
    """Text-to-image CFG DDIM sampling with the "" embedding as the unconditional one, from `x_T`
    (B, h, w, C) or Gaussian noise drawn from `seed`: float32 (B, H, W, 3) in [0, 1]. The same
    compiled program as `reconstruct`."""
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
    z = _sample_program(
        Denoiser.of(pipe), model_schedule(pipe, settings.num_steps), x_T, cond, uncond, None,
        jnp.float32(settings.guidance_scale), direct=False,
    )
    return np.asarray(pipe.decode_latents(z))
