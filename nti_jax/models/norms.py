"""GroupNorm and LayerNorm with float32 statistics, returning the layer's dtype.

Flax's norms normalise in float32 and cast at the end, so in bf16 every norm's output and its
gradient's residuals exist as float32 copies. Here the statistics are float32 (the upcast fuses
into the reductions), and the normalisation runs in float32 where the dtype policy says so
(`precision`, family "norms": the default) inside a checkpoint, so a gradient keeps only the
layer's input in its own dtype; else in the layer's dtype. In float32 the operations are flax's
own, in flax's order: (x - mean) * (rsqrt(var + eps) * scale) + bias with var = E[x^2] -
E[x]^2. Parameters are flax's ("scale", "bias", float32), so weights convert unchanged.
"""

from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from nti_jax.models.precision import compute_dtype


def normalize(x: jax.Array, groups: int, eps: float, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """x (B, ..., C) normalised per row over every axis but the batch, within each of `groups`
    groups of channels."""
    c = x.shape[-1]
    g = x.reshape(x.shape[:-1] + (groups, c // groups))
    axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
    return _apply(g, axes, eps, scale.reshape(groups, c // groups), bias.reshape(groups, c // groups)).reshape(x.shape)


@partial(jax.checkpoint, static_argnums=(1,))
def _stats(x: jax.Array, axes: tuple) -> tuple[jax.Array, jax.Array]:
    """Mean and variance over `axes` in float32. Checkpointed: a gradient keeps `x` in its own
    dtype and converts it again, rather than keeping a float32 copy."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes, keepdims=True)
    return mean, jnp.maximum(0.0, jnp.mean(xf * xf, axes, keepdims=True) - mean * mean)


def _apply(x: jax.Array, axes: tuple, eps: float, scale: jax.Array, bias: jax.Array) -> jax.Array:
    mean, var = _stats(x, axes)
    mul = jax.lax.rsqrt(var + eps) * scale  # float32, small: one value per (row, group, channel)
    dt = x.dtype
    return (x - mean.astype(dt)) * mul.astype(dt) + bias.astype(dt)


def _in_policy(norm, x: jax.Array, scale: jax.Array, bias: jax.Array, dtype) -> jax.Array:
    """`norm(x, scale, bias)` in the layer's `dtype`, or in float32 where the dtype policy says
    (`precision`, "norms"), cast to `dtype`. The float32 form is checkpointed: a gradient keeps
    `x` as it came (bf16) and recomputes the upcast, so it keeps no float32 copy."""
    if compute_dtype("norms", dtype) == dtype:
        return norm(x.astype(dtype), scale, bias)
    f32 = jax.checkpoint(lambda x, scale, bias: norm(x.astype(jnp.float32), scale, bias).astype(dtype))
    return f32(x, scale, bias)


def _affine(module: nn.Module, channels: int) -> tuple[jax.Array, jax.Array]:
    """The norm's "scale" (ones) and "bias" (zeros), float32, one per channel."""
    return (module.param("scale", nn.initializers.ones_init(), (channels,), jnp.float32),
            module.param("bias", nn.initializers.zeros_init(), (channels,), jnp.float32))


class GroupNorm(nn.Module):
    """torch GroupNorm (affine) over NHWC or (B, L, C) inputs."""

    num_groups: int
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = _affine(self, x.shape[-1])
        norm = lambda x, scale, bias: normalize(x, self.num_groups, self.epsilon, scale, bias)
        return _in_policy(norm, x, scale, bias, self.dtype)


class LayerNorm(nn.Module):
    """torch LayerNorm over the last axis."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = _affine(self, x.shape[-1])
        apply = lambda x, scale, bias: _apply(x, (x.ndim - 1,), self.epsilon, scale, bias)
        return _in_policy(apply, x, scale, bias, self.dtype)
