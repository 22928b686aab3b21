"""DDIM (eta = 0) in float32: timesteps and alphas from a diffusers scheduler config (as diffusers'
DDIMScheduler.set_timesteps), and the denoise / inversion steps of Null-text Inversion (Mokady et
al. 2023; the notebook's ``prev_step`` / ``next_step`` in
google/prompt-to-prompt ``null_text_w_ptp.ipynb``), for epsilon and v-prediction models."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def train_alphas_cumprod(config: dict) -> np.ndarray:
    """alphas_cumprod over the training timesteps, float32 as diffusers computes it."""
    n = int(config.get("num_train_timesteps", 1000))
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if kind == "scaled_linear":
        betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float32) ** 2
    elif kind == "linear":
        betas = np.linspace(b0, b1, n, dtype=np.float32)
    else:
        raise ValueError(f"unsupported beta_schedule {kind!r}")
    return np.cumprod(1.0 - betas, dtype=np.float32)


class Schedule(NamedTuple):
    """Per inference step i (descending t): the timestep, alpha(t) and alpha(t - stride)."""

    timesteps: jax.Array  # (T,) int32
    alpha_t: jax.Array  # (T,) float32
    alpha_prev: jax.Array  # (T,) float32; the final alpha where t - stride < 0


def inference_timesteps(config: dict, num_steps: int) -> np.ndarray:
    """diffusers DDIMScheduler.set_timesteps: descending int timesteps."""
    n = int(config.get("num_train_timesteps", 1000))
    spacing = config.get("timestep_spacing", "leading")
    if not 0 < num_steps <= n:
        raise ValueError(f"num_steps must be in 1..{n}, got {num_steps}")
    if spacing == "leading":
        ts = (np.arange(num_steps) * (n // num_steps)).round()[::-1] + int(config.get("steps_offset", 0))
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / num_steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, n - 1, num_steps).round()[::-1]
    else:
        raise ValueError(f"unsupported timestep_spacing {spacing!r}")
    return ts.astype(np.int32)


def ddim_schedule(config: dict, num_steps: int) -> Schedule:
    """The DDIM schedule of a diffusers scheduler config with `num_steps` inference steps."""
    ac = train_alphas_cumprod(config)
    final = np.float32(1.0) if config.get("set_alpha_to_one", True) else ac[0]
    ts = inference_timesteps(config, num_steps)
    prev = ts - int(config.get("num_train_timesteps", 1000)) // num_steps
    alpha = lambda t: np.where(t >= 0, ac[np.clip(t, 0, len(ac) - 1)], final).astype(np.float32)
    return Schedule(ts, alpha(ts), alpha(prev))


def to_eps(model_output: jax.Array, x: jax.Array, a_t: jax.Array, prediction_type: str) -> jax.Array:
    """The model's output as epsilon; v-prediction converts with the alpha of its timestep."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return jnp.sqrt(a_t) * model_output + jnp.sqrt(1.0 - a_t) * x
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def denoise_step(eps: jax.Array, x: jax.Array, a_t: jax.Array, a_prev: jax.Array) -> jax.Array:
    """DDIM t -> t - stride: x0 from (x, eps) at alpha a_t, re-noised to a_prev."""
    x0 = (x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
    return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps


def invert_step(eps: jax.Array, x: jax.Array, a_t: jax.Array, a_prev: jax.Array) -> jax.Array:
    """DDIM inversion t - stride -> t: the denoise formula run backwards (a_prev -> a_t)."""
    return denoise_step(eps, x, a_prev, a_t)
