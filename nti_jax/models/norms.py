"""GroupNorm and LayerNorm with float32 statistics, returning the layer's dtype.

Flax's norms normalise in float32 and cast at the end, so in bf16 every norm's output and its
gradient's residuals exist as float32 copies. Here the statistics are float32 (the upcast fuses
into the reductions), and where the dtype policy says so (`precision`, family "norms": the
default) a half-precision layer normalises in float32 through `_mixed`, whose gradient is written
out (`jax.custom_vjp`): it keeps the layer's input in its own dtype and two small statistics, and
its backward is two passes over the input and the incoming gradient. Autodiff of the same
forward, on a TPU, split a GroupNorm's channels into (groups, channels / group) layouts and
materialised float32 copies (`benchmarks/RESULTS.md`, "The norms' backward and unpadded
heads"). Without the policy the normalisation runs in the layer's dtype. In float32 the
operations are flax's own, in flax's order: (x - mean) * (rsqrt(var + eps) * scale) + bias with
var = E[x^2] - E[x]^2. Parameters are flax's ("scale", "bias", float32), so weights convert
unchanged.
"""

from __future__ import annotations

import math
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


def _row_sum(v: jax.Array, groups: int | None) -> jax.Array:
    """v (B, ..., C) summed over each normalisation row, broadcastable to v: over C for a
    LayerNorm (groups None: (B, ..., 1)); for a GroupNorm over the spatial axes per channel
    first, then over each group's channels on the small (B, C) sums ((B, 1, ..., 1, C)), so no
    array of the input's size takes a (groups, channels / group) shape."""
    if groups is None:
        return jnp.sum(v, -1, keepdims=True)
    b, c = v.shape[0], v.shape[-1]
    per_channel = jnp.sum(v, tuple(range(1, v.ndim - 1)))  # (B, C)
    per_group = per_channel.reshape(b, groups, c // groups).sum(-1, keepdims=True)  # (B, G, 1)
    per_group = jnp.broadcast_to(per_group, (b, groups, c // groups))
    return per_group.reshape((b,) + (1,) * (v.ndim - 2) + (c,))


def _row_size(shape: tuple, groups: int | None) -> int:
    """How many elements one normalisation row of a (B, ..., C) input holds."""
    if groups is None:
        return shape[-1]
    return math.prod(shape[1:-1]) * (shape[-1] // groups)


def _mixed_stats(x: jax.Array, groups: int | None, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    xf = x.astype(jnp.float32)
    n = _row_size(x.shape, groups)
    mean = _row_sum(xf, groups) / n
    var = jnp.maximum(0.0, _row_sum(xf * xf, groups) / n - mean * mean)
    return xf, mean, jax.lax.rsqrt(var + eps)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _mixed(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int | None, eps: float) -> jax.Array:
    """x (B, ..., C) in a half dtype, normalised in float32 (per row of C, or per group of
    channels over the spatial axes), cast back to x's dtype."""
    return _mixed_fwd(x, scale, bias, groups, eps)[0]


def _mixed_fwd(x, scale, bias, groups, eps):
    xf, mean, rstd = _mixed_stats(x, groups, eps)
    return ((xf - mean) * (rstd * scale) + bias).astype(x.dtype), (x, mean, rstd, scale)


def _mixed_bwd(groups, eps, residuals, dy):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * scale, means over the row."""
    x, mean, rstd, scale = residuals
    n = _row_size(x.shape, groups)
    dyf = dy.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g = dyf * scale
    dx = rstd * (g - _row_sum(g, groups) / n - xhat * (_row_sum(g * xhat, groups) / n))
    axes = tuple(range(x.ndim - 1))
    return dx.astype(x.dtype), jnp.sum(dyf * xhat, axes), jnp.sum(dyf, axes)


_mixed.defvjp(_mixed_fwd, _mixed_bwd)


def _in_policy(norm, groups: int | None, eps: float, x: jax.Array, scale: jax.Array, bias: jax.Array,
               dtype) -> jax.Array:
    """`norm(x, scale, bias)` in the layer's `dtype`, or in float32 where the dtype policy says
    (`precision`, "norms"), through `_mixed`."""
    if compute_dtype("norms", dtype) == dtype:
        return norm(x.astype(dtype), scale, bias)
    return _mixed(x.astype(dtype), scale, bias, groups, eps)


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
        return _in_policy(norm, self.num_groups, self.epsilon, x, scale, bias, self.dtype)


class LayerNorm(nn.Module):
    """torch LayerNorm over the last axis."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = _affine(self, x.shape[-1])
        apply = lambda x, scale, bias: _apply(x, (x.ndim - 1,), self.epsilon, scale, bias)
        return _in_policy(apply, None, self.epsilon, x, scale, bias, self.dtype)
