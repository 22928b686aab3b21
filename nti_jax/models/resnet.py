"""Convolutional pieces shared by the UNet and the VAE, named as in diffusers (NHWC inside)."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv(features: int, kernel: int, name: Optional[str], dtype, stride: int = 1, padding=None) -> nn.Conv:
    """A torch-style Conv2d: symmetric padding kernel//2 unless given."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)) if padding is None else padding,
        dtype=dtype,
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` with the default ("default" time-scale-shift, scale 1) settings."""

    out_channels: int
    groups: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        norm = lambda name: nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name=name)
        h = conv(self.out_channels, 3, "conv1", self.dtype)(nn.silu(norm("norm1")(x)))
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = conv(self.out_channels, 3, "conv2", self.dtype)(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv; `asymmetric` is the VAE's pad (0, 1, 0, 1) then valid conv."""

    channels: int
    asymmetric: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric else None
        return conv(self.channels, 3, "conv", self.dtype, stride=2, padding=padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, 3, "conv", self.dtype)(x)
