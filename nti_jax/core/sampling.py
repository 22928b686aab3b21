"""The model call, the DDIM schedules and classifier-free-guided sampling that inversion,
reconstruction, generation and editing share (the library calls are in `api`)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from nti_jax.loading import conditioning as cnd
from nti_jax.loading.conditioning import Cond, TextCond
from nti_jax.models import AttentionHook, UNet2DConditionModel
from nti_jax.loading.pipeline import Pipeline
from nti_jax.core.schedule import Schedule, ddim_schedule, denoise_step, to_eps


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
        null-text's optimisation makes (`null_text.null_text_program`), so sampling with its phi
        replays the trajectory it optimised. The original notebook's one call on [uncond; cond]
        is the same in float32 but not in bf16, where a row's result depends on its call's batch
        and guidance amplifies that over the steps (docs/departures.md, "Inversion and sampling").
        The two calls are one loop of two over one UNet instance, so a compiled program holds one
        forward's code (on a TPU, ~130 MiB at SD 1.5), not two."""

        def call(k, eps):  # k = 0: unconditional, 1: conditional
            context = jax.tree_util.tree_map(lambda u, c: jnp.where(k == 0, u, c), uncond, cond)
            return eps.at[k].set(self.eps(x, t, a_t, context))

        eps = jax.lax.fori_loop(0, 2, call, jnp.zeros((2,) + x.shape, jnp.float32))  # (2, B, h, w, C)
        return guide(eps[0], eps[1], guidance)


def guide(eps_u: jax.Array, eps_c: jax.Array, guidance: jax.Array) -> jax.Array:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u)."""
    return eps_u + guidance * (eps_c - eps_u)


def model_schedule(pipe: Pipeline, num_steps: int) -> Schedule:
    """The model's DDIM schedule with `num_steps` steps, as device arrays."""
    return Schedule(*map(jnp.asarray, ddim_schedule(pipe.scheduler_config, num_steps)))


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
