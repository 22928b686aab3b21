"""The classifier-free-guided DDIM pieces that inversion, reconstruction and editing share."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from .models import AttentionHook
from .schedule import Schedule, denoise_step, to_eps

# unet_fn(latents (B,h,w,C), timestep, context (B,L,D), hook) -> model output, float32
UNetFn = Callable[..., jax.Array]


def cfg_eps(
    unet_fn: UNetFn,
    prediction_type: str,
    x: jax.Array,
    t: jax.Array,
    a_t: jax.Array,
    cond: jax.Array,
    uncond: jax.Array,
    guidance: jax.Array,
    hook: Optional[AttentionHook] = None,
) -> jax.Array:
    """Guided eps from ONE UNet call on [uncond rows; cond rows], as the original notebook does.

    A hook sees probabilities for 2B rows: the first B unconditional, the last B conditional.
    """
    xx = jnp.concatenate([x, x])
    out = to_eps(unet_fn(xx, t, jnp.concatenate([uncond, cond]), hook), xx, a_t, prediction_type)
    eps_u, eps_c = jnp.split(out, 2)
    return eps_u + guidance * (eps_c - eps_u)


def cfg_sample(
    unet_fn: UNetFn,
    prediction_type: str,
    sched: Schedule,
    x_T: jax.Array,
    cond: jax.Array,
    uncond: jax.Array,
    guidance: jax.Array,
) -> jax.Array:
    """DDIM sampling from x_T (B,h,w,C) with per-step unconditional embeddings (B,T,L,D).

    Returns the final latents (B,h,w,C). One lax.scan over the steps.
    """

    def step(x, k):
        t, a_t, a_prev = sched.timesteps[k], sched.alpha_t[k], sched.alpha_prev[k]
        eps = cfg_eps(unet_fn, prediction_type, x, t, a_t, cond, uncond[:, k], guidance)
        return denoise_step(eps, x, a_t, a_prev), None

    x, _ = jax.lax.scan(step, x_T, jnp.arange(sched.timesteps.shape[0]))
    return x
