"""Convolutional pieces shared by the UNet and the VAE, named as in diffusers (NHWC inside)."""

from __future__ import annotations

from functools import partial
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from nti_jax.models.backend import kernel_choice
from nti_jax.models.norms import GroupNorm
from nti_jax.models.precision import compute_dtype, residual_add


_DN = ("NHWC", "HWIO", "NHWC")
# The name given to every convolution's and dense layer's output: what remat="blocks" keeps.
MATMUL = "nti.matmul"
# A conv's input gradient, per backend (`kernel_choice`; $NTI_JAX_CONV_GRAD overrides): "flipped"
# is `conv_same`/`conv_strided`'s explicit gradient, made inside a conditional; "autodiff" is
# lax.conv's own, with no conditional. XLA:CPU runs autodiff's form several times slower inside
# the inner loop (see `conv_same`) and hoists its reversed kernels out of it. On GPU a conditional
# copies its predicate to the host and waits (one full drain per conv per gradient), so GPU and
# TPU take autodiff's.
CONV_GRAD = {"cpu": "flipped", "default": "autodiff"}
CONV_GRAD_CHOICES = ("flipped", "autodiff")


def tag(x: jax.Array) -> jax.Array:
    """Mark a linear layer's output (a no-op outside `jax.checkpoint` policies)."""
    return checkpoint_name(x, MATMUL)


def _lax_conv(x: jax.Array, kernel: jax.Array, stride: int, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_DN)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same(x: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
    """Stride-1 conv with symmetric padding `pad`, whose input gradient is a plain HWIO conv.

    Autodiff's input gradient is a conv on the reversed kernel with swapped in/out dims; inside a
    `lax.while_loop` XLA:CPU runs that form 4-15x slower than a plain conv (measured on 3x3
    convs, 16x16 maps), which made the null-text inner loop ~1.8x slower than the same UNet
    gradients called one by one. The explicit flip-and-transpose keeps it on the fast path.
    """
    return _lax_conv(x, kernel, 1, ((pad, pad), (pad, pad)))


def _conv_same_fwd(x, kernel, pad):
    return conv_same(x, kernel, pad), (x, kernel)


def _in_branch(grad, g: jax.Array, kernel: jax.Array) -> jax.Array:
    """`grad(g, kernel)` computed inside a branch on the (loop-varying) gradient. Made at top level,
    a conv's reversed input-gradient kernel is hoisted by XLA out of the inner loop, and every
    conv's copy is kept for the whole program (2.3 GiB at SD 1.5 in float32). Both branches are
    the same computation."""
    return jax.lax.cond(jnp.isnan(g[0, 0, 0, 0]), grad, grad, g, kernel)


def _input_grad(g: jax.Array, kernel: jax.Array, pad: int) -> jax.Array:
    q = kernel.shape[0] - 1 - pad
    return _lax_conv(g, jnp.swapaxes(kernel[::-1, ::-1], 2, 3), 1, ((q, q), (q, q)))


def _conv_same_bwd(pad, res, g):
    x, kernel = res
    dx = _in_branch(partial(_input_grad, pad=pad), g, kernel)
    _, kernel_vjp = jax.vjp(lambda k: _lax_conv(x, k, 1, ((pad, pad), (pad, pad))), kernel)
    return dx, kernel_vjp(g)[0]


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_strided(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple) -> jax.Array:
    """Any other conv (the UNet's stride-2 downsamplers), with autodiff's own gradients, but its
    input gradient made in a branch as in `conv_same` (hoisted, the 1280-channel one alone held
    59 MB at SD 1.5)."""
    return _lax_conv(x, kernel, stride, padding)


def _conv_strided_fwd(x, kernel, stride, padding):
    return conv_strided(x, kernel, stride, padding), (x, kernel)


def _conv_strided_bwd(stride, padding, res, g):
    x, kernel = res
    conv = lambda x, k: _lax_conv(x, k, stride, padding)
    dx = _in_branch(lambda g, k: jax.vjp(lambda x: conv(x, k), x)[1](g)[0], g, kernel)
    return dx, jax.vjp(lambda k: conv(x, k), kernel)[1](g)[0]


conv_strided.defvjp(_conv_strided_fwd, _conv_strided_bwd)


class Conv2d(nn.Module):
    """torch-style Conv2d, channels-last, with `nn.Conv`'s parameters ("kernel" HWIO, "bias")."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: Optional[tuple] = None  # ((top, bottom), (left, right)); default kernel // 2 all round
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        pad = ((k // 2, k // 2),) * 2 if self.padding is None else tuple(map(tuple, self.padding))
        if kernel_choice("conv_grad", CONV_GRAD, CONV_GRAD_CHOICES) == "autodiff":
            return tag(_lax_conv(x, kernel, self.stride, pad) + bias)
        if self.stride == 1 and self.padding is None and k % 2 == 1:
            return tag(conv_same(x, kernel, k // 2) + bias)
        return tag(conv_strided(x, kernel, self.stride, pad) + bias)


def conv(features: int, kernel: int, name: Optional[str], dtype, stride: int = 1, padding=None) -> Conv2d:
    """A torch-style Conv2d: symmetric padding kernel//2 unless given."""
    return Conv2d(features, kernel, stride, padding, dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` with the default ("default" time-scale-shift, scale 1) settings."""

    out_channels: int
    groups: int
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        norm = lambda name: GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name=name)
        h = conv(self.out_channels, 3, "conv1", self.dtype)(nn.silu(norm("norm1")(x)))
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=compute_dtype("time_embedding", self.dtype), name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = conv(self.out_channels, 3, "conv2", self.dtype)(nn.silu(norm("norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return residual_add(x, h)


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
